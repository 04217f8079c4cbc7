"""Input checks shared by every public function (public: hooks and users check inputs with them too).

Each check returns the validated (and, where stated, converted) tensor or raises a
``ValueError`` that says what is wrong. Nothing is clipped or guessed.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

# Tolerance for "sums to one" / "on the simplex" checks, in float64.
SIMPLEX_ATOL = 1e-6


def as_integer(value, name: str) -> int:
    """Any integral number as a Python ``int``: an ``int``, a numpy integer (any ``numbers.Integral``)
    or a 0-d integer tensor. ``bool`` (``True`` is no count), floats (even ``4.0``) and other tensors
    are a ``ValueError`` naming ``name``."""
    if isinstance(value, Tensor):
        if value.ndim == 0 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            return int(value.item())
    elif isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    raise ValueError(f"{name} must be an int, got {value!r}")


def check_int(value: int, name: str, minimum: int) -> int:
    """An integral number (:func:`as_integer`) at least ``minimum``, as a Python ``int``;
    ``ValueError`` naming ``name`` otherwise."""
    try:
        integer = as_integer(value, name)
    except ValueError:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}") from None
    if integer < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return integer


def check_index(value: int, name: str, size: int, note: str = "") -> int:
    """An index into ``size`` things: an integral number (:func:`as_integer`) in ``[0, size)``, as a
    Python ``int``; otherwise ``ValueError``: "``name`` must be an int in [0, size)``note``, got ..."."""
    message = f"{name} must be an int in [0, {size}){note}, got {value!r}"
    try:
        index = as_integer(value, name)
    except ValueError:
        raise ValueError(message) from None
    if not 0 <= index < size:
        raise ValueError(message)
    return index


def check_order(order: int) -> int:
    """The MTD order ``m`` (number of lags): an int >= 1."""
    return check_int(order, "order (the number of lags m)", 1)


def check_positive_entries(values: Tensor, name: str) -> Float[Tensor, " n"]:
    """A non-empty 1-D tensor of finite, strictly positive numbers (per-step sizes), as float64; the
    autograd graph is kept (the values may require grad)."""
    if not isinstance(values, Tensor) or values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got {values!r}")
    if not (torch.isfinite(values.detach()).all() and (values.detach() > 0).all()):
        raise ValueError(f"{name} must be finite and > 0, got {values.detach().tolist()}")
    return values.to(torch.float64)


def check_transition(transition: Tensor) -> Float[Tensor, "q q"]:
    """A square, finite, non-negative, row-stochastic matrix with no zero row, as float64."""
    if not isinstance(transition, Tensor):
        raise ValueError(f"transition must be a torch.Tensor, got {type(transition).__name__}")
    if transition.ndim != 2 or transition.shape[0] != transition.shape[1]:
        raise ValueError(f"transition must be a square [q, q] matrix, got shape {tuple(transition.shape)}")
    if transition.shape[0] < 2:
        raise ValueError(f"transition needs a vocabulary of at least 2 tokens, got q={transition.shape[0]}")
    if not transition.is_floating_point():
        raise ValueError(f"transition must be a floating-point tensor, got dtype {transition.dtype}")
    transition = transition.to(torch.float64)
    if torch.isnan(transition).any():
        raise ValueError("transition contains NaN")
    if torch.isinf(transition).any():
        raise ValueError("transition contains inf")
    if (transition < 0).any():
        raise ValueError(f"transition has negative entries (min {transition.min().item():.3g})")
    row_sums = transition.sum(dim=1)
    if (row_sums == 0).any():
        zero_rows = torch.nonzero(row_sums == 0).flatten().tolist()
        raise ValueError(f"transition has zero rows: {zero_rows}")
    worst = (row_sums - 1).abs().max().item()
    if worst > SIMPLEX_ATOL:
        raise ValueError(f"transition is not row-stochastic: a row sums to 1 +/- {worst:.3g}")
    return transition


def check_tokens(tokens: Tensor, vocab_size: int, order: int) -> Int[Tensor, "batch pos"]:
    """Token ids in ``[0, vocab_size)`` of shape ``[B, T]`` or ``[T]`` with ``T > order``.

    Returns an int64 ``[B, T]`` tensor (a ``[T]`` input gains a batch dimension of 1).
    """
    if not isinstance(tokens, Tensor):
        raise ValueError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    if tokens.ndim == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [B, T] or [T], got {tuple(tokens.shape)}")
    if tokens.shape[0] == 0:
        raise ValueError("tokens has an empty batch")
    if tokens.shape[1] <= order:
        raise ValueError(f"need more tokens than the order: T={tokens.shape[1]} <= m={order}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"tokens must lie in [0, {vocab_size}), found values in [{tokens.min().item()}, {tokens.max().item()}]"
        )
    return tokens.long()


def check_context_tokens(tokens: Tensor, vocab_size: int, n_ctx: int, order: int = 0) -> Int[Tensor, "batch pos"]:
    """Token ids a model of vocabulary ``q = vocab_size`` and context ``n_ctx`` can read.

    ``[B, T]`` or ``[T]`` integer ids in ``[0, q)``, ``B >= 1``, ``order < T <= n_ctx`` (``T >= 1``
    without an order); returns them as int64 ``[B, T]`` (:func:`check_tokens`, one min/max pass over
    the ids). The one token check of every model input: the models' own ``forward`` and the probes'.
    """
    if isinstance(tokens, Tensor) and tokens.ndim in (1, 2) and tokens.shape[-1] == 0:
        raise ValueError(f"tokens have no positions (T = 0): a model reads 1 <= T <= n_ctx={n_ctx}")
    tokens = check_tokens(tokens, vocab_size, order)
    if tokens.shape[1] > n_ctx:
        raise ValueError(f"tokens have T={tokens.shape[1]} positions, more than the model's context n_ctx={n_ctx}")
    return tokens


def _float64_rows(values: Tensor, name: str) -> Tensor:
    """A floating-point tensor as float64, a single row ``[k]`` as ``[1, k]``; ``ValueError`` otherwise."""
    if not isinstance(values, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if not values.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {values.dtype}")
    values = values.to(torch.float64)
    return values.unsqueeze(0) if values.ndim == 1 else values


def check_weights(weights: Tensor, order: int, batch_size: int | None = None) -> Float[Tensor, "batch m"]:
    """Mixture weights on the simplex, shape ``[B, m]`` or ``[m]``; returns float64 ``[B, m]``."""
    weights = _float64_rows(weights, "weights")
    if weights.ndim != 2 or weights.shape[1] != order:
        raise ValueError(f"weights must have shape [B, m={order}] or [m], got {tuple(weights.shape)}")
    if batch_size is not None and weights.shape[0] not in (1, batch_size):
        raise ValueError(f"weights has batch size {weights.shape[0]}, tokens have {batch_size}")
    if torch.isnan(weights).any():
        raise ValueError("weights contain NaN")
    if (weights < -SIMPLEX_ATOL).any():
        raise ValueError(f"weights are off the simplex: negative entry {weights.min().item():.3g}")
    worst = (weights.sum(dim=1) - 1).abs().max().item()
    if worst > SIMPLEX_ATOL:
        raise ValueError(f"weights are off the simplex: a row sums to 1 +/- {worst:.3g}")
    return weights


def check_distribution(probs: Tensor, name: str) -> Float[Tensor, "batch q"]:
    """A batch of probability vectors ``[B, q]`` (or ``[q]``); returns float64 ``[B, q]``."""
    probs = _float64_rows(probs, name)
    if probs.ndim != 2:
        raise ValueError(f"{name} must have shape [B, q] or [q], got {tuple(probs.shape)}")
    if torch.isnan(probs).any():
        raise ValueError(f"{name} contains NaN")
    if (probs < 0).any():
        raise ValueError(f"{name} has negative entries (min {probs.min().item():.3g})")
    worst = (probs.sum(dim=1) - 1).abs().max().item()
    if worst > SIMPLEX_ATOL:
        raise ValueError(f"{name} rows must sum to 1, one is {worst:.3g} away")
    return probs


def check_positive(value: float, name: str) -> float:
    """A finite, strictly positive number (step sizes, concentrations, temperatures)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value
