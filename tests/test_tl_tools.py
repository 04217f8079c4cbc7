"""TransformerLens' own tools, unchanged, on the construction and on a standard model.

run_with_cache, run_with_hooks, transformer_lens.patching, model.QK / model.OV and circuitsvis
must work without adapters (design.md). Values are checked against the estimators, against hand
computations from the weights, or against a patch written by hand with a hook.
"""

import circuitsvis.attention
import pytest
import torch
from helpers import ETA, M, Q, T
from transformer_lens import patching

from mdlens import estimators as E
from mdlens.construction import LOG_ZERO
from mdlens.models import standard_transformer

RPE_HOOKS = ("hook_rel_scores", "hook_key_pos_scores", "hook_rel_query_scores", "hook_rel_values")


@pytest.fixture(scope="module")
def clean_and_corrupted(task):
    """Two clean sequences and a copy with one early token changed (position M + 1, 0-based)."""
    clean = task.sample(2, T, generator=torch.Generator().manual_seed(0)).tokens
    corrupted = clean.clone()
    corrupted[:, M + 1] = (clean[:, M + 1] + 1) % Q
    return clean, corrupted


def linear_metric(out: torch.Tensor) -> torch.Tensor:
    """A fixed linear read-out of the last position: sum_b sum_v w_v out[b, -1, v]."""
    weights = torch.arange(1, out.shape[-1] + 1, dtype=out.dtype)
    return (out[:, -1] * weights).sum()


# ----------------------------------------------------------------------------------------------
# run_with_cache sees every hook, with TL's shapes


def test_run_with_cache_has_every_hook_with_the_right_shapes(construction, clean_and_corrupted):
    tokens, _ = clean_and_corrupted
    batch, d_model, window = tokens.shape[0], construction.cfg.d_model, M + 1
    with torch.no_grad():
        out, cache = construction.run_with_cache(tokens)
    per_layer = ["hook_resid_pre", "hook_attn_out", "hook_resid_post"] + [
        f"attn.{name}"
        for name in ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", *RPE_HOOKS)
    ]
    expected = {"hook_embed", "hook_pos_embed", "unembed.hook_in", "unembed.hook_out"}
    expected |= {f"blocks.{layer}.{name}" for layer in range(3) for name in per_layer}
    assert set(cache.keys()) == expected
    assert cache["hook_embed"].shape == (batch, T, d_model)
    for layer in range(3):
        for name in ("hook_rel_scores", "hook_key_pos_scores", "hook_attn_scores", "hook_pattern"):
            assert cache[f"blocks.{layer}.attn.{name}"].shape == (batch, 1, T, T), name
        assert cache[f"blocks.{layer}.attn.hook_rel_query_scores"].shape == (batch, 1, T, window)
        assert cache[f"blocks.{layer}.attn.hook_rel_values"].shape == (batch, T, 1, window)
        assert cache[f"blocks.{layer}.attn.hook_z"].shape == (batch, T, 1, d_model + window)
        for name in ("hook_resid_pre", "hook_attn_out", "hook_resid_post"):
            assert cache[f"blocks.{layer}.{name}"].shape == (batch, T, d_model)
    assert torch.allclose(cache["blocks.2.hook_resid_post"] @ construction.W_U, out, rtol=0, atol=1e-14)

    # The score hooks add up to the pre-mask scores: content q.k + the three position terms.
    for layer in range(3):
        attn = f"blocks.{layer}.attn."
        content = torch.einsum("bqhd,bkhd->bhqk", cache[attn + "hook_q"], cache[attn + "hook_k"])
        # The query-dependent term is kept by offset: entry [.., i, o] belongs to key j = i - o.
        band = cache[attn + "hook_rel_query_scores"]
        rel_query = torch.zeros_like(content)
        for i in range(T):
            for o in range(min(window, i + 1)):
                rel_query[:, :, i, i - o] = band[:, :, i, o]
        total = content + cache[attn + "hook_rel_scores"] + cache[attn + "hook_key_pos_scores"] + rel_query
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        assert torch.allclose(cache[attn + "hook_attn_scores"][..., causal], total[..., causal], atol=1e-6)

    # Layer 1's relative scores: 0 on offsets 1..m, the mask elsewhere (below the diagonal).
    offset = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    rel = cache["blocks.0.attn.hook_rel_scores"][0, 0]
    assert torch.all(rel[(offset >= 1) & (offset <= M)] == 0)
    assert torch.all(rel[(offset == 0) | (offset > M)] < -1e8)
    # Layer 1's relative values are the responsibilities at offsets 1..m.
    gamma = E.responsibilities(tokens, construction.md_params["transition"], M)
    assert torch.allclose(cache["blocks.0.attn.hook_rel_values"][:, M:, 0, 1:], gamma, atol=1e-12)


def test_run_with_cache_on_a_standard_model(standard, clean_and_corrupted):
    tokens, _ = clean_and_corrupted
    with torch.no_grad():
        _, cache = standard.run_with_cache(tokens)
    assert set(cache.keys()) <= set(standard.hook_dict)
    for name in (
        "hook_embed",
        "hook_pos_embed",
        "blocks.1.hook_resid_mid",
        "blocks.1.mlp.hook_post",
        "blocks.1.ln1.hook_normalized",
        "ln_final.hook_normalized",
        "blocks.0.attn.hook_z",
    ):
        assert name in cache, name
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, 2, T, T)
    assert cache["blocks.1.hook_mlp_out"].shape == (2, T, 16)


# ----------------------------------------------------------------------------------------------
# run_with_hooks: overwrite layer 3's pattern -> the uniform-lambda predictive


def test_uniform_layer3_pattern_gives_the_uniform_lambda_predictive(construction, task):
    tokens = task.sample(3, T, generator=torch.Generator().manual_seed(1)).tokens

    def uniform_over_lags(pattern, hook):
        # Keys at offsets 0..m-1 (the tokens y_{t+1-g}, g = 1..m) get 1/m each, at every query t >= m.
        offset = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        allowed = (offset >= 0) & (offset < M)
        new = pattern.clone()
        new[:, :, M - 1 :] = (allowed.to(pattern.dtype) / M)[M - 1 :]
        return new

    with torch.no_grad():
        out = construction.run_with_hooks(tokens, fwd_hooks=[("blocks.2.attn.hook_pattern", uniform_over_lags)])
        plain = construction(tokens)
    pi = task.transition
    uniform = torch.full((M,), 1.0 / M, dtype=torch.float64)
    expected = E.predictive(tokens, pi, uniform)
    assert (out[:, -1] - expected).abs().max().item() < 1e-12
    # ... at every position t > m as well (predictive of the prefix under uniform weights).
    for t in range(M + 1, T + 1):
        assert (out[:, t - 1] - E.predictive(tokens[:, :t], pi, uniform)).abs().max().item() < 1e-12
    # The hook is temporary: the next plain run is one-step MD again.
    assert (plain[:, -1] - E.predictive(tokens, pi, E.md_weights(tokens, pi, M, ETA))).abs().max() < 1e-12
    assert not construction.hook_dict["blocks.2.attn.hook_pattern"].fwd_hooks


# ----------------------------------------------------------------------------------------------
# transformer_lens.patching


def manual_patch(model, corrupted, clean_cache, hook_name, index):
    """Patch ``clean_cache[hook_name][index]`` into a corrupted run with a hook written here."""

    def hook(activation, hook):
        activation = activation.clone()
        activation[index] = clean_cache[hook_name][index]
        return activation

    with torch.no_grad():
        return linear_metric(model.run_with_hooks(corrupted, fwd_hooks=[(hook_name, hook)])).item()


@pytest.mark.parametrize("which", ["construction", "standard"])
def test_get_act_patch_resid_pre(which, construction, standard, clean_and_corrupted):
    model = construction if which == "construction" else standard
    clean, corrupted = clean_and_corrupted
    with torch.no_grad():
        clean_out, clean_cache = model.run_with_cache(clean)
        corrupted_metric = linear_metric(model(corrupted)).item()
    clean_metric = linear_metric(clean_out).item()
    assert abs(clean_metric - corrupted_metric) > 1e-3  # the corruption matters

    result = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, linear_metric)
    assert result.shape == (model.cfg.n_layers, T)
    # Layer 0's residual at position p is the embedding of token p (plus p's position embedding):
    # patching the corrupted position restores the clean run, any other position changes nothing.
    tol = 1e-5 * max(1.0, abs(clean_metric))  # TL stores the metric in float32
    changed = M + 1
    assert abs(result[0, changed].item() - clean_metric) < tol
    others = [p for p in range(T) if p != changed]
    assert (result[0, others] - corrupted_metric).abs().max().item() < tol
    # Before the corruption, no layer's residual differs between the runs.
    assert (result[:, :changed] - corrupted_metric).abs().max().item() < tol
    # One entry against a patch written by hand.
    layer, pos = 1, T - 1
    expected = manual_patch(model, corrupted, clean_cache, f"blocks.{layer}.hook_resid_pre", (slice(None), pos))
    assert abs(result[layer, pos].item() - expected) < tol
    if which == "construction":
        # Layer 3 reads only the query's mean responsibility and the last m tokens (unchanged here):
        # patching its input at the last position restores the clean output exactly.
        assert abs(result[2, T - 1].item() - clean_metric) < tol


@pytest.mark.parametrize("which", ["construction", "standard"])
def test_get_act_patch_attn_head_out_by_pos(which, construction, standard, clean_and_corrupted):
    model = construction if which == "construction" else standard
    clean, corrupted = clean_and_corrupted
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        corrupted_metric = linear_metric(model(corrupted)).item()
    result = patching.get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, linear_metric)
    n_heads = model.cfg.n_heads
    assert result.shape == (model.cfg.n_layers, T, n_heads)
    assert torch.isfinite(result).all()
    tol = 1e-5 * max(1.0, abs(corrupted_metric))
    # Head outputs before the corrupted position are identical in both runs.
    assert (result[:, : M + 1] - corrupted_metric).abs().max().item() < tol
    for layer, pos, head in [(0, M + 1, 0), (model.cfg.n_layers - 1, T - 1, n_heads - 1)]:
        expected = manual_patch(model, corrupted, clean_cache, f"blocks.{layer}.attn.hook_z", (slice(None), pos, head))
        assert abs(result[layer, pos, head].item() - expected) < tol


def test_head_patch_on_linear_standard_model_matches_the_weights(clean_and_corrupted):
    # Attention-only, no LayerNorm: the last layer's head h adds z_h W_O[h] to the residual, which
    # W_U reads linearly, so patching z_h at the last position moves the metric by a known amount.
    model = standard_transformer(
        Q, T, n_layers=2, d_model=8, n_heads=2, attn_only=True, normalization=None, dtype=torch.float64, seed=2
    )
    clean, corrupted = clean_and_corrupted
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        corrupted_out, corrupted_cache = model.run_with_cache(corrupted)
    result = patching.get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, linear_metric)
    weights = torch.arange(1, Q + 1, dtype=torch.float64)
    for head in range(2):
        dz = clean_cache["blocks.1.attn.hook_z"][:, -1, head] - corrupted_cache["blocks.1.attn.hook_z"][:, -1, head]
        shift = (dz @ model.W_O[1, head] @ model.W_U @ weights).sum()
        expected = linear_metric(corrupted_out) + shift
        assert abs(result[1, T - 1, head].item() - expected.item()) < 1e-5 * max(1.0, abs(expected.item()))


# ----------------------------------------------------------------------------------------------
# model.QK / model.OV (FactoredMatrix)


@pytest.mark.parametrize("which", ["construction", "standard"])
def test_qk_and_ov_are_the_hand_products(which, construction, standard):
    model = construction if which == "construction" else standard
    for layer in range(model.cfg.n_layers):
        attn = model.blocks[layer].attn
        for head in range(model.cfg.n_heads):
            qk = attn.W_Q[head] @ attn.W_K[head].T
            ov = attn.W_V[head] @ attn.W_O[head]
            assert torch.allclose(model.QK.AB[layer, head], qk, atol=1e-12)
            assert torch.allclose(model.OV.AB[layer, head], ov, atol=1e-12)
    if which == "construction":
        # Layer 1's QK on the token block is (log pi)^T; later layers have no content score.
        pi = construction.md_params["transition"]
        tok = construction.layout["tokens"]
        log_pi = torch.where(pi > 0, pi.log(), torch.full_like(pi, LOG_ZERO))
        assert torch.allclose(model.QK.AB[0, 0][tok, tok], log_pi.T, atol=1e-15)
        assert torch.count_nonzero(model.QK.AB[1:]) == 0
        # OV of layer 1 copies the token block into L1.tokens.
        assert torch.equal(model.OV.AB[0, 0][tok, construction.layout["L1.tokens"]], torch.eye(Q, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# circuitsvis


@pytest.mark.parametrize("which", ["construction", "standard"])
def test_circuitsvis_attention_patterns_render(which, construction, standard, clean_and_corrupted):
    model = construction if which == "construction" else standard
    tokens, _ = clean_and_corrupted
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[:1])
    pattern = cache["pattern", 0][0]  # [head, query, key]
    html = circuitsvis.attention.attention_patterns(tokens=[str(t) for t in tokens[0].tolist()], attention=pattern)
    text = str(html)
    assert "<div" in text or "<script" in text
    assert len(text) > 100
