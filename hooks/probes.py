"""Linear probes: does a layer's activation hold an algorithmic quantity, linearly, out of sample?

A probe is closed-form ridge regression from activations ``[N, d]`` onto a target ``[N, k]``. Rows
come in *groups* (the sequence each position came from): a held-out test part of the groups is
never seen in training, and the ridge strength is chosen by cross-validation over the rest, again
split by group. The held-out ``R^2`` is the number to read; two controls say how much of it is the
model's doing:

- the same probe on a **randomly initialised model** of the same architecture
  (:func:`mdlens.models.build_like`): what the architecture gives for free (e.g. the one-hot
  token blocks of a disentangled model);
- a **control target** (Hewitt & Liang 2019, :func:`mdlens.hooks.targets.control_target`): a fixed
  random function of the tokens at ``t-m..t``; ``selectivity = R^2 - control R^2``.

Everything is computed from sufficient statistics (per-fold sums of ``x``, ``y``, ``x x^T``,
``x y^T``, ``y^2``), accumulated chunk by chunk: one pass over the activations fits every ridge
strength, every fold and every target at once, and no ``[N, d]`` matrix of a whole run is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import einops
import torch
from jaxtyping import Float, Int
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name

from mdlens.hooks._checks import check_activations, check_model_tokens, model_device
from mdlens.hooks.targets import control_target
from mdlens.models.layout import layer_label, residual_hook_of
from mdlens.models.registry import build_like
from mdlens.validation import check_int

N_FOLDS = 5
TEST_FRACTION = 0.2
# Ridge strengths, relative to the mean variance of the activation coordinates (scale-free).
RELATIVE_RIDGES = tuple(10.0**p for p in range(-10, 3))


@dataclass
class Probe:
    """A fitted linear probe: ``prediction = acts @ weight + bias``.

    weight: ``[d, k]`` float64; bias: ``[k]``; ridge: the strength chosen by cross-validation;
    r2: held-out R^2 pooled over the test rows, averaged over the ``k`` coordinates;
    r2_per_target: ``[k]``, the same per coordinate. ``hook_name`` / ``block`` / ``target_name``
    say where the probe reads and what it predicts (when fit by :func:`probe_model`); ``head`` is the
    head it reads at a hook with a head axis (``hook_z``: ``acts = z[:, :, head]``), else ``None``.
    """

    weight: Float[Tensor, "d k"]
    bias: Float[Tensor, " k"]
    ridge: float
    r2: float
    r2_per_target: Float[Tensor, " k"]
    n_train: int
    n_test: int
    hook_name: str | None = None
    block: str | None = None
    target_name: str | None = None
    head: int | None = None

    def predict(self, acts: Float[Tensor, "n d"]) -> Float[Tensor, "n k"]:
        acts = check_activations(acts)
        if acts.shape[1] != self.weight.shape[0]:
            raise ValueError(f"acts have d={acts.shape[1]}, the probe reads d={self.weight.shape[0]}")
        return acts @ self.weight + self.bias


# ----------------------------------------------------------------------------------------------
# Sufficient statistics and the closed-form fit
# ----------------------------------------------------------------------------------------------


class _Moments:
    """Per-partition sums over rows: ``n``, ``sum x``, ``sum y``, ``X^T X``, ``X^T Y``, ``sum y^2``.

    Partition 0 is the test set, partitions ``1..n_folds`` the cross-validation folds.
    """

    def __init__(self, n_partitions: int, d: int, k: int):
        self.count = torch.zeros(n_partitions, dtype=torch.float64)
        self.sum_x = torch.zeros(n_partitions, d, dtype=torch.float64)
        self.sum_y = torch.zeros(n_partitions, k, dtype=torch.float64)
        self.xx = torch.zeros(n_partitions, d, d, dtype=torch.float64)
        self.xy = torch.zeros(n_partitions, d, k, dtype=torch.float64)
        self.yy = torch.zeros(n_partitions, k, dtype=torch.float64)
        # The eigendecomposition of each set of partitions' centred X^T X, computed once and shared with
        # every view of some target columns (it depends on the activations only).
        self._covariances: dict[tuple[int, ...], _CentredCovariance] = {}

    def add(self, acts: Tensor, target: Tensor, partition: Tensor) -> None:
        for p in partition.unique().tolist():
            rows = partition == p
            x, y = acts[rows], target[rows]
            self.count[p] += x.shape[0]
            self.sum_x[p] += x.sum(dim=0)
            self.sum_y[p] += y.sum(dim=0)
            self.xx[p] += x.T @ x
            self.xy[p] += x.T @ y
            self.yy[p] += (y * y).sum(dim=0)
        self._covariances.clear()

    def columns(self, columns: slice) -> _Moments:
        """The same partitions, restricted to some target columns."""
        part = _Moments.__new__(_Moments)
        part.count, part.sum_x, part.xx, part._covariances = self.count, self.sum_x, self.xx, self._covariances
        part.sum_y, part.xy, part.yy = self.sum_y[:, columns], self.xy[..., columns], self.yy[:, columns]
        return part

    def select(self, partitions: list[int]) -> _Moments:
        """The summed moments of some partitions."""
        total = _Moments.__new__(_Moments)
        total.count = self.count[partitions].sum(dim=0)
        total.sum_x = self.sum_x[partitions].sum(dim=0)
        total.sum_y = self.sum_y[partitions].sum(dim=0)
        total.xx = self.xx[partitions].sum(dim=0)
        total.xy = self.xy[partitions].sum(dim=0)
        total.yy = self.yy[partitions].sum(dim=0)
        total._covariances = {}
        return total

    def ridge_path(self, partitions: list[int]) -> _RidgePath:
        """Ridge fits trained on the summed moments of ``partitions``."""
        key = tuple(partitions)
        if key not in self._covariances:
            self._covariances[key] = _CentredCovariance(
                self.count[partitions].sum(dim=0), self.sum_x[partitions].sum(dim=0), self.xx[partitions].sum(dim=0)
            )
        return _RidgePath(self._covariances[key], self.sum_y[partitions].sum(dim=0), self.xy[partitions].sum(dim=0))


class _CentredCovariance:
    """The activations' side of a ridge fit: with ``n`` training rows of mean ``mx``, the eigenvectors
    and eigenvalues of ``Sxx = X^T X - n mx mx^T`` and the mean variance per coordinate."""

    def __init__(self, count: Tensor, sum_x: Tensor, xx: Tensor):
        if count < 2:
            raise ValueError("a probe needs at least 2 training rows")
        self.n = count
        self.mean_x = sum_x / count
        centred_xx = xx - count * torch.outer(self.mean_x, self.mean_x)
        centred_xx = (centred_xx + centred_xx.T) / 2
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(centred_xx)
        self.eigenvalues = self.eigenvalues.clamp_min(0.0)  # rounding can leave -1e-12
        self.scale = max(float(centred_xx.diagonal().mean() / count), 1e-300)


class _RidgePath:
    """Ridge fits on one set of training moments for many strengths at once (one eigendecomposition).

    With training means ``mx, my`` and centred moments ``Sxx = X^T X - n mx mx^T``,
    ``Sxy = X^T Y - n mx my^T``: ``W(r) = (Sxx + r I)^-1 Sxy`` and ``b = my - mx W``; the strength
    ``r`` is a relative ridge times the mean variance per coordinate times ``n``.
    """

    def __init__(self, covariance: _CentredCovariance, sum_y: Tensor, xy: Tensor):
        self.covariance, self.n, self.scale = covariance, covariance.n, covariance.scale
        self.mean_y = sum_y / covariance.n
        self.centred_xy = xy - covariance.n * torch.outer(covariance.mean_x, self.mean_y)

    def fit(self, relative_ridge: float) -> tuple[Float[Tensor, "d k"], Float[Tensor, " k"]]:
        ridge = relative_ridge * self.scale * self.n
        eigenvalues, eigenvectors = self.covariance.eigenvalues, self.covariance.eigenvectors
        rotated = eigenvectors.T @ self.centred_xy
        weight = eigenvectors @ (rotated / (eigenvalues + ridge)[:, None])
        return weight, self.mean_y - self.covariance.mean_x @ weight

    def fits(self, relative_ridges: Tensor) -> tuple[Float[Tensor, "r d k"], Float[Tensor, "r k"]]:
        """:meth:`fit` at every strength of ``relative_ridges [r]`` at once."""
        ridges = relative_ridges * self.scale * self.n
        eigenvalues, eigenvectors = self.covariance.eigenvalues, self.covariance.eigenvectors
        rotated = eigenvectors.T @ self.centred_xy  # [d, k]
        shrunk = rotated / (eigenvalues[None, :, None] + ridges[:, None, None])  # [r, d, k]
        weights = eigenvectors @ shrunk
        return weights, self.mean_y - self.covariance.mean_x @ weights


def _errors(held_out: _Moments, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of squared errors of ``x W + b`` and total sum of squares about the held-out mean,
    per target coordinate, from the held-out moments alone. ``weight [..., d, k]`` and ``bias [..., k]``
    may carry leading axes (one per ridge strength); so does the error."""
    n = held_out.count
    predicted_sq = (weight * (held_out.xx @ weight)).sum(dim=-2)  # diag(W^T X^T X W)
    sse = (
        held_out.yy
        + n * bias**2
        + predicted_sq
        - 2 * bias * held_out.sum_y
        - 2 * (held_out.xy * weight).sum(dim=-2)
        + 2 * bias * (held_out.sum_x @ weight)
    )
    sst = held_out.yy - held_out.sum_y**2 / n
    return sse.clamp_min(0.0), sst


def _r2(sse: Tensor, sst: Tensor) -> Tensor:
    """``1 - SSE/SST`` per coordinate; a coordinate that is constant on the held-out rows has no
    variance to explain: 1 if it is predicted exactly, else NaN (left out of the mean)."""
    constant = sst <= 1e-12 * sst.abs().max().clamp_min(1.0)
    r2 = 1 - sse / sst.where(~constant, torch.ones_like(sst))
    exact = sse <= 1e-12 * sst.abs().max().clamp_min(1.0)
    return torch.where(constant, torch.where(exact, 1.0, float("nan")), r2)


def _fit_from_moments(moments: _Moments, n_folds: int, relative_ridges: tuple[float, ...]) -> Probe:
    """Choose the ridge by grouped cross-validation on partitions ``1..n_folds``, refit on all of
    them, score on partition 0."""
    folds = list(range(1, n_folds + 1))
    ridges = torch.tensor(relative_ridges, dtype=torch.float64)
    cv_error = torch.zeros(len(relative_ridges), dtype=torch.float64)
    for fold in folds:
        path = moments.ridge_path([f for f in folds if f != fold])
        sse, sst = _errors(moments.select([fold]), *path.fits(ridges))  # [r, k], [k]
        # Pooled over folds: the sum of squared errors, normalised per coordinate by its variance.
        cv_error += (sse / sst.clamp_min(1e-300)).sum(dim=-1)
    best = int(torch.argmin(cv_error))
    path = moments.ridge_path(folds)
    weight, bias = path.fit(relative_ridges[best])
    r2_per_target = _r2(*_errors(moments.select([0]), weight, bias))
    return Probe(
        weight=weight,
        bias=bias,
        ridge=relative_ridges[best] * path.scale * float(path.n),
        r2=float(r2_per_target.nanmean()),
        r2_per_target=r2_per_target,
        n_train=int(path.n),
        n_test=int(moments.count[0]),
    )


def _partition_of_groups(unique_groups: int, n_folds: int, test_fraction: float, seed: int) -> Int[Tensor, " groups"]:
    """Partition id (0 = test, 1..n_folds = CV folds) of each group ``0..unique_groups-1``, seeded."""
    if unique_groups < n_folds + 1:
        raise ValueError(
            f"need at least {n_folds + 1} groups (sequences) for a test part and {n_folds} folds, got {unique_groups}"
        )
    order = torch.randperm(unique_groups, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(test_fraction * unique_groups))
    n_test = min(n_test, unique_groups - n_folds)
    partition = torch.empty(unique_groups, dtype=torch.int64)
    partition[order[:n_test]] = 0
    partition[order[n_test:]] = 1 + torch.arange(unique_groups - n_test) % n_folds
    return partition


def _check_varies(target: Float[Tensor, "n k"], name: str) -> None:
    """``ValueError`` when a target column takes one value on every row: R^2 (the fraction of the
    target's variance a probe explains) is undefined without variance, not 1."""
    constant = (target == target[:1]).all(dim=0)
    if constant.any():
        columns = constant.nonzero().flatten().tolist()
        raise ValueError(
            f"{name} column(s) {columns} of {target.shape[1]} take the same value on all {target.shape[0]} rows: "
            f"R^2 is undefined for a constant target (there is no variance to explain)"
        )


def _check_probe_settings(n_folds: int, test_fraction: float, relative_ridges) -> tuple[float, ...]:
    check_int(n_folds, "n_folds", 2)
    if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    ridges = tuple(float(r) for r in (RELATIVE_RIDGES if relative_ridges is None else relative_ridges))
    if not ridges or not all(r > 0 and math.isfinite(r) for r in ridges):
        raise ValueError("relative_ridges must be a non-empty sequence of finite numbers > 0")
    return ridges


def fit_probe(
    acts: Float[Tensor, "n d"],
    target: Float[Tensor, "n k"] | Float[Tensor, " n"],
    groups: Int[Tensor, " n"] | None = None,
    *,
    n_folds: int = N_FOLDS,
    test_fraction: float = TEST_FRACTION,
    relative_ridges: tuple[float, ...] | None = None,
    seed: int = 0,
) -> Probe:
    """Ridge regression from ``acts [N, d]`` onto ``target [N, k]`` with a grouped held-out test.

    ``groups[N]`` labels the sequence each row came from (default: every row its own group): a
    ``test_fraction`` of the groups (chosen with ``seed``) is held out, the rest is split into
    ``n_folds`` folds of whole groups to choose the ridge strength (``relative_ridges`` times the
    mean activation variance), then the probe is refit on all training groups. ``Probe.r2`` is the
    held-out R^2. Rows must be finite (drop positions ``t <= m``, where targets are NaN, first); a target
    column that is constant on every row is a ``ValueError`` (R^2 is undefined without variance).
    """
    relative_ridges = _check_probe_settings(n_folds, test_fraction, relative_ridges)
    acts = check_activations(acts)
    if not isinstance(target, Tensor) or not target.is_floating_point():
        raise ValueError("target must be a floating-point torch.Tensor")
    target = target.detach().to(torch.float64).cpu()
    target = target.unsqueeze(1) if target.ndim == 1 else target
    if target.ndim != 2 or target.shape[0] != acts.shape[0]:
        raise ValueError(f"target must have shape [N={acts.shape[0]}, k] (or [N]), got {tuple(target.shape)}")
    if not torch.isfinite(target).all():
        raise ValueError("target contains NaN or inf (targets are NaN at t <= m: drop those rows)")
    _check_varies(target, "target")
    if groups is None:
        groups = torch.arange(acts.shape[0])
    if not isinstance(groups, Tensor) or groups.is_floating_point() or groups.shape != (acts.shape[0],):
        raise ValueError(f"groups must be an integer tensor of shape [N={acts.shape[0]}]")
    unique, group_index = torch.unique(groups.cpu(), return_inverse=True)
    partition = _partition_of_groups(len(unique), n_folds, test_fraction, seed)[group_index]
    moments = _Moments(n_folds + 1, acts.shape[1], target.shape[1])
    moments.add(acts, target, partition)
    return _fit_from_moments(moments, n_folds, relative_ridges)


# ----------------------------------------------------------------------------------------------
# Probing a model layer by layer
# ----------------------------------------------------------------------------------------------


def default_hook_names(model: HookedTransformer) -> list[str]:
    """``hook_embed`` then ``blocks.{l}.hook_resid_post`` for every layer: index 0 = embedding."""
    return ["hook_embed"] + [get_act_name("resid_post", layer) for layer in range(model.cfg.n_layers)]


@dataclass
class ProbeReport:
    """Held-out R^2 of every (reading point, target), with its controls.

    rows: the reading points, in order (hook names, ``"hook:head{h}"`` for one head of an activation with
    a head axis, or ``"hook:block"`` for a named residual block);
    r2[target][i]: the probe's R^2 at ``rows[i]``; random_model_r2: the same probe on a randomly
    initialised model of the same architecture; control_target_r2: a probe for the control target
    (same width) at the same point of the real model; selectivity = r2 - control_target_r2;
    probes[(row, target)]: the fitted :class:`Probe` (for patching along its directions).
    """

    rows: list[str]
    targets: list[str]
    r2: dict[str, list[float]]
    random_model_r2: dict[str, list[float]] | None
    control_target_r2: dict[str, list[float]]
    selectivity: dict[str, list[float]]
    n_sequences: int
    n_rows: int
    probes: dict[tuple[str, str], Probe] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "targets": self.targets,
            "r2": self.r2,
            "random_model_r2": self.random_model_r2,
            "control_target_r2": self.control_target_r2,
            "selectivity": self.selectivity,
            "n_sequences": self.n_sequences,
            "n_rows": self.n_rows,
        }

    def table(self) -> str:
        """One line per reading point: ``R^2 (random model / control target)`` per target."""
        width = max(len(row) for row in self.rows)
        header = f"{'reading point':<{width}}  " + "  ".join(f"{t:>28}" for t in self.targets)
        lines = [header, "-" * len(header)]
        for i, row in enumerate(self.rows):
            cells = []
            for t in self.targets:
                random_r2 = "  -  " if self.random_model_r2 is None else f"{self.random_model_r2[t][i]:5.2f}"
                cells.append(f"{self.r2[t][i]:7.3f} ({random_r2} / {self.control_target_r2[t][i]:5.2f})")
            lines.append(f"{row:<{width}}  " + "  ".join(f"{c:>28}" for c in cells))
        lines.append("R^2 held out (random-init model / control target)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, title: str | None = None) -> Figure:
        """R^2 per reading point, one panel per target, with both controls dashed. A matplotlib
        ``Figure`` (shown inline in Jupyter; no pyplot state is touched; ``fig.savefig(path)``)."""
        fig = Figure(figsize=(3.4 * len(self.targets), 3.2))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(self.targets), squeeze=False)
        x = list(range(len(self.rows)))
        for ax, target in zip(axes[0], self.targets, strict=True):
            ax.plot(x, self.r2[target], "o-", label="model")
            if self.random_model_r2 is not None:
                ax.plot(x, self.random_model_r2[target], "s--", color="0.5", label="random-init model")
            ax.plot(x, self.control_target_r2[target], "x:", color="tab:red", label="control target")
            ax.set_title(target, fontsize=9)
            ax.set_xticks(x, [_short_label(r) for r in self.rows], rotation=45, fontsize=7)
            ax.set_ylim(min(-0.1, *(v for v in self.control_target_r2[target] if math.isfinite(v))), 1.05)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("held-out $R^2$")
        axes[0][-1].legend(fontsize=7, loc="lower right")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        return fig


def _short_label(row: str) -> str:
    """``blocks.1.hook_resid_post`` -> ``L2``, ``hook_embed`` -> ``embed``,
    ``blocks.0.attn.hook_z:head1`` -> ``L1 z h1``; blocks keep their name."""
    hook, _, part = row.partition(":")
    if part.startswith("head") and part[4:].isdigit():
        parts = hook.split(".")
        short = f"{layer_label(int(parts[1]))} {parts[-1].removeprefix('hook_')}" if parts[0] == "blocks" else hook
        return f"{short} h{part[4:]}"
    if part:
        return part
    if hook == "hook_embed":
        return "embed"
    parts = hook.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] == "hook_resid_post":
        return layer_label(int(parts[1]))
    return hook


def _read_full_width(probe: Probe, coordinates: slice, d_model: int) -> Probe:
    """A probe fit on some coordinates, rewritten to read the whole activation (zero elsewhere)."""
    if coordinates == slice(None):
        return probe
    weight = torch.zeros(d_model, probe.weight.shape[1], dtype=torch.float64)
    weight[coordinates] = probe.weight
    probe.weight = weight
    return probe


# Hooks whose activation is [batch, head, query_pos, key_pos] (or [batch, head, query_pos, offset]):
# TransformerLens's attention scores and pattern, and the disentangled attention's score terms.
PAIRWISE_HOOKS = ("hook_pattern", "hook_attn_scores", "hook_rel_scores", "hook_key_pos_scores", "hook_rel_query_scores")


@dataclass(frozen=True)
class _Reading:
    """One row of a probe report: a hook, and which part of its activation (coordinates of a named
    residual block, or one head of an activation with a head axis)."""

    hook: str
    coordinates: slice = field(default_factory=lambda: slice(None))
    head: int | None = None
    block: str | None = None

    @property
    def row(self) -> str:
        if self.block is not None:
            return f"{self.hook}:{self.block}"
        return self.hook if self.head is None else f"{self.hook}:head{self.head}"


def _valid_hook_names(model: HookedTransformer) -> str:
    """The model's hook names, the per-layer ones written once with ``{l}``."""
    n_layers = model.cfg.n_layers
    top = [name for name in model.hook_dict if not name.startswith("blocks.")]
    per_layer = [name.removeprefix("blocks.0.") for name in model.hook_dict if name.startswith("blocks.0.")]
    layers = "0" if n_layers == 1 else f"0..{n_layers - 1}"
    return f"{', '.join(top)}, and for each layer l in {layers}: " + ", ".join(f"blocks.{{l}}.{n}" for n in per_layer)


def _heads_at(model: HookedTransformer, hook_names: list[str], tokens: Tensor) -> dict[str, list[int | None]]:
    """For each hook: ``[None]`` when its activation is ``[batch, pos, d]``, its head indices when it is
    ``[batch, pos, head, d]`` (one run of one sequence shows which). ``ValueError`` for a name the model
    does not have (naming the valid ones), for an attention pattern or score, and for a hook the model
    never calls."""
    for hook in hook_names:
        if not isinstance(hook, str) or hook not in model.hook_dict:
            raise ValueError(f"the model has no hook named {hook!r}; its hooks are {_valid_hook_names(model)}")
        if hook.rsplit(".", 1)[-1] in PAIRWISE_HOOKS:
            raise ValueError(
                f"{hook!r} holds attention scores or a pattern, [batch, head, query_pos, key_pos]: a value per pair "
                f"of positions, not an activation per position that a probe can read. Probe hook_z or hook_result "
                f"(per head) or the residual instead; mdlens.hooks.attention compares patterns"
            )
    if not hook_names:
        return {}
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens.to(model_device(model)), names_filter=list(hook_names))
    heads = {}
    for hook in hook_names:
        if hook not in cache.cache_dict:
            raise ValueError(
                f"the model never calls {hook!r}, so it holds nothing to probe (hook_result needs "
                f"model.cfg.use_attn_result = True; an attention-only model has no MLP hooks)"
            )
        shape = tuple(cache[hook].shape)
        if len(shape) == 3:
            heads[hook] = [None]
        elif len(shape) == 4:
            heads[hook] = list(range(shape[2]))
        else:
            raise ValueError(
                f"{hook!r} has an activation of shape {shape}: a probe reads [batch, pos, d] or [batch, pos, head, d]"
            )
    return heads


def _infer_order(targets: dict[str, Tensor], tokens: Tensor) -> int:
    """The number of leading positions where the targets are NaN (``t <= m``), the same for all."""
    orders = set()
    for name, values in targets.items():
        if not isinstance(values, Tensor) or values.ndim != 3 or values.shape[:2] != tokens.shape:
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(
                f"target {name!r} must have shape [B, T, k] = [{tokens.shape[0]}, {tokens.shape[1]}, k], got {shape}"
            )
        defined = torch.isfinite(values).all(dim=-1).all(dim=0)  # [T]
        order = int((~defined).sum())
        if not defined[order:].all() or (order and defined[:order].any()):
            raise ValueError(f"target {name!r} must be finite exactly at positions t > m (NaN before)")
        orders.add(order)
    if len(orders) != 1:
        raise ValueError(f"targets disagree on the first defined position: {sorted(orders)}")
    return orders.pop()


def probe_model(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    targets: dict[str, Float[Tensor, "batch pos k"]],
    hook_names: list[str] | None = None,
    *,
    blocks: list[str] | None = None,
    random_model: bool = True,
    control_seed: int = 0,
    seed: int = 0,
    n_folds: int = N_FOLDS,
    test_fraction: float = TEST_FRACTION,
    batch_size: int = 64,
    progress: bool = False,
) -> ProbeReport:
    """Probe every reading point of ``model`` for every target, with both controls (module docstring).

    Args:
        tokens: ``[B, T]`` MTD tokens (one group per sequence).
        targets: name -> ``[B, T, k]``, NaN exactly at ``t <= m`` (as :func:`mdlens.hooks.targets`
            returns them); only positions ``t > m`` are probed.
        hook_names: where to read (default :func:`default_hook_names`: ``hook_embed`` then every
            ``blocks.{l}.hook_resid_post``; index 0 is the embedding). Any hook whose activation is
            ``[batch, pos, d]`` (residual, ``attn_out``, MLP hooks) is one row; one with a head axis,
            ``[batch, pos, head, d]`` (``hook_z``, ``hook_result``, ``hook_q`` / ``k`` / ``v``,
            ``hook_rel_values``), is probed per head, one row ``"{hook}:head{h}"`` each. Attention
            patterns and scores (``hook_pattern``, ``hook_attn_scores`` and the disentangled score
            terms) are ``[batch, head, query_pos, key_pos]``, a value per pair of positions rather than
            an activation per position: a ``ValueError`` says so, as it names the valid hooks for a
            name the model does not have.
        blocks: names of ``model.layout`` blocks (e.g. ``"L2.mean_responsibility"``), read from the
            final residual (a disentangled layer's block never changes once written), as extra rows.
        random_model: also probe :func:`mdlens.models.build_like` ``(model, seed=control_seed + 1)``.
        control_seed: seed of the control target's random function.
        seed: the seed of the group split.
    """
    relative_ridges, tokens, order = _check_probe_inputs(model, tokens, targets, n_folds, test_fraction)
    readings = _readings(model, tokens, hook_names, blocks)
    columns = _target_columns(targets, tokens, model.cfg.d_vocab, order, control_seed)
    partition = _partition_of_groups(tokens.shape[0], n_folds, test_fraction, seed)
    models = {"model": model}
    if random_model:
        models["random"] = build_like(model, seed=control_seed + 1)
    moments = _accumulate_moments(models, readings, tokens, order, partition, columns, n_folds, batch_size, progress)
    n_rows = tokens.shape[0] * (tokens.shape[1] - order)
    return _report_from_moments(model, readings, columns, moments, n_folds, relative_ridges, random_model, n_rows)


def _check_probe_inputs(
    model: HookedTransformer, tokens: Tensor, targets, n_folds: int, test_fraction: float
) -> tuple[tuple[float, ...], Int[Tensor, "batch pos"], int]:
    """:func:`probe_model`'s ridge strengths, checked tokens ``[B, T]`` and the order ``m`` the
    targets show (their NaN positions ``t <= m``)."""
    if not isinstance(targets, dict) or not targets:
        raise ValueError("targets must be a non-empty dict name -> [B, T, k] tensor")
    relative_ridges = _check_probe_settings(n_folds, test_fraction, None)
    tokens = check_model_tokens(model, tokens)
    order = _infer_order(targets, tokens)
    if order < 1:
        raise ValueError("targets must be NaN at positions t <= m (none is): pass mdlens.hooks.targets output")
    return relative_ridges, tokens, order


def _readings(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], hook_names: list[str] | None, blocks: list[str] | None
) -> list[_Reading]:
    """The rows of a probe report: every head of every hook (default :func:`default_hook_names`), then
    each named residual block at the first residual hook that holds it."""
    hook_names = default_hook_names(model) if hook_names is None else list(hook_names)
    layout = getattr(model, "layout", None)
    blocks = list(blocks or [])
    if blocks and layout is None:
        raise ValueError("blocks= needs a model with a named residual layout (model.layout)")
    for name in blocks:
        if name not in layout:
            raise ValueError(f"no residual block named {name!r} in model.layout; known: {', '.join(layout.names())}")
    heads = _heads_at(model, hook_names, tokens[:1])
    readings = [_Reading(hook, head=head) for hook in hook_names for head in heads[hook]]
    return readings + [_Reading(residual_hook_of(name), layout[name], block=name) for name in blocks]


@dataclass(frozen=True)
class _TargetColumns:
    """Every target and one control target per width, side by side in ``values`` ``[B, T, total]``;
    ``columns[name]`` (``"control:{k}"`` for a control) is each one's slice of the last axis."""

    names: list[str]
    widths: list[int]
    control_widths: list[int]
    columns: dict[str, slice]
    values: Float[Tensor, "batch pos total"]


def _target_columns(
    targets: dict[str, Tensor], tokens: Int[Tensor, "batch pos"], vocab_size: int, order: int, control_seed: int
) -> _TargetColumns:
    """The targets and their controls (:func:`mdlens.hooks.targets.control_target`) as one tensor;
    ``ValueError`` for a target that does not vary over the probed positions."""
    names = list(targets)
    widths = [targets[name].shape[-1] for name in names]
    control_widths = sorted(set(widths))
    controls = {w: control_target(tokens, vocab_size, order, w, seed=control_seed) for w in control_widths}
    columns, start = {}, 0
    for name, width in zip(names, widths, strict=True):
        columns[name], start = slice(start, start + width), start + width
    for width in control_widths:
        columns[f"control:{width}"], start = slice(start, start + width), start + width
    all_targets = torch.cat(
        [targets[n].to(torch.float64).cpu() for n in names] + [controls[w] for w in control_widths], dim=-1
    )
    for name in names:
        _check_varies(einops.rearrange(all_targets[:, order:, columns[name]], "b t k -> (b t) k"), f"target {name!r}")
    return _TargetColumns(names, widths, control_widths, columns, all_targets)


def _accumulate_moments(
    models: dict[str, HookedTransformer],
    readings: list[_Reading],
    tokens: Int[Tensor, "batch pos"],
    order: int,
    partition: Int[Tensor, " batch"],
    targets: _TargetColumns,
    n_folds: int,
    batch_size: int,
    progress: bool,
) -> dict[tuple[str, int], _Moments]:
    """One pass over the tokens in chunks: the moments of every (model, reading) against all target
    columns, at positions ``t > m``, per part of the group split."""
    moments = {(which, i): None for which in models for i in range(len(readings))}
    needed = sorted({reading.hook for reading in readings})
    chunks = range(0, tokens.shape[0], batch_size)
    for start in tqdm(chunks, desc="probing", disable=not progress):
        chunk = tokens[start : start + batch_size]
        chunk_partition = einops.repeat(partition[start : start + batch_size], "b -> (b t)", t=tokens.shape[1] - order)
        chunk_targets = einops.rearrange(targets.values[start : start + batch_size, order:], "b t k -> (b t) k")
        for which, runner in models.items():
            with torch.inference_mode():
                _, cache = runner.run_with_cache(chunk.to(model_device(runner)), names_filter=needed)
            for i, reading in enumerate(readings):
                acts = cache[reading.hook][:, order:]
                acts = acts[..., reading.coordinates] if reading.head is None else acts[:, :, reading.head]
                acts = einops.rearrange(acts.to(torch.float64).cpu(), "b t d -> (b t) d")
                if moments[(which, i)] is None:
                    moments[(which, i)] = _Moments(n_folds + 1, acts.shape[1], targets.values.shape[-1])
                moments[(which, i)].add(acts, chunk_targets, chunk_partition)
            del cache
    return moments


def _report_from_moments(
    model: HookedTransformer,
    readings: list[_Reading],
    targets: _TargetColumns,
    moments: dict[tuple[str, int], _Moments],
    n_folds: int,
    relative_ridges: tuple[float, ...],
    random_model: bool,
    n_rows: int,
) -> ProbeReport:
    """Fit every probe from its moments: per reading and target the model's probe (kept), the control
    target's and the random model's."""

    def fit(which: str, i: int, column: str) -> Probe:
        return _fit_from_moments(moments[(which, i)].columns(targets.columns[column]), n_folds, relative_ridges)

    names = targets.names
    r2 = {name: [] for name in names}
    random_r2 = {name: [] for name in names} if random_model else None
    control_r2 = {name: [] for name in names}
    probes = {}
    for i, reading in enumerate(readings):
        control_probes = {w: fit("model", i, f"control:{w}") for w in targets.control_widths}
        for name, width in zip(names, targets.widths, strict=True):
            probe = fit("model", i, name)
            if reading.block is not None:
                probe = _read_full_width(probe, reading.coordinates, model.cfg.d_model)
            probe.hook_name, probe.target_name = reading.hook, name
            probe.block, probe.head = reading.block, reading.head
            probes[(reading.row, name)] = probe
            r2[name].append(probe.r2)
            control_r2[name].append(control_probes[width].r2)
            if random_model:
                random_r2[name].append(fit("random", i, name).r2)
    selectivity = {name: [a - b for a, b in zip(r2[name], control_r2[name], strict=True)] for name in names}
    return ProbeReport(
        rows=[reading.row for reading in readings],
        targets=names,
        r2=r2,
        random_model_r2=random_r2,
        control_target_r2=control_r2,
        selectivity=selectivity,
        n_sequences=targets.values.shape[0],
        n_rows=n_rows,
        probes=probes,
    )
