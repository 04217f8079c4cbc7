"""Training a model on the MTD task: ``TrainConfig``, the targets, the loss and ``train(model, task, config)``.

The paper trains with Adam and MSE on the last-token prediction for 5e5 steps at batch 128, a fresh
``lambda`` every sequence (paper-notes §5). Two things make the same models train in minutes on a CPU:

- ``targets="all"``: every position ``t > m`` is supervised with the true predictive of ``y_{t+1}``
  given its prefix, ``sum_g lambda_g pi(y_{t+1-g}, .)``. The construction is valid at every position
  (with step ``eta_t = beta / (m (t - m))``, paper-notes §4), so nothing is lost and each sequence gives
  ``T - m`` targets instead of one.
- Exact targets: the loss compares the model with the true predictive distribution, not with a
  sampled next token, so there is no sampling noise in the targets.

The loop itself (:func:`train`) is one linear function: sample, forward, loss, backward, step, and now
and then evaluate on a fixed held-out batch (:mod:`mdlens.evaluation`) and write the training state
that ``resume`` continues from. The command line ``mdlens train`` lives in :mod:`mdlens.train_cli`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mdlens import estimators as E
from mdlens.evaluation import HeldOut, evaluate, make_held_out
from mdlens.predict import output_type_of
from mdlens.task import prefix_last_tokens
from mdlens.train_config import RUNTIME_FIELDS, TrainConfig  # torch-free: mdlens train --help lists it
from mdlens.validation import check_tokens, check_transition, check_weights


@dataclass
class TrainResult:
    """What a run did: the loss curve, the evaluations, and its cost.

    ``losses`` holds ``(step, loss)`` pairs; ``evals`` holds one dict per evaluation with the model's
    mean KL to the truth next to the references on the same held-out batch
    (:func:`mdlens.evaluation.make_held_out`: ``kl_md1`` / ``kl_md2`` are tuned one- / two-step MD with
    steps ``eta_md1`` / ``eta_md2``, ``kl_bayes`` the exact posterior mean, ``kl_uniform`` the
    uniform-weights guess). ``wall_clock_s`` counts this call only (not the run it resumed from).
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
    lagged = prefix_last_tokens(tokens, weights.shape[1])  # [B, T-m, m]: y_{t+1-g} for t = m+1..T
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
# Training state: one file, written atomically
#
# ``train_state.pt`` holds everything ``resume`` needs to continue bit for bit: the step, the config,
# the model's and the optimizer's state dicts, the batch generator's state and the history so far. It
# is written with ``torch.save`` to a temporary name and renamed into place (``os.replace``), so a run
# killed at any moment leaves either the previous state or the new one, never a mix of the two. It is
# read with ``torch.load(weights_only=True)``: tensors and plain containers only, no code.
#
# Training states written before this format (``train_state.safetensors`` + ``train_state.json``,
# written one after the other) are not resumed: ``resume`` refuses them with a message that says so.

STATE_FILE = "train_state.pt"
STATE_FORMAT = "mdlens-train-state"
STATE_VERSION = 1
OLD_STATE_FILES = ("train_state.safetensors", "train_state.json")


def save_train_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    generator: torch.Generator,
    result: TrainResult,
    config: TrainConfig,
) -> Path:
    """Write the state after ``step`` steps to ``directory / train_state.pt`` atomically; returns the path."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": step,
        "config": asdict(config),
        "model": {name: value.detach().cpu() for name, value in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "losses": result.losses,
        "evals": result.evals,
        "samples": result.samples,
    }
    path, temporary = directory / STATE_FILE, directory / f".{STATE_FILE}.tmp"
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())  # the bytes are on disk before the rename makes them the state
    os.replace(temporary, path)
    return path


def read_train_state(directory: Path, model: torch.nn.Module, config: TrainConfig) -> dict | None:
    """The training state in ``directory`` if ``model`` under ``config`` can continue it; ``None`` when
    there is none (a fresh start). ``ValueError`` for a state it cannot continue: unreadable, written by an
    older mdlens, for another model, or under another recipe."""
    path = directory / STATE_FILE
    if not path.exists():
        old = [name for name in OLD_STATE_FILES if (directory / name).exists()]
        if old:
            raise ValueError(
                f"cannot resume from {directory}: {old} is a training state in the format before "
                f"{STATE_FILE}, which mdlens no longer reads; start the run again without resume"
            )
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign: torch raises several types here
        raise ValueError(f"cannot resume from {path}: the file is not a readable training state ({error})") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise ValueError(f"cannot resume from {path}: not an mdlens training state of version {STATE_VERSION}")
    # Resuming under another recipe (another lr, schedule length, batch, seed...) would silently give
    # a run that neither config describes; only the fields that cannot change the weights may differ.
    # A field the saved config lacks (added to TrainConfig after it was written) had its default then.
    saved = {**{f.name: f.default for f in fields(TrainConfig)}, **state["config"]}
    current = asdict(config)
    changed = sorted(name for name in current if name not in RUNTIME_FIELDS and saved.get(name) != current[name])
    if changed:
        raise ValueError(
            f"cannot resume from {directory}: the saved training config differs in {changed} "
            f"(saved {[saved.get(name) for name in changed]}, now {[current[name] for name in changed]})"
        )
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    if shapes != {name: tuple(value.shape) for name, value in state["model"].items()}:
        raise ValueError(f"cannot resume from {path}: it does not fit this model (other parameters or shapes)")
    return state


def load_train_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    result: TrainResult,
    config: TrainConfig,
) -> int:
    """Load the state in ``directory`` into ``model``, ``optimizer``, ``generator`` and ``result``.

    Returns the number of steps already done: 0 when ``directory`` holds no training state (a fresh
    start). Raises ``ValueError`` for a state it cannot continue (:func:`read_train_state`).
    """
    state = read_train_state(directory, model, config)
    if state is None:
        return 0
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as error:
        raise ValueError(
            f"cannot resume from {directory / STATE_FILE}: it does not fit this model ({error})"
        ) from error
    generator.set_state(state["generator"])
    result.losses = [tuple(pair) for pair in state["losses"]]
    result.evals = state["evals"]
    result.samples = state["samples"]
    return state["step"]


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


def check_train_inputs(model: HookedTransformer, task, config: TrainConfig) -> None:
    """Every check :func:`train` makes before its first step, as a ``ValueError`` that names the
    argument to change: the model fits the task and the config, the device exists, the held-out exact
    Bayes reference is within reach, and a ``resume`` state can be continued."""
    output_type = output_type_of(model)
    if config.loss == "ce" and output_type != "logits":
        raise ValueError(f"loss='ce' needs a model with output_type 'logits', this one outputs {output_type!r}")
    if model.cfg.d_vocab != task.vocab_size:
        raise ValueError(f"model vocabulary {model.cfg.d_vocab} != task vocabulary {task.vocab_size}")
    if model.cfg.n_ctx < config.seq_len:
        raise ValueError(f"seq_len={config.seq_len} exceeds the model's context n_ctx={model.cfg.n_ctx}")
    if config.seq_len <= task.order:
        raise ValueError(f"seq_len={config.seq_len} must exceed the task's order m={task.order}")
    if config.freeze_layers > model.cfg.n_layers:
        raise ValueError(f"freeze_layers={config.freeze_layers} exceeds the model's {model.cfg.n_layers} layers")
    resolve_device(config.device)
    if config.eval_bayes:
        E.check_exact_bayes_size(
            config.seq_len, task.order, "pass eval_bayes=False (mdlens train --no-eval-bayes) to leave it out"
        )
    if config.resume:
        read_train_state(Path(config.checkpoint_dir), model, config)


# Called after each held-out evaluation as ``callback(step, model, evaluation)`` (see :func:`train`).
EvalCallback = Callable[[int, HookedTransformer, dict], None]


def held_out_batch(task, config: TrainConfig) -> HeldOut:
    """The fixed held-out batch :func:`train` evaluates on, with its references scored once:
    :func:`mdlens.evaluation.make_held_out` of ``config.eval_batch_size`` sequences of length
    ``config.seq_len`` drawn from ``config.eval_seed`` (with the exact Bayes reference when
    ``config.eval_bayes``). The same batch whatever the training seed; made before a run, it is the
    one to measure the untrained model on, or to hand to ``train(..., held_out=)``."""
    return make_held_out(task, config.seq_len, config.eval_batch_size, config.eval_seed, config.eval_bayes)


def check_held_out(held_out: HeldOut, task, config: TrainConfig) -> HeldOut:
    """``held_out`` is the batch :func:`held_out_batch` makes for ``task`` and ``config``: the same
    tokens (drawn again from ``config.eval_seed``, which is cheap; its references are not recomputed)
    and the references ``config.eval_bayes`` asks for. ``ValueError`` saying what differs otherwise."""
    if not isinstance(held_out, HeldOut):
        raise ValueError(f"held_out must be a HeldOut (from held_out_batch), got {type(held_out).__name__}")
    generator = torch.Generator().manual_seed(config.eval_seed)
    expected = task.sample(config.eval_batch_size, config.seq_len, generator=generator).tokens
    if held_out.tokens.shape != expected.shape or not torch.equal(held_out.tokens.cpu(), expected):
        raise ValueError(
            f"held_out is not this run's held-out batch: held_out_batch(task, config) draws {tuple(expected.shape)} "
            f"tokens from eval_seed={config.eval_seed}, held_out has {tuple(held_out.tokens.shape)} other tokens"
        )
    if ("kl_bayes" in held_out.references) != config.eval_bayes:
        raise ValueError(
            f"held_out's references {sorted(held_out.references)} do not fit eval_bayes={config.eval_bayes}"
        )
    return held_out


def train(
    model: HookedTransformer,
    task,
    config: TrainConfig,
    callback: EvalCallback | None = None,
    held_out: HeldOut | None = None,
) -> TrainResult:
    """Train ``model`` on fresh samples of ``task`` (an ``MTDTask``); returns the loss and KL history.

    ``callback``, when given, is called after every held-out evaluation (every ``config.eval_every``
    steps and at the end) as ``callback(step, model, evaluation)``, with ``evaluation`` the dict just
    appended to ``TrainResult.evals``: a hook to measure the model during training (e.g.
    ``mdlens reproduce training-mechanism``). It must leave the model's weights as they are.

    ``held_out``: the batch :func:`held_out_batch` gives for ``task`` and ``config``, when the caller
    has made it already (it is checked, :func:`check_held_out`, and its references are not scored
    again); without it, ``train`` makes it.

    The model is trained in place (float32 is expected). Same ``config`` (seed included) -> the same
    weights, bit for bit, also across an interruption followed by ``resume=True``, which continues from
    the last training state written to ``checkpoint_dir`` (see :func:`save_train_state`; a state in the
    format of earlier mdlens versions, ``train_state.safetensors`` + ``.json``, is refused with a
    ``ValueError`` that says so).
    """
    check_train_inputs(model, task, config)
    held_out = held_out_batch(task, config) if held_out is None else check_held_out(held_out, task, config)
    output_type = output_type_of(model)
    device = resolve_device(config.device)
    if next(model.parameters()).device != device:
        model.to(device)
    model.train()
    frozen = freeze_first_layers(model, config.freeze_layers)
    try:
        return _train_loop(model, task, config, device, output_type, held_out, callback)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


def _train_loop(
    model: HookedTransformer,
    task,
    config: TrainConfig,
    device: torch.device,
    output_type: str,
    held_out: HeldOut,
    callback: EvalCallback | None = None,
) -> TrainResult:
    """:func:`train` once the model is checked, on its device and with its frozen layers set."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(parameters, config)
    generator = torch.Generator().manual_seed(config.seed)  # training batches are drawn on the CPU
    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    result = TrainResult()
    start = load_train_state(checkpoint_dir, model, optimizer, generator, result, config) if config.resume else 0

    t0 = time.perf_counter()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not config.progress)
    for step in bar:
        sample = task.sample(config.batch_size, sequence_length(step, config, task.order), generator=generator)
        loss = _training_step(model, optimizer, parameters, task, sample, step, config, device, output_type)
        result.samples += config.batch_size
        done = step + 1
        _record_progress(done, loss, model, held_out, result, bar, config, callback)
        if checkpoint_dir is not None and (
            (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps
        ):
            save_train_state(checkpoint_dir, model, optimizer, done, generator, result, config)
    bar.close()
    result.steps = config.steps
    result.wall_clock_s = time.perf_counter() - t0
    return result


def _training_step(
    model: HookedTransformer,
    optimizer: torch.optim.Optimizer,
    parameters: list[torch.nn.Parameter],
    task,
    sample,
    step: int,
    config: TrainConfig,
    device: torch.device,
    output_type: str,
) -> Tensor:
    """One optimizer step on the batch ``sample`` of ``task`` (an ``MTDSample``) at this step's
    learning rate; returns the loss it stepped on."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, config)
    target = _next_token_targets(sample.tokens, sample.weights, task.transition)  # valid by construction
    if config.targets == "last":
        target = target[:, -1:, :]
    output = model(sample.tokens.to(device))
    weights = None
    if config.position_weight_exponent != 0:
        weights = position_weights(target.shape[1], config.position_weight_exponent).to(device, output.dtype)
    loss = _loss(
        _supervised_output(output, task.order, config.targets),
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
    return loss


def _record_progress(
    done: int,
    loss: Tensor,
    model: HookedTransformer,
    held_out: HeldOut,
    result: TrainResult,
    bar: tqdm,
    config: TrainConfig,
    callback: EvalCallback | None,
) -> None:
    """After ``done`` steps: log the loss every ``log_every`` steps, evaluate on the held-out batch every
    ``eval_every`` steps (and call ``callback``), and at the last step both; the bar shows the latest."""
    if done % config.log_every == 0 or done == config.steps:
        result.losses.append((done, loss.item()))
        shown = {"loss": f"{result.losses[-1][1]:.3g}"}
        if result.evals:  # no KL to show before the first evaluation
            shown["kl"] = f"{result.evals[-1]['kl_model']:.3g}"
        bar.set_postfix(shown)
    if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
        result.evals.append({"step": done, "kl_model": evaluate(model, held_out), **held_out.references})
        bar.set_postfix(loss=f"{result.losses[-1][1]:.3g}", kl=f"{result.evals[-1]['kl_model']:.3g}")
        if callback is not None:
            callback(done, model, result.evals[-1])
