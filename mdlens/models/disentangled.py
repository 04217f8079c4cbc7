"""The disentangled transformer (Nichani, Damian & Lee 2024) as a ``HookedTransformer`` subclass.

Architecture (paper-notes §4): one head per layer, no MLP, no LayerNorm, no attention scaling, a
single score matrix ``W_A`` per layer, and a residual stream that is a *concatenation*: layer
``l`` appends its output and never writes anywhere else. Relative-position encodings (RPE) route
information by offset ``i - j``.

How it maps onto TransformerLens (``n_heads = 1``, ``attn_only``, ``normalization_type=None``,
``use_attn_scale=False``):

- **Residual = named blocks of ``d_model``** (:class:`~mdlens.models.layout.ResidualLayout`,
  ``model.layout``). Block ``tokens`` (width ``q``) holds the one-hot token: ``W_E`` is that
  frozen one-hot embedding. There is no absolute positional embedding: ``W_pos`` is frozen at
  zero (positions enter only through the attention terms below). Layer ``l`` (1-based; it is
  ``blocks[l-1]``) writes block ``L{l}`` = [attention-weighted copy of the whole residual before
  it (width ``D_{l-1}``) ; ``L{l}.rel`` (width ``W``)], so ``D_l = 2 D_{l-1} + W`` and
  ``d_model = D_L``. Later blocks are still zero when layer ``l`` reads.
- **Scores**: ``score(i, j) = h_i W_A h_j^T`` with ``d_head = d_model + W``, ``W_Q = [W_A | 0]``
  (trainable; only the ``D_{l-1} x D_{l-1}`` corner that reads earlier blocks is initialised
  non-zero, and every other entry gets exactly zero gradient, so it stays zero), ``W_K = [I | 0]``
  frozen. Hence ``model.QK[l] == W_A``. The forward computes ``q``, ``k``, ``v`` only on the
  ``D_{l-1}`` coordinates layer ``l`` can read (everything after them is still zero) and pads them
  to ``d_head`` where a hook sees them: the same values as TL's full products at a fraction of the cost.
- **Values**: ``W_V = [I | 0]`` frozen (the value is the residual itself) and the value RPE fills
  the last ``W`` coordinates of ``z``: ``z_i = sum_j A_ij [h_j ; r_l(i - j)]``. Keeping the RPE
  inside ``z`` means ``hook_z`` / ``hook_result`` carry the whole head output, so TL's per-head
  patching patches all of it. ``W_O`` is frozen: it maps ``z[:D_{l-1}]`` to ``L{l}``'s copy part
  and ``z[d_model:]`` to ``L{l}.rel``, and the forward places the two parts there (exactly
  ``z W_O``; ``z`` is built in full only where a hook sees it). As with ``W_K`` and ``W_V``, the
  forward relies on these frozen values: edit them and it does not follow. All biases are zero
  and frozen.
- **Positional terms** (trainable, per layer, each behind its own HookPoint):

  1. ``rel_score[o]``, a scalar for every offset ``o = 0..n_ctx-1`` -> ``hook_rel_scores``;
  2. ``key_pos_score[j]``, a scalar per absolute key position ``j = 0..n_ctx-1`` ->
     ``hook_key_pos_scores``. Relative terms alone cannot make a layer attend uniformly to
     positions ``m+1..t`` at *every* query ``t`` (it must skip the first ``m`` keys, which have no
     full lag window, at any distance); at the last position alone offsets would suffice, as in
     the paper, but mdlens reads every position;
  3. ``rel_query[:, o]`` (``U_l``, ``[d_model, W]``), a query-dependent score per offset in the
     window: ``score(i, j) += h_i . U_l[:, i - j]`` for ``0 <= i - j < W`` ->
     ``hook_rel_query_scores`` ``[batch, head, query_pos, W]``, indexed by offset like
     ``hook_rel_values`` (entry ``o`` at query ``i`` belongs to key ``i - o``; unused when ``o > i``);
  4. ``rel_value[o]`` (``r_l(o)`` in ``R^W``, zero beyond the window), whose attention-weighted sum
     ``sum_j A_ij r_l(i - j)`` -> ``hook_rel_values`` ``[batch, pos, head, W]``.

  The two position-only score hooks have TL's pattern shape ``[batch, head, query_pos, key_pos]``
  (a fresh tensor per call, which a hook may edit in place; without hooks the forward adds the
  small ``[query, key]`` tables directly); entries above the diagonal are zero and irrelevant (the
  causal mask follows). ``hook_attn_scores`` = content + the three terms (the band placed at its
  keys), masked. ``act_name("rel_scores", l)`` and ``cache["rel_scores", l]`` reach the four new
  hook points as TransformerLens' shorthand reaches its own.
- **Output**: TL's unembed, ``W_U`` ``[d_model, q]`` trainable, ``b_U`` frozen at zero (the
  paper's readout is linear). ``model.output_type = "probs"``: the raw output at a position is read
  as the next-token probability vector (the paper trains it with MSE on the last position); the
  model's loss and ``generate`` use it clipped and renormalised (:class:`~mdlens.models.base.MDLensTransformer`).
- **Gradients at the embedding**: ``W_E`` and ``W_pos`` are frozen (no optimiser ever sees them), but
  their outputs are made to require grad whenever autograd records, so backward hooks on
  ``hook_embed``, ``hook_pos_embed`` and ``blocks.0.hook_resid_pre`` fire as on any TL model
  (``run_with_cache(..., incl_bwd=True)``, attribution patching at layer 0).

Initialisation (seeded by ``seed`` through a private ``torch.Generator``): ``W_A``, ``U_l`` and
``W_U`` small Gaussians (std ``init_std``) on the coordinates they can read; ``rel_value(o)`` =
one-hot of ``o`` (each layer starts out able to tell offsets apart, which the construction needs
in layers 1 and 3); ``rel_score`` and ``key_pos_score`` zero (uniform causal attention at start).

TransformerLens' key/value cache (``past_kv_cache``) works as on TL's own attention: the cached
keys and values are the residual's read coordinates at the earlier positions, and the new queries
sit at positions ``past..``, which the position terms read (a run resumed after a cached prefix
gives the full run's outputs; ``generate`` recomputes the prefix instead, see
:class:`~mdlens.models.base.MDLensTransformer`). Not supported: split q/k/v inputs.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedTransformerConfig
from transformer_lens.components import Attention, Embed, PosEmbed
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import get_act_name

from mdlens import estimators as E
from mdlens.models.base import MDLensTransformer
from mdlens.models.building import preserve_global_rng, quiet_hooked_transformer_deprecation
from mdlens.models.dtypes import dtype_name, resolve_dtype
from mdlens.models.layout import ResidualLayout, block_index_of, paper_layer
from mdlens.models.outputs import check_output_type
from mdlens.validation import check_int, check_order

MAX_LAYERS = 8
DEFAULT_INIT_STD = 0.02
# The hook points this module adds to TL's attention, by their shorthand (``act_name``).
RPE_HOOK_NAMES = ("rel_scores", "key_pos_scores", "rel_query_scores", "rel_values")


def _user_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the first frame outside mdlens, torch and TransformerLens,
    counted from the caller of ``warnings.warn``: a warning raised deep in a forward pass then names
    the user's line (``model(tokens)``), not TransformerLens's internals."""
    frame, level = sys._getframe(2), 2  # level 1 is the function that calls warnings.warn
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARY_PACKAGES:
        frame, level = frame.f_back, level + 1
    return level


_LIBRARY_PACKAGES = ("mdlens", "torch", "transformer_lens")


class RescaledStepWarning(UserWarning):
    """A construction read on fewer tokens than its ``seq_len`` runs MD with a larger step there. Code
    that does so on purpose (step-size schedules, views of a few tokens) silences exactly this with
    ``warnings.simplefilter("ignore", RescaledStepWarning)``."""


def _frozen(tensor: Tensor) -> nn.Parameter:
    """A parameter that state_dict, ``model.OV`` and TL's tools see, but the optimiser does not."""
    return nn.Parameter(tensor, requires_grad=False)


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """``transformer_lens.utils.get_act_name`` that also knows the disentangled attention's hook points.

    ``act_name("rel_scores", 0) == "blocks.0.attn.hook_rel_scores"`` (likewise ``key_pos_scores``,
    ``rel_query_scores``, ``rel_values``; a layer is required); any other name goes to TransformerLens,
    e.g. ``act_name("pattern", 2) == "blocks.2.attn.hook_pattern"``.
    """
    if name in RPE_HOOK_NAMES:
        try:
            layer = check_int(layer, "layer", 0)
        except ValueError:
            raise ValueError(f"act_name({name!r}, layer) needs a layer index >= 0, got {layer!r}") from None
        return f"blocks.{layer}.attn.hook_{name}"
    return get_act_name(name, layer, layer_type)


class DisentangledActivationCache(ActivationCache):
    """TL's ``ActivationCache`` whose shorthand ``cache["rel_scores", l]`` reaches the RPE hook points
    (negative layers count from the end, as in TransformerLens); everything else is TL's."""

    def __getitem__(self, key) -> Tensor:
        if isinstance(key, tuple) and key and key[0] in RPE_HOOK_NAMES:
            layer = key[1] if len(key) > 1 else None
            if isinstance(layer, int) and layer < 0:
                layer += self.model.cfg.n_layers
            return self.cache_dict[act_name(key[0], layer)]
        return super().__getitem__(key)

    def apply_slice_to_batch_dim(self, batch_slice) -> DisentangledActivationCache:
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return DisentangledActivationCache(sliced.cache_dict, self.model, has_batch_dim=sliced.has_batch_dim)


def _carrying_gradient(embedding: Tensor) -> Tensor:
    """``embedding + 0``, the zero a leaf that requires grad, while autograd records: the same values
    in a fresh tensor that gradients (and backward hooks) reach and that a hook may edit in place,
    although the frozen weights it comes from never require grad."""
    if not torch.is_grad_enabled() or embedding.requires_grad:
        return embedding
    zero = torch.zeros((), dtype=embedding.dtype, device=embedding.device, requires_grad=True)
    return embedding + zero


class FrozenEmbed(Embed):
    """TL's token embedding for a frozen ``W_E`` whose output still carries gradient."""

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return _carrying_gradient(super().forward(tokens))


class FrozenPosEmbed(PosEmbed):
    """TL's absolute position embedding for a frozen ``W_pos`` whose output still carries gradient."""

    def forward(self, tokens: Int[Tensor, "batch pos"], *args, **kwargs) -> Float[Tensor, "batch pos d_model"]:
        return _carrying_gradient(super().forward(tokens, *args, **kwargs))


def residual_widths(vocab_size: int, n_layers: int, window: int) -> list[int]:
    """``[D_0, ..., D_L]``: the residual width before each layer and at the end (``D_0 = q``)."""
    widths = [vocab_size]
    for _ in range(n_layers):
        widths.append(2 * widths[-1] + window)
    return widths


def _hooked(hook_point: HookPoint) -> bool:
    """Whether a forward or backward hook is attached to ``hook_point`` (else it is the identity)."""
    return bool(hook_point._forward_hooks or hook_point._backward_hooks)


def _through_hook(
    hook_point: HookPoint, table: Float[Tensor, "query key"], batch: int
) -> Float[Tensor, "query key"] | Float[Tensor, "batch 1 query key"]:
    """``table`` shown to ``hook_point`` as a fresh ``[batch, 1, query, key]`` tensor (a hook may edit
    it in place) when a forward or backward hook is attached; else ``table`` itself, unexpanded (the
    hook point would be the identity, and the caller broadcasts the table over the batch)."""
    if not _hooked(hook_point):
        return table
    return hook_point(table.expand(batch, 1, *table.shape).clone())


class DisentangledAttention(Attention):
    """One disentangled head: single score matrix, concatenated output, four RPE terms.

    Layer ``layer`` (1-based) reads the first ``read_width = D_{l-1}`` residual coordinates and
    writes coordinates ``[D_{l-1}, 2 D_{l-1} + W)``. See the module docstring for the maths.
    """

    def __init__(self, cfg: HookedTransformerConfig, layer: int, read_width: int, window: int):
        super().__init__(cfg, "global", block_index_of(layer))  # TL numbers its blocks from 0
        d_model, d_head, dtype = cfg.d_model, cfg.d_head, cfg.dtype
        if d_head != d_model + window:
            raise ValueError(f"d_head must be d_model + window, got {d_head} != {d_model} + {window}")
        self.layer = layer
        self.read_width = read_width
        self.window = window

        eye_then_zeros = torch.zeros(1, d_model, d_head, dtype=dtype)  # [I | 0]
        eye_then_zeros[0, :, :d_model] = torch.eye(d_model, dtype=dtype)
        self.W_Q = nn.Parameter(torch.zeros(1, d_model, d_head, dtype=dtype))  # [W_A | 0]
        self.W_K = _frozen(eye_then_zeros.clone())
        self.W_V = _frozen(eye_then_zeros.clone())
        # W_O: z[:D_{l-1}] -> copy part of L{l}; z[d_model:] (the value RPE) -> L{l}.rel.
        W_O = torch.zeros(1, d_head, d_model, dtype=dtype)
        W_O[0, :read_width, read_width : 2 * read_width] = torch.eye(read_width, dtype=dtype)
        W_O[0, d_model:, 2 * read_width : 2 * read_width + window] = torch.eye(window, dtype=dtype)
        self.W_O = _frozen(W_O)
        for name in ("b_Q", "b_K", "b_V"):
            setattr(self, name, _frozen(torch.zeros(1, d_head, dtype=dtype)))
        self.b_O = _frozen(torch.zeros(d_model, dtype=dtype))

        self.rel_score = nn.Parameter(torch.zeros(cfg.n_ctx, dtype=dtype))  # per offset 0..n_ctx-1
        self.key_pos_score = nn.Parameter(torch.zeros(cfg.n_ctx, dtype=dtype))  # per key position
        self.rel_query = nn.Parameter(torch.zeros(d_model, window, dtype=dtype))  # U_l
        self.rel_value = nn.Parameter(torch.eye(window, dtype=dtype))  # row o = r_l(o)

        self.hook_rel_scores = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_key_pos_scores = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_rel_query_scores = HookPoint()  # [batch, head, query_pos, window] (by offset)
        self.hook_rel_values = HookPoint()  # [batch, pos, head, window]

    @property
    def W_A(self) -> Float[Tensor, "read read"]:
        """The score matrix on the coordinates this layer can read: ``score = h_i W_A h_j^T``."""
        return self.W_Q[0, : self.read_width, : self.read_width]

    def forward(
        self,
        query_input: Float[Tensor, "batch pos d_model"],
        key_input: Float[Tensor, "batch pos d_model"],
        value_input: Float[Tensor, "batch pos d_model"],
        past_kv_cache_entry=None,
        additive_attention_mask: Float[Tensor, "batch 1 1 pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        position_bias=None,
    ) -> Float[Tensor, "batch pos d_model"]:
        if query_input.ndim != 3:
            raise ValueError("the disentangled transformer does not support split q/k/v inputs")

        # Layer l reads only the blocks written before it, the first D_{l-1} = read coordinates (the
        # rest of its input is zero in any residual the model produces). q = h W_A, k = v = h are
        # computed on those coordinates: the same values as TL's h W_Q, h W_K = [h | 0], h W_V = [h | 0],
        # at a fraction of the width (layer 1 of a 5-layer model reads 5 of 284 coordinates), and
        # zero-padded to TL's d_head only where a hook (or the key/value cache) sees them
        # (_head_activation). Entries of W_Q outside the W_A corner get zero gradient and stay zero;
        # they are not read. All biases are frozen zeros.
        read, cached = self.read_width, past_kv_cache_entry is not None
        q = self._head_activation(self.hook_q, query_input[..., :read] @ self.W_A)  # [batch, pos, 1, read or d_head]
        k = self._head_activation(self.hook_k, key_input[..., :read], pad=cached)
        v = self._head_activation(self.hook_v, value_input[..., :read], pad=cached)
        # With TransformerLens' key/value cache (generate, or a run resumed after a prefix) the queries
        # are the positions past..past+n-1 and the keys every position so far: the cached ones first.
        past = 0
        if cached:
            past = past_kv_cache_entry.past_keys.shape[1]
            k, v = past_kv_cache_entry.append(k, v)
        attn_scores, offset = self._scores(query_input, q, k, past)
        if attention_mask is not None:  # padding: TransformerLens' causal-and-padding mask
            attn_scores = self.apply_causal_mask(attn_scores, past, attention_mask)
        if additive_attention_mask is not None:
            attn_scores = attn_scores + additive_attention_mask
        attn_scores = self.hook_attn_scores(attn_scores)
        pattern = self._pattern(attn_scores)
        content_z, rel_z = self._mixed_values(pattern, v, offset)

        # z W_O with the frozen copy map W_O: z[:D_{l-1}] -> L{l}'s copy part [D_{l-1}, 2 D_{l-1}),
        # z[d_model:] (the value RPE) -> L{l}.rel [2 D_{l-1}, 2 D_{l-1} + W); zero elsewhere. Placing the
        # two parts is exact (each output coordinate is one entry of z times 1), without a
        # [d_head, d_model] matmul that is almost all zeros.
        written = torch.cat([content_z, rel_z], dim=-1)[:, :, 0]  # [batch, pos, D_{l-1} + W]
        out = F.pad(written, (read, self.cfg.d_model - 2 * read - self.window))
        if self.cfg.use_attn_result:
            out = self.hook_result(out.unsqueeze(2)).sum(dim=2)  # one head: its result is the output
        return out + self.b_O

    def _head_activation(self, hook_point: HookPoint, values: Tensor, pad: bool = False) -> Tensor:
        """``values [batch, pos, read]`` as a one-head activation ``[batch, pos, 1, .]``: zero-padded to
        TL's ``d_head`` and through ``hook_point`` where a hook is attached (or ``pad``), else as it is
        (the hook point would be the identity, and only the first ``read`` coordinates are read)."""
        if not (pad or _hooked(hook_point)):
            return values.unsqueeze(2)
        return hook_point(F.pad(values, (0, self.cfg.d_head - values.shape[-1])).unsqueeze(2))

    def _scores(
        self, query_input: Float[Tensor, "batch pos d_model"], q: Tensor, k: Tensor, past: int = 0
    ) -> tuple[Float[Tensor, "batch 1 query key"], Int[Tensor, "query key"]]:
        """The attention scores before any padding mask: the content score plus the three position terms
        and the causal mask, and the offsets ``i - j`` they were read at. The queries are the positions
        ``past..past+n-1`` (``past`` > 0 after a key/value cache), the keys ``0..past+n-1``."""
        read, batch, n_query, n_key = self.read_width, query_input.shape[0], query_input.shape[1], k.shape[1]
        # Content score h_i W_A h_j^T (no attention scale; a fresh tensor, summed into in place below).
        attn_scores = torch.einsum("bqhd,bkhd->bhqk", q[..., :read], k[..., :read])  # [batch, 1, query, key]

        offset = self._offsets(n_query, n_key, query_input.device)  # offset[i, j] = (past + i) - j
        causal = offset >= 0
        # The two position-only terms are [query, key] tables; a hook on them gets its own
        # [batch, head, query_pos, key_pos] copy (see _through_hook).
        rel_table = torch.where(causal, self.rel_score[offset.clamp(min=0)], 0.0)
        key_pos_table = torch.where(causal, self.key_pos_score[:n_key], 0.0)
        rel_scores = _through_hook(self.hook_rel_scores, rel_table, batch)
        key_pos_scores = _through_hook(self.hook_key_pos_scores, key_pos_table, batch)
        # h_i . U[:, i - j] for offsets in the window: (h U)[i, o] placed at key j = i - o.
        query_by_offset = query_input @ self.rel_query  # [batch, pos, window]
        # Kept in its natural band shape [batch, head, query_pos, offset] (entries with offset > query_pos
        # have no key and are unused) and added into the scores diagonal by diagonal: no
        # [batch, pos, pos] tensor that is mostly zeros.
        rel_query_scores = self.hook_rel_query_scores(query_by_offset.unsqueeze(1))

        # The two position terms and the causal mask (-inf above the diagonal) form one table, added to
        # the content score in one pass: a small [query, key] table without hooks, a [batch, 1, query,
        # key] tensor when a hook holds either term. The sums are the same in both cases (content +
        # (rel + key_pos)), so a hooked run (run_with_cache) gives the unhooked output bit for bit.
        positional = (rel_scores + key_pos_scores).masked_fill_(~causal, float("-inf"))
        attn_scores.add_(positional)
        for o in range(min(self.window, n_key)):
            # Offset o holds the pairs (query past + i, key past + i - o): the diagonal past - o of the
            # [query, key] table, from the first query with such a key, i = max(0, o - past).
            first = max(0, o - past)
            if first < n_query:
                attn_scores.diagonal(offset=past - o, dim1=-2, dim2=-1).add_(rel_query_scores[..., first:, o])
        return attn_scores, offset

    def _pattern(self, attn_scores: Float[Tensor, "batch 1 query key"]) -> Float[Tensor, "batch 1 query key"]:
        """Softmax over the keys (hooked as ``hook_pattern``); a row that attends nowhere is 0, not NaN."""
        pattern = F.softmax(attn_scores, dim=-1)
        # A row with every key masked (padding) or a non-finite score gives NaN: it attends nowhere
        # instead. Softmax is NaN-free when every row maximum is finite; checking that (one read)
        # spares the full rewrite of the pattern in the usual case.
        if not torch.isfinite(attn_scores.amax(dim=-1)).all():
            pattern = torch.nan_to_num(pattern, nan=0.0)
        return self.hook_pattern(pattern)  # [batch, 1, query, key]

    def _mixed_values(
        self, pattern: Float[Tensor, "batch 1 query key"], v: Tensor, offset: Int[Tensor, "query key"]
    ) -> tuple[Float[Tensor, "batch pos 1 read"], Float[Tensor, "batch pos 1 window"]]:
        """``z`` (hooked as ``hook_z``): the pattern's mix of the content values and of the value RPE,
        as its two non-zero parts ``(z[..., :D_{l-1}], z[..., d_model:])``."""
        read = self.read_width
        # z_i = sum_j A_ij [h_j ; r(i - j)]: the content value plus the value RPE in the last W coords.
        content_z = torch.einsum("bhqk,bkhd->bqhd", pattern, v[..., :read])  # [batch, pos, 1, read]
        pattern_by_offset = self._square_to_band(pattern[:, 0], offset)  # [batch, pos, window]
        rel_values = self.hook_rel_values((pattern_by_offset @ self.rel_value).unsqueeze(2))
        if not _hooked(self.hook_z):
            return content_z, rel_values
        # TL's z, [batch, pos, 1, d_head]: zero between the two parts; what a hook leaves there W_O ignores.
        d_model = self.cfg.d_model
        z = self.hook_z(torch.cat([F.pad(content_z, (0, d_model - read)), rel_values], dim=-1))
        return z[..., :read], z[..., d_model:]

    def _offsets(self, n_query: int, n_key: int, device: torch.device) -> Int[Tensor, "query key"]:
        """``offset[i, j] = (n_key - n_query + i) - j``: the queries are the last ``n_query`` positions."""
        keys = torch.arange(n_key, device=device)
        return keys[n_key - n_query :, None] - keys[None, :]

    def _square_to_band(
        self, square: Float[Tensor, "batch query key"], offset: Int[Tensor, "query key"]
    ) -> Float[Tensor, "batch query window"]:
        """``out[b, i, o] = square[b, i, i - o]`` for ``o < W`` with ``i - o >= 0``, else 0."""
        batch, n_pos, _ = square.shape
        window_offsets = torch.arange(self.window, device=square.device)
        key = offset[:, :1] - window_offsets[None, :]  # key position i - o, [query, window]
        index = key.clamp(min=0).expand(batch, n_pos, self.window)
        return torch.where(key >= 0, torch.gather(square, 2, index), 0.0)


class DisentangledTransformer(MDLensTransformer):
    """The disentangled transformer as a ``HookedTransformer`` (see the module docstring).

    ``model(tokens)`` returns ``[batch, pos, q]``: with ``output="probs"`` (the default, the paper's
    readout) the next-token probability vector at each position as the model computes it, not forced
    onto the simplex (``mdlens.predict_next`` / ``output_to_probs`` clip and renormalise it; the
    model's TL loss and ``generate`` use that distribution); with ``output="logits"``, logits. See
    :class:`~mdlens.models.base.MDLensTransformer` for the loss, ``generate`` and the input checks.
    ``run_with_cache`` returns a :class:`DisentangledActivationCache`.

    Args:
        vocab_size: ``q``, the width of the ``tokens`` block and of the output.
        n_ctx: the longest sequence; ``rel_score`` and ``key_pos_score`` have this many entries.
        n_layers: 1 to 8.
        window: ``W``, the relative-position window (offsets ``0..W-1``) of ``rel_query`` and
            ``rel_value``; the MTD default is ``order + 1`` (offsets ``0..m``).
        seed: initialisation seed.
        dtype: ``torch.float32`` for training, ``torch.float64`` for exact comparisons (or their names
            ``"float32"`` / ``"float64"``, as ``mdlens_args`` records them).
        init_std: standard deviation of the random parts of the initialisation.
        order: the MTD order ``m`` this model is meant for (recorded only).
        output: ``"probs"`` or ``"logits"``, stored as ``model.output_type``.

    ``model.mdlens_args`` holds these arguments (JSON-friendly): ``DisentangledTransformer(**model.mdlens_args)``
    builds the same architecture, initialised from the same seed.
    """

    def __init__(
        self,
        vocab_size: int,
        n_ctx: int,
        n_layers: int = 3,
        window: int = 4,
        seed: int = 0,
        dtype: torch.dtype | str = torch.float32,
        device: str = "cpu",
        init_std: float = DEFAULT_INIT_STD,
        order: int | None = None,
        output: str = "probs",
    ):
        args = _checked_arguments(vocab_size, n_ctx, n_layers, window, seed, dtype, init_std, order, output)
        vocab_size, n_layers, window = args["vocab_size"], args["n_layers"], args["window"]
        widths = residual_widths(vocab_size, n_layers, window)
        with preserve_global_rng(), quiet_hooked_transformer_deprecation():
            cfg = _config(args, widths[-1], device)
            super().__init__(cfg, output_type=output, move_to_device=False)
        self.embed, self.pos_embed = FrozenEmbed(cfg), FrozenPosEmbed(cfg)  # weights set below
        for index, block in enumerate(self.blocks):
            block.attn = DisentangledAttention(cfg, paper_layer(index), widths[index], window)

        self.window = window
        self.order = args["order"]
        self.residual_widths = widths
        self.layout = ResidualLayout.disentangled(vocab_size, n_layers, window)
        # What mdlens.save records so that mdlens.load can rebuild this exact architecture.
        self.mdlens_kind = "disentangled"
        self.mdlens_args = args
        self._init_disentangled_weights(args["seed"], args["init_std"])
        self.to(device, print_details=False)
        self.setup()  # give the new HookPoints their names

    def input_to_embed(self, input, *args, **kwargs):
        """TransformerLens' ``input_to_embed`` (token input checked); a construction read on fewer
        tokens than it was built for warns once (:meth:`_warn_once_if_step_rescaled`)."""
        embedded = super().input_to_embed(input, *args, **kwargs)
        if isinstance(input, Tensor):
            cache = kwargs.get("past_kv_cache")  # the positions already run, before these
            past = 0 if cache is None else cache.entries[0].past_keys.shape[1]
            self._warn_once_if_step_rescaled(past + input.shape[-1])
        return embedded

    def _warn_once_if_step_rescaled(self, n_pos: int) -> None:
        """One warning per model when a construction (``md_params`` with ``seq_len``, ``order`` and
        ``scales``) reads ``m < T < seq_len`` tokens: its scales act on prefix *means*, so its last
        position then runs MD with the first step ``eta_T = a / (m (T - m))`` (``a = beta`` for one step),
        a larger step than the ``a / (m (seq_len - m))`` it was built with. Exact, and documented in
        :mod:`mdlens.construction`, but easy to miss: a :class:`RescaledStepWarning`."""
        md_params = getattr(self, "md_params", None)
        if getattr(self, "_warned_step_rescaled", False) or not isinstance(md_params, dict):
            return
        seq_len, m, scales = md_params.get("seq_len"), md_params.get("order"), md_params.get("scales")
        if seq_len is None or m is None or not scales or not m < n_pos < seq_len:
            return
        self._warned_step_rescaled = True
        first_scale, steps = float(scales[0]), md_params.get("steps", 1)
        what = (
            "one-step MD with eta_T = beta / (m (T - m))"
            if steps == 1
            else f"{steps}-step MD with a first step eta_T = a / (m (T - m))"
        )
        warnings.warn(
            f"this construction was built for seq_len={seq_len}; on T={n_pos} tokens its last position computes "
            f"{what} = {E.eta_from_beta(first_scale, m, n_pos):.4g}, not the eta = "
            f"{E.eta_from_beta(first_scale, m, seq_len):.4g} "
            f"it has at T={seq_len}. Build it with seq_len={n_pos} for that step at T={n_pos} (this warning is "
            f"shown once per model)",
            RescaledStepWarning,
            stacklevel=_user_stacklevel(),
        )

    def run_with_cache(self, *model_args, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs):
        """TransformerLens' ``run_with_cache``; the cache object is a :class:`DisentangledActivationCache`."""
        out, cache = super().run_with_cache(
            *model_args, return_cache_object=False, remove_batch_dim=remove_batch_dim, **kwargs
        )
        if return_cache_object:
            cache = DisentangledActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    @torch.no_grad()
    def _init_disentangled_weights(self, seed: int, init_std: float) -> None:
        generator = torch.Generator().manual_seed(seed)
        dtype, q = self.cfg.dtype, self.cfg.d_vocab

        def small(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype) * init_std

        one_hot = torch.zeros(q, self.cfg.d_model, dtype=dtype)
        one_hot[:, :q] = torch.eye(q, dtype=dtype)
        self.embed.W_E = _frozen(one_hot)
        self.pos_embed.W_pos = _frozen(torch.zeros(self.cfg.n_ctx, self.cfg.d_model, dtype=dtype))
        for block in self.blocks:
            attn = block.attn
            read = attn.read_width
            attn.W_Q[0, :read, :read] = small(read, read)
            attn.rel_query[:read] = small(read, self.window)
        self.unembed.W_U = nn.Parameter(small(self.cfg.d_model, q))
        self.unembed.b_U = _frozen(torch.zeros(q, dtype=dtype))

    def score_matrix(self, layer: int) -> Float[Tensor, "read read"]:
        """``W_A`` of layer ``layer`` (1-based) on the coordinates it reads, ``[D_{l-1}, D_{l-1}]``."""
        if not 1 <= layer <= self.cfg.n_layers:
            raise ValueError(f"layer must be in 1..{self.cfg.n_layers}, got {layer}")
        return self.blocks[block_index_of(layer)].attn.W_A

    @classmethod
    def from_task(cls, task, n_ctx: int, n_layers: int = 3, window: int | None = None, **kwargs):
        """A model sized for an :class:`mdlens.task.MTDTask` (``q`` and the default window ``m + 1``)."""
        order = task.order
        return cls(
            task.transition.shape[0],
            n_ctx,
            n_layers=n_layers,
            window=order + 1 if window is None else window,
            order=order,
            **kwargs,
        )


def _checked_arguments(vocab_size, n_ctx, n_layers, window, seed, dtype, init_std, order, output) -> dict:
    """:class:`DisentangledTransformer`'s arguments checked, as ``mdlens_args`` records them (Python ints,
    the dtype by name, ``init_std`` as a float); ``ValueError`` naming the first bad one."""
    vocab_size = check_int(vocab_size, "vocab_size", 2)
    n_ctx = check_int(n_ctx, "n_ctx", 2)
    n_layers = check_int(n_layers, "n_layers", 1)
    window = check_int(window, "window", 1)
    seed = check_int(seed, "seed", 0)
    order = None if order is None else check_order(order)
    if n_layers > MAX_LAYERS:
        raise ValueError(f"n_layers must be at most {MAX_LAYERS} (the residual doubles per layer), got {n_layers}")
    dtype = resolve_dtype(dtype)
    if not (isinstance(init_std, (int, float)) and init_std >= 0):
        raise ValueError(f"init_std must be a number >= 0, got {init_std!r}")
    check_output_type(output)
    return {
        "vocab_size": vocab_size,
        "n_ctx": n_ctx,
        "n_layers": n_layers,
        "window": window,
        "seed": seed,
        "dtype": dtype_name(dtype),
        "init_std": float(init_std),
        "order": order,
        "output": output,
    }


def _config(args: dict, d_model: int, device: str) -> HookedTransformerConfig:
    """The TransformerLens config of the disentangled model ``args`` (:func:`_checked_arguments`)
    describes, with the final residual width ``d_model``: one head whose ``d_head`` also holds the
    window, attention only, no LayerNorm, no score scaling, the weights left to mdlens."""
    return HookedTransformerConfig(
        n_layers=args["n_layers"],
        d_model=d_model,
        n_ctx=args["n_ctx"],
        d_head=d_model + args["window"],
        n_heads=1,
        d_vocab=args["vocab_size"],
        d_vocab_out=args["vocab_size"],
        attn_only=True,
        normalization_type=None,
        use_attn_scale=False,
        act_fn=None,
        positional_embedding_type="standard",
        default_prepend_bos=False,
        init_weights=False,  # every weight is set by DisentangledTransformer, from a private generator
        seed=args["seed"],
        dtype=resolve_dtype(args["dtype"]),
        device=device,
    )


def disentangled_transformer(
    vocab_size: int,
    order: int,
    n_ctx: int,
    n_layers: int = 3,
    window: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    init_std: float = DEFAULT_INIT_STD,
) -> DisentangledTransformer:
    """A disentangled transformer for MTD of order ``m = order``; window defaults to ``m + 1``."""
    check_order(order)
    return DisentangledTransformer(
        vocab_size,
        n_ctx,
        n_layers=n_layers,
        window=order + 1 if window is None else window,
        seed=seed,
        dtype=dtype,
        device=device,
        init_std=init_std,
        order=order,
    )
