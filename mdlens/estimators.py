"""Estimators of the MTD mixture weights ``lambda`` and the predictors built on them (paper-notes §2).

Indexing convention (the one of the whole code base): for tokens ``y_1..y_T`` (1-based in the
maths, ``tokens[:, 0..T-1]`` in the tensors) the scored positions are ``k = m+1..T``, i.e.
``N = T - m`` of them. In every ``[B, T-m, m]`` tensor, row ``r`` is position ``k = m + 1 + r``
and column ``g - 1`` is lag ``g``:

    P[b, r, g-1] = pi(y_{k-g}, y_k)                      (lag likelihoods)
    gamma_k(g)   = P[k, g] / sum_h P[k, h]               (responsibilities)
    l(lambda)    = sum_k log sum_g lambda_g P[k, g]      (log-likelihood)

Everything runs in float64; probabilities are combined in log space (or rescaled with the scale
tracked) wherever products over positions appear.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mdlens._random import log_gamma_sample
from mdlens.task import last_tokens  # E.last_tokens: the lagged rows MD predicts from
from mdlens.validation import (
    check_distribution,
    check_int,
    check_order,
    check_positive,
    check_positive_entries,
    check_tokens,
    check_transition,
    check_weights,
)

# Exact Bayes keeps a dense table of (N+1)^(m-1) cells over the first m-1 lag counts (N = T-m
# scored positions) and, at scored position k, updates the (k+1)^(m-1) cells reachable so far: one
# sequence costs sum_{k=1..N} (k+1)^(m-1) ~ (N+1)^m / m cell updates (count vectors x positions),
# 7-40 ns each on one CPU core (more for larger m and tables), 70-100 ns once the table is far
# beyond the cache. It refuses a sequence above MAX_EXACT_WORK updates (time) or MAX_EXACT_CELLS
# cells (memory and cache: two float64 tables of 32 MiB): m=2 up to T = 32768, m=3 up to T = 1173
# (time), m=4 up to T = 164, m=5 up to T = 49, m=6 up to T = 26 (memory). On one core of a 2-core
# machine the longest sequence took 7 s (m=3; 11 s with every prefix), 5 s (m=2), 4 s (m=4) and
# about 1 s (m=5, 6) of CPU time.
MAX_EXACT_WORK = 2**29
MAX_EXACT_CELLS = 2**22
# A job of more cell updates than this (all sequences together: a second or more) shows a progress
# bar unless the caller passes progress=False.
PROGRESS_MIN_WORK = 2**27

# Cells (batch x table) processed at once by exact Bayes: bounds memory (4 float64 buffers of
# this size) and keeps the working set near cache size.
_EXACT_CHUNK_CELLS = 2**20

TokensLike = Int[Tensor, "batch pos"] | Int[Tensor, " pos"]
BAYES_REMEDY = 'use bayes_weights(..., method="gibbs")'


# ----------------------------------------------------------------------------------------------
# Per-position lag likelihoods and responsibilities
# ----------------------------------------------------------------------------------------------


def _checked_inputs(tokens: Tensor, transition: Tensor, order: int) -> tuple[Tensor, Tensor, int]:
    transition = check_transition(transition)
    order = check_order(order)
    tokens = check_tokens(tokens, transition.shape[0], order)
    return tokens, transition, order


def _parent_and_child(tokens: Tensor, order: int) -> tuple[Tensor, Tensor]:
    """parents[b, r, g-1] = y_{k-g} and children[b, r, 0] = y_k for k = m+1+r (0-based: k-1)."""
    seq_len = tokens.shape[1]
    # 0-based index of y_{k-g} is (m + r) - g; stacking g = 1..m as columns.
    parents = torch.stack([tokens[:, order - g : seq_len - g] for g in range(1, order + 1)], dim=-1)
    children = tokens[:, order:].unsqueeze(-1)
    return parents, children


def prefix_mean_responsibility(
    responsibilities: Float[Tensor, "batch n_scored m"],
) -> Float[Tensor, "batch n_scored m"]:
    """``Gamma_bar(t) = (1 / (t - m)) sum_{k=m+1..t} gamma_k``: row ``t - m - 1`` is prefix ``t``.

    Takes ``responsibilities(...)``'s ``[B, T-m, m]`` and returns the running means (one-step MD on
    prefix ``t`` is ``softmax(beta * Gamma_bar(t))``, paper-notes §4).
    """
    n_seen = torch.arange(1, responsibilities.shape[1] + 1, dtype=responsibilities.dtype)  # t - m
    return responsibilities.cumsum(dim=1) / n_seen[None, :, None]


def beta_from_eta(eta: float, order: int, seq_len: int) -> float:
    """The construction's step numerator ``beta = eta * m * (T - m)`` (paper-notes §4).

    With ``eta_t = beta / (m (t - m))`` at prefix ``t``, the last position ``t = T = seq_len`` takes
    exactly the step ``eta``. :func:`eta_from_beta` is the inverse.
    """
    return eta * order * (seq_len - order)


def eta_from_beta(beta: float, order: int, seq_len: int) -> float:
    """The step size at the last position ``T = seq_len`` of the construction's ``beta``:
    ``eta = beta / (m (T - m))``, the inverse of :func:`beta_from_eta`."""
    return beta / (order * (seq_len - order))


def _raise_on_impossible(lag_probs: Tensor, order: int) -> None:
    """A position where every lag has probability 0 has likelihood 0 under every lambda."""
    impossible = (lag_probs == 0).all(dim=-1)
    if impossible.any():
        b, r = impossible.nonzero()[0].tolist()
        raise ValueError(
            f"sequence {b}: token at position k={order + 1 + r} (1-based; tokens[{b}, {order + r}]) has "
            f"probability 0 under every lag, so the likelihood is 0 for every lambda; these tokens "
            f"cannot come from this MTD"
        )


def lag_likelihoods(
    tokens: TokensLike, transition: Float[Tensor, "q q"], order: int
) -> Float[Tensor, "batch n_scored m"]:
    """``P[b, r, g-1] = pi(y_{k-g}, y_k)`` for ``k = m+1+r``: how well each lag explains each token.

    Returns float64 ``[B, T-m, m]``. Zeros are kept (no check for impossible positions here).
    """
    tokens, transition, order = _checked_inputs(tokens, transition, order)
    parents, children = _parent_and_child(tokens, order)
    return transition[parents, children.expand_as(parents)]


def _checked_lag_likelihoods(tokens: Tensor, transition: Tensor, order: int) -> Tensor:
    lag_probs = lag_likelihoods(tokens, transition, order)
    _raise_on_impossible(lag_probs, order)
    return lag_probs


def responsibilities(
    tokens: TokensLike, transition: Float[Tensor, "q q"], order: int
) -> Float[Tensor, "batch n_scored m"]:
    """``gamma_k(g) = P[k, g] / sum_h P[k, h]``: the posterior of the lag under a uniform prior.

    Returns float64 ``[B, T-m, m]``, rows on the simplex (row ``r`` is ``k = m+1+r``).
    """
    lag_probs = _checked_lag_likelihoods(tokens, transition, order)
    return lag_probs / lag_probs.sum(dim=-1, keepdim=True)


def log_likelihood(
    tokens: TokensLike,
    transition: Float[Tensor, "q q"],
    order: int,
    weights: Float[Tensor, "batch m"] | Float[Tensor, " m"],
) -> Float[Tensor, " batch"]:
    """``l(lambda) = sum_{k=m+1..T} log sum_g lambda_g pi(y_{k-g}, y_k)`` per sequence, ``[B]``.

    Differentiable in ``weights`` (computed as a logsumexp of ``log lambda + log P``).
    """
    lag_probs = _checked_lag_likelihoods(tokens, transition, order)
    weights = _check_weights_keep_graph(weights, order, lag_probs.shape[0])
    per_position = torch.logsumexp(torch.log(weights).unsqueeze(1) + torch.log(lag_probs), dim=-1)
    return per_position.sum(dim=-1)


def _check_weights_keep_graph(weights: Tensor, order: int, batch_size: int) -> Tensor:
    """Validate weights without detaching them (``log_likelihood`` is differentiated by tests/users)."""
    check_weights(weights.detach() if isinstance(weights, Tensor) else weights, order, batch_size)
    weights = weights.to(torch.float64)
    return weights.unsqueeze(0) if weights.ndim == 1 else weights


# ----------------------------------------------------------------------------------------------
# Mirror descent (exponentiated gradient) and maximum likelihood
# ----------------------------------------------------------------------------------------------


def _log_gradient_terms(log_weights: Tensor, log_lag_probs: Tensor) -> Tensor:
    """``dl/dlambda_g = sum_k P[k,g] / sum_h lambda_h P[k,h]``, computed from logs, ``[B, m]``."""
    log_mixture = torch.logsumexp(log_weights.unsqueeze(1) + log_lag_probs, dim=-1, keepdim=True)
    return torch.exp(log_lag_probs - log_mixture).sum(dim=1)


def md_weights(
    tokens: TokensLike, transition: Float[Tensor, "q q"], order: int, eta: float, steps: int = 1
) -> Float[Tensor, "batch m"]:
    """Mirror descent with the negative-entropy mirror map from the centre ``1/m``, ``[B, m]``.

    One step has the closed form ``softmax_g(eta * m * sum_k gamma_k(g))`` (the gradient at the
    centre is ``m * sum_k gamma_k``). ``steps > 1`` iterates the exponentiated-gradient update
    ``lambda_g <- lambda_g exp(eta * dl/dlambda_g) / Z`` in log space, with the same ``eta`` every
    step (:func:`md_weights_by_step` takes one per step).
    """
    eta = check_positive(eta, "eta")
    steps = check_int(steps, "steps", 1)
    return md_weights_by_step(tokens, transition, order, torch.full((steps,), eta, dtype=torch.float64))


def md_weights_by_step(
    tokens: TokensLike, transition: Float[Tensor, "q q"], order: int, etas: Float[Tensor, " steps"]
) -> Float[Tensor, "batch m"]:
    """Mirror descent with step ``etas[s]`` at step ``s + 1``, ``[B, m]``: ``len(etas)`` steps from ``1/m``.

    ``md_weights(..., eta, steps)`` is ``md_weights_by_step(..., [eta] * steps)``. Differentiable in
    ``etas`` (a 1-D float tensor of finite, positive entries, which may require grad), so the step
    sizes a model behaves like can be fitted (``mdlens reproduce step-sizes``).
    """
    etas = check_positive_entries(etas, "etas")
    return _md_weights_of(_LagTerms.of(tokens, transition, order), etas)


class _LagTerms:
    """What every MD step and every predictive on one batch reads, computed once for the batch.

    A step-size search evaluates MD at many step sizes on the same tokens; the lag likelihoods, their
    logs and the lagged rows of ``pi`` do not depend on the step, so they are read once here (the
    numbers are those ``md_weights_by_step`` and ``predictive`` compute on their own).
    """

    def __init__(self, lag_probs: Tensor, lagged_rows: Tensor, order: int):
        self.order = order
        self.lag_probs = lag_probs  # [B, T-m, m]: P[b, r, g-1] = pi(y_{k-g}, y_k), k = m+1+r
        gamma = lag_probs / lag_probs.sum(dim=-1, keepdim=True)
        self.responsibility_sum = gamma.sum(dim=1)  # [B, m]: sum_k gamma_k, the gradient at 1/m over m
        self._log_lag_probs: Tensor | None = None
        self.lagged_rows = lagged_rows  # [B, m, q]: row g-1 is pi(y_{T+1-g}, .)

    @classmethod
    def of(cls, tokens: TokensLike, transition: Tensor, order: int) -> _LagTerms:
        tokens, transition, order = _checked_inputs(tokens, transition, order)
        return cls(_checked_lag_likelihoods(tokens, transition, order), transition[last_tokens(tokens, order)], order)

    @property
    def log_lag_probs(self) -> Tensor:  # only steps after the first need them
        if self._log_lag_probs is None:
            self._log_lag_probs = torch.log(self.lag_probs)
        return self._log_lag_probs

    def predictive(self, weights: Tensor) -> Tensor:
        """``predictive(tokens, pi, weights)`` for weights ``[B, m]`` MD made (on the simplex)."""
        return _mix(weights, self.lagged_rows)


def _md_weights_of(terms: _LagTerms, etas: Tensor) -> Tensor:
    """``md_weights_by_step`` on a batch's :class:`_LagTerms` (``etas`` checked), ``[B, m]``."""
    log_weights = torch.log_softmax(etas[0] * terms.order * terms.responsibility_sum, dim=-1)
    for eta in etas[1:]:
        gradient = _log_gradient_terms(log_weights, terms.log_lag_probs)
        log_weights = torch.log_softmax(log_weights + eta * gradient, dim=-1)
    return log_weights.exp()


def prefix_md_weights(
    tokens: TokensLike, transition: Float[Tensor, "q q"], order: int, beta: float, steps: int = 1
) -> Float[Tensor, "batch n_scored m"]:
    """``steps``-step MD on every prefix ``y_1..y_t``, ``t = m+1..T``, with the construction's step
    ``eta_t = beta / (m (t - m))`` (paper-notes §4): ``[B, T-m, m]``, row ``t - m - 1`` = prefix ``t``.

    Row ``t - m - 1`` equals ``md_weights(tokens[:, :t], ..., eta=eta_t, steps)``. One step is
    ``softmax(beta * mean_{k<=t} gamma_k)``; later steps add ``eta_t * sum_{k<=t} P[k,g] / sum_h
    lambda_h(t) P[k,h]``, where every prefix has its own ``lambda(t)`` (``O(T^2 m)`` per sequence).
    """
    beta = check_positive(beta, "beta")
    steps = check_int(steps, "steps", 1)
    lag_probs = _checked_lag_likelihoods(tokens, transition, order)
    n_scored = lag_probs.shape[1]
    gamma = lag_probs / lag_probs.sum(dim=-1, keepdim=True)
    n_seen = torch.arange(1, n_scored + 1, dtype=torch.float64)  # t - m
    log_weights = torch.log_softmax(beta * prefix_mean_responsibility(gamma), dim=-1)  # [B, t, m]
    if steps == 1:
        return log_weights.exp()
    eta = beta / (order * n_seen)  # [t]
    # The gradient is unchanged by rescaling a position's row of P: rows scaled to max 1 keep the
    # mixture sum_h lambda_h(t) P[k,h] >= min_h lambda_h(t) > 0, so plain products are safe.
    scaled = lag_probs / lag_probs.amax(dim=-1, keepdim=True)  # [B, k, m]
    seen = (n_seen[None, :] <= n_seen[:, None]).to(torch.float64)  # seen[t, k]: k is in prefix t
    for _ in range(steps - 1):
        mixture = einops.einsum(log_weights.exp(), scaled, "b t h, b k h -> b t k")
        gradient = einops.einsum(seen / mixture, scaled, "b t k, b k g -> b t g")  # sum over k <= t
        log_weights = torch.log_softmax(log_weights + eta[None, :, None] * gradient, dim=-1)
    return log_weights.exp()


# ----------------------------------------------------------------------------------------------
# Causal multi-step MD: the estimator the multi-step construction computes
# ----------------------------------------------------------------------------------------------

# Names of the quantities causal_md_steps returns, step by step (also the construction's aliases).
STEP_MEAN_NAMES = {2: "second_step_mean", 3: "third_step_mean", 4: "fourth_step_mean", 5: "fifth_step_mean"}


def causal_md_scale_names(steps: int) -> list[str]:
    """The names of ``causal_md_weights``'s scales for ``steps`` steps: ``a, b2, c2, d2, .., bS, cS, dS``."""
    steps = check_int(steps, "steps", 1)
    return ["a", *(f"{letter}{s}" for s in range(2, steps + 1) for letter in "bcd")]


def check_causal_scales(scales) -> tuple[Tensor, int]:
    """``causal_md_weights``'s scales as a 1-D float64 tensor (autograd graph kept) and the number of steps
    they define; ``ValueError`` unless they are ``3 S - 2`` finite numbers."""
    if not isinstance(scales, Tensor):
        try:
            scales = torch.stack([torch.as_tensor(s, dtype=torch.float64) for s in scales])
        except (TypeError, RuntimeError, ValueError) as error:
            raise ValueError(f"scales must be a 1-D tensor or a sequence of numbers, got {scales!r}") from error
    if scales.ndim != 1 or scales.numel() % 3 != 1 or scales.numel() // 3 + 1 > max(STEP_MEAN_NAMES):
        raise ValueError(
            f"scales must be 1-D with 3 * steps - 2 entries (a, b2, c2, d2, ..), steps = 1..{max(STEP_MEAN_NAMES)}; "
            f"got shape {tuple(scales.shape)}"
        )
    if not torch.isfinite(scales.detach()).all():
        raise ValueError(f"scales must be finite, got {scales.detach().tolist()}")
    return scales.to(torch.float64), scales.numel() // 3 + 1


def causal_md_steps(
    tokens: TokensLike,
    transition: Float[Tensor, "q q"],
    order: int,
    scales,
    interventions: dict[str, Tensor] | None = None,
) -> dict[str, Float[Tensor, "batch m"]]:
    """Every intermediate quantity of :func:`causal_md_weights` at the last position, name -> ``[B, m]``.

    Keys: ``responsibility`` (``gamma_T``), ``mean_responsibility`` (``g0``), ``lambda1``, then for
    each later step ``s``: ``<ordinal>_step_mean`` (``h_{s-1}``, e.g. ``second_step_mean``) and
    ``lambda{s}``. Differentiable in ``scales``.

    ``interventions`` sets variables of this causal model by name (the high-level side of an
    interchange intervention, :mod:`mdlens.hooks.alignment`): every quantity computed after an
    intervened one is computed from the set value. ``responsibilities`` (``[B, T-m, m]``) replaces
    ``gamma_k`` at every position ``k`` at once; any key above (``[B, m]``) replaces that quantity at
    the last position (``responsibility``, ``gamma_T`` alone, feeds nothing later).
    """
    scales, steps = check_causal_scales(scales)
    interventions = _check_interventions(interventions, steps)
    gamma = interventions.get("responsibilities")
    if gamma is None:
        gamma = responsibilities(tokens, transition, order)  # [B, N, m], row k = m+1..T
    return _causal_md_steps_from(gamma, scales, steps, interventions)


def _causal_md_steps_from(
    gamma: Tensor, scales: Tensor, steps: int, interventions: dict[str, Tensor]
) -> dict[str, Tensor]:
    """:func:`causal_md_steps` from the responsibilities ``gamma`` ``[B, N, m]`` (arguments checked)."""

    def value(name: str, computed: Tensor) -> Tensor:
        return interventions.get(name, computed)

    mean = value("mean_responsibility", gamma.mean(dim=1))  # g0
    quantities = {"responsibility": value("responsibility", gamma[:, -1]), "mean_responsibility": mean}
    weights = value("lambda1", torch.softmax(scales[0] * mean, dim=-1))  # lambda1
    quantities["lambda1"] = weights
    step_terms = torch.zeros_like(mean)  # sum_{r<=s} c_r h_{r-1}, the lag scores the later steps add
    for step in range(2, steps + 1):
        lag_scale, step_scale, key_scale = scales[3 * step - 5 : 3 * step - 2]  # b_s, c_s, d_s
        # Position k is weighed by softmax_k(-d <lambda_{s-1}, gamma_k>): the first-order form of
        # 1 / sum_h lambda_h gamma_k(h), so the weighted mean of gamma_k follows the gradient.
        key_weights = torch.softmax(-key_scale * einops.einsum(weights, gamma, "b g, b k g -> b k"), dim=-1)
        step_mean = value(STEP_MEAN_NAMES[step], einops.einsum(key_weights, gamma, "b k, b k g -> b g"))  # h_{s-1}
        step_terms = step_terms + step_scale * step_mean
        weights = value(f"lambda{step}", torch.softmax(lag_scale * mean + step_terms, dim=-1))
        quantities[STEP_MEAN_NAMES[step]] = step_mean
        quantities[f"lambda{step}"] = weights
    return quantities


def causal_md_step_of(variable: str) -> int:
    """The step of causal MD that computes ``variable``: ``s`` for ``lambda{s}`` and for the step mean
    ``h_{s-1}`` (``STEP_MEAN_NAMES[s]``, e.g. ``second_step_mean`` -> 2); ``1`` for the responsibilities
    and their mean, which every step reads. ``ValueError`` for a name causal MD does not have."""
    if variable in ("responsibility", "responsibilities", "mean_responsibility"):
        return 1
    if isinstance(variable, str) and variable.startswith("lambda") and variable[len("lambda") :].isdigit():
        step = int(variable[len("lambda") :])
        if 1 <= step <= max(STEP_MEAN_NAMES):
            return step
    for step, name in STEP_MEAN_NAMES.items():
        if variable == name:
            return step
    raise ValueError(
        f"{variable!r} is no variable of causal MD (lambda1.., {', '.join(STEP_MEAN_NAMES.values())}, ...)"
    )


def causal_md_variables(steps: int) -> list[str]:
    """The variables of causal ``steps``-step MD, in computation order: ``responsibilities`` (every
    position), ``responsibility`` (the last), ``mean_responsibility``, ``lambda1``, then
    ``<ordinal>_step_mean`` and ``lambda{s}`` for ``s = 2..steps``."""
    steps = check_int(steps, "steps", 1)
    later = [name for step in range(2, steps + 1) for name in (STEP_MEAN_NAMES[step], f"lambda{step}")]
    return ["responsibilities", "responsibility", "mean_responsibility", "lambda1", *later]


def _check_interventions(interventions: dict[str, Tensor] | None, steps: int) -> dict[str, Tensor]:
    if interventions is None:
        return {}
    if not isinstance(interventions, dict):
        raise ValueError(f"interventions must be a dict name -> tensor, got {type(interventions).__name__}")
    known = causal_md_variables(steps)
    for name, values in interventions.items():
        if name not in known:
            raise ValueError(f"unknown variable {name!r} of {steps}-step causal MD; known: {', '.join(known)}")
        if not isinstance(values, Tensor) or not values.is_floating_point() or not torch.isfinite(values).all():
            raise ValueError(f"the intervened value of {name!r} must be a finite float tensor")
    return {name: values.to(torch.float64) for name, values in interventions.items()}


def causal_md_weights(
    tokens: TokensLike, transition: Float[Tensor, "q q"], order: int, scales
) -> Float[Tensor, "batch m"]:
    """Causal ``S``-step mirror descent: the lag weights the ``2S+1``-layer construction computes, ``[B, m]``.

    Exact ``S``-step MD needs, at every position ``k``, the lag likelihoods weighed by the *final*
    estimate, which a causal position ``k`` cannot see. This form moves that weighting to the last
    position, which attends over every earlier one (``k = m+1..T``, ``gamma_k`` its responsibilities,
    ``g0 = mean_k gamma_k``)::

        lambda_1 = softmax(a g0)
        h_{s-1}  = sum_k w_k gamma_k,    w = softmax_k(-d_s <lambda_{s-1}, gamma_k>)    s = 2..S
        lambda_s = softmax(b_s g0 + c_2 h_1 + .. + c_s h_{s-1})

    ``exp(-d <lambda, gamma_k>)`` is the first-order form of the gradient's weight
    ``1 / sum_h lambda_h gamma_k(h)``, so ``h`` points along the log-likelihood gradient at ``lambda``,
    and each step adds it to the lag scores. With ``S = 1`` this is one-step MD with
    ``eta = a / (m (T - m))``; with ``d_s = 0``, ``h = g0`` and every step stays one-step MD.

    Args:
        scales: ``(a, b2, c2, d2, .., bS, cS, dS)``, ``3 S - 2`` numbers (a 1-D tensor, which may require
            grad, or a sequence; :func:`causal_md_scale_names`), all finite.
    """
    scales, steps = check_causal_scales(scales)
    return causal_md_steps(tokens, transition, order, scales)[f"lambda{steps}"]


# L-BFGS of :func:`fit_scales_by_kl` minimises the mean KL over its value at the start (so that its
# tolerances are relative: a fit to a target MD nearly reaches has KLs of 1e-8 and less). It stops when
# a step changes that ratio by less than FIT_LOSS_TOLERANCE, or no gradient entry exceeds
# FIT_GRADIENT_TOLERANCE.
FIT_LOSS_TOLERANCE = 1e-12
FIT_GRADIENT_TOLERANCE = 1e-9


def fit_scales_by_kl(
    tokens: TokensLike,
    transition: Float[Tensor, "q q"],
    target_probs: Float[Tensor, "batch q"],
    weights_of: Callable[[Tensor], Tensor],
    starts: list,
    max_iter: int = 50,
) -> dict:
    """The scales with the lowest mean ``KL(target || predictive(weights_of(scales)))`` evaluated along
    quasi-Newton runs, one from each start (float64 vectors of one length): ``torch.optim.LBFGS`` with
    a strong-Wolfe line search, at most ``max_iter`` iterations per start (``FIT_LOSS_TOLERANCE``,
    ``FIT_GRADIENT_TOLERANCE``: it stops earlier once converged).

    ``weights_of`` maps a scale vector to lag weights ``[B, m]``, differentiably. The loss of every point
    evaluated counts (line-search trials too), so the result is never worse than the best start. These
    fits have two to ten scales and a smooth loss: L-BFGS converges in tens of evaluations where Adam
    needs hundreds (``mdlens bench --only fits`` prints both, side by side). Returns
    ``{"scales": [..], "tuning_kl": float}``.
    """
    target_probs = check_distribution(target_probs, "target_probs")
    max_iter = check_int(max_iter, "max_iter", 0)
    if not starts:
        raise ValueError("starts must hold at least one set of scales")
    predictive_of = _batch_predictive(tokens, transition)
    best = {"scales": None, "tuning_kl": float("inf")}

    def mean_kl(scales: Tensor) -> Tensor:
        loss = kl_divergence(target_probs, predictive_of(weights_of(scales))).mean()
        if loss.item() < best["tuning_kl"]:  # a NaN or inf trial never counts
            best.update(scales=scales.detach().tolist(), tuning_kl=loss.item())
        return loss

    for start in starts:
        scales = torch.as_tensor(start, dtype=torch.float64).detach().clone().requires_grad_(True)
        with torch.no_grad():
            start_kl = mean_kl(scales).item()  # the start counts too
        if max_iter == 0:
            continue
        # The KL relative to the start's is what L-BFGS minimises (relative tolerances).
        scale = start_kl if math.isfinite(start_kl) and start_kl > 0 else 1.0
        optimiser = torch.optim.LBFGS(
            [scales],
            max_iter=max_iter,
            tolerance_grad=FIT_GRADIENT_TOLERANCE,
            tolerance_change=FIT_LOSS_TOLERANCE,
            line_search_fn="strong_wolfe",
        )

        def closure(scales: Tensor = scales, optimiser: torch.optim.LBFGS = optimiser, scale: float = scale) -> Tensor:
            optimiser.zero_grad()
            relative = mean_kl(scales) / scale
            relative.backward()
            return relative

        optimiser.step(closure)
    return best


def _batch_predictive(tokens: TokensLike, transition: Tensor) -> Callable[[Tensor], Tensor]:
    """``weights -> predictive(tokens, transition, weights)`` for many weights of one batch: the lagged
    rows of ``pi`` are read once per order (the first call checks the weights as ``predictive`` does)."""
    lagged_rows: dict[int, Tensor] = {}

    def predictive_of(weights: Tensor) -> Tensor:
        order = weights.shape[-1]
        if order not in lagged_rows:
            predictive(tokens, transition, weights.detach())  # every check predictive makes, once
            checked, pi, order = _checked_inputs(tokens, transition, order)
            lagged_rows[order] = pi[last_tokens(checked, order)]
        return _mix(weights, lagged_rows[order])

    return predictive_of


def fit_causal_md_scales(
    tokens: TokensLike,
    transition: Float[Tensor, "q q"],
    order: int,
    target_probs: Float[Tensor, "batch q"],
    starts: list,
    max_iter: int = 50,
) -> dict:
    """Tuned causal MD: :func:`fit_scales_by_kl` of :func:`causal_md_weights` (every start has the same
    ``3 S - 2`` entries). Returns ``{"scales": [..], "tuning_kl": float}``."""
    tokens, transition, order = _checked_inputs(tokens, transition, order)
    starts = [check_causal_scales(start)[0] for start in starts]
    gamma = responsibilities(tokens, transition, order)  # read once: the scales do not change it

    def weights_of(scales: Tensor) -> Tensor:  # causal_md_weights(tokens, transition, order, scales)
        scales, steps = check_causal_scales(scales)
        return _causal_md_steps_from(gamma, scales, steps, {})[f"lambda{steps}"]

    return fit_scales_by_kl(tokens, transition, target_probs, weights_of, starts, max_iter)


def fit_md_step_sizes(
    tokens: TokensLike,
    transition: Float[Tensor, "q q"],
    order: int,
    target_probs: Float[Tensor, "batch q"],
    steps: int,
    max_iter: int = 50,
) -> dict:
    """The per-step sizes ``(eta_1, .., eta_S)`` of :func:`md_weights_by_step` whose predictive is closest
    to ``target_probs`` (least mean ``KL(target || MD)``), fitted in log space by :func:`fit_scales_by_kl`.

    Starts: :func:`default_md_step_size_starts`. With the true
    predictive as ``target_probs`` this is tuned MD with a schedule; with a model's predictions it
    reads off the steps the model behaves like. Returns ``{"etas": [..], "tuning_kl": float}``.
    """
    tokens, transition, order = _checked_inputs(tokens, transition, order)
    steps = check_int(steps, "steps", 1)
    terms = _LagTerms.of(tokens, transition, order)
    target_probs = _checked_target(target_probs, tokens, transition)
    starts = _md_step_size_starts(terms, target_probs, steps)
    fit = fit_scales_by_kl(
        tokens,
        transition,
        target_probs,
        # exp of a finite log step: >= 0 (0 where it underflows: no step, which _md_weights_of takes).
        lambda log_etas: _md_weights_of(terms, log_etas.exp()),
        starts,
        max_iter,
    )
    return {"etas": [math.exp(log_eta) for log_eta in fit["scales"]], "tuning_kl": fit["tuning_kl"]}


def default_md_step_size_starts(
    tokens: TokensLike,
    transition: Float[Tensor, "q q"],
    order: int,
    target_probs: Float[Tensor, "batch q"],
    steps: int,
) -> list[list[float]]:
    """Starting log step sizes for :func:`fit_md_step_sizes` with ``steps`` steps, from tuned MD on this
    batch: tuned ``S``-step MD's one ``eta`` for every step, and tuned one-step MD's ``eta`` for the first
    step with every later step ``100`` times smaller (almost one step)."""
    tokens, transition, order = _checked_inputs(tokens, transition, order)
    steps = check_int(steps, "steps", 1)
    terms = _LagTerms.of(tokens, transition, order)
    return _md_step_size_starts(terms, _checked_target(target_probs, tokens, transition), steps)


def _md_step_size_starts(terms: _LagTerms, target_probs: Tensor, steps: int) -> list[list[float]]:
    one_step = _tune_refined_on(terms, target_probs, steps=1)["eta"]
    tied = _tune_refined_on(terms, target_probs, steps=steps)["eta"] if steps > 1 else one_step
    return [[math.log(tied)] * steps, [math.log(one_step)] + [math.log(one_step / 100)] * (steps - 1)]


def default_causal_md_starts(
    tokens: TokensLike,
    transition: Float[Tensor, "q q"],
    order: int,
    target_probs: Float[Tensor, "batch q"],
    steps: int,
) -> list[list[float]]:
    """Starting scales for :func:`fit_causal_md_scales` with ``steps`` steps, from tuned MD on this batch.

    - tuned one-step MD: ``a = b_s = eta_1 m N`` (``N = T - m``), ``c_s = d_s = 0`` (every step repeats step 1);
    - tuned ``steps``-step MD at first order: ``a = b_s = eta m N``, ``c_s = eta m N``, ``d_s = m``
      (around ``<lambda, gamma_k> = 1/m``, ``1 / x`` and ``m exp(-m x) e`` agree to first order, and the
      gradient ``sum_k gamma_k / <lambda, gamma_k>`` is ``~ m N h``);
    - a large first step ``(40, 15, 0, 0, ..)`` and a balanced one ``(10, 10, 10, 5, ..)``.
    """
    tokens, transition, order = _checked_inputs(tokens, transition, order)
    steps = check_int(steps, "steps", 1)
    terms = _LagTerms.of(tokens, transition, order)
    target_probs = _checked_target(target_probs, tokens, transition)
    first = beta_from_eta(_tune_refined_on(terms, target_probs, steps=1)["eta"], order, tokens.shape[1])
    multi = beta_from_eta(_tune_refined_on(terms, target_probs, steps=steps)["eta"], order, tokens.shape[1])
    later = steps - 1
    return [
        [first, *[first, 0.0, 0.0] * later],
        [multi, *[multi, multi, float(order)] * later],
        [40.0, *[15.0, 0.0, 0.0] * later],
        [10.0, *[10.0, 10.0, 5.0] * later],
    ]


def mle_weights(
    tokens: TokensLike,
    transition: Float[Tensor, "q q"],
    order: int,
    tol: float = 1e-10,
    max_iter: int = 10_000,
) -> Float[Tensor, "batch m"]:
    """The maximum-likelihood ``lambda`` (``l`` is concave on the simplex), by EM from the centre.

    EM step: ``lambda_g <- (1/N) sum_k lambda_g P[k,g] / sum_h lambda_h P[k,h]``, the mean
    responsibility under the current ``lambda``; it stops when no weight moves by more than
    ``tol``. Warns if ``max_iter`` is reached first. Returns ``[B, m]``.
    """
    tol = check_positive(tol, "tol")
    max_iter = check_int(max_iter, "max_iter", 1)
    lag_probs = _checked_lag_likelihoods(tokens, transition, order)
    n_scored = lag_probs.shape[1]
    # EM is invariant to scaling each position's row of P; scaling by the row max keeps the
    # mixture sum_h lambda_h P[k,h] >= min_h lambda_h, far from underflow.
    scaled = lag_probs / lag_probs.amax(dim=-1, keepdim=True)
    weights = torch.full((lag_probs.shape[0], order), 1.0 / order, dtype=torch.float64)
    # Sequences stop one by one: near a face of the simplex EM converges slowly, and only the
    # few sequences whose maximiser lies there should keep paying for iterations.
    active = torch.arange(lag_probs.shape[0])
    for _ in range(max_iter):
        current, rows = weights[active], scaled[active]
        mixture = einops.einsum(rows, current, "b k g, b g -> b k")
        new_weights = current * einops.einsum(rows, 1.0 / mixture, "b k g, b k -> b g") / n_scored
        new_weights = new_weights / new_weights.sum(dim=-1, keepdim=True)  # rounding only
        converged = (new_weights - current).abs().amax(dim=-1) < tol
        weights[active] = new_weights
        active = active[~converged]
        if active.numel() == 0:
            return weights
    warnings.warn(
        f"mle_weights: EM did not reach tol={tol} in {max_iter} iterations for {active.numel()} "
        f"sequence(s) (their maximiser is on or near a face of the simplex)",
        stacklevel=2,
    )
    return weights


# ----------------------------------------------------------------------------------------------
# Predictions and their scores
# ----------------------------------------------------------------------------------------------


def predictive(
    tokens: TokensLike,
    transition: Float[Tensor, "q q"],
    weights: Float[Tensor, "batch m"] | Float[Tensor, " m"],
) -> Float[Tensor, "batch q"]:
    """``p(v) = sum_g w_g pi(y_{T+1-g}, v)``: the next-token distribution under weights ``w``.

    The order ``m`` is read off ``weights`` (``[B, m]`` or ``[m]``, shared by the batch); only the
    last ``m`` tokens matter. Returns float64 ``[B, q]``.
    """
    transition = check_transition(transition)
    if not isinstance(weights, Tensor) or weights.ndim not in (1, 2):
        raise ValueError("weights must be a [B, m] or [m] tensor")
    order = check_order(weights.shape[-1])
    tokens = check_tokens(tokens, transition.shape[0], order)
    weights = check_weights(weights, order, tokens.shape[0])
    lagged = transition[last_tokens(tokens, order)]  # [B, m, q]: row g-1 is pi(y_{T+1-g}, .)
    return _mix(weights, lagged)


def _mix(weights: Tensor, lagged_rows: Tensor) -> Tensor:
    """``sum_g w_g pi(y_{T+1-g}, .)``: weights ``[B, m]`` (or ``[1, m]``, shared) over the lagged rows
    ``[B, m, q]`` of ``pi``, ``[B, q]``; the one place every predictive mixes them."""
    return einops.einsum(weights.expand(lagged_rows.shape[0], -1), lagged_rows, "b g, b g v -> b v")


def kl_divergence(p: Float[Tensor, "batch q"], q: Float[Tensor, "batch q"]) -> Float[Tensor, " batch"]:
    """``KL(p || q) = sum_v p_v log(p_v / q_v)`` per row, with ``0 log 0 = 0`` and ``+inf`` where
    ``q_v = 0 < p_v``. Inputs ``[B, V]`` or ``[V]`` (a single row broadcasts); returns ``[B]``."""
    p = check_distribution(p, "p")
    q = check_distribution(q, "q")
    if p.shape[1] != q.shape[1] or (p.shape[0] != q.shape[0] and 1 not in (p.shape[0], q.shape[0])):
        raise ValueError(f"p and q have incompatible shapes {tuple(p.shape)} and {tuple(q.shape)}")
    kl = (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(dim=-1)
    return kl.clamp_min(0.0)  # KL >= 0; rounding can leave -1e-17


def default_eta_grid() -> Float[Tensor, " n"]:
    """60 log-spaced step sizes from 1e-4 to 10: wide enough for T from m+1 to ~1000 (eta ~ c/T)."""
    return torch.logspace(-4, 1, 60, dtype=torch.float64)


def tune_eta(
    tokens: TokensLike,
    transition: Float[Tensor, "q q"],
    order: int,
    target_probs: Float[Tensor, "batch q"],
    etas: Float[Tensor, " n"] | None = None,
    steps: int = 1,
) -> tuple[float, Float[Tensor, " n"], Float[Tensor, " n"]]:
    """Grid search of the MD step size: the ``eta`` minimising the batch-mean
    ``KL(target || predictive(md_weights(eta, steps)))``.

    Returns ``(best_eta, etas [n], mean_kl [n])``. The default grid is ``default_eta_grid()``.
    """
    tokens, transition, order = _checked_inputs(tokens, transition, order)
    target_probs = _checked_target(target_probs, tokens, transition)
    steps = check_int(steps, "steps", 1)
    etas = default_eta_grid() if etas is None else _check_etas(etas)
    mean_kl = _mean_kl_on_grid(_LagTerms.of(tokens, transition, order), target_probs, etas, steps)
    best = int(torch.argmin(mean_kl))
    return float(etas[best]), etas, mean_kl


def _checked_target(target_probs: Tensor, tokens: Tensor, transition: Tensor) -> Tensor:
    target_probs = check_distribution(target_probs, "target_probs")
    if target_probs.shape != (tokens.shape[0], transition.shape[0]):
        raise ValueError(
            f"target_probs must have shape [B={tokens.shape[0]}, q={transition.shape[0]}], "
            f"got {tuple(target_probs.shape)}"
        )
    return target_probs


def _mean_kl_on_grid(terms: _LagTerms, target_probs: Tensor, etas: Tensor, steps: int) -> Tensor:
    """Batch-mean ``KL(target || MD(eta, steps))`` for every ``eta`` of the grid, ``[n]``."""
    mean_kl = torch.empty(len(etas), dtype=torch.float64)
    for i, eta in enumerate(etas.tolist()):
        weights = _md_weights_of(terms, torch.full((steps,), check_positive(eta, "eta"), dtype=torch.float64))
        mean_kl[i] = kl_divergence(target_probs, terms.predictive(weights)).mean()
    return mean_kl


# The refined tuning grid: a coarse log grid of step sizes (low, high, points), then FINE_POINTS
# log-spaced points spanning one coarse step either side of the coarse optimum.
COARSE_ETAS = (1e-4, 10.0, 61)
FINE_POINTS = 21


def tune_eta_refined(
    tokens: TokensLike,
    transition: Float[Tensor, "q q"],
    order: int,
    target_probs: Float[Tensor, "batch q"],
    steps: int = 1,
) -> dict:
    """ "Tuned MD" as every analysis means it: a two-stage grid search of the step size.

    A coarse log grid ``COARSE_ETAS`` (plus Theorem 1's ``1/(m+1)``), then ``FINE_POINTS`` points
    spanning one coarse step either side of the coarse optimum. ``target_probs`` is usually the true
    predictive; a model's own predictions give the step that model behaves like. Returns
    ``{"eta", "tuning_kl", "etas", "mean_kl"}`` (the last two over both grids).
    """
    tokens, transition, order = _checked_inputs(tokens, transition, order)
    target_probs = _checked_target(target_probs, tokens, transition)
    steps = check_int(steps, "steps", 1)
    return _tune_refined_on(_LagTerms.of(tokens, transition, order), target_probs, steps)


def _tune_refined_on(terms: _LagTerms, target_probs: Tensor, steps: int) -> dict:
    """:func:`tune_eta_refined` on a batch's :class:`_LagTerms` (``target_probs`` checked)."""
    low, high, points = COARSE_ETAS
    coarse = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64)
    coarse = torch.sort(torch.cat([coarse, torch.tensor([1.0 / (terms.order + 1)], dtype=torch.float64)])).values
    coarse_kl = _mean_kl_on_grid(terms, target_probs, coarse, steps)
    ratio = (high / low) ** (1.0 / (points - 1))
    centre = coarse[int(torch.argmin(coarse_kl))].item()
    fine = torch.logspace(math.log10(centre / ratio), math.log10(centre * ratio), FINE_POINTS, dtype=torch.float64)
    fine_kl = _mean_kl_on_grid(terms, target_probs, fine, steps)
    etas = torch.cat([coarse, fine])
    mean_kl = torch.cat([coarse_kl, fine_kl])
    best = int(torch.argmin(mean_kl))
    return {"eta": etas[best].item(), "tuning_kl": mean_kl[best].item(), "etas": etas, "mean_kl": mean_kl}


def _check_etas(etas) -> Tensor:
    """A grid of step sizes (a tensor or a sequence of numbers, any shape) as a flat float64 tensor."""
    grid = torch.as_tensor(etas, dtype=torch.float64) if not isinstance(etas, Tensor) else etas
    return check_positive_entries(grid.to(torch.float64).flatten(), "etas")


# ----------------------------------------------------------------------------------------------
# Bayes: the posterior mean of lambda under a Dirichlet(alpha) prior
# ----------------------------------------------------------------------------------------------


def bayes_weights(
    tokens: TokensLike,
    transition: Float[Tensor, "q q"],
    order: int,
    alpha: float = 1.0,
    method: str = "exact",
    num_samples: int = 2000,
    burn_in: int = 200,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> Float[Tensor, "batch m"]:
    """``E[lambda | y_1..y_T]`` under the prior ``Dirichlet(alpha 1_m)``, ``[B, m]``.

    ``method="exact"``: dynamic programming over lag-count vectors (exact up to rounding). Its cost
    is :func:`exact_bayes_work` per sequence, cubic in ``T`` for ``m = 3``; above ``MAX_EXACT_WORK``
    it refuses. ``progress``: a progress bar for the exact method (``None``: only for a job of more
    than ``PROGRESS_MIN_WORK`` cell updates, a few seconds or more). ``method="gibbs"``: data
    augmentation with ``num_samples`` Rao-Blackwellised sweeps after ``burn_in``, drawing from
    ``generator`` (``None``: a generator seeded with 0, so results are reproducible).
    """
    alpha = check_positive(alpha, "alpha")
    if method not in ("exact", "gibbs"):
        raise ValueError(f'method must be "exact" or "gibbs", got {method!r}')
    progress = _check_progress(progress)
    lag_probs = _checked_lag_likelihoods(tokens, transition, order)
    if method == "exact":
        return _exact_posterior_mean(lag_probs, alpha, remedy='use method="gibbs"', progress=progress)
    num_samples = check_int(num_samples, "num_samples", 1)
    check_int(burn_in, "burn_in", 0)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    elif not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return _gibbs_posterior_mean(lag_probs, alpha, num_samples, burn_in, generator)


def prefix_bayes_weights(
    tokens: TokensLike,
    transition: Float[Tensor, "q q"],
    order: int,
    alpha: float = 1.0,
    progress: bool | None = None,
) -> Float[Tensor, "batch n_scored m"]:
    """Exact ``E[lambda | y_1..y_t]`` for every prefix ``t = m+1..T``: ``[B, T-m, m]``, row ``t - m - 1``.

    The dynamic programme of ``bayes_weights(method="exact")`` passes every prefix on its way, so
    all ``T - m`` posterior means come out of one pass (row ``t - m - 1`` equals
    ``bayes_weights(tokens[:, :t], ...)``), at the same cost and under the same cap; ``progress`` as
    there.
    """
    alpha = check_positive(alpha, "alpha")
    progress = _check_progress(progress)
    lag_probs = _checked_lag_likelihoods(tokens, transition, order)
    remedy = 'for the prefixes you need, use bayes_weights(tokens[:, :t], ..., method="gibbs")'
    return _exact_posterior_mean(lag_probs, alpha, every_prefix=True, remedy=remedy, progress=progress)


def exact_bayes_work(seq_len: int, order: int) -> int:
    """Table-cell updates exact Bayes makes for one sequence of ``seq_len`` tokens and order ``m``:
    ``sum_{k=1..N} (k+1)^(m-1)`` with ``N = T - m`` (count vectors reachable after each position,
    summed over the positions), about ``(N+1)^m / m``."""
    seq_len, order = check_int(seq_len, "seq_len", 1), check_order(order)
    if order == 1:
        return 0  # one lag: the posterior mean is 1, no table
    return sum((k + 1) ** (order - 1) for k in range(1, max(seq_len - order, 0) + 1))


def _exact_bayes_fits(seq_len: int, order: int) -> bool:
    cells = (max(seq_len - order, 0) + 1) ** (order - 1)
    return cells <= MAX_EXACT_CELLS and exact_bayes_work(seq_len, order) <= MAX_EXACT_WORK


def longest_exact_bayes(order: int) -> int:
    """The longest ``T`` exact Bayes accepts for order ``m >= 2`` (``MAX_EXACT_WORK`` and
    ``MAX_EXACT_CELLS`` per sequence)."""
    order = check_order(order)
    if order == 1:
        raise ValueError("with one lag (m=1) exact Bayes needs no table and has no length limit")
    low, high = order + 1, order + 2
    while _exact_bayes_fits(high, order):
        low, high = high, 2 * high
    while high - low > 1:  # the cost grows with T: bisect for the last T within both caps
        middle = (low + high) // 2
        low, high = (middle, high) if _exact_bayes_fits(middle, order) else (low, middle)
    return low


def check_exact_bayes_size(seq_len: int, order: int, remedy: str = BAYES_REMEDY) -> None:
    """``ValueError`` when exact Bayes on sequences of ``seq_len`` tokens would pass ``MAX_EXACT_WORK``
    cell updates or ``MAX_EXACT_CELLS`` table cells per sequence; the message ends with ``remedy``,
    which says what the caller can pass instead (each caller names an argument it has)."""
    order = check_order(order)
    if order == 1 or _exact_bayes_fits(seq_len, order):
        return
    cells = (seq_len - order + 1) ** (order - 1)
    raise ValueError(
        f"exact Bayes at T={seq_len}, m={order} needs {exact_bayes_work(seq_len, order):.3g} table-cell updates "
        f"per sequence (about (T-m+1)^m / m; MAX_EXACT_WORK = {MAX_EXACT_WORK:.3g}) in a table of {cells:.3g} "
        f"cells (MAX_EXACT_CELLS = {MAX_EXACT_CELLS:.3g}): too long, the longest T it takes for m={order} is "
        f"{longest_exact_bayes(order)}; {remedy}"
    )


def _check_progress(progress) -> bool | None:
    if progress is not None and not isinstance(progress, bool):
        raise ValueError(f"progress must be True, False or None (a bar only for long jobs), got {progress!r}")
    return progress


def _exact_posterior_mean(
    lag_probs: Tensor,
    alpha: float,
    every_prefix: bool = False,
    remedy: str = BAYES_REMEDY,
    progress: bool | None = None,
) -> Tensor:
    """Exact posterior mean by dynamic programming over lag-count vectors.

    Expanding ``prod_k sum_g lambda_g P[k,g]`` gives ``sum_n W(n) prod_g lambda_g^{n_g}`` with
    ``W(n)`` the sum over lag assignments with counts ``n`` of ``prod_k P[k, z_k]``. Each term is
    conjugate, so the posterior is the mixture of ``Dirichlet(alpha + n)`` with weights
    ``W(n) B(alpha + n) / B(alpha)``, and its mean is ``sum_n w(n) (alpha + n) / (m alpha + N)``.

    The table holds those mixture weights up to a per-sequence constant:
    ``U_k(n) = W_k(n) B(alpha + n) / (B(alpha) * rising(m alpha, k))`` (``rising(x, k) = x (x+1) ..
    (x+k-1)``). As ``B(alpha + n) / B(alpha) = prod_g rising(alpha, n_g) / rising(m alpha, k)``, the
    recursion ``W_k(n) = sum_g W_{k-1}(n - e_g) P[k,g]`` becomes

        U_k(n) = sum_g U_{k-1}(n - e_g) P[k,g] (alpha + n_g - 1) / (m alpha + k - 1),

    the Polya-urn form of the Dirichlet prior: no combinatorial factor (``W`` alone spans ``m^N``),
    and after step ``k`` the table is the posterior over counts of the first ``k`` positions. Each
    position's ``P`` is divided by its max and ``U`` by its max every few steps (per-sequence
    constants, which cancel in the normalised posterior).

    The table is dense over ``(n_1..n_{m-1})`` (``n_m = k - sum`` implied); at step ``k`` only
    counts ``<= k`` are touched, and shifting by ``e_g`` is a slice.

    ``every_prefix``: since the table after step ``k`` is the posterior of the first ``k`` scored
    positions, one pass gives the mean of every prefix: ``[B, N, m]`` (row ``k - 1`` = the first
    ``k`` scored positions) instead of ``[B, m]``.

    ``remedy`` ends the error above ``MAX_EXACT_WORK``; ``progress`` as in :func:`bayes_weights`.
    """
    batch_size, n_scored, m = lag_probs.shape
    if m == 1:
        shape = (batch_size, n_scored, 1) if every_prefix else (batch_size, 1)
        return torch.ones(shape, dtype=torch.float64)
    check_exact_bayes_size(n_scored + m, m, remedy)
    side = n_scored + 1
    cells = side ** (m - 1)
    total_work = batch_size * exact_bayes_work(n_scored + m, m)
    show = total_work > PROGRESS_MIN_WORK if progress is None else progress
    bar = tqdm(total=total_work, disable=not show, desc="exact Bayes", unit="cell", unit_scale=True)
    # count_grids[g][n_1, .., n_{m-1}] = n_{g+1} for g < m-1; free_total = n_1 + .. + n_{m-1}.
    axis = torch.arange(side, dtype=torch.float64)
    count_grids = torch.meshgrid(*([axis] * (m - 1)), indexing="ij")
    free_total = sum(count_grids)

    scaled = lag_probs / lag_probs.amax(dim=-1, keepdim=True)  # max_g = 1 at every position
    chunk = max(1, _EXACT_CHUNK_CELLS // cells)
    means = [
        _chunk_posterior_mean(scaled[start : start + chunk], count_grids, free_total, alpha, every_prefix, bar)
        for start in range(0, batch_size, chunk)
    ]
    bar.close()
    return torch.cat(means)


def _chunk_posterior_mean(
    scaled: Tensor, count_grids, free_total: Tensor, alpha: float, every_prefix: bool, bar
) -> Tensor:
    """:func:`_exact_posterior_mean` of one chunk of sequences: ``[b, m]``, or ``[b, N, m]`` for every prefix."""
    n_scored, m = scaled.shape[1], scaled.shape[2]
    if not every_prefix:
        return _mixture_mean(_count_table(scaled, count_grids, free_total, alpha, bar=bar), n_scored, alpha)
    prefix_means = torch.empty(scaled.shape[0], n_scored, m, dtype=torch.float64)

    def record(k: int, table: Tensor) -> None:
        prefix_means[:, k - 1] = _mixture_mean(table, k, alpha)

    _count_table(scaled, count_grids, free_total, alpha, on_step=record, bar=bar)
    return prefix_means


def _mixture_mean(table: Tensor, n_scored: int, alpha: float) -> Tensor:
    """``sum_n U(n) (alpha + n) / (m alpha + N) / sum_n U(n)`` over a table of free counts, ``[b, m]``.

    ``table[b, n_1, .., n_{m-1}]`` starts at counts 0; ``U`` is zero wherever the counts are
    unreachable (``n_1 + .. + n_{m-1} > N``), so only the free counts need weighing, each through
    its marginal; the mean count of lag ``m`` is ``N`` minus the others'.
    """
    m = table.ndim
    axes = [f"n{i}" for i in range(m - 1)]
    mean_counts = []
    for axis in axes:
        marginal = einops.reduce(table, f"b {' '.join(axes)} -> b {axis}", "sum")  # [b, side]
        counts = torch.arange(marginal.shape[1], dtype=torch.float64)
        mean_counts.append(marginal @ counts / marginal.sum(dim=-1))
    mean_counts.append(n_scored - sum(mean_counts))  # E[n_m]
    return (alpha + torch.stack(mean_counts, dim=-1)) / (m * alpha + n_scored)  # E[(alpha + n) / (m alpha + N)]


def _count_table(
    scaled: Tensor, count_grids: tuple[Tensor, ...], free_total: Tensor, alpha: float, on_step=None, bar=None
) -> Tensor:
    """``U_N(n)`` (module docstring of :func:`_exact_posterior_mean`) for a chunk of sequences, up to
    a per-sequence constant, ``[b, side, .., side]``.

    Step ``k``: ``U_k(n) = (alpha + n_m - 1) P[k,m] U_{k-1}(n) + sum_{g<m} (alpha + n_g - 1) P[k,g]
    U_{k-1}(n - e_g)`` (the common factor ``1 / (m alpha + k - 1)`` is dropped, with ``1 / k`` put in
    its place to keep the scale). The factor of a free lag is an outer product of a per-sequence
    scalar and the counts along axis ``g``, so each free lag costs one fused multiply-add.
    ``on_step(k, U_k[region])``, when given, sees the reachable part of the table after every step;
    ``bar`` (a tqdm bar), when given, advances by the cells each step updates.
    """
    batch_size, n_scored, m = scaled.shape
    shape = (batch_size, *free_total.shape)
    table = torch.zeros(shape, dtype=torch.float64)
    table[(slice(None),) + (0,) * (m - 1)] = 1.0  # U_0 = 1 at n = 0
    spare = torch.zeros(shape, dtype=torch.float64)
    per_sequence = (slice(None),) + (None,) * (m - 1)  # [b] -> [b, 1, .., 1]
    counts = count_grids[0].new_tensor(range(free_total.shape[0]))  # 0..N along one axis

    def axes_except(g: int) -> list[str]:  # einops pattern "1 .. n .. 1": counts on axis g+1
        return ["1"] + ["n" if i == g else "1" for i in range(m - 1)]

    for k in range(1, n_scored + 1):
        region = (slice(None),) + (slice(0, k + 1),) * (m - 1)  # counts reachable after k positions
        old, new = table[region], spare[region]
        p = scaled[:, k - 1, :] / k  # [b, m]
        # lag m: n_m = k - (n_1 + .. + n_{m-1}) is implied, the free counts stay put. Where the
        # new n_m would be 0 the source is unreachable (zero), so the factor there does not matter.
        torch.mul(old, (k - free_total + alpha - 1)[region[1:]], out=new)
        new.mul_(p[:, m - 1][per_sequence])
        # lag g < m: from n - e_g, weighted by alpha + n_g - 1 (only n_g >= 1 receives).
        for g in range(m - 1):
            dst, src = list(region), list(region)
            dst[g + 1], src[g + 1] = slice(1, k + 1), slice(0, k)
            counts_g = einops.rearrange(counts[1 : k + 1] + (alpha - 1), f"n -> {' '.join(axes_except(g))}")
            weight = p[:, g][per_sequence] * counts_g  # [b, 1, .., k, .., 1]
            spare[tuple(dst)].addcmul_(table[tuple(src)], weight)
        table, spare = spare, table
        if k % 16 == 0 or k == n_scored:
            # Rescale each sequence by its peak: a per-sequence constant, which cancels in the
            # normalised posterior, and it keeps the table far from underflow.
            peak = einops.reduce(table[region], "b ... -> b", "max")
            table[region] /= peak[per_sequence]
        if on_step is not None:
            on_step(k, table[region])
        if bar is not None:
            bar.update(batch_size * (k + 1) ** (m - 1))
    return table


def _gibbs_posterior_mean(
    lag_probs: Tensor, alpha: float, num_samples: int, burn_in: int, generator: torch.Generator
) -> Tensor:
    """Gibbs sampling with data augmentation, Rao-Blackwellised.

    Alternates ``z_k | lambda ~ Cat(lambda_g P[k,g] / sum_h lambda_h P[k,h])`` and
    ``lambda | z ~ Dirichlet(alpha + n(z))``, starting at the centre, and averages the conditional
    means ``E[lambda | z] = (alpha + n) / (m alpha + N)`` over the ``num_samples`` sweeps after
    ``burn_in``. Every sequence of the batch runs its own chain, all at once.
    """
    batch_size, n_scored, m = lag_probs.shape
    log_weights = torch.full((batch_size, m), -math.log(m), dtype=torch.float64)
    total = torch.zeros(batch_size, m, dtype=torch.float64)
    for sweep in range(burn_in + num_samples):
        # z_k by inverse CDF on the unnormalised lag posterior lambda_g P[k,g], with lambda divided by
        # its largest weight (a per-sequence constant: the largest is 1, so no row of the CDF is 0).
        relative_weights = torch.exp(log_weights - log_weights.amax(dim=-1, keepdim=True))
        cdf = (lag_probs * relative_weights.unsqueeze(1)).cumsum(dim=-1)  # [B, N, m]
        u = torch.rand(batch_size, n_scored, 1, generator=generator, dtype=torch.float64) * cdf[..., -1:]
        # z_k > g  iff  u_k >= cdf[k, g]: so the counts come from m - 1 comparisons per position,
        # #(z > g) summed over k (the last lag takes every u up to the total, rounding included).
        beyond = (u >= cdf[..., : m - 1]).sum(dim=1, dtype=torch.float64)  # [B, m-1]: #(z > g)
        counts = -torch.diff(
            beyond, dim=-1, prepend=beyond.new_full((batch_size, 1), n_scored), append=beyond.new_zeros(batch_size, 1)
        )
        if sweep >= burn_in:
            total += (alpha + counts) / (m * alpha + n_scored)
        # lambda ~ Dirichlet(alpha + n) as normalised Gammas, kept in log space (a component
        # whose Gamma draw underflows keeps a finite log weight instead of log 0).
        log_gammas = log_gamma_sample(alpha + counts, generator)
        log_weights = log_gammas - torch.logsumexp(log_gammas, dim=-1, keepdim=True)
    return total / num_samples
