"""The small task and models several test modules share (their fixtures live in ``conftest.py``):
q = 4 tokens, order m = 3, context T = 10, and the construction's step eta = 0.2."""

import torch

from mdlens import MTDTask
from mdlens.construction import build_md_transformer
from mdlens.models import standard_transformer

Q, M, T, ETA = 4, 3, 10, 0.2


def small_task() -> MTDTask:
    return MTDTask(vocab_size=Q, order=M, seed=11)


def small_construction(task: MTDTask):
    return build_md_transformer(task.transition, M, T, ETA)


def small_standard():
    """A 2-layer, 2-head float64 standard model of width 16."""
    return standard_transformer(Q, T, n_layers=2, d_model=16, n_heads=2, dtype=torch.float64, seed=4)
