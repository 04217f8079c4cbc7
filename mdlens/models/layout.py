"""Named blocks of a residual stream, in the spirit of tracr's labelled bases.

The disentangled transformer's residual stream is a concatenation: every layer appends its own
block and never writes anywhere else. :class:`ResidualLayout` gives each block a name, a slice of
``d_model`` and a one-line meaning, so that probes, plots and people can say ``"L2.L1.rel"``
instead of ``resid[..., 19:23]``.

Naming (``q`` = vocabulary size, ``W`` = relative-position window, ``D_l`` = width after layer l):

- ``tokens`` (width ``q``, ``D_0 = q``): the one-hot of the token at this position.
- ``L{l}`` (width ``D_{l-1} + W``): what layer ``l`` writes. It is the attention-weighted mix of
  the whole residual before it, whose parts keep their names under the prefix ``L{l}.``
  (``L2.tokens``, ``L2.L1.tokens``, ``L2.L1.rel``), followed by ``L{l}.rel``, the
  attention-weighted relative-position values of layer ``l``. So ``D_l = 2 D_{l-1} + W``.

Leaves are the smallest named blocks; groups (``L2``, ``L2.L1``) span several leaves; aliases are
extra names a construction gives to parts of blocks (``L1.responsibility``) and may overlap
anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

from mdlens.validation import check_int

BLOCK_KINDS = ("leaf", "group", "alias")

# -- layer numbering ---------------------------------------------------------------------------
# The paper counts layers from 1 (``L1``, ``L2``, ...); TransformerLens counts its blocks from 0
# (``blocks.0``, ``blocks.1``, ...). The paper's layer ``l`` is TransformerLens's ``blocks.{l-1}``.
# These functions are the one place that converts; "block index" always means TL's 0-based one.


def paper_layer(block_index: int) -> int:
    """The paper's (1-based) layer number of TransformerLens's ``blocks.{block_index}``:
    ``block_index + 1``."""
    return check_int(block_index, "block_index (TransformerLens's 0-based blocks index)", 0) + 1


def block_index_of(layer: int) -> int:
    """TransformerLens's (0-based) blocks index of the paper's layer ``layer``: ``layer - 1``."""
    return check_int(layer, "layer (the paper's 1-based layer number)", 1) - 1


def layer_label(block_index: int, head: int | None = None) -> str:
    """The paper's name of TransformerLens's ``blocks.{block_index}``: ``"L{block_index+1}"``, or
    ``"L{block_index+1}.H{head}"`` for one of its heads (heads keep TL's 0-based index)."""
    label = f"L{paper_layer(block_index)}"
    if head is None:
        return label
    return f"{label}.H{check_int(head, 'head (0-based head index)', 0)}"


def resid_post_of_layer(layer: int) -> str:
    """The residual hook right after the paper's layer ``layer``: ``blocks.{layer-1}.hook_resid_post``."""
    return f"blocks.{block_index_of(layer)}.hook_resid_post"


def residual_hook_of(block: str) -> str:
    """The first TransformerLens residual hook that holds a disentangled block: ``L{l}...`` is written
    by the paper's layer ``l``, TransformerLens's ``blocks.{l-1}``, so it is there from
    ``blocks.{l-1}.hook_resid_post`` on; anything else (``tokens``) from ``blocks.0.hook_resid_pre``."""
    head = block.split(".")[0]
    if head.startswith("L") and head[1:].isdigit():
        return resid_post_of_layer(int(head[1:]))
    return "blocks.0.hook_resid_pre"


@dataclass(frozen=True)
class ResidualBlock:
    """One named block: coordinates ``start:stop`` of the residual stream."""

    name: str
    start: int
    stop: int
    meaning: str
    kind: str = "leaf"

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def width(self) -> int:
        return self.stop - self.start


class ResidualLayout:
    """An ordered collection of named residual blocks; ``layout[name]`` is the block's slice.

    The leaves tile ``[0, d_model)`` exactly, in order; groups and aliases are extra names.
    """

    def __init__(self, d_model: int, blocks: list[ResidualBlock]):
        self.d_model = d_model
        self.blocks: list[ResidualBlock] = []
        self._by_name: dict[str, ResidualBlock] = {}
        for block in blocks:
            self._add(block)
        leaves = self.leaves()
        covered = 0
        for leaf in leaves:
            if leaf.start != covered:
                raise ValueError(f"layout leaves must tile [0, d_model) in order; gap/overlap at {leaf.name}")
            covered = leaf.stop
        if covered != d_model:
            raise ValueError(f"layout leaves cover [0, {covered}) but d_model={d_model}")

    def _add(self, block: ResidualBlock) -> None:
        if block.kind not in BLOCK_KINDS:
            raise ValueError(f"block kind must be one of {BLOCK_KINDS}, got {block.kind!r}")
        if block.name in self._by_name:
            raise ValueError(f"duplicate residual block name {block.name!r}")
        if not (0 <= block.start < block.stop <= self.d_model):
            raise ValueError(f"block {block.name!r} [{block.start}, {block.stop}) is outside [0, {self.d_model})")
        self.blocks.append(block)
        self._by_name[block.name] = block

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def disentangled(cls, vocab_size: int, n_layers: int, window: int) -> ResidualLayout:
        """The layout of a disentangled transformer with ``n_layers`` layers (module docstring)."""
        blocks = [ResidualBlock("tokens", 0, vocab_size, "one-hot of the token at this position")]
        width = vocab_size  # D_0 = q
        for layer in range(1, n_layers + 1):
            name, start = f"L{layer}", width
            # Layer l's copy part: the whole residual before it, re-homed at `start`, names prefixed.
            copied = [
                ResidualBlock(
                    f"{name}.{b.name}",
                    start + b.start,
                    start + b.stop,
                    f"layer {layer}'s attention-weighted mix of {b.name}"
                    if b.kind == "leaf"
                    else f"layer {layer}'s mix of {b.name}",
                    b.kind,
                )
                for b in blocks
            ]
            rel = ResidualBlock(
                f"{name}.rel",
                start + width,
                start + width + window,
                f"layer {layer}'s attention-weighted relative-position values (coordinate o = offset o)",
            )
            group = ResidualBlock(name, start, start + width + window, f"everything layer {layer} writes", "group")
            blocks = [*blocks, group, *copied, rel]
            width = 2 * width + window  # D_l = 2 D_{l-1} + W
        return cls(width, blocks)

    def with_aliases(self, aliases: list[ResidualBlock]) -> ResidualLayout:
        """A copy of this layout with extra alias names (e.g. a construction's semantic names)."""
        extra = [ResidualBlock(a.name, a.start, a.stop, a.meaning, "alias") for a in aliases]
        return ResidualLayout(self.d_model, list(self.blocks) + extra)

    # -- lookup ------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> slice:
        return self.block(name).slice

    def block(self, name: str) -> ResidualBlock:
        if name not in self._by_name:
            raise KeyError(f"no residual block named {name!r}; known: {', '.join(self.names())}")
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[ResidualBlock]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def names(self) -> list[str]:
        return [block.name for block in self.blocks]

    def leaves(self) -> list[ResidualBlock]:
        return sorted((b for b in self.blocks if b.kind == "leaf"), key=lambda b: b.start)

    def aliases(self) -> list[ResidualBlock]:
        return [b for b in self.blocks if b.kind == "alias"]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResidualLayout) and self.to_dict() == other.to_dict()

    # -- serialisation and display -----------------------------------------------------------

    def to_dict(self) -> dict:
        return {"d_model": self.d_model, "blocks": [asdict(b) for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: dict) -> ResidualLayout:
        try:
            blocks = [ResidualBlock(**b) for b in data["blocks"]]
            return cls(int(data["d_model"]), blocks)
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed residual layout: {error}") from error

    def table(self, kinds: tuple[str, ...] = BLOCK_KINDS) -> str:
        """A fixed-width table: name, slice, width, meaning (leaves, then groups, then aliases)."""
        rows = [b for kind in kinds for b in self.blocks if b.kind == kind]
        name_width = max(len("name"), *(len(b.name) for b in rows))
        slice_width = max(len("slice"), *(len(f"{b.start}:{b.stop}") for b in rows))
        lines = [f"{'name':<{name_width}}  {'slice':>{slice_width}}  {'width':>5}  {'kind':<5}  meaning"]
        lines.append("-" * len(lines[0]))
        for b in rows:
            lines.append(
                f"{b.name:<{name_width}}  {f'{b.start}:{b.stop}':>{slice_width}}  {b.width:>5}  {b.kind:<5}  {b.meaning}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"ResidualLayout(d_model={self.d_model})\n" + self.table()

    def __repr__(self) -> str:
        return f"ResidualLayout(d_model={self.d_model}, blocks={self.names()})"
