"""Lag heads: how much of each head's attention goes to the key ``g`` positions back, ``g = 1..m``.

A head that reads the MTD lag window (the construction's layer 1, and whatever plays its part in a
trained model) puts its attention on offsets ``1..m``; the construction's readout (layer 3) on
offsets ``0..m-1`` (the tokens ``y_{t+1-g}``). Two views, next to TransformerLens's head detector:

- :func:`lag_head_scores`: ``[n_layers, n_heads, m]`` mean attention mass at each offset, averaged
  over query positions ``t > m`` (1-based; 0-based index ``>= m``, where every lag window is full)
  and the batch;
- :func:`lag_detection_pattern`: a ``[T, T]`` 0/1 pattern to hand to
  ``transformer_lens.head_detector.detect_head`` (which needs the model's tokenizer,
  :func:`mdlens.models.tokenizer.attach_tokenizer`). Its default ``"mul"`` score is
  ``(1/T) sum_i sum_{o in offsets} A[i, i - o]`` over the rows ``i >= first_query`` that the
  pattern marks: TransformerLens divides by the whole pattern's mass (``T`` rows), so with
  ``first_query = m`` it equals ``(T - m) / T`` times the sum over ``g`` of :func:`lag_head_scores`.

Layers are TransformerLens block indices (0-based): the paper's "layer 1" is ``blocks.0``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mdlens.hooks._checks import check_model_tokens
from mdlens.hooks.attention import DEFAULT_CHUNK_SIZE, mean_offset_mass
from mdlens.validation import check_int, check_order

FIRST_OFFSETS = (0, 1)  # lag g at offset g (a head that reads the window) or g - 1 (a readout head)


def lag_head_scores(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    order: int,
    first_offset: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Float[Tensor, "layer head lag"]:
    """Mean attention mass of every head at offsets ``first_offset .. first_offset + m - 1``.

    Entry ``[l, h, g - 1]`` is the mean over query rows ``t > m`` (0-based ``>= m``) and the batch
    of ``A^{l,h}[t, t - g]`` (``first_offset=1``, offsets ``1..m``: the lag window) or of
    ``A^{l,h}[t, t - g + 1]`` (``first_offset=0``, offsets ``0..m-1``: the readout of ``y_{t+1-g}``).
    For the construction's layer 1 (``first_offset=1``) it is the mean responsibility
    ``mean_{b, k > m} gamma_k(g)``. Float64, ``[n_layers, n_heads, m]``.

    Args:
        model: any ``HookedTransformer`` (patterns read from ``blocks.{l}.attn.hook_pattern``).
        tokens: ``[B, T]`` or ``[T]`` ids in ``[0, d_vocab)``, ``m < T <= n_ctx``.
        order: ``m``, the number of lags.
        first_offset: 1 (default) or 0, see above.
        chunk_size: sequences per forward pass.
    """
    order = check_order(order)
    tokens = check_model_tokens(model, tokens, order=order)
    if first_offset not in FIRST_OFFSETS or isinstance(first_offset, bool):
        raise ValueError(f"first_offset must be one of {FIRST_OFFSETS}, got {first_offset!r}")
    check_int(chunk_size, "chunk_size", 1)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    offsets = range(first_offset, first_offset + order)
    mass = mean_offset_mass(model, tokens, order, list(range(n_layers)), offsets, chunk_size)
    return mass.reshape(n_layers, n_heads, order)


def lag_detection_pattern(
    seq_len: int, offsets: int | Iterable[int], first_query: int = 0
) -> Float[Tensor, "query key"]:
    """A ``[T, T]`` detection pattern for ``transformer_lens.head_detector.detect_head``: 1 at the
    pairs ``(i, i - o)`` for every ``o`` in ``offsets`` and query row ``i >= max(o, first_query)``,
    0 elsewhere (lower triangular, as TransformerLens requires).

    ``offsets=range(1, m + 1)`` with ``first_query=m`` asks "how much attention goes to the lag
    window at positions ``t > m``"; ``offsets=1`` is TransformerLens's previous-token pattern.
    """
    check_int(seq_len, "seq_len", 1)
    check_int(first_query, "first_query", 0)
    offsets = [offsets] if isinstance(offsets, int) else list(offsets)
    if not offsets:
        raise ValueError("offsets is empty")
    for offset in offsets:
        check_int(offset, "every offset", 0)
    if len(set(offsets)) != len(offsets):
        raise ValueError(f"offsets must be distinct, got {offsets}")
    query = torch.arange(seq_len)[:, None]
    key = torch.arange(seq_len)[None, :]
    marked = torch.isin(query - key, torch.tensor(offsets)) & (query >= first_query)
    return marked.to(torch.float64)


__all__ = ["lag_detection_pattern", "lag_head_scores"]
