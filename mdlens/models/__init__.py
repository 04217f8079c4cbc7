"""Models for the MTD task, all ``HookedTransformer``s.

- :func:`standard_transformer`: a plain ``HookedTransformer`` (Q/K/V/O, MLPs, LayerNorm, positions).
"""

from mdlens.models.standard import standard_transformer

__all__ = ["standard_transformer"]
