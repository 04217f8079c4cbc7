"""Theorem 2's law fitted to step sizes (mdlens.step_size_laws): planted laws are recovered exactly."""

import math

import pytest

from mdlens.step_size_laws import fit_step_sizes

LENGTHS = [8, 16, 32, 64, 128]


def test_a_planted_power_law_is_recovered():
    c, p = 0.7, 0.8
    fit = fit_step_sizes(LENGTHS, [c * t**-p for t in LENGTHS], order=3)
    assert fit["power_law"]["c"] == pytest.approx(c, rel=1e-10)
    assert fit["power_law"]["p"] == pytest.approx(p, rel=1e-10)
    assert fit["power_law"]["r2"] == pytest.approx(1.0, abs=1e-12)


def test_a_planted_inverse_context_law_has_no_residual():
    c, m = 2.5, 3
    fit = fit_step_sizes(LENGTHS, [c / (t - m) for t in LENGTHS], order=m)
    assert fit["inverse_context"]["c"] == pytest.approx(c, rel=1e-12)
    assert fit["inverse_context"]["rms_log_residual"] == pytest.approx(0.0, abs=1e-12)
    # The free exponent of c / (T - m) is above 1 on these lengths: log(T - m) falls faster than log T.
    assert fit["power_law"]["p"] > 1.0


def test_the_inverse_context_residual_is_the_rms_of_the_log_errors():
    etas = [0.2, 0.09, 0.05, 0.02, 0.012]
    fit = fit_step_sizes(LENGTHS, etas, order=3)
    log_c = sum(math.log(e) + math.log(t - 3) for t, e in zip(LENGTHS, etas, strict=True)) / len(etas)
    residuals = [math.log(e) - (log_c - math.log(t - 3)) for t, e in zip(LENGTHS, etas, strict=True)]
    assert fit["inverse_context"]["c"] == pytest.approx(math.exp(log_c), rel=1e-12)
    expected = math.sqrt(sum(r * r for r in residuals) / len(residuals))
    assert fit["inverse_context"]["rms_log_residual"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("lengths", "etas", "match"),
    [
        ([8], [0.1], "at least two"),
        ([8, 16], [0.1], "same count"),
        ([3, 16], [0.1, 0.05], "exceed order"),
        ([8, 16], [0.1, 0.0], "positive"),
        ([8, 16], [0.1, float("nan")], "positive"),
    ],
)
def test_bad_series_raise(lengths, etas, match):
    with pytest.raises(ValueError, match=match):
        fit_step_sizes(lengths, etas, order=3)
