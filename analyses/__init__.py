"""Experiments that reproduce and extend the paper; each writes JSON + PNG. Benchmarks: ``bench_*``."""
