"""``mdlens train``: build the task and the model, train with :func:`mdlens.training.train`, save.

Every flag is a dataclass field: one per field of :class:`~mdlens.training.TrainConfig` (the recipe)
and of :class:`RunConfig` (the task, the model, where to write), with the field's name
(``batch_size`` -> ``--batch-size``), type, default and help, so that the command and the Python API
cannot drift apart. ``--config FILE.json`` sets any of the same fields by name, and flags override it;
the shipped models' recipes are such files (``mdlens/pretrained/<name>/recipe/stage*.json``, one per
``mdlens train`` run, each growing the one before with ``init_from``).

The command writes to ``--out``: the model (``mdlens.save``, so ``mdlens.load(out)`` works), the
training state for ``--resume`` (``train_state.pt``, unless ``--checkpoint-dir`` points elsewhere) and
``train.json`` with every field (usable as a ``--config`` file) and the held-out numbers.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import Field, asdict, dataclass, fields
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from mdlens._validation import check_int
from mdlens.checkpoints import MODEL_KINDS, load, load_task, save
from mdlens.models import DisentangledTransformer, standard_transformer
from mdlens.models.growth import NEW_LAYER_RULES, grow
from mdlens.task import MTDTask
from mdlens.training import TrainConfig, config_field, train

# Shorter spellings kept from earlier versions of the command (the MANIFEST's commands use them).
FLAG_ALIASES = {"batch_size": ("--batch",), "warmup_steps": ("--warmup",)}
NOT_GIVEN = argparse.SUPPRESS  # every flag's default: argparse then sets no attribute at all


@dataclass
class RunConfig:
    """What ``mdlens train`` needs besides the :class:`~mdlens.training.TrainConfig`: the task, the
    model and where to write. ``seq_len`` (the model's ``n_ctx``) and ``seed`` (its initialisation)
    come from the ``TrainConfig``."""

    model: str = config_field("disentangled", "architecture: disentangled | standard")
    layers: int = config_field(3, "number of layers")
    vocab: int = config_field(5, "vocabulary size q of the task")
    order: int = config_field(3, "MTD order m of the task")
    alpha: float = config_field(1.0, "Dirichlet concentration of lambda")
    task_seed: int = config_field(0, "seed of the task's transition matrix")
    d_model: int = config_field(64, "residual width of a standard model")
    init_from: str | None = config_field(
        None, "start from the saved disentangled model in this directory (same task), grown as --new-layers says"
    )
    new_layers: str = config_field(
        "fresh",
        "with --init-from: fresh (new layers on top, freshly initialised) | repeat_last (inserted before the "
        "last layer, as copies of it) | insert_fresh (fresh, between the saved layers and a copy of its last "
        "layer on top)",
    )
    threads: int | None = config_field(
        None, "torch intra-op CPU threads (none: torch's choice); 1 is often fastest on a busy machine"
    )
    out: str | None = config_field(None, "output directory (required)")

    def __post_init__(self) -> None:
        if self.out is None:
            raise ValueError("mdlens train needs --out (or 'out' in the config file)")
        if self.model not in MODEL_KINDS:
            raise ValueError(f"--model must be one of {MODEL_KINDS}, got {self.model!r}")
        if self.new_layers not in NEW_LAYER_RULES:
            raise ValueError(f"--new-layers must be one of {NEW_LAYER_RULES}, got {self.new_layers!r}")
        if self.new_layers != "fresh" and self.init_from is None:
            raise ValueError("--new-layers only applies with --init-from")
        if self.threads is not None:
            check_int(self.threads, "--threads", 1)


def command_fields() -> list[Field]:
    """The fields that ``mdlens train`` has a flag for: :class:`RunConfig`'s, then ``TrainConfig``'s."""
    return [*fields(RunConfig), *fields(TrainConfig)]


def flag_name(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _value_parser(kind):
    """The argparse ``type`` for a field annotated ``kind``; ``X | None`` also accepts ``none``."""
    options = typing.get_args(kind)
    base = next(option for option in options if option is not type(None)) if options else kind

    def parse(text: str):
        if options and text.lower() == "none":
            return None
        return base(text)

    parse.__name__ = base.__name__  # argparse names it in "invalid int value: ..."
    return parse


def _shown(value) -> str:
    return "none" if value is None else str(value)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mdlens train`` (called from ``mdlens.cli.build_parser``), one per field.

    A flag that is not given leaves no attribute in the parsed namespace (``argparse.SUPPRESS``), so
    that :func:`resolve_configs` can tell it from the ``--config`` file under it (``--grad-clip none``
    is given, and means ``None``); the help shows the field's own default.
    """
    parser.add_argument("--config", help="JSON file with any of the fields below, by name (flags override it)")
    hints = {**typing.get_type_hints(RunConfig), **typing.get_type_hints(TrainConfig)}
    groups = {
        "RunConfig": parser.add_argument_group("task, model and output"),
        "TrainConfig": parser.add_argument_group("training recipe (mdlens.training.TrainConfig)"),
    }
    for owner, owner_fields in (("RunConfig", fields(RunConfig)), ("TrainConfig", fields(TrainConfig))):
        for spec in owner_fields:
            flags = [flag_name(spec.name), *FLAG_ALIASES.get(spec.name, ())]
            text = f"{spec.metadata['help']} (default: {_shown(spec.default)})"
            if hints[spec.name] is bool:
                action = argparse.BooleanOptionalAction
                groups[owner].add_argument(*flags, dest=spec.name, action=action, default=NOT_GIVEN, help=text)
            else:
                kind = _value_parser(hints[spec.name])
                groups[owner].add_argument(*flags, dest=spec.name, type=kind, default=NOT_GIVEN, help=text)
    parser.set_defaults(handler=run_train_command)


def read_config_file(path: str | Path) -> dict:
    """The fields a ``--config`` JSON file sets; a key that is not a field is an error."""
    loaded = json.loads(Path(path).read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a JSON object of fields, got {type(loaded).__name__}")
    known = [spec.name for spec in command_fields()]
    unknown = sorted(set(loaded) - set(known))
    if unknown:
        raise ValueError(f"unknown fields in {path}: {unknown}; known: {sorted(known)}")
    return loaded


def make_configs(values: dict) -> tuple[RunConfig, TrainConfig]:
    """``values`` over the fields' defaults, split into the two configs; ``checkpoint_dir`` defaults to
    ``out`` (the training state lives next to the model)."""
    run = RunConfig(**{spec.name: values[spec.name] for spec in fields(RunConfig) if spec.name in values})
    recipe = {spec.name: values[spec.name] for spec in fields(TrainConfig) if spec.name in values}
    if recipe.get("checkpoint_dir") is None:
        recipe["checkpoint_dir"] = run.out
    return run, TrainConfig(**recipe)


def resolve_configs(args: argparse.Namespace) -> tuple[RunConfig, TrainConfig]:
    """Flags over the ``--config`` file over the defaults."""
    values = read_config_file(args.config) if args.config else {}
    values.update({spec.name: getattr(args, spec.name) for spec in command_fields() if hasattr(args, spec.name)})
    return make_configs(values)


def build_model(run: RunConfig, config: TrainConfig) -> HookedTransformer:
    """The untrained float32 model the configs describe, initialised from ``config.seed``."""
    if run.model == "standard":
        # A standard model outputs logits; "mse" is then taken on their softmax.
        return standard_transformer(
            run.vocab, config.seq_len, n_layers=run.layers, d_model=run.d_model, seed=config.seed, output="logits"
        )
    # The paper's disentangled readout is a probability vector trained with MSE; with "ce" it is read
    # as logits instead (softmax), so that cross-entropy has something to take the log of.
    return DisentangledTransformer(
        run.vocab,
        config.seq_len,
        n_layers=run.layers,
        window=run.order + 1,
        seed=config.seed,
        order=run.order,
        output="logits" if config.loss == "ce" else "probs",
    )


def grow_from(model: HookedTransformer, task: MTDTask, directory: str, new_layers: str = "fresh") -> None:
    """``--init-from``: grow the saved model in ``directory`` into ``model`` (:func:`mdlens.models.grow`).

    The saved model must have been trained on the same task (same transition matrix and order).
    """
    if not isinstance(model, DisentangledTransformer):
        raise ValueError("--init-from works for disentangled models only")
    source_task = load_task(directory)
    if (
        source_task is None
        or source_task.order != task.order
        or not torch.equal(source_task.transition, task.transition)
    ):
        raise ValueError(f"--init-from {directory}: that model was not trained on this task")
    grow(load(directory), model, new_layers)


def run_train_command(args: argparse.Namespace) -> None:
    """``mdlens train``: resolve the configs, build (or grow) the model, train, save, report."""
    run, config = resolve_configs(args)
    if run.threads is not None:
        torch.set_num_threads(run.threads)  # a process setting, not part of the recipe
    out = Path(run.out)
    task = MTDTask(vocab_size=run.vocab, order=run.order, alpha=run.alpha, seed=run.task_seed)
    model = build_model(run, config)
    if run.init_from is not None:
        grow_from(model, task, run.init_from, run.new_layers)
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
    (out / "train.json").write_text(json.dumps(report, indent=1))
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
