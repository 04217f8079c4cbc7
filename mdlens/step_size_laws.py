"""How a tuned step size falls with the sequence length: Theorem 2's law ``eta* ~ c / T``, fitted.

Theorem 2 (paper-notes §3) bounds stable mirror-descent steps by order ``1/T``. Given the step tuned
(or read off a model) at several lengths, :func:`fit_step_sizes` fits both forms of that law by least
squares in log space: a free exponent, and the exponent fixed at 1 on the context ``T - m``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fit_step_sizes"]


def fit_step_sizes(lengths: list[int], etas: list[float], order: int) -> dict:
    """Least-squares fits of the tuned step against T (Theorem 2 predicts eta* ~ c / T).

    power law:      log eta* = log c - p log T        (free exponent p)
    inverse context: eta* = c / (T - m)               (exponent fixed at 1; log c = mean of
                                                        log eta* + log(T - m))

    Returns ``{"power_law": {"c", "p", "r2"}, "inverse_context": {"c", "rms_log_residual"}}``; ``r2``
    is NaN when every step is the same. ``ValueError`` for fewer than two lengths, lengths and steps
    of different counts, a length not above ``order`` or a step that is not positive.
    """
    _check_series(lengths, etas, order)
    log_t = np.log(np.asarray(lengths, dtype=np.float64))
    log_eta = np.log(np.asarray(etas, dtype=np.float64))
    slope, intercept = np.polyfit(log_t, log_eta, deg=1)
    predicted = intercept + slope * log_t
    total = np.sum((log_eta - log_eta.mean()) ** 2)
    r2 = 1.0 - np.sum((log_eta - predicted) ** 2) / total if total > 0 else float("nan")

    log_context = np.log(np.asarray(lengths, dtype=np.float64) - order)
    log_c_context = float(np.mean(log_eta + log_context))
    residual = log_eta - (log_c_context - log_context)
    return {
        "power_law": {"c": float(np.exp(intercept)), "p": float(-slope), "r2": float(r2)},
        "inverse_context": {
            "c": float(np.exp(log_c_context)),
            "rms_log_residual": float(np.sqrt(np.mean(residual**2))),
        },
    }


def _check_series(lengths: list[int], etas: list[float], order: int) -> None:
    """The fit's inputs: at least two lengths, as many steps, every ``T > m`` and every step ``> 0``."""
    if len(lengths) != len(etas):
        raise ValueError(f"lengths and etas must have the same count, got {len(lengths)} and {len(etas)}")
    if len(lengths) < 2:
        raise ValueError(f"a law needs at least two lengths, got {len(lengths)}")
    if any(t <= order for t in lengths):
        raise ValueError(f"every length must exceed order = {order}, got {list(lengths)}")
    if not all(eta > 0 for eta in etas):  # also catches NaN
        raise ValueError(f"every step size must be positive, got {list(etas)}")
