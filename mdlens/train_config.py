"""What decides a training run, without torch: :class:`TrainConfig` (the recipe), :class:`RunConfig`
(what ``mdlens train`` adds: the task, the model, where to write) and the flags made from their fields.

Every flag of ``mdlens train`` is a dataclass field, with the field's name (``batch_size`` ->
``--batch-size``), type, default and help, so that the command and the Python API cannot drift apart;
``--config FILE.json`` sets any of the same fields by name, and flags override it. The module imports
neither torch nor TransformerLens, so that ``mdlens train --help`` lists the fields at once and a
value no run can have is refused at once. :mod:`mdlens.training` runs a ``TrainConfig``; :mod:`mdlens.train_cli`
runs the command.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import numbers
import os
import typing
from dataclasses import Field, dataclass, field, fields
from pathlib import Path

LOSSES = ("mse", "ce")
TARGETS = ("last", "all")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
# TrainConfig fields that do not change the trained weights: a resumed run may set them differently.
RUNTIME_FIELDS = ("resume", "progress", "device", "checkpoint_dir", "checkpoint_every", "eval_every", "log_every")


def config_field(default, text: str, required: bool = False):
    """A config field with its one-line help (``mdlens train --help`` shows it); ``required``: the help
    says so instead of showing the default (``None``, which the config's own check refuses)."""
    return field(default=default, metadata={"help": text, "required": required})


@dataclass
class TrainConfig:
    """Everything that decides a training run (and nothing else: same config and seed, same weights).

    Each field's ``metadata["help"]`` says what it does; ``mdlens train`` makes one flag of each
    (:mod:`mdlens.train_cli`). Two of them need more than a line:

    - ``position_weight_exponent``: with ``targets="all"``, the loss at position ``t`` is weighted by
      ``(t - m) ** position_weight_exponent`` (normalised to mean 1 over the positions). 0 is the plain
      mean; > 0 leans on long prefixes (the excess KL of an estimator falls roughly like ``1 / (t - m)``,
      so 1 makes each position's *relative* error count about equally); < 0 leans on short ones (-0.5
      from scratch kept the 3-layer model's outputs positive on short prefixes, where the MSE optimum
      lets small ones dip below zero: an infinite KL; it did not for 5 layers, ``shortfall_weight`` did).
    - ``shortfall_weight``: with ``loss="mse"``, add ``shortfall_weight * sum_v relu(p*_v / 2 - p_v)^2 / p*_v``
      (over ``p*_v > 0``) to each position's loss, where ``p*`` is the true predictive and ``p`` the
      model's. It is zero unless the model puts less than half the true probability on some token: the
      error that makes the KL large (infinite once ``p_v <= 0``) while costing MSE almost nothing when
      ``p*_v`` is small, hence the chi-square-like division by ``p*_v``. 0 is the paper's plain MSE.
    """

    steps: int = config_field(2000, "optimizer steps in total (a resumed run continues up to this number)")
    batch_size: int = config_field(64, "sequences per step, each with its own fresh lambda")
    seq_len: int = config_field(192, "training context length T (mdlens train: also the model's n_ctx)")
    lr: float = config_field(3e-3, "peak learning rate")
    optimizer: str = config_field("adam", "adam | adamw")
    weight_decay: float = config_field(0.0, "the optimizer's weight decay")
    lr_schedule: str = config_field(
        "cosine", "constant | cosine (decay to min_lr_ratio * lr at the last step), after the warm-up"
    )
    warmup_steps: int = config_field(0, "steps of linear learning-rate warm-up")
    min_lr_ratio: float = config_field(0.05, "the cosine schedule's final learning rate, as a fraction of lr")
    grad_clip: float | None = config_field(1.0, "clip the global gradient norm to this value (none: no clipping)")
    loss: str = config_field(
        "mse",
        "mse (on the predicted distribution, the paper's) | ce (cross-entropy against the true predictive, "
        "on the model's logits; mdlens train builds its model with a logits output for it)",
    )
    targets: str = config_field("all", "last (the paper's) | all (every position t > m)")
    position_weight_exponent: float = config_field(
        0.0, "with targets all: weight the loss at position t by (t - m)^this (mean 1); > 0 leans on long prefixes"
    )
    shortfall_weight: float = config_field(
        0.0,
        "with loss mse: add this times (p*/2 - p)^2 / p* for each output p below half its true probability p* "
        "(keeps small ones positive)",
    )
    freeze_layers: int = config_field(
        0, "keep the parameters of the first N layers as they are (e.g. those grown from)"
    )
    curriculum_start_len: int | None = config_field(
        None, "grow T linearly from this length to seq_len over curriculum_steps (none: no curriculum)"
    )
    curriculum_steps: int = config_field(0, "steps of the length curriculum")
    eval_every: int = config_field(250, "evaluate on the held-out batch every N steps (0: only at the end)")
    eval_batch_size: int = config_field(
        512, "sequences in the held-out batch (and in the batch its references are tuned on)"
    )
    eval_seed: int = config_field(1234, "seed of the held-out batch (the same batch whatever the training seed)")
    eval_bayes: bool = config_field(True, "also score the exact Bayes reference on the held-out batch (once)")
    checkpoint_dir: str | None = config_field(
        None, "where to write the training state (none: nowhere; mdlens train: the --out directory)"
    )
    checkpoint_every: int = config_field(500, "write the training state every N steps, and at the end")
    resume: bool = config_field(False, "continue from the training state in checkpoint_dir, if there is one")
    seed: int = config_field(0, "seed of the training batches (mdlens train: also of the model's initialisation)")
    device: str = config_field("auto", "auto (CUDA when present) | cpu | cuda")
    progress: bool = config_field(True, "show a progress bar with the live loss and KL")
    log_every: int = config_field(10, "record the training loss every N steps")

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("steps", "batch_size", "seq_len", "eval_batch_size", "log_every"):
            _check_at_least(getattr(self, name), name, 1)
        for name in (
            "warmup_steps",
            "freeze_layers",
            "curriculum_steps",
            "eval_every",
            "checkpoint_every",
            "seed",
            "eval_seed",
        ):
            _check_at_least(getattr(self, name), name, 0)
        _check_finite_positive(self.lr, "lr")
        if self.grad_clip is not None:
            _check_finite_positive(self.grad_clip, "grad_clip")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        for name, allowed in (
            ("loss", LOSSES),
            ("targets", TARGETS),
            ("optimizer", OPTIMIZERS),
            ("lr_schedule", LR_SCHEDULES),
            ("device", DEVICES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.curriculum_start_len is not None and not 1 <= self.curriculum_start_len <= self.seq_len:
            raise ValueError(
                f"curriculum_start_len must lie in [1, seq_len={self.seq_len}], got {self.curriculum_start_len}"
            )
        if not math.isfinite(self.position_weight_exponent):
            raise ValueError(f"position_weight_exponent must be finite, got {self.position_weight_exponent}")
        if self.position_weight_exponent != 0 and self.targets != "all":
            raise ValueError(
                "position_weight_exponent weights the positions of targets='all'; with "
                f"targets={self.targets!r} there is one position"
            )
        if not (math.isfinite(self.shortfall_weight) and self.shortfall_weight >= 0):
            raise ValueError(f"shortfall_weight must be finite and >= 0, got {self.shortfall_weight}")
        if self.shortfall_weight != 0 and self.loss != "mse":
            raise ValueError(f"shortfall_weight adds to loss='mse'; loss={self.loss!r} is already infinite at p_v = 0")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir to resume from")


# What ``mdlens train`` builds (mdlens.train_cli.build_model): the paper's disentangled transformer
# or a standard one (the model kinds of mdlens.models.registry that are built for a task).
ARCHITECTURES = ("disentangled", "standard")


def output_for_loss(model: str, loss: str) -> str:
    """The readout a model of architecture ``model`` is trained with under ``loss``: ``"logits"`` for
    ``"ce"`` (cross-entropy needs something to take the log of); for ``"mse"`` the paper's disentangled
    readout, the probability vector itself (``"probs"``), and a standard model's logits (MSE is then
    taken on their softmax)."""
    if model not in ARCHITECTURES:
        raise ValueError(f"model must be one of {ARCHITECTURES}, got {model!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return "probs" if model == "disentangled" and loss == "mse" else "logits"


@dataclass
class RunConfig:
    """What ``mdlens train`` needs besides the :class:`TrainConfig`: the task, the model and where to
    write. ``seq_len`` (the model's ``n_ctx``) and ``seed`` (its initialisation) come from the
    ``TrainConfig``."""

    model: str = config_field("disentangled", f"architecture: {' | '.join(ARCHITECTURES)}")
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
    out: str | None = config_field(None, "output directory (as a flag or as 'out' in the --config file)", required=True)
    overwrite: bool = config_field(
        False, "write over what --out already holds (without it, or --resume, mdlens train refuses a non-empty --out)"
    )

    def __post_init__(self) -> None:
        if self.out is None:
            raise ValueError("mdlens train needs --out (or 'out' in the config file)")
        check_field_types(self)
        for name, minimum in (("layers", 1), ("vocab", 2), ("order", 1), ("task_seed", 0), ("d_model", 1)):
            _check_at_least(getattr(self, name), flag_name(name), minimum)
        _check_finite_positive(self.alpha, "--alpha")
        if self.threads is not None:
            _check_at_least(self.threads, "--threads", 1)
        if self.model not in ARCHITECTURES:
            raise ValueError(f"--model must be one of {ARCHITECTURES}, got {self.model!r}")
        if self.init_from is None:
            if self.new_layers != "fresh":
                raise ValueError("--new-layers only applies with --init-from")
        else:
            if self.model != "disentangled":
                raise ValueError("--init-from works for disentangled models only")
            from mdlens.models.growth import NEW_LAYER_RULES  # torch: growing a model needs it anyway

            if self.new_layers not in NEW_LAYER_RULES:
                raise ValueError(f"--new-layers must be one of {NEW_LAYER_RULES}, got {self.new_layers!r}")


# The task's fields of RunConfig (flag names) -> the MTDTask arguments they set: the one translation
# between the command line's spelling of the task and the task's own (mdlens.task.TASK_ARGUMENTS).
TASK_FIELDS = {"vocab": "vocab_size", "order": "order", "alpha": "alpha", "task_seed": "seed"}


def task_arguments(run: RunConfig) -> dict:
    """The ``MTDTask`` keyword arguments ``run`` describes: ``MTDTask(**task_arguments(run))``."""
    return {argument: getattr(run, name) for name, argument in TASK_FIELDS.items()}


def task_fields(arguments: dict) -> dict:
    """The :class:`RunConfig` fields (``mdlens train --config`` keys) of a task given by its ``MTDTask``
    keyword arguments ``vocab_size``, ``order``, ``alpha`` and ``seed`` (others are a ``ValueError``:
    the command cannot set them)."""
    names = {argument: name for name, argument in TASK_FIELDS.items()}
    unknown = sorted(set(arguments) - set(names))
    if unknown:
        raise ValueError(f"mdlens train sets the task's {sorted(names)}, not {unknown}")
    return {names[argument]: value for argument, value in arguments.items()}


def command_fields() -> list[Field]:
    """The fields that ``mdlens train`` has a flag for: :class:`RunConfig`'s, then ``TrainConfig``'s."""
    return [*fields(RunConfig), *fields(TrainConfig)]


def flag_name(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


# Shorter spellings kept from earlier versions of the command (the MANIFEST's commands use them).
FLAG_ALIASES = {"batch_size": ("--batch",), "warmup_steps": ("--warmup",)}
NOT_GIVEN = argparse.SUPPRESS  # every flag's default: argparse then sets no attribute at all


@functools.cache
def _field_types() -> dict[str, typing.Any]:
    return {**typing.get_type_hints(RunConfig), **typing.get_type_hints(TrainConfig)}


def check_field_types(config: TrainConfig | RunConfig) -> None:
    """Each field of ``config`` holds a value of its annotated type (``ValueError`` naming it), and keeps
    it as that plain Python type (a numpy or 0-d tensor integer as an ``int``, a path as a ``str``), so
    that the config's JSON (``asdict``) and its comparison with a saved one hold whatever was passed."""
    hints = _field_types()
    for spec in fields(config):
        value = _typed_value(spec.name, getattr(config, spec.name), hints[spec.name], type(config).__name__)
        object.__setattr__(config, spec.name, value)


def _check_at_least(value: int, name: str, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_finite_positive(value: float, name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def _base_type(kind) -> tuple[type, bool]:
    """``int`` -> ``(int, False)``; ``int | None`` -> ``(int, True)``."""
    options = typing.get_args(kind)
    if not options:
        return kind, False
    return next(option for option in options if option is not type(None)), True


def _value_parser(kind):
    """The argparse ``type`` for a field annotated ``kind``; ``X | None`` also accepts ``none``."""
    base, optional = _base_type(kind)

    def parse(text: str):
        if optional and text.lower() == "none":
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
    hints = _field_types()
    groups = {
        "RunConfig": parser.add_argument_group("task, model and output"),
        "TrainConfig": parser.add_argument_group("training recipe (the fields of mdlens.training.TrainConfig)"),
    }
    for owner, owner_fields in (("RunConfig", fields(RunConfig)), ("TrainConfig", fields(TrainConfig))):
        for spec in owner_fields:
            flags = [flag_name(spec.name), *FLAG_ALIASES.get(spec.name, ())]
            shown = "required" if spec.metadata.get("required") else f"default: {_shown(spec.default)}"
            text = f"{spec.metadata['help']} ({shown})"
            if hints[spec.name] is bool:
                action = argparse.BooleanOptionalAction
                groups[owner].add_argument(*flags, dest=spec.name, action=action, default=NOT_GIVEN, help=text)
            else:
                kind = _value_parser(hints[spec.name])
                groups[owner].add_argument(*flags, dest=spec.name, type=kind, default=NOT_GIVEN, help=text)


def _typed_value(name: str, value, kind, source: str):
    """``value`` as the plain Python type ``kind`` of the field ``name``: an integral number (a numpy
    integer or a 0-d integer tensor included, not a bool) for an int field, a real number for a float
    field, a string or path for a str field; ``ValueError`` saying where it came from (``source``)
    otherwise."""
    base, optional = _base_type(kind)
    if value is None and optional:
        return None
    typed = None
    if base is bool:
        typed = value if isinstance(value, bool) else None
    elif base is int:
        typed = _plain_int(value)
    elif base is float:
        typed = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
    elif isinstance(value, (str, os.PathLike)):
        typed = os.fspath(value)
    if typed is None:
        wanted = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[base]
        raise ValueError(f"{source}: {name} must be {wanted}{' or null' if optional else ''}, got {value!r}")
    return typed


def _plain_int(value) -> int | None:
    """An integral number as an ``int`` (``None`` if it is not one), without importing torch: any
    ``numbers.Integral`` but ``bool``, or a 0-d array or tensor whose Python number is one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return _plain_int(value.item())
    return None


def read_config_file(path: str | Path) -> dict:
    """The fields a ``--config`` JSON file sets; a missing or unreadable file, bad JSON, a key that is
    not a field or a value of the wrong type is a ``ValueError`` that says so."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ValueError(f"cannot read the config file {path}: {error.strerror or error}") from error
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"the config file {path} is not valid JSON: {error}") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a JSON object of fields, got {type(loaded).__name__}")
    known = [spec.name for spec in command_fields()]
    unknown = sorted(set(loaded) - set(known))
    if unknown:
        raise ValueError(f"unknown fields in {path}: {unknown}; known: {sorted(known)}")
    hints = _field_types()
    return {name: _typed_value(name, value, hints[name], str(path)) for name, value in loaded.items()}


def make_configs(values: dict) -> tuple[RunConfig, TrainConfig]:
    """``values`` over the fields' defaults, split into the two configs; ``checkpoint_dir`` defaults to
    ``out`` (the training state lives next to the model). ``ValueError`` for a value, or a pair of
    values, that no run can have."""
    run = RunConfig(**{spec.name: values[spec.name] for spec in fields(RunConfig) if spec.name in values})
    recipe = {spec.name: values[spec.name] for spec in fields(TrainConfig) if spec.name in values}
    if recipe.get("checkpoint_dir") is None:
        recipe["checkpoint_dir"] = run.out
    config = TrainConfig(**recipe)
    if config.seq_len <= run.order:
        raise ValueError(f"--seq-len must exceed --order (positions m+1..T are scored), got {config.seq_len}")
    if config.freeze_layers > run.layers:
        raise ValueError(f"--freeze-layers {config.freeze_layers} exceeds the model's --layers {run.layers}")
    if run.overwrite and config.resume:
        raise ValueError("--overwrite replaces the run in --out and --resume continues it: give one of them")
    return run, config


def check_run_directories(run: RunConfig, config: TrainConfig) -> None:
    """The directories a run reads and writes. ``--out`` (and ``--checkpoint-dir``) must be new or empty directories unless the command continues
    the run there (``--resume``) or was told to write over it (``--overwrite``): a new run never
    silently replaces one. ``--init-from`` must be a directory."""
    if run.init_from is not None and not Path(run.init_from).is_dir():
        raise ValueError(f"--init-from {run.init_from}: no such directory")
    places = {"--out": Path(run.out)}
    if config.checkpoint_dir is not None and Path(config.checkpoint_dir) != Path(run.out):
        places["--checkpoint-dir"] = Path(config.checkpoint_dir)
    for flag, directory in places.items():
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{flag} {directory} is a file, not a directory")
        found = sorted(path.name for path in directory.iterdir()) if directory.is_dir() else []
        if found and not (config.resume or run.overwrite):
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise ValueError(
                f"{flag} {directory} already holds files ({shown}): pass --resume to continue the run there "
                "or --overwrite to write over it"
            )


def resolve_configs(args: argparse.Namespace) -> tuple[RunConfig, TrainConfig]:
    """Flags over the ``--config`` file over the defaults."""
    values = read_config_file(args.config) if args.config else {}
    values.update({spec.name: getattr(args, spec.name) for spec in command_fields() if hasattr(args, spec.name)})
    return make_configs(values)
