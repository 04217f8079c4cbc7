"""Benchmark: the scale fits of :func:`mdlens.estimators.fit_scales_by_kl` (L-BFGS) against Adam, the
optimiser they used before, on the fits the analyses make, printed side by side from one run.

Each fit minimises a batch-mean ``KL(truth || predictive)`` over a few scales from the same starts:
two-step MD's per-step sizes (:func:`mdlens.estimators.fit_md_step_sizes`, in log space; Adam at
lr 0.1) and causal two-step MD's four scales (:func:`mdlens.estimators.fit_causal_md_scales`; Adam at
lr 0.3), Adam for 150 steps per start, keeping the best point it visited. Printed: the time of each,
their ratio, and each tuning KL (L-BFGS should reach a KL no higher than Adam's).

Run with ``mdlens bench --only fits`` (``--quick`` for small sizes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.analyses import TASK

FULL = {"batch": 1024, "lengths": [32, 192], "adam_steps": 150}
QUICK = {"batch": 128, "lengths": [32], "adam_steps": 30}


def adam_fit(
    tokens: torch.Tensor,
    transition: torch.Tensor,
    target: torch.Tensor,
    weights_of: Callable[[torch.Tensor], torch.Tensor],
    starts: list,
    steps: int,
    lr: float,
) -> float:
    """The reference: Adam for ``steps`` steps from each start; the least mean KL seen."""
    best = math.inf
    for start in starts:
        scales = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.Adam([scales], lr=lr)
        for _ in range(steps + 1):
            optimiser.zero_grad()
            loss = E.kl_divergence(target, E.predictive(tokens, transition, weights_of(scales))).mean()
            best = min(best, loss.item())
            loss.backward()
            optimiser.step()
    return best


def _timed(compute: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    value = compute()
    return value, time.perf_counter() - start


def compare_at(task: MTDTask, seq_len: int, sizes: dict) -> dict[str, float]:
    """Both fits of both kinds at one length; prints them and returns Adam's time over L-BFGS's."""
    pi, m = task.transition, task.order
    sample = task.sample(sizes["batch"], seq_len, generator=torch.Generator().manual_seed(seq_len))
    tokens, truth = sample.tokens, sample.next_probs
    # The starts fit_md_step_sizes and fit_causal_md_scales take themselves.
    step_starts = E.default_md_step_size_starts(tokens, pi, m, truth, steps=2)
    causal_starts = E.default_causal_md_starts(tokens, pi, m, truth, steps=2)
    # name -> (weights_of, starts, Adam's learning rate): the same loss and starts for both optimisers.
    cases = {
        "md step sizes": (lambda s: E.md_weights_by_step(tokens, pi, m, s.exp()), step_starts, 0.1),
        "causal 2-step scales": (lambda s: E.causal_md_weights(tokens, pi, m, s), causal_starts, 0.3),
    }
    ratios = {}
    for name, (weights_of, starts, lr) in cases.items():
        lbfgs_kl, lbfgs_seconds = _timed(
            lambda w=weights_of, s=starts: E.fit_scales_by_kl(tokens, pi, truth, w, s)["tuning_kl"]
        )
        adam_kl, adam_seconds = _timed(
            lambda w=weights_of, s=starts, lr=lr: adam_fit(tokens, pi, truth, w, s, sizes["adam_steps"], lr)
        )
        ratios[f"{name} T={seq_len}"] = adam_seconds / lbfgs_seconds
        print(
            f"{name:>21}, T={seq_len:3d}, batch {sizes['batch']}: L-BFGS {lbfgs_seconds:6.2f} s (KL "
            f"{lbfgs_kl:.10e}), Adam x{sizes['adam_steps']} {adam_seconds:6.2f} s (KL {adam_kl:.10e}): "
            f"{adam_seconds / lbfgs_seconds:.1f}x faster, KL {'no higher' if lbfgs_kl <= adam_kl else 'HIGHER'}",
            flush=True,
        )
    return ratios


def main(quick: bool = False) -> dict:
    sizes = QUICK if quick else FULL
    # The first torch.optim.LBFGS of a process imports torch._dynamo (about 1.5 s): paid here, untimed.
    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])
    task = MTDTask(**TASK)
    ratios = {}
    for seq_len in sizes["lengths"]:
        ratios |= compare_at(task, seq_len, sizes)
    return ratios
