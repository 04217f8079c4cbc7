"""mdlens: in-context mirror descent on Mixtures of Transition Distributions, for TransformerLens.

See README.md for the quick start and ``shared/paper-notes.md`` for the maths.

The names below are imported on first use (module ``__getattr__``), so that ``import mdlens`` and
``mdlens --help`` do not pay for torch and TransformerLens until something needs them.
"""

from __future__ import annotations

from mdlens._lazy import lazy_names

# public name -> the module that defines it
_PUBLIC_NAMES = {
    "MTDSample": "mdlens.task",
    "MTDTask": "mdlens.task",
    "list_pretrained": "mdlens.pretrained",
    "load": "mdlens.checkpoints",
    "load_pretrained": "mdlens.pretrained",
    "load_task": "mdlens.checkpoints",
    "predict_next": "mdlens.predict",
    "save": "mdlens.checkpoints",
}
# Subpackages and modules reachable as attributes (``mdlens.estimators``, ``mdlens.hooks``...).
_SUBMODULES = (
    "analyses",
    "checkpoints",
    "cli",
    "construction",
    "estimators",
    "evaluation",
    "hooks",
    "jsonable",
    "models",
    "predict",
    "pretrained",
    "task",
    "train_cli",
    "train_config",
    "training",
    "validation",
)

__all__ = ["estimators", *sorted(_PUBLIC_NAMES)]


__getattr__, __dir__ = lazy_names("mdlens", globals(), _PUBLIC_NAMES, _SUBMODULES)
