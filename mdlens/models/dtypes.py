"""The dtypes mdlens models are built in, by name: a model records its dtype as ``"float32"`` /
``"float64"`` (``mdlens_args``, checkpoints' JSON) and takes either the name or the torch dtype."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# The dtypes a plain HookedTransformer's config may name when it is saved (safetensors stores all four
# bit for bit); mdlens builds its own models in DTYPES only.
PLAIN_DTYPES = {**DTYPES, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` / ``torch.float64``, also given by name (``"float32"``, as ``mdlens_args`` stores it)."""
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    if dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be torch.float32 or torch.float64 (or their names), got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``: how ``mdlens_args`` records a dtype (JSON-friendly)."""
    return str(dtype).removeprefix("torch.")
