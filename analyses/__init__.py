"""Experiments that reproduce and extend the paper; each writes JSON + PNG. Benchmarks: the ``bench`` package."""

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

_Item = TypeVar("_Item")

# The task every analysis and benchmark runs on: the one the shipped models were trained on
# (mdlens/pretrained/MANIFEST.json), so that their numbers can stand side by side.
TASK = {"vocab_size": 5, "order": 3, "alpha": 1.0, "seed": 0}

# The shipped models a ``--quick`` run of the per-model analyses (alignment, mechanisms) leaves out:
# disentangled-3l-long has disentangled-3l's architecture (only its training differs), so every code
# path still runs on the others. The full runs measure every model.
QUICK_LEFT_OUT = ("disentangled-3l-long",)


def progress(items: Iterable[_Item], stage: str, name: str = "T") -> Iterator[_Item]:
    """``items`` (the lengths, or the models, a stage loops over) under a progress bar on stderr named after
    the ``mdlens reproduce`` stage, showing ``name=item`` for the one being measured: each stage of
    ``reproduce all`` takes minutes, most of it at the longest lengths."""
    bar = tqdm(items, desc=stage, unit=name)
    for item in bar:
        bar.set_postfix_str(f"{name}={item}")
        yield item


@dataclass(frozen=True)
class AnalysisResult:
    """What an analysis's ``run()`` returns: ``report``, the content of the JSON file it wrote (the
    summary ``REPORT.md`` is built from), and ``files``, every file it wrote (JSON, PNG, HTML)."""

    report: dict
    files: list[str]


@dataclass(frozen=True)
class RunStart:
    """The start of an analysis's ``run()``: its output folder (created), its sizes and its clock."""

    out_dir: Path
    sizes: dict
    started: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.started


def start_run(out_dir: str | Path, quick: bool, full: dict, quick_sizes: dict) -> RunStart:
    """The preamble every ``run()`` shares: start the clock, create ``out_dir``, pick ``quick_sizes``
    under ``--quick`` and ``full`` otherwise."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return RunStart(out_dir, quick_sizes if quick else full, started)
