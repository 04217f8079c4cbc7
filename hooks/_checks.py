"""Input checks shared by the probes: a model, the tokens it reads and the task they come from.

Every check raises a ``ValueError`` that says what is wrong; nothing is clipped or guessed.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mdlens.validation import check_context_tokens, check_order, check_transition


def check_model(model: HookedTransformer) -> HookedTransformer:
    """A ``HookedTransformer`` (the probes read it through hooks only)."""
    if not isinstance(model, HookedTransformer):
        raise ValueError(f"model must be a transformer_lens.HookedTransformer, got {type(model).__name__}")
    return model


def check_model_tokens(
    model: HookedTransformer,
    tokens: Tensor,
    transition: Tensor | None = None,
    order: int | None = None,
) -> Int[Tensor, "batch pos"]:
    """Tokens ``[B, T]`` (or ``[T]``) that ``model`` can read, as int64 ``[B, T]`` on the CPU.

    Checks: ids in ``[0, d_vocab)``, ``T <= n_ctx``, ``T > order`` when ``order`` is given
    (:func:`mdlens.validation.check_context_tokens`, the check a model's own input gets), and
    ``d_vocab == q`` when ``transition`` is given (a model of another vocabulary cannot be
    compared with this task's algorithm).
    """
    check_model(model)
    vocab_size = model.cfg.d_vocab
    if transition is not None:
        transition = check_transition(transition)
        if transition.shape[0] != vocab_size:
            raise ValueError(
                f"the model's d_vocab={vocab_size} does not match the transition's q={transition.shape[0]}"
            )
    order = 0 if order is None else check_order(order)
    return check_context_tokens(tokens, vocab_size, model.cfg.n_ctx, order).cpu()


def check_same_task_models(model: HookedTransformer, reference: HookedTransformer) -> None:
    """Two models that read the same vocabulary (a model and the construction it is compared with)."""
    check_model(model)
    check_model(reference)
    if model.cfg.d_vocab != reference.cfg.d_vocab:
        raise ValueError(f"model d_vocab={model.cfg.d_vocab} differs from the reference's {reference.cfg.d_vocab}")


def model_device(model: HookedTransformer) -> torch.device:
    return next(model.parameters()).device


def check_activations(acts: Tensor, name: str = "acts") -> Float[Tensor, "n d"]:
    """A finite float ``[N, d]`` matrix of activations, as float64."""
    if not isinstance(acts, Tensor) or not acts.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor")
    if acts.ndim != 2:
        raise ValueError(f"{name} must have shape [N, d], got {tuple(acts.shape)}")
    acts = acts.detach().to(torch.float64).cpu()
    if not torch.isfinite(acts).all():
        raise ValueError(f"{name} contains NaN or inf")
    return acts
