"""Is mirror descent *causally* inside? Distributed alignment search (DAS) with interchange fidelity.

A probe says where a quantity is *readable*; it cannot say whether the model *uses* it. Causal
abstraction asks the stronger question (Geiger et al.; distributed alignment search, DAS): is there
a subspace of an activation that behaves like a variable of the algorithm under *interchange
interventions*? For a pair of sequences (base A, source B):

- **high level.** Run mirror descent on A with one variable ``V`` set to its value on B
  (:class:`MDCausalModel`, which is :func:`mdlens.estimators.causal_md_steps` with an
  intervention): the *counterfactual* next-token distribution ``cf``. For ``mean_responsibility``
  it is ``sum_g softmax(beta * Gamma_bar_B)_g pi(y^A_{T+1-g}, .)``: B's lag weights on A's last
  ``m`` tokens.
- **low level.** Run the model on A with the activation at one hook replaced, inside a subspace
  spanned by the orthonormal columns of ``R`` (``d x rank``), by B's:
  ``h_A <- h_A + (h_B - h_A) R R^T``, at the positions ``V`` lives at (the last one, or every
  ``t > m`` for ``responsibility``).

DAS learns ``R`` by gradient descent on ``KL(cf || intervened output)`` over training pairs with the
model frozen, and scores it on **held-out pairs** with the *interchange fidelity*
``1 - KL(cf || intervened) / KL(cf || base)`` (batch means): 1 when the subspace carries ``V`` and the
model reads it as MD does, 0 when the intervention does nothing towards ``cf``, negative when it
moves the output away.

A fidelity alone can mislead; :func:`align_variable` reports these next to it:

- **probe and random subspaces** of the same rank, patched the same way (no learning): is DAS
  needed at all, and is the effect more than "any ``rank`` directions"?
- **(a) a randomly initialised model** of the same architecture, same DAS: rules out a fidelity that
  the search itself manufactures from any network (enough free directions to steer the output).
  Where the model's output is read as probabilities (``output_type="probs"``, as the construction
  and the disentangled models), the random model's raw output is read through a softmax instead: an
  untrained network does not output probabilities (about 30% of its entries are negative), and
  floored at ``PROBS_FLOOR`` its KL to ``cf`` is mostly the clipped entries (1.65 of 1.80 on the
  construction's architecture), which any subspace that lifts them "closes": the fidelity would
  then measure the floor (0.3-0.5), not what DAS can make an untrained network do (0.03-0.07 read
  through a softmax, on the one- and two-step constructions).
- **(b) a wrong high-level model**: the counterfactual with B's lag weights cyclically permuted
  (``wrong_model="permuted_lags"``) or replaced by a random point of the simplex
  (``"random_weights"``). DAS must fit it much worse than the true one: rules out an alignment that
  would match *any* counterfactual (the subspace steers the output rather than carrying ``V``).
- **(c) the illusion check** of Makelov et al.: a subspace can change the output through a dormant
  direction that is not read on the model's normal runs, together with a direction that merely
  correlates with ``V``. Reported: ``subspace_r2``, the held-out R^2 of a probe for ``V`` restricted
  to the learned subspace (the subspace must *hold* ``V``, not only steer the output);
  ``read_fraction``, the share of the subspace inside the space that downstream computation reads
  (the row space of the Jacobian of the output with respect to the activation, on base runs: the
  linearised downstream reads, which for a linear read path is the row space of the reading
  weights); and ``read_only_fidelity``, the fidelity after dropping the unread part.

Why not pyvene: pyvene wraps HuggingFace modules by attribute path; on a ``HookedTransformer`` it
needs a shim around TransformerLens's hook points, and the intervention here is a few lines of
torch through ``run_with_hooks``. Keeping to TransformerLens's hooks is what lets the same code run
on the construction, the shipped models and a user's own ``HookedTransformer``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from jaxtyping import Float, Int
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.utilities import get_act_name

from mdlens import estimators as E
from mdlens.construction import variable_block
from mdlens.evaluation import effective_eta
from mdlens.hooks._checks import check_model_tokens, model_device
from mdlens.hooks.probes import fit_probe
from mdlens.models.layout import layer_label, residual_hook_of
from mdlens.models.registry import build_like
from mdlens.predict import output_to_probs, output_type_of, predict_next
from mdlens.validation import check_int, check_order, check_transition

# Where each variable of the construction lives (its named block) and at which positions it is
# intervened. "last": the last position only; "scored": every position t > m (0-based m..T-1).
VARIABLE_POSITIONS = {"responsibility": "scored", "mean_responsibility": "last"}
WRONG_MODELS = ("permuted_lags", "random_weights")
# Activations with a head axis ([batch, pos, head, d_head]) are intervened on all heads at once.
HEAD_HOOKS = ("hook_z", "hook_result", "hook_q", "hook_k", "hook_v")
# A "probs" model's output (mdlens.predict.output_to_probs clips it at 0) is clipped at this floor
# instead, then renormalised, in training and scoring alike: a clipped entry costs a large, finite
# KL and keeps a gradient, and a random-init model's all-negative rows can still be scored.
PROBS_FLOOR = 1e-6
# The read space keeps the right-singular directions of the output Jacobian whose singular value
# exceeds this fraction of the largest (its numerical row space).
READ_RTOL = 1e-6
# The last position resumed after a cached prefix must give the plain run's output to this share of its scale.
PREFIX_RTOL = 1e-5
# Fidelity within this of the best rank counts as saturated.
SATURATION_TOLERANCE = 0.01
# DAS's random starts beside the probe's subspace (see _train_basis).
RESTARTS = 2
# L-BFGS iterations of the final polish: one per POLISH_STEPS Adam steps, at most MAX_POLISH.
POLISH_STEPS, MAX_POLISH = 6, 25


# ----------------------------------------------------------------------------------------------
# The high-level model: causal mirror descent with interventions
# ----------------------------------------------------------------------------------------------


def _variable_names(steps: int) -> list[str]:
    """The variables an alignment can target: ``responsibility`` (every position) and the
    last-position quantities of causal ``steps``-step MD."""
    return ["responsibility", *E.causal_md_variables(steps)[2:]]


@dataclass(frozen=True)
class MDCausalModel:
    """Causal ``S``-step mirror descent (:func:`mdlens.estimators.causal_md_weights`) as a causal model
    with named variables; ``scales = (a, b2, c2, d2, ..)``, one-step MD is ``scales = (beta,)`` with
    ``eta = beta / (m (T - m))``.

    ``source`` (``"construction"``, ``"effective_step"`` or ``"given"``) says where the scales came
    from (:func:`high_level_model`).
    """

    transition: Float[Tensor, "q q"]
    order: int
    scales: tuple[float, ...]
    source: str = "given"

    @property
    def steps(self) -> int:
        return E.check_causal_scales(list(self.scales))[1]

    @property
    def variables(self) -> list[str]:
        return _variable_names(self.steps)

    def check_variable(self, variable: str) -> str:
        if not isinstance(variable, str) or variable not in self.variables:
            raise ValueError(
                f"unknown variable {variable!r} of {self.steps}-step MD; known: {', '.join(self.variables)}"
            )
        return variable

    def values(self, tokens: Int[Tensor, "batch pos"], variable: str) -> Tensor:
        """``variable`` on ``tokens``: ``[B, T-m, m]`` for ``responsibility`` (rows ``t = m+1..T``),
        ``[B, m]`` for a last-position variable."""
        self.check_variable(variable)
        if variable == "responsibility":
            return E.responsibilities(tokens, self.transition, self.order)
        return E.causal_md_steps(tokens, self.transition, self.order, list(self.scales))[variable]

    def lag_weights(
        self, tokens_base: Int[Tensor, "batch pos"], tokens_source: Int[Tensor, "batch pos"], variable: str
    ) -> Float[Tensor, "batch m"]:
        """The prediction's lag weights on the base with ``variable`` set to its value on the source."""
        source_value = self.values(tokens_source, variable)
        key = "responsibilities" if variable == "responsibility" else variable
        steps = E.causal_md_steps(
            tokens_base, self.transition, self.order, list(self.scales), interventions={key: source_value}
        )
        return steps[f"lambda{self.steps}"]

    def counterfactual(
        self, tokens_base: Int[Tensor, "batch pos"], tokens_source: Int[Tensor, "batch pos"], variable: str
    ) -> Float[Tensor, "batch q"]:
        """``sum_g lambda_g pi(y^base_{T+1-g}, .)`` with the intervened lag weights, ``[B, q]``."""
        weights = self.lag_weights(tokens_base, tokens_source, variable)
        return E.predictive(tokens_base, self.transition, weights)


def high_level_model(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    transition: Float[Tensor, "q q"],
    order: int,
    steps: int = 1,
) -> MDCausalModel:
    """The MD that ``model`` is compared with: the construction's own scales where the model
    records them (``model.md_params["scales"]``), otherwise the model's own step, fitted to its
    predictions on ``tokens``: for one step ``beta = eta_eff m (T - m)`` with
    :func:`mdlens.evaluation.effective_eta`; for more, the causal-MD scales closest to the model
    (:func:`mdlens.estimators.fit_causal_md_scales` with the model's predictions as the target)."""
    transition = check_transition(transition)
    order = check_order(order)
    steps = check_int(steps, "steps", 1)
    md_params = getattr(model, "md_params", None)
    if isinstance(md_params, dict) and md_params.get("scales") is not None:
        recorded = tuple(float(s) for s in md_params["scales"])
        if E.check_causal_scales(list(recorded))[1] >= steps:
            return MDCausalModel(transition, order, recorded, "construction")
    if steps == 1:
        eta = effective_eta(model, tokens, transition, order)
        beta = E.beta_from_eta(eta, order, tokens.shape[1])  # one-step MD with eta is softmax(beta * Gamma_bar)
        return MDCausalModel(transition, order, (beta,), "effective_step")
    own = predict_next(model, tokens)
    starts = E.default_causal_md_starts(tokens, transition, order, own, steps)
    fit = E.fit_causal_md_scales(tokens, transition, order, own, starts)
    return MDCausalModel(transition, order, tuple(fit["scales"]), "effective_step")


def wrong_counterfactual(
    high_level: MDCausalModel,
    tokens_base: Int[Tensor, "batch pos"],
    tokens_source: Int[Tensor, "batch pos"],
    variable: str,
    kind: str = "permuted_lags",
    seed: int = 0,
) -> Float[Tensor, "batch q"]:
    """Control (b)'s wrong high-level model: the counterfactual with B's lag weights cyclically
    permuted (lag ``g`` takes lag ``g+1``'s weight), or replaced by a Dirichlet(1) point, ``[B, q]``."""
    if kind not in WRONG_MODELS:
        raise ValueError(f"wrong_model must be one of {WRONG_MODELS}, got {kind!r}")
    weights = high_level.lag_weights(tokens_base, tokens_source, variable)
    if kind == "permuted_lags":
        weights = weights.roll(-1, dims=-1)
    else:
        generator = torch.Generator().manual_seed(seed)
        exponential = -torch.rand(weights.shape, generator=generator, dtype=torch.float64).log()
        weights = exponential / exponential.sum(dim=-1, keepdim=True)  # normalised Exp(1) = Dirichlet(1)
    return E.predictive(tokens_base, high_level.transition, weights)


# ----------------------------------------------------------------------------------------------
# Where the intervention goes
# ----------------------------------------------------------------------------------------------


class _NeverCalled(ValueError):
    """A hook the model has but never calls (a scan skips it; a single alignment reports it)."""


@dataclass(frozen=True)
class _Site:
    """A hook, the coordinates of its (flattened) activation a subspace may use, and the positions."""

    hook_name: str
    coordinates: slice  # of the flattened feature axis
    width: int  # of the flattened feature axis
    positions: str  # "last" or "scored"
    head_axis: bool  # activation [batch, pos, head, d_head], flattened to [batch, pos, head * d_head]
    # The residual hook whose value is (residual + this activation's change) and the block that
    # TransformerLens's ``start_at_layer`` resumes from with it; None: run the whole model with a hook.
    resume: tuple[str, int] | None


def _resume_point(model: HookedTransformer, hook_name: str) -> tuple[str, int] | None:
    """Where an intervention at ``hook_name`` can resume the model from the residual:
    ``blocks.{l}.hook_resid_pre`` (block ``l``), ``blocks.{l}.hook_resid_post`` (block ``l + 1``), and
    the outputs that are only added to ``blocks.{l}.hook_resid_post`` (``hook_mlp_out``, and
    ``hook_attn_out`` of an attention-only block). The last residual resumes at ``n_layers``
    (no block, only the unembedding)."""
    parts = hook_name.split(".")
    if not (len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit()):
        return None
    layer, name = int(parts[1]), parts[2]
    if name == "hook_resid_pre":
        return hook_name, layer
    added_to_post = name in ("hook_resid_post", "hook_mlp_out") or (name == "hook_attn_out" and model.cfg.attn_only)
    return (get_act_name("resid_post", layer), layer + 1) if added_to_post else None


def _site(model: HookedTransformer, hook_name: str, variable: str, tokens: Tensor) -> _Site:
    """Check ``hook_name`` (a hook of the model, or a block of ``model.layout``) and describe it."""
    if not isinstance(hook_name, str):
        raise ValueError(f"hook_name must be a str, got {type(hook_name).__name__}")
    layout = getattr(model, "layout", None)
    block = None
    if hook_name not in model.hook_dict and layout is not None and hook_name in layout:
        block, hook_name = hook_name, residual_hook_of(hook_name)
    if hook_name not in model.hook_dict:
        residual = [n for n in model.hook_dict if "resid" in n or n in ("hook_embed", "hook_pos_embed")]
        raise ValueError(
            f"model has no hook named {hook_name!r} (and no layout block of that name); residual hooks: "
            f"{', '.join(residual)}; also blocks.{{l}}.hook_attn_out, blocks.{{l}}.attn.hook_z, ..."
        )
    if hook_name.endswith(("hook_pattern", "hook_attn_scores")) or "hook_rel_" in hook_name:
        raise ValueError(
            f"{hook_name!r} holds attention scores or weights over keys, not a representation: "
            "a subspace there has no meaning as a variable's value; use the residual, hook_z or hook_attn_out"
        )
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            tokens[:1].to(model_device(model)), names_filter=lambda name: name == hook_name, return_type=None
        )
    if hook_name not in cache.cache_dict:
        raise _NeverCalled(f"the model never calls {hook_name!r} (e.g. hook_resid_mid in an attention-only model)")
    shape = cache[hook_name].shape
    head_axis = hook_name.split(".")[-1] in HEAD_HOOKS and len(shape) == 4
    if not head_axis and len(shape) != 3:
        raise ValueError(f"the activation at {hook_name!r} must be [batch, pos, d], got shape {tuple(shape)}")
    width = shape[2] * shape[3] if head_axis else shape[2]
    coordinates = slice(0, width) if block is None else layout[block]
    resume = None if head_axis else _resume_point(model, hook_name)
    if block is not None and coordinates.stop > width:
        raise ValueError(f"block {block} {coordinates} does not fit the activation of width {width}")
    return _Site(hook_name, coordinates, width, VARIABLE_POSITIONS.get(variable, "last"), head_axis, resume)


def _position_index(site: _Site, seq_len: int, order: int) -> slice:
    return slice(seq_len - 1, seq_len) if site.positions == "last" else slice(order, seq_len)


# ----------------------------------------------------------------------------------------------
# Running the intervention
# ----------------------------------------------------------------------------------------------


class _Intervener:
    """Runs ``model`` on base tokens with a subspace of one activation taken from source runs.

    Activations are cached once per pair set (they do not depend on the subspace): the base's and
    the source's at the intervened positions and, where the site has a resume point, the base's
    whole residual there, so that each training step runs only the blocks after it
    (TransformerLens's ``start_at_layer``) instead of the whole model. When only the last position
    is intervened, nothing before it changes (causal attention): the blocks after the resume point
    then run on the last position alone, reading the base's keys and values at the earlier positions
    from TransformerLens's key/value cache (:func:`_with_prefix_cache`; the same outputs, checked on the
    pairs at hand, at a fraction of the cost).
    """

    def __init__(self, model: HookedTransformer, site: _Site, order: int):
        self.model, self.site, self.order = model, site, order
        self.output_type = output_type_of(model)
        self.device = model_device(model)

    def cache(self, tokens: Tensor, name: str | None = None) -> Tensor:
        """The (flattened) activation at the site's hook, or at ``name``, ``[B, T, width]`` (no grad)."""
        name = name or self.site.hook_name
        with torch.inference_mode():
            _, cache = self.model.run_with_cache(
                tokens.to(self.device), names_filter=lambda n: n == name, return_type=None
            )
        activation = cache[name]
        return (activation.flatten(2) if self.site.head_axis else activation).clone()

    def output(
        self,
        pairs: _Pairs,
        basis: Tensor | None,
        floor: float | None = PROBS_FLOOR,
        projector: Tensor | None = None,
    ) -> Float[Tensor, "batch q"]:
        """Next-token distribution ``[B, q]`` of the intervened runs (differentiable in ``basis``).

        ``basis``: ``[width, rank]`` orthonormal columns; or ``projector``, a ``[c, c]`` matrix over the
        site's coordinates used instead of ``basis basis^T``. ``floor``: where a "probs" output is
        clipped (``PROBS_FLOOR``; ``None``: the exact :func:`mdlens.predict.output_to_probs`)."""
        site = self.site
        positions = _position_index(site, pairs.tokens_base.shape[1], self.order)
        coordinates = site.coordinates
        if projector is None:
            projector = basis[coordinates] @ basis[coordinates].T
        projector = projector.to(pairs.source_site.dtype)
        # h <- h + (h_source - h) R R^T on the intervened positions, inside the site's coordinates.
        delta = (pairs.source_site[..., coordinates] - pairs.base_site[..., coordinates]) @ projector

        def add_delta(activation: Tensor) -> Tensor:
            change = torch.zeros_like(activation)
            change[:, positions if activation.shape[1] > 1 else slice(None), coordinates] = delta
            return activation + change

        if pairs.prefix is not None:  # the last position alone, after the base's cached prefix
            last = add_delta(pairs.base_resid[:, -1:])  # the intervened position is the last one
            raw = self.model(last, start_at_layer=site.resume[1], past_kv_cache=_frozen_cache(pairs.prefix))[:, -1]
        elif site.resume is not None:
            raw = self.model(add_delta(pairs.base_resid), start_at_layer=site.resume[1])[:, -1]
        else:

            def hook(activation: Tensor, hook) -> Tensor:
                if not site.head_axis:
                    return add_delta(activation)
                return add_delta(activation.flatten(2)).unflatten(2, activation.shape[2:])

            raw = self.model.run_with_hooks(pairs.tokens_base.to(self.device), fwd_hooks=[(site.hook_name, hook)])
            raw = raw[:, -1]
        return _to_probs(raw.to(torch.float64).cpu(), self.output_type, floor)

    def base_output(self, tokens: Tensor) -> Float[Tensor, "batch q"]:
        with torch.inference_mode():
            raw = self.model(tokens.to(self.device))[:, -1]
        return _to_probs(raw.to(torch.float64).cpu(), self.output_type, PROBS_FLOOR)


def _to_probs(raw: Tensor, output_type: str, floor: float | None) -> Tensor:
    if floor is None or output_type == "logits":
        return torch.softmax(raw, dim=-1) if output_type == "logits" else output_to_probs(raw, output_type)
    clipped = raw.clamp(min=floor)
    return clipped / clipped.sum(dim=-1, keepdim=True)


def _kl_per_pair(target: Tensor, output: Tensor) -> Tensor:
    """``KL(target || output)`` per row with ``0 log 0 = 0``; inf where ``output`` is 0 and ``target`` not."""
    terms = torch.where(target > 0, target * (target.log() - output.log()), torch.zeros_like(target))
    return terms.sum(dim=-1)


@dataclass
class _Pairs:
    """A set of (base, source) pairs, their cached activations and counterfactual."""

    tokens_base: Tensor
    tokens_source: Tensor
    base_site: Tensor  # the base's activation at the intervened positions, [B, n_positions, width]
    source_site: Tensor  # the source's, the same shape
    base_resid: Tensor | None  # the base's whole residual at the site's resume point, [B, T, d_model]
    counterfactual: Tensor
    # The base's keys and values at positions 0..T-2, per block ([B, T-1, heads, d_head] each), where
    # only the last position is intervened (_with_prefix_cache); None: the blocks run on every position.
    prefix: tuple[tuple[Tensor, Tensor], ...] | None = None

    def __len__(self) -> int:
        return self.tokens_base.shape[0]

    def rows(self, index: slice | Tensor) -> _Pairs:
        return _Pairs(
            self.tokens_base[index],
            self.tokens_source[index],
            self.base_site[index],
            self.source_site[index],
            None if self.base_resid is None else self.base_resid[index],
            self.counterfactual[index],
            None if self.prefix is None else tuple((keys[index], values[index]) for keys, values in self.prefix),
        )

    def with_counterfactual(self, counterfactual: Tensor) -> _Pairs:
        return replace(self, counterfactual=counterfactual)


def _prepare(intervener: _Intervener, tokens_a: Tensor, tokens_b: Tensor, counterfactual: Tensor) -> _Pairs:
    positions = _position_index(intervener.site, tokens_a.shape[1], intervener.order)
    resume = intervener.site.resume
    base_resid = None if resume is None else intervener.cache(tokens_a, resume[0])
    if resume is not None and resume[0] == intervener.site.hook_name:
        base_site = base_resid[:, positions]
    else:
        base_site = intervener.cache(tokens_a)[:, positions]
    source_site = intervener.cache(tokens_b)[:, positions]
    pairs = _Pairs(tokens_a, tokens_b, base_site, source_site, base_resid, counterfactual)
    if resume is not None and intervener.site.positions == "last" and tokens_a.shape[1] > 1:
        pairs = _with_prefix_cache(intervener, pairs)
    return pairs


def _with_prefix_cache(intervener: _Intervener, pairs: _Pairs) -> _Pairs:
    """``pairs`` with the base's keys and values at every position but the last (from TransformerLens's
    key/value cache of the base run: causal, so those of ``tokens[:, :-1]``), if resuming the last
    position from them gives the plain run's output on these pairs (to ``PREFIX_RTOL`` of its scale);
    else ``pairs`` unchanged (a model whose blocks cannot resume from a cache runs every position)."""
    model, tokens = intervener.model, pairs.tokens_base.to(intervener.device)
    try:
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, intervener.device, tokens.shape[0])
        with torch.no_grad():
            model(tokens, past_kv_cache=cache, attention_mask=torch.ones_like(tokens))  # no padding
            prefix = tuple((entry.past_keys[:, :-1], entry.past_values[:, :-1]) for entry in cache.entries)
            cached = replace(pairs, prefix=prefix)
            resumed = model(
                cached.base_resid[:, -1:], start_at_layer=intervener.site.resume[1], past_kv_cache=_frozen_cache(prefix)
            )
            plain = model(cached.base_resid, start_at_layer=intervener.site.resume[1])
    except (ValueError, RuntimeError, AssertionError, TypeError):
        return pairs
    deviation = float((resumed[:, -1] - plain[:, -1]).abs().max())
    return cached if deviation <= PREFIX_RTOL * max(1.0, float(plain[:, -1].abs().max())) else pairs


def _frozen_cache(prefix: tuple[tuple[Tensor, Tensor], ...]) -> TransformerLensKeyValueCache:
    """A frozen TransformerLens key/value cache holding ``prefix`` (a run with it leaves it as it is)."""
    batch, n_prefix = prefix[0][0].shape[:2]
    entries = [TransformerLensKeyValueCacheEntry(keys, values, frozen=True) for keys, values in prefix]
    mask = torch.ones(batch, n_prefix, dtype=torch.long, device=prefix[0][0].device)
    return TransformerLensKeyValueCache(entries, mask, frozen=True)


def _mean_kl(intervener: _Intervener, pairs: _Pairs, basis: Tensor, batch_size: int) -> float:
    """Batch-mean ``KL(cf || intervened)`` on ``pairs`` (exact output, no floor)."""
    kls = []
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs.rows(slice(start, start + batch_size))
            output = intervener.output(chunk, basis)
            kls.append(_kl_per_pair(chunk.counterfactual, output))
    return float(torch.cat(kls).mean())


def _fidelity(kl_intervened: float, kl_base: float) -> float:
    return 1.0 - kl_intervened / kl_base if kl_base > 0 else float("nan")


def _train_basis(
    intervener: _Intervener,
    pairs: _Pairs,
    width: int,
    rank: int,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
    restarts: int = RESTARTS,
    start: Tensor | None = None,
) -> Float[Tensor, "width rank"]:
    """DAS: Adam on an orthonormal ``width x rank`` basis (``torch.nn.utils.parametrizations.orthogonal``,
    Cayley map) minimising the batch-mean ``KL(cf || intervened)`` over random batches of training
    pairs; the model's parameters are not touched.

    The loss has poor basins (a basis that leaks into directions the output is very sensitive to,
    such as the current token, learns slowly), and Adam at a fixed rate wanders along its flat
    directions. So: the candidates (``start``, e.g. the probe's subspace, and ``restarts`` random
    bases) train for ``steps // 5`` steps each; the one with the lowest loss on a fixed set of
    training pairs goes on for ``steps`` more with the rate decayed to 0 on a cosine; then L-BFGS
    polishes it on that fixed set. The result is the basis with the lowest loss on that set among
    every start, the cosine run's end and the polished one (selection on training pairs only).
    """
    generator = torch.Generator().manual_seed(seed)
    check = pairs.rows(torch.randperm(len(pairs), generator=generator)[: 2 * batch_size])
    starts = [] if start is None else [start]
    starts += [_random_basis(width, rank, generator) for _ in range(restarts)]
    candidates = []
    seen = [(float(_loss(intervener, check, initial)), initial) for initial in starts]
    for initial in starts:
        holder = _orthonormal_parameter(initial, generator)
        optimiser = torch.optim.Adam(holder.parameters(), lr=lr)
        _adam_steps(intervener, pairs, holder, optimiser, None, max(1, steps // 5), batch_size, generator, progress)
        candidates.append((float(_loss(intervener, check, holder.weight.detach())), holder, optimiser))
    _, holder, optimiser = min(candidates, key=lambda candidate: candidate[0])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    _adam_steps(intervener, pairs, holder, optimiser, schedule, steps, batch_size, generator, progress)
    trained = holder.weight.detach().clone()
    seen.append((float(_loss(intervener, check, trained)), trained))
    polished = _polish(intervener, check, holder, iterations=min(MAX_POLISH, max(1, steps // POLISH_STEPS)))
    seen.append((float(_loss(intervener, check, polished)), polished))
    finite = [(loss, basis) for loss, basis in seen if math.isfinite(loss)]
    return min(finite, key=lambda entry: entry[0])[1] if finite else trained


def _random_basis(width: int, rank: int, generator: torch.Generator) -> Tensor:
    return torch.linalg.qr(torch.randn(width, rank, generator=generator, dtype=torch.float64))[0]


def _orthonormal_parameter(initial: Tensor, generator: torch.Generator) -> torch.nn.Module:
    """A module whose ``.weight`` is an orthonormal ``[width, rank]`` basis starting at ``initial``.

    Registering the parametrization completes the basis with draws from torch's global generator:
    they are made from a seed taken from ``generator``, in a forked global state, so the same seed
    gives the same basis and the caller's random stream is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        holder = torch.nn.Linear(initial.shape[1], initial.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            holder.weight.copy_(initial)
        torch.nn.utils.parametrizations.orthogonal(holder, orthogonal_map="cayley")
    return holder


def _polish(intervener: _Intervener, check: _Pairs, holder: torch.nn.Module, iterations: int) -> Tensor:
    """L-BFGS on the fixed pairs ``check`` from the basis ``holder`` holds; the basis it ends at."""
    optimiser = torch.optim.LBFGS(holder.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = _loss(intervener, check, holder.weight)
        loss.backward()
        return loss

    with _frozen(intervener.model):
        optimiser.step(closure)
    return holder.weight.detach().clone()


def _adam_steps(intervener, pairs, holder, optimiser, schedule, steps, batch_size, generator, progress) -> None:
    with _frozen(intervener.model):
        for _ in tqdm(range(steps), desc="DAS", disable=not progress, leave=False):
            chunk = pairs.rows(torch.randint(0, len(pairs), (batch_size,), generator=generator))
            loss = _loss(intervener, chunk, holder.weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if schedule is not None:
                schedule.step()


def _loss(intervener: _Intervener, pairs: _Pairs, basis: Tensor) -> Tensor:
    """Batch-mean ``KL(cf || intervened)`` for a basis over the site's coordinates ``[c, rank]``
    (differentiable in ``basis`` unless it is detached; then computed without a graph)."""
    with torch.set_grad_enabled(basis.requires_grad):
        output = intervener.output(pairs, None, projector=basis @ basis.T)
        return _kl_per_pair(pairs.counterfactual, output).mean()


@contextmanager
def _frozen(model: HookedTransformer) -> Iterator[None]:
    """No gradient for the model's parameters inside (restored on exit): only the subspace learns."""
    requires_grad = [param.requires_grad for param in model.parameters()]
    for param in model.parameters():
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(model.parameters(), requires_grad, strict=True):
            param.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------------


@dataclass
class Alignment:
    """Result of :func:`align_variable`. Every fidelity is measured on the held-out pairs:
    ``1 - KL(cf || intervened) / KL(cf || base)`` with batch-mean KLs (module docstring).

    basis: the learned orthonormal subspace, ``[width, rank]`` float64 over the hook's (flattened)
    activation; the coordinates outside ``coordinates`` are zero.
    Controls are ``None`` where not run (``controls=False``) or not defined (no named block).
    """

    variable: str
    hook_name: str
    coordinates: tuple[int, int]
    positions: str
    rank: int
    basis: Float[Tensor, "width rank"]
    high_level: MDCausalModel
    n_train: int
    n_held_out: int
    kl_base: float
    kl_intervened: float
    interchange_fidelity: float
    probe_fidelity: float
    probe_rank: int
    random_subspace_fidelity: float
    named_block: str | None = None
    named_block_fidelity: float | None = None
    named_block_max_deviation: float | None = None
    rank_sweep: dict[int, float] = field(default_factory=dict)
    saturation_rank: int | None = None
    random_model_fidelity: float | None = None
    wrong_model: str | None = None
    wrong_model_fidelity: float | None = None
    subspace_r2: float | None = None
    read_fraction: float | None = None
    read_only_fidelity: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready summary (non-finite numbers become None; the basis is left out)."""

        def clean(value):
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {str(k): clean(v) for k, v in value.items()}
            return value

        summary = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name not in ("basis", "high_level", "coordinates")
        }
        summary["coordinates"] = list(self.coordinates)
        summary["scales"] = list(self.high_level.scales)
        summary["scales_source"] = self.high_level.source
        return {k: clean(v) for k, v in summary.items()}

    def __str__(self) -> str:
        def fmt(value) -> str:
            return "  -  " if value is None else f"{value:7.3f}"

        lines = [
            f"Alignment of {self.variable} at {self.hook_name} ({self.positions} positions), rank {self.rank}, "
            f"{self.n_train} training / {self.n_held_out} held-out pairs",
            f"  high-level model: {self.high_level.steps}-step MD, scales {[round(s, 4) for s in self.high_level.scales]} "
            f"({self.high_level.source})",
            f"  KL(cf || base) {self.kl_base:.4g}   KL(cf || intervened) {self.kl_intervened:.4g}",
            f"  interchange fidelity (DAS)          {fmt(self.interchange_fidelity)}",
            f"  probe subspace (rank {self.probe_rank})           {fmt(self.probe_fidelity)}",
            f"  random subspace                     {fmt(self.random_subspace_fidelity)}",
        ]
        if self.named_block is not None:
            lines.append(f"  named block {self.named_block:<24}{fmt(self.named_block_fidelity)}")
        lines += [
            f"  (a) random-init model               {fmt(self.random_model_fidelity)}",
            f"  (b) wrong model ({self.wrong_model})     {fmt(self.wrong_model_fidelity)}",
            f"  (c) subspace R^2 {fmt(self.subspace_r2)}, read fraction {fmt(self.read_fraction)}, "
            f"read-only fidelity {fmt(self.read_only_fidelity)}",
        ]
        if self.rank_sweep:
            sweep = ", ".join(f"{r}: {f:.3f}" for r, f in self.rank_sweep.items())
            lines.append(f"  rank sweep {sweep} (saturates at {self.saturation_rank})")
        return "\n".join(lines)

    def plot(self, title: str | None = None) -> Figure:
        """The fidelity beside its controls, and the rank sweep (matplotlib, Agg canvas)."""
        bars = {
            "DAS": self.interchange_fidelity,
            "probe\nsubspace": self.probe_fidelity,
            "random\nsubspace": self.random_subspace_fidelity,
            "named\nblock": self.named_block_fidelity,
            "(a) random\nmodel": self.random_model_fidelity,
            "(b) wrong\nmodel": self.wrong_model_fidelity,
            "(c) read\nonly": self.read_only_fidelity,
        }
        bars = {k: v for k, v in bars.items() if v is not None and math.isfinite(v)}
        fig = Figure(figsize=(9.0, 3.4))
        FigureCanvasAgg(fig)
        left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
        colours = ["C0"] + ["0.55"] * (len(bars) - 1)
        left.bar(range(len(bars)), list(bars.values()), color=colours)
        left.set_xticks(range(len(bars)), list(bars), fontsize=7)
        left.axhline(0, color="k", lw=0.6)
        left.axhline(1, color="k", lw=0.6, ls=":")
        left.set_ylim(min(-0.1, *bars.values()) - 0.05, 1.1)
        left.set_ylabel("held-out interchange fidelity")
        left.set_title(title or f"{self.variable} at {self.hook_name}", fontsize=9)
        if self.rank_sweep:
            ranks = list(self.rank_sweep)
            right.plot(ranks, [self.rank_sweep[r] for r in ranks], "o-")
            right.set_xlabel("rank")
            right.set_ylim(min(-0.1, *self.rank_sweep.values()) - 0.05, 1.1)
            right.set_title(f"rank sweep (saturates at {self.saturation_rank})", fontsize=9)
        else:
            right.set_axis_off()
        fig.tight_layout()
        return fig


# ----------------------------------------------------------------------------------------------
# DAS on one variable at one hook
# ----------------------------------------------------------------------------------------------


def _check_pairs(
    model: HookedTransformer, tokens_a: Tensor, tokens_b: Tensor, transition: Tensor, order: int
) -> tuple[Tensor, Tensor]:
    tokens_a = check_model_tokens(model, tokens_a, transition, order)
    tokens_b = check_model_tokens(model, tokens_b, transition, order)
    if tokens_a.shape != tokens_b.shape:
        raise ValueError(
            f"tokens_a and tokens_b must have the same shape (pairs of one length), got "
            f"{tuple(tokens_a.shape)} and {tuple(tokens_b.shape)}"
        )
    if tokens_a.shape[0] < 8:
        raise ValueError(f"need at least 8 pairs (training and held-out), got {tokens_a.shape[0]}")
    return tokens_a, tokens_b


def _check_rank(rank: int, width: int, name: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or not 1 <= rank <= width:
        raise ValueError(f"{name} must be an int in 1..{width} (the width of the intervened coordinates), got {rank!r}")
    return int(rank)


def _embed(basis: Tensor, coordinates: slice, width: int) -> Tensor:
    """A basis of some coordinates as a basis of the whole flattened activation (zero elsewhere)."""
    full = torch.zeros(width, basis.shape[1], dtype=torch.float64)
    full[coordinates] = basis.to(torch.float64)
    return full


def _orthonormal(columns: Tensor, rtol: float = 1e-8) -> Tensor:
    """An orthonormal basis of the column space of ``columns`` (SVD; negligible directions dropped)."""
    left, singular, _ = torch.linalg.svd(columns.to(torch.float64), full_matrices=False)
    return left[:, singular > rtol * singular.max()]


def _probe_basis(acts: Tensor, values: Tensor, groups: Tensor) -> Tensor:
    """The column space of a ridge probe for ``values`` (:func:`mdlens.hooks.fit_probe`)."""
    return _orthonormal(fit_probe(acts, values, groups).weight)


def _site_probe(intervener: _Intervener, pairs: _Pairs, high_level: MDCausalModel, variable: str) -> Tensor:
    """The subspace of a probe for ``variable`` on ``pairs``' bases, over the site's coordinates ``[c, k]``."""
    coordinates = intervener.site.coordinates
    acts, values, groups = _rows(pairs.base_site[..., coordinates], high_level.values(pairs.tokens_base, variable))
    return _probe_basis(acts, values, groups)


def _probe_start(probe: Tensor, rank: int, seed: int) -> Tensor:
    """A probe's subspace ``[c, k]`` as a DAS start of rank ``rank``, ``[c, rank]``: its leading
    directions, completed with random ones orthogonal to them when ``rank`` exceeds ``k``."""
    probe = probe[:, :rank]
    if probe.shape[1] == rank:
        return probe
    generator = torch.Generator().manual_seed(seed + 2)
    extra = torch.randn(probe.shape[0], rank - probe.shape[1], generator=generator, dtype=torch.float64)
    extra -= probe @ (probe.T @ extra)
    return torch.cat([probe, torch.linalg.qr(extra)[0]], dim=1)


def _rows(acts: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``acts [B, n, w]`` and ``values [B, n, m]`` (or ``[B, m]``) as rows, with the pair of each row."""
    values = values.unsqueeze(1) if values.ndim == 2 else values
    groups = torch.arange(acts.shape[0]).repeat_interleave(acts.shape[1])
    return acts.flatten(0, 1).to(torch.float64), values.flatten(0, 1), groups


def _read_space(intervener: _Intervener, pairs: _Pairs, max_pairs: int = 64) -> Tensor:
    """Orthonormal basis ``[width, k]`` of the directions downstream computation reads at the site:
    the right-singular vectors (singular value above ``READ_RTOL`` of the largest) of the Jacobian of
    the output distribution with respect to the activation at the intervened positions, pooled over
    base runs and positions."""
    chunk = pairs.rows(slice(0, max_pairs))
    # Intervening with the base's own activation as the "source" and the identity basis is the plain
    # run; the gradient with respect to that source is the Jacobian with respect to the activation.
    source = chunk.base_site.detach().clone().to(torch.float64).requires_grad_(True)
    identity = torch.eye(source.shape[-1], dtype=torch.float64)
    as_source = replace(chunk, source_site=source)
    rows = []
    with _frozen(intervener.model):
        output = intervener.output(as_source, identity)
        for token in range(output.shape[-1]):
            (gradient,) = torch.autograd.grad(output[:, token].sum(), source, retain_graph=True)
            rows.append(gradient.flatten(0, 1))
    jacobian = torch.cat(rows)[:, intervener.site.coordinates]
    _, singular, right = torch.linalg.svd(jacobian, full_matrices=False)
    keep = singular > READ_RTOL * singular.max()
    return _embed(right[keep].T, intervener.site.coordinates, intervener.site.width)


def align_variable(
    model: HookedTransformer,
    variable: str,
    hook_name: str,
    tokens_a: Int[Tensor, "batch pos"],
    tokens_b: Int[Tensor, "batch pos"],
    transition: Float[Tensor, "q q"],
    order: int,
    rank: int | None = None,
    *,
    high_level: MDCausalModel | None = None,
    held_out: float = 0.25,
    steps: int = 150,
    batch_size: int = 64,
    lr: float = 0.03,
    restarts: int = RESTARTS,
    controls: bool = True,
    rank_sweep: bool = True,
    sweep_steps: int | None = None,
    probe_start: bool = True,
    wrong_model: str = "permuted_lags",
    seed: int = 0,
    progress: bool = False,
) -> Alignment:
    """Distributed alignment search for MD variable ``variable`` at ``hook_name`` (module docstring).

    Args:
        model: any HookedTransformer with ``d_vocab = q`` (frozen: its parameters are not changed).
        variable: ``mean_responsibility``, ``responsibility`` (every position ``t > m``, intervened
            at once), ``lambda1``, and for ``steps >= 2`` ``second_step_mean``, ``lambda2``, ...
        hook_name: a hook whose activation is ``[batch, pos, d]`` (``blocks.{l}.hook_resid_post``,
            ``hook_embed``, ``blocks.{l}.hook_attn_out``, ...) or ``[batch, pos, head, d_head]``
            (``attn.hook_z``, all heads together), or a block of ``model.layout``
            (``"L2.mean_responsibility"``: the subspace is searched inside its coordinates).
        tokens_a, tokens_b: ``[N, T]`` bases and sources of ``N >= 8`` pairs of one length; the last
            ``held_out`` share of the pairs is held out (scored, never trained on).
        transition, order: the task's ``pi`` and ``m``.
        rank: the subspace's dimension, ``1..width``; default ``m``.
        high_level: the MD to compare with; default :func:`high_level_model` (the construction's
            scales, or the model's own effective step).
        steps, batch_size, lr: DAS's Adam: ``steps`` batches of ``batch_size`` training pairs drawn
            at random, learning rate ``lr`` decayed to 0 on a cosine.
        restarts: random starting bases tried beside the probe's (each for ``steps // 5`` steps; the
            best goes on), ``>= 0``, at least 1 without ``probe_start``.
        probe_start: also start the search from the subspace of a ridge probe for the variable
            (fitted on the training bases); ``False``: from random bases only.
        controls: also run controls (a)-(c); rank_sweep: also DAS at ranks ``m-1..2m`` (with
            ``sweep_steps`` steps each, default ``steps``).
        wrong_model: control (b)'s counterfactual, ``"permuted_lags"`` or ``"random_weights"``.
        seed: the initial basis, the pair order, the random subspace and the random-init model.

    Returns:
        :class:`Alignment` (``.to_dict()``, ``.plot()``, ``print``).
    """
    transition = check_transition(transition)
    order = check_order(order)
    tokens_a, tokens_b = _check_pairs(model, tokens_a, tokens_b, transition, order)
    steps, sweep_steps, batch_size, lr, seed = _check_search_settings(
        held_out, steps, sweep_steps, batch_size, lr, seed, wrong_model, probe_start
    )
    restarts = check_int(restarts, "restarts", 0)
    if restarts == 0 and not probe_start:
        raise ValueError("restarts=0 with probe_start=False leaves DAS no starting basis: allow one of them")
    high_level = _checked_high_level(high_level, model, variable, tokens_a, transition, order)
    site = _site(model, hook_name, variable, tokens_a)
    block_width = site.coordinates.stop - site.coordinates.start
    rank = _check_rank(order if rank is None else rank, block_width)

    n_held_out = max(1, round(held_out * tokens_a.shape[0]))
    train, test = slice(0, tokens_a.shape[0] - n_held_out), slice(tokens_a.shape[0] - n_held_out, None)
    intervener = _Intervener(model, site, order)
    counterfactual = high_level.counterfactual(tokens_a, tokens_b, variable)
    pairs = _prepare(intervener, tokens_a, tokens_b, counterfactual)
    train_pairs, test_pairs = pairs.rows(train), pairs.rows(test)
    kl_base = float(_kl_per_pair(test_pairs.counterfactual, intervener.base_output(tokens_a[test])).mean())
    options = {"steps": steps, "batch_size": batch_size, "lr": lr, "restarts": restarts, "progress": progress}

    # The probe for V on the training bases: a subspace to compare with, and one start of the search.
    probe = _site_probe(intervener, train_pairs, high_level, variable)

    def das(
        at_rank: int, on: _Intervener = intervener, train_on: _Pairs = train_pairs, probe: Tensor = probe, **changes
    ) -> Tensor:
        start = _probe_start(probe, at_rank, seed) if probe_start else None
        inside = _train_basis(on, train_on, block_width, at_rank, seed=seed, start=start, **{**options, **changes})
        return _embed(inside, site.coordinates, site.width)

    def fidelity(basis: Tensor, on: _Intervener = intervener, test_on: _Pairs = test_pairs, base=kl_base) -> float:
        return _fidelity(_mean_kl(on, test_on, basis, batch_size), base)

    basis = das(rank)
    kl_intervened = _mean_kl(intervener, test_pairs, basis, batch_size)
    probe_basis = _embed(probe[:, :rank], site.coordinates, site.width)  # the probe's subspace, same rank
    result = Alignment(
        variable=variable,
        hook_name=site.hook_name,
        coordinates=(site.coordinates.start, site.coordinates.stop),
        positions=site.positions,
        rank=rank,
        basis=basis,
        high_level=high_level,
        n_train=train_pairs.tokens_base.shape[0],
        n_held_out=n_held_out,
        kl_base=kl_base,
        kl_intervened=kl_intervened,
        interchange_fidelity=_fidelity(kl_intervened, kl_base),
        probe_fidelity=fidelity(probe_basis),
        probe_rank=probe_basis.shape[1],
        random_subspace_fidelity=fidelity(_random_subspace(site, rank, seed)),
        wrong_model=wrong_model if controls else None,
    )
    _named_block_swap(result, model, intervener, test_pairs, kl_base, batch_size)
    if rank_sweep:
        _sweep_ranks(result, das, fidelity, order, block_width, sweep_steps)
    if controls:
        _run_controls(result, model, site, intervener, pairs, train, test, das, fidelity, seed, wrong_model)
    return result


def _checked_high_level(high_level, model, variable: str, tokens_a: Tensor, transition: Tensor, order: int):
    """The MD to compare with: ``high_level`` checked, or :func:`high_level_model`'s default."""
    if high_level is None:
        high_level = high_level_model(model, tokens_a, transition, order, steps=_steps_needed(variable))
    elif not isinstance(high_level, MDCausalModel):
        raise ValueError(f"high_level must be an MDCausalModel, got {type(high_level).__name__}")
    high_level.check_variable(variable)
    return high_level


def _random_subspace(site: _Site, rank: int, seed: int) -> Tensor:
    """A random orthonormal ``rank``-dimensional subspace of the site's coordinates, ``[width, rank]``."""
    block_width = site.coordinates.stop - site.coordinates.start
    generator = torch.Generator().manual_seed(seed)
    inside = torch.linalg.qr(torch.randn(block_width, rank, generator=generator, dtype=torch.float64))[0]
    return _embed(inside, site.coordinates, site.width)


def _sweep_ranks(result: Alignment, das, fidelity, order: int, block_width: int, sweep_steps: int) -> None:
    """DAS at ranks ``m-1..2m`` (within the site), and the smallest rank within
    ``SATURATION_TOLERANCE`` of the best: ``result.rank_sweep`` and ``result.saturation_rank``."""
    result.rank_sweep = {
        r: (result.interchange_fidelity if r == result.rank else fidelity(das(r, steps=sweep_steps)))
        for r in range(max(1, order - 1), min(2 * order, block_width) + 1)
    }
    best = max(result.rank_sweep.values())
    result.saturation_rank = min(r for r, f in result.rank_sweep.items() if f >= best - SATURATION_TOLERANCE)


def _check_search_settings(held_out, steps, sweep_steps, batch_size, lr, seed, wrong_model, probe_start) -> tuple:
    """:func:`align_variable`'s settings, checked: ``(steps, sweep_steps, batch_size, lr, seed)``."""
    if not isinstance(held_out, float) or not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be a float in (0, 1), the share of pairs held out; got {held_out!r}")
    if not isinstance(lr, float | int) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if wrong_model not in WRONG_MODELS:
        raise ValueError(f"wrong_model must be one of {WRONG_MODELS}, got {wrong_model!r}")
    if not isinstance(probe_start, bool):
        raise ValueError(f"probe_start must be a bool, got {probe_start!r}")
    steps = check_int(steps, "steps", 1)
    sweep_steps = steps if sweep_steps is None else check_int(sweep_steps, "sweep_steps", 1)
    return steps, sweep_steps, check_int(batch_size, "batch_size", 1), float(lr), check_int(seed, "seed", 0)


def _steps_needed(variable: str) -> int:
    """The steps of causal MD a default high-level model needs for ``variable`` (1 for a name it does
    not have: the high-level model then names the variables it has)."""
    if not isinstance(variable, str):
        raise ValueError(f"variable must be a str, got {type(variable).__name__}")
    try:
        return E.causal_md_step_of(variable)
    except ValueError:
        return 1


def _named_block_swap(
    result: Alignment, model, intervener: _Intervener, test_pairs: _Pairs, kl_base: float, batch_size: int
) -> None:
    """The construction's named block, swapped whole (no learning): exact where the block is ``V``."""
    layout = getattr(model, "layout", None)
    if layout is None:
        return
    block = variable_block(result.variable)
    if block not in layout or residual_hook_of(block) != intervener.site.hook_name:
        return
    coordinates = layout[block]
    basis = torch.zeros(intervener.site.width, coordinates.stop - coordinates.start, dtype=torch.float64)
    basis[coordinates] = torch.eye(coordinates.stop - coordinates.start, dtype=torch.float64)
    with torch.inference_mode():
        output = intervener.output(test_pairs, basis, floor=None)
    result.named_block = block
    result.named_block_fidelity = _fidelity(float(_kl_per_pair(test_pairs.counterfactual, output).mean()), kl_base)
    result.named_block_max_deviation = float((output - test_pairs.counterfactual).abs().max())


def _run_controls(result, model, site, intervener, pairs, train, test, das, fidelity, seed, wrong_model) -> None:
    """Controls (a)-(c) of the module docstring, written into ``result``."""
    tokens_a, tokens_b = pairs.tokens_base, pairs.tokens_source
    # (a) The same search on a randomly initialised model of the same architecture, its output read
    # as logits (a softmax) where the model's is read as probabilities (module docstring).
    random_model = build_like(model, seed=seed + 1)
    random_model.output_type = "logits"
    random_intervener = _Intervener(random_model, site, intervener.order)
    random_pairs = _prepare(random_intervener, tokens_a, tokens_b, pairs.counterfactual)
    random_kl_base = float(
        _kl_per_pair(random_pairs.counterfactual[test], random_intervener.base_output(tokens_a[test])).mean()
    )
    random_train = random_pairs.rows(train)
    random_probe = _site_probe(random_intervener, random_train, result.high_level, result.variable)
    random_basis = das(result.rank, on=random_intervener, train_on=random_train, probe=random_probe)
    result.random_model_fidelity = fidelity(
        random_basis, on=random_intervener, test_on=random_pairs.rows(test), base=random_kl_base
    )
    # (b) A wrong high-level model: the same search against a counterfactual MD does not produce.
    wrong = wrong_counterfactual(result.high_level, tokens_a, tokens_b, result.variable, wrong_model, seed)
    wrong_pairs = pairs.with_counterfactual(wrong)
    wrong_kl_base = float(_kl_per_pair(wrong[test], intervener.base_output(tokens_a[test])).mean())
    wrong_basis = das(result.rank, train_on=wrong_pairs.rows(train))
    result.wrong_model_fidelity = fidelity(wrong_basis, test_on=wrong_pairs.rows(test), base=wrong_kl_base)
    # (c) The illusion check: the learned subspace must hold V, and be read downstream.
    test_pairs = pairs.rows(test)
    projected = test_pairs.base_site.to(torch.float64) @ result.basis
    acts, values, groups = _rows(projected, result.high_level.values(tokens_a[test], result.variable))
    result.subspace_r2 = fit_probe(acts, values, groups).r2
    read = _read_space(intervener, test_pairs)
    in_read = read.T @ result.basis  # [k, rank]
    result.read_fraction = float((in_read**2).sum() / result.rank)
    # The learned subspace's principal directions towards the read space, with their cosines: drop
    # the mostly unread ones (cosine below 1/2) and patch the rest alone.
    _, cosines, directions = torch.linalg.svd(in_read, full_matrices=False)
    mostly_read = result.basis @ directions.T[:, cosines > 0.5]
    result.read_only_fidelity = fidelity(mostly_read) if mostly_read.shape[1] else None


# ----------------------------------------------------------------------------------------------
# A scan over every layer
# ----------------------------------------------------------------------------------------------

SCAN_HOOKS = ("resid_post", "attn_out")


@dataclass
class AlignmentScan:
    """Held-out interchange fidelity of one variable at every (layer, hook kind) of a model.

    ``fidelity[i][j]``: DAS at ``layers[i]`` (``embed``, then ``L1..Ln``, the paper's 1-based layers:
    ``L{l}`` is TransformerLens's ``blocks.{l-1}``) and hook kind ``hooks[j]`` (NaN where the hook does
    not apply, e.g. ``attn_out`` of the embedding); ``random_subspace[i][j]``: a random subspace of the
    same rank. ``alignments`` holds each :class:`Alignment`, keyed by hook name.
    """

    variable: str
    rank: int
    layers: list[str]
    hooks: list[str]
    fidelity: list[list[float]]
    random_subspace: list[list[float]]
    alignments: dict[str, Alignment]

    @property
    def best(self) -> Alignment:
        """The alignment with the highest held-out fidelity."""
        return max(self.alignments.values(), key=lambda a: a.interchange_fidelity)

    def to_dict(self) -> dict:
        def clean(rows):
            return [[None if not math.isfinite(v) else v for v in row] for row in rows]

        return {
            "variable": self.variable,
            "rank": self.rank,
            "layers": self.layers,
            "hooks": self.hooks,
            "fidelity": clean(self.fidelity),
            "random_subspace": clean(self.random_subspace),
            "best_hook": self.best.hook_name,
            "best_fidelity": self.best.interchange_fidelity,
        }

    def table(self) -> str:
        lines = [f"DAS fidelity of {self.variable} (rank {self.rank}); random subspace in brackets"]
        lines.append(f"{'layer':<7}" + "".join(f"{h:>22}" for h in self.hooks))
        for layer, row, control in zip(self.layers, self.fidelity, self.random_subspace, strict=True):
            cells = "".join(
                f"{'-':>22}" if not math.isfinite(f) else f"{f:>13.3f} ({c:6.2f})"
                for f, c in zip(row, control, strict=True)
            )
            lines.append(f"{layer:<7}{cells}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, title: str | None = None) -> Figure:
        """A layer x hook heatmap of the fidelity (matplotlib, Agg canvas)."""
        values = np.ma.masked_invalid(np.array(self.fidelity, dtype=float))
        fig = Figure(figsize=(1.6 + 1.5 * len(self.hooks), 0.9 + 0.45 * len(self.layers)))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.grid(False)
        for i, row in enumerate(self.fidelity):
            for j, value in enumerate(row):
                if math.isfinite(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k")
        ax.set_xticks(range(len(self.hooks)), self.hooks)
        ax.set_yticks(range(len(self.layers)), self.layers)
        fig.colorbar(image, ax=ax, label="held-out interchange fidelity")
        ax.set_title(title or f"DAS: {self.variable} (rank {self.rank})", fontsize=9)
        fig.tight_layout()
        return fig


def alignment_scan(
    model: HookedTransformer,
    variable: str,
    tokens_a: Int[Tensor, "batch pos"],
    tokens_b: Int[Tensor, "batch pos"],
    transition: Float[Tensor, "q q"],
    order: int,
    rank: int | None = None,
    *,
    hooks: tuple[str, ...] = SCAN_HOOKS,
    high_level: MDCausalModel | None = None,
    progress: bool = True,
    **das_options,
) -> AlignmentScan:
    """:func:`align_variable` (without controls or rank sweep) at ``hook_embed`` and at
    ``blocks.{l}.hook_{kind}`` for every layer and kind in ``hooks`` (``resid_post``,
    ``attn_out``, ``resid_mid``, ``mlp_out``, ...). ``das_options`` go to :func:`align_variable`."""
    transition = check_transition(transition)
    order = check_order(order)
    tokens_a, tokens_b = _check_pairs(model, tokens_a, tokens_b, transition, order)
    if isinstance(hooks, str) or not hooks or not all(isinstance(h, str) for h in hooks):
        raise ValueError(f"hooks must be a non-empty tuple of hook kinds such as {SCAN_HOOKS}, got {hooks!r}")
    unknown = [kind for kind in hooks if f"blocks.0.hook_{kind}" not in model.hook_dict]
    if unknown:
        kinds = sorted({name.split(".hook_")[-1] for name in model.hook_dict if name.startswith("blocks.0.hook_")})
        raise ValueError(f"unknown hook kind(s) {unknown}: blocks.{{l}}.hook_<kind> exists for kind in {kinds}")
    if high_level is None:
        high_level = high_level_model(model, tokens_a, transition, order, steps=_steps_needed(variable))
    layers = ["embed"] + [layer_label(layer) for layer in range(model.cfg.n_layers)]
    names = [["hook_embed" if j == 0 else None for j in range(len(hooks))]]
    names += [[f"blocks.{layer}.hook_{kind}" for kind in hooks] for layer in range(model.cfg.n_layers)]
    fidelity = [[math.nan] * len(hooks) for _ in layers]
    random_subspace = [[math.nan] * len(hooks) for _ in layers]
    alignments = {}
    cells = [(i, j, name) for i, row in enumerate(names) for j, name in enumerate(row) if name is not None]
    for i, j, name in tqdm(cells, desc=f"DAS scan ({variable})", disable=not progress):
        if name not in model.hook_dict:
            continue
        try:
            alignment = align_variable(
                model, variable, name, tokens_a, tokens_b, transition, order, rank,
                high_level=high_level, controls=False, rank_sweep=False, **das_options,
            )  # fmt: skip
        except _NeverCalled:
            continue
        alignments[name] = alignment
        fidelity[i][j] = alignment.interchange_fidelity
        random_subspace[i][j] = alignment.random_subspace_fidelity
    if not alignments:
        raise ValueError(f"none of the hooks {hooks} exists in this model")
    rank = next(iter(alignments.values())).rank
    return AlignmentScan(variable, rank, layers, list(hooks), fidelity, random_subspace, alignments)
