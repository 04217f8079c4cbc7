"""Step sizes read off a predictor: MD with one step size per step, its fit, and a model's effective eta.

Checked against independent computations: the exponentiated-gradient step with the log-likelihood
gradient from autograd, planted step sizes, and the construction's known schedule
``eta_t = beta / (m (t - m))`` (paper-notes §4).
"""

import math

import pytest
import torch

from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.construction import build_md_transformer
from mdlens.evaluation import effective_eta

TASK = MTDTask(vocab_size=5, order=3, alpha=1.0, seed=0)
PI, M = TASK.transition, TASK.order


def _sample(batch: int, seq_len: int, seed: int):
    return TASK.sample(batch, seq_len, generator=torch.Generator().manual_seed(seed))


def _md_by_autograd(tokens, etas):
    """Exponentiated gradient from 1/m with dl/dlambda from autograd of l = sum_k log sum_g lambda_g P[k,g]."""
    lag_probs = E.lag_likelihoods(tokens, PI, M)  # [B, N, m]
    weights = torch.full((tokens.shape[0], M), 1.0 / M, dtype=torch.float64)
    for eta in etas:
        point = weights.clone().requires_grad_(True)
        log_likelihood = torch.log((lag_probs * point[:, None, :]).sum(dim=-1)).sum()
        (gradient,) = torch.autograd.grad(log_likelihood, point)
        weights = weights * torch.exp(eta * gradient)
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights


def test_md_weights_by_step_is_exponentiated_gradient_with_a_schedule():
    tokens = _sample(8, 40, seed=3).tokens
    etas = [0.05, 0.01, 0.2]
    for steps in (1, 2, 3):
        expected = _md_by_autograd(tokens, etas[:steps])
        got = E.md_weights_by_step(tokens, PI, M, torch.tensor(etas[:steps], dtype=torch.float64))
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # One step size for every step is md_weights.
    tied = E.md_weights_by_step(tokens, PI, M, torch.full((2,), 0.03, dtype=torch.float64))
    torch.testing.assert_close(tied, _md_by_autograd(tokens, [0.03, 0.03]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(E.md_weights(tokens, PI, M, 0.03, steps=2), tied, rtol=0, atol=0)


@pytest.mark.parametrize(
    "etas", [[], [0.1, -0.2], [float("nan")], [[0.1]]], ids=["empty", "negative", "nan", "two-dimensional"]
)
def test_md_weights_by_step_rejects_bad_steps(etas):
    tokens = _sample(2, 10, seed=0).tokens
    with pytest.raises(ValueError, match="etas"):
        E.md_weights_by_step(tokens, PI, M, torch.tensor(etas, dtype=torch.float64))
    with pytest.raises(ValueError, match="etas"):
        E.md_weights_by_step(tokens, PI, M, [0.1, 0.2])  # a list, not a tensor


def test_fit_md_step_sizes_recovers_planted_steps():
    tokens = _sample(256, 64, seed=4).tokens
    planted = torch.tensor([0.06, 0.015], dtype=torch.float64)
    target = E.predictive(tokens, PI, E.md_weights_by_step(tokens, PI, M, planted))
    fit = E.fit_md_step_sizes(tokens, PI, M, target, steps=2)
    assert fit["tuning_kl"] < 1e-7
    assert fit["etas"] == pytest.approx(planted.tolist(), rel=0.05)
    # One step: the fit agrees with the grid search (to the grid's resolution) and is at least as close.
    one = E.fit_md_step_sizes(tokens, PI, M, target, steps=1)
    grid = E.tune_eta_refined(tokens, PI, M, target, steps=1)
    assert one["etas"][0] == pytest.approx(grid["eta"], rel=0.03)
    assert one["tuning_kl"] <= grid["tuning_kl"] + 1e-12


@pytest.mark.filterwarnings("ignore::mdlens.models.disentangled.RescaledStepWarning")  # shorter inputs on purpose
def test_effective_eta_of_the_construction_is_its_schedule():
    beta, seq_len = 6.0, 96
    construction = build_md_transformer(PI, M, seq_len, eta=beta / (M * (seq_len - M)))
    # Shorter inputs: the construction's position t runs one-step MD with eta_t = beta / (m (t - m)).
    # The grid of tune_eta_refined has a resolution of about 2%.
    for length in (12, 32, 96):
        tokens = _sample(64, length, seed=length).tokens
        assert effective_eta(construction, tokens, PI, M) == pytest.approx(beta / (M * (length - M)), rel=0.025)


def test_fit_scales_by_kl_keeps_the_best_start_and_improves_on_it():
    sample = _sample(128, 48, seed=5)
    tokens, truth = sample.tokens, sample.next_probs

    def weights_of(log_etas):
        return E.md_weights_by_step(tokens, PI, M, log_etas.exp())

    def mean_kl(log_etas: list[float]) -> float:  # computed here, outside the fit
        predicted = E.predictive(tokens, PI, weights_of(torch.tensor(log_etas, dtype=torch.float64)))
        return E.kl_divergence(truth, predicted).mean().item()

    starts = [[math.log(0.5), math.log(0.5)], [math.log(0.05), math.log(0.01)], [math.log(1e-4), math.log(1e-4)]]
    start_kls = [mean_kl(start) for start in starts]
    # No iterations: the best start itself, its KL recomputed independently.
    kept = E.fit_scales_by_kl(tokens, PI, truth, weights_of, starts, max_iter=0)
    assert kept["scales"] == starts[start_kls.index(min(start_kls))]
    assert kept["tuning_kl"] == pytest.approx(min(start_kls), rel=1e-12)
    # With iterations: the reported KL is that of the reported scales, below every start's, and no
    # point of a fine grid around the fit is lower (a brute-force check of the minimum).
    fit = E.fit_scales_by_kl(tokens, PI, truth, weights_of, starts)
    assert fit["tuning_kl"] == pytest.approx(mean_kl(fit["scales"]), rel=1e-12)
    assert fit["tuning_kl"] < min(start_kls)
    offsets = torch.linspace(-0.2, 0.2, 9).tolist()
    grid = [mean_kl([fit["scales"][0] + a, fit["scales"][1] + b]) for a in offsets for b in offsets]
    assert fit["tuning_kl"] <= min(grid) + 1e-12


def test_fit_md_step_sizes_finds_no_second_step_in_a_one_step_target():
    # The target is one-step MD: the best two-step schedule is (0.05, 0), on the simplex's edge in log
    # space, and the KL there is 0. Tolerances relative to the start's KL take the fit to it.
    for seq_len in (32, 64):
        tokens = _sample(256, seq_len, seed=seq_len).tokens
        target = E.predictive(tokens, PI, E.md_weights(tokens, PI, M, 0.05))
        fit = E.fit_md_step_sizes(tokens, PI, M, target, steps=2)
        assert fit["tuning_kl"] < 1e-10  # the start (0.05, 0.0005) is at 3e-9 (T=32) and 2e-8 (T=64)
        assert fit["etas"][0] == pytest.approx(0.05, rel=1e-3)
        assert fit["etas"][1] < 1e-4
