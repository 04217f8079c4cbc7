"""mdlens.evaluation: "tuned MD" is tuned on one batch and scored on another, the same way for training's
held-out references and for the analyses."""

import pytest
import torch

from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.evaluation import evaluate, make_held_out, mean_and_se, reference_kls, sample_batches
from mdlens.models import disentangled_transformer
from mdlens.predict import predict_next

TASK = MTDTask(vocab_size=5, order=3, alpha=1.0, seed=0)


def test_reference_kls_tune_on_one_batch_and_score_on_the_other():
    tune, evaluation = sample_batches(TASK, 16, 32, 48)
    etas, kls = reference_kls(TASK, tune, evaluation)
    pi, m, tokens, truth = TASK.transition, TASK.order, evaluation.tokens, evaluation.next_probs
    assert list(kls) == ["uniform", "md1_tuned", "md2_tuned", "bayes_exact"]
    for name, steps in (("md1_tuned", 1), ("md2_tuned", 2)):
        # The step is the tuning batch's best one (the grid search of tune_eta_refined), not the
        # evaluation batch's, and the KL is that step's on the evaluation batch.
        assert etas[name] == E.tune_eta_refined(tune.tokens, pi, m, tune.next_probs, steps)["eta"]
        assert etas[name] != E.tune_eta_refined(tokens, pi, m, truth, steps)["eta"]
        expected = E.kl_divergence(truth, E.predictive(tokens, pi, E.md_weights(tokens, pi, m, etas[name], steps)))
        assert torch.equal(kls[name], expected)
    uniform = E.predictive(tokens, pi, torch.full((48, m), 1 / m, dtype=torch.float64))
    assert torch.equal(kls["uniform"], E.kl_divergence(truth, uniform))
    bayes = E.predictive(tokens, pi, E.bayes_weights(tokens, pi, m, alpha=1.0, method="exact"))
    assert torch.equal(kls["bayes_exact"], E.kl_divergence(truth, bayes))
    # Bayes is the best predictor on average; the uniform guess the worst here.
    assert kls["bayes_exact"].mean() <= kls["md2_tuned"].mean() <= kls["uniform"].mean()
    _, without_bayes = reference_kls(TASK, tune, evaluation, {"md1_tuned": 1}, bayes=False)
    assert list(without_bayes) == ["uniform", "md1_tuned"]


def test_held_out_references_are_the_analyses_definition():
    held_out = make_held_out(TASK, 16, 40, seed=5)
    generator = torch.Generator().manual_seed(5)
    evaluation = TASK.sample(40, 16, generator=generator)  # the held-out batch, then its tuning batch
    tune = TASK.sample(40, 16, generator=generator)
    assert torch.equal(held_out.tokens, evaluation.tokens) and torch.equal(held_out.truth, evaluation.next_probs)
    etas, kls = reference_kls(TASK, tune, evaluation)
    assert held_out.references == {
        "eta_md1": etas["md1_tuned"],
        "kl_md1": kls["md1_tuned"].mean().item(),
        "eta_md2": etas["md2_tuned"],
        "kl_md2": kls["md2_tuned"].mean().item(),
        "kl_uniform": kls["uniform"].mean().item(),
        "kl_bayes": kls["bayes_exact"].mean().item(),
    }
    assert "kl_bayes" not in make_held_out(TASK, 16, 40, seed=5, bayes=False).references


def test_evaluate_is_the_models_mean_kl_and_keeps_its_mode():
    held_out = make_held_out(TASK, 16, 24, seed=0, bayes=False)
    model = disentangled_transformer(5, 3, 16, n_layers=2, seed=1)
    model.train()
    expected = E.kl_divergence(held_out.truth, predict_next(model, held_out.tokens)).mean().item()
    assert evaluate(model, held_out) == pytest.approx(expected, rel=1e-12) and model.training


def test_mean_and_se():
    summary = mean_and_se(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64))
    # mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, se = sqrt(14/3) / 2
    assert summary["mean"] == pytest.approx(3.0) and summary["se"] == pytest.approx((14 / 3) ** 0.5 / 2)


def test_reference_kls_refuses_a_too_long_exact_bayes_with_its_own_hint():
    """Past exact Bayes's cap the refusal names an argument reference_kls has (bayes=False), and
    doing what it says works."""
    task = MTDTask(vocab_size=3, order=4, seed=0)
    seq_len = E.longest_exact_bayes(4) + 1
    generator = torch.Generator().manual_seed(0)
    tune, evaluation = (task.sample(2, seq_len, generator=generator) for _ in range(2))
    with pytest.raises(ValueError, match="pass bayes=False"):
        reference_kls(task, tune, evaluation, md={"md1": 1})
    _, kls = reference_kls(task, tune, evaluation, md={"md1": 1}, bayes=False)
    assert set(kls) == {"uniform", "md1"}
