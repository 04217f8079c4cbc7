"""Tests of mdlens.hooks.behaviour, checked against central finite differences, brute-force grids
over the simplex and the estimators (never against the module's own output)."""

import itertools

import numpy as np
import pytest
import torch

import mdlens
from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.construction import build_md_transformer
from mdlens.hooks.behaviour import (
    ImplicitWeights,
    closest_mtd_weights,
    implicit_weights,
    implicit_weights_distances,
    input_jacobian,
    merge_repeated_lags,
    sensitivity_alignment,
)
from mdlens.models import standard_transformer


def finite_difference_jacobian(model, tokens, read_probs, step=1e-6):
    """Central differences of the last position's distribution in each one-hot input coordinate,
    the embedding built by hand as ``x @ W_E`` and swapped in at ``hook_embed``: ``[B, q, T, q]``."""
    batch, seq_len = tokens.shape
    q = model.cfg.d_vocab
    one_hot = torch.nn.functional.one_hot(tokens, q).to(torch.float64)

    def probs_at(inputs):
        embed = inputs @ model.W_E.detach()
        with torch.no_grad():
            output = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda act, hook: embed)])
        return read_probs(output[:, -1])

    jacobian = torch.zeros(batch, q, seq_len, q, dtype=torch.float64)
    for t, u in itertools.product(range(seq_len), range(q)):
        bump = torch.zeros_like(one_hot)
        bump[:, t, u] = step
        jacobian[:, :, t, u] = (probs_at(one_hot + bump) - probs_at(one_hot - bump)) / (2 * step)
    return jacobian


def softmax_probs(output):
    return torch.softmax(output, dim=-1)


def renormalised_probs(output):  # the paper's "probs" reading: clip at zero, renormalise
    clipped = output.clamp(min=0)
    return clipped / clipped.sum(dim=-1, keepdim=True)


def toy_model(seed: int):
    return standard_transformer(4, 6, n_layers=1, d_model=8, n_heads=2, d_mlp=16, dtype=torch.float64, seed=seed)


# ----------------------------------------------------------------------------------------------
# input_jacobian and sensitivity_alignment
# ----------------------------------------------------------------------------------------------


def test_input_jacobian_matches_finite_differences_on_a_toy_transformer():
    model = toy_model(seed=1)
    tokens = torch.randint(4, (3, 6), generator=torch.Generator().manual_seed(0))
    jacobian, probs = input_jacobian(model, tokens, batch_size=2)  # two chunks
    assert jacobian.shape == (3, 4, 6, 4) and jacobian.dtype == torch.float64
    expected = finite_difference_jacobian(model, tokens, softmax_probs)
    assert (jacobian - expected).abs().max().item() < 1e-8
    with torch.no_grad():
        assert (probs - torch.softmax(model(tokens)[:, -1], dim=-1)).abs().max().item() < 1e-14


def test_input_jacobian_matches_finite_differences_on_the_construction():
    task = MTDTask(vocab_size=3, order=2, seed=4)
    tokens = task.sample(2, 7, generator=torch.Generator().manual_seed(1)).tokens
    model = build_md_transformer(task.transition, 2, 7, eta=0.8)
    jacobian, probs = input_jacobian(model, tokens)
    expected = finite_difference_jacobian(model, tokens, renormalised_probs)
    assert (jacobian - expected).abs().max().item() < 1e-8
    md = E.predictive(tokens, task.transition, E.md_weights(tokens, task.transition, 2, 0.8))
    assert (probs - md).abs().max().item() < 1e-12


def test_sensitivity_alignment_matches_cosines_of_finite_difference_jacobians():
    model, reference = toy_model(seed=2), toy_model(seed=3)
    tokens = torch.randint(4, (3, 6), generator=torch.Generator().manual_seed(5))
    result = sensitivity_alignment(model, reference, tokens)
    ours = finite_difference_jacobian(model, tokens, softmax_probs).reshape(3, -1).numpy()
    theirs = finite_difference_jacobian(reference, tokens, softmax_probs).reshape(3, -1).numpy()
    cosines = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    gaps = np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)
    assert result["cosine"] == pytest.approx(cosines.mean(), abs=1e-7)
    assert result["relative_gap"] == pytest.approx(gaps.mean(), rel=1e-6)
    with torch.no_grad():
        p_model = torch.softmax(model(tokens)[:, -1], -1).numpy()
        p_reference = torch.softmax(reference(tokens)[:, -1], -1).numpy()
    kl = (p_reference * np.log(p_reference / p_model)).sum(1)
    assert result["prediction_kl"] == pytest.approx(kl.mean(), rel=1e-9)
    assert result["per_sequence"]["cosine"].shape == (3,)


def test_sensitivity_alignment_of_a_model_with_itself():
    model, task = mdlens.load_pretrained("standard-3l")
    tokens = task.sample(4, 24, generator=torch.Generator().manual_seed(2)).tokens
    result = sensitivity_alignment(model, model, tokens)
    assert result["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert result["relative_gap"] < 1e-6 and result["prediction_kl"] < 1e-12
    # A softmax output sums to 1 whatever the input: the Jacobian sums to 0 over output tokens.
    jacobian, _ = input_jacobian(model, tokens)
    assert jacobian.sum(dim=1).abs().max().item() < 1e-6 * jacobian.abs().max().item()


def test_sensitivity_alignment_runs_on_the_shipped_disentangled_model():
    model, task = mdlens.load_pretrained("disentangled-3l")
    tokens = task.sample(3, 32, generator=torch.Generator().manual_seed(3)).tokens
    construction = build_md_transformer(task.transition, 3, 32, eta=0.1)
    result = sensitivity_alignment(model, construction, tokens)
    assert -1.0 <= result["cosine"] <= 1.0 and result["relative_gap"] > 0


def test_sensitivity_rejects_bad_input():
    model = toy_model(seed=1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        input_jacobian(model, torch.tensor([[0, 1, 4]]))
    with pytest.raises(ValueError, match="n_ctx"):
        sensitivity_alignment(model, model, torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="d_vocab"):
        sensitivity_alignment(
            model, standard_transformer(5, 6, n_layers=1, d_model=8), torch.zeros(2, 3, dtype=torch.long)
        )


# ----------------------------------------------------------------------------------------------
# implicit weights
# ----------------------------------------------------------------------------------------------


def brute_force_closest(target, parents, pi, resolution):
    """min over a grid of the simplex (steps 1/resolution) of KL(target || sum_g w_g pi(parent_g, .))."""
    m = len(parents)
    grid = [w for w in itertools.product(range(resolution + 1), repeat=m - 1) if sum(w) <= resolution]
    weights = np.array([[*w, resolution - sum(w)] for w in grid], dtype=np.float64) / resolution
    mixtures = weights @ pi[parents]  # [n_grid, q]
    kl = (target * (np.log(target) - np.log(mixtures))).sum(axis=1)
    best = int(np.argmin(kl))
    return weights[best], kl[best]


@pytest.mark.parametrize("m, resolution", [(2, 100_000), (3, 600)])
def test_closest_mtd_weights_matches_a_brute_force_grid(m, resolution):
    task = MTDTask(vocab_size=5, order=m, seed=m)
    generator = torch.Generator().manual_seed(10 + m)
    tokens = task.sample(6, 10, generator=generator).tokens
    # Distinct last m tokens (so the minimiser is unique), and arbitrary targets off the MTD family.
    tokens[:, -m:] = torch.stack([torch.randperm(5, generator=generator)[:m] for _ in range(6)])
    targets = -torch.log(torch.rand(6, 5, generator=generator, dtype=torch.float64))
    targets = targets / targets.sum(dim=1, keepdim=True)
    result = closest_mtd_weights(targets, tokens, task.transition, m)
    assert isinstance(result, ImplicitWeights) and result.weights.shape == (6, m)
    pi = task.transition.numpy()
    for b in range(6):
        parents = tokens[b, -m:].flip(0).numpy()  # lag g = 1..m reads y_{T+1-g}
        grid_weights, grid_kl = brute_force_closest(targets[b].numpy(), parents, pi, resolution)
        assert result.residual_kl[b].item() <= grid_kl + 1e-12  # never worse than any grid point
        assert grid_kl - result.residual_kl[b].item() < (1e-9 if m == 2 else 1e-6)
        assert np.abs(result.weights[b].numpy() - grid_weights).max() < (1e-4 if m == 2 else 0.005)


def test_implicit_weights_of_the_construction_are_one_step_md():
    task = MTDTask(vocab_size=5, order=3, seed=0)
    generator = torch.Generator().manual_seed(7)
    tokens = task.sample(16, 40, generator=generator).tokens
    model = build_md_transformer(task.transition, 3, 40, eta=0.05)
    md = E.md_weights(tokens, task.transition, 3, 0.05)
    result = implicit_weights(model, tokens, task.transition, 3)
    assert result.residual_kl.max().item() < 1e-12
    distinct = torch.tensor([len(set(row[-3:].tolist())) == 3 for row in tokens])
    assert distinct.sum() >= 4
    assert (result.weights[distinct] - md[distinct]).abs().max().item() < 1e-8
    # With a repeated token only the sums over lags with the same parent are determined.
    merged = lambda w: merge_repeated_lags(w, tokens, 5)  # noqa: E731
    assert (merged(result.weights) - merged(md)).abs().max().item() < 1e-8
    # merge_repeated_lags by hand on one row: parents (y_T, y_{T-1}, y_{T-2}) = (2, 0, 2).
    row = torch.tensor([[1, 2, 0, 2]])
    assert merge_repeated_lags(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64), row, 4).tolist() == [
        [0.3, 0.0, 0.7, 0.0]
    ]


def test_implicit_weights_distances_on_the_construction():
    task = MTDTask(vocab_size=5, order=3, seed=0)
    tokens = task.sample(12, 30, generator=torch.Generator().manual_seed(8)).tokens
    model = build_md_transformer(task.transition, 3, 30, eta=0.1)
    md = E.md_weights(tokens, task.transition, 3, 0.1)
    uniform = torch.full((12, 3), 1 / 3, dtype=torch.float64)
    distances = implicit_weights_distances(model, tokens, task.transition, 3, {"md": md, "uniform": uniform})
    assert distances["md"] < 1e-7 and distances["residual_kl"] < 1e-12
    # By hand: per-token sums of md and of 1/3 over the lags pointing at each token.
    expected = []
    for b in range(12):
        parents = tokens[b, -3:].flip(0).tolist()
        gap = sum(abs(sum(md[b, g].item() - 1 / 3 for g in range(3) if parents[g] == a)) for a in set(parents))
        expected.append(gap)
    assert distances["uniform"] == pytest.approx(float(np.mean(expected)), abs=1e-7)
    raw = implicit_weights_distances(model, tokens, task.transition, 3, {"uniform": uniform}, merge_repeats=False)
    assert raw["uniform"] >= distances["uniform"] - 1e-12  # merging can only shrink an L1 distance


def test_implicit_weights_reject_bad_input():
    task = MTDTask(vocab_size=4, order=2, seed=1)
    model = build_md_transformer(task.transition, 2, 8, eta=0.1)
    good = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        implicit_weights(model, torch.tensor([[0, 1, 2, 7]]), task.transition, 2)
    with pytest.raises(ValueError, match="n_ctx"):
        implicit_weights(model, torch.zeros(2, 9, dtype=torch.long), task.transition, 2)
    with pytest.raises(ValueError, match="order"):
        implicit_weights(model, torch.zeros(2, 2, dtype=torch.long), task.transition, 2)
    with pytest.raises(ValueError, match="d_vocab"):
        implicit_weights(model, good, MTDTask(vocab_size=5, order=2, seed=1).transition, 2)
    with pytest.raises(ValueError, match="references"):
        implicit_weights_distances(model, good, task.transition, 2, {})
    with pytest.raises(ValueError, match="shape"):
        implicit_weights_distances(model, good, task.transition, 2, {"md": torch.ones(2, 3) / 3})
    # A target on a token that no lag can produce: infinite KL for every lambda.
    pi = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match="no lag"):
        closest_mtd_weights(torch.tensor([[0.2, 0.2, 0.6]], dtype=torch.float64), torch.tensor([[2, 0, 1]]), pi, 2)
