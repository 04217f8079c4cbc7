"""hooks.compare_with_construction: the construction against itself agrees exactly (its own step, zero
attention TV, layer 1 on the responsibilities, pi read back from its scores); a random-init model of
the same architecture and a standard transformer do not."""

import pytest
import torch

from mdlens import MTDTask
from mdlens.construction import build_md_transformer
from mdlens.hooks import compare_with_construction, own_step
from mdlens.models import DisentangledTransformer, standard_transformer

TASK = MTDTask(vocab_size=5, order=3, alpha=1.0, seed=0)
PI, M, T, ETA = TASK.transition, TASK.order, 16, 0.05
TOKENS = TASK.sample(24, T, generator=torch.Generator().manual_seed(3)).tokens


def test_the_construction_against_itself_agrees_exactly():
    construction = build_md_transformer(PI, M, T, ETA)
    result = compare_with_construction(construction, TOKENS, PI, M)
    assert result.eta == ETA and result.beta == pytest.approx(ETA * M * (T - M), rel=1e-15)
    assert len(result.attention.tv) == 3 and max(result.attention.tv) < 1e-12
    assert result.responsibility_tv == pytest.approx([0.0], abs=1e-12)
    mass = result.offset_mass  # [head, offset 0..m]: the lag window 1..m, nothing on the query
    assert mass.shape == (1, M + 1) and float(mass[0, 0]) == pytest.approx(0.0, abs=1e-12)
    assert float(mass[0, 1:].sum()) == pytest.approx(1.0, abs=1e-12)
    # Layer 1's scores are (log pi)^T: the learned transition is pi, at KL 0.
    torch.testing.assert_close(result.learned_transition, PI, rtol=0, atol=1e-10)
    assert result.learned_transition_kl == pytest.approx(0.0, abs=1e-12) and result.learned_transition_reason is None
    assert result.score_block_correlation["log_transition_T"] == pytest.approx(1.0, abs=1e-12)


def test_own_step_reads_a_construction_and_otherwise_fits_its_predictions():
    construction = build_md_transformer(PI, M, T, ETA)
    assert own_step(construction, TOKENS, PI, M) == ETA  # its md_params, exactly
    construction.md_params = {}  # now only its predictions tell: the fit finds eta to the grid's ~2%
    assert own_step(construction, TOKENS, PI, M) == pytest.approx(ETA, rel=0.03)
    # At another length than it was built for, its md_params' eta is not the step it runs there.
    longer = build_md_transformer(PI, M, 2 * T, ETA)
    with pytest.warns(Warning, match="built for seq_len=32"):  # the model says so itself, too
        assert own_step(longer, TOKENS, PI, M) == pytest.approx(ETA * (2 * T - M) / (T - M), rel=0.03)


def test_a_random_model_is_far_from_the_construction():
    model = DisentangledTransformer.from_task(TASK, T, n_layers=3, seed=0, output="probs")
    result = compare_with_construction(model, TOKENS, PI, M, eta=ETA)
    assert result.eta == ETA and result.construction.md_params["eta"] == ETA
    assert min(result.attention.tv) > 0.1
    assert result.responsibility_tv[0] > 0.1
    assert abs(result.score_block_correlation["log_transition_T"]) < 0.9


def test_a_standard_transformer_has_no_score_readings():
    model = standard_transformer(5, T, n_layers=3, d_model=16, seed=0)
    result = compare_with_construction(model, TOKENS, PI, M, eta=ETA)
    assert len(result.attention.tv) == 3  # the construction's layers, each matched to a model head
    assert len(result.responsibility_tv) == model.cfg.n_heads and result.offset_mass.shape[0] == model.cfg.n_heads
    assert result.score_block_correlation is None and result.learned_transition_kl is None
    assert "not a disentangled model" in result.learned_transition_reason


def test_bad_input_raises():
    construction = build_md_transformer(PI, M, T, ETA)
    with pytest.raises(ValueError, match="eta"):
        compare_with_construction(construction, TOKENS, PI, M, eta=-1.0)
    with pytest.raises(ValueError, match="order"):
        compare_with_construction(construction, TOKENS[:, :M], PI, M, eta=ETA)
    with pytest.raises(ValueError, match="d_vocab"):
        compare_with_construction(construction, TOKENS, torch.full((4, 4), 0.25, dtype=torch.float64), M)
    with pytest.raises(ValueError):
        compare_with_construction(construction, TOKENS.tolist(), PI, M)
