"""Growing a trained disentangled transformer into a deeper one that computes the same function.

The residual of an ``L``-layer disentangled model is a prefix of a deeper one's (layer ``l`` writes
block ``L{l}`` at the same coordinates whatever comes after it), so a trained layer fits into a deeper
model unchanged as long as it reads only that prefix. :func:`grow` copies the layers and the readout
of ``source`` into ``target``; ``mdlens train --init-from`` uses it to start a deeper model from a
trained shallower one (progressive stacking, and growing one-step MD into two, paper-notes §6).
"""

from __future__ import annotations

import torch

from mdlens.models.disentangled import DisentangledAttention, DisentangledTransformer
from mdlens.models.layout import ResidualLayout

# Where the new layers go: see :func:`grow`.
NEW_LAYER_RULES = ("fresh", "repeat_last", "insert_fresh")


@torch.no_grad()
def grow(
    source: DisentangledTransformer, target: DisentangledTransformer, new_layers: str = "fresh"
) -> DisentangledTransformer:
    """Copy the ``L``-layer ``source`` into ``target`` (``L <= target``'s layers), keeping its function.

    Three rules place the ``n - L`` new layers of ``target`` (``n`` layers):

    - ``"fresh"``: ``source``'s layers become layers ``1..L``; the new layers ``L+1..n`` keep
      ``target``'s own initialisation, and the readout ``W_U`` reads blocks ``tokens, L1..L{L}`` as
      ``source`` did and nothing of the new blocks.
    - ``"repeat_last"``: the new layers are inserted *before* ``source``'s last layer, all as copies
      of it: layers ``L..n`` are that layer (it reads ``[0, D_{L-1})``, the same coordinates at every
      depth), and ``W_U`` reads block ``L{n}`` where ``source`` read its block ``L{L}`` (progressive
      stacking). The last layer stays the readout; every earlier copy starts out computing the same
      attention pattern.
    - ``"insert_fresh"``: ``source``'s layers stay layers ``1..L``, the new layers ``L+1..n-1`` keep
      ``target``'s own initialisation, and layer ``n`` is a second copy of ``source``'s last layer,
      which ``W_U`` reads. Made for growing one-step MD into two: the first estimate ``lambda1``
      stays in block ``L{L}`` where a fresh layer can attend with it (``mdlens reproduce two-step``),
      and the readout above can add what the fresh layers write to its lag scores. A fresh layer
      starts near uniform attention, so every key gets gradient (a copy of a lag-selecting layer
      masks all but ``m`` keys).

    Whatever the rule, ``target`` then computes exactly ``source``'s function: the new blocks are read
    by nothing until training teaches the model to use them. ``target`` is changed in place and
    returned.
    """
    for name, model in (("source", source), ("target", target)):
        if not isinstance(model, DisentangledTransformer):
            raise ValueError(f"{name} must be a DisentangledTransformer, got {type(model).__name__}")
    if new_layers not in NEW_LAYER_RULES:
        raise ValueError(f"new_layers must be one of {NEW_LAYER_RULES}, got {new_layers!r}")
    mismatched = [
        f"{name} {theirs} != {ours}"
        for name, theirs, ours in (
            ("vocabulary", source.cfg.d_vocab, target.cfg.d_vocab),
            ("window", source.window, target.window),
            ("n_ctx", source.cfg.n_ctx, target.cfg.n_ctx),
            ("output", source.output_type, target.output_type),
        )
        if theirs != ours
    ]
    if mismatched:
        raise ValueError(f"source model does not fit the target: {', '.join(mismatched)}")
    n_source, n_target = source.cfg.n_layers, target.cfg.n_layers
    if n_source > n_target:
        raise ValueError(f"source has {n_source} layers, more than the target's {n_target}")

    copied = copied_layers(n_source, n_target, new_layers)
    for ours, index in zip(target.blocks, copied, strict=True):
        if index is not None:
            _copy_layer(source.blocks[index].attn, ours.attn)
    # The readout reads source's last block where the highest copy of source's last layer writes it.
    reader = 1 + max(layer for layer, index in enumerate(copied) if index == n_source - 1)
    _copy_readout(source, target, reader)
    return target


def copied_layers(n_source: int, n_target: int, new_layers: str) -> list[int | None]:
    """For each target layer (0-based), the source layer it copies, or ``None`` for a new layer that
    keeps the target's initialisation (see :func:`grow` for the rules)."""
    n_new, last = n_target - n_source, n_source - 1
    if new_layers == "fresh" or n_new == 0:
        return [*range(n_source), *[None] * n_new]
    if new_layers == "repeat_last":
        return [*range(last), *[last] * (n_new + 1)]
    return [*range(n_source), *[None] * (n_new - 1), last]  # insert_fresh


def _copy_layer(theirs: DisentangledAttention, ours: DisentangledAttention) -> None:
    """Layer ``theirs`` into ``ours``: it reads a prefix ``[0, D)`` of ``ours``'s residual, so its score
    terms go into that corner and everything ``ours`` reads beyond it is zeroed."""
    read = theirs.read_width
    ours.W_Q.zero_()
    ours.W_Q[0, :read, :read] = theirs.W_A
    ours.rel_query.zero_()
    ours.rel_query[:read] = theirs.rel_query[:read]
    for name in ("rel_score", "key_pos_score", "rel_value"):
        getattr(ours, name).copy_(getattr(theirs, name))


def _copy_readout(source: DisentangledTransformer, target: DisentangledTransformer, reader: int) -> None:
    """``target.W_U`` = ``source.W_U`` block by block, by name: every leaf of ``source``'s residual keeps
    its name in ``target``, except that the leaves of ``source``'s last block ``L{L}`` move to the
    block of target layer ``reader`` (``L{L}.L1.rel`` -> ``L{reader}.L1.rel``), which holds the same
    values; ``W_U`` is zero on every other block."""
    window = source.window
    theirs = ResidualLayout.disentangled(source.cfg.d_vocab, source.cfg.n_layers, window)
    ours = ResidualLayout.disentangled(target.cfg.d_vocab, target.cfg.n_layers, window)
    last = f"L{source.cfg.n_layers}"
    W_U = target.unembed.W_U
    W_U.zero_()
    for leaf in theirs.leaves():
        name = leaf.name
        if name.startswith(f"{last}."):
            name = f"L{reader}" + name.removeprefix(last)
        W_U[ours[name]] = source.unembed.W_U[leaf.slice]
