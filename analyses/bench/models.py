"""Benchmarks of the disentangled transformer, printed as ratios.

1. ``run_with_cache`` against a plain forward, on the same disentangled model (target <= 1.5x);
2. the ``DisentangledTransformer`` forward against a plain ``HookedTransformer`` of the same
   ``d_model``, ``n_layers``, ``n_heads`` and ``d_head`` (attention-only, no LayerNorm; target <= 1.5x).

Sizes (paper-notes §5): 3 layers, q = 5, m = 3 (window 4, so d_model = 68, d_head = 72),
T = 192, batch 256, float32, no gradients. Each measurement is the median of several repeats
after a warm-up; the two sides of a ratio are timed alternately so that machine load hits both.

Where ``run_with_cache``'s overhead comes from: not attention work but the memory the cache keeps.
glibc's ``malloc`` gives large freed blocks back to the kernel (``munmap``, heap trimming), so every
tensor the cache holds lands on fresh pages that are faulted in and zeroed on first touch, while a
plain forward reuses the blocks its freed intermediates leave behind. On Linux with glibc the
comparison is therefore measured twice, side by side: with the default allocator, and in a child
process with ``GLIBC_TUNABLES`` set so that freed memory is kept for reuse (:data:`KEEP_FREED_MEMORY`).
The second number is what caching itself costs; the setting is a plain environment variable a
researcher can export before starting Python (it trades a higher resident memory for speed).

Run with ``mdlens bench --only models`` (``--quick`` for small sizes).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from mdlens.models import disentangled_transformer, standard_transformer

FULL = {"vocab_size": 5, "order": 3, "n_layers": 3, "seq_len": 192, "batch": 256, "repeats": 7, "warmup": 2}
QUICK = {"vocab_size": 5, "order": 3, "n_layers": 3, "seq_len": 48, "batch": 32, "repeats": 3, "warmup": 1}
TARGET_RATIO = 1.5
# glibc: serve every allocation up to 4 GiB from the heap (no per-tensor mmap) and never trim it.
KEEP_FREED_MEMORY = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def _time_pair(
    first: Callable[[], object], second: Callable[[], object], repeats: int, warmup: int
) -> tuple[float, float]:
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
    print(
        f"{name}: {slow_label} {slow * 1e3:.1f} ms, {fast_label} {fast * 1e3:.1f} ms, ratio {ratio:.2f}x ({verdict})",
        flush=True,
    )
    return {"name": name, "slow_s": slow, "fast_s": fast, "ratio": ratio, "target": TARGET_RATIO}


def _models(size: dict):
    """The disentangled model of the benchmark and a plain ``HookedTransformer`` of equal size."""
    q, m, n_layers, seq_len = (size[k] for k in ("vocab_size", "order", "n_layers", "seq_len"))
    disentangled = disentangled_transformer(q, m, seq_len, n_layers=n_layers, dtype=torch.float32, seed=0)
    cfg = disentangled.cfg
    plain = standard_transformer(
        q,
        seq_len,
        n_layers=n_layers,
        d_model=cfg.d_model,
        n_heads=1,
        attn_only=True,
        normalization=None,
        dtype=torch.float32,
        seed=0,
    )
    # standard_transformer sets d_head = d_model / n_heads; match the disentangled d_head instead.
    if plain.cfg.d_head != cfg.d_head:
        from transformer_lens import HookedTransformer

        from mdlens.models.building import preserve_global_rng, quiet_hooked_transformer_deprecation

        plain_cfg = plain.cfg
        plain_cfg.d_head = cfg.d_head
        with preserve_global_rng(), quiet_hooked_transformer_deprecation():
            plain = HookedTransformer(plain_cfg)
    tokens = torch.randint(q, (size["batch"], seq_len), generator=torch.Generator().manual_seed(0))
    return disentangled, plain, tokens


def _cache_ratios(disentangled, plain, tokens, size: dict) -> tuple[float, float, float]:
    """``(run_with_cache s, forward s, TL's plain-model cache ratio)`` for the disentangled model."""
    with torch.no_grad():
        cached, forward = _time_pair(
            lambda: disentangled.run_with_cache(tokens), lambda: disentangled(tokens), size["repeats"], size["warmup"]
        )
        plain_cached, plain_forward = _time_pair(
            lambda: plain.run_with_cache(tokens), lambda: plain(tokens), size["repeats"], size["warmup"]
        )
    return cached, forward, plain_cached / plain_forward


def has_glibc() -> bool:
    """Whether this Python runs on glibc, whose malloc reads ``GLIBC_TUNABLES``."""
    return sys.platform.startswith("linux") and "glibc" in (os.confstr("CS_GNU_LIBC_VERSION") or "").lower()


def _cache_ratios_keeping_freed_memory(quick: bool) -> tuple[float, float, float] | None:
    """:func:`_cache_ratios` in a child process whose glibc keeps freed memory; None off glibc."""
    if not has_glibc():
        return None
    env = {**os.environ, "GLIBC_TUNABLES": KEEP_FREED_MEMORY, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.run(
        [sys.executable, "-m", "mdlens.analyses.bench.models", "--cache-ratios-only", *(["--quick"] if quick else [])],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    cached, forward, plain_ratio = (float(x) for x in child.stdout.split()[-3:])
    return cached, forward, plain_ratio


def main(quick: bool = False) -> list[dict]:
    """Time both comparisons and print their ratios; returns the measurements."""
    size = QUICK if quick else FULL
    disentangled, plain, tokens = _models(size)
    cfg = disentangled.cfg
    print(
        f"[models] d_model={cfg.d_model} d_head={cfg.d_head} n_layers={size['n_layers']} batch={size['batch']} "
        f"T={size['seq_len']} float32, torch threads={torch.get_num_threads()}, median of {size['repeats']}",
        flush=True,
    )

    results = []
    cached, forward, plain_ratio = _cache_ratios(disentangled, plain, tokens, size)
    results.append(
        _report(
            "run_with_cache vs forward (disentangled, default allocator)", cached, forward, "run_with_cache", "forward"
        )
    )
    # Reference (no target): TransformerLens' own caching overhead on the plain model of equal size.
    print(
        f"(reference) run_with_cache vs forward (plain HookedTransformer, default allocator): {plain_ratio:.2f}x",
        flush=True,
    )
    kept = _cache_ratios_keeping_freed_memory(quick)
    if kept is None:
        print("(glibc not found: the allocator comparison is skipped)", flush=True)
    else:
        default_forward = forward
        cached, forward, plain_ratio = kept
        # What the setting itself buys a plain forward (the two sides in two processes, one after the
        # other; the Makefile's demo and tests run with it).
        print(
            f"(allocator) disentangled forward: default {default_forward * 1e3:.1f} ms, freed memory kept "
            f"{forward * 1e3:.1f} ms: {default_forward / forward:.2f}x faster",
            flush=True,
        )
        results.append(
            _report(
                f"run_with_cache vs forward (disentangled, GLIBC_TUNABLES={KEEP_FREED_MEMORY})",
                cached,
                forward,
                "run_with_cache",
                "forward",
            )
        )
        print(
            f"(reference) run_with_cache vs forward (plain HookedTransformer, same setting): {plain_ratio:.2f}x",
            flush=True,
        )
    with torch.no_grad():
        ours, theirs = _time_pair(lambda: disentangled(tokens), lambda: plain(tokens), size["repeats"], size["warmup"])
    results.append(_report("DisentangledTransformer vs plain HookedTransformer", ours, theirs, "disentangled", "plain"))
    return results


if __name__ == "__main__":
    if "--cache-ratios-only" in sys.argv:  # the child process of _cache_ratios_keeping_freed_memory
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        child_size = QUICK if "--quick" in sys.argv else FULL
        print(*_cache_ratios(*_models(child_size), child_size))
    else:
        main(quick="--quick" in sys.argv)
