"""composition_scores: the position terms, checked against explicit products and Frobenius norms.

Three independent references: dense matrix products written out here (stacked writers and readers
for ``total``), TransformerLens's own ``all_composition_scores`` for the content terms, and values
derived by hand from the construction's weights (module docstring of mdlens.construction).
"""

import math
import warnings

import pytest
import torch
from transformer_lens import HookedTransformer

from mdlens import MTDTask
from mdlens.construction import build_md_transformer
from mdlens.models import disentangled_transformer, standard_transformer
from mdlens.models.composition import composition_scores

Q, M = 4, 3


def fro(matrix):
    return torch.linalg.matrix_norm(matrix).item()


def spectral(matrix):
    return torch.linalg.svdvals(matrix)[0].item()


def hand_scores(model, kind, normalization):
    """Every term and the total for every pair l1 < l2, with dense products (one head per layer)."""
    d_model, n_layers = model.cfg.d_model, model.cfg.n_layers
    norm = fro if normalization == "frobenius" else spectral
    terms, total = {}, {}
    for l1 in range(n_layers):
        a = model.blocks[l1].attn
        writers = {"ov": a.W_V[0] @ a.W_O[0], "rel_value": a.rel_value @ a.W_O[0][d_model:]}
        for l2 in range(l1 + 1, n_layers):
            b = model.blocks[l2].attn
            readers = {
                "Q": {"qk": b.W_Q[0] @ b.W_K[0].T, "rel_query": b.rel_query},
                "K": {"qk": (b.W_Q[0] @ b.W_K[0].T).T},
                "V": {"ov": b.W_V[0] @ b.W_O[0]},
            }[kind]
            for wa, w in writers.items():
                for rb, r in readers.items():
                    terms[f"{wa}->{rb}", l1, l2] = fro(w @ r) / (norm(w) * fro(r))
            stacked_writer = torch.cat(list(writers.values()), dim=0)  # [W_OV ; R]
            stacked_reader = torch.cat(list(readers.values()), dim=1)  # [W_QK | U]
            total[l1, l2] = fro(stacked_writer @ stacked_reader) / (norm(stacked_writer) * fro(stacked_reader))
    return terms, total


def randomised(model, seed):
    """Every parameter except the frozen embedding moved off its value: no zero matrices."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for param in (block.attn.W_Q, block.attn.rel_query, block.attn.rel_value, block.attn.W_O):
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


@pytest.fixture(scope="module")
def construction():
    task = MTDTask(vocab_size=Q, order=M, seed=11)
    return build_md_transformer(task.transition, M, 10, 0.2)


@pytest.mark.parametrize("normalization", ["frobenius", "spectral"])
@pytest.mark.parametrize("kind", ["Q", "K", "V"])
@pytest.mark.parametrize("dense", [True, False])
def test_values_match_dense_products_on_a_small_random_model(kind, normalization, dense):
    # dense: every weight random; else the initialised model (block-sparse W_Q, rel_query, W_O).
    model = disentangled_transformer(3, 1, 8, n_layers=3, dtype=torch.float64, seed=1, init_std=1.0)
    if dense:
        randomised(model, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no zero matrix here, hence no warning
        scores = composition_scores(model, kind, normalization)
    terms, total = hand_scores(model, kind, normalization)
    assert set(scores.terms) == {name for name, _, _ in terms}
    for (name, l1, l2), value in terms.items():
        assert abs(scores.terms[name][l1, 0, l2, 0].item() - value) < 1e-12, (name, l1, l2)
    for (l1, l2), value in total.items():
        assert abs(scores.total[l1, 0, l2, 0].item() - value) < 1e-12, (l1, l2)
    # Not later: zero, as in TransformerLens.
    upper = torch.arange(3)[:, None] < torch.arange(3)[None, :]
    assert torch.all(scores.total[:, 0, :, 0][~upper] == 0)


@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_content_terms_are_transformer_lens_scores(kind):
    disentangled = randomised(disentangled_transformer(3, 1, 8, dtype=torch.float64, seed=4), seed=5)
    content = {"Q": "ov->qk", "K": "ov->qk", "V": "ov->ov"}[kind]
    with torch.no_grad():
        reference = HookedTransformer.all_composition_scores(disentangled, kind)  # TL's own
    torch.testing.assert_close(composition_scores(disentangled, kind).terms[content], reference, rtol=0, atol=1e-12)
    # A standard multi-head model has no position terms: total is TransformerLens's score.
    standard = standard_transformer(5, 8, n_layers=3, d_model=16, n_heads=2, dtype=torch.float64, seed=6)
    scores = composition_scores(standard, kind)
    assert set(scores.terms) == {content}
    with torch.no_grad():
        torch.testing.assert_close(
            scores.total, HookedTransformer.all_composition_scores(standard, kind), rtol=0, atol=1e-12
        )


def test_construction_layer_3_reads_layer_2_through_rel_query(construction):
    # Layer 3's rel_query is beta at the rows of L2.L1.rel, all inside layer 2's copy block, which
    # W_OV of layer 2 fills by a copy of the D_1 coordinates before it. So ||W_OV U|| = ||U||,
    # ||W_OV||_F = sqrt(D_1), sigma_max(W_OV) = 1.
    d1 = construction.residual_widths[1]
    with pytest.warns(UserWarning, match="qk of blocks.1 head 0"):
        frobenius = composition_scores(construction, "Q")
    with pytest.warns(UserWarning, match="zero"):
        spectral_scores = composition_scores(construction, "Q", "spectral")
    assert abs(frobenius.terms["ov->rel_query"][1, 0, 2, 0].item() - 1 / math.sqrt(d1)) < 1e-12
    assert abs(spectral_scores.terms["ov->rel_query"][1, 0, 2, 0].item() - 1.0) < 1e-12
    # Layer 2 writes no rel values, and layer 3 has no content score: the total is that one term.
    assert abs(frobenius.total[1, 0, 2, 0].item() - 1 / math.sqrt(d1)) < 1e-12
    # Layer 3 reads layer 1's responsibilities only through layer 2's mean, never directly.
    for name in ("ov->rel_query", "rel_value->rel_query"):
        assert frobenius.terms[name][0, 0, 2, 0].item() == 0.0


def test_construction_layer_2_has_no_content_score_and_no_nan(construction):
    with torch.no_grad():
        assert torch.isnan(HookedTransformer.all_composition_scores(construction, "Q")[0, 0, 1, 0])  # TL: 0 / 0
    for kind in ("Q", "K"):
        with pytest.warns(UserWarning, match=f"{kind}-composition: these matrices are zero.*qk of blocks.1 head 0"):
            scores = composition_scores(construction, kind)
        assert scores.terms["ov->qk"][0, 0, 1, 0].item() == 0.0
        assert not any(torch.isnan(t).any() for t in [scores.total, *scores.terms.values()])


def test_construction_layer_2_copies_layer_1_rel_values(construction):
    # V: layer 2's OV copies all D_1 coordinates before it, including L1.rel where layer 1's R writes
    # the one-hot offsets (rel_value = I_W): ||R W_OV|| = sqrt(W), sigma_max(R) = 1, ||W_OV|| = sqrt(D_1).
    d1, window = construction.residual_widths[1], M + 1
    with pytest.warns(UserWarning, match="rel_value of blocks.1 head 0"):
        scores = composition_scores(construction, "V", "spectral")
    assert abs(scores.terms["rel_value->ov"][0, 0, 1, 0].item() - math.sqrt(window / d1)) < 1e-12


def test_bad_arguments_raise(construction):
    with pytest.raises(ValueError, match="kind must be one of"):
        composition_scores(construction, "O")
    with pytest.raises(ValueError, match="normalization must be one of"):
        composition_scores(construction, "Q", normalization="nuclear")
    with pytest.raises(ValueError, match="must be a HookedTransformer"):
        composition_scores(torch.nn.Linear(2, 2), "Q")
