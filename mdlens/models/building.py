"""Building a ``HookedTransformer`` without side effects on the caller: TransformerLens' deprecation
warning silenced (only it), the global random streams left as they were. Every mdlens builder, and
every place that rebuilds a model (checkpoints, the model registry), builds inside both."""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

# TransformerLens 3.9 warns on every HookedTransformer construction that the class goes away in
# 4.0. mdlens pins transformer-lens<4 on purpose, so that one warning (and only it) is silenced
# where mdlens builds models.
DEPRECATION_MESSAGE = "HookedTransformer is deprecated"


@contextmanager
def quiet_hooked_transformer_deprecation() -> Iterator[None]:
    """Silence exactly TransformerLens' "HookedTransformer is deprecated" DeprecationWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATION_MESSAGE, category=DeprecationWarning)
        yield


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
