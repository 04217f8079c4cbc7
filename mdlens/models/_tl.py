"""Small TransformerLens glue shared by the model builders."""

from __future__ import annotations

import random
import warnings
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

# TransformerLens 3.9 warns on every HookedTransformer construction that the class goes away in
# 4.0. mdlens pins transformer-lens<4 on purpose, so that one warning (and only it) is silenced
# where mdlens builds models.
DEPRECATION_MESSAGE = "HookedTransformer is deprecated"

OUTPUT_TYPES = ("logits", "probs")


@contextmanager
def quiet_hooked_transformer_deprecation() -> Iterator[None]:
    """Silence exactly TransformerLens' "HookedTransformer is deprecated" DeprecationWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=DEPRECATION_MESSAGE, category=DeprecationWarning
        )
        yield


def check_output_type(output_type: str) -> str:
    """How a model's raw output is read: ``"logits"`` (softmax it) or ``"probs"`` (as is)."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    return output_type


@contextmanager
def preserve_global_rng() -> Iterator[None]:
    """Restore torch's, numpy's and Python's global random state on exit.

    ``HookedTransformerConfig(seed=...)`` and ``HookedTransformer.init_weights`` reseed all three
    global generators; mdlens builds configs and models inside this so that building a model
    never changes the caller's random stream.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
