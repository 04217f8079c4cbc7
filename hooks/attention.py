"""Attention patterns of a model against a reference model's (usually the construction's).

Patterns are read from ``blocks.{l}.attn.hook_pattern`` with ``run_with_cache`` (only those
hooks are cached), in chunks of the batch so that memory stays bounded. Every number is an
average over query positions ``t > m`` (1-based; 0-based index ``>= m``, where every lag window
is full) and over the batch, in float64:

- ``tv``: total variation ``0.5 * sum_j |A_tj - R_tj|`` between the model's row ``A_t`` and the
  reference's row ``R_t``;
- ``kl``: ``KL(R_t || A_t)`` (``+inf`` where the model puts zero weight on a key the reference
  uses);
- ``support_mass``: ``sum_j A_tj [R_tj > 1e-9]``, the mass the model puts where the reference
  attends at all (the "does the head attend where it should" score of TransformerLens's
  ``head_detector``, with the reference's pattern as the detection pattern);
- ``self_mass`` / ``lag_mass``: the model's mass at offset 0 (the query itself) and at offsets
  ``1..m`` (the lag window the construction's layer 1 reads).

Layers are TransformerLens block indices (0-based): the paper's "layer 1" is ``blocks.0``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities import get_act_name

from mdlens import estimators as E
from mdlens.hooks._assignment import min_cost_assignment, ordered_assignment
from mdlens.hooks._checks import check_model_tokens, check_same_task_models, model_device
from mdlens.jsonable import json_ready
from mdlens.models.layout import layer_label
from mdlens.validation import check_index, check_int, check_order

# A reference weight above this counts as "attended" for support_mass.
SUPPORT_THRESHOLD = 1e-9
# Sequences per forward pass: each holds [chunk, n_heads, T, T] float64 patterns per layer.
DEFAULT_CHUNK_SIZE = 32
MATCHINGS = ("auto", "layerwise", "hungarian", "ordered")

Unit = tuple[int, int]  # (layer, head)


@dataclass(frozen=True)
class HeadAgreement:
    """One reference head compared with the model head it is matched to (module docstring)."""

    reference_layer: int
    reference_head: int
    model_layer: int
    model_head: int
    tv: float
    kl: float
    support_mass: float
    self_mass: float
    lag_mass: float


@dataclass(frozen=True)
class AttentionAgreement:
    """Result of :func:`attention_agreement`.

    ``heads`` holds one :class:`HeadAgreement` per matched pair, in the reference's order.
    ``tv_matrix[r, u]`` is the mean TV between reference head ``reference_units[r]`` and model
    head ``model_units[u]`` (units are ``(layer, head)``); the matching minimises its total over
    the pairs. ``matching`` is ``"layerwise"`` (layer l with layer l), ``"hungarian"`` or ``"ordered"``.
    """

    matching: str
    order: int
    n_sequences: int
    seq_len: int
    heads: list[HeadAgreement]
    reference_units: list[Unit]
    model_units: list[Unit]
    tv_matrix: Float[Tensor, "reference_unit model_unit"]

    @property
    def pairs(self) -> list[tuple[Unit, Unit]]:
        """``[((reference_layer, reference_head), (model_layer, model_head)), ...]``."""
        return [((h.reference_layer, h.reference_head), (h.model_layer, h.model_head)) for h in self.heads]

    @property
    def tv(self) -> list[float]:
        return [h.tv for h in self.heads]

    @property
    def kl(self) -> list[float]:
        return [h.kl for h in self.heads]

    @property
    def support_mass(self) -> list[float]:
        return [h.support_mass for h in self.heads]

    def to_dict(self) -> dict:
        """JSON-ready: plain floats and lists; a non-finite number (an infinite KL) becomes None."""
        return json_ready(
            {
                "matching": self.matching,
                "order": self.order,
                "n_sequences": self.n_sequences,
                "seq_len": self.seq_len,
                "query_positions": f"t > m (0-based t >= {self.order})",
                "heads": [asdict(h) for h in self.heads],
                "reference_units": self.reference_units,
                "model_units": self.model_units,
                "tv_matrix": self.tv_matrix,
            }
        )

    def table(self) -> str:
        header = (
            f"{'reference':<12}{'model':<12}{'TV':>8}{'KL(ref||model)':>16}{'support':>9}{'mass@0':>8}{'mass@1..m':>11}"
        )
        lines = [header, "-" * len(header)]
        for h in self.heads:
            lines.append(
                f"{layer_label(h.reference_layer, h.reference_head):<12}{layer_label(h.model_layer, h.model_head):<12}"
                f"{h.tv:>8.4f}{h.kl:>16.4g}{h.support_mass:>9.4f}{h.self_mass:>8.4f}{h.lag_mass:>11.4f}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return (
            f"AttentionAgreement: {self.n_sequences} sequences, T={self.seq_len}, m={self.order}, "
            f"matching={self.matching}, rows t > m (Lx.Hy = layer x, i.e. blocks.{{x-1}}, head y)\n" + self.table()
        )


# ----------------------------------------------------------------------------------------------
# Reading patterns
# ----------------------------------------------------------------------------------------------


def _units(model: HookedTransformer) -> list[Unit]:
    return [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]


def attention_patterns(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], layers: list[int]
) -> Float[Tensor, "batch unit query key"]:
    """``hook_pattern`` of each block index in ``layers`` (0-based), heads stacked layer-major
    (unit ``i * n_heads + h`` is head ``h`` of ``layers[i]``), float64 on the CPU. Only those hooks
    are cached; inputs are not checked (the callers check them)."""
    names = [get_act_name("pattern", layer) for layer in layers]
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            tokens.to(model_device(model)), names_filter=lambda name: name in names, return_type=None
        )
    return torch.cat([cache[name].to(torch.float64).cpu() for name in names], dim=1)


def _chunks(tokens: Tensor, chunk_size: int):
    for start in range(0, tokens.shape[0], chunk_size):
        yield tokens[start : start + chunk_size]


def _offset_band(
    pattern: Float[Tensor, "batch query key"], order: int, offsets: range
) -> Float[Tensor, "batch scored offset"]:
    """``band[b, t - m, i] = pattern[b, t, t - offsets[i]]`` for query rows ``t = m..T-1`` (0-based)."""
    # diagonal(offset=-o) holds the pairs (query o + j, key j); query t >= m is entry j >= m - o.
    return torch.stack([pattern.diagonal(offset=-o, dim1=-2, dim2=-1)[..., order - o :] for o in offsets], dim=-1)


def _row_kl(reference: Tensor, model: Tensor) -> Tensor:
    """``KL(reference_row || model_row)`` per row (last axis), ``0 log 0 = 0``, ``+inf`` where due."""
    return (torch.xlogy(reference, reference) - torch.xlogy(reference, model)).sum(dim=-1).clamp_min(0.0)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _reference_order(reference: HookedTransformer, order: int | None) -> int:
    if order is not None:
        return check_order(order)
    md_params = getattr(reference, "md_params", None)
    if isinstance(md_params, dict) and md_params.get("order") is not None:
        return check_order(md_params["order"])
    if getattr(reference, "order", None) is not None:
        return check_order(reference.order)
    raise ValueError("order is required: the reference has neither md_params['order'] nor .order")


def attention_agreement(
    model: HookedTransformer,
    reference: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    order: int | None = None,
    matching: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> AttentionAgreement:
    """Compare ``model``'s attention patterns with ``reference``'s on the same tokens.

    Per matched pair of heads: mean TV, mean ``KL(reference || model)``, the model's mass on the
    reference's support, and the model's mass at offset 0 and offsets ``1..m`` (module docstring),
    over query rows ``t > m`` and the batch.

    Args:
        model, reference: HookedTransformers with the same ``d_vocab``.
        tokens: ``[B, T]`` or ``[T]``, ids in ``[0, d_vocab)``, ``m < T <= n_ctx`` of both models.
        order: ``m``; default ``reference.md_params["order"]``, else ``reference.order``.
        matching: ``"layerwise"`` compares layer l with layer l (needs the same depth and one head
            per layer in both); ``"hungarian"`` pairs each reference head with a distinct model head
            (any layer) so that the total TV is smallest; ``"ordered"`` does the same with the
            model layers kept in the reference's order (reference layer l+1 is matched strictly
            above reference layer l: a deeper model that runs the same steps in the same order);
            ``"auto"`` (default) is layerwise when it applies, Hungarian otherwise.
        chunk_size: sequences per forward pass (memory: ``chunk * heads * T^2`` float64 per model).

    Returns:
        :class:`AttentionAgreement` (``.to_dict()`` for JSON, ``str()`` for a table).
    """
    order, tokens, matching = _check_agreement_inputs(model, reference, tokens, order, matching, chunk_size)
    model_units, reference_units = _units(model), _units(reference)
    means = _mean_agreement(model, reference, tokens, order, chunk_size)
    pairs = _match(matching, means.tv, reference_units, model_units)
    return AttentionAgreement(
        matching=matching,
        order=order,
        n_sequences=tokens.shape[0],
        seq_len=tokens.shape[1],
        heads=_head_agreements(pairs, reference_units, model_units, means),
        reference_units=reference_units,
        model_units=model_units,
        tv_matrix=means.tv,
    )


def _check_agreement_inputs(
    model: HookedTransformer,
    reference: HookedTransformer,
    tokens: Tensor,
    order: int | None,
    matching: str,
    chunk_size: int,
) -> tuple[int, Int[Tensor, "batch pos"], str]:
    """:func:`attention_agreement`'s checked ``order``, tokens (``[B, T]``) and matching (``"auto"``
    resolved: layerwise when both models have the same depth and one head per layer)."""
    check_same_task_models(model, reference)
    order = _reference_order(reference, order)
    tokens = check_model_tokens(model, tokens, order=order)
    check_model_tokens(reference, tokens, order=order)
    check_int(chunk_size, "chunk_size", 1)
    if matching not in MATCHINGS:
        raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
    same_shape = model.cfg.n_layers == reference.cfg.n_layers and model.cfg.n_heads == reference.cfg.n_heads == 1
    if matching == "layerwise" and not same_shape:
        raise ValueError(
            "matching='layerwise' needs the same number of layers and one head per layer in both models; "
            f"got {model.cfg.n_layers}x{model.cfg.n_heads} (model) and "
            f"{reference.cfg.n_layers}x{reference.cfg.n_heads} (reference): use 'hungarian'"
        )
    if matching == "auto":
        matching = "layerwise" if same_shape else "hungarian"
    return order, tokens, matching


@dataclass(frozen=True)
class _MeanTables:
    """Means over query rows ``t > m`` and the batch (module docstring): ``[reference_unit, model_unit]``
    for the pairwise numbers, ``[model_unit]`` for the model's own masses."""

    tv: Float[Tensor, "reference_unit model_unit"]
    kl: Float[Tensor, "reference_unit model_unit"]
    support: Float[Tensor, "reference_unit model_unit"]
    self_mass: Float[Tensor, " model_unit"]
    lag_mass: Float[Tensor, " model_unit"]


def _mean_agreement(
    model: HookedTransformer,
    reference: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    order: int,
    chunk_size: int,
) -> _MeanTables:
    """Every pair's TV, KL and support mass, and every model head's offset masses, read chunk by chunk."""
    n_ref = reference.cfg.n_layers * reference.cfg.n_heads
    n_model = model.cfg.n_layers * model.cfg.n_heads
    tv_sum = torch.zeros(n_ref, n_model, dtype=torch.float64)
    kl_sum = torch.zeros(n_ref, n_model, dtype=torch.float64)
    support_sum = torch.zeros(n_ref, n_model, dtype=torch.float64)
    self_sum = torch.zeros(n_model, dtype=torch.float64)
    lag_sum = torch.zeros(n_model, dtype=torch.float64)
    for chunk in _chunks(tokens, chunk_size):
        model_square = attention_patterns(model, chunk, list(range(model.cfg.n_layers)))  # [chunk, unit, T, T]
        band = _offset_band(model_square, order, range(order + 1))  # [chunk, unit, T - m, m + 1]
        self_sum += band[..., 0].sum(dim=(0, 2))
        lag_sum += band[..., 1:].sum(dim=(0, 2, 3))
        # Query rows t >= m only: [chunk, unit, T - m, T].
        model_patterns = model_square[:, :, order:]
        reference_patterns = attention_patterns(reference, chunk, list(range(reference.cfg.n_layers)))[:, :, order:]
        for r in range(n_ref):
            ref = reference_patterns[:, r]
            on_support = (ref > SUPPORT_THRESHOLD).to(torch.float64)
            for u in range(n_model):
                att = model_patterns[:, u]
                tv_sum[r, u] += 0.5 * (att - ref).abs().sum()
                kl_sum[r, u] += _row_kl(ref, att).sum()
                support_sum[r, u] += (att * on_support).sum()
    n_rows = tokens.shape[0] * (tokens.shape[1] - order)
    return _MeanTables(tv_sum / n_rows, kl_sum / n_rows, support_sum / n_rows, self_sum / n_rows, lag_sum / n_rows)


def _match(
    matching: str, tv: Float[Tensor, "reference_unit model_unit"], reference_units: list[Unit], model_units: list[Unit]
) -> list[tuple[int, int]]:
    """``(reference unit, model unit)`` index pairs of a (resolved) matching, in the reference's order."""
    if matching == "layerwise":
        return [(r, r) for r in range(len(reference_units))]
    if matching == "ordered":
        return ordered_assignment(tv, [layer for layer, _ in reference_units], [layer for layer, _ in model_units])
    return min_cost_assignment(tv)


def _head_agreements(
    pairs: list[tuple[int, int]],
    reference_units: list[Unit],
    model_units: list[Unit],
    means: _MeanTables,
) -> list[HeadAgreement]:
    """One :class:`HeadAgreement` per matched pair, read from the mean tables."""
    return [
        HeadAgreement(
            reference_layer=reference_units[r][0],
            reference_head=reference_units[r][1],
            model_layer=model_units[u][0],
            model_head=model_units[u][1],
            tv=float(means.tv[r, u]),
            kl=float(means.kl[r, u]),
            support_mass=float(means.support[r, u]),
            self_mass=float(means.self_mass[u]),
            lag_mass=float(means.lag_mass[u]),
        )
        for r, u in pairs
    ]


def responsibility_tv(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    transition: Float[Tensor, "q q"],
    order: int,
    layer: int = 0,
    head: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
    """Mean TV between a head's pattern and the responsibilities placed at keys ``t-1..t-m``.

    The reference row ``t`` has weight ``gamma_t(g)`` (``mdlens.estimators.responsibilities``) at
    key ``t - g``, ``g = 1..m``, and zero elsewhere: the pattern of the construction's layer 1
    (``blocks.0``), so the construction scores 0. Averaged over ``t > m`` and the batch.

    Args:
        model: any HookedTransformer with ``d_vocab = q``.
        tokens: ``[B, T]`` or ``[T]`` ids in ``[0, q)``, ``m < T <= n_ctx``.
        transition: ``pi``, ``[q, q]`` row-stochastic.
        order: ``m``.
        layer, head: which head (TransformerLens indices; the paper's layer 1 is ``layer=0``).
    """
    tokens = check_model_tokens(model, tokens, transition, order)
    _check_head(model, layer, head)
    check_int(chunk_size, "chunk_size", 1)
    total = 0.0
    for chunk in _chunks(tokens, chunk_size):
        gamma = E.responsibilities(chunk, transition, order)  # [chunk, T - m, m], column g - 1 = lag g
        pattern = attention_patterns(model, chunk, [layer])[:, head]  # [chunk, T, T]
        band = _offset_band(pattern, order, range(1, order + 1))  # [chunk, T - m, m]
        # TV = 0.5 * (sum over the band of |A - gamma| + the mass outside the band, where gamma is 0).
        outside = pattern[:, order:].sum(dim=-1) - band.sum(dim=-1)
        total += float((0.5 * ((band - gamma).abs().sum(dim=-1) + outside)).sum())
    return total / (tokens.shape[0] * (tokens.shape[1] - order))


def offset_mass(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    order: int,
    layer: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Float[Tensor, "head offset"]:
    """Mean attention mass at offsets ``0..m`` (``[n_heads, m + 1]``; column 0 = the query itself).

    Averaged over query rows ``t > m`` and the batch. For the construction's layer 1 it is
    ``[0, mean gamma(1), ..., mean gamma(m)]``: all mass on the lag window ``1..m``.
    """
    order = check_order(order)
    tokens = check_model_tokens(model, tokens, order=order)
    _check_head(model, layer, 0)
    check_int(chunk_size, "chunk_size", 1)
    return mean_offset_mass(model, tokens, order, [layer], range(order + 1), chunk_size)


def mean_offset_mass(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    order: int,
    layers: list[int],
    offsets: range,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Float[Tensor, "unit offset"]:
    """Mean mass ``A[t, t - o]`` of each head of ``layers`` (layer-major) at each offset ``o``, over query
    rows ``t > m`` and the batch: ``[len(layers) * n_heads, len(offsets)]``. Inputs already checked."""
    total = torch.zeros(len(layers) * model.cfg.n_heads, len(offsets), dtype=torch.float64)
    for chunk in _chunks(tokens, chunk_size):
        pattern = attention_patterns(model, chunk, layers)  # [chunk, layer * head, T, T]
        total += _offset_band(pattern, order, offsets).sum(dim=(0, 2))  # over batch and query rows
    return total / (tokens.shape[0] * (tokens.shape[1] - order))


def _check_head(model: HookedTransformer, layer: int, head: int) -> None:
    check_index(layer, "layer", model.cfg.n_layers)
    check_index(head, "head", model.cfg.n_heads)
