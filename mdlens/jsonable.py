"""Values as JSON can hold them: one home for the conversion every result's ``to_dict`` and every
analysis's JSON file needs.

JSON has no NaN or infinity (``json.dumps`` writes the non-standard ``NaN``, which strict readers
refuse), so a non-finite float becomes ``None`` (``null``): "not defined here", as a missing
patching effect or an undefined R^2 is.
"""

from __future__ import annotations

import math

import torch


def json_ready(value):
    """``value`` with tensors as (nested) lists and non-finite floats as ``None``, recursively through
    dicts (keys as strings), lists and tuples (as lists). Other values pass through unchanged."""
    if isinstance(value, torch.Tensor):
        return json_ready(value.tolist())
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
