"""What several test modules share: the small task and models (their fixtures live in
``conftest.py``: q = 4 tokens, order m = 3, context T = 10, the construction's step eta = 0.2), and
small helpers for sampling tokens from a given transition matrix and caching a run."""

import torch
from transformer_lens import HookedTransformer

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


def sample_tokens(pi: torch.Tensor, order: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[batch, seq_len]`` tokens of the MTD with transition ``pi`` and ``order`` lags, seeded."""
    task = MTDTask(order=order, transition=pi, seed=seed)
    return task.sample(batch, seq_len, generator=torch.Generator().manual_seed(seed)).tokens


def run(model: HookedTransformer, tokens: torch.Tensor):
    """``model.run_with_cache(tokens)`` without autograd: ``(output, cache)``."""
    with torch.no_grad():
        return model.run_with_cache(tokens)
