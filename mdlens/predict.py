"""The next-token distribution of any mdlens model: the one place that turns a model's output into
probabilities, so that every score (training evaluation, analyses, probes) reads models the same way.

A model says what its output is through ``model.output_type``:

- ``"logits"`` (a plain HookedTransformer, the default when the attribute is missing): softmax.
- ``"probs"`` (the paper's disentangled transformer, trained with MSE on the raw output): the output
  is meant to be a probability vector but nothing forces it onto the simplex, so it is clipped at zero
  and renormalised. A row with no positive entry has no honest renormalisation: ``ValueError``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mdlens._validation import check_tokens
from mdlens.models._tl import OUTPUT_TYPES



def output_type_of(model: torch.nn.Module) -> str:
    """``model.output_type`` ("logits" when absent); anything else is a ``ValueError``."""
    output_type = getattr(model, "output_type", "logits")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"model.output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    return output_type


def output_to_probs(output: Float[Tensor, "... q"], output_type: str) -> Float[Tensor, "... q"]:
    """Raw model output -> probability vectors, in float64 (see the module docstring)."""
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
        raise ValueError(
            f"{n_bad} output row(s) have no positive entry: a 'probs' output cannot be renormalised"
        )
    return clipped / totals


def predict_next(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"] | Int[Tensor, "pos"]
) -> Float[Tensor, "batch q"]:
    """The model's distribution of the token after the last one, ``[B, q]`` float64.

    Args:
        model: any HookedTransformer; ``model.output_type`` is "logits" (default) or "probs".
        tokens: ``[B, T]`` or ``[T]`` ids in ``[0, d_vocab)`` with ``1 <= T <= n_ctx``.
    """
    tokens = check_tokens(tokens, model.cfg.d_vocab, order=0)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"tokens have T={tokens.shape[1]} positions, the model's context is {model.cfg.n_ctx}")
    output_type = output_type_of(model)
    device = next(model.parameters()).device
    with torch.inference_mode():
        output = model(tokens.to(device))[:, -1, :]
    return output_to_probs(output, output_type).cpu()
