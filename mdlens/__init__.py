"""mdlens: in-context mirror descent on Mixtures of Transition Distributions, for TransformerLens.

See README.md for the quick start and ``shared/paper-notes.md`` for the maths.
"""

from mdlens import estimators
from mdlens.checkpoints import load, load_task, save
from mdlens.predict import predict_next
from mdlens.pretrained import list_pretrained, load_pretrained
from mdlens.task import MTDSample, MTDTask

__all__ = [
    "MTDSample",
    "MTDTask",
    "estimators",
    "list_pretrained",
    "load",
    "load_pretrained",
    "load_task",
    "predict_next",
    "save",
]
