"""The next-token distribution of any mdlens model: the one place that turns a model's output into
probabilities, so that every score (training evaluation, analyses, probes) reads models the same way.

A model says what its output is through ``model.output_type``:

- ``"logits"`` (a plain HookedTransformer, the default when the attribute is missing): softmax.
- ``"probs"`` (the paper's disentangled transformer, trained with MSE on the raw output): the output
  is meant to be a probability vector but nothing forces it onto the simplex, so it is clipped at zero
  and renormalised. A row with no positive entry has no honest renormalisation: ``ValueError``.

:func:`output_to_probs` is defined next to the models (``mdlens.models.outputs``) because their own
TransformerLens paths use it too: ``model(tokens, return_type="loss")`` is the cross-entropy of this
distribution (for a "probs" model of order ``m``, on the positions ``t > m`` it predicts; see
:func:`mdlens.models.outputs.probs_cross_entropy`) and ``model.generate`` samples from it.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mdlens.models.outputs import OUTPUT_TYPES, output_to_probs
from mdlens.validation import check_context_tokens, check_int

__all__ = ["model_next_probs", "model_outputs", "output_to_probs", "output_type_of", "predict_next"]


def output_type_of(model: torch.nn.Module) -> str:
    """``model.output_type`` ("logits" when absent); anything else is a ``ValueError``."""
    output_type = getattr(model, "output_type", "logits")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"model.output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    return output_type


def predict_next(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"]
) -> Float[Tensor, "batch q"]:
    """The model's distribution of the token after the last one, ``[B, q]`` float64.

    Args:
        model: any HookedTransformer; ``model.output_type`` is "logits" (default) or "probs".
        tokens: ``[B, T]`` or ``[T]`` ids in ``[0, d_vocab)`` with ``1 <= T <= n_ctx``.
    """
    tokens = check_context_tokens(tokens, model.cfg.d_vocab, model.cfg.n_ctx)
    output_type = output_type_of(model)
    device = next(model.parameters()).device
    with torch.inference_mode():
        output = model(tokens.to(device))[:, -1, :]
    return output_to_probs(output, output_type).cpu()


# Sequences per forward pass in the batched readers below: one [chunk, T, T] pattern per layer is held.
DEFAULT_CHUNK_SIZE = 512


def model_next_probs(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Float[Tensor, "batch q"]:
    """:func:`predict_next` over a large batch, ``chunk_size`` sequences per forward: the model's
    next-token *probabilities*, ``[B, q]`` float64."""
    check_int(chunk_size, "chunk_size", 1)
    with torch.no_grad():
        return torch.cat([predict_next(model, chunk) for chunk in tokens.split(chunk_size)])


def model_outputs(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Float[Tensor, "batch d_vocab"]:
    """The model's *raw* output at the last position (logits, or a "probs" model's unclipped output),
    ``[B, d_vocab]`` in the model's dtype, ``chunk_size`` sequences per forward. For a construction,
    whose output is exactly an estimator's predictive, this is the number to compare with it;
    :func:`model_next_probs` is what a score of the model's prediction reads."""
    check_int(chunk_size, "chunk_size", 1)
    with torch.no_grad():
        return torch.cat([model(tokens[i : i + chunk_size])[:, -1] for i in range(0, tokens.shape[0], chunk_size)])
