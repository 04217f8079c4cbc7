"""Views of attention patterns and probe predictions that render offline (Jupyter or a saved page).

CircuitsVis objects come in two forms: ``str(view)`` is a module script that imports CircuitsVis
from a CDN (``https://unpkg.com/...``), so it is blank without a network, and their
``_repr_html_`` calls ``urlopen("http://google.com")`` on every render to choose a form. The views
here always use the bundled form (``RenderedHTML.local_src``: CircuitsVis's ~1.3 MB JavaScript
inlined), so nothing is fetched and nothing probes the network:

- :func:`attention_view`: CircuitsVis ``AttentionHeads`` of one sequence, one panel per head of
  each requested layer (``L1`` = ``blocks.0``, the paper's layer 1; ``L2.H0`` = ``blocks.1`` head 0
  when a layer has several heads), patterns read from ``blocks.{l}.attn.hook_pattern``;
- :func:`compare_attention_view`: a model's panels interleaved with a reference's (usually the
  construction's) on the same sequence: ``model L1``, ``construction L1``, ``model L2``, ...;
- :func:`probe_view`: a table of a probe's prediction next to its target at every position
  (plain HTML, no script).

Token labels read ``y12=3``: token id 3 at position 12 (1-based); with ``lags``
(``MTDSample.lags``) also the latent lag, ``y12=3,z=2``, and ``z=-`` at the first ``m`` positions
(lag 0: no lag drew them). CircuitsVis appends its own 0-based index in brackets on the axes.

Layers are TransformerLens block indices (0-based), as everywhere in :mod:`mdlens.hooks`; panel
names count layers from 1, as the paper and ``model.layout`` do.
"""

from __future__ import annotations

import html
import itertools
import re
from pathlib import Path

import circuitsvis.attention
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedTransformer

from mdlens.hooks._checks import check_model_tokens, check_same_task_models
from mdlens.hooks.attention import attention_patterns
from mdlens.hooks.probes import Probe
from mdlens.models.layout import layer_label
from mdlens.validation import check_index

# Decimal places of the pattern values written into the page (the colours cannot show more).
DIGITS = 6
# CircuitsVis writes its root as `<div id=... style=.../>`; HTML has no self-closing div, so the
# script and everything after it would end up inside the root. We close it explicitly.
_CIRCUITSVIS_ROOT = re.compile(r'(<div id="circuits-vis-[^"]+" style="[^"]*")\s*/>')
# Probe table colours (RGB): values, negative values, errors.
VALUE_COLOUR, NEGATIVE_COLOUR, ERROR_COLOUR = (110, 60, 230), (230, 120, 20), (210, 30, 30)
_CAPTION_STYLE = "font-family: sans-serif; font-size: 13px; color: #333; max-width: 750px; margin: 6px auto;"


class View:
    """HTML that renders without a network: shown inline by Jupyter, written whole by :meth:`save`.

    ``html`` is the fragment Jupyter shows (a caption and the view, scripts inlined); ``title``
    names the page.
    """

    def __init__(self, html_fragment: str, title: str):
        self.html = html_fragment
        self.title = title

    def _repr_html_(self) -> str:
        """Jupyter's hook: the offline fragment, always (no CDN, no internet check)."""
        return self.html

    def document(self) -> str:
        """A standalone HTML page holding the view (UTF-8, nothing loaded from elsewhere)."""
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(self.title)}</title>\n</head>\n<body>\n{self.html}\n</body>\n</html>\n"
        )

    def save(self, path: str | Path) -> Path:
        """Write :meth:`document` to ``path`` (parent folders are created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.document(), encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.title!r}, {len(self.html) / 1e6:.2f} MB of HTML)"


class HeadView(View):
    """An attention view (see :func:`attention_view`).

    names: one per panel (``"L1"``, ``"L2.H0"``, ``"model L1"``, ...); labels: the ``T`` token
    labels; patterns: ``[panel, query, key]`` float64, the values drawn (before rounding to
    ``DIGITS`` places for the page); sequence: which row of the batch is shown.
    """

    def __init__(
        self,
        html_fragment: str,
        title: str,
        names: list[str],
        labels: list[str],
        patterns: Float[Tensor, "panel query key"],
        sequence: int,
    ):
        super().__init__(html_fragment, title)
        self.names = names
        self.labels = labels
        self.patterns = patterns
        self.sequence = sequence


class ProbeView(View):
    """A probe's prediction against its target on one sequence (see :func:`probe_view`).

    prediction / target: ``[T, k]`` float64 (target NaN where undefined); labels: the ``T`` token
    labels; coordinate_names: ``k`` names; mean_abs_error: mean ``|prediction - target|`` over the
    positions and coordinates where the target is defined.
    """

    def __init__(
        self,
        html_fragment: str,
        title: str,
        prediction: Float[Tensor, "pos k"],
        target: Float[Tensor, "pos k"],
        labels: list[str],
        coordinate_names: list[str],
    ):
        super().__init__(html_fragment, title)
        self.prediction = prediction
        self.target = target
        self.labels = labels
        self.coordinate_names = coordinate_names
        self.mean_abs_error = _mean_abs_error(prediction, target)


def _mean_abs_error(prediction: Float[Tensor, "pos k"], target: Float[Tensor, "pos k"]) -> float:
    """Mean ``|prediction - target|`` where the target is defined (NaN if it is nowhere)."""
    defined = torch.isfinite(target)
    return float((prediction - target)[defined].abs().mean()) if defined.any() else float("nan")


# ----------------------------------------------------------------------------------------------
# Inputs: one sequence, its labels, the layers
# ----------------------------------------------------------------------------------------------


def token_labels(tokens: Int[Tensor, " pos"], lags: Int[Tensor, " pos"] | None = None) -> list[str]:
    """``["y1=3", "y2=0", ...]`` (1-based position, token id); with ``lags`` also ``",z=2"``, or
    ``",z=-"`` where the lag is 0 (the first ``m`` positions, which no lag drew). A comma, not a
    space: CircuitsVis deletes all whitespace from axis labels."""
    labels = [f"y{t}={token}" for t, token in enumerate(tokens.tolist(), start=1)]
    if lags is None:
        return labels
    return [f"{label},z={lag if lag > 0 else '-'}" for label, lag in zip(labels, lags.tolist(), strict=True)]


def _check_sequence(sequence: int, batch: int) -> int:
    return check_index(sequence, "sequence", batch, note=f" (the batch has {batch} rows)")


def _check_lags(lags: Tensor | None, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"] | None:
    """``MTDSample.lags``: integers >= 0 of the tokens' shape (``[B, T]``, or ``[T]`` for ``B = 1``)."""
    if lags is None:
        return None
    if not isinstance(lags, Tensor) or lags.is_floating_point() or lags.dtype == torch.bool:
        raise ValueError("lags must be an integer torch.Tensor (MTDSample.lags)")
    lags = lags.unsqueeze(0) if lags.ndim == 1 else lags
    if lags.shape != tokens.shape:
        raise ValueError(f"lags have shape {tuple(lags.shape)}, the tokens {tuple(tokens.shape)}")
    if (lags < 0).any():
        raise ValueError(f"lags must be >= 0 (0 = no lag, the first m positions), found {lags.min().item()}")
    return lags.cpu()


def _one_sequence(
    models: list[HookedTransformer], tokens: Tensor, lags: Tensor | None, sequence: int
) -> tuple[Int[Tensor, "1 pos"], list[str]]:
    """Row ``sequence`` of ``tokens`` (checked against every model: ids in ``[0, d_vocab)``,
    ``T <= n_ctx``) as ``[1, T]``, and its token labels."""
    for model in models:
        checked = check_model_tokens(model, tokens)
    sequence = _check_sequence(sequence, checked.shape[0])
    lags = _check_lags(lags, checked)
    row = checked[sequence : sequence + 1]
    return row, token_labels(row[0], None if lags is None else lags[sequence])


def _check_layers(model: HookedTransformer, layers: int | list[int] | None, name: str = "layers") -> list[int]:
    """Block indices (0-based) of ``model``, without repeats; ``None`` = all."""
    n_layers = model.cfg.n_layers
    if layers is None:
        return list(range(n_layers))
    layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else list(layers)
    if not layers:
        raise ValueError(f"{name} is empty: give at least one block index in [0, {n_layers})")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ValueError(
                f"{name} must be block indices in [0, {n_layers}) (0-based: blocks.0 is the paper's "
                f"layer 1), got {layer!r}"
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name} has repeats: {layers}")
    return layers


def _patterns_by_layer(
    model: HookedTransformer, row: Int[Tensor, "1 pos"], layers: list[int]
) -> dict[int, Float[Tensor, "head query key"]]:
    """:func:`~mdlens.hooks.attention.attention_patterns` of one sequence, split into its layers."""
    per_layer = attention_patterns(model, row, layers)[0].split(model.cfg.n_heads)
    return dict(zip(layers, per_layer, strict=True))


def _panel_names(layer: int, n_heads: int, prefix: str = "") -> list[str]:
    """The paper's name of each head of block ``layer`` (:func:`~mdlens.models.layout.layer_label`):
    ``L{layer+1}`` for a one-head layer, ``L{layer+1}.H{h}`` per head otherwise."""
    if n_heads == 1:
        return [f"{prefix}{layer_label(layer)}"]
    return [f"{prefix}{layer_label(layer, head)}" for head in range(n_heads)]


# ----------------------------------------------------------------------------------------------
# Attention views
# ----------------------------------------------------------------------------------------------


def _offline(rendered) -> str:
    """CircuitsVis's bundled (offline) form, with its root div closed."""
    return _CIRCUITSVIS_ROOT.sub(r"\1></div>", rendered.local_src, count=1)


def _head_view(
    panels: Float[Tensor, "panel query key"],
    names: list[str],
    labels: list[str],
    title: str,
    caption: str,
    sequence: int,
) -> HeadView:
    rounded = [[[round(v, DIGITS) for v in row] for row in panel] for panel in panels.tolist()]
    rendered = circuitsvis.attention.attention_heads(
        attention=rounded,
        tokens=labels,
        attention_head_names=names,
        min_value=0.0,
        max_value=1.0,
    )
    fragment = f'<p style="{_CAPTION_STYLE}">{html.escape(caption)}</p>\n{_offline(rendered)}'
    return HeadView(fragment, title, names, labels, panels, sequence)


_LAG_NOTE = ", z=g: latent lag g (- for the first m positions)"
_LABEL_NOTE = (
    "Labels yt=v: token v at position t (1-based){lags}; the number in brackets is CircuitsVis's "
    "0-based index. L1 = blocks.0 (the paper's layer 1). Colour: attention weight, 0 (white) to 1."
)


def attention_view(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    layers: int | list[int] | None = None,
    lags: Int[Tensor, "batch pos"] | Int[Tensor, " pos"] | None = None,
    sequence: int = 0,
) -> HeadView:
    """CircuitsVis attention heads of ``model`` on row ``sequence`` of ``tokens``, offline.

    One panel per head of each layer in ``layers`` (block indices, 0-based; default all), named
    ``"L1"`` or ``"L2.H0"`` (module docstring), each the ``[T, T]`` pattern of
    ``blocks.{l}.attn.hook_pattern``. ``lags`` (``MTDSample.lags``, ``[B, T]``) adds the latent lag
    to the token labels. Show it in Jupyter by returning it from a cell; ``.save(path)`` writes a
    standalone page. Raises ``ValueError`` for token ids outside ``[0, d_vocab)``, ``T > n_ctx``, a
    layer outside ``[0, n_layers)``, a ``sequence`` outside the batch or ``lags`` of another shape.
    """
    row, labels = _one_sequence([model], tokens, lags, sequence)
    layers = _check_layers(model, layers)
    panels = attention_patterns(model, row, layers)[0]  # [layer * head, T, T], layer-major
    names = [name for layer in layers for name in _panel_names(layer, model.cfg.n_heads)]
    caption = (
        f"Attention of {type(model).__name__} on sequence {sequence} (T={row.shape[1]}), "
        f"panels {', '.join(names)}. " + _LABEL_NOTE.format(lags=_LAG_NOTE if lags is not None else "")
    )
    return _head_view(panels, names, labels, f"mdlens attention view: sequence {sequence}", caption, sequence)


def compare_attention_view(
    model: HookedTransformer,
    reference: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    layers: int | list[int] | None = None,
    reference_layers: int | list[int] | None = None,
    lags: Int[Tensor, "batch pos"] | Int[Tensor, " pos"] | None = None,
    sequence: int = 0,
    names: tuple[str, str] = ("model", "construction"),
) -> HeadView:
    """``model``'s attention next to ``reference``'s (e.g. the construction) on the same sequence.

    Panels alternate layer by layer: the heads of ``layers[0]`` of the model (``"model L1"``), then
    those of ``reference_layers[0]`` of the reference (``"construction L1"``), then the second of
    each, and so on (what is left of the longer list comes last). ``layers`` defaults to all of the
    model's blocks; ``reference_layers`` to ``layers`` when that is given, else all of the
    reference's. ``names`` are the two prefixes. Both models must read the tokens (same
    ``d_vocab``, ``T <= n_ctx`` of each); other ``ValueError`` as :func:`attention_view`.
    """
    check_same_task_models(model, reference)
    if (
        not isinstance(names, (tuple, list))
        or len(names) != 2
        or not all(isinstance(n, str) and n for n in names)
        or names[0] == names[1]
    ):
        raise ValueError(f"names must be two different non-empty strings (model, reference), got {names!r}")
    row, labels = _one_sequence([model, reference], tokens, lags, sequence)
    if reference_layers is None and layers is not None:
        reference_layers = layers
    layers = _check_layers(model, layers)
    reference_layers = _check_layers(reference, reference_layers, "reference_layers")
    model_patterns = _patterns_by_layer(model, row, layers)
    reference_patterns = _patterns_by_layer(reference, row, reference_layers)

    panel_names, panels = [], []
    for layer, reference_layer in itertools.zip_longest(layers, reference_layers):
        if layer is not None:
            pattern = model_patterns[layer]
            panel_names += _panel_names(layer, pattern.shape[0], f"{names[0]} ")
            panels.append(pattern)
        if reference_layer is not None:
            pattern = reference_patterns[reference_layer]
            panel_names += _panel_names(reference_layer, pattern.shape[0], f"{names[1]} ")
            panels.append(pattern)
    caption = (
        f"{names[0]} ({type(model).__name__}) next to {names[1]} ({type(reference).__name__}) on sequence "
        f"{sequence} (T={row.shape[1]}). " + _LABEL_NOTE.format(lags=_LAG_NOTE if lags is not None else "")
    )
    title = f"mdlens attention: {names[0]} vs {names[1]}, sequence {sequence}"
    return _head_view(torch.cat(panels), panel_names, labels, title, caption, sequence)


# ----------------------------------------------------------------------------------------------
# Probe view
# ----------------------------------------------------------------------------------------------


def _rows_of(values: Tensor, what: str, batch: int, seq_len: int, sequence: int) -> Float[Tensor, "pos width"]:
    """Row ``sequence`` of a ``[B, T, w]`` tensor (or ``[T, w]`` when ``B = 1``) as float64 ``[T, w]``."""
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise ValueError(f"{what} must be a floating-point torch.Tensor")
    values = values.unsqueeze(0) if values.ndim == 2 else values
    if values.ndim != 3 or values.shape[:2] != (batch, seq_len):
        raise ValueError(
            f"{what} must have shape [B={batch}, T={seq_len}, width] (as the tokens), got {tuple(values.shape)}"
        )
    return values[sequence].detach().to(torch.float64).cpu()


def _cell(value: float, scale: float, colour: tuple[int, int, int]) -> str:
    """A table cell showing ``value`` to 3 places, its background deepening with ``|value| / scale``."""
    if value != value:  # NaN: undefined target
        return '<td style="background: #eee; color: #999; text-align: center;">-</td>'
    alpha = min(abs(value) / scale, 1.0) * 0.85 if scale > 0 else 0.0
    text = "white" if alpha > 0.55 else "black"
    shown = round(value, 3) + 0.0  # + 0.0 turns -0.0 into 0.0
    return (
        f'<td style="background: rgba({colour[0]}, {colour[1]}, {colour[2]}, {alpha:.3f}); color: {text}; '
        f'text-align: right; padding: 1px 6px;">{shown:.3f}</td>'
    )


def _probe_table(prediction: Tensor, target: Tensor, labels: list[str], coordinate_names: list[str]) -> str:
    """Rows = positions; per coordinate three columns: target, probe, probe - target. All three
    share one colour scale (the largest |target| or |prediction|): purple for values (orange when
    negative), red for errors, so an error's colour says how large it is next to the values."""
    finite = torch.cat([prediction.flatten(), target[torch.isfinite(target)]])
    scale = float(finite.abs().max())
    error = prediction - target
    head = "".join(f'<th colspan="3" style="padding: 2px 8px;">{html.escape(c)}</th>' for c in coordinate_names)
    sub = "<th>target</th><th>probe</th><th>error</th>" * len(coordinate_names)
    lines = [
        '<table style="border-collapse: collapse; font: 12px monospace; margin: 6px auto;">',
        f'<thead><tr><th rowspan="2" style="text-align: left;">position</th>{head}</tr><tr>{sub}</tr></thead>',
        "<tbody>",
    ]
    for t, label in enumerate(labels):
        cells = []
        for c in range(len(coordinate_names)):
            for value in (float(target[t, c]), float(prediction[t, c])):
                cells.append(_cell(value, scale, VALUE_COLOUR if value >= 0 else NEGATIVE_COLOUR))
            cells.append(_cell(float(error[t, c]), scale, ERROR_COLOUR))
        lines.append(f'<tr><td style="padding: 1px 8px;">{html.escape(label)}</td>{"".join(cells)}</tr>')
    lines.append("</tbody></table>")
    return "\n".join(lines)


def probe_view(
    probe: Probe,
    acts: ActivationCache | Float[Tensor, "batch pos d"] | Float[Tensor, "pos d"],
    target: dict[str, Tensor] | Float[Tensor, "batch pos k"] | Float[Tensor, "pos k"],
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    lags: Int[Tensor, "batch pos"] | Int[Tensor, " pos"] | None = None,
    sequence: int = 0,
    coordinate_names: list[str] | None = None,
) -> ProbeView:
    """A table of ``probe``'s prediction against ``target`` at every position of one sequence.

    Made for ``report = hooks.probe_model(...)``::

        probe = report.probes[(row, "mean_responsibility")]
        _, cache = model.run_with_cache(tokens)
        probe_view(probe, cache, hooks.targets(tokens, pi, m, beta), tokens)

    ``acts``: an ``ActivationCache`` (read at ``probe.hook_name``; a probe of a named block already
    reads the full residual) or the activations ``[B, T, d]``. ``target``: the dict of
    :func:`mdlens.hooks.targets` (read at ``probe.target_name``) or a ``[B, T, k]`` tensor, NaN
    where undefined (shown as ``-``). ``coordinate_names`` default to ``g=1..g=k`` (the lags, for
    every mdlens target). Rows are positions (token labels as :func:`attention_view`); per
    coordinate the target, the probe and their difference, coloured by size. Plain HTML, no script.
    """
    if not isinstance(probe, Probe):
        raise ValueError(f"probe must be a mdlens.hooks.Probe, got {type(probe).__name__}")
    tokens = _check_token_ids(tokens)
    sequence = _check_sequence(sequence, tokens.shape[0])
    lags = _check_lags(lags, tokens)
    acts_row, target_row = _probe_rows(probe, acts, target, tokens.shape, sequence)
    coordinate_names = _check_coordinate_names(coordinate_names, probe.weight.shape[1])
    if not torch.isfinite(acts_row).all():
        raise ValueError("acts contain NaN or inf")

    prediction = probe.predict(acts_row)
    labels = token_labels(tokens[sequence], None if lags is None else lags[sequence])
    what = probe.target_name or "target"
    where = probe.hook_name or "the given activations"
    if probe.block:
        where += f" (block {probe.block})"
    caption = (
        f"Probe for {what} reading {where}: held-out R^2 = {probe.r2:.4f}; on sequence {sequence}, "
        f"mean |probe - target| = {_mean_abs_error(prediction, target_row):.4g} where the target is defined "
        "('-' elsewhere). Labels yt=v: token v at position t (1-based)" + (_LAG_NOTE + "." if lags is not None else ".")
    )
    table = _probe_table(prediction, target_row, labels, coordinate_names)
    fragment = f'<p style="{_CAPTION_STYLE}">{html.escape(caption)}</p>\n{table}'
    title = f"mdlens probe view: {what}, sequence {sequence}"
    return ProbeView(fragment, title, prediction, target_row, labels, coordinate_names)


def _check_token_ids(tokens: Tensor) -> Int[Tensor, "batch pos"]:
    """Token ids ``[B, T]`` (or ``[T]``) that are integers ``>= 0``; no vocabulary to bound them (a probe
    view reads no model: the tokens only label the rows)."""
    if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError("tokens must be an integer torch.Tensor")
    tokens = tokens.unsqueeze(0) if tokens.ndim == 1 else tokens
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError(f"tokens must have shape [B, T] or [T], got {tuple(tokens.shape)}")
    if (tokens < 0).any():
        raise ValueError(f"tokens must be >= 0, found {tokens.min().item()}")
    return tokens


def _probe_rows(
    probe: Probe, acts, target, shape: torch.Size, sequence: int
) -> tuple[Float[Tensor, "pos d"], Float[Tensor, "pos k"]]:
    """Row ``sequence`` of the activations the probe reads and of its target, ``[T, d]`` and ``[T, k]``
    float64, from a cache or a tensor and from a targets dict or a tensor; widths checked against the probe
    (finiteness is checked by the caller, after the coordinate names)."""
    if isinstance(acts, ActivationCache):
        if probe.hook_name is None:
            raise ValueError("this probe has no hook_name (fit_probe, not probe_model): pass the activations [B, T, d]")
        if probe.hook_name not in acts:
            raise ValueError(
                f"the cache has no {probe.hook_name!r} (the hook this probe reads); run_with_cache without a names_filter that drops it"
            )
        acts = acts[probe.hook_name]
    if isinstance(target, dict):
        if probe.target_name is None or probe.target_name not in target:
            raise ValueError(
                f"the probe predicts {probe.target_name!r}, which is not in the targets dict "
                f"({', '.join(target)}); pass the target tensor"
            )
        target = target[probe.target_name]
    batch, seq_len = shape
    acts_row = _rows_of(acts, "acts", batch, seq_len, sequence)
    target_row = _rows_of(target, "target", batch, seq_len, sequence)
    d, k = probe.weight.shape
    if acts_row.shape[1] != d:
        raise ValueError(f"acts have d={acts_row.shape[1]}, the probe reads d={d}")
    if target_row.shape[1] != k:
        raise ValueError(f"target has k={target_row.shape[1]} coordinates, the probe predicts k={k}")
    return acts_row, target_row


def _check_coordinate_names(coordinate_names: list[str] | None, k: int) -> list[str]:
    """``k`` column names; default ``g=1..g=k`` (the lags, for every mdlens target)."""
    if coordinate_names is None:
        return [f"g={g}" for g in range(1, k + 1)]
    if len(coordinate_names) != k:
        raise ValueError(f"coordinate_names has {len(coordinate_names)} names for k={k} coordinates")
    return list(coordinate_names)
