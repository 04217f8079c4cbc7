"""mdlens.hooks.patching: the mean-responsibility interchange and layer x position heatmaps.

The counterfactual is computed here by hand from pi (loops over lags), projections with a
different formula (``W (W^T W)^-1 W^T``), and heatmap entries with explicit ``run_with_hooks``
patches: never from the module's own output.
"""

import io
import json
from dataclasses import dataclass

import pytest
import torch
from matplotlib.figure import Figure

from mdlens import MTDTask
from mdlens.construction import build_md_transformer
from mdlens.hooks.patching import (
    CONSTRUCTION_HOOK,
    PatchResult,
    patch_mean_responsibility,
    patching_heatmap,
    plot_patching_heatmap,
)
from mdlens.models.standard import standard_transformer

Q, M, T = 5, 3, 20


@dataclass
class HandProbe:
    weight: torch.Tensor  # [d, k]
    hook_name: str


@pytest.fixture(scope="module")
def task():
    return MTDTask(vocab_size=Q, order=M, seed=0)


@pytest.fixture(scope="module")
def construction(task):
    return build_md_transformer(task.transition, M, T, eta=0.5)


@pytest.fixture(scope="module")
def pair(task):
    generator = torch.Generator().manual_seed(21)
    return task.sample(6, T, generator=generator).tokens, task.sample(6, T, generator=generator).tokens


@pytest.fixture(scope="module")
def standard():
    return standard_transformer(Q, T, n_layers=2, d_model=16, n_heads=2, d_mlp=32, dtype=torch.float64, seed=2)


def md_prediction_by_hand(tokens_weights, tokens_predict, pi, beta):
    """sum_g softmax(beta * mean_k gamma_k(tokens_weights))_g pi(y_{T+1-g}(tokens_predict), .)."""
    out = torch.zeros(tokens_weights.shape[0], Q, dtype=torch.float64)
    for b in range(tokens_weights.shape[0]):
        y, length = tokens_weights[b], tokens_weights.shape[1]
        gammas = []
        for k in range(M, length):
            lik = torch.tensor([pi[y[k - g], y[k]] for g in range(1, M + 1)], dtype=torch.float64)
            gammas.append(lik / lik.sum())
        weights = torch.softmax(beta * torch.stack(gammas).mean(0), dim=0)
        for g in range(1, M + 1):
            out[b] += weights[g - 1] * pi[tokens_predict[b, length - g]]
    return out


def kl_by_hand(p, q):
    p, q = p.detach(), q.detach()
    return float((p * (p / q).log()).sum(-1).mean())


def test_named_block_patch_is_the_counterfactual(task, construction, pair):
    tokens_a, tokens_b = pair
    beta = construction.md_params["beta"]
    result = patch_mean_responsibility(construction, tokens_a, tokens_b, task.transition, M)
    expected = md_prediction_by_hand(tokens_b, tokens_a, task.transition, beta)
    assert result.method == "named_block" and result.hook_name == "blocks.1.hook_resid_post"
    assert result.subspace_rank == M and result.beta == beta
    assert (result.patched - expected).abs().max() < 1e-9
    assert (result.counterfactual - expected).abs().max() < 1e-12
    assert result.max_abs_deviation < 1e-9 and result.kl_patched < 1e-12
    # The unpatched run is one-step MD on A itself, and the counterfactual is far from it.
    assert (result.unpatched - md_prediction_by_hand(tokens_a, tokens_a, task.transition, beta)).abs().max() < 1e-9
    assert result.kl_unpatched == pytest.approx(kl_by_hand(expected, result.unpatched), rel=1e-9)
    assert result.kl_unpatched > 1e-3
    # A random subspace of the same rank is a worse patch.
    assert result.max_abs_deviation_random > 1e-3
    assert result.kl_random > result.kl_patched
    assert result.to_dict()["subspace_rank"] == M and "named_block" in str(result)


def test_probe_spanning_the_block_equals_the_named_patch(task, construction, pair):
    tokens_a, tokens_b = pair
    named = patch_mean_responsibility(construction, tokens_a, tokens_b, task.transition, M)
    block = construction.layout["L2.mean_responsibility"]
    d_model = construction.cfg.d_model
    selector = torch.eye(d_model, dtype=torch.float64)[:, block]  # [d, m]: the block's coordinates
    mixing = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    probe = HandProbe(selector @ mixing, "blocks.1.hook_resid_post")  # same column space, not orthonormal
    result = patch_mean_responsibility(construction, tokens_a, tokens_b, task.transition, M, probe=probe)
    assert result.method == "probe" and result.subspace_rank == M
    assert (result.patched - named.patched).abs().max() < 1e-9
    assert result.max_abs_deviation < 1e-9
    # Dependent columns (a fourth = the sum of the first two) span the same 3-dim subspace.
    redundant = torch.cat([probe.weight, probe.weight[:, :1] + probe.weight[:, 1:2]], dim=1)
    result = patch_mean_responsibility(
        construction, tokens_a, tokens_b, task.transition, M, probe=HandProbe(redundant, probe.hook_name)
    )
    assert result.subspace_rank == M and result.max_abs_deviation < 1e-9


def test_probe_patch_on_a_standard_model_is_the_projection(task, standard, pair):
    tokens_a, tokens_b = pair
    hook_name = "blocks.1.hook_resid_pre"
    weight = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    result = patch_mean_responsibility(
        standard, tokens_a, tokens_b, task.transition, M, beta=5.0, probe=HandProbe(weight, hook_name), seed=1
    )
    projector = weight @ torch.linalg.inv(weight.T @ weight) @ weight.T
    _, cache_b = standard.run_with_cache(tokens_b)
    h_b = cache_b[hook_name][:, -1]

    def swap(activation, hook):
        activation = activation.clone()
        h_a = activation[:, -1]
        activation[:, -1] = h_a - h_a @ projector + h_b @ projector
        return activation

    logits = standard.run_with_hooks(tokens_a, fwd_hooks=[(hook_name, swap)])[:, -1]
    assert result.subspace_rank == 2 and result.beta == 5.0
    assert (result.patched - torch.softmax(logits, -1)).abs().max() < 1e-12
    assert (result.unpatched - torch.softmax(standard(tokens_a)[:, -1], -1)).abs().max() < 1e-12
    assert (result.counterfactual - md_prediction_by_hand(tokens_b, tokens_a, task.transition, 5.0)).abs().max() < 1e-12
    assert result.kl_patched == pytest.approx(kl_by_hand(result.counterfactual, result.patched), rel=1e-9)
    # The control is seeded: the same seed gives the same random patch, another seed another one.
    again = patch_mean_responsibility(
        standard, tokens_a, tokens_b, task.transition, M, beta=5.0, probe=HandProbe(weight, hook_name), seed=1
    )
    other = patch_mean_responsibility(
        standard, tokens_a, tokens_b, task.transition, M, beta=5.0, probe=HandProbe(weight, hook_name), seed=2
    )
    assert torch.equal(again.random_patched, result.random_patched)
    assert not torch.equal(other.random_patched, result.random_patched)


def test_patch_value_errors(task, construction, standard, pair):
    tokens_a, tokens_b = pair
    pi = task.transition
    probe = HandProbe(torch.ones(16, 1, dtype=torch.float64), "blocks.1.hook_resid_pre")
    with pytest.raises(ValueError, match="tokens must lie"):
        patch_mean_responsibility(construction, tokens_a + Q, tokens_b, pi, M)
    with pytest.raises(ValueError, match="n_ctx"):
        patch_mean_responsibility(
            construction, torch.zeros(2, T + 1, dtype=torch.long), torch.zeros(2, T + 1, dtype=torch.long), pi, M
        )
    with pytest.raises(ValueError, match="more tokens than the order"):
        patch_mean_responsibility(construction, tokens_a[:, :M], tokens_b[:, :M], pi, M)
    with pytest.raises(ValueError, match="d_vocab"):
        patch_mean_responsibility(
            construction, tokens_a % 4, tokens_b % 4, torch.full((4, 4), 0.25, dtype=torch.float64), M
        )
    with pytest.raises(ValueError, match="same shape"):
        patch_mean_responsibility(construction, tokens_a, tokens_b[:3], pi, M)
    with pytest.raises(ValueError, match="probe"):
        patch_mean_responsibility(standard, tokens_a, tokens_b, pi, M, beta=5.0)
    with pytest.raises(ValueError, match="beta is required"):
        patch_mean_responsibility(standard, tokens_a, tokens_b, pi, M, probe=probe)
    with pytest.raises(ValueError, match="rows"):
        patch_mean_responsibility(
            standard,
            tokens_a,
            tokens_b,
            pi,
            M,
            beta=5.0,
            probe=HandProbe(torch.ones(15, 1, dtype=torch.float64), probe.hook_name),
        )
    with pytest.raises(ValueError, match=r"differs from probe\.hook_name"):
        patch_mean_responsibility(
            standard, tokens_a, tokens_b, pi, M, beta=5.0, probe=probe, hook_name="blocks.0.hook_resid_pre"
        )


# ----------------------------------------------------------------------------------------------
# Heatmaps
# ----------------------------------------------------------------------------------------------


def test_heatmap_one_changed_token_on_the_construction(task, construction, pair):
    clean = pair[0][:2]
    changed = 7
    corrupt = clean.clone()
    corrupt[:, changed] = (corrupt[:, changed] + 1) % Q
    p_clean, p_corrupt = construction(clean)[:, -1], construction(corrupt)[:, -1]  # exact probabilities
    kl_clean_corrupt = kl_by_hand(p_clean, p_corrupt)
    assert kl_clean_corrupt > 1e-4

    heatmap = patching_heatmap(construction, clean, corrupt, hook="resid_pre")
    assert heatmap.shape == (3, T) and heatmap.dtype == torch.float64
    # Layer 0's residual at a position is its token's embedding: patching the changed position is
    # the whole corrupt run, patching any other position changes nothing.
    assert heatmap[0, changed] == pytest.approx(kl_clean_corrupt, rel=1e-6)
    others = torch.cat([heatmap[0, :changed], heatmap[0, changed + 1 :]])
    assert others.abs().max() == 0.0
    # Denoising: the corrupt run with the clean embedding at that position is the clean run.
    restored = patching_heatmap(construction, clean, corrupt, hook="resid_pre", direction="denoising")
    assert restored[0, changed] == pytest.approx(0.0, abs=1e-7)
    assert torch.allclose(
        others.new_full((T - 1,), kl_clean_corrupt),
        torch.cat([restored[0, :changed], restored[0, changed + 1 :]]),
        rtol=1e-6,
        atol=0,
    )


def test_heatmap_entry_matches_a_manual_patch_on_a_standard_model(standard):
    generator = torch.Generator().manual_seed(8)
    clean = torch.randint(0, Q, (3, 6), generator=generator)
    corrupt = torch.randint(0, Q, (3, 6), generator=generator)
    heatmap = patching_heatmap(standard, clean, corrupt, hook="resid_post")
    assert heatmap.shape == (2, 6)
    layer, position = 0, 4
    _, corrupt_cache = standard.run_with_cache(corrupt)
    name = f"blocks.{layer}.hook_resid_post"

    def patch(activation, hook):
        activation = activation.clone()
        activation[:, position] = corrupt_cache[name][:, position]
        return activation

    patched_logits = standard.run_with_hooks(clean, fwd_hooks=[(name, patch)])[:, -1]
    expected = kl_by_hand(torch.softmax(standard(clean)[:, -1], -1), torch.softmax(patched_logits, -1))
    assert heatmap[layer, position] == pytest.approx(expected, rel=1e-6)
    # A custom metric receives the patched output [B, T, q].
    custom = patching_heatmap(standard, clean, corrupt, metric=lambda out: out[:, -1, 0].mean(), hook="resid_post")
    assert custom[layer, position] == pytest.approx(float(patched_logits[:, 0].mean().detach()), rel=1e-6)


def test_plot_patching_heatmap():
    heatmap = torch.rand(3, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fig = plot_patching_heatmap(heatmap, title="test")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert "position" in ax.get_xlabel() and "layer" in ax.get_ylabel()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_patching_heatmap(heatmap[0])


def test_heatmap_value_errors(construction, pair):
    clean, corrupt = pair[0][:1], pair[1][:1]
    with pytest.raises(ValueError, match="same shape"):
        patching_heatmap(construction, clean, corrupt[:, :-1])
    with pytest.raises(ValueError, match="tokens must lie"):
        patching_heatmap(construction, clean + Q, corrupt)
    with pytest.raises(ValueError, match="n_ctx"):
        patching_heatmap(construction, torch.zeros(1, T + 1, dtype=torch.long), torch.zeros(1, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="hook must be"):
        patching_heatmap(construction, clean, corrupt, hook="pattern")
    with pytest.raises(ValueError, match="mlp_out"):
        patching_heatmap(construction, clean, corrupt, hook="mlp_out")
    with pytest.raises(ValueError, match="direction"):
        patching_heatmap(construction, clean, corrupt, direction="sideways")


def test_patch_result_to_dict_writes_non_finite_numbers_as_none():
    probs = torch.full((3, Q), 1.0 / Q, dtype=torch.float64)
    result = PatchResult(
        "probe", "blocks.0.hook_resid_post", 2, 1.5, float("inf"), 0.25, float("nan"), 0.125, 0.5, *[probs] * 4
    )
    expected = {
        "method": "probe",
        "hook_name": "blocks.0.hook_resid_post",
        "position": "last",
        "subspace_rank": 2,
        "beta": 1.5,
        "n_pairs": 3,
        "kl_patched": None,
        "kl_unpatched": 0.25,
        "kl_random": None,
        "max_abs_deviation": 0.125,
        "max_abs_deviation_random": 0.5,
    }
    as_dict = result.to_dict()
    assert list(as_dict) == list(expected)
    for key, value in expected.items():
        assert as_dict[key] == value, key
    assert json.loads(json.dumps(as_dict, allow_nan=False)) == expected


def test_the_construction_is_patched_after_the_papers_layer_2(construction):
    assert CONSTRUCTION_HOOK == "blocks.1.hook_resid_post"
    written_by_layer_2, block = construction.layout["L2"], construction.layout["L2.mean_responsibility"]
    assert written_by_layer_2.start <= block.start < block.stop <= written_by_layer_2.stop
