"""Tests of the multi-step construction (mdlens.construction.build_mdk_transformer) and the causal
multi-step MD it computes (mdlens.estimators.causal_md_weights): the estimator against a plain-Python
loop, the model against the estimator on every prefix, never the model against itself."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import run, sample_tokens
from transformer_lens.patching import get_act_patch_resid_pre

from mdlens import MTDTask, hooks
from mdlens import estimators as E
from mdlens._random import dirichlet_sample
from mdlens.construction import build_md_transformer, build_mdk_transformer, build_tuned_mdk_transformer
from mdlens.models import DisentangledTransformer

TOL = 1e-12


def random_transition(q: int, seed: int, small: float | None) -> torch.Tensor:
    """Dirichlet(1) rows; with ``small``, about a third of the off-diagonal entries set to it (0 included)."""
    generator = torch.Generator().manual_seed(seed)
    pi = dirichlet_sample(torch.ones(q, q, dtype=torch.float64), generator)
    if small is not None:
        drop = torch.rand(q, q, generator=generator) < 0.35
        drop[torch.arange(q), torch.arange(q)] = False  # every row keeps a positive entry
        pi = torch.where(drop, torch.full_like(pi, small), pi)
        pi = pi / pi.sum(dim=1, keepdim=True)
    return pi


def random_scales(steps: int, seed: int) -> list[float]:
    """``a`` in [2, 40]; per later step ``b`` in [0, 20], ``c`` in [-10, 10], ``d`` in [-5, 15]."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()

    scales = [uniform(2, 40)]
    for _ in range(steps - 1):
        scales += [uniform(0, 20), uniform(-10, 10), uniform(-5, 15)]
    return scales


def by_hand(sequence: list[int], pi: torch.Tensor, m: int, scales: list[float]) -> dict[str, list[float]]:
    """Causal multi-step MD on one sequence in plain Python floats (the estimator's docstring, line by line)."""
    gammas = []
    for k in range(m, len(sequence)):  # 0-based index of y_k, k = m+1..T
        likelihoods = [pi[sequence[k - g], sequence[k]].item() for g in range(1, m + 1)]
        gammas.append([value / sum(likelihoods) for value in likelihoods])

    def softmax(xs: list[float]) -> list[float]:
        top = max(xs)
        exps = [math.exp(x - top) for x in xs]
        return [e / sum(exps) for e in exps]

    mean = [sum(gamma[g] for gamma in gammas) / len(gammas) for g in range(m)]
    out = {"responsibility": gammas[-1], "mean_responsibility": mean}
    weights = softmax([scales[0] * x for x in mean])
    out["lambda1"] = weights
    added = [0.0] * m
    for step in range(2, (len(scales) + 2) // 3 + 1):
        b, c, d = scales[3 * step - 5 : 3 * step - 2]
        key_weights = softmax([-d * sum(weights[g] * gamma[g] for g in range(m)) for gamma in gammas])
        step_mean = [sum(w * gamma[g] for w, gamma in zip(key_weights, gammas, strict=True)) for g in range(m)]
        added = [x + c * h for x, h in zip(added, step_mean, strict=True)]
        weights = softmax([b * mu + x for mu, x in zip(mean, added, strict=True)])
        out[E.STEP_MEAN_NAMES[step]] = step_mean
        out[f"lambda{step}"] = weights
    return out


# ---------------------------------------------------------------------------------------------
# The estimator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_causal_md_matches_a_plain_python_loop(steps):
    q, m, seq_len = 5, 3, 30
    pi = random_transition(q, seed=11, small=1e-7)
    tokens = sample_tokens(pi, m, batch=4, seq_len=seq_len, seed=12)
    scales = random_scales(steps, seed=13)
    quantities = E.causal_md_steps(tokens, pi, m, scales)
    assert set(quantities) == set(by_hand(tokens[0].tolist(), pi, m, scales))
    for row, sequence in enumerate(tokens.tolist()):
        for name, expected in by_hand(sequence, pi, m, scales).items():
            torch.testing.assert_close(quantities[name][row], torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(E.causal_md_weights(tokens, pi, m, scales), quantities[f"lambda{steps}"])


def test_one_step_and_flat_key_weights_are_one_step_md():
    q, m, seq_len, eta = 4, 3, 40, 0.06
    pi = random_transition(q, seed=3, small=None)
    tokens = sample_tokens(pi, m, batch=8, seq_len=seq_len, seed=4)
    beta = eta * m * (seq_len - m)
    md1 = E.md_weights(tokens, pi, m, eta)
    torch.testing.assert_close(E.causal_md_weights(tokens, pi, m, [beta]), md1, rtol=1e-12, atol=1e-14)
    # d = 0: uniform attention over positions, every h = g0, so lambda3 = softmax((b3 + c2 + c3) g0).
    flat = [5.0, 1.0, 0.25 * beta, 0.0, 0.25 * beta, 0.5 * beta, 0.0]  # a, b2, c2, d2, b3, c3, d3
    torch.testing.assert_close(E.causal_md_weights(tokens, pi, m, flat), md1, rtol=1e-12, atol=1e-14)


def test_scales_are_differentiable_and_checked():
    q, m = 4, 2
    pi = random_transition(q, seed=5, small=None)
    tokens = sample_tokens(pi, m, batch=3, seq_len=12, seed=6)
    scales = torch.tensor([3.0, 2.0, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
    E.causal_md_weights(tokens, pi, m, scales)[:, 0].sum().backward()
    assert scales.grad is not None and torch.isfinite(scales.grad).all() and (scales.grad != 0).all()
    assert E.causal_md_scale_names(3) == ["a", "b2", "c2", "d2", "b3", "c3", "d3"]
    for bad, message in [([1.0, 2.0], "3 \\* steps - 2"), ([1.0, float("nan"), 1.0, 1.0], "finite"), ("x", "scales")]:
        with pytest.raises(ValueError, match=message):
            E.causal_md_weights(tokens, pi, m, bad)


# ---------------------------------------------------------------------------------------------
# The construction
# ---------------------------------------------------------------------------------------------


def test_one_step_is_build_md_transformer():
    q, m, seq_len, eta = 5, 3, 24, 0.08
    pi = random_transition(q, seed=1, small=None)
    tokens = sample_tokens(pi, m, batch=4, seq_len=seq_len, seed=2)
    one = build_md_transformer(pi, m, seq_len, eta)
    beta = eta * m * (seq_len - m)
    general = build_mdk_transformer(pi, m, seq_len, steps=1, scales=[beta])
    assert general.cfg.n_layers == 3
    one_state, general_state = one.state_dict(), general.state_dict()
    assert one_state.keys() == general_state.keys()
    assert all(torch.equal(one_state[name], general_state[name]) for name in one_state)
    assert one.layout == general.layout
    assert {"L1.responsibility", "L2.mean_responsibility", "L3.lag_weights", "L3.lagged_tokens"} <= set(
        one.layout.names()
    )
    with torch.no_grad():
        assert torch.equal(one(tokens), general(tokens))


# (q, m, T, steps, small pi entry): orders 2..5, vocabularies 3..10, T from m + 1 to 96.
COMBOS = [
    (3, 2, 3, 2, None),
    (4, 3, 4, 3, 0.0),
    (10, 2, 64, 3, 1e-8),
    (5, 3, 40, 2, 0.0),
    (6, 4, 50, 2, 1e-6),
    (8, 5, 12, 3, None),
    (3, 5, 48, 2, 0.0),
    (7, 4, 64, 3, 0.0),
    (5, 3, 96, 3, 1e-10),
    (6, 3, 64, 2, 1e-8),
]


@pytest.mark.parametrize("q, m, seq_len, steps, small", COMBOS)
def test_every_position_is_causal_md_and_every_alias_holds_its_quantity(q, m, seq_len, steps, small):
    pi = random_transition(q, seed=100 * q + m, small=small)
    tokens = sample_tokens(pi, m, batch=3, seq_len=seq_len, seed=seq_len + steps)
    scales = random_scales(steps, seed=q + seq_len)
    model = build_mdk_transformer(pi, m, seq_len, steps, scales)
    assert isinstance(model, DisentangledTransformer) and model.cfg.n_layers == 2 * steps + 1
    assert model.md_params["steps"] == steps and model.md_params["scales"] == pytest.approx(scales, rel=1e-15)
    out, cache = run(model, tokens)
    assert out.dtype == torch.float64 and out.shape == (3, seq_len, q)
    resid = cache["resid_post", -1]  # every block, as written (a disentangled block never changes)
    layout = model.layout
    if small == 0.0:  # the case under test happens: some lag likelihoods are exactly zero
        assert (E.lag_likelihoods(tokens, pi, m) == 0).any()

    for t in range(m + 1, seq_len + 1):  # 1-based prefix length, 0-based position t - 1
        prefix = tokens[:, :t]
        quantities = E.causal_md_steps(prefix, pi, m, scales)
        expected = E.predictive(prefix, pi, quantities[f"lambda{steps}"])
        assert (out[:, t - 1] - expected).abs().max().item() < TOL
        for block in layout.aliases():
            layer, name = block.name.split(".", 1)
            got = resid[:, t - 1, block.slice]
            if name in quantities:
                want = quantities[name]
            elif name == "lag_weights":
                want = quantities[f"lambda{steps}"]
            else:  # lagged_tokens: sum_g lambda_s(g) onehot(y_{t+1-g}) by hand, s = (layer - 1) / 2
                lam = quantities[f"lambda{(int(layer[1:]) - 1) // 2}"]
                want = torch.zeros(3, q, dtype=torch.float64)
                for g in range(1, m + 1):
                    want[torch.arange(3), tokens[:, t - g]] += lam[:, g - 1]
            assert (got - want).abs().max().item() < TOL, (block.name, t)

    # The attend layers at the last position: w_k = softmax_k(-d_s <lambda_{s-1}, gamma_k>) on k = m+1..T.
    gamma = E.responsibilities(tokens, pi, m)
    final = E.causal_md_steps(tokens, pi, m, scales)
    for step in range(2, steps + 1):
        d = scales[3 * step - 3]
        want = torch.softmax(-d * torch.einsum("bg,bkg->bk", final[f"lambda{step - 1}"], gamma), dim=-1)
        pattern = cache["pattern", 2 * step - 1][:, 0, -1]  # layer 2s, 0-based 2s - 1
        assert pattern[:, :m].abs().max().item() == 0.0
        assert (pattern[:, m:] - want).abs().max().item() < TOL


def test_aliases_are_named_for_every_step():
    model = build_mdk_transformer(torch.full((4, 4), 0.25, dtype=torch.float64), 3, 10, 3, [1.0] * 7)
    aliases = {block.name for block in model.layout.aliases()}
    assert aliases == {
        "L1.responsibility",
        "L2.mean_responsibility",
        "L3.lambda1",
        "L3.lagged_tokens",
        "L4.second_step_mean",
        "L5.lambda2",
        "L5.lagged_tokens",
        "L6.third_step_mean",
        "L7.lambda3",
        "L7.lagged_tokens",
        "L7.lag_weights",
    }
    assert model.layout["L4.second_step_mean"] == slice(
        model.layout.block("L4.L1.rel").start + 1, model.layout.block("L4.L1.rel").start + 4
    )


def test_float32_is_close():
    q, m, seq_len = 5, 3, 64
    pi = random_transition(q, seed=7, small=None)
    tokens = sample_tokens(pi, m, batch=4, seq_len=seq_len, seed=8)
    scales = random_scales(3, seed=9)
    model = build_mdk_transformer(pi, m, seq_len, 3, scales, dtype=torch.float32)
    with torch.no_grad():
        out = model(tokens)
    assert out.dtype == torch.float32
    expected = E.predictive(tokens, pi, E.causal_md_weights(tokens, pi, m, scales))
    assert (out[:, -1].double() - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 4, "scales": [1.0] * 10}, "steps must be at most 3"),
        ({"steps": 0}, "steps"),
        ({"scales": [1.0, 1.0, 1.0, 1.0]}, "steps=3 needs 7 scales"),
        ({"scales": [1.0, 2.0]}, "3 \\* steps - 2"),
        ({"scales": [1.0, 1.0, 1.0, float("inf"), 1.0, 1.0, 1.0]}, "finite"),
        ({"scales": [1.0, 1.0, 1.0, 2e7, 1.0, 1.0, 1.0]}, "mask"),
        ({"scales": [1.0, 6e6, 6e6, 1.0, 1.0, 1.0, 1.0]}, "mask"),
        ({"seq_len": 3}, "seq_len"),
        ({"order": 0}, "order"),
        ({"transition": torch.tensor([[0.5, 0.6], [0.5, 0.5]], dtype=torch.float64)}, "row-stochastic"),
        ({"dtype": torch.float16}, "dtype"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, message):
    args = {
        "transition": torch.full((4, 4), 0.25, dtype=torch.float64),
        "order": 3,
        "seq_len": 16,
        "steps": 3,
        "scales": [1.0] * 7,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        build_mdk_transformer(**args)


# ---------------------------------------------------------------------------------------------
# TransformerLens and mdlens.hooks on it
# ---------------------------------------------------------------------------------------------


def test_transformer_lens_residual_patching():
    # Clean and corrupted sequences differ only at position m (0-based): restoring that position of the
    # embedding restores the clean output; nothing else at layer 0 does. The last readout layer reads
    # only its own query and the last m tokens (unchanged), so restoring its input at the last position
    # restores the clean output too.
    q, m, seq_len, steps = 4, 2, 10, 2
    pi = random_transition(q, seed=21, small=None)
    clean = sample_tokens(pi, m, batch=1, seq_len=seq_len, seed=22)
    corrupted = clean.clone()
    corrupted[0, m] = (clean[0, m] + 1) % q
    model = build_mdk_transformer(pi, m, seq_len, steps, [20.0, 8.0, 12.0, 6.0])
    target = torch.softmax(torch.arange(q, dtype=torch.float64), dim=0)[None]

    def kl_at_last(output: torch.Tensor) -> torch.Tensor:
        return E.kl_divergence(target, output[:, -1])[0]

    with torch.no_grad():
        clean_out, clean_cache = model.run_with_cache(clean)
        clean_kl, corrupted_kl = kl_at_last(clean_out), kl_at_last(model(corrupted))
        assert abs(clean_kl - corrupted_kl) > 1e-6
        result = get_act_patch_resid_pre(model, corrupted, clean_cache, kl_at_last)
    assert result.shape == (2 * steps + 1, seq_len)
    float32 = 1e-6 * clean_kl.item()  # TransformerLens stores the metric in a float32 tensor
    assert abs(result[0, m] - clean_kl) < float32
    others = [p for p in range(seq_len) if p != m]
    assert (result[0, others] - corrupted_kl).abs().max() < float32
    assert abs(result[-1, -1] - clean_kl) < float32


def test_hooks_probe_and_attention_agreement():
    task = MTDTask(vocab_size=4, order=3, seed=31)
    pi, m, seq_len = task.transition, task.order, 24
    tokens = task.sample(64, seq_len, generator=torch.Generator().manual_seed(32)).tokens
    scales3 = [12.0, 9.0, 6.0, 4.0, 8.0, 3.0, 5.0]
    three = build_mdk_transformer(pi, m, seq_len, 3, scales3)
    two = build_mdk_transformer(pi, m, seq_len, 2, scales3[:4])
    one = build_md_transformer(pi, m, seq_len, scales3[0] / (m * (seq_len - m)))

    # The first 5 layers of the 3-step model are the 2-step model's (same a, b2, c2, d2).
    agreement = hooks.attention_agreement(three, two, tokens, matching="ordered")
    assert agreement.pairs == [((layer, 0), (layer, 0)) for layer in range(5)]
    assert max(agreement.tv) < 1e-12
    agreement = hooks.attention_agreement(two, one, tokens, matching="ordered")
    assert agreement.pairs == [((layer, 0), (layer, 0)) for layer in range(3)] and max(agreement.tv) < 1e-12

    # Probes of the construction's own blocks recover the quantities they hold (R^2 ~ 1).
    per_prefix = {"lambda1": [], "second_step_mean": [], "lambda2": []}
    for t in range(m + 1, seq_len + 1):
        quantities = E.causal_md_steps(tokens[:, :t], pi, m, scales3)
        for name in per_prefix:
            per_prefix[name].append(quantities[name])
    nan_rows = torch.full((64, m, m), float("nan"), dtype=torch.float64)
    targets = {name: torch.cat([nan_rows, torch.stack(rows, dim=1)], dim=1) for name, rows in per_prefix.items()}
    blocks = ["L3.lambda1", "L4.second_step_mean", "L5.lambda2"]
    report = hooks.probe_model(three, tokens, targets, hook_names=[], blocks=blocks, random_model=False)
    for row, name in enumerate(per_prefix):
        assert report.r2[name][row] > 0.999, (name, report.r2[name])


# ---------------------------------------------------------------------------------------------
# The tuned construction
# ---------------------------------------------------------------------------------------------


def test_tuned_construction_fits_on_the_tuning_batch_and_computes_its_estimator():
    task = MTDTask(vocab_size=5, order=3, seed=41)
    pi, m, seq_len = task.transition, task.order, 20
    tune = task.sample(48, seq_len, generator=torch.Generator().manual_seed(42))
    starts = E.default_causal_md_starts(tune.tokens, pi, m, tune.next_probs, steps=2)
    assert len(starts) == 4 and all(len(start) == 4 for start in starts)
    model = build_tuned_mdk_transformer(tune.tokens, tune.next_probs, pi, m, 2, starts=starts, max_iter=3)
    scales = model.md_params["scales"]

    def tuning_kl(scales_: list[float]) -> float:
        weights = E.causal_md_weights(tune.tokens, pi, m, scales_)
        return E.kl_divergence(tune.next_probs, E.predictive(tune.tokens, pi, weights)).mean().item()

    assert model.md_params["tuning_kl"] == pytest.approx(tuning_kl(scales), rel=1e-12)
    assert model.md_params["tuning_kl"] <= min(tuning_kl(start) for start in starts) + 1e-15
    with torch.no_grad():
        out = model(tune.tokens)[:, -1]
    expected = E.predictive(tune.tokens, pi, E.causal_md_weights(tune.tokens, pi, m, scales))
    assert (out - expected).abs().max().item() < TOL


def test_variable_block_is_where_the_k_step_construction_keeps_each_variable():
    from mdlens.construction import variable_block

    expected = {
        "responsibility": "L1.responsibility",
        "mean_responsibility": "L2.mean_responsibility",
        "lambda1": "L3.lambda1",
        "second_step_mean": "L4.second_step_mean",
        "lambda2": "L5.lambda2",
        "third_step_mean": "L6.third_step_mean",
        "lambda3": "L7.lambda3",
    }
    assert {name: variable_block(name) for name in expected} == expected
    model = build_mdk_transformer(
        random_transition(4, 0, None), 2, 12, steps=3, scales=(6.0, 6.0, 3.0, 3.0, 6.0, 3.0, 3.0)
    )
    assert all(block in model.layout for block in expected.values())  # the names the model's layout has
