"""Standard transformers for the MTD task: TransformerLens' own architecture, unchanged.

These are the "do ordinary architectures learn the same mechanism?" models of paper-notes §6:
separate Q/K/V/O per head, optional MLPs and LayerNorm, learned absolute or rotary positions.
:class:`StandardTransformer` is a ``HookedTransformer`` with TransformerLens' own components; it adds
only what every mdlens model has (:class:`~mdlens.models.base.MDLensTransformer`): ``output_type``,
checked token input, and a loss and sampling that read the model's real distribution.
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformerConfig

from mdlens.models.base import MDLensTransformer
from mdlens.models.building import preserve_global_rng, quiet_hooked_transformer_deprecation
from mdlens.models.dtypes import dtype_name, resolve_dtype
from mdlens.models.outputs import check_output_type
from mdlens.validation import check_int

POSITIONS = ("standard", "rotary")  # TransformerLens' positional_embedding_type
NORMALIZATIONS = ("LN", None)


class StandardTransformer(MDLensTransformer):
    """A plain ``HookedTransformer`` built by :func:`standard_transformer`.

    ``model(tokens)`` returns ``[batch, pos, q]``: logits when ``output_type == "logits"`` (the
    default), the probability vector itself (not forced onto the simplex; read it with
    ``mdlens.predict_next`` / ``output_to_probs``) when ``"probs"``. See
    :class:`~mdlens.models.base.MDLensTransformer` for the loss, ``generate`` and the input checks.
    """


def standard_transformer(
    vocab_size: int,
    n_ctx: int,
    n_layers: int = 3,
    d_model: int = 64,
    n_heads: int = 1,
    d_mlp: int | None = None,
    attn_only: bool = False,
    normalization: str | None = "LN",
    positions: str = "standard",
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    output: str = "logits",
    act_fn: str = "gelu",
    device: str = "cpu",
) -> StandardTransformer:
    """A :class:`StandardTransformer` (a ``HookedTransformer``) sized for MTD with vocabulary ``q = vocab_size``.

    Args:
        vocab_size: ``q``; the model reads token ids in ``[0, q)`` and outputs ``[batch, pos, q]``.
        n_ctx: the longest sequence the model accepts.
        n_layers, d_model, n_heads: size; ``d_head = d_model // n_heads`` (must divide).
        d_mlp: MLP width (default ``4 * d_model``); ignored when ``attn_only``.
        normalization: ``"LN"`` (pre-LayerNorm, as GPT-2) or ``None``.
        positions: ``"standard"`` (learned absolute) or ``"rotary"`` (rotary on all of ``d_head``).
        seed: initialisation seed (``cfg.seed``): the same seed gives the same weights.
        dtype: ``torch.float32`` / ``torch.float64`` or their names ``"float32"`` / ``"float64"``.
        output: how the raw output is read, stored as ``model.output_type``: ``"logits"`` (softmax
            it; the TransformerLens convention, for cross-entropy training) or ``"probs"`` (the raw
            output is the probability vector itself, as the paper trains with MSE).
        device: where the weights live (initialisation is seeded the same on every device).

    ``model.mdlens_args`` holds these arguments (JSON-friendly, dtype by name):
    ``standard_transformer(**model.mdlens_args)`` builds the same model.
    """
    args = _checked_arguments(
        vocab_size, n_ctx, n_layers, d_model, n_heads, d_mlp, attn_only, normalization, positions, seed, dtype, output
    )
    args["act_fn"] = act_fn  # TransformerLens checks it
    # TransformerLens reseeds the global generators with cfg.seed (in the config and in
    # init_weights); preserve them so building a model leaves the caller's random streams alone.
    with preserve_global_rng(), quiet_hooked_transformer_deprecation():
        model = StandardTransformer(_config(args, device), output_type=output)
    # What mdlens.save records so that mdlens.load can rebuild this exact architecture.
    model.mdlens_kind = "standard"
    model.mdlens_args = args
    return model


def _checked_arguments(
    vocab_size, n_ctx, n_layers, d_model, n_heads, d_mlp, attn_only, normalization, positions, seed, dtype, output
) -> dict:
    """:func:`standard_transformer`'s arguments checked, as ``mdlens_args`` records them (Python ints,
    ``d_mlp`` defaulting to ``4 d_model``, the dtype by name); ``ValueError`` naming the first bad one."""
    vocab_size = check_int(vocab_size, "vocab_size", 2)
    n_ctx = check_int(n_ctx, "n_ctx", 2)
    n_layers = check_int(n_layers, "n_layers", 1)
    d_model = check_int(d_model, "d_model", 1)
    n_heads = check_int(n_heads, "n_heads", 1)
    seed = check_int(seed, "seed", 0)
    if d_model % n_heads:
        raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
    if d_mlp is None:
        d_mlp = 4 * d_model
    d_mlp = check_int(d_mlp, "d_mlp", 1)
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    dtype = resolve_dtype(dtype)
    check_output_type(output)
    if positions == "rotary" and (d_model // n_heads) % 2:
        raise ValueError(f"rotary positions need an even d_head, got {d_model // n_heads}")
    return {
        "vocab_size": vocab_size,
        "n_ctx": n_ctx,
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "d_mlp": d_mlp,
        "attn_only": attn_only,
        "normalization": normalization,
        "positions": positions,
        "seed": seed,
        "dtype": dtype_name(dtype),
        "output": output,
    }


def _config(args: dict, device: str) -> HookedTransformerConfig:
    """The TransformerLens config of the standard model ``args`` (:func:`_checked_arguments`) describes."""
    d_head = args["d_model"] // args["n_heads"]
    attn_only, positions = args["attn_only"], args["positions"]
    return HookedTransformerConfig(
        n_layers=args["n_layers"],
        d_model=args["d_model"],
        n_ctx=args["n_ctx"],
        d_head=d_head,
        n_heads=args["n_heads"],
        d_mlp=None if attn_only else args["d_mlp"],
        act_fn=None if attn_only else args["act_fn"],
        attn_only=attn_only,
        d_vocab=args["vocab_size"],
        d_vocab_out=args["vocab_size"],
        normalization_type=args["normalization"],
        positional_embedding_type=positions,
        rotary_dim=d_head if positions == "rotary" else None,
        default_prepend_bos=False,
        seed=args["seed"],
        dtype=resolve_dtype(args["dtype"]),
        device=device,
    )
