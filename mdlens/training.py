"""Training a model on the MTD task: ``TrainConfig``, ``train(model, task, config)`` and ``mdlens train``.

The paper trains with Adam and MSE on the last-token prediction for 5e5 steps at batch 128, a fresh
``lambda`` every sequence (paper-notes §5). Two things make the same models train in minutes on a CPU:

- ``targets="all"``: every position ``t > m`` is supervised with the true predictive of ``y_{t+1}``
  given its prefix, ``sum_g lambda_g pi(y_{t+1-g}, .)``. The construction is valid at every position
  (with step ``eta_t = beta / (m (t - m))``, paper-notes §4), so nothing is lost and each sequence gives
  ``T - m`` targets instead of one.
- Exact targets: the loss compares the model with the true predictive distribution, not with a
  sampled next token, so there is no sampling noise in the targets.

The loop itself (:func:`train`) is one linear function: sample, forward, loss, backward, step, and now
and then evaluate on a fixed held-out batch and write a checkpoint that ``resume`` continues from.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mdlens import estimators as E
from mdlens._validation import check_int, check_positive, check_tokens, check_transition, check_weights
from mdlens.models.disentangled import NEW_LAYER_RULES
from mdlens.predict import output_type_of, predict_next

LOSSES = ("mse", "ce")
TARGETS = ("last", "all")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
# TrainConfig fields that do not change the trained weights: a resumed run may set them differently.
RUNTIME_FIELDS = ("resume", "progress", "device", "checkpoint_dir", "checkpoint_every", "eval_every", "log_every")


@dataclass
class TrainConfig:
    """Everything that decides a training run (and nothing else: same config and seed, same weights).

    Attributes:
        steps: optimizer steps in total (a resumed run continues up to this number).
        batch_size: sequences per step, each with its own fresh ``lambda``.
        seq_len: training context length ``T``.
        lr, optimizer, weight_decay: Adam ("adam") or AdamW ("adamw") and its settings.
        lr_schedule: "constant" or "cosine" (decay to ``min_lr_ratio * lr`` at ``steps``), after
            ``warmup_steps`` of linear warm-up.
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
        loss: "mse" on the predicted distribution (the paper) or "ce" (cross-entropy against the true
            predictive distribution; needs a model with ``output_type == "logits"``).
        targets: "last" (the paper) or "all" (every position ``t > m``, see the module docstring).
        position_weight_exponent: with ``targets="all"``, the loss at position ``t`` is weighted by
            ``(t - m) ** position_weight_exponent`` (normalised to mean 1 over the positions). 0 is the
            plain mean; > 0 leans on long prefixes (the excess KL of an estimator falls roughly like
            ``1 / (t - m)``, so 1 makes each position's *relative* error count about equally); < 0
            leans on short ones (-0.5 from scratch kept the 3-layer model's outputs positive on short
            prefixes, where the MSE optimum lets small ones dip below zero: an infinite KL; it did not
            for 5 layers, ``shortfall_weight`` did).
        shortfall_weight: with ``loss="mse"``, add ``shortfall_weight * sum_v relu(p*_v / 2 - p_v)^2 / p*_v``
            (over ``p*_v > 0``) to each position's loss, where ``p*`` is the true predictive and ``p`` the
            model's. It is zero unless the model puts less than half the true probability on some token:
            the error that makes the KL large (infinite once ``p_v <= 0``) while costing MSE almost
            nothing when ``p*_v`` is small, hence the chi-square-like division by ``p*_v``. 0 is the
            paper's plain MSE.
        freeze_layers: the parameters of the first this many blocks stay as they are (e.g. the layers
            a deeper model was grown from with ``--init-from``); 0 trains every layer.
        curriculum_start_len: if set, ``T`` grows linearly from this length to ``seq_len`` over the
            first ``curriculum_steps`` steps.
        eval_every, eval_batch_size, eval_seed: evaluate every ``eval_every`` steps (0: only at the end)
            on one held-out batch drawn once with ``eval_seed`` (the same batch for every training seed).
        eval_bayes: also compute the exact Bayes reference on the held-out batch (once).
        checkpoint_dir, checkpoint_every: where and how often (0: only at the end) to write the
            training state; ``resume=True`` continues from the state found there.
        seed: seeds the training batches.
        device: "auto" (CUDA when present), "cpu" or "cuda".
        progress: show a tqdm progress bar with the live loss and KL.
        log_every: record the training loss every this many steps.
    """

    steps: int = 2000
    batch_size: int = 64
    seq_len: int = 192
    lr: float = 3e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.05
    grad_clip: float | None = 1.0
    loss: str = "mse"
    targets: str = "all"
    position_weight_exponent: float = 0.0
    shortfall_weight: float = 0.0
    freeze_layers: int = 0
    curriculum_start_len: int | None = None
    curriculum_steps: int = 0
    eval_every: int = 250
    eval_batch_size: int = 512
    eval_seed: int = 1234
    eval_bayes: bool = True
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batch_size", "log_every"):
            check_int(getattr(self, name), name, 1)
        for name in (
            "warmup_steps",
            "freeze_layers",
            "curriculum_steps",
            "eval_every",
            "checkpoint_every",
            "seed",
            "eval_seed",
        ):
            check_int(getattr(self, name), name, 0)
        check_positive(self.lr, "lr")
        if self.grad_clip is not None:
            check_positive(self.grad_clip, "grad_clip")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name, allowed in (
            ("loss", LOSSES),
            ("targets", TARGETS),
            ("optimizer", OPTIMIZERS),
            ("lr_schedule", LR_SCHEDULES),
            ("device", ("auto", "cpu", "cuda")),
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


@dataclass
class TrainResult:
    """What a run did: the loss curve, the evaluations, and its cost.

    ``losses`` holds ``(step, loss)`` pairs; ``evals`` holds one dict per evaluation with the model's
    mean KL to the truth next to the references on the same held-out batch (``kl_md1`` / ``kl_md2`` are
    one- / two-step MD with ``eta_md1`` / ``eta_md2`` tuned on that batch, ``kl_bayes`` the exact
    posterior mean, ``kl_uniform`` the uniform-weights guess). ``wall_clock_s`` counts this call only
    (not the run it resumed from).
    """

    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    steps: int = 0
    samples: int = 0
    wall_clock_s: float = 0.0

    @property
    def final_eval(self) -> dict:
        return self.evals[-1] if self.evals else {}


# ---------------------------------------------------------------------------------------------------
# Targets, loss, schedules


def next_token_targets(
    tokens: Int[Tensor, "batch pos"], weights: Float[Tensor, "batch m"], transition: Float[Tensor, "q q"]
) -> Float[Tensor, "batch pos_minus_m q"]:
    """True predictive of ``y_{t+1}`` given ``y_1..y_t`` for every ``t = m+1..T`` (1-indexed).

    ``P(y_{t+1} = v | y_{1..t}, lambda) = sum_{g=1..m} lambda_g pi(y_{t+1-g}, v)``. Row ``k`` of the
    result belongs to the model output at 0-indexed position ``m + k``; the last row is the
    predictive of ``y_{T+1}``.
    """
    transition = check_transition(transition)
    order = weights.shape[1] if isinstance(weights, Tensor) and weights.ndim == 2 else None
    if order is None:
        raise ValueError(f"weights must be a [B, m] tensor, got {getattr(weights, 'shape', type(weights).__name__)}")
    tokens = check_tokens(tokens, transition.shape[0], order)
    weights = check_weights(weights, order, tokens.shape[0]).to(tokens.device)
    return _next_token_targets(tokens, weights, transition)


def _next_token_targets(tokens: Tensor, weights: Tensor, transition: Tensor) -> Tensor:
    """:func:`next_token_targets` without the input checks, for batches the task itself just sampled."""
    order, seq_len = weights.shape[1], tokens.shape[1]
    positions = torch.arange(order, seq_len, device=tokens.device)  # 0-indexed t - 1, for t = m+1..T
    lags = torch.arange(1, order + 1, device=tokens.device)
    # y_{t+1-g} is the token at 0-indexed position (t - 1) + 1 - g.
    lagged = tokens[:, positions[:, None] + 1 - lags[None, :]]  # [B, T-m, m]
    rows = transition.to(tokens.device)[lagged]  # [B, T-m, m, q]: pi(y_{t+1-g}, .)
    return torch.einsum("bg,btgv->btv", weights, rows)


def _supervised_output(output: Tensor, order: int, targets: str) -> Tensor:
    """The positions of the model output that have a target: the last one, or all ``t > m``."""
    return output[:, -1:, :] if targets == "last" else output[:, order:, :]


def position_weights(n_positions: int, exponent: float) -> Float[Tensor, " n_positions"]:
    """Loss weight of the supervised positions ``t = m+1..m+n_positions``: ``(t - m) ** exponent``,
    normalised to mean 1 (so exponent 0 gives the plain mean and the loss scale does not change)."""
    prefix_beyond_order = torch.arange(1, n_positions + 1, dtype=torch.float64)  # t - m
    weights = prefix_beyond_order**exponent
    return weights / weights.mean()


def _loss(
    output: Tensor,
    target: Tensor,
    output_type: str,
    loss: str,
    weights: Tensor | None = None,
    shortfall_weight: float = 0.0,
) -> Tensor:
    """Mean over sequences and positions of the per-distribution loss, each position weighted by
    ``weights`` ``[pos]`` when given. For "mse": the squared error summed over the vocabulary, plus
    ``shortfall_weight`` times the shortfall penalty of :class:`TrainConfig`."""
    if loss == "ce":
        per_position = -(target * torch.log_softmax(output, dim=-1)).sum(-1)
    else:
        probs = output if output_type == "probs" else torch.softmax(output, dim=-1)
        per_position = (probs - target).pow(2).sum(-1)  # [batch, pos]
        if shortfall_weight:
            shortfall = torch.relu(target / 2 - probs)  # > 0 only where p_v < p*_v / 2
            # divided by p*_v, as in a chi-square: a shortfall on a tiny probability is what costs KL
            positive = target > 0  # where p*_v = 0 its KL term is 0 whatever p_v, so no penalty
            relative = torch.where(positive, shortfall.pow(2) / torch.where(positive, target, 1.0), 0.0)
            per_position = per_position + shortfall_weight * relative.sum(-1)
    if weights is not None:
        per_position = per_position * weights
    return per_position.mean()


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio * lr`` at ``config.steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def sequence_length(step: int, config: TrainConfig, order: int) -> int:
    """Training ``T`` at this step: the length curriculum, or ``seq_len`` throughout."""
    if config.curriculum_start_len is None or step >= config.curriculum_steps:
        return config.seq_len
    start = max(config.curriculum_start_len, order + 1)
    return start + round((config.seq_len - start) * step / config.curriculum_steps)


def resolve_device(device: str) -> torch.device:
    """ "auto" -> CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------------
# Evaluation on a fixed held-out batch


@dataclass
class HeldOut:
    """One held-out batch and the references computed on it once."""

    tokens: Tensor
    truth: Tensor  # [B, q] true predictive of y_{T+1}
    references: dict[str, float]


def make_held_out(task, config: TrainConfig) -> HeldOut:
    """Draw the held-out batch with ``eval_seed`` and score tuned one- and two-step MD, Bayes and uniform
    on it (MD's step sizes are tuned on this same batch: the references are a little optimistic)."""
    generator = torch.Generator().manual_seed(config.eval_seed)
    sample = task.sample(config.eval_batch_size, config.seq_len, generator=generator)
    tokens, truth = sample.tokens, sample.next_probs
    pi, m = task.transition, task.order
    uniform = torch.full((tokens.shape[0], m), 1.0 / m, dtype=torch.float64)
    references = {}
    for steps in (1, 2):
        tuned = E.tune_eta_refined(tokens, pi, m, truth, steps=steps)  # "tuned MD", as in the analyses
        references[f"eta_md{steps}"] = tuned["eta"]
        references[f"kl_md{steps}"] = tuned["tuning_kl"]
    references["kl_uniform"] = E.kl_divergence(truth, E.predictive(tokens, pi, uniform)).mean().item()
    if config.eval_bayes:
        bayes = E.predictive(tokens, pi, E.bayes_weights(tokens, pi, m, method="exact"))
        references["kl_bayes"] = E.kl_divergence(truth, bayes).mean().item()
    return HeldOut(tokens, truth, references)


def evaluate(model: HookedTransformer, held_out: HeldOut) -> float:
    """The model's mean ``KL(p* || p_model)`` for ``y_{T+1}`` on the held-out batch."""
    was_training = model.training
    model.eval()
    kl = E.kl_divergence(held_out.truth, predict_next(model, held_out.tokens)).mean().item()
    model.train(was_training)
    return kl


# ---------------------------------------------------------------------------------------------------
# Training state: model weights, optimizer state, step and generator state (safetensors + JSON)


def save_train_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    generator: torch.Generator,
    result: TrainResult,
    config: TrainConfig,
) -> None:
    """Everything ``resume`` needs to continue bit-for-bit, in ``train_state.{safetensors,json}``."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{name}": value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    optim_state = optimizer.state_dict()
    for index, param_state in optim_state["state"].items():
        for key, value in param_state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().reshape(-1).contiguous()
    tensors["generator_state"] = generator.get_state()
    save_file(tensors, str(directory / STATE_TENSORS))
    meta = {
        "step": step,
        "param_groups": optim_state["param_groups"],
        "config": asdict(config),
        "losses": result.losses,
        "evals": result.evals,
        "samples": result.samples,
    }
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=1))


def load_train_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    result: TrainResult,
    config: TrainConfig,
) -> int:
    """Load what :func:`save_train_state` wrote into ``model``, ``optimizer``, ``generator``, ``result``.

    Returns the number of steps already done.
    """
    tensors = load_file(str(directory / STATE_TENSORS))
    meta = json.loads((directory / STATE_JSON).read_text())
    # Resuming under another recipe (another lr, schedule length, batch, seed...) would silently give
    # a run that neither config describes; only the fields that cannot change the weights may differ.
    # A field the saved config lacks (added to TrainConfig after it was written) had its default then.
    saved = {**{f.name: f.default for f in fields(TrainConfig)}, **meta["config"]}
    current = asdict(config)
    changed = sorted(name for name in current if name not in RUNTIME_FIELDS and saved.get(name) != current[name])
    if changed:
        raise ValueError(
            f"cannot resume from {directory}: the saved training config differs in {changed} "
            f"(saved {[saved.get(name) for name in changed]}, now {[current[name] for name in changed]})"
        )
    device = next(model.parameters()).device
    model.load_state_dict({name[len("model.") :]: t for name, t in tensors.items() if name.startswith("model.")})
    state: dict[int, dict] = {}
    reference = optimizer.state_dict()["param_groups"]
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            # Adam keeps ``step`` as a 0-d tensor; the moments have their parameter's shape.
            state.setdefault(int(index), {})[key] = value
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param_state in state.items():
        for key, value in param_state.items():
            shape = () if key == "step" else params[index].shape
            param_state[key] = value.reshape(shape).to(device if key != "step" else "cpu")
    if len(meta["param_groups"]) != len(reference):
        raise ValueError("the checkpoint's optimizer does not match this model's parameters")
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    generator.set_state(tensors["generator_state"])
    result.losses = [tuple(pair) for pair in meta["losses"]]
    result.evals = meta["evals"]
    result.samples = meta["samples"]
    return meta["step"]


# ---------------------------------------------------------------------------------------------------
# The loop


def make_optimizer(parameters: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(parameters, lr=config.lr, weight_decay=config.weight_decay)


def freeze_first_layers(model: HookedTransformer, n_layers: int) -> list[torch.nn.Parameter]:
    """Stop gradients to the parameters of ``model.blocks[:n_layers]``; returns the ones this switched
    off, for :func:`train` to switch back on when it ends."""
    if n_layers > model.cfg.n_layers:
        raise ValueError(f"freeze_layers={n_layers} exceeds the model's {model.cfg.n_layers} layers")
    frozen = [p for block in model.blocks[:n_layers] for p in block.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return frozen


def train(model: HookedTransformer, task, config: TrainConfig) -> TrainResult:
    """Train ``model`` on fresh samples of ``task`` (an ``MTDTask``); returns the loss and KL history.

    The model is trained in place (float32 is expected). Same ``config`` (seed included) -> the same
    weights, bit for bit, also across an interruption followed by ``resume=True``.
    """
    output_type = output_type_of(model)
    if config.loss == "ce" and output_type != "logits":
        raise ValueError(f"loss='ce' needs a model with output_type 'logits', this one outputs {output_type!r}")
    if model.cfg.d_vocab != task.vocab_size:
        raise ValueError(f"model vocabulary {model.cfg.d_vocab} != task vocabulary {task.vocab_size}")
    if model.cfg.n_ctx < config.seq_len:
        raise ValueError(f"seq_len={config.seq_len} exceeds the model's context n_ctx={model.cfg.n_ctx}")
    device = resolve_device(config.device)
    if next(model.parameters()).device != device:
        model.to(device)
    model.train()
    frozen = freeze_first_layers(model, config.freeze_layers)
    try:
        return _train_loop(model, task, config, device, output_type)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


def _train_loop(
    model: HookedTransformer, task, config: TrainConfig, device: torch.device, output_type: str
) -> TrainResult:
    """:func:`train` once the model is checked, on its device and with its frozen layers set."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(parameters, config)
    generator = torch.Generator().manual_seed(config.seed)  # training batches are drawn on the CPU
    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    result = TrainResult()
    start = 0
    if config.resume and (checkpoint_dir / STATE_TENSORS).exists():
        start = load_train_state(checkpoint_dir, model, optimizer, generator, result, config)
    held_out = make_held_out(task, config)
    transition, order = task.transition, task.order

    t0 = time.perf_counter()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not config.progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        sample = task.sample(config.batch_size, sequence_length(step, config, order), generator=generator)
        target = _next_token_targets(sample.tokens, sample.weights, transition)  # valid by construction
        if config.targets == "last":
            target = target[:, -1:, :]
        output = model(sample.tokens.to(device))
        weights = None
        if config.position_weight_exponent != 0:
            weights = position_weights(target.shape[1], config.position_weight_exponent).to(device, output.dtype)
        loss = _loss(
            _supervised_output(output, order, config.targets),
            target.to(device, output.dtype),
            output_type,
            config.loss,
            weights,
            config.shortfall_weight,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        result.samples += config.batch_size

        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            result.losses.append((done, loss.item()))
            bar.set_postfix(
                loss=f"{result.losses[-1][1]:.3g}", kl=f"{result.final_eval.get('kl_model', float('nan')):.3g}"
            )
        if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
            result.evals.append({"step": done, "kl_model": evaluate(model, held_out), **held_out.references})
            bar.set_postfix(loss=f"{result.losses[-1][1]:.3g}", kl=f"{result.evals[-1]['kl_model']:.3g}")
        if checkpoint_dir is not None and (
            (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps
        ):
            save_train_state(checkpoint_dir, model, optimizer, done, generator, result, config)
    bar.close()
    result.steps = config.steps
    result.wall_clock_s = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------------
# ``mdlens train``: build the task and model from flags (or a JSON file of the same fields), train,
# save a loadable checkpoint (``mdlens.load``) plus ``train.json`` with the command and the numbers.

MODEL_KINDS = ("disentangled", "standard")

# CLI field -> (flag, type, default, help). ``--config FILE.json`` may set any of these fields.
CLI_FIELDS: dict[str, tuple[str, type, object, str]] = {
    "model": ("--model", str, "disentangled", "architecture: disentangled | standard"),
    "layers": ("--layers", int, 3, "number of layers"),
    "vocab": ("--vocab", int, 5, "vocabulary size q of the task"),
    "order": ("--order", int, 3, "MTD order m of the task"),
    "alpha": ("--alpha", float, 1.0, "Dirichlet concentration of lambda"),
    "task_seed": ("--task-seed", int, 0, "seed of the task's transition matrix"),
    "seq_len": ("--seq-len", int, 192, "training context length (also the model's n_ctx)"),
    "d_model": ("--d-model", int, 64, "residual width of a standard model"),
    "loss": ("--loss", str, "mse", "mse | ce"),
    "targets": ("--targets", str, "all", "last | all"),
    "position_weight_exponent": (
        "--position-weight-exponent",
        float,
        0.0,
        "with --targets all: weight the loss at position t by (t - m)^this (mean 1); >0 leans on long prefixes",
    ),
    "shortfall_weight": (
        "--shortfall-weight",
        float,
        0.0,
        "with --loss mse: add this times (p*/2 - p)^2 / p* "
        "for each output p below half its true probability p* (keeps small ones positive)",
    ),
    "freeze_layers": ("--freeze-layers", int, 0, "keep the first N layers as they are (e.g. those of --init-from)"),
    "steps": ("--steps", int, 2000, "optimizer steps"),
    "batch": ("--batch", int, 64, "sequences per step"),
    "lr": ("--lr", float, 3e-3, "peak learning rate"),
    "lr_schedule": ("--lr-schedule", str, "cosine", "constant | cosine"),
    "warmup": ("--warmup", int, 0, "linear warm-up steps"),
    "optimizer": ("--optimizer", str, "adam", "adam | adamw"),
    "weight_decay": ("--weight-decay", float, 0.0, "weight decay"),
    "curriculum_start_len": ("--curriculum-start-len", int, None, "grow T from this length"),
    "curriculum_steps": ("--curriculum-steps", int, 0, "over this many steps"),
    "eval_every": ("--eval-every", int, 250, "evaluate every N steps (0: at the end only)"),
    "checkpoint_every": ("--checkpoint-every", int, 500, "write the training state every N steps"),
    "seed": ("--seed", int, 0, "seed of the model initialisation and of the training batches"),
    "init_from": (
        "--init-from",
        str,
        None,
        "start from a saved disentangled model with at most --layers layers "
        "(grown into this model, see --new-layers; same task)",
    ),
    "new_layers": (
        "--new-layers",
        str,
        "fresh",
        "with --init-from: fresh (new layers on top, freshly "
        "initialised) | repeat_last (inserted before the last layer, as copies of it) | "
        "insert_fresh (fresh, between the saved layers and a copy of its last layer on top)",
    ),
    "device": ("--device", str, "auto", "auto | cpu | cuda"),
    "threads": (
        "--threads",
        int,
        None,
        "torch intra-op CPU threads (default: torch's choice); 1 is often fastest on a busy machine",
    ),
    "out": ("--out", str, None, "output directory (required)"),
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mdlens train`` (called from ``mdlens.cli.build_parser``)."""
    parser.add_argument("--config", help="JSON file with any of the fields below (flags override it)")
    for dest, (flag, kind, default, help_text) in CLI_FIELDS.items():
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=f"{help_text} (default {default})")
    parser.add_argument("--resume", action="store_true", help="continue from the training state in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_train_command)


def resolve_train_fields(args: argparse.Namespace) -> dict:
    """Flags over the ``--config`` file over the defaults; unknown config keys are an error."""
    fields_ = {dest: spec[2] for dest, spec in CLI_FIELDS.items()}
    if args.config:
        loaded = json.loads(Path(args.config).read_text())
        unknown = sorted(set(loaded) - set(fields_))
        if unknown:
            raise ValueError(f"unknown fields in {args.config}: {unknown}; known: {sorted(fields_)}")
        fields_.update(loaded)
    fields_.update({dest: getattr(args, dest) for dest in CLI_FIELDS if getattr(args, dest) is not None})
    if fields_["out"] is None:
        raise ValueError("mdlens train needs --out (or 'out' in the config file)")
    if fields_["model"] not in MODEL_KINDS:
        raise ValueError(f"--model must be one of {MODEL_KINDS}, got {fields_['model']!r}")
    if fields_["new_layers"] not in NEW_LAYER_RULES:
        raise ValueError(f"--new-layers must be one of {NEW_LAYER_RULES}, got {fields_['new_layers']!r}")
    if fields_["new_layers"] != "fresh" and fields_["init_from"] is None:
        raise ValueError("--new-layers only applies with --init-from")
    return fields_


def build_model(fields_: dict) -> HookedTransformer:
    """The untrained model the fields describe (float32, seeded by ``seed``)."""
    from mdlens.models import DisentangledTransformer, standard_transformer

    if fields_["model"] == "standard":
        # A plain HookedTransformer outputs logits; "mse" is then taken on their softmax.
        return standard_transformer(
            fields_["vocab"],
            fields_["seq_len"],
            n_layers=fields_["layers"],
            d_model=fields_["d_model"],
            seed=fields_["seed"],
            output="logits",
        )
    # The paper's disentangled readout is a probability vector trained with MSE; with "ce" it is read
    # as logits instead (softmax), so that cross-entropy has something to take the log of.
    return DisentangledTransformer(
        fields_["vocab"],
        fields_["seq_len"],
        n_layers=fields_["layers"],
        window=fields_["order"] + 1,
        seed=fields_["seed"],
        order=fields_["order"],
        output="logits" if fields_["loss"] == "ce" else "probs",
    )


def grow_from(model: HookedTransformer, task, directory: str, new_layers: str = "fresh") -> None:
    """``--init-from``: copy the saved model in ``directory`` into ``model``'s first layers.

    See :meth:`mdlens.models.DisentangledTransformer.load_shallower`; the saved model must have been
    trained on the same task (same transition matrix and order).
    """
    import mdlens
    from mdlens.models import DisentangledTransformer

    if not isinstance(model, DisentangledTransformer):
        raise ValueError("--init-from works for disentangled models only")
    source_task = mdlens.load_task(directory)
    if (
        source_task is None
        or source_task.order != task.order
        or not torch.equal(source_task.transition, task.transition)
    ):
        raise ValueError(f"--init-from {directory}: that model was not trained on this task")
    model.load_shallower(mdlens.load(directory), new_layers=new_layers)


def run_train_command(args: argparse.Namespace) -> None:
    import mdlens
    from mdlens.task import MTDTask

    fields_ = resolve_train_fields(args)
    if fields_["threads"] is not None:
        torch.set_num_threads(
            check_int(fields_["threads"], "--threads", 1)
        )  # a process setting, not part of the recipe
    out = Path(fields_["out"])
    task = MTDTask(
        vocab_size=fields_["vocab"], order=fields_["order"], alpha=fields_["alpha"], seed=fields_["task_seed"]
    )
    model = build_model(fields_)
    if fields_["init_from"] is not None:
        grow_from(model, task, fields_["init_from"], fields_["new_layers"])
    config = TrainConfig(
        steps=fields_["steps"],
        batch_size=fields_["batch"],
        seq_len=fields_["seq_len"],
        lr=fields_["lr"],
        optimizer=fields_["optimizer"],
        weight_decay=fields_["weight_decay"],
        lr_schedule=fields_["lr_schedule"],
        warmup_steps=fields_["warmup"],
        loss=fields_["loss"],
        targets=fields_["targets"],
        position_weight_exponent=fields_["position_weight_exponent"],
        shortfall_weight=fields_["shortfall_weight"],
        freeze_layers=fields_["freeze_layers"],
        curriculum_start_len=fields_["curriculum_start_len"],
        curriculum_steps=fields_["curriculum_steps"],
        eval_every=fields_["eval_every"],
        checkpoint_dir=str(out),
        checkpoint_every=fields_["checkpoint_every"],
        resume=args.resume,
        seed=fields_["seed"],
        device=fields_["device"],
        progress=not args.no_progress,
    )
    result = train(model, task, config)
    mdlens.save(model.to("cpu", print_details=False), out, task=task)  # TL's .cpu() prints a line
    final = result.final_eval
    report = {
        "fields": fields_,
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
        f"[mdlens] trained {fields_['model']} ({fields_['layers']} layers): {result.steps} steps, "
        f"{result.samples} sequences, {result.wall_clock_s:.1f} s wall-clock"
    )
    print(
        f"[mdlens] held-out KL: model {final['kl_model']:.4g}, tuned 1-step MD {final['kl_md1']:.4g}, "
        f"tuned 2-step MD {final['kl_md2']:.4g}"
        + (f", Bayes {final['kl_bayes']:.4g}" if "kl_bayes" in final else "")
        + f", uniform {final['kl_uniform']:.4g}"
    )
    print(f"[mdlens] checkpoint: {out}")
