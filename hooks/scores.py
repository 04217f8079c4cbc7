"""Does a head score its keys by an algorithmic quantity? Correlation of attention scores with it.

Two-step MD needs, at the last position, a weighing of every earlier position ``k`` by
``-<lambda1, gamma_k>`` (paper-notes §6; ``mdlens reproduce two-step``). Whether a head does this can
be read off its pre-softmax scores: :func:`key_score_correlation` correlates, at one query position,
each head's scores over the keys with a per-key quantity, sequence by sequence.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name

from mdlens.hooks._checks import check_model_tokens, model_device


def _pearson(x: Float[Tensor, "b n"], y: Float[Tensor, "b n"]) -> Float[Tensor, " b"]:
    """Pearson correlation per row (NaN where either row is constant)."""
    x = x - x.mean(dim=-1, keepdim=True)
    y = y - y.mean(dim=-1, keepdim=True)
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))


def key_score_correlation(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    key_quantity: Float[Tensor, "batch pos"],
    first_key: int,
    query: int = -1,
    last_key: int | None = None,
) -> Float[Tensor, "layer head"]:
    """Mean over sequences of the Pearson correlation between each head's attention score
    (``blocks.{l}.attn.hook_attn_scores``) from query position ``query`` to the keys
    ``first_key..last_key`` (default ``last_key = query``; 0-based, inclusive) and ``key_quantity``
    at those keys. ``[n_layers, n_heads]`` float64.

    Keys with a masked (``-inf``) or NaN score are left out of each sequence's correlation; a
    head whose scores are constant over the keys has no correlation (NaN, left out of the mean).
    """
    tokens = check_model_tokens(model, tokens)
    seq_len = tokens.shape[1]
    query = query % seq_len
    if not isinstance(first_key, int) or not 0 <= first_key < query:
        raise ValueError(f"first_key must be an int in [0, query={query}), got {first_key!r}")
    if not isinstance(key_quantity, Tensor) or key_quantity.shape != tokens.shape:
        raise ValueError(f"key_quantity must have the tokens' shape {tuple(tokens.shape)}")
    last_key = query if last_key is None else last_key
    if not isinstance(last_key, int) or not first_key < last_key <= query:
        raise ValueError(f"last_key must be an int in ({first_key}, query={query}], got {last_key!r}")
    keys = slice(first_key, last_key + 1)
    quantity = key_quantity[:, keys].to(torch.float64).cpu()
    names = [get_act_name("attn_scores", layer) for layer in range(model.cfg.n_layers)]
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens.to(model_device(model)), names_filter=names)
    result = torch.empty(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.float64)
    for layer, name in enumerate(names):
        scores = cache[name][:, :, query, keys].to(torch.float64).cpu()  # [batch, head, key]
        for head in range(model.cfg.n_heads):
            head_scores = scores[:, head]
            usable = torch.isfinite(head_scores).all(dim=0) & torch.isfinite(quantity).all(dim=0)
            correlation = _pearson(head_scores[:, usable], quantity[:, usable])
            result[layer, head] = correlation.nanmean() if torch.isfinite(correlation).any() else float("nan")
    return result
