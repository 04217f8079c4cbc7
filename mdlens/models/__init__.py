"""Models for the MTD task, all ``HookedTransformer``s.

- :func:`standard_transformer`: a plain ``HookedTransformer`` (Q/K/V/O, MLPs, LayerNorm, positions).
- :class:`DisentangledTransformer` / :func:`disentangled_transformer`: the paper's architecture
  (concatenated residual, single score matrix, relative-position terms) as a subclass.
- :class:`ResidualLayout`: the named blocks of a disentangled residual stream.
"""

from mdlens.models.disentangled import (
    DisentangledAttention,
    DisentangledTransformer,
    disentangled_transformer,
    residual_widths,
)
from mdlens.models.layout import ResidualBlock, ResidualLayout
from mdlens.models.standard import standard_transformer

__all__ = [
    "DisentangledAttention",
    "DisentangledTransformer",
    "ResidualBlock",
    "ResidualLayout",
    "disentangled_transformer",
    "residual_widths",
    "standard_transformer",
]
