"""Trained reference models shipped inside the package: ``load_pretrained(name) -> (model, task)``.

Each model lives in ``mdlens/pretrained/<name>/`` as an ``mdlens.save`` checkpoint (``model.safetensors``
+ ``model.json``, the task included) next to the ``train.json`` report that ``mdlens train`` wrote.
``MANIFEST.json`` lists the shipped names with the exact ``mdlens train`` command that produced each,
its wall-clock, steps, samples and a one-line description; ``recipe`` names the same runs as config
files in ``<name>/recipe/`` (``mdlens train --config mdlens/pretrained/<name>/recipe/stage1.json``, then
stage 2, ..., each growing the model the stage before wrote). Nothing is downloaded: the checkpoints are
tiny and were produced by mdlens's own training command (see the manifest to reproduce them).

``root`` points the functions at another directory with the same layout (used by the tests, and to
load models you trained yourself into a directory of your own).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from mdlens.task import MTDTask

MANIFEST_FILE = "MANIFEST.json"
PRETRAINED_DIR = Path(__file__).resolve().parent


def _root(root: str | Path | None) -> Path:
    return PRETRAINED_DIR if root is None else Path(root)


def manifest(root: str | Path | None = None) -> dict[str, dict]:
    """The manifest: ``{name: {"command", "wall_clock_s", "steps", "samples", "description", ...}}``.

    An empty dict when no manifest exists (no models shipped in ``root``).
    """
    path = _root(root) / MANIFEST_FILE
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(entries, dict) or not all(isinstance(entry, dict) for entry in entries.values()):
        raise ValueError(f"{path} must map each model name to a dict of its details")
    return entries


def list_pretrained(root: str | Path | None = None) -> list[str]:
    """The names of the shipped models, sorted (e.g. ``["disentangled-3l", ...]``)."""
    return sorted(manifest(root))


def load_pretrained(name: str, root: str | Path | None = None) -> tuple[HookedTransformer, MTDTask]:
    """The shipped model ``name`` and the MTD task it was trained on.

    Args:
        name: one of :func:`list_pretrained`; anything else is a ``ValueError`` listing the known names.
        root: the directory holding ``MANIFEST.json`` and the model directories (default: the package's).

    Raises ``FileNotFoundError`` (naming the file and the command that regenerates it) when the manifest
    lists the model but its checkpoint files are missing.
    """
    from mdlens.checkpoints import CONFIG_FILE, WEIGHTS_FILE, load, load_task

    entries = manifest(root)
    if not isinstance(name, str) or name not in entries:
        known = ", ".join(sorted(entries)) or "none (no MANIFEST.json in " + str(_root(root)) + ")"
        raise ValueError(f"unknown pretrained model {name!r}; known: {known}")
    directory = _root(root) / name
    for file in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / file).exists():
            command = entries[name].get("command", "<no command recorded>")
            raise FileNotFoundError(
                f"pretrained model {name!r} is listed in the manifest but {directory / file} is missing; "
                f"regenerate it with: {command}"
            )
    model = load(directory)
    task = load_task(directory)
    if task is None:
        raise ValueError(f"pretrained model {name!r} at {directory} was saved without its task")
    return model, task


def load_all_pretrained(root: str | Path | None = None) -> tuple[dict[str, HookedTransformer], MTDTask]:
    """Every shipped model (in eval mode) by name, and the task they share; ``ValueError`` when there
    is none or when two were trained on different tasks (an analysis compares them on one task)."""
    names = list_pretrained(root=root)
    if not names:
        raise ValueError("no pretrained models found: ship them (see mdlens/pretrained/MANIFEST.json) or pass root")
    models, task = {}, None
    for name in names:
        model, model_task = load_pretrained(name, root=root)
        if task is not None and not torch.equal(task.transition, model_task.transition):
            raise ValueError(f"pretrained model {name!r} was trained on another task than {names[0]!r}")
        models[name], task = model.eval(), task or model_task
    return models, task


__all__ = ["list_pretrained", "load_all_pretrained", "load_pretrained", "manifest"]
