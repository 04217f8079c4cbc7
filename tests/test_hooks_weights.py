"""Tests of mdlens.hooks.weights, checked against matrices written in by hand, closed forms and the
estimators (never against the module's own output)."""

import math

import numpy as np
import pytest
import torch

import mdlens
from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.construction import build_md_transformer
from mdlens.hooks.weights import (
    learned_transition,
    learned_transition_kl,
    score_block_correlation,
    token_score_block,
    weight_alignment,
)
from mdlens.models import DisentangledTransformer, standard_transformer

TOL = 1e-9


def random_transition(q: int, seed: int, zeros: int = 0) -> torch.Tensor:
    """Dirichlet(1)-like rows (normalised exponentials); ``zeros`` entries of row 0 set to exactly 0."""
    generator = torch.Generator().manual_seed(seed)
    pi = -torch.log(torch.rand(q, q, generator=generator, dtype=torch.float64))
    pi[0, 1 : 1 + zeros] = 0.0
    return pi / pi.sum(dim=1, keepdim=True)


def model_with_scores(
    scores: torch.Tensor, n_layers: int = 1, window: int = 2, n_ctx: int = 8
) -> DisentangledTransformer:
    """A float64 disentangled model whose layer-1 token-token block is ``scores`` (row = query token)."""
    q = scores.shape[0]
    model = DisentangledTransformer(q, n_ctx, n_layers=n_layers, window=window, dtype=torch.float64, order=window - 1)
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, :q, :q] = scores
    return model


def row_centred(matrix: np.ndarray) -> np.ndarray:
    return matrix - matrix.mean(axis=1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


# ----------------------------------------------------------------------------------------------
# learned_transition
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q, m, zeros", [(5, 3, 0), (4, 2, 2), (7, 4, 1)])
def test_learned_transition_recovers_the_constructions_pi(q, m, zeros):
    pi = random_transition(q, seed=q + m, zeros=zeros)
    model = build_md_transformer(pi, m, seq_len=16, eta=0.1)
    log_pi = torch.where(pi > 0, pi.log(), torch.full_like(pi, -1e4))  # the construction's LOG_ZERO
    assert torch.equal(token_score_block(model), log_pi.T)  # row = query (child), column = key (parent)
    recovered = learned_transition(model)
    assert recovered.dtype == torch.float64 and recovered.shape == (q, q)
    assert (recovered - pi).abs().max().item() < TOL
    if zeros:
        assert (recovered[0, 1 : 1 + zeros] == 0).all()  # LOG_ZERO underflows to an exact 0


def test_learned_transition_is_invariant_to_per_query_shifts():
    pi = random_transition(5, seed=11)
    model = build_md_transformer(pi, 3, seq_len=12, eta=0.2)
    shifts = 20 * torch.randn(5, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, :5, :5] += shifts  # one constant per query row
    assert (learned_transition(model) - pi).abs().max().item() < TOL


def test_learned_transition_reads_any_log_pi_transpose_plus_row_constants():
    # S[b, a] = log P(a, b) + c_b written in by hand, on a model that is not the construction.
    P = random_transition(6, seed=5)
    c = torch.linspace(-30.0, 40.0, 6, dtype=torch.float64)[:, None]
    model = model_with_scores(P.log().T + c, n_layers=2, window=3)
    assert (learned_transition(model) - P).abs().max().item() < TOL


def test_learned_transition_raises_when_no_positive_scaling_exists():
    # E = exp(S) = [[1, .5], [1, .8]]: E^T d = 1 gives d_0 = (e11 - e10) / det = -0.2 / 0.3 < 0.
    model = model_with_scores(torch.tensor([[1.0, 0.5], [1.0, 0.8]], dtype=torch.float64).log())
    with pytest.raises(ValueError, match="not all positive"):
        learned_transition(model)


def test_learned_transition_raises_on_a_singular_score_block():
    model = model_with_scores(torch.zeros(3, 3, dtype=torch.float64))  # every parent scored alike
    with pytest.raises(ValueError, match="singular"):
        learned_transition(model)


def test_learned_transition_needs_a_disentangled_model():
    with pytest.raises(ValueError, match="DisentangledTransformer"):
        learned_transition(standard_transformer(5, 16, n_layers=1, d_model=8))


def test_learned_transition_kl_matches_the_row_formula():
    pi = random_transition(4, seed=1)
    other = random_transition(4, seed=2)
    model = model_with_scores(other.log().T + 3.0)
    expected = np.mean(
        [sum(pi[a, b].item() * math.log(pi[a, b].item() / other[a, b].item()) for b in range(4)) for a in range(4)]
    )
    assert learned_transition_kl(model, pi) == pytest.approx(expected, rel=1e-9)
    construction = build_md_transformer(pi, 2, seq_len=8, eta=0.5)
    assert learned_transition_kl(construction, pi) < 1e-12
    with pytest.raises(ValueError, match="d_vocab"):
        learned_transition_kl(model, random_transition(5, seed=3))


# ----------------------------------------------------------------------------------------------
# score_block_correlation
# ----------------------------------------------------------------------------------------------


def test_score_block_correlation_matches_numpy_pearson():
    pi = random_transition(5, seed=7)
    scores = torch.randn(5, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    result = score_block_correlation(model_with_scores(scores), pi)
    S = row_centred(scores.numpy())
    for key, target in (("log_transition_T", np.log(pi.numpy()).T), ("neg_transition_T", -pi.numpy().T)):
        expected = np.corrcoef(S.ravel(), row_centred(target).ravel())[0, 1]
        assert result[key] == pytest.approx(expected, abs=1e-12)
    # The scale is numpy's least-squares slope (no intercept: both sides are row-centred).
    target = row_centred(np.log(pi.numpy()).T).ravel()
    slope = np.linalg.lstsq(target[:, None], S.ravel(), rcond=None)[0][0]
    assert result["log_transition_T_scale"] == pytest.approx(slope, abs=1e-12)
    construction = build_md_transformer(pi, 3, seq_len=8, eta=0.1)
    assert score_block_correlation(construction, pi)["log_transition_T"] == pytest.approx(1.0, abs=1e-12)
    assert score_block_correlation(construction, pi)["log_transition_T_scale"] == pytest.approx(1.0, abs=1e-12)
    half = model_with_scores(0.5 * pi.log().T + torch.arange(5.0, dtype=torch.float64)[:, None])
    assert score_block_correlation(half, pi)["log_transition_T_scale"] == pytest.approx(0.5, abs=1e-12)
    anti = model_with_scores(-2.0 * pi.T + torch.arange(5.0, dtype=torch.float64)[:, None])
    assert score_block_correlation(anti, pi)["neg_transition_T"] == pytest.approx(1.0, abs=1e-12)


def test_shipped_disentangled_model_scores_anti_align_with_pi():
    # The number quoted by hand before this module existed: about +0.92 with -pi^T.
    model, task = mdlens.load_pretrained("disentangled-3l")
    assert score_block_correlation(model, task.transition)["neg_transition_T"] == pytest.approx(0.92, abs=0.01)


# ----------------------------------------------------------------------------------------------
# weight_alignment
# ----------------------------------------------------------------------------------------------


def test_score_comparison_removes_per_query_constants_and_matches_hand_cosines():
    pi, other = random_transition(5, seed=21), random_transition(5, seed=22)
    reference = build_md_transformer(pi, 3, seq_len=12, eta=0.1)
    shifted = build_md_transformer(pi, 3, seq_len=12, eta=0.1)
    with torch.no_grad():
        shifted.blocks[0].attn.W_Q[0, :5, :5] += torch.arange(5.0, dtype=torch.float64)[:, None] * 7
    layers = weight_alignment(shifted, reference)["layers"]
    assert [row["layer"] for row in layers] == [1, 2, 3]
    assert layers[0]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert layers[0]["relative_distance"] < 1e-12
    # The construction's layers 2 and 3 have no content score: nothing to compare a direction with.
    assert math.isnan(layers[1]["cosine"]) and layers[1]["relative_distance"] == math.inf
    assert layers[1]["reference_norm"] == 0.0

    model = build_md_transformer(other, 3, seq_len=12, eta=0.1)
    row = weight_alignment(model, reference)["layers"][0]
    A, B = row_centred(np.log(other.numpy()).T), row_centred(np.log(pi.numpy()).T)
    assert row["cosine"] == pytest.approx(cosine(A, B), abs=1e-12)
    assert row["relative_distance"] == pytest.approx(np.linalg.norm(A - B) / np.linalg.norm(B), rel=1e-12)


def test_score_comparison_uses_the_shared_named_blocks():
    q = 5
    deep = DisentangledTransformer(q, 16, n_layers=5, window=4, dtype=torch.float64, seed=1)
    shallow = DisentangledTransformer(q, 16, n_layers=3, window=4, dtype=torch.float64, seed=2)
    layers = weight_alignment(deep, shallow)["layers"]
    assert [row["width"] for row in layers] == [5, 14, 32]  # D_{l-1} = q, 2q + W, 2(2q + W) + W
    assert layers[1]["blocks"] == ["tokens", "L1.tokens", "L1.rel"]
    A = row_centred(deep.blocks[2].attn.W_A.detach().numpy())
    B = row_centred(shallow.blocks[2].attn.W_A.detach().numpy())
    assert layers[2]["cosine"] == pytest.approx(cosine(A, B), abs=1e-12)
    # Another window: L1.rel differs in width, so layer 2 is compared on tokens + L1.tokens only.
    narrow = DisentangledTransformer(q, 16, n_layers=2, window=3, dtype=torch.float64, seed=3)
    layers = weight_alignment(deep, narrow)["layers"]
    assert [row["width"] for row in layers] == [5, 10]


def test_standard_models_compare_qk_per_head():
    a = standard_transformer(4, 8, n_layers=2, d_model=8, n_heads=2, dtype=torch.float64, seed=1)
    b = standard_transformer(4, 8, n_layers=2, d_model=8, n_heads=2, dtype=torch.float64, seed=2)
    result = weight_alignment(a, b)
    assert len(result["layers"]) == 4 and "residual basis" in result["layers_note"]
    row = result["layers"][3]  # layer 2, head 1
    A = (a.W_Q[1, 1] @ a.W_K[1, 1].T).detach().numpy()
    B = (b.W_Q[1, 1] @ b.W_K[1, 1].T).detach().numpy()
    assert (row["layer"], row["head"]) == (2, 1)
    assert row["cosine"] == pytest.approx(cosine(A, B), abs=1e-12)
    mixed = weight_alignment(a, DisentangledTransformer(4, 8, n_layers=2, window=2, dtype=torch.float64))
    assert mixed["layers"] is None and "no common coordinates" in mixed["layers_reason"]


def test_interpolation_between_constructions_is_md_with_interpolated_eta():
    # Two constructions differ only in beta (layer 3), which is linear in eta: the straight line
    # between them is the construction with eta(s) = (1 - s) eta_model + s eta_reference.
    task = MTDTask(vocab_size=4, order=2, seed=3)
    pi, m, seq_len, eta_model, eta_reference = task.transition, 2, 20, 0.5, 0.05
    tokens = task.sample(8, seq_len, generator=torch.Generator().manual_seed(4)).tokens
    model = build_md_transformer(pi, m, seq_len, eta_model)
    reference = build_md_transformer(pi, m, seq_len, eta_reference)
    path = weight_alignment(model, reference, tokens, pi, m)["interpolation"]
    assert len(path["s"]) == 11 and path["s"][0] == 0.0 and path["s"][-1] == 1.0
    target = E.predictive(tokens, pi, E.md_weights(tokens, pi, m, eta_reference))
    for s, kl in zip(path["s"], path["mean_kl"], strict=True):
        eta = (1 - s) * eta_model + s * eta_reference
        expected = E.kl_divergence(target, E.predictive(tokens, pi, E.md_weights(tokens, pi, m, eta))).mean()
        assert kl == pytest.approx(float(expected), abs=1e-12)
    assert path["mean_kl"][-1] < 1e-15 and path["mean_kl"][0] > 1e-3


def test_interpolation_of_a_model_with_itself_is_flat_and_mixed_pairs_give_reasons():
    a = standard_transformer(4, 8, n_layers=1, d_model=8, dtype=torch.float64, seed=1)
    tokens = torch.randint(4, (3, 8), generator=torch.Generator().manual_seed(0))
    path = weight_alignment(a, a, tokens)["interpolation"]
    assert max(path["mean_kl"]) < 1e-12 and abs(path["barrier"]) < 1e-12
    no_tokens = weight_alignment(a, a)
    assert no_tokens["interpolation"] is None and "no tokens" in no_tokens["interpolation_reason"]
    other = standard_transformer(4, 8, n_layers=1, d_model=16, dtype=torch.float64, seed=1)
    different = weight_alignment(a, other, tokens)
    assert different["interpolation"] is None and "d_model" in different["interpolation_reason"]
    assert different["layers"] is None and "differ" in different["layers_reason"]


def test_weight_alignment_rejects_bad_input():
    a = DisentangledTransformer(4, 8, n_layers=1, window=3, dtype=torch.float64)
    with pytest.raises(ValueError, match="d_vocab"):
        weight_alignment(a, DisentangledTransformer(5, 8, n_layers=1, window=3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        weight_alignment(a, a, torch.tensor([[0, 1, 4, 2]]))
    with pytest.raises(ValueError, match="n_ctx"):
        weight_alignment(a, a, torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="order"):
        weight_alignment(a, a, torch.zeros(2, 2, dtype=torch.long), order=2)
    with pytest.raises(ValueError, match="d_vocab"):
        weight_alignment(a, a, torch.zeros(2, 4, dtype=torch.long), random_transition(5, seed=0), 2)
    with pytest.raises(ValueError, match="HookedTransformer"):
        weight_alignment(torch.nn.Linear(2, 2), a)


def test_interpolation_reports_sequences_with_infinite_kl():
    # Readouts W_U = e_0 and e_1 give "probs" outputs (1, 0) and (0, 1): halfway the output is
    # (1/2, 1/2), at the model's end token 1 gets probability 0 where the reference gives it 1.
    model = DisentangledTransformer(2, 4, n_layers=1, window=2, dtype=torch.float64)
    reference = DisentangledTransformer(2, 4, n_layers=1, window=2, dtype=torch.float64)
    with torch.no_grad():
        for net, column in ((model, 0), (reference, 1)):
            net.unembed.W_U.zero_()
            net.unembed.W_U[:2, column] = 1.0  # the token block reads 1 at the current token
    path = weight_alignment(model, reference, torch.tensor([[0, 1, 1], [1, 0, 0]]))["interpolation"]
    assert path["mean_kl"][0] == math.inf and path["infinite_fraction"][0] == 1.0
    assert path["mean_kl"][5] == pytest.approx(math.log(2), abs=1e-12) and path["infinite_fraction"][5] == 0.0
    assert path["mean_kl"][-1] == 0.0 and path["barrier"] == math.inf
