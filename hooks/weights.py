"""What a model's *weights* say about the algorithm (paper-notes §4-§6): the transition matrix stored in
layer 1, and how close a model's score matrices and its weight-space path are to a reference model's.

Layer 1 of the construction scores a query token ``y_i = b`` against a key token ``y_j = a`` with
``W_A[b, a] = log pi(a, b)`` on the ``tokens`` block (rows = query, columns = key), so that its softmax
over the lag window is the responsibility ``gamma_i``. Attention cannot see a constant added to every
score of one query, so a trained ``W_A`` can only be read up to one unknown constant per row; the
functions here remove that symmetry before they compare anything.
"""

from __future__ import annotations

import copy
import math

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mdlens import estimators as E
from mdlens.construction import LOG_ZERO
from mdlens.hooks._checks import check_model, check_model_tokens, check_same_task_models
from mdlens.models.disentangled import DisentangledTransformer
from mdlens.predict import predict_next
from mdlens.validation import check_transition

# Relative size of the smallest singular value of exp(W_A) below which the identification of pi is
# refused: the row-stochasticity equations then no longer pin down the per-query constants.
SINGULAR_TOLERANCE = 1e-12

# The paper's "softmax of the first-layer W_A recovers pi": its KL for the trained model at T=192
# (paper-notes §5), which softmax_transition_kl reads in every form the sentence admits.
PAPER_LEARNED_TRANSITION_KL = 0.0376

# The interpolation grid of weight_alignment: s = 0 is the model, s = 1 the reference.
INTERPOLATION_POINTS = 11


def _check_disentangled(model: HookedTransformer, name: str = "model") -> DisentangledTransformer:
    check_model(model)
    if not isinstance(model, DisentangledTransformer):
        raise ValueError(
            f"{name} must be a mdlens DisentangledTransformer (a model with a token-token score block "
            f"W_A in layer 1), got {type(model).__name__}"
        )
    return model


def _check_transition_for(model: HookedTransformer, transition: Tensor) -> Float[Tensor, "q q"]:
    transition = check_transition(transition)
    if transition.shape[0] != model.cfg.d_vocab:
        raise ValueError(
            f"the model's d_vocab={model.cfg.d_vocab} does not match the transition's q={transition.shape[0]}"
        )
    return transition


def token_score_block(model: DisentangledTransformer) -> Float[Tensor, "q q"]:
    """Layer 1's content score on the ``tokens`` block, float64 ``[q, q]``: row = query token, column =
    key token (the construction puts ``(log pi)^T`` here)."""
    _check_disentangled(model)
    tokens = model.layout["tokens"]
    return model.blocks[0].attn.W_A[tokens, tokens].detach().to(torch.float64).cpu()


def _row_centred(matrix: Tensor) -> Tensor:
    """Each row minus its mean: removes the per-query constant that attention cannot see."""
    return matrix - matrix.mean(dim=-1, keepdim=True)


def _cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of two matrices flattened; NaN when either is zero (no direction to compare)."""
    norm_a, norm_b = a.norm(), b.norm()
    if norm_a == 0 or norm_b == 0:
        return float("nan")
    return float((a * b).sum() / (norm_a * norm_b))


# ----------------------------------------------------------------------------------------------
# The transition matrix stored in layer 1
# ----------------------------------------------------------------------------------------------


def learned_transition(model: DisentangledTransformer) -> Float[Tensor, "q q"]:
    """The row-stochastic ``pi`` that layer 1's token-token scores encode, float64 ``[q, q]``.

    Identification. Write ``S = W_A[tokens, tokens]`` (row = query/child token ``b``, column =
    key/parent token ``a``). Reading layer 1 as the construction's responsibility layer, the score is
    ``S[b, a] = log pi(a, b) + c_b`` with one unknown constant ``c_b`` per query token (attention's
    softmax over keys ignores it). So ``pi(a, b) = exp(S[b, a]) d_b`` with ``d_b = exp(-c_b) > 0``, and
    the rows of ``pi`` summing to 1 give ``q`` linear equations for the ``q`` unknowns:

        sum_b E[b, a] d_b = 1 for every parent a,   E = exp(S),   i.e.  E^T d = 1.

    A unique positive solution ``d`` identifies ``pi = (diag(d) E)^T`` exactly; it is invariant to any
    per-query shift of ``S`` (``E -> diag(e^c) E`` gives ``d -> e^{-c} d``). Each row of ``S`` is first
    shifted by its maximum (a per-query shift, so harmless) to keep ``exp`` in range; entries far below
    the row maximum (the construction's ``LOG_ZERO = -1e4`` for ``pi = 0``) become exact zeros.

    On the construction ``E^T = pi`` up to the per-query scaling, so ``d`` recovers ``pi`` to rounding.

    Raises ``ValueError`` when ``model`` is not a ``DisentangledTransformer``, when ``E^T d = 1`` is
    singular or ill-conditioned (``pi`` not identifiable from the scores), or when its solution has an
    entry ``d_b <= 0`` (no transition matrix gives these scores: e.g. a layer that scores likely
    parents *lower*, as the shipped trained models do).
    """
    scores = token_score_block(model)
    if not torch.isfinite(scores).all():
        raise ValueError("layer 1's token-token scores contain NaN or inf")
    q = scores.shape[0]
    # exp(S[b, a] - max_a S[b, a]): every row has an entry 1, nothing overflows.
    exp_scores = torch.exp(scores - scores.amax(dim=1, keepdim=True))  # E[b, a]
    singular_values = torch.linalg.svdvals(exp_scores)
    if singular_values[-1] <= SINGULAR_TOLERANCE * singular_values[0]:
        raise ValueError(
            "layer 1's token-token scores do not identify a transition matrix: exp(W_A) is singular "
            f"(smallest/largest singular value {float(singular_values[-1] / singular_values[0]):.3g}), so the "
            "row-stochasticity equations E^T d = 1 do not fix the per-query constants"
        )
    scale = torch.linalg.solve(exp_scores.T, torch.ones(q, dtype=torch.float64))  # d_b = exp(-c_b)
    if not (scale > 0).all():
        raise ValueError(
            "layer 1's token-token scores are not log pi^T up to a per-query constant for any row-stochastic "
            f"pi: the per-query scales d solving exp(W_A)^T d = 1 are not all positive (d = "
            f"{[round(float(x), 4) for x in scale]})"
        )
    transition = (exp_scores * scale[:, None]).T  # pi(a, b) = E[b, a] d_b
    return transition / transition.sum(dim=1, keepdim=True)  # rows sum to 1 already; rounding only


def learned_transition_kl(model: DisentangledTransformer, transition: Float[Tensor, "q q"]) -> float:
    """``mean_a KL(pi(a, .) || pi_learned(a, .))`` over the ``q`` parent tokens ``a``.

    ``pi_learned = learned_transition(model)``. The paper reports 0.0376 for its trained model at length
    192 ("softmax of the first-layer W_A recovers pi"); that this row-averaged KL from the true rows is
    their metric is our reading, the paper does not define it. ``ValueError`` as
    :func:`learned_transition`, or when ``transition`` is not a row-stochastic ``[d_vocab, d_vocab]``.
    """
    transition = _check_transition_for(model, transition)
    return float(E.kl_divergence(transition, learned_transition(model)).mean())


def softmax_transition_kl(model: DisentangledTransformer, transition: Float[Tensor, "q q"]) -> dict[str, float]:
    """The paper's "KL between pi and a softmax of layer 1's W_A", in every form the sentence admits.

    ``S = W_A[tokens, tokens]`` (:func:`token_score_block`: row = query/child token ``b``, column =
    key/parent token ``a``). Every form is a mean over the ``q`` rows, each row weighted ``1/q``, of
    ``KL(target row || softmax row)`` (the truth first, as for every KL in mdlens):

    - ``"softmax_over_keys_vs_pi"``: ``mean_i KL(pi(i, .) || softmax_a S[i, a])``: the block read as
      ``log pi`` itself (row = parent), softmax along its last axis;
    - ``"softmax_over_queries_vs_pi"``: ``mean_a KL(pi(a, .) || softmax_b S[b, a])``: the block read as
      ``(log pi)^T``, softmax along its first axis (0 on the construction, but not invariant to the
      per-query constants attention cannot see);
    - ``"softmax_over_keys_vs_parent_posterior"``: ``mean_b KL(pibar(b, .) || softmax_a S[b, a])`` with
      ``pibar(b, a) = pi(a, b) / sum_a' pi(a', b)``, pi's column-normalised transpose (the parent
      ``a`` given the child ``b`` under a uniform prior on parents): what layer 1's attention itself
      computes, invariant to per-query shifts of ``S`` (0 on the construction);
    - ``"uniform_vs_pi"`` / ``"uniform_vs_parent_posterior"``: the same KLs for the uniform guess
      (``S = 0``, every softmax row ``1/q``), the score of a layer 1 that knows nothing of ``pi``.

    ``ValueError`` when ``model`` is not a ``DisentangledTransformer``, its scores are not finite,
    ``transition`` is not a row-stochastic ``[d_vocab, d_vocab]``, or a column of ``pi`` is zero (a
    token that is never a next token has no parent posterior).
    """
    transition = _check_transition_for(model, transition)
    scores = token_score_block(model)
    if not torch.isfinite(scores).all():
        raise ValueError("layer 1's token-token scores contain NaN or inf")
    child_mass = transition.sum(dim=0)  # [q]: sum_a pi(a, b)
    if not (child_mass > 0).all():
        never = [int(b) for b in torch.nonzero(child_mass == 0).flatten()]
        raise ValueError(f"pi's columns {never} are zero: those tokens are never next tokens, so no parent posterior")
    parent_posterior = transition.T / child_mass[:, None]  # pibar(b, a)
    uniform = torch.full_like(transition, 1.0 / transition.shape[0])
    over_keys = torch.softmax(scores, dim=1)  # row b (query) -> distribution over keys a
    over_queries = torch.softmax(scores, dim=0).T  # row a (key) -> distribution over queries b

    def mean_kl(target: Tensor, estimate: Tensor) -> float:
        return float(E.kl_divergence(target, estimate).mean())

    return {
        "softmax_over_keys_vs_pi": mean_kl(transition, over_keys),
        "softmax_over_queries_vs_pi": mean_kl(transition, over_queries),
        "softmax_over_keys_vs_parent_posterior": mean_kl(parent_posterior, over_keys),
        "uniform_vs_pi": mean_kl(transition, uniform),
        "uniform_vs_parent_posterior": mean_kl(parent_posterior, uniform),
    }


def score_block_correlation(model: DisentangledTransformer, transition: Float[Tensor, "q q"]) -> dict[str, float]:
    """Correlation of layer 1's token-token scores with ``(log pi)^T`` and with ``-pi^T``.

    Both matrices are row-centred first (a per-query constant is invisible to attention), and the
    Pearson correlation of the flattened row-centred matrices (= their cosine, as both have mean 0)
    is returned: ``{"log_transition_T": r, "neg_transition_T": r, "log_transition_T_scale": c}``, where
    ``c`` is the least-squares slope of the row-centred scores on row-centred ``(log pi)^T``: the
    construction gives ``r = c = 1``; ``0 < c < 1`` is a flatter copy of ``log pi`` (softer
    responsibilities, which a larger ``beta`` downstream can partly make up for). Zero entries of ``pi`` enter ``log pi`` as the construction's
    ``LOG_ZERO = -1e4``, which then dominates the correlation. ``ValueError`` as
    :func:`learned_transition_kl` (but no identifiability is needed).
    """
    transition = _check_transition_for(model, transition)
    scores = _row_centred(token_score_block(model))
    log_transition = torch.where(transition > 0, transition.log(), torch.full_like(transition, LOG_ZERO))
    centred_log = _row_centred(log_transition.T)
    return {
        "log_transition_T": _cosine(scores, centred_log),
        "neg_transition_T": _cosine(scores, _row_centred(-transition.T)),
        "log_transition_T_scale": float((scores * centred_log).sum() / (centred_log * centred_log).sum()),
    }


# ----------------------------------------------------------------------------------------------
# Weight-space agreement with a reference model
# ----------------------------------------------------------------------------------------------


def _shared_prefix_width(model: DisentangledTransformer, reference: DisentangledTransformer) -> int:
    """How many leading residual coordinates mean the same thing in both layouts (same leaf names
    at the same slices): with equal windows the shallower model's residual is a prefix of the deeper's."""
    width = 0
    for ours, theirs in zip(model.layout.leaves(), reference.layout.leaves(), strict=False):  # depths may differ
        if (ours.name, ours.start, ours.stop) != (theirs.name, theirs.start, theirs.stop):
            break
        width = ours.stop
    return width


def _disentangled_score_comparison(model: DisentangledTransformer, reference: DisentangledTransformer) -> list[dict]:
    """Per layer: W_A of both models on the coordinates both read with the same meaning, row-centred."""
    shared = _shared_prefix_width(model, reference)
    rows = []
    for layer in range(1, min(model.cfg.n_layers, reference.cfg.n_layers) + 1):
        width = min(model.blocks[layer - 1].attn.read_width, reference.blocks[layer - 1].attn.read_width, shared)
        ours = model.score_matrix(layer)[:width, :width].detach().to(torch.float64).cpu()
        theirs = reference.score_matrix(layer)[:width, :width].detach().to(torch.float64).cpu()
        ours, theirs = _row_centred(ours), _row_centred(theirs)
        reference_norm = float(theirs.norm())
        rows.append(
            {
                "layer": layer,
                "width": width,
                "blocks": [b.name for b in model.layout.leaves() if b.stop <= width],
                "cosine": _cosine(ours, theirs),
                "relative_distance": float((ours - theirs).norm()) / reference_norm if reference_norm > 0 else math.inf,
                "model_norm": float(ours.norm()),
                "reference_norm": reference_norm,
            }
        )
    return rows


def _standard_score_comparison(model: HookedTransformer, reference: HookedTransformer) -> list[dict]:
    """Per layer and head: TL's ``QK`` (``W_Q W_K^T``, residual x residual), compared raw."""
    rows = []
    model_qk, reference_qk = model.QK, reference.QK  # FactoredMatrix [n_layers, n_heads, d_model, d_model]
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            ours = model_qk[layer, head].AB.detach().to(torch.float64).cpu()
            theirs = reference_qk[layer, head].AB.detach().to(torch.float64).cpu()
            reference_norm = float(theirs.norm())
            rows.append(
                {
                    "layer": layer + 1,
                    "head": head,
                    "cosine": _cosine(ours, theirs),
                    "relative_distance": float((ours - theirs).norm()) / reference_norm
                    if reference_norm > 0
                    else math.inf,
                    "model_norm": float(ours.norm()),
                    "reference_norm": reference_norm,
                }
            )
    return rows


def _architecture_difference(model: HookedTransformer, reference: HookedTransformer) -> str | None:
    """Why the two models cannot be interpolated parameter by parameter (None when they can)."""
    if type(model) is not type(reference):
        return f"different model classes ({type(model).__name__} vs {type(reference).__name__})"
    for field in (
        "n_layers",
        "d_model",
        "n_ctx",
        "n_heads",
        "d_head",
        "d_vocab",
        "d_mlp",
        "attn_only",
        "normalization_type",
        "positional_embedding_type",
        "act_fn",
    ):
        ours, theirs = getattr(model.cfg, field), getattr(reference.cfg, field)
        if ours != theirs:
            return f"different architectures: cfg.{field} = {ours} vs {theirs}"
    if getattr(model, "output_type", "logits") != getattr(reference, "output_type", "logits"):
        return "different output types"
    if isinstance(model, DisentangledTransformer) and model.window != reference.window:
        return f"different relative-position windows ({model.window} vs {reference.window})"
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
        return "different parameter names or shapes"
    ours, theirs = dict(model.named_buffers()), dict(reference.named_buffers())
    if ours.keys() != theirs.keys() or any(
        not torch.equal(ours[k].cpu().to(theirs[k].dtype), theirs[k].cpu()) for k in ours
    ):
        return "different buffers (masks or constants), which have no straight line between them"
    return None


@torch.no_grad()
def _interpolation_path(model: HookedTransformer, reference: HookedTransformer, tokens: Tensor) -> dict:
    """Mean ``KL(p_reference || p_s)`` at the last position along ``(1 - s) model + s reference``."""
    # The path runs in the more precise of the two dtypes, on a copy of the model that has it
    # (copy_ casts into the copy's dtype).
    dtype = torch.float64 if torch.float64 in (model.cfg.dtype, reference.cfg.dtype) else model.cfg.dtype
    reference_probs = predict_next(reference, tokens)
    start = {k: v.detach().cpu().to(dtype) for k, v in model.named_parameters()}
    end = {k: v.detach().cpu().to(dtype) for k, v in reference.named_parameters()}
    # Buffers (causal masks, the -inf mask value) are equal in both models and stay as they are.
    walker = copy.deepcopy(reference if reference.cfg.dtype == dtype else model)
    walker_parameters = dict(walker.named_parameters())
    path = torch.linspace(0.0, 1.0, INTERPOLATION_POINTS, dtype=torch.float64)
    mean_kl, infinite_fraction = [], []
    for s in path.tolist():
        # theta(s) = (1 - s) theta_model + s theta_reference, every parameter (frozen ones too).
        for name, parameter in walker_parameters.items():
            parameter.copy_((1 - s) * start[name] + s * end[name])
        try:
            walker_probs = predict_next(walker, tokens)
        except ValueError:  # a "probs" output with no positive entry: no distribution at this s
            mean_kl.append(math.inf)
            infinite_fraction.append(math.nan)
            continue
        kl = E.kl_divergence(reference_probs, walker_probs)  # inf where p_s clips a needed token to 0
        mean_kl.append(float(kl.mean()))
        infinite_fraction.append(float(torch.isinf(kl).double().mean()))
    kl = torch.tensor(mean_kl, dtype=torch.float64)
    # Barrier: the largest excess of the path over the chord between its two ends.
    chord = (1 - path) * kl[0] + path * kl[-1]
    barrier = float((kl - chord).max()) if torch.isfinite(kl).all() else math.inf
    return {"s": path.tolist(), "mean_kl": mean_kl, "infinite_fraction": infinite_fraction, "barrier": barrier}


def _score_comparison(model: HookedTransformer, reference: HookedTransformer) -> dict:
    """:func:`weight_alignment`'s ``"layers"`` part: the per-layer score comparison, with the note on
    what it compares (``"layers_note"``) or why there is none (``"layers_reason"``)."""
    result: dict = {"layers": None, "layers_reason": None, "layers_note": None}
    both_disentangled = isinstance(model, DisentangledTransformer) and isinstance(reference, DisentangledTransformer)
    neither_disentangled = not isinstance(model, DisentangledTransformer) and not isinstance(
        reference, DisentangledTransformer
    )
    if both_disentangled:
        result["layers"] = _disentangled_score_comparison(model, reference)
        result["layers_note"] = "W_A on the shared named blocks, rows centred"
    elif neither_disentangled:
        shapes = [(m.cfg.n_layers, m.cfg.n_heads, m.cfg.d_model) for m in (model, reference)]
        if shapes[0] == shapes[1]:
            result["layers"] = _standard_score_comparison(model, reference)
            result["layers_note"] = (
                "raw W_Q W_K^T in residual space: meaningful only if both models share a "
                "residual basis (e.g. checkpoints of one training run)"
            )
        else:
            result["layers_reason"] = f"(n_layers, n_heads, d_model) differ: {shapes[0]} vs {shapes[1]}"
    else:
        result["layers_reason"] = (
            "a disentangled and a standard transformer: the concatenated named blocks and "
            "a learned residual basis have no common coordinates"
        )
    return result


def weight_alignment(
    model: HookedTransformer,
    reference: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | None = None,
    transition: Float[Tensor, "q q"] | None = None,
    order: int | None = None,
) -> dict:
    """How close ``model``'s weights are to ``reference``'s (e.g. the construction), two ways.

    1. **Score matrices, per layer** (``"layers"``). Two ``DisentangledTransformer``s: layer ``l``'s
       ``W_A`` of both on the residual coordinates both read *with the same meaning* (the shorter read
       width, cut at the first layout block where the two differ), each row minus its mean (a
       per-query constant is invisible to attention). Per layer: ``cosine``, ``relative_distance``
       ``||A - B|| / ||B||`` (``inf`` when ``B = 0``: the construction's layers 2 and 3 have no content
       score, and then only ``model_norm`` says anything), ``model_norm``, ``reference_norm``,
       ``width`` and the compared ``blocks``. Two plain ``HookedTransformer``s with the same
       ``d_model``/heads/layers: TL's ``model.QK[l, h]`` (``W_Q W_K^T``, residual x residual),
       compared raw, per head; this only means something when the residual bases are shared (e.g.
       checkpoints of one training run), which ``"layers_note"`` says. Otherwise (a standard model
       against a disentangled one) ``"layers"`` is ``None`` and ``"layers_reason"`` says why.
       The relative-position terms are not compared.
    2. **Loss along the straight line** (``"interpolation"``), as von Oswald et al. do for their
       gradient-descent construction: every parameter set to ``(1 - s) model + s reference`` for
       ``s`` in 11 points of ``[0, 1]``, scored by the mean ``KL(p_reference || p_s)`` of the
       next-token distribution after ``tokens`` (:func:`mdlens.predict_next`, last position): the
       reference is the target, so the curve ends at 0. Returns ``{"s", "mean_kl",
       "infinite_fraction", "barrier"}``: a ``"probs"`` model clipped to zero on a token the reference
       predicts has infinite KL, and ``infinite_fraction`` says for how many sequences (NaN where the
       output has no positive entry at all); barrier = largest excess of the curve over the chord
       between its ends (``inf`` if any point is). ``None`` with
       ``"interpolation_reason"`` when no ``tokens`` are given or the architectures differ.
       ``transition`` and ``order``, when given, only validate ``tokens`` (vocabulary, ``T > m``).

    Raises ``ValueError`` for models of different vocabularies or invalid tokens.
    """
    check_same_task_models(model, reference)
    result: dict = {
        **_score_comparison(model, reference),
        "interpolation": None,
        "interpolation_reason": None,
    }
    if tokens is None:
        result["interpolation_reason"] = "no tokens given to evaluate the path on"
        return result
    tokens = check_model_tokens(model, tokens, transition, order)
    check_model_tokens(reference, tokens, transition, order)
    difference = _architecture_difference(model, reference)
    if difference is not None:
        result["interpolation_reason"] = difference
        return result
    result["interpolation"] = _interpolation_path(model, reference, tokens)
    return result
