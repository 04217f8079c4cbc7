"""Experiments that reproduce and extend the paper; each writes JSON + PNG. Benchmarks: ``bench_*``."""

# The task every analysis and benchmark runs on: the one the shipped models were trained on
# (mdlens/pretrained/MANIFEST.json), so that their numbers can stand side by side.
TASK = {"vocab_size": 5, "order": 3, "alpha": 1.0, "seed": 0}
