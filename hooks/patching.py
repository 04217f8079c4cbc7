"""Activation patching against the algorithm: an interchange intervention on the mean
responsibility, and TransformerLens-style layer x position patching heatmaps.

**Interchange on the mean responsibility** (:func:`patch_mean_responsibility`). One-step MD reads
a sequence through one quantity, the mean responsibility ``Gamma_bar`` (paper-notes §2, §4): the
readout is ``sum_g softmax(beta * Gamma_bar)_g pi(y_{T+1-g}, .)``. If a model holds
``Gamma_bar`` in some subspace of one activation and reads it from there, then writing sequence
B's content of that subspace into the run of sequence A (at the last position) must turn A's
output into the *counterfactual* ``sum_g softmax(beta * Gamma_bar_B)_g pi(y^A_{T+1-g}, .)``:
B's lag weights applied to A's last ``m`` tokens. The construction holds ``Gamma_bar`` in the
named block ``L2.mean_responsibility`` of ``blocks.1.hook_resid_post``; any other model is
patched in the subspace a linear probe for ``mean_responsibility`` reads. A random subspace of
the same rank is the control.

**Heatmaps** (:func:`patching_heatmap`) follow ``transformer_lens.patching``: one patched run per
(layer, position), scored by default by ``KL(clean || patched)`` on the next-token distribution.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import ActivationCache, HookedTransformer
from transformer_lens import patching as tl_patching
from transformer_lens.utilities import get_act_name

from mdlens import estimators as E
from mdlens.hooks._checks import check_model_tokens, model_device
from mdlens.jsonable import json_ready
from mdlens.models.layout import residual_hook_of
from mdlens.predict import output_to_probs, output_type_of
from mdlens.validation import as_integer, check_order, check_positive, check_transition

MEAN_RESPONSIBILITY_BLOCK = "L2.mean_responsibility"
CONSTRUCTION_HOOK = residual_hook_of(MEAN_RESPONSIBILITY_BLOCK)  # the residual after the paper's layer 2
# Singular values of a probe's weight below this fraction of the largest do not span the subspace.
SUBSPACE_RTOL = 1e-8
HEATMAP_HOOKS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
DIRECTIONS = ("noising", "denoising")


@dataclass(frozen=True)
class PatchResult:
    """Result of :func:`patch_mean_responsibility`; distributions are float64 ``[B, q]``.

    ``kl_*`` are batch means of ``KL(counterfactual || output)``: ``kl_patched`` after the patch,
    ``kl_unpatched`` for A's own run (how far the counterfactual is from doing nothing),
    ``kl_random`` after patching a random subspace of the same rank (the control).
    ``max_abs_deviation`` is ``max |patched - counterfactual|`` over the batch and vocabulary,
    ``max_abs_deviation_random`` the same for the random patch (finite where a KL may be ``inf``:
    a "probs" output clipped to zero somewhere the counterfactual is not).
    """

    method: str  # "named_block" (the construction's L2.mean_responsibility) or "probe"
    hook_name: str
    subspace_rank: int
    beta: float
    kl_patched: float
    kl_unpatched: float
    kl_random: float
    max_abs_deviation: float
    max_abs_deviation_random: float
    counterfactual: Float[Tensor, "batch q"]
    patched: Float[Tensor, "batch q"]
    unpatched: Float[Tensor, "batch q"]
    random_patched: Float[Tensor, "batch q"]

    def to_dict(self) -> dict:
        """JSON-ready scalars (a non-finite KL becomes None)."""
        scalars = {
            "method": self.method,
            "hook_name": self.hook_name,
            "position": "last",
            "subspace_rank": self.subspace_rank,
            "beta": self.beta,
            "n_pairs": self.patched.shape[0],
            "kl_patched": self.kl_patched,
            "kl_unpatched": self.kl_unpatched,
            "kl_random": self.kl_random,
            "max_abs_deviation": self.max_abs_deviation,
            "max_abs_deviation_random": self.max_abs_deviation_random,
        }
        return json_ready(scalars)

    def __str__(self) -> str:
        return (
            f"PatchResult ({self.method}, {self.hook_name}, last position, rank {self.subspace_rank}, "
            f"beta={self.beta:.4g}, {self.patched.shape[0]} pairs)\n"
            f"  KL(counterfactual || patched)        {self.kl_patched:.4g}\n"
            f"  KL(counterfactual || unpatched)      {self.kl_unpatched:.4g}\n"
            f"  KL(counterfactual || random patch)   {self.kl_random:.4g}\n"
            f"  max |patched - counterfactual|       {self.max_abs_deviation:.3g}\n"
            f"  max |random patch - counterfactual|  {self.max_abs_deviation_random:.3g}"
        )


# ----------------------------------------------------------------------------------------------
# Interchange intervention on the mean responsibility
# ----------------------------------------------------------------------------------------------


def counterfactual_prediction(
    tokens_a: Int[Tensor, "batch pos"],
    tokens_b: Int[Tensor, "batch pos"],
    transition: Float[Tensor, "q q"],
    order: int,
    beta: float,
) -> Float[Tensor, "batch q"]:
    """One-step MD's predictive with B's lag weights on A's last ``m`` tokens, ``[B, q]``:
    ``sum_g softmax(beta * Gamma_bar_B)_g pi(y^A_{T+1-g}, .)``."""
    # softmax(beta * mean_k gamma_k) is one-step MD with eta = beta / (m (T - m)) (paper-notes §4).
    eta = E.eta_from_beta(beta, order, tokens_b.shape[-1])
    return E.predictive(tokens_a, transition, E.md_weights(tokens_b, transition, order, eta))


def _orthonormal_basis(weight: Float[Tensor, "d k"]) -> Float[Tensor, "d rank"]:
    """An orthonormal basis of the column space of ``weight`` (thin QR, then the directions whose
    ``|R_ii|`` is not negligible; SVD when the columns are dependent, so the rank is exact)."""
    q_factor, r_factor = torch.linalg.qr(weight)
    diagonal = r_factor.diagonal().abs()
    if (diagonal > SUBSPACE_RTOL * diagonal.max()).all():
        return q_factor
    left, singular, _ = torch.linalg.svd(weight, full_matrices=False)
    return left[:, singular > SUBSPACE_RTOL * singular.max()]


def _check_probe(probe, width: int) -> Float[Tensor, "d k"]:
    weight = getattr(probe, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError("probe.weight must be a floating-point [d, k] tensor (prediction = acts @ weight + bias)")
    if weight.shape[0] != width:
        raise ValueError(f"probe.weight has {weight.shape[0]} rows, the activation at the hook has width {width}")
    weight = weight.detach().to(torch.float64).cpu()
    if not torch.isfinite(weight).all():
        raise ValueError("probe.weight contains NaN or inf")
    if not (weight != 0).any():
        raise ValueError("probe.weight is all zeros: it spans no subspace")
    return weight


def _run_patched(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    replace_last: Callable[[Tensor], Tensor],
) -> Float[Tensor, "batch q"]:
    """Next-token distribution of a run where ``hook_name``'s last position ``h`` becomes ``replace_last(h)``."""

    def hook(activation: Tensor, hook) -> Tensor:
        patched = activation.clone()
        patched[:, -1] = replace_last(activation[:, -1].to(torch.float64)).to(activation.dtype)
        return patched

    with torch.inference_mode():
        output = model.run_with_hooks(tokens.to(model_device(model)), fwd_hooks=[(hook_name, hook)])
    return output_to_probs(output[:, -1].cpu(), output_type_of(model))


def _subspace_swap(basis: Tensor, source: Tensor) -> Callable[[Tensor], Tensor]:
    """``h -> h - P h + P h_source`` with ``P = basis basis^T`` (rows of ``source`` match rows of ``h``)."""
    source_part = source @ basis @ basis.T
    return lambda h: h - h @ basis @ basis.T + source_part


def patch_mean_responsibility(
    model: HookedTransformer,
    tokens_a: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    tokens_b: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    transition: Float[Tensor, "q q"],
    order: int,
    beta: float | None = None,
    probe=None,
    hook_name: str | None = None,
    seed: int = 0,
) -> PatchResult:
    """Write B's mean responsibility into A's run at the last position and compare the output
    with the counterfactual ``sum_g softmax(beta * Gamma_bar_B)_g pi(y^A_{T+1-g}, .)``.

    Where the patch goes:

    - ``probe`` given: the column space of ``probe.weight`` (``[d, k]``, a linear probe for
      ``mean_responsibility`` with prediction ``acts @ weight + bias``, e.g. from
      ``mdlens.hooks.probes.fit_probe``) at ``probe.hook_name``. With ``P`` the orthogonal
      projector onto it, A's last-position activation ``h_A`` becomes ``h_A - P h_A + P h_B``.
    - no probe, and ``model.layout`` has ``L2.mean_responsibility`` (the construction): that named
      block of ``blocks.1.hook_resid_post`` is overwritten with B's.

    The control patches a random subspace of the same rank (Gaussian directions from a
    ``torch.Generator`` seeded with ``seed``) in the same way.

    Args:
        model: any HookedTransformer with ``d_vocab = q`` ("logits" or "probs" output).
        tokens_a, tokens_b: ``[B, T]`` (or ``[T]``), the same shape, ``m < T <= n_ctx``; pair ``i`` is
            ``(tokens_a[i], tokens_b[i])``.
        transition, order: the task's ``pi`` ``[q, q]`` and ``m``.
        beta: the readout scale of the counterfactual. Default: ``model.md_params["beta"]`` (the
            construction); required for any other model, whose effective scale is not written down
            anywhere: a natural choice is ``eta * m * (T - m)`` with ``eta`` tuned on the task
            (``mdlens.estimators.tune_eta``), the construction's own relation.
        probe: an object with ``.weight`` ``[d, k]`` and ``.hook_name``; required unless the model
            has the named block.
        hook_name: where to patch; defaults to ``probe.hook_name`` (must agree with it when both are
            given) or ``blocks.1.hook_resid_post`` for the named block. The activation there must be
            ``[batch, pos, d]``.
        seed: seed of the random control subspace.

    Returns:
        :class:`PatchResult`.
    """
    transition, order, tokens_a, tokens_b, beta, hook_name, seed = _check_patch_arguments(
        model, tokens_a, tokens_b, transition, order, beta, probe, hook_name, seed
    )
    output_a, last_b = _last_position_runs(model, tokens_a, tokens_b, hook_name)
    method, rank, replace_last = _interchange(model, probe, last_b, hook_name)
    patched = _run_patched(model, tokens_a, hook_name, replace_last)
    random_basis = _random_basis(last_b.shape[1], rank, seed)
    random_patched = _run_patched(model, tokens_a, hook_name, _subspace_swap(random_basis, last_b))
    counterfactual = counterfactual_prediction(tokens_a, tokens_b, transition, order, beta)
    unpatched = output_to_probs(output_a, output_type_of(model))
    return _patch_result(method, hook_name, rank, beta, counterfactual, patched, unpatched, random_patched)


def _check_patch_arguments(
    model: HookedTransformer,
    tokens_a: Tensor,
    tokens_b: Tensor,
    transition: Tensor,
    order: int,
    beta: float | None,
    probe,
    hook_name: str | None,
    seed: int,
) -> tuple[Float[Tensor, "q q"], int, Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], float, str, int]:
    """:func:`patch_mean_responsibility`'s checked arguments: ``transition``, ``order``, both token
    batches (``[B, T]``, the same shape), ``beta`` (the model's own when not given), the hook to patch
    (the probe's, or the construction's residual) and ``seed``."""
    transition = check_transition(transition)
    order = check_order(order)
    tokens_a = check_model_tokens(model, tokens_a, transition, order)
    tokens_b = check_model_tokens(model, tokens_b, transition, order)
    if tokens_a.shape != tokens_b.shape:
        raise ValueError(
            f"tokens_a and tokens_b must have the same shape, got {tuple(tokens_a.shape)} and {tuple(tokens_b.shape)}"
        )
    if probe is None and _named_block(model) is None:
        raise ValueError(
            f"this model has no '{MEAN_RESPONSIBILITY_BLOCK}' block in a layout: pass a probe for "
            "mean_responsibility (an object with .weight [d, k] and .hook_name), e.g. from fit_probe"
        )
    beta = _check_beta(model, beta)
    hook_name = _check_patch_hook(model, probe, hook_name)
    return transition, order, tokens_a, tokens_b, beta, hook_name, as_integer(seed, "seed")


def _named_block(model: HookedTransformer) -> slice | None:
    """The slice of ``L2.mean_responsibility`` in ``model.layout`` (the construction's), else None."""
    layout = getattr(model, "layout", None)
    if layout is None or MEAN_RESPONSIBILITY_BLOCK not in layout:
        return None
    return layout[MEAN_RESPONSIBILITY_BLOCK]


def _check_beta(model: HookedTransformer, beta: float | None) -> float:
    """The counterfactual's readout scale: ``beta`` if given, else ``model.md_params["beta"]``; > 0."""
    if beta is None:
        md_params = getattr(model, "md_params", None)
        if not (isinstance(md_params, dict) and md_params.get("beta") is not None):
            raise ValueError(
                "beta is required for a model without md_params['beta']: the readout scale of the "
                "counterfactual, e.g. eta * m * (T - m) with eta tuned on the task"
            )
        beta = md_params["beta"]
    return check_positive(beta, "beta")


def _check_patch_hook(model: HookedTransformer, probe, hook_name: str | None) -> str:
    """Where to patch: ``probe.hook_name`` (``hook_name`` must agree), else ``hook_name``, else the
    construction's :data:`CONSTRUCTION_HOOK`; a hook of ``model``."""
    if probe is not None:
        probe_hook = getattr(probe, "hook_name", None)
        if not isinstance(probe_hook, str):
            raise ValueError("probe.hook_name must name the hook the probe was fit on")
        if hook_name is not None and hook_name != probe_hook:
            raise ValueError(
                f"hook_name={hook_name!r} differs from probe.hook_name={probe_hook!r}: a probe's "
                "subspace only means something at its own hook"
            )
        hook_name = probe_hook
    elif hook_name is None:
        hook_name = CONSTRUCTION_HOOK
    if hook_name not in model.hook_dict:
        raise ValueError(f"model has no hook named {hook_name!r}")
    return hook_name


def _last_position_runs(
    model: HookedTransformer, tokens_a: Int[Tensor, "batch pos"], tokens_b: Int[Tensor, "batch pos"], hook_name: str
) -> tuple[Tensor, Float[Tensor, "batch d"]]:
    """A's raw output at the last position (on the CPU) and B's activation at ``hook_name`` there
    (float64, CPU); the activation must be ``[batch, pos, d]``."""
    with torch.inference_mode():
        output_a = model(tokens_a.to(model_device(model)))[:, -1].cpu()
        _, cache_b = model.run_with_cache(
            tokens_b.to(model_device(model)), names_filter=lambda name: name == hook_name, return_type=None
        )
    activation_b = cache_b[hook_name]
    if activation_b.ndim != 3:
        raise ValueError(
            f"the activation at {hook_name!r} must be [batch, pos, d], got shape {tuple(activation_b.shape)}"
        )
    return output_a, activation_b[:, -1].to(torch.float64).cpu()


def _interchange(
    model: HookedTransformer, probe, last_b: Float[Tensor, "batch d"], hook_name: str
) -> tuple[str, int, Callable[[Tensor], Tensor]]:
    """The patch: ``(method, rank of the patched subspace, h -> patched h)``. With a probe its
    column space is swapped for B's; without, the construction's named block is overwritten."""
    width = last_b.shape[1]
    if probe is not None:
        basis = _orthonormal_basis(_check_probe(probe, width))
        return "probe", basis.shape[1], _subspace_swap(basis, last_b)
    block = _named_block(model)
    if block.stop > width:
        raise ValueError(
            f"block {MEAN_RESPONSIBILITY_BLOCK} [{block.start}, {block.stop}) does not fit "
            f"the activation of width {width} at {hook_name!r}"
        )

    def write_block(h: Tensor) -> Tensor:
        h = h.clone()
        h[:, block] = last_b[:, block]
        return h

    return "named_block", block.stop - block.start, write_block


def _random_basis(width: int, rank: int, seed: int) -> Float[Tensor, "width rank"]:
    """The control: an orthonormal basis of ``rank`` Gaussian directions (a generator seeded with ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    random_basis, _ = torch.linalg.qr(torch.randn(width, rank, generator=generator, dtype=torch.float64))
    return random_basis


def _patch_result(
    method: str,
    hook_name: str,
    rank: int,
    beta: float,
    counterfactual: Float[Tensor, "batch q"],
    patched: Float[Tensor, "batch q"],
    unpatched: Float[Tensor, "batch q"],
    random_patched: Float[Tensor, "batch q"],
) -> PatchResult:
    """The :class:`PatchResult` of three runs scored against the counterfactual."""

    def mean_kl(output: Tensor) -> float:
        return float(E.kl_divergence(counterfactual, output).mean())

    return PatchResult(
        method=method,
        hook_name=hook_name,
        subspace_rank=rank,
        beta=beta,
        kl_patched=mean_kl(patched),
        kl_unpatched=mean_kl(unpatched),
        kl_random=mean_kl(random_patched),
        max_abs_deviation=float((patched - counterfactual).abs().max()),
        max_abs_deviation_random=float((random_patched - counterfactual).abs().max()),
        counterfactual=counterfactual,
        patched=patched,
        unpatched=unpatched,
        random_patched=random_patched,
    )


# ----------------------------------------------------------------------------------------------
# Layer x position heatmaps (transformer_lens.patching)
# ----------------------------------------------------------------------------------------------


def patching_heatmap(
    model: HookedTransformer,
    tokens_clean: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    tokens_corrupt: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    metric: Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]] | None = None,
    hook: str = "resid_pre",
    direction: str = "noising",
    progress: bool = False,
) -> Float[Tensor, "layer pos"]:
    """Patch one (layer, position) of ``blocks.{l}.hook_{hook}`` at a time; ``[n_layers, T]``.

    The loop of ``transformer_lens.patching.generic_activation_patch`` with its
    ``layer_pos_patch_setter`` (what ``get_act_patch_resid_pre`` and its siblings are), written out
    so that its progress bar is optional and the metric's value is checked: each entry is
    ``metric(output of the patched run)``, where the output is the model's raw ``[B, T, q]``
    output, kept as float64 (TransformerLens's helpers round the entries to float32).

    Args:
        model: any HookedTransformer.
        tokens_clean, tokens_corrupt: ``[B, T]`` (or ``[T]``), the same shape, ``T <= n_ctx``.
        metric: maps the patched output ``[B, T, q]`` to a scalar tensor. Default:
            ``KL(clean || patched)`` of the next-token distribution at the last position (read with
            ``mdlens.predict.output_to_probs``, so "probs" and "logits" models alike), batch mean.
        hook: one of ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``
            (``resid_mid`` and ``mlp_out`` need a model with MLPs).
        direction: ``"noising"`` (default): run the clean tokens, patch in the corrupt run's
            activation; patching everything the output reads gives ``KL(clean || corrupt)``.
            ``"denoising"``: run the corrupt tokens, patch in the clean activation (TL's
            convention); the default metric then falls to 0 where the patch restores the output.
        progress: show a progress bar over the ``n_layers x T`` patched runs (tqdm; off by default).

    ``ValueError`` for a metric whose value is not one number (e.g. a per-sequence vector: reduce it).
    """
    tokens_clean, tokens_corrupt = _check_heatmap_arguments(
        model, tokens_clean, tokens_corrupt, metric, hook, direction
    )
    device = model_device(model)
    run_tokens, source_tokens = (
        (tokens_clean, tokens_corrupt) if direction == "noising" else (tokens_corrupt, tokens_clean)
    )
    with torch.inference_mode():
        output_type = output_type_of(model)
        clean_probs = output_to_probs(model(tokens_clean.to(device))[:, -1].cpu(), output_type)
        source_cache = _heatmap_source_cache(model, source_tokens.to(device), hook)
        if metric is None:
            metric = _next_token_kl_to(clean_probs, output_type)
        return _patch_every_cell(model, run_tokens.to(device), source_cache, hook, metric, progress)


def _check_heatmap_arguments(
    model: HookedTransformer,
    tokens_clean: Tensor,
    tokens_corrupt: Tensor,
    metric,
    hook: str,
    direction: str,
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """:func:`patching_heatmap`'s checked tokens (``[B, T]``, the same shape), hook, direction and metric."""
    tokens_clean = check_model_tokens(model, tokens_clean)
    tokens_corrupt = check_model_tokens(model, tokens_corrupt)
    if tokens_clean.shape != tokens_corrupt.shape:
        raise ValueError(
            f"tokens_clean and tokens_corrupt must have the same shape, got "
            f"{tuple(tokens_clean.shape)} and {tuple(tokens_corrupt.shape)}"
        )
    if hook not in HEATMAP_HOOKS:
        raise ValueError(f"hook must be one of {HEATMAP_HOOKS}, got {hook!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if metric is not None and not callable(metric):
        raise ValueError("metric must be a callable from the model output [B, T, q] to a scalar tensor")
    return tokens_clean, tokens_corrupt


def _heatmap_source_cache(model: HookedTransformer, source_tokens: Tensor, hook: str) -> ActivationCache:
    """The source run's ``blocks.*.hook_{hook}`` activations; ``ValueError`` if the model never calls them."""
    _, source_cache = model.run_with_cache(
        source_tokens, names_filter=lambda name: name.endswith(f"hook_{hook}"), return_type=None
    )
    if get_act_name(hook, 0) not in source_cache.cache_dict:  # the hook exists but is never called
        raise ValueError(
            f"this model computes no blocks.*.hook_{hook} (an attention-only model has no resid_mid or mlp_out)"
        )
    return source_cache


def _next_token_kl_to(clean_probs: Float[Tensor, "batch q"], output_type: str) -> Callable[[Tensor], Tensor]:
    """The default metric: batch mean of ``KL(clean || patched)`` of the last position's next-token distribution."""

    def metric(output: Tensor) -> Tensor:
        patched_probs = output_to_probs(output[:, -1].cpu(), output_type)
        return E.kl_divergence(clean_probs, patched_probs).mean()

    return metric


def _patch_every_cell(
    model: HookedTransformer,
    run_tokens: Int[Tensor, "batch pos"],
    source_cache: ActivationCache,
    hook: str,
    metric: Callable[[Tensor], Tensor],
    progress: bool,
) -> Float[Tensor, "layer pos"]:
    """One run of ``run_tokens`` per (layer, position), that cell of ``blocks.{l}.hook_{hook}`` taken from
    the source cache, scored by ``metric``."""
    n_layers, n_positions = model.cfg.n_layers, run_tokens.shape[1]
    heatmap = torch.zeros(n_layers, n_positions, dtype=torch.float64)
    cells = [(layer, position) for layer in range(n_layers) for position in range(n_positions)]
    for layer, position in tqdm(cells, desc=f"patching hook_{hook}", disable=not progress):
        name = get_act_name(hook, layer)

        def patch(activation: Tensor, hook, index=(layer, position), source=source_cache[name]) -> Tensor:
            return tl_patching.layer_pos_patch_setter(activation, list(index), source)

        output = model.run_with_hooks(run_tokens, fwd_hooks=[(name, patch)])
        heatmap[layer, position] = _metric_value(metric(output))
    return heatmap


def _metric_value(value) -> float:
    """A heatmap metric's value as a float: one number (a one-element tensor or a real number)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric must return one number per patched run (a scalar tensor), got a tensor of shape "
                f"{tuple(value.shape)}: reduce it, e.g. with .mean() over the batch"
            )
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"metric must return a scalar tensor or a number, got {type(value).__name__}")


def plot_patching_heatmap(
    heatmap: Float[Tensor, "layer pos"],
    title: str | None = None,
    metric_label: str = "KL(clean || patched)",
    hook: str = "resid_pre",
) -> Figure:
    """A layer x position image of a :func:`patching_heatmap` result (matplotlib, Agg canvas;
    no pyplot state is touched). Save it with ``fig.savefig(path)``."""
    if not isinstance(heatmap, Tensor) or heatmap.ndim != 2:
        raise ValueError("heatmap must be a [n_layers, T] tensor")
    values = heatmap.detach().to(torch.float64).cpu().numpy()
    n_layers, n_positions = values.shape
    # An infinite KL (a "probs" output clipped to zero where the clean run is not) would wash out
    # the colour scale: such cells are left blank and counted in the title.
    n_infinite = int((~np.isfinite(values)).sum())
    values = np.ma.masked_invalid(values)
    fig = Figure(figsize=(max(4.0, min(16.0, 0.12 * n_positions + 2.0)), 1.0 + 0.5 * n_layers + 1.0))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("position (0-based)")
    ax.set_ylabel(f"layer (blocks.l.hook_{hook})")
    ax.set_yticks(range(n_layers))
    fig.colorbar(image, ax=ax, label=metric_label)
    title = title or f"activation patching: {metric_label}"
    ax.set_title(title + (f" ({n_infinite} infinite cells left blank)" if n_infinite else ""), fontsize=9)
    fig.tight_layout()
    return fig
