"""mdlens.hooks.targets: every position's quantity equals the estimator run on that prefix alone."""

import numpy as np
import pytest
import torch

from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.hooks.targets import control_target, targets

TASK = MTDTask(vocab_size=4, order=3, seed=2)
M = TASK.order


@pytest.fixture(scope="module")
def sample():
    return TASK.sample(6, 20, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("alpha", [1.0, 0.5, 3.0])
def test_every_position_matches_the_estimators_on_its_prefix(sample, alpha):
    pi, beta = TASK.transition, 6.0
    result = targets(sample.tokens, pi, M, beta=beta, beta2=9.0, alpha=alpha, lags=sample.lags)
    assert set(result) == {
        "responsibility",
        "mean_responsibility",
        "md_weights",
        "log_md_weights",
        "md2_weights",
        "bayes_weights",
        "lag",
    }
    for values in result.values():
        assert values.shape == (6, 20, M) and values.dtype == torch.float64
        assert torch.isnan(values[:, :M]).all() and torch.isfinite(values[:, M:]).all()
    gamma = E.responsibilities(sample.tokens, pi, M)
    for t in range(M + 1, 21):  # 1-based position t is tensor index t - 1
        prefix, eta = sample.tokens[:, :t], beta / (M * (t - M))
        torch.testing.assert_close(result["responsibility"][:, t - 1], gamma[:, t - M - 1], rtol=0, atol=1e-15)
        torch.testing.assert_close(
            result["mean_responsibility"][:, t - 1], gamma[:, : t - M].mean(dim=1), rtol=0, atol=1e-14
        )
        torch.testing.assert_close(result["md_weights"][:, t - 1], E.md_weights(prefix, pi, M, eta), rtol=0, atol=1e-13)
        torch.testing.assert_close(
            result["log_md_weights"][:, t - 1], E.md_weights(prefix, pi, M, eta).log(), rtol=0, atol=1e-12
        )
        eta2 = 9.0 / (M * (t - M))
        torch.testing.assert_close(
            result["md2_weights"][:, t - 1], E.md_weights(prefix, pi, M, eta2, steps=2), rtol=0, atol=1e-12
        )
        torch.testing.assert_close(
            result["bayes_weights"][:, t - 1], E.bayes_weights(prefix, pi, M, alpha=alpha), rtol=0, atol=1e-12
        )
    lag_index = result["lag"][:, M:].argmax(dim=-1) + 1
    assert torch.equal(lag_index, sample.lags[:, M:]) and torch.equal(
        result["lag"][:, M:].sum(-1), torch.ones(6, 20 - M, dtype=torch.float64)
    )


def test_optional_targets_are_left_out(sample):
    result = targets(sample.tokens, TASK.transition, M, include_bayes=False)
    assert set(result) == {"responsibility", "mean_responsibility"}


def test_bad_input_is_named(sample):
    pi = TASK.transition
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        targets(sample.tokens + 4, pi, M)
    with pytest.raises(ValueError, match="order"):
        targets(sample.tokens[:, :3], pi, M)
    with pytest.raises(ValueError, match="beta"):
        targets(sample.tokens, pi, M, beta=-1.0)
    with pytest.raises(ValueError, match="lags"):
        targets(sample.tokens, pi, M, lags=sample.lags[:, :5])
    with pytest.raises(ValueError, match="lags"):
        targets(sample.tokens, pi, M, lags=sample.lags * 0 + 7)


def test_control_target_is_a_fixed_function_of_the_last_m_plus_1_tokens():
    tokens = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 1], [3, 3, 0, 1, 2, 3, 0, 0, 0]])
    control = control_target(tokens, 4, 3, width=2, seed=5)
    assert control.shape == (2, 9, 2) and torch.isnan(control[:, :3]).all()
    # The window (0, 1, 2, 3) ends at positions 4 and 8 of sequence 0 and position 6 of sequence 1.
    torch.testing.assert_close(control[0, 3], control[0, 7], rtol=0, atol=0)
    torch.testing.assert_close(control[0, 3], control[1, 5], rtol=0, atol=0)
    assert not torch.equal(control[0, 3], control[0, 4])  # another window, another value
    torch.testing.assert_close(control, control_target(tokens, 4, 3, width=2, seed=5), rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(control[:, 3:], control_target(tokens, 4, 3, width=2, seed=6)[:, 3:])


@pytest.mark.parametrize("width", [0, True, 2.0, torch.tensor(1.5)])
def test_control_target_width_is_a_count(width):
    tokens = torch.tensor([[0, 1, 2, 3, 0, 1]])
    with pytest.raises(ValueError, match="width must be an int >= 1"):
        control_target(tokens, 4, 3, width=width)


def test_control_target_width_may_be_any_integral_number():
    tokens = torch.tensor([[0, 1, 2, 3, 0, 1]])
    expected = control_target(tokens, 4, 3, width=3, seed=1)
    for width in (torch.tensor(3), np.int64(3)):
        torch.testing.assert_close(control_target(tokens, 4, 3, width=width, seed=1), expected, equal_nan=True)
