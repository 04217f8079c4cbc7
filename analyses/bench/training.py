"""Benchmark: training steps per second of ``mdlens.training.train`` against a bare PyTorch loop.

Both loops do the same work per step: draw a fresh batch with ``task.sample`` from a generator seeded
the same way, build the exact next-token targets for every position ``t > m``, forward, MSE, backward,
clip the gradient norm to 1, Adam step (constant learning rate). The bare loop below is the nanoGPT
minimum; ``train`` adds its own bookkeeping: the learning-rate schedule, loss logging, the tqdm
progress bar (kept on, its output swallowed) and the final evaluation on a small held-out batch
(``eval_every=0``; the evaluation is timed as part of ``train`` since ``wall_clock_s`` includes it).
The held-out batch and its references are drawn before ``train`` starts its clock, like the model
and optimizer construction that the bare loop does not time either.

Because the two loops are the same computation, they must end with the same weights: the benchmark
prints the largest difference as a check that the comparison is apples to apples.

Target: ratio ``train time / bare time <= 1.2``. Run with ``mdlens bench --only training``.
Timings alternate the two loops and report medians, since other processes share the CPU, and run on
one intra-op thread: with two threads on a busy 2-core machine, OpenMP spin-waiting made the same run
vary by 8x from one repeat to the next, which drowns any ratio (the ratio, not the absolute speed, is
what this benchmark is for).
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time

import torch

from mdlens import MTDTask
from mdlens.analyses import TASK
from mdlens.models import disentangled_transformer
from mdlens.training import TrainConfig, train

FULL = {"seq_len": 192, "batch": 64, "layers": 3, "steps": 20, "repeats": 5}
QUICK = {"seq_len": 32, "batch": 16, "layers": 3, "steps": 20, "repeats": 3}
LR, SEED = 3e-3, 0


def bare_loop(model: torch.nn.Module, task: MTDTask, steps: int, batch: int, seq_len: int) -> float:
    """The minimal training loop; returns its wall-clock in seconds."""
    m, pi = task.order, task.transition
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(SEED)
    lags = torch.arange(1, m + 1)
    positions = torch.arange(m, seq_len)  # 0-indexed positions with a target (t = m+1..T)
    start = time.perf_counter()
    for _ in range(steps):
        sample = task.sample(batch, seq_len, generator=generator)
        # Target at position t: sum_g lambda_g pi(y_{t+1-g}, .), with y_{t+1-g} at 0-index pos + 1 - g.
        rows = pi[sample.tokens[:, positions[:, None] + 1 - lags[None, :]]]  # [B, T-m, m, q]
        target = torch.einsum("bg,btgv->btv", sample.weights, rows).float()
        output = model(sample.tokens)[:, m:, :]
        loss = (output - target).pow(2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return time.perf_counter() - start


def module_loop(model: torch.nn.Module, task: MTDTask, steps: int, batch: int, seq_len: int) -> float:
    """``mdlens.training.train`` with the same recipe; returns its own ``wall_clock_s``."""
    config = TrainConfig(
        steps=steps,
        batch_size=batch,
        seq_len=seq_len,
        lr=LR,
        lr_schedule="constant",
        grad_clip=1.0,
        loss="mse",
        targets="all",
        eval_every=0,
        eval_batch_size=16,
        eval_bayes=False,
        seed=SEED,
        device="cpu",
        progress=True,
        log_every=10,
    )
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar runs; its output is dropped
        return train(model, task, config).wall_clock_s


def main(quick: bool = False) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(QUICK if quick else FULL)
    finally:
        torch.set_num_threads(threads)


def _measure(sizes: dict) -> dict:
    task = MTDTask(**TASK)

    def fresh_model():
        return disentangled_transformer(5, 3, sizes["seq_len"], n_layers=sizes["layers"], seed=SEED)

    args = (task, sizes["steps"], sizes["batch"], sizes["seq_len"])
    bare_loop(fresh_model(), task, 2, sizes["batch"], sizes["seq_len"])  # warm-up (first-call costs)
    bare_times, module_times = [], []
    for _ in range(sizes["repeats"]):
        bare_model, module_model = fresh_model(), fresh_model()
        bare_times.append(bare_loop(bare_model, *args))
        module_times.append(module_loop(module_model, *args))
    max_diff = max(
        (a.double() - b.double()).abs().max().item()
        for a, b in zip(bare_model.state_dict().values(), module_model.state_dict().values(), strict=True)
        if a.numel()
    )

    bare, module = statistics.median(bare_times), statistics.median(module_times)
    ratio = module / bare
    steps = sizes["steps"]
    print(
        f"disentangled {sizes['layers']}-layer, batch {sizes['batch']} x T={sizes['seq_len']}, {steps} steps, "
        f"{sizes['repeats']} alternating repeats, torch threads {torch.get_num_threads()}"
    )
    print(f"  bare PyTorch loop   : {steps / bare:8.2f} steps/s  (runs: {', '.join(f'{t:.2f}' for t in bare_times)} s)")
    print(
        f"  mdlens.training     : {steps / module:8.2f} steps/s  (runs: {', '.join(f'{t:.2f}' for t in module_times)} s)"
    )
    print(f"  ratio train/bare    : {ratio:.3f}  (target <= 1.2)  {'OK' if ratio <= 1.2 else 'ABOVE TARGET'}")
    print(f"  same weights at the end: max |difference| = {max_diff:.3g}")
    return {"bare_s": bare_times, "train_s": module_times, "ratio": ratio, "max_weight_diff": max_diff}


if __name__ == "__main__":
    main()
