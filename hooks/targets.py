"""The algorithm's quantities at every position, aligned with a model's activations.

``targets(tokens, pi, m, beta)`` returns, for each token position ``t`` (0-based ``t - 1`` in the
tensors), what one-step mirror descent, two-step MD and Bayes hold after reading ``y_1..y_t``:
each a float64 ``[B, T, k]`` tensor, ``NaN`` at positions ``t <= m`` (no full lag window there).
They are computed by :mod:`mdlens.estimators` (all prefixes in one pass), never re-derived here.
Positions follow the construction's convention (paper-notes §4): the step at position ``t`` is
``eta_t = beta / (m (t - m))``, which is what a model averaging responsibilities with one fixed
readout scale ``beta`` computes.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mdlens import estimators as E
from mdlens.validation import check_int, check_order, check_positive, check_tokens, check_transition

CONTROL_TABLE_ROWS = 2**20


def _aligned(per_scored: Float[Tensor, "batch n_scored k"], order: int) -> Float[Tensor, "batch pos k"]:
    """``[B, T-m, k]`` rows for ``t = m+1..T`` -> ``[B, T, k]`` with NaN rows for ``t <= m``."""
    batch, _, width = per_scored.shape
    undefined = torch.full((batch, order, width), float("nan"), dtype=torch.float64)
    return torch.cat([undefined, per_scored.to(torch.float64)], dim=1)


def targets(
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    transition: Float[Tensor, "q q"],
    order: int,
    beta: float | None = None,
    lags: Int[Tensor, "batch pos"] | None = None,
    *,
    beta2: float | None = None,
    alpha: float = 1.0,
    include_bayes: bool = True,
    progress: bool | None = None,
) -> dict[str, Float[Tensor, "batch pos k"]]:
    """The algorithm's quantities per position: name -> float64 ``[B, T, k]``, NaN at ``t <= m``.

    Always: ``responsibility`` (``gamma_t(g)``, the lag posterior of ``y_t`` under a uniform prior) and
    ``mean_responsibility`` (its mean over ``k = m+1..t``), ``k = m``; ``bayes_weights``
    (``E[lambda | y_1..y_t]`` under Dirichlet(alpha)) unless ``include_bayes=False`` (exact DP, every
    prefix in one pass: cubic in ``T`` for ``m = 3``, seconds per sequence at ``T`` ~ 1000, refused above ``estimators.MAX_EXACT_WORK``; ``progress`` as in
    :func:`mdlens.estimators.bayes_weights`, a bar only for long jobs by default). With ``beta``:
    ``md_weights`` and ``log_md_weights`` (one-step MD on each prefix with ``eta_t = beta / (m (t - m))``; its log
    is the construction's layer-3 scores up to a constant per position), and
    ``md2_weights`` (two-step MD with the same convention, scale ``beta2``, default ``beta``).
    With ``lags`` (``MTDSample.lags``): ``lag``, the one-hot of the latent lag.
    """
    transition = check_transition(transition)
    order = check_order(order)
    tokens = check_tokens(tokens, transition.shape[0], order)
    if include_bayes:  # before any work: the exact posterior is the part that can be out of reach
        E.check_exact_bayes_size(tokens.shape[1], order, remedy="pass include_bayes=False to leave bayes_weights out")
    gamma = E.responsibilities(tokens, transition, order)  # [B, T-m, m]
    result = {
        "responsibility": _aligned(gamma, order),
        "mean_responsibility": _aligned(E.prefix_mean_responsibility(gamma), order),
    }
    if beta is not None:
        beta = check_positive(beta, "beta")
        md = E.prefix_md_weights(tokens, transition, order, beta, steps=1)
        result["md_weights"] = _aligned(md, order)
        result["log_md_weights"] = _aligned(md.log(), order)
    if beta2 is not None or beta is not None:
        beta2 = check_positive(beta if beta2 is None else beta2, "beta2")
        result["md2_weights"] = _aligned(E.prefix_md_weights(tokens, transition, order, beta2, steps=2), order)
    if include_bayes:
        result["bayes_weights"] = _aligned(E.prefix_bayes_weights(tokens, transition, order, alpha, progress), order)
    if lags is not None:
        result["lag"] = _lag_one_hot(lags, tokens, order)
    return result


def _lag_one_hot(lags: Tensor, tokens: Tensor, order: int) -> Float[Tensor, "batch pos m"]:
    if not isinstance(lags, Tensor) or lags.is_floating_point():
        raise ValueError("lags must be an integer tensor (MTDSample.lags)")
    lags = lags.unsqueeze(0) if lags.ndim == 1 else lags
    if lags.shape != tokens.shape:
        raise ValueError(f"lags have shape {tuple(lags.shape)}, tokens {tuple(tokens.shape)}")
    scored = lags[:, order:]
    if scored.numel() and (scored.min() < 1 or scored.max() > order):
        raise ValueError(f"lags at positions t > m must lie in 1..{order}")
    one_hot = torch.nn.functional.one_hot(scored.long() - 1, order)
    return _aligned(one_hot, order)


def control_target(
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    vocab_size: int,
    order: int,
    width: int,
    seed: int = 0,
) -> Float[Tensor, "batch pos k"]:
    """A control task in the spirit of Hewitt & Liang (2019): a fixed random function of the token
    identities at positions ``t-m..t``, ``[B, T, width]`` float64 (standard normal values drawn once
    per window of ``m + 1`` token ids from ``seed``), NaN at ``t <= m`` like the real targets.

    A probe that fits it as well as a real target says more about the probe's capacity than about
    the model: the real target's *selectivity* is its R^2 minus this one's.
    """
    order = check_order(order)
    tokens = check_tokens(tokens, vocab_size, order)
    width = check_int(width, "width", 1)
    # One row per window; past CONTROL_TABLE_ROWS windows share rows by a hash (still a fixed
    # random function of the window, only a coarser one).
    n_rows = min(vocab_size ** (order + 1), CONTROL_TABLE_ROWS)
    table = torch.randn(n_rows, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # Window id: the m + 1 tokens y_{t-m}..y_t read as the digits of a base-q number (mod n_rows).
    seq_len = tokens.shape[1]
    window_id = torch.zeros(tokens.shape[0], seq_len - order, dtype=torch.int64)
    for offset in range(order, -1, -1):
        window_id = (window_id * vocab_size + tokens[:, order - offset : seq_len - offset]) % n_rows
    return _aligned(table[window_id], order)
