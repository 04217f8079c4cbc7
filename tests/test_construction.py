"""Tests of mdlens.construction: the 3-layer one-step-MD construction, checked against
mdlens.estimators (responsibilities, md_weights, predictive), never against the model itself."""

import pytest
import torch
from helpers import run, sample_tokens
from transformer_lens import HookedTransformer

from mdlens import estimators as E
from mdlens._random import dirichlet_sample
from mdlens.construction import build_md_transformer
from mdlens.models import DisentangledTransformer

TOL = 1e-9


def random_transition(q: int, seed: int, tiny: float | None = 1e-6) -> torch.Tensor:
    """Dirichlet(1) rows; with ``tiny``, one random entry per row is set to ``tiny`` (renormalised)."""
    generator = torch.Generator().manual_seed(seed)
    pi = dirichlet_sample(torch.ones(q, q, dtype=torch.float64), generator)
    if tiny is not None:
        columns = torch.randint(q, (q,), generator=generator)
        pi[torch.arange(q), columns] = tiny
        pi = pi / pi.sum(dim=1, keepdim=True)
    return pi


# (q, m, T, eta): orders 2..5, vocabularies 3..10, lengths from m + 1 to 256.
COMBOS = [
    (3, 2, 3, 0.5),
    (10, 2, 256, 0.02),
    (5, 3, 64, 0.1),
    (4, 3, 4, 1.0),
    (6, 4, 100, 0.05),
    (8, 5, 6, 0.3),
    (3, 5, 192, 0.01),
    (7, 4, 256, 2.0),
]


@pytest.mark.parametrize("q, m, seq_len, eta", COMBOS)
def test_every_position_is_one_step_md_and_patterns_are_the_algorithm(q, m, seq_len, eta):
    pi = random_transition(q, seed=q * 100 + m)
    tokens = sample_tokens(pi, m, batch=4, seq_len=seq_len, seed=seq_len + m)
    model = build_md_transformer(pi, m, seq_len, eta)
    assert isinstance(model, DisentangledTransformer) and isinstance(model, HookedTransformer)
    out, cache = run(model, tokens)
    assert out.dtype == torch.float64 and out.shape == (4, seq_len, q)

    # Last position: one-step MD with eta.
    expected_last = E.predictive(tokens, pi, E.md_weights(tokens, pi, m, eta))
    assert (out[:, -1] - expected_last).abs().max().item() < TOL

    beta = eta * m * (seq_len - m)
    assert model.md_params["beta"] == pytest.approx(beta, rel=1e-15)
    batch = tokens.shape[0]
    gamma = E.responsibilities(tokens, pi, m)  # [B, T-m, m], row r is k = m+1+r
    # Every prefix at once, by the closed form of paper-notes §2: at t = m+1+r,
    # lambda_t = softmax(eta_t * m * sum_{k<=t} gamma_k) with eta_t = beta / (m (t - m)).
    t = torch.arange(m + 1, seq_len + 1, dtype=torch.float64)  # 1-based positions t > m
    eta_t = beta / (m * (t - m))
    lam = torch.softmax(eta_t[None, :, None] * m * gamma.cumsum(dim=1), dim=-1)  # [B, T-m, m]
    # p_t(v) = sum_g lambda_t(g) pi(y_{t+1-g}, v); 0-based index of y_{t+1-g} is t - g.
    rows = torch.arange(m, seq_len)  # query rows i = t - 1
    parents = torch.stack([tokens[:, rows + 1 - g] for g in range(1, m + 1)], dim=-1)  # [B, T-m, m]
    expected = torch.einsum("brg,brgv->brv", lam, pi[parents])
    assert (out[:, m:] - expected).abs().max().item() < TOL

    # The same at a few prefixes straight from the estimators (md_weights + predictive on y_1..y_t).
    for t_check in sorted({m + 1, (m + 1 + seq_len) // 2, seq_len - 1, seq_len}):
        if t_check <= m:
            continue
        prefix = tokens[:, :t_check]
        weights = E.md_weights(prefix, pi, m, beta / (m * (t_check - m)))
        assert (lam[:, t_check - m - 1] - weights).abs().max().item() < TOL
        assert (out[:, t_check - 1] - E.predictive(prefix, pi, weights)).abs().max().item() < TOL

    b_index = torch.arange(batch)[:, None, None]
    r_index = rows[None, :, None]
    lags = torch.arange(1, m + 1)[None, None, :]
    # Layer 1: at query i = t - 1 the key i - g holds gamma_t(g); every other key 0.
    pattern1 = cache["blocks.0.attn.hook_pattern"][:, 0]
    want1 = torch.zeros(batch, seq_len, seq_len, dtype=torch.float64)
    want1[b_index, r_index, r_index - lags] = gamma
    assert (pattern1[:, m:] - want1[:, m:]).abs().max().item() < TOL

    # Layer 2: uniform over positions m+1..t (0-based keys m..i).
    pattern2 = cache["blocks.1.attn.hook_pattern"][:, 0]
    keys = torch.arange(seq_len)
    allowed = (keys[None, :] >= m) & (keys[None, :] <= rows[:, None])  # [T-m, T]
    want2 = allowed.double() / (rows[:, None] - m + 1)
    assert (pattern2[:, m:] - want2).abs().max().item() < TOL

    # Layer 3: key i - (g - 1), the token y_{t+1-g}, holds lambda_t(g); every other key 0.
    pattern3 = cache["blocks.2.attn.hook_pattern"][:, 0]
    want3 = torch.zeros(batch, seq_len, seq_len, dtype=torch.float64)
    want3[b_index, r_index, r_index - (lags - 1)] = lam
    assert (pattern3[:, m:] - want3[:, m:]).abs().max().item() < TOL


def test_named_blocks_hold_the_algorithmic_quantities():
    q, m, seq_len, eta = 5, 3, 40, 0.07
    pi = random_transition(q, seed=1)
    tokens = sample_tokens(pi, m, batch=3, seq_len=seq_len, seed=2)
    model = build_md_transformer(pi, m, seq_len, eta)
    _, cache = run(model, tokens)
    resid = cache["resid_post", 2]  # the whole concatenated residual after layer 3
    layout = model.layout
    gamma = E.responsibilities(tokens, pi, m)
    # L1.responsibility at positions t = m+1..T is gamma_t.
    assert (resid[:, m:, layout["L1.responsibility"]] - gamma).abs().max().item() < TOL
    # L2.mean_responsibility is the running mean of gamma over k = m+1..t (cumulative sum / count).
    counts = torch.arange(1, seq_len - m + 1, dtype=torch.float64)[None, :, None]
    running_mean = gamma.cumsum(dim=1) / counts
    assert (resid[:, m:, layout["L2.mean_responsibility"]] - running_mean).abs().max().item() < TOL
    # At the last position: L3.lag_weights = MD weights, L3.lagged_tokens = sum_g lambda_g e_{y_{T+1-g}}.
    lam = E.md_weights(tokens, pi, m, eta)
    assert (resid[:, -1, layout["L3.lag_weights"]] - lam).abs().max().item() < TOL
    lagged = torch.zeros(3, q, dtype=torch.float64)
    for g in range(1, m + 1):
        lagged[torch.arange(3), tokens[:, seq_len - g]] += lam[:, g - 1]
    assert (resid[:, -1, layout["L3.lagged_tokens"]] - lagged).abs().max().item() < TOL
    assert layout["L3.lagged_tokens"] == layout["L3.tokens"]
    assert model.md_params["order"] == m and model.md_params["eta"] == eta
    assert torch.equal(model.md_params["transition"], pi)
    assert model.output_type == "probs"


@pytest.mark.parametrize("tiny", [1e-8, 0.0])
def test_tiny_and_zero_entries_where_data_never_zeroes_every_lag(tiny):
    # Several entries per row set to 1e-8 or exactly 0; tokens sampled from this MTD always have a
    # positive likelihood under their true lag, so no position has all lag likelihoods zero.
    q, m, seq_len, eta = 6, 3, 128, 0.1
    generator = torch.Generator().manual_seed(5)
    pi = dirichlet_sample(torch.ones(q, q, dtype=torch.float64), generator)
    drop = torch.rand(q, q, generator=generator) < 0.4
    drop[torch.arange(q), torch.arange(q)] = False  # keep every row non-zero
    pi = torch.where(drop, torch.full_like(pi, tiny), pi)
    pi = pi / pi.sum(dim=1, keepdim=True)
    tokens = sample_tokens(pi, m, batch=8, seq_len=seq_len, seed=6)
    lag_probs = E.lag_likelihoods(tokens, pi, m)
    if tiny == 0.0:  # the case under test really happens: some but not all lags have probability 0
        assert (lag_probs == 0).any() and not (lag_probs == 0).all(dim=-1).any()
    model = build_md_transformer(pi, m, seq_len, eta)
    out, cache = run(model, tokens)
    expected = E.predictive(tokens, pi, E.md_weights(tokens, pi, m, eta))
    assert (out[:, -1] - expected).abs().max().item() < TOL
    gamma = E.responsibilities(tokens, pi, m)
    pattern1 = cache["blocks.0.attn.hook_pattern"][:, 0]
    rows = torch.arange(m, seq_len)
    for g in range(1, m + 1):
        got = pattern1[:, rows, rows - g]
        assert (got - gamma[:, :, g - 1]).abs().max().item() < TOL
        if tiny == 0.0:  # a zero lag likelihood gets exactly zero attention
            assert torch.all(got[gamma[:, :, g - 1] == 0] == 0)


def test_impossible_position_gives_uniform_layer1_as_documented():
    # Token 1 cannot follow 0 or 2 (pi(0, 1) = pi(2, 1) = 0): at k = 3 both lag parents are 0 or 2.
    pi = torch.tensor([[0.5, 0.0, 0.5], [0.3, 0.3, 0.4], [0.5, 0.0, 0.5]], dtype=torch.float64)
    m = 2
    tokens = torch.tensor([[0, 2, 1, 0, 2, 0]])  # k = 3: parents y_2 = 2, y_1 = 0 -> pi(., 1) = 0
    with pytest.raises(ValueError, match="probability 0 under every lag"):
        E.responsibilities(tokens, pi, m)
    model = build_md_transformer(pi, m, 6, 0.2)
    out, cache = run(model, tokens)
    assert torch.isfinite(out).all()
    pattern1 = cache["blocks.0.attn.hook_pattern"][0, 0]
    assert pattern1[2, 1].item() == 0.5 and pattern1[2, 0].item() == 0.5


def test_float32_is_close():
    q, m, seq_len, eta = 5, 3, 64, 0.1
    pi = random_transition(q, seed=3)
    tokens = sample_tokens(pi, m, batch=4, seq_len=seq_len, seed=4)
    model = build_md_transformer(pi, m, seq_len, eta, dtype=torch.float32)
    with torch.no_grad():
        out = model(tokens)
    assert out.dtype == torch.float32
    expected = E.predictive(tokens, pi, E.md_weights(tokens, pi, m, eta))
    assert (out[:, -1].double() - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"transition": torch.tensor([[0.5, 0.6], [0.5, 0.5]], dtype=torch.float64)}, "row-stochastic"),
        ({"transition": torch.tensor([[0.0, 0.0], [0.5, 0.5]], dtype=torch.float64)}, "zero rows"),
        ({"transition": torch.ones(2, 3, dtype=torch.float64) / 3}, "square"),
        ({"transition": [[0.5, 0.5], [0.5, 0.5]]}, "torch.Tensor"),
        ({"order": 0}, "order"),
        ({"order": 2.0}, "order"),
        ({"seq_len": 3}, "seq_len"),
        ({"seq_len": 10.0}, "seq_len"),
        ({"eta": 0.0}, "eta"),
        ({"eta": float("nan")}, "eta"),
        ({"eta": 1e9}, "beta"),
        ({"dtype": torch.float16}, "dtype"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, message):
    args = {"transition": torch.full((4, 4), 0.25, dtype=torch.float64), "order": 3, "seq_len": 16, "eta": 0.1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        build_md_transformer(**args)
