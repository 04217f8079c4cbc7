"""The kinds of model mdlens builds, and the one way to build each.

A model mdlens built records its kind and its builder's arguments (``model.mdlens_kind`` and
``model.mdlens_args``, JSON-friendly: dtype by name). :func:`build_model` builds a kind from such
arguments (checkpoints rebuild saved models with it), :func:`build_for_task` builds the untrained model
of a training run for an MTD task (``mdlens train`` and the training studies), and :func:`build_like`
a freshly initialised copy of any model's architecture (the probes' "random model" control). A plain
``HookedTransformer`` that mdlens did not build is the kind ``"hooked_transformer"``: rebuilt from
its config (:func:`build_plain`).
"""

from __future__ import annotations

from transformer_lens import HookedTransformer, HookedTransformerConfig

from mdlens.models.base import MDLensTransformer
from mdlens.models.building import preserve_global_rng, quiet_hooked_transformer_deprecation
from mdlens.models.disentangled import DisentangledTransformer
from mdlens.models.dtypes import DTYPES
from mdlens.models.standard import standard_transformer
from mdlens.models.tokenizer import attach_tokenizer
from mdlens.validation import check_int

# The kinds mdlens builds itself, each from its builder's arguments (``mdlens_args``).
BUILDERS = {"disentangled": DisentangledTransformer, "standard": standard_transformer}
# Every kind a checkpoint can hold: mdlens' own and a user's plain HookedTransformer (from its config).
MODEL_KINDS = (*BUILDERS, "hooked_transformer")


def build_model(kind: str, args: dict) -> MDLensTransformer:
    """A freshly initialised model of the mdlens ``kind`` (``"disentangled"`` / ``"standard"``) from its
    builder's arguments as ``model.mdlens_args`` records them (every one, the dtype by name).

    ``build_model(model.mdlens_kind, model.mdlens_args)`` has ``model``'s architecture and initial
    weights. ``ValueError`` for an unknown kind, a dtype that is not one of ``DTYPES`` or arguments
    the builder does not take.
    """
    if kind not in BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; mdlens builds {tuple(BUILDERS)}")
    args = dict(args)
    if args.get("dtype") not in DTYPES:
        raise ValueError(f"{kind} model dtype {args.get('dtype')!r} is not one of {tuple(DTYPES)}")
    args["dtype"] = DTYPES[args["dtype"]]
    try:
        return BUILDERS[kind](**args)
    except TypeError as error:
        raise ValueError(f"{kind} builder arguments do not fit this mdlens: {error}") from error


def build_for_task(
    kind: str, vocab_size: int, order: int, n_ctx: int, n_layers: int, seed: int, output: str, **options
) -> MDLensTransformer:
    """The untrained float32 model of ``kind`` for an MTD task of vocabulary ``q = vocab_size`` and order
    ``m = order``, with context ``n_ctx``, ``n_layers`` layers, initialised from ``seed``, reading out
    ``output`` (``"logits"`` / ``"probs"``).

    A disentangled model gets the window ``m + 1`` and knows its order (its loss scores the positions
    ``t > m``); ``options`` go to the kind's builder as they are (``init_std`` for a disentangled model,
    ``d_model``, ``n_heads``, ... for a standard one).
    """
    if kind == "disentangled":
        return DisentangledTransformer(
            vocab_size, n_ctx, n_layers=n_layers, window=order + 1, seed=seed, order=order, output=output, **options
        )
    if kind == "standard":
        return standard_transformer(vocab_size, n_ctx, n_layers=n_layers, seed=seed, output=output, **options)
    raise ValueError(f"unknown model kind {kind!r}; mdlens builds {tuple(BUILDERS)}")


def build_plain(cfg: HookedTransformerConfig, tokenizer=None) -> HookedTransformer:
    """A plain ``HookedTransformer(cfg)`` (TransformerLens initialises it from ``cfg.seed``), with
    ``tokenizer`` or none, built without touching the global random streams or warnings."""
    with preserve_global_rng(), quiet_hooked_transformer_deprecation():
        return HookedTransformer(cfg, tokenizer=tokenizer)


def build_like(model: HookedTransformer, seed: int) -> HookedTransformer:
    """A freshly initialised model of ``model``'s architecture, seeded by ``seed`` (its weights
    untrained): the "same probe on a random model" control of :mod:`mdlens.hooks`.

    mdlens-built models are rebuilt from their builder arguments (with a copy of ``model``'s tokenizer);
    any other ``HookedTransformer`` from a copy of its config with ``seed`` (TransformerLens initialises
    it). Global random streams are left as they were.
    """
    seed = check_int(seed, "seed", 0)
    kind, args = getattr(model, "mdlens_kind", None), getattr(model, "mdlens_args", None)
    if kind in BUILDERS and isinstance(args, dict):
        fresh = build_model(kind, {**args, "seed": seed})
        if model.tokenizer is not None:
            attach_tokenizer(fresh, model.tokenizer)
    elif isinstance(model, HookedTransformer):
        with preserve_global_rng(), quiet_hooked_transformer_deprecation():  # the config reseeds them too
            cfg = HookedTransformerConfig.from_dict({**model.cfg.to_dict(), "seed": seed})
            fresh = build_plain(cfg)
        fresh.output_type = getattr(model, "output_type", "logits")
    else:
        raise ValueError(f"model must be a HookedTransformer, got {type(model).__name__}")
    device = next(model.parameters()).device
    return fresh.to(device) if device.type != "cpu" else fresh
