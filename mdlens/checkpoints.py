"""Checkpoints: ``mdlens.save(model, directory)`` / ``mdlens.load(directory)``.

A checkpoint is a directory with two files:

- ``model.safetensors``: the model's ``state_dict`` (every parameter, frozen ones included), bit-exact;
- ``model.json``: how to rebuild the model around those weights: the format version, the model kind
  (``"disentangled"`` or ``"standard"``) and the arguments of its builder, its TransformerLens
  config (for reading; the model is rebuilt from the builder arguments), ``output_type``, the
  residual layout with its names (a construction's aliases included), construction parameters
  (``model.md_params``) when present, the task (transition, order, alpha, seed) when given, the
  model's tokenizer (:func:`mdlens.models.tokenizer.tokenizer_to_dict`; ``null`` for a model without
  one, which only a plain ``HookedTransformer`` can be) and the SHA-256 of the weights file.

A plain ``HookedTransformer`` that mdlens did not build (a user's own, from a
``HookedTransformerConfig``) is saved the same way with kind ``"hooked_transformer"``: its builder
argument is the config itself (every field, dtype by name), and loading builds
``HookedTransformer(cfg)`` on the CPU (with the saved tokenizer when it had one, so nothing is
downloaded; without a tokenizer when it had none) and loads the weights as above.

Format versions: 2 adds ``tokenizer``; version 1 files (written before, the shipped checkpoints
among them) still load and get the default tokenizer :func:`~mdlens.models.tokenizer.vocabulary_tokenizer`.

Loading builds a fresh model, checks the weights file against the recorded hash (a truncated or
swapped file is caught before anything is read), loads the weights strictly (every key, every
shape, every dtype) and only then returns the model: a failure raises and never hands back a
half-loaded model. Every loaded model has a tokenizer (``model.to_tokens("3 1 4")`` works). Both
files are written to temporary names first and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mdlens.models.building import preserve_global_rng, quiet_hooked_transformer_deprecation
from mdlens.models.dtypes import DTYPES, PLAIN_DTYPES, dtype_name
from mdlens.models.layout import ResidualLayout
from mdlens.models.registry import MODEL_KINDS, build_model, build_plain
from mdlens.models.tokenizer import attach_tokenizer, tokenizer_from_dict, tokenizer_to_dict
from mdlens.task import TASK_ARGUMENTS, MTDTask

FORMAT_NAME = "mdlens-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no tokenizer field (the default vocabulary tokenizer)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"


# ---------------------------------------------------------------------------------------------------
# Saving


def save(model: HookedTransformer, directory: str | Path, task: MTDTask | None = None) -> Path:
    """Write ``model`` (and the ``task`` it is meant for, if given) to ``directory``; returns it.

    The model is one mdlens built (it carries ``mdlens_kind`` and ``mdlens_args``) or a plain
    ``HookedTransformer`` (exactly that class: a subclass may compute something its config does not
    say), saved as its config plus its state dict. Other files in ``directory`` (training state,
    reports) are left alone.
    """
    kind, args = _model_spec(model)
    if task is not None and not isinstance(task, MTDTask):
        raise ValueError(f"task must be an MTDTask or None, got {type(task).__name__}")
    tokenizer = tokenizer_to_dict(model.tokenizer) if model.tokenizer is not None else None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    weights = {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    weights_tmp = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(weights, str(weights_tmp))
    layout = getattr(model, "layout", None)
    config = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": kind,
        "args": args,
        "output_type": getattr(model, "output_type", "logits"),
        "layout": layout.to_dict() if layout is not None else None,
        "md_params": _to_json(getattr(model, "md_params", None)),
        "task": _task_to_json(task) if task is not None else None,
        "tokenizer": tokenizer,
        "weights_sha256": _sha256(weights_tmp),
        "transformer_lens_cfg": _to_json(model.cfg.to_dict()),
    }
    config_tmp = directory / f".{CONFIG_FILE}.tmp"
    config_tmp.write_text(json.dumps(config, indent=1))
    os.replace(weights_tmp, directory / WEIGHTS_FILE)
    os.replace(config_tmp, directory / CONFIG_FILE)
    return directory


def _model_spec(model: HookedTransformer) -> tuple[str, dict]:
    if not isinstance(model, HookedTransformer):
        raise ValueError(f"mdlens.save takes a HookedTransformer, got {type(model).__name__}")
    kind, args = getattr(model, "mdlens_kind", None), getattr(model, "mdlens_args", None)
    if kind in MODEL_KINDS and isinstance(args, dict):
        return kind, dict(args)
    if type(model) is HookedTransformer:
        return "hooked_transformer", {"cfg": _cfg_to_json(model.cfg)}
    raise ValueError(
        f"{type(model).__name__} is a HookedTransformer subclass that mdlens did not build (no mdlens_kind / "
        "mdlens_args): mdlens.load can rebuild an mdlens model or a plain HookedTransformer from its config, "
        "not a subclass whose forward the config does not describe"
    )


def _cfg_to_json(cfg: HookedTransformerConfig) -> dict:
    """Every field of a ``HookedTransformerConfig``, JSON-ready (``dtype`` by name, numpy scalars as
    Python numbers); ``ValueError`` for a field JSON cannot hold exactly."""

    def plain(name: str, value):
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, (list, tuple)):
            return [plain(name, item) for item in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise ValueError(f"model.cfg.{name} = {value!r} cannot be saved: mdlens writes the config as JSON")

    record = {}
    for name, value in cfg.to_dict().items():
        if name == "dtype":
            if value not in PLAIN_DTYPES.values():
                raise ValueError(f"model.cfg.dtype = {value} cannot be saved: mdlens saves {tuple(PLAIN_DTYPES)}")
            record[name] = dtype_name(value)
        else:
            record[name] = plain(name, value)
    return record


def _cfg_from_json(record: dict) -> HookedTransformerConfig:
    """The config :func:`_cfg_to_json` wrote, on the CPU (``load`` moves the model afterwards)."""
    if not isinstance(record, dict) or record.get("dtype") not in PLAIN_DTYPES:
        raise ValueError(f"a hooked_transformer checkpoint needs a config with a dtype among {tuple(PLAIN_DTYPES)}")
    fields = {**record, "dtype": PLAIN_DTYPES[record["dtype"]], "device": "cpu"}
    try:
        with preserve_global_rng(), quiet_hooked_transformer_deprecation():
            return HookedTransformerConfig.from_dict(fields)
    except (TypeError, ValueError, AssertionError) as error:
        raise ValueError(f"the saved HookedTransformerConfig does not fit this TransformerLens: {error}") from error


def _task_to_json(task: MTDTask) -> dict:
    return {**task.arguments(), "transition": task.transition.tolist()}


def _to_json(value):
    """JSON-friendly copy: tensors become ``{"tensor": nested list, "dtype": name}``, dtypes strings."""
    if isinstance(value, torch.Tensor):
        return {"tensor": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {str(key): _to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # torch.dtype, torch.device, enums of the TL config: recorded for reading


def _from_json(value):
    if isinstance(value, dict):
        if set(value) == {"tensor", "dtype"} and value["dtype"] in DTYPES:
            return torch.tensor(value["tensor"], dtype=DTYPES[value["dtype"]])
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Loading


def read_config(directory: str | Path) -> dict:
    """The checked ``model.json`` of a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not an mdlens checkpoint: {CONFIG_FILE} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON (truncated or corrupt?): {error}") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise ValueError(f"{config_path} is not an mdlens checkpoint config")
    version = config.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ValueError(
            f"{config_path} has checkpoint format version {version!r}; this mdlens reads versions {READABLE_VERSIONS}"
        )
    required = ("kind", "args", "output_type", "weights_sha256") + (("tokenizer",) if version >= 2 else ())
    missing = [key for key in required if key not in config]
    if missing:
        raise ValueError(f"{config_path} lacks the fields {missing}")
    if config["kind"] not in MODEL_KINDS:
        raise ValueError(f"{config_path}: unknown model kind {config['kind']!r}; known: {MODEL_KINDS}")
    return config


def load(directory: str | Path, device: str = "cpu") -> HookedTransformer:
    """The model saved in ``directory`` by :func:`save`, rebuilt and loaded strictly.

    Raises ``FileNotFoundError`` for a missing directory or file and ``ValueError`` for a corrupt,
    truncated or mismatched one; never returns a partly loaded model.
    """
    directory = Path(directory)
    config = read_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete mdlens checkpoint: {WEIGHTS_FILE} is missing")
    if _sha256(weights_path) != config["weights_sha256"]:
        raise ValueError(
            f"{weights_path} does not match its config (SHA-256 differs): the file is truncated, corrupt, "
            f"or from another checkpoint"
        )
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path} cannot be read as safetensors: {error}") from error

    model = _build(config)
    plain = config["kind"] == "hooked_transformer"
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not fit the model: missing {missing}, unexpected {unexpected}")
    for name, value in weights.items():
        if value.shape != expected[name].shape or value.dtype != expected[name].dtype:
            raise ValueError(
                f"{weights_path}: {name} has shape {tuple(value.shape)} {value.dtype}, the model expects "
                f"{tuple(expected[name].shape)} {expected[name].dtype}"
            )
    model.load_state_dict(weights, strict=True)

    if config.get("layout") is not None:
        layout = ResidualLayout.from_dict(config["layout"])
        if layout.leaves() != model.layout.leaves():
            raise ValueError(f"{directory}: the saved residual layout does not match the rebuilt model's")
        model.layout = layout
    if config.get("md_params") is not None:
        model.md_params = _from_json(config["md_params"])
    model.output_type = config["output_type"]
    if config.get("tokenizer") is not None and not plain:  # else the default one _build attached
        try:
            attach_tokenizer(model, tokenizer_from_dict(config["tokenizer"]))
        except ValueError as error:
            raise ValueError(f"{directory}: the saved tokenizer does not fit the model: {error}") from error
    return model.to(device, print_details=False)


def load_task(directory: str | Path) -> MTDTask | None:
    """The task saved with the checkpoint (``None`` if it was saved without one).

    Rebuilt from its seed when that reproduces the saved transition (so ``task.sample`` continues
    the same random stream as the original task), else from the saved transition matrix.
    """
    record = read_config(directory).get("task")
    if record is None:
        return None
    transition = torch.tensor(record["transition"], dtype=torch.float64)
    task = MTDTask(**{name: record[name] for name in TASK_ARGUMENTS})
    if torch.equal(task.transition, transition):
        return task
    return MTDTask(order=record["order"], alpha=record["alpha"], seed=record["seed"], transition=transition)


def _build(config: dict) -> HookedTransformer:
    """The model ``config`` describes, freshly initialised, with the default vocabulary tokenizer (a
    plain ``HookedTransformer``: with its saved tokenizer, or none)."""
    if config["kind"] == "hooked_transformer":
        cfg = _cfg_from_json(config["args"].get("cfg"))
        record = config.get("tokenizer")
        return build_plain(cfg, tokenizer_from_dict(record) if record is not None else None)
    return build_model(config["kind"], config["args"])  # every MDLensTransformer attaches its tokenizer
