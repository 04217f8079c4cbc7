"""What a model *does* with its input, compared with the algorithm without looking inside it.

Two readings from the in-context-learning literature, as functions of any ``HookedTransformer``:

- **Sensitivity** (von Oswald et al. 2023): the Jacobian of the next-token distribution with respect
  to the one-hot inputs, ``d p(v) / d onehot(y_t)[u]``, taken through a forward hook on ``hook_embed``,
  and compared between a model and a reference (e.g. the construction).
- **Implicit weights** (Akyürek et al. 2023): the ``lambda`` on the simplex whose MTD predictive
  ``sum_g lambda_g pi(y_{T+1-g}, .)`` is closest to the model's next-token distribution. If a model
  runs an estimator of ``lambda`` and predicts with it, this reads the estimate back out.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mdlens import estimators as E
from mdlens.hooks._checks import check_model_tokens, check_same_task_models, model_device
from mdlens.predict import output_to_probs, output_type_of, predict_next
from mdlens.validation import (
    check_distribution,
    check_int,
    check_order,
    check_positive,
    check_tokens,
    check_transition,
    check_weights,
)

# Default stopping rule of the implicit-weight solver: the certified gap to the minimum KL.
IMPLICIT_TOL = 1e-13
# EM sweeps before the sequences EM has not certified are finished by active-set Newton steps.
IMPLICIT_MAX_ITER = 1_000
NEWTON_MAX_STEPS = 100


# ----------------------------------------------------------------------------------------------
# Sensitivity: d p(next) / d one-hot inputs
# ----------------------------------------------------------------------------------------------


def input_jacobian(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    batch_size: int = 64,
) -> tuple[Float[Tensor, "batch q_out pos q_in"], Float[Tensor, "batch q_out"]]:
    """``J[b, v, t, u] = d p_b(v) / d x_b[t, u]``, the next-token distribution's Jacobian with respect to
    the one-hot inputs ``x[t] = onehot(y_t)``, and ``p`` itself; both float64 on the CPU.

    ``p`` is the last position's distribution read as :func:`mdlens.predict.predict_next` does
    (``output_to_probs``, differentiable). The token embedding is ``x @ W_E``, so with ``e`` the output of
    ``hook_embed``, ``d p / d x[t, u] = sum_d (d p / d e[t, d]) W_E[u, d]``. A forward hook replaces
    ``e`` by ``e + delta`` with ``delta = 0`` requiring grad (``W_E`` itself may be frozen), and one
    backward pass per output token ``v`` gives ``d p(v) / d delta`` for the whole batch at once
    (sequences do not interact). Runs ``batch_size`` sequences at a time.
    """
    tokens = check_model_tokens(model, tokens)
    batch_size = check_int(batch_size, "batch_size", 1)
    output_type = output_type_of(model)
    device, vocab_size = model_device(model), model.cfg.d_vocab
    embedding = model.W_E.detach().to(torch.float64).cpu()  # [q_in, d_model]
    jacobians, next_probs = [], []
    for chunk in tokens.split(batch_size):
        delta = torch.zeros(*chunk.shape, model.cfg.d_model, dtype=model.cfg.dtype, device=device, requires_grad=True)

        def shift_embedding(embed: Tensor, hook, delta: Tensor = delta) -> Tensor:
            return embed + delta

        with torch.enable_grad():
            output = model.run_with_hooks(chunk.to(device), fwd_hooks=[("hook_embed", shift_embedding)])
            probs = output_to_probs(output[:, -1, :], output_type)  # [b, q_out], float64
            grad_rows = [
                torch.autograd.grad(probs[:, v].sum(), delta, retain_graph=v < vocab_size - 1)[0]
                for v in range(vocab_size)
            ]
        grad_embed = torch.stack(grad_rows, dim=1).to(torch.float64).cpu()  # [b, q_out, pos, d_model]
        jacobians.append(einops.einsum(grad_embed, embedding, "b v t d, u d -> b v t u"))
        next_probs.append(probs.detach().cpu())
    return torch.cat(jacobians), torch.cat(next_probs)


def sensitivity_alignment(
    model: HookedTransformer,
    reference: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    batch_size: int = 64,
) -> dict[str, float | Tensor]:
    """How alike two models react to their inputs, on the same ``tokens`` (von Oswald et al.).

    With ``J`` the ``[q, T, q]`` input Jacobian of :func:`input_jacobian` of each sequence, flattened:

    - ``cosine``: mean over sequences of ``<J_model, J_reference> / (|J_model| |J_reference|)``;
    - ``relative_gap``: mean of ``|J_model - J_reference| / |J_reference|``;
    - ``prediction_kl``: mean of ``KL(p_reference || p_model)`` of the next-token distributions;
    - ``per_sequence``: the three as float64 ``[B]`` tensors.

    Raises ``ValueError`` for models of different vocabularies, or tokens either model cannot read.
    """
    check_same_task_models(model, reference)
    tokens = check_model_tokens(model, tokens)
    check_model_tokens(reference, tokens)
    model_jacobian, model_probs = input_jacobian(model, tokens, batch_size)
    reference_jacobian, reference_probs = input_jacobian(reference, tokens, batch_size)
    ours = einops.rearrange(model_jacobian, "b v t u -> b (v t u)")
    theirs = einops.rearrange(reference_jacobian, "b v t u -> b (v t u)")
    cosine = (ours * theirs).sum(dim=-1) / (ours.norm(dim=-1) * theirs.norm(dim=-1))
    relative_gap = (ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)
    prediction_kl = E.kl_divergence(reference_probs, model_probs)
    return {
        "cosine": float(cosine.mean()),
        "relative_gap": float(relative_gap.mean()),
        "prediction_kl": float(prediction_kl.mean()),
        "per_sequence": {"cosine": cosine, "relative_gap": relative_gap, "prediction_kl": prediction_kl},
    }


# ----------------------------------------------------------------------------------------------
# Implicit weights: the lambda a model predicts with
# ----------------------------------------------------------------------------------------------


class ImplicitWeights(NamedTuple):
    """The closest MTD mixture weights to a model's prediction, and how close it gets."""

    weights: Float[Tensor, "batch m"]  # argmin over the simplex of KL(p_model || predictive(lambda))
    residual_kl: Float[Tensor, " batch"]  # that minimum: what no lambda can explain


def _lagged_rows(tokens: Tensor, transition: Tensor, order: int) -> Float[Tensor, "batch m q"]:
    """``A[b, g-1, v] = pi(y_{T+1-g}, v)``: the next-token distribution each lag ``g`` would give."""
    return transition[E.last_tokens(tokens, order)]


def closest_mtd_weights(
    target_probs: Float[Tensor, "batch q"],
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    transition: Float[Tensor, "q q"],
    order: int,
    tol: float = IMPLICIT_TOL,
    max_iter: int = IMPLICIT_MAX_ITER,
) -> ImplicitWeights:
    """``argmin_{lambda in simplex} KL(p || sum_g lambda_g pi(y_{T+1-g}, .))`` per sequence, and its value.

    The objective is ``const - sum_v p_v log (A^T lambda)_v`` with ``A[g, v] = pi(y_{T+1-g}, v)``: the
    negative log-likelihood of mixture proportions with soft counts ``p``, convex in ``lambda``. It is
    minimised by EM, the multiplicative update ``lambda_g <- lambda_g G_g`` with
    ``G_g = sum_v p_v A[g, v] / (A^T lambda)_v`` (so ``sum_g lambda_g G_g = 1``), from the centre
    ``1/m``. Concavity of the log gives the certificate ``KL(lambda) - min KL <= max_g G_g - 1``;
    a sequence stops when that gap is below ``tol``. Where the minimiser lies on or near a face of
    the simplex EM only creeps towards it (a weight that should be 0 shrinks by a factor ``G_g``
    close to 1 per sweep), so sequences not certified after ``max_iter`` sweeps are finished by
    active-set Newton steps on the face they are on (:func:`_newton_finish`), which reach the same
    certificate in a few steps; a warning names any sequence that still does not.

    Lags whose parent tokens coincide (``y_{T+1-g} = y_{T+1-h}``) give identical rows of ``A``: only
    their sum is determined, and EM from the centre splits it evenly between them.

    Raises ``ValueError`` for invalid inputs, or when a sequence puts probability on a token that no
    lag can produce (the KL is infinite for every ``lambda``).
    """
    target_probs, components, tol, max_iter = _checked_mixture_problem(
        target_probs, tokens, transition, order, tol, max_iter
    )
    weights, active = _em_sweeps(target_probs, components, tol, max_iter)
    unfinished = []
    for b in active.tolist():
        weights[b], certified = _newton_finish(weights[b], components[b], target_probs[b], tol)
        if not certified:
            unfinished.append(b)
    if unfinished:
        warnings.warn(
            f"closest_mtd_weights: {len(unfinished)} sequence(s) ({unfinished[:5]}) did not reach a KL gap below "
            f"tol={tol} in {max_iter} EM sweeps and {NEWTON_MAX_STEPS} Newton steps",
            stacklevel=2,
        )
    residual_kl = E.kl_divergence(target_probs, einops.einsum(weights, components, "b g, b g v -> b v"))
    return ImplicitWeights(weights, residual_kl)


def _checked_mixture_problem(
    target_probs: Tensor, tokens: Tensor, transition: Tensor, order: int, tol: float, max_iter: int
) -> tuple[Float[Tensor, "batch q"], Float[Tensor, "batch m q"], float, int]:
    """:func:`closest_mtd_weights`'s inputs checked: the targets ``p`` as float64 ``[B, q]``, the lagged
    rows ``A`` (``[B, m, q]``), ``tol`` and ``max_iter``. ``ValueError`` for invalid inputs, or when a
    target puts probability on a token that no lag can produce (the KL is infinite for every ``lambda``)."""
    transition = check_transition(transition)
    order = check_order(order)
    tokens = check_tokens(tokens, transition.shape[0], order)
    target_probs = check_distribution(target_probs, "target_probs")
    if target_probs.shape != (tokens.shape[0], transition.shape[0]):
        raise ValueError(
            f"target_probs must have shape [B={tokens.shape[0]}, q={transition.shape[0]}], got {tuple(target_probs.shape)}"
        )
    tol = check_positive(tol, "tol")
    max_iter = check_int(max_iter, "max_iter", 1)
    components = _lagged_rows(tokens, transition, order)  # A, [B, m, q]
    unreachable = (target_probs > 0) & (components.sum(dim=1) == 0)
    if unreachable.any():
        b, v = unreachable.nonzero()[0].tolist()
        raise ValueError(
            f"sequence {b}: the target puts probability {float(target_probs[b, v]):.3g} on token {v}, which no lag "
            f"can produce (pi(y_(T+1-g), {v}) = 0 for every g), so KL is infinite for every lambda"
        )
    return target_probs, components, tol, max_iter


def _gradient_ratio(weights: Tensor, rows: Tensor, probs: Tensor) -> Tensor:
    """``G_g = sum_v p_v A[g, v] / (A^T lambda)_v``, with ``0 / 0 = 0`` where ``p_v = 0``."""
    mixture = einops.einsum(weights, rows, "b g, b g v -> b v")
    ratio = torch.where(probs > 0, probs / mixture, torch.zeros_like(probs))
    return einops.einsum(rows, ratio, "b g v, b v -> b g")


def _em_sweeps(
    target_probs: Float[Tensor, "batch q"], components: Float[Tensor, "batch m q"], tol: float, max_iter: int
) -> tuple[Float[Tensor, "batch m"], Int[Tensor, " unfinished"]]:
    """At most ``max_iter`` EM sweeps ``lambda_g <- lambda_g G_g`` from the centre ``1/m``, each sequence
    until its certificate ``max_g G_g - 1`` is below ``tol``; returns the weights and the indices of the
    sequences not certified."""
    batch, order = components.shape[0], components.shape[1]
    weights = torch.full((batch, order), 1.0 / order, dtype=torch.float64)
    active = torch.arange(batch)  # sequences still iterating
    for _ in range(max_iter):
        current, rows, probs = weights[active], components[active], target_probs[active]
        ratio = _gradient_ratio(current, rows, probs)
        converged = ratio.amax(dim=-1) - 1.0 < tol  # certified: KL(current) - min KL < tol
        new_weights = current * ratio
        weights[active] = new_weights / new_weights.sum(dim=-1, keepdim=True)  # rounding only
        active = active[~converged]
        if active.numel() == 0:
            break
    return weights, active


def _newton_finish(
    weights: Float[Tensor, " m"], rows: Float[Tensor, "m q"], probs: Float[Tensor, " q"], tol: float
) -> tuple[Float[Tensor, " m"], bool]:
    """Minimise ``f(lambda) = -sum_v p_v log (A^T lambda)_v`` on the simplex from a feasible ``weights``
    by active-set Newton steps; returns the weights and whether ``max_g G_g - 1 < tol`` was certified.

    The face is the support of ``lambda``. On it, the Newton step solves
    ``[H 1; 1^T 0] [d; nu] = [G; 0]`` with ``H = sum_v p_v A[g, v] A[h, v] / (A^T lambda)_v^2`` (least
    squares: ``H`` is singular where lags share a parent, and then splits ``d`` evenly between them), and a
    backtracking line search keeps ``f`` falling and ``lambda >= 0``; a weight the step drives to 0 leaves
    the face. Once the face is optimal (``max_{g in face} G_g - 1 < tol``), the lag of largest ``G_g > 1``
    off the face enters by a Frank-Wolfe step towards its vertex (``grad f . (e_g - lambda) = 1 - G_g < 0``).
    """
    seen = probs > 0  # tokens the target never produces do not enter the objective
    rows, probs = rows[:, seen], probs[seen]
    weights = weights.clone()
    for _ in range(NEWTON_MAX_STEPS):
        mixture = weights @ rows
        ratio = rows @ (probs / mixture)  # G, minus the gradient of f
        if ratio.max().item() - 1.0 < tol:
            return weights, True
        face = weights > 0
        direction = _face_direction(weights, rows, probs, mixture, ratio, face, tol)
        slope = -float(ratio @ direction)  # grad f . direction < 0
        # The longest step that keeps lambda >= 0, and the lag whose weight it drives to 0.
        room = torch.where(direction < 0, weights / -direction, torch.full_like(weights, math.inf))
        blocking = int(room.argmin())
        max_step = min(1.0, room[blocking].item())
        step = _backtracking_step(weights, direction, slope, max_step, rows, probs, face)
        if step is None:
            return weights, False
        weights = (weights + step * direction).clamp(min=0.0)
        if step == max_step and room[blocking] <= 1.0:
            weights[blocking] = 0.0  # it reached the boundary (up to rounding): it leaves the face
        weights = weights / weights.sum()
    mixture = weights @ rows
    return weights, (rows @ (probs / mixture)).max().item() - 1.0 < tol


def _mixture_objective(candidate: Tensor, rows: Tensor, probs: Tensor) -> float:
    """``f(lambda) = -sum_v p_v log (A^T lambda)_v`` (``inf`` where a mixture entry is not positive)."""
    mixture = candidate @ rows
    return math.inf if bool((mixture <= 0).any()) else float(-(probs * mixture.log()).sum())


def _face_residual(candidate: Tensor, rows: Tensor, probs: Tensor, face: Tensor) -> float:
    """``max_{g in face} |G_g - 1|``: zero exactly at the minimum on the face."""
    mixture = candidate @ rows
    return math.inf if bool((mixture <= 0).any()) else float(((rows @ (probs / mixture))[face] - 1).abs().max())


def _face_direction(
    weights: Tensor, rows: Tensor, probs: Tensor, mixture: Tensor, ratio: Tensor, face: Tensor, tol: float
) -> Float[Tensor, " m"]:
    """:func:`_newton_finish`'s step direction: towards the vertex of the best lag off the face once the
    face is optimal (Frank-Wolfe), else the Newton step on the face (EM's where that is no descent)."""
    if ratio[face].max().item() - 1.0 < tol:  # optimal on its face: the best lag off it enters
        entering = int(torch.where(face, -math.inf, ratio).argmax())
        direction = -weights
        direction[entering] += 1.0
        return direction
    index = face.nonzero().flatten()
    k = index.numel()
    hessian = (rows[index] * (probs / mixture**2)) @ rows[index].T
    kkt = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    kkt[:k, :k], kkt[:k, k], kkt[k, :k] = hessian, 1.0, 1.0
    rhs = torch.cat([ratio[index], torch.zeros(1, dtype=torch.float64)])
    direction = torch.zeros_like(weights)
    direction[index] = (torch.linalg.pinv(kkt) @ rhs)[:k]
    direction[index] -= direction[index].mean()  # on the face exactly
    if float(ratio @ direction) <= 0:  # not a descent direction (rounding): take EM's instead
        direction = weights * (ratio - 1.0)
    return direction


def _backtracking_step(
    weights: Tensor, direction: Tensor, slope: float, max_step: float, rows: Tensor, probs: Tensor, face: Tensor
) -> float | None:
    """The step along ``direction`` from ``max_step`` down, halved until ``f`` falls enough (Armijo); where
    the decrease is below ``f``'s rounding (near the minimum of an ill-conditioned face), until the face
    residual falls instead, which rounding does not hide. ``None`` when the step underflows."""
    step = max_step
    start, start_residual = _mixture_objective(weights, rows, probs), _face_residual(weights, rows, probs, face)
    resolution = 64 * torch.finfo(torch.float64).eps * max(1.0, abs(start))
    while True:
        candidate = weights + step * direction
        value = _mixture_objective(candidate, rows, probs)
        if value <= start + 1e-4 * step * slope:
            return step
        if value <= start + resolution and _face_residual(candidate.clamp(min=0.0), rows, probs, face) < start_residual:
            return step
        step /= 2
        if step < 1e-30:
            return None


def implicit_weights(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    transition: Float[Tensor, "q q"],
    order: int,
    tol: float = IMPLICIT_TOL,
    max_iter: int = IMPLICIT_MAX_ITER,
) -> ImplicitWeights:
    """The ``lambda`` a model implicitly predicts with (Akyürek et al.'s implicit parameters).

    For each sequence, the ``lambda`` on the simplex minimising ``KL(p_model || sum_g lambda_g
    pi(y_{T+1-g}, .))``, with ``p_model = mdlens.predict_next(model, tokens)``; see
    :func:`closest_mtd_weights` for the solver and for lags whose tokens coincide. Returns
    ``ImplicitWeights(weights [B, m], residual_kl [B])`` (float64): a model that predicts with some
    estimate of ``lambda`` has ``residual_kl ~ 0`` and ``weights`` = that estimate (exactly, for the
    construction and one-step MD, when the last ``m`` tokens are distinct and their rows of ``pi``
    linearly independent).

    Raises ``ValueError`` for tokens outside the vocabulary, ``T > n_ctx``, ``T <= m``, or a transition
    whose ``q`` differs from the model's ``d_vocab``.
    """
    tokens = check_model_tokens(model, tokens, transition, order)
    return closest_mtd_weights(predict_next(model, tokens), tokens, transition, order, tol, max_iter)


def merge_repeated_lags(
    weights: Float[Tensor, "batch m"], tokens: Int[Tensor, "batch pos"], vocab_size: int
) -> Float[Tensor, "batch q"]:
    """``w[b, a] = sum_{g : y_{T+1-g} = a} lambda_g``: the weight each parent token gets, ``[B, q]``.

    Lags that point at the same token are indistinguishable in the predictive; this is the part of
    ``lambda`` a prediction determines.
    """
    order = weights.shape[-1]
    merged = torch.zeros(weights.shape[0], vocab_size, dtype=torch.float64)
    return merged.scatter_add_(1, E.last_tokens(tokens, order), weights.to(torch.float64))


def implicit_weights_distances(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    transition: Float[Tensor, "q q"],
    order: int,
    references: dict[str, Float[Tensor, "batch m"]],
    merge_repeats: bool = True,
) -> dict[str, float]:
    """Mean L1 distance of the model's implicit weights to each reference ``[B, m]`` (e.g. ``"md"``,
    ``"md2"``, ``"bayes"``, ``"true"``): which estimator does the model behave like?

    With ``merge_repeats`` (default), both sides are first summed over lags whose tokens coincide
    (:func:`merge_repeated_lags`): only those sums are determined by a prediction, so comparing the
    split would score the solver's tie-break, not the model. Also returns ``"residual_kl"``, the mean
    KL that no ``lambda`` explains. ``ValueError`` as :func:`implicit_weights`, or for references
    that are not ``[B, m]`` weights on the simplex.
    """
    tokens = check_model_tokens(model, tokens, transition, order)
    if not isinstance(references, dict) or not references:
        raise ValueError("references must be a non-empty dict name -> [B, m] weights")
    if "residual_kl" in references:
        raise ValueError('"residual_kl" is the name of the residual in the result; rename that reference')
    checked = {name: check_weights(reference, order, tokens.shape[0]) for name, reference in references.items()}
    implicit = implicit_weights(model, tokens, transition, order)
    vocab_size = model.cfg.d_vocab

    def comparable(weights: Tensor) -> Tensor:
        return merge_repeated_lags(weights, tokens, vocab_size) if merge_repeats else weights

    ours = comparable(implicit.weights)
    distances = {
        name: float((ours - comparable(reference)).abs().sum(dim=-1).mean()) for name, reference in checked.items()
    }
    distances["residual_kl"] = float(implicit.residual_kl.mean())
    return distances
