"""A model against the one-step-MD construction built with the model's own step.

The construction (:func:`mdlens.construction.build_md_transformer`) is the reference mechanism: layer
1 attends to the lag window with the responsibilities, layer 2 averages them uniformly, layer 3 reads
the last ``m`` tokens with ``softmax(beta * Gamma_bar)``, and layer 1's token-token scores are
``(log pi)^T``. :func:`compare_with_construction` measures how far a model is from it, in one call:
the attention of every layer against the construction that runs the model's *own* step (so that the
last layer is judged against the step the model actually takes), layer 1 against the
responsibilities and by offset, and (for a disentangled model) what layer 1's scores store.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mdlens import estimators as E
from mdlens.construction import build_md_transformer
from mdlens.evaluation import effective_eta
from mdlens.hooks._checks import check_model_tokens
from mdlens.hooks.attention import AttentionAgreement, attention_agreement, offset_mass, responsibility_tv
from mdlens.hooks.weights import learned_transition, score_block_correlation, softmax_transition_kl, token_score_block
from mdlens.models import DisentangledTransformer

__all__ = ["ConstructionComparison", "compare_with_construction", "own_step"]

NOT_DISENTANGLED = "not a disentangled model: no single token-token score matrix to read"


@dataclass
class ConstructionComparison:
    """Result of :func:`compare_with_construction` (``m`` = order, ``q`` = vocabulary size).

    - ``eta``: the step the construction runs; ``beta = eta m (T - m)`` its layer-3 scale at length ``T``.
    - ``construction``: that construction (``build_md_transformer(pi, m, T, eta)``), to compare more with.
    - ``attention``: every construction layer's pattern against its matched model head.
    - ``responsibility_tv``: per head of layer 1 (``blocks.0``), the mean TV of its pattern to the
      responsibilities at keys ``t-1..t-m`` (0 for the construction).
    - ``offset_mass``: ``[n_heads, m + 1]``, layer 1's mean mass at offsets ``0..m`` (0 = the query).
    - The readings of layer 1's token-token scores, ``None`` for a model that is not a
      :class:`~mdlens.models.DisentangledTransformer` (``learned_transition_reason`` then says so):
      ``score_block_correlation`` (with ``(log pi)^T`` and ``-pi^T``), ``token_score_block`` (``[q, q]``),
      ``softmax_transition_kl`` (the paper's form), ``learned_transition`` (``[q, q]``, ``None`` with
      the reason when no row-stochastic ``pi`` gives the scores) and its ``learned_transition_kl``
      (``mean_a KL(pi(a, .) || learned(a, .))``).
    """

    eta: float
    beta: float
    construction: HookedTransformer
    attention: AttentionAgreement
    responsibility_tv: list[float]
    offset_mass: Float[Tensor, "head offset"]
    score_block_correlation: dict[str, float] | None = None
    token_score_block: Float[Tensor, "q q"] | None = None
    softmax_transition_kl: dict[str, float] | None = None
    learned_transition: Float[Tensor, "q q"] | None = None
    learned_transition_kl: float | None = None
    learned_transition_reason: str | None = NOT_DISENTANGLED


def own_step(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], transition: Float[Tensor, "q q"], order: int
) -> float:
    """The one-step-MD step ``model`` runs at the length of ``tokens``: a one-step construction's own
    ``eta`` (``model.md_params``) at the length it was built for, else the step of the one-step MD
    closest to the model's predictions (:func:`mdlens.evaluation.effective_eta` on ``tokens``)."""
    params = getattr(model, "md_params", None) or {}
    if "eta" in params and params.get("seq_len") == tokens.shape[-1]:
        return float(params["eta"])
    return effective_eta(model, tokens, transition, order)


def compare_with_construction(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    transition: Float[Tensor, "q q"],
    order: int,
    eta: float | None = None,
    matching: str = "ordered",
) -> ConstructionComparison:
    """``model`` against the one-step construction with step ``eta`` (default: :func:`own_step` on
    ``tokens``), on ``tokens`` ``[B, T]`` (``m < T <= n_ctx``) of the task with ``transition`` ``[q, q]``
    and ``order`` ``m``. ``matching``: how model heads are matched to the construction's layers
    (:func:`~mdlens.hooks.attention_agreement`; "ordered" keeps the layer order in a deeper model).
    Bad input (tokens the model cannot read or ``T <= m``, a transition of another vocabulary, a step
    that is not positive) raises ``ValueError``."""
    tokens = check_model_tokens(model, tokens, transition, order)
    if eta is None:
        eta = own_step(model, tokens, transition, order)
    seq_len = tokens.shape[-1]
    construction = build_md_transformer(transition, order, seq_len, eta)
    agreement = attention_agreement(model, construction, tokens, order=order, matching=matching)
    heads = range(model.cfg.n_heads)
    return ConstructionComparison(
        eta=eta,
        beta=E.beta_from_eta(eta, order, seq_len),
        construction=construction,
        attention=agreement,
        responsibility_tv=[responsibility_tv(model, tokens, transition, order, layer=0, head=h) for h in heads],
        offset_mass=offset_mass(model, tokens, order, layer=0),
        **_score_readings(model, transition),
    )


def _score_readings(model: HookedTransformer, transition: Float[Tensor, "q q"]) -> dict:
    """What layer 1's token-token scores store (the weight fields of :class:`ConstructionComparison`)."""
    if not isinstance(model, DisentangledTransformer):
        return {}
    readings = {
        "score_block_correlation": score_block_correlation(model, transition),
        "token_score_block": token_score_block(model),
        "softmax_transition_kl": softmax_transition_kl(model, transition),
    }
    try:
        learned = learned_transition(model)
    except ValueError as error:  # no row-stochastic pi gives these scores
        return {**readings, "learned_transition_reason": str(error)}
    kl = float(E.kl_divergence(transition, learned).mean())
    return {**readings, "learned_transition": learned, "learned_transition_kl": kl, "learned_transition_reason": None}
