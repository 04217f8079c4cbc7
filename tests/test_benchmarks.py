"""The benchmarks' plumbing (their numbers are measured by ``mdlens bench``, never asserted here)."""

import math

import pytest

from mdlens.analyses.bench import models as bench_models


@pytest.mark.skipif(not bench_models.has_glibc(), reason="the allocator comparison needs glibc")
def test_cache_benchmark_child_process_with_glibc_tunables_reports_three_timings():
    cached, forward, plain_ratio = bench_models._cache_ratios_keeping_freed_memory(quick=True)
    for value in (cached, forward, plain_ratio):
        assert math.isfinite(value) and value > 0
