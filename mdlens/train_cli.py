"""``mdlens train``: build the task and the model, train with :func:`mdlens.training.train`, save.

The flags are the fields of :class:`~mdlens.training.TrainConfig` (the recipe) and of
:class:`~mdlens.train_config.RunConfig` (the task, the model, where to write), made in the torch-free
:mod:`mdlens.train_config`; ``--config FILE.json`` sets any of the same fields by name, and flags
override it. The shipped models' recipes are such files (``mdlens/pretrained/<name>/recipe/stage*.json``,
one per ``mdlens train`` run, each growing the one before with ``init_from``).

The command writes to ``--out``: the model (``mdlens.save``, so ``mdlens.load(out)`` works), the
training state for ``--resume`` (``train_state.pt``, unless ``--checkpoint-dir`` points elsewhere) and
``train.json`` with every field (usable as a ``--config`` file) and the held-out numbers. It refuses an
``--out`` that already holds files unless ``--resume`` (continue the run there) or ``--overwrite``.

Every mistake in what the user gave (a value no run can have, a missing or bad file, a run in the way)
is found before the first step and raised as :class:`CommandLineError`, which ``mdlens.cli`` prints in
argparse's ``error:`` form; an exception from inside training is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from mdlens.checkpoints import CONFIG_FILE, load, load_task, save
from mdlens.models import DisentangledTransformer
from mdlens.models.growth import grow
from mdlens.models.registry import build_for_task
from mdlens.task import MTDTask
from mdlens.train_config import (  # noqa: F401  (re-exported: the command's fields and flags)
    RunConfig,
    add_train_arguments,
    check_run_directories,
    command_fields,
    flag_name,
    make_configs,
    output_for_loss,
    read_config_file,
    resolve_configs,
    task_arguments,
)
from mdlens.training import TrainConfig, check_train_inputs, train

REPORT_FILE = "train.json"


class CommandLineError(ValueError):
    """A mistake in what the user gave ``mdlens train``; the CLI prints it as ``mdlens train: error: ...``."""


def build_model(run: RunConfig, config: TrainConfig) -> HookedTransformer:
    """The untrained float32 model the configs describe, initialised from ``config.seed``, with the
    readout its loss trains (:func:`mdlens.train_config.output_for_loss`)."""
    options = {"d_model": run.d_model} if run.model == "standard" else {}
    return build_for_task(
        run.model,
        run.vocab,
        run.order,
        config.seq_len,
        n_layers=run.layers,
        seed=config.seed,
        output=output_for_loss(run.model, config.loss),
        **options,
    )


def grow_from(model: HookedTransformer, task: MTDTask, directory: str, new_layers: str = "fresh") -> None:
    """``--init-from``: grow the saved model in ``directory`` into ``model`` (:func:`mdlens.models.grow`).

    The saved model must have been trained on the same task (same transition matrix and order).
    """
    if not isinstance(model, DisentangledTransformer):
        raise ValueError("--init-from works for disentangled models only")
    if not (Path(directory) / CONFIG_FILE).is_file():
        raise ValueError(f"--init-from {directory}: no saved model there (no {CONFIG_FILE})")
    source_task = load_task(directory)
    if (
        source_task is None
        or source_task.order != task.order
        or not torch.equal(source_task.transition, task.transition)
    ):
        raise ValueError(f"--init-from {directory}: that model was not trained on this task")
    grow(load(directory), model, new_layers)


def resolve_command(args: argparse.Namespace) -> tuple[RunConfig, TrainConfig]:
    """The configs the command line gives, with ``--out`` free for them (:func:`check_run_directories`);
    without torch. A ``ValueError`` here is the user's to fix: :class:`CommandLineError`."""
    try:
        run, config = resolve_configs(args)
        check_run_directories(run, config)
    except ValueError as error:
        raise CommandLineError(str(error)) from error
    return run, config


def prepare(run: RunConfig, config: TrainConfig) -> tuple[MTDTask, HookedTransformer]:
    """Everything else before the first step: the task and the (grown) model, checked against the
    config (:func:`mdlens.training.check_train_inputs`). A ``ValueError`` here is the user's to fix too."""
    try:
        task = MTDTask(**task_arguments(run))
        model = build_model(run, config)
        if run.init_from is not None:
            grow_from(model, task, run.init_from, run.new_layers)
        check_train_inputs(model, task, config)
    except ValueError as error:
        raise CommandLineError(str(error)) from error
    return task, model


def run_train_command(args: argparse.Namespace) -> None:
    """``mdlens train``: resolve the configs, build (or grow) the model, train, save, report."""
    train_run(*resolve_command(args))


def train_run(run: RunConfig, config: TrainConfig) -> None:
    """Build (or grow) the model the configs describe, train it, save it to ``run.out`` and report."""
    task, model = prepare(run, config)
    if run.threads is not None:
        torch.set_num_threads(run.threads)  # a process setting, not part of the recipe
    out = Path(run.out)
    result = train(model, task, config)
    save(model.to("cpu", print_details=False), out, task=task)  # TL's .cpu() prints a line
    final = result.final_eval
    report = {
        "fields": {**asdict(run), **asdict(config)},
        "train_config": asdict(config),
        "steps": result.steps,
        "samples": result.samples,
        "wall_clock_s": result.wall_clock_s,
        "final_eval": final,
        "evals": result.evals,
        "torch_threads": torch.get_num_threads(),
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1))
    print(
        f"[mdlens] trained {run.model} ({run.layers} layers): {result.steps} steps, "
        f"{result.samples} sequences, {result.wall_clock_s:.1f} s wall-clock"
    )
    print(
        f"[mdlens] held-out KL: model {final['kl_model']:.4g}, tuned 1-step MD {final['kl_md1']:.4g}, "
        f"tuned 2-step MD {final['kl_md2']:.4g}"
        + (f", Bayes {final['kl_bayes']:.4g}" if "kl_bayes" in final else "")
        + f", uniform {final['kl_uniform']:.4g}"
    )
    print(f"[mdlens] checkpoint: {out}")
