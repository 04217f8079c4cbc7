"""A model's raw output read as a distribution: ``output_type`` says what ``model(tokens)`` holds
(``"logits"``: softmax it; ``"probs"``: the probability vector itself), :func:`output_to_probs` reads
it, and :func:`probs_cross_entropy` is TransformerLens' next-token loss for a ``"probs"`` output."""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

OUTPUT_TYPES = ("logits", "probs")


def check_output_type(output_type: str) -> str:
    """How a model's raw output is read: ``"logits"`` (softmax it) or ``"probs"`` (as is)."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    return output_type


def output_to_probs(output: Float[Tensor, "... q"], output_type: str) -> Float[Tensor, "... q"]:
    """Raw model output -> probability vectors, in float64 (differentiable).

    ``"logits"``: softmax. ``"probs"``: the output is meant to be a probability vector but nothing
    forces it onto the simplex, so it is clipped at zero and renormalised; a row with no positive
    entry has no honest renormalisation: ``ValueError``.
    """
    output = output.to(torch.float64)
    if torch.isnan(output).any():
        raise ValueError("model output contains NaN")
    if output_type == "logits":
        return torch.softmax(output, dim=-1)
    if output_type != "probs":
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    clipped = output.clamp(min=0.0)
    totals = clipped.sum(dim=-1, keepdim=True)
    if (totals <= 0).any():
        n_bad = int((totals <= 0).sum().item())
        raise ValueError(f"{n_bad} output row(s) have no positive entry: a 'probs' output cannot be renormalised")
    return clipped / totals


def probs_cross_entropy(
    output: Float[Tensor, "batch pos q"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    per_token: bool = False,
    order: int | None = None,
) -> Float[Tensor, ""] | Float[Tensor, "batch pos-1"]:
    """``transformer_lens.utils.lm_cross_entropy_loss`` for a ``"probs"`` output, on the positions that
    predict an MTD token.

    Position ``t`` (0-based) predicts token ``t + 1`` with ``p_t = output_to_probs(output[:, t])`` (the
    distribution ``mdlens.predict_next`` gives for the prefix ``tokens[:, :t+1]``), at a loss of
    ``-log p_t(tokens[:, t+1])``. Which positions count:

    - with ``order = m`` (the MTD order the model is for), positions ``t >= m``, i.e. the 1-based
      positions ``t > m``: those mdlens trains (``mdlens.training`` supervises ``output[:, m:]``) and
      where ``mdlens.hooks.targets`` is defined. The positions before are not scored: at ``0..m-2`` the
      next token is one of the first ``m`` tokens, i.i.d. uniform and independent of the prefix, so
      there is nothing to predict (every predictor's best is uniform, at a loss of ``log q``); at
      ``m-1`` the prefix holds no responsibility yet. A "probs" model is never trained there, its
      outputs there are meaningless and often clipped to zero at the observed token (an infinite loss
      and NaN gradients, if they were scored). Its raw outputs there are left as they are.
    - without an order, every position, as in TransformerLens;
    - with an ``attention_mask``, a position counts only when it and the next one are unmasked, as in
      TransformerLens, and ``t`` is then counted from the sequence's first unmasked token.

    Returns the mean over the positions that count, or with ``per_token`` the ``[batch, pos-1]`` losses
    (0 where a position does not count, as TransformerLens does for masked ones), in the model's dtype.
    Rows that do not count are never read: neither renormalised (they may have no positive entry) nor
    in the gradient. Only the chosen token's ``log p`` is taken, never ``log`` of the whole row, so the
    gradient is finite wherever the loss is. Where the clipped output gives an observed token
    probability 0 the loss is honestly ``inf``: one warning per call says how many tokens and where.
    ``ValueError`` when no position counts (``T <= m + 1``, or everything masked) for the mean.
    """
    n_pos = tokens.shape[1]
    predicting = output[:, :-1]
    next_tokens = tokens[:, 1:].to(output.device)
    counted = _counted_positions(tokens, attention_mask, order, output.device)
    # Rows that do not count are never read: a constant row keeps their (unchecked) output out of
    # the renormalisation check and out of the gradient.
    predicting = torch.where(counted[..., None], predicting, torch.ones_like(predicting))
    probs = output_to_probs(predicting, "probs")  # [batch, pos-1, q], float64
    chosen = probs.gather(dim=-1, index=next_tokens[..., None])[..., 0]
    impossible = counted & (chosen == 0)
    if impossible.any():
        first_batch, first_position = (int(i) for i in impossible.nonzero()[0])
        warnings.warn(
            f"{int(impossible.sum())} observed token(s) have probability 0 under the model's clipped 'probs' "
            f"output (the first at batch {first_batch}, position {first_position}): the loss is inf and its "
            f"gradient is not finite",
            stacklevel=3,
        )
    log_probs = chosen.log().masked_fill(~counted, 0.0)
    if per_token:
        return (-log_probs).to(output.dtype)
    n_counted = int(counted.sum())
    if n_counted == 0:
        first = f"positions t >= order={order} (0-based) that are unmasked" if order else "unmasked positions"
        raise ValueError(f"no position predicts a scored token: the loss counts {first}, and tokens have T={n_pos}")
    return (-log_probs.sum() / n_counted).to(output.dtype)


def _counted_positions(
    tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None, order: int | None, device: torch.device
) -> Bool[Tensor, "batch pos-1"]:
    """Which predicting positions :func:`probs_cross_entropy` scores: with an ``attention_mask``, those
    unmasked with an unmasked next token; with an ``order``, only ``t >= order`` (0-based, counted from
    the first unmasked token)."""
    batch, n_pos = tokens.shape
    n_predicting = n_pos - 1  # the last position has no next token
    position = torch.arange(n_predicting, device=device).expand(batch, n_predicting)
    counted = torch.ones(batch, n_predicting, dtype=torch.bool, device=device)
    if attention_mask is not None:
        if attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask must have the shape of tokens {tuple(tokens.shape)}, got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.to(device).bool()
        counted = mask[:, :-1] & mask[:, 1:]
        position = mask.long().cumsum(dim=1)[:, :-1] - 1  # counted from the first unmasked token
    if order:
        counted = counted & (position >= order)
    return counted
