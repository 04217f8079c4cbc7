"""Benchmarks of the disentangled transformer (issue 3), printed as ratios.

1. ``run_with_cache`` against a plain forward, on the same disentangled model (target <= 1.5x);
2. the ``DisentangledTransformer`` forward against a plain ``HookedTransformer`` of the same
   ``d_model``, ``n_layers``, ``n_heads`` and ``d_head`` (attention-only, no LayerNorm; target <= 1.5x).

Sizes (paper-notes §5): 3 layers, q = 5, m = 3 (window 4, so d_model = 68, d_head = 72),
T = 192, batch 256, float32, no gradients. Each measurement is the median of several repeats
after a warm-up; the two sides of a ratio are timed alternately so that machine load hits both.

Run with ``mdlens bench --only models`` (``--quick`` for small sizes).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from mdlens.models import disentangled_transformer, standard_transformer

FULL = {"vocab_size": 5, "order": 3, "n_layers": 3, "seq_len": 192, "batch": 256, "repeats": 7, "warmup": 2}
QUICK = {"vocab_size": 5, "order": 3, "n_layers": 3, "seq_len": 48, "batch": 32, "repeats": 3, "warmup": 1}
TARGET_RATIO = 1.5


def _time_pair(first: Callable[[], object], second: Callable[[], object], repeats: int, warmup: int) -> tuple[float, float]:
    """Median seconds of ``first`` and ``second``, run alternately (warm-up runs not counted)."""
    times: tuple[list[float], list[float]] = ([], [])
    for index in range(warmup + repeats):
        for side, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if index >= warmup:
                times[side].append(elapsed)
    return statistics.median(times[0]), statistics.median(times[1])


def _report(name: str, slow: float, fast: float, slow_label: str, fast_label: str) -> dict:
    ratio = slow / fast
    verdict = "ok" if ratio <= TARGET_RATIO else f"MISSES the {TARGET_RATIO}x target"
    print(f"{name}: {slow_label} {slow * 1e3:.1f} ms, {fast_label} {fast * 1e3:.1f} ms, "
          f"ratio {ratio:.2f}x ({verdict})", flush=True)
    return {"name": name, "slow_s": slow, "fast_s": fast, "ratio": ratio, "target": TARGET_RATIO}


def main(quick: bool = False) -> list[dict]:
    """Time both comparisons and print their ratios; returns the measurements."""
    size = QUICK if quick else FULL
    q, m, n_layers, seq_len, batch = (size[k] for k in ("vocab_size", "order", "n_layers", "seq_len", "batch"))
    disentangled = disentangled_transformer(q, m, seq_len, n_layers=n_layers, dtype=torch.float32, seed=0)
    cfg = disentangled.cfg
    plain = standard_transformer(
        q, seq_len, n_layers=n_layers, d_model=cfg.d_model, n_heads=1, attn_only=True,
        normalization=None, dtype=torch.float32, seed=0,
    )
    # standard_transformer sets d_head = d_model / n_heads; match the disentangled d_head instead.
    if plain.cfg.d_head != cfg.d_head:
        from transformer_lens import HookedTransformer

        from mdlens.models._tl import preserve_global_rng, quiet_hooked_transformer_deprecation

        plain_cfg = plain.cfg
        plain_cfg.d_head = cfg.d_head
        with preserve_global_rng(), quiet_hooked_transformer_deprecation():
            plain = HookedTransformer(plain_cfg)
    tokens = torch.randint(q, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    print(f"[models] d_model={cfg.d_model} d_head={cfg.d_head} n_layers={n_layers} batch={batch} T={seq_len} "
          f"float32, torch threads={torch.get_num_threads()}, median of {size['repeats']}", flush=True)

    results = []
    with torch.no_grad():
        cached, forward = _time_pair(
            lambda: disentangled.run_with_cache(tokens), lambda: disentangled(tokens), size["repeats"], size["warmup"]
        )
        results.append(_report("run_with_cache vs forward (disentangled)", cached, forward,
                               "run_with_cache", "forward"))
        # Reference (no target): TransformerLens' own caching overhead on the plain model of equal size.
        plain_cached, plain_forward = _time_pair(
            lambda: plain.run_with_cache(tokens), lambda: plain(tokens), size["repeats"], size["warmup"]
        )
        print(f"(reference) run_with_cache vs forward (plain HookedTransformer): "
              f"{plain_cached / plain_forward:.2f}x", flush=True)
        ours, theirs = _time_pair(lambda: disentangled(tokens), lambda: plain(tokens), size["repeats"], size["warmup"])
        results.append(_report("DisentangledTransformer vs plain HookedTransformer", ours, theirs,
                               "disentangled", "plain"))
    return results


if __name__ == "__main__":
    main()
