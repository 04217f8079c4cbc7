"""Benchmark of the probes: what a researcher waits for when probing a shipped model.

Two measurements, on one thread:

1. ``targets`` for every position of 1024 sequences of length 192 (responsibilities, their mean,
   one- and two-step MD, exact Bayes for all 189 prefixes) against the estimators' last-position
   calls on the same tokens (responsibilities, one- and two-step MD, exact Bayes): the ratio,
   measured side by side. Target: at most 3x.
2. ``probe_model`` on every layer of each shipped model (embedding + every ``resid_post``), with
   both controls (random-init model, control target), targets included. Target: under 30 s for
   ``disentangled-3l``.

Run with ``mdlens bench --only hooks`` (``--quick`` for small sizes).
"""

from __future__ import annotations

import os
import time

import torch

import mdlens
from mdlens import estimators as E
from mdlens.hooks import probe_model, targets

FULL = {"batch": 1024, "seq_len": 192, "models": ["disentangled-3l", "standard-3l", "disentangled-5l"]}
QUICK = {"batch": 64, "seq_len": 48, "models": ["disentangled-3l"]}
BETA = 8.0  # any positive scale: the cost does not depend on it


def _timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def main(quick: bool = False) -> dict:
    sizes = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs, load average {load}")
        _, task = mdlens.load_pretrained(sizes["models"][0])
        pi, m = task.transition, task.order
        sample = task.sample(sizes["batch"], sizes["seq_len"], generator=torch.Generator().manual_seed(0))
        tokens = sample.tokens
        eta = E.eta_from_beta(BETA, m, tokens.shape[1])

        def last_position():
            E.responsibilities(tokens, pi, m)
            E.md_weights(tokens, pi, m, eta)
            E.md_weights(tokens, pi, m, eta, steps=2)
            return E.bayes_weights(tokens, pi, m, alpha=task.alpha)

        last, last_s = _timed(last_position)
        every, every_s = _timed(lambda: targets(tokens, pi, m, beta=BETA, alpha=task.alpha))
        agreement = (every["bayes_weights"][:, -1] - last).abs().max().item()
        print(
            f"targets, {tokens.shape[0]} x {tokens.shape[1]}: every position {every_s:.2f} s, "
            f"last position {last_s:.2f} s -> ratio {every_s / last_s:.2f} (target <= 3); "
            f"last-position Bayes agrees to {agreement:.1e}"
        )
        results = {"targets_seconds": every_s, "last_position_seconds": last_s, "targets_ratio": every_s / last_s}

        for name in sizes["models"]:
            model, _ = mdlens.load_pretrained(name)

            def probe_with_targets(model=model):
                values = targets(tokens, pi, m, beta=BETA, alpha=task.alpha)
                return probe_model(model, tokens, values)

            report, seconds = _timed(probe_with_targets)
            best = max(report.r2["mean_responsibility"])
            print(
                f"probe_model {name}: {len(report.rows)} reading points x {len(report.targets)} targets, "
                f"{report.n_rows} rows, both controls, targets included: {seconds:.1f} s "
                f"(target < 30 s for disentangled-3l); best mean_responsibility R^2 {best:.3f}"
            )
            results[f"probe_{name}_seconds"] = seconds
        return results
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
