"""Models for the MTD task, all ``HookedTransformer``s (subclasses of :class:`MDLensTransformer`).

- :func:`standard_transformer` / :class:`StandardTransformer`: TransformerLens' own architecture
  (Q/K/V/O, MLPs, LayerNorm, positions), unchanged.
- :class:`DisentangledTransformer` / :func:`disentangled_transformer`: the paper's architecture
  (concatenated residual, single score matrix, relative-position terms) as a subclass.
- :class:`ResidualLayout`: the named blocks of a disentangled residual stream.
- :func:`grow`: a trained disentangled model copied into a deeper one with the same function.
- :func:`build_model` / :func:`build_for_task` / :func:`build_like` (``mdlens.models.registry``): the
  model kinds (``MODEL_KINDS``) and the one way to build each: from recorded builder arguments, for a
  task's training run, or as a fresh copy of a model's architecture.
- :func:`attach_tokenizer` / :func:`vocabulary_tokenizer`: the offline tokenizer every mdlens model
  carries (token ids as decimal strings: ``model.to_tokens("3 1 4")``, ``model.to_str_tokens``).
- :func:`composition_scores`: Elhage et al.'s composition scores including the relative-position terms.
- :func:`act_name`: ``transformer_lens.utils.get_act_name`` that also knows the disentangled hook
  points (``act_name("rel_scores", 0) == "blocks.0.attn.hook_rel_scores"``).

In a TransformerLens user's hands every mdlens model behaves like any ``HookedTransformer``, with its
real next-token distribution where TransformerLens assumes logits: ``model(tokens, return_type="loss")``
is the cross-entropy of that distribution, ``generate`` samples from it, and token input is checked
(:class:`MDLensTransformer`). What ``model(tokens)`` returns is stated by ``model.output_type``:
logits (``"logits"``) or the probability vector itself (``"probs"``; read it with
``mdlens.predict_next`` / ``mdlens.predict.output_to_probs``).

Note: ``transformer_lens.patching``'s ``get_act_patch_*`` functions return their results as float32
tensors (TransformerLens allocates them so), also for a float64 model: patched metrics agree with a
float64 run to float32 rounding (about 1e-7 relative).
"""

from __future__ import annotations

from mdlens._lazy import lazy_names

# public name -> the module that defines it (imported on first use, module ``__getattr__``: the
# layout and layer numbering, which the report and the CLI read, need no TransformerLens)
_PUBLIC_NAMES = {
    "MDLensTransformer": "mdlens.models.base",
    "CompositionScores": "mdlens.models.composition",
    "composition_scores": "mdlens.models.composition",
    "DisentangledActivationCache": "mdlens.models.disentangled",
    "DisentangledAttention": "mdlens.models.disentangled",
    "DisentangledTransformer": "mdlens.models.disentangled",
    "act_name": "mdlens.models.disentangled",
    "disentangled_transformer": "mdlens.models.disentangled",
    "residual_widths": "mdlens.models.disentangled",
    "NEW_LAYER_RULES": "mdlens.models.growth",
    "grow": "mdlens.models.growth",
    "ResidualBlock": "mdlens.models.layout",
    "ResidualLayout": "mdlens.models.layout",
    "MODEL_KINDS": "mdlens.models.registry",
    "build_for_task": "mdlens.models.registry",
    "build_like": "mdlens.models.registry",
    "build_model": "mdlens.models.registry",
    "StandardTransformer": "mdlens.models.standard",
    "standard_transformer": "mdlens.models.standard",
    "attach_tokenizer": "mdlens.models.tokenizer",
    "vocabulary_tokenizer": "mdlens.models.tokenizer",
}

__all__ = sorted(_PUBLIC_NAMES)


# Every module of the package, reachable as an attribute (``mdlens.models.layout``).
_SUBMODULES = (
    "base",
    "building",
    "composition",
    "disentangled",
    "dtypes",
    "growth",
    "layout",
    "outputs",
    "registry",
    "standard",
    "tokenizer",
)
__getattr__, __dir__ = lazy_names("mdlens.models", globals(), _PUBLIC_NAMES, _SUBMODULES)
