"""Experiments that reproduce and extend the paper; each writes JSON + PNG. Benchmarks: the ``bench`` package."""

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

_Item = TypeVar("_Item")

# The task every analysis and benchmark runs on: the one the shipped models were trained on
# (mdlens/pretrained/MANIFEST.json), so that their numbers can stand side by side.
TASK = {"vocab_size": 5, "order": 3, "alpha": 1.0, "seed": 0}


def progress(items: Iterable[_Item], stage: str, name: str = "T") -> Iterator[_Item]:
    """``items`` (the lengths, or the models, a stage loops over) under a progress bar on stderr named after
    the ``mdlens reproduce`` stage, showing ``name=item`` for the one being measured: each stage of
    ``reproduce all`` takes minutes, most of it at the longest lengths."""
    bar = tqdm(items, desc=stage, unit=name)
    for item in bar:
        bar.set_postfix_str(f"{name}={item}")
        yield item
