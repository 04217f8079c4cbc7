"""Benchmark of distributed alignment search: what a researcher waits for to ask "is V at hook H?".

On one thread, side by side in one run, for each 3-layer shipped model:

1. ``hooks.align_variable`` for ``mean_responsibility`` at ``blocks.1.hook_resid_post`` on 2048
   training pairs of length 192 (plus a held-out quarter), without the controls or the rank sweep:
   one DAS fit and its held-out score. Target: under 60 s for a 3-layer model.
2. one ``run_with_cache`` forward over the same 2048 base sequences, and the DAS fit's cost per
   training pair in units of that forward's cost per sequence.

The high-level model is fitted once beforehand (``hooks.high_level_model``) and not timed: it is
the same for every hook a researcher tries. Run with ``mdlens bench --only alignment``
(``--quick`` for small sizes).
"""

from __future__ import annotations

import os
import time

import torch

import mdlens
from mdlens import hooks

FULL = {"n_train": 2048, "seq_len": 192, "models": ["disentangled-3l", "standard-3l"]}
QUICK = {"n_train": 64, "seq_len": 32, "models": ["disentangled-3l"]}
HOOK = "blocks.1.hook_resid_post"
VARIABLE = "mean_responsibility"
TARGET_SECONDS = 60.0


def main(quick: bool = False) -> dict:
    sizes = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs, load average {load}")
        for name in sizes["models"]:
            model, task = mdlens.load_pretrained(name)
            pi, m = task.transition, task.order
            n_pairs = sizes["n_train"] * 4 // 3  # a quarter of the pairs is held out
            generator = torch.Generator().manual_seed(0)
            tokens_a = task.sample(n_pairs, sizes["seq_len"], generator=generator).tokens
            tokens_b = task.sample(n_pairs, sizes["seq_len"], generator=generator).tokens
            high_level = hooks.high_level_model(model, tokens_a, pi, m)

            start = time.perf_counter()
            with torch.inference_mode():
                model.run_with_cache(tokens_a[: sizes["n_train"]], return_type=None)
            forward_s = time.perf_counter() - start

            start = time.perf_counter()
            alignment = hooks.align_variable(
                model,
                VARIABLE,
                HOOK,
                tokens_a,
                tokens_b,
                pi,
                m,
                high_level=high_level,
                controls=False,
                rank_sweep=False,
            )
            das_s = time.perf_counter() - start
            per_pair = (das_s / alignment.n_train) / (forward_s / sizes["n_train"])
            print(
                f"{name}: DAS for {VARIABLE} at {HOOK} on {alignment.n_train} training pairs of T={sizes['seq_len']}: "
                f"{das_s:.1f} s (target < {TARGET_SECONDS:.0f} s), held-out fidelity {alignment.interchange_fidelity:.3f}; "
                f"run_with_cache on the {sizes['n_train']} bases {forward_s:.2f} s -> DAS costs {per_pair:.1f}x "
                "a cached forward per training pair"
            )
            results[name] = {
                "das_seconds": das_s,
                "forward_with_cache_seconds": forward_s,
                "das_per_pair_over_forward": per_pair,
                "fidelity": alignment.interchange_fidelity,
            }
    finally:
        torch.set_num_threads(threads)
    return results
