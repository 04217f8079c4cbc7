"""The Mixture of Transition Distributions (MTD) task of paper-notes §1.

A fixed row-stochastic ``q x q`` matrix ``pi`` (learned *in weights*), and per sequence latent
mixture weights ``lambda ~ Dirichlet(alpha 1_m)`` (learned *in context*). The first ``m`` tokens
are i.i.d. uniform; for ``t > m`` a lag ``z_t ~ Cat(lambda)`` picks the parent token and
``y_t ~ pi(y_{t - z_t}, .)``. Positions are 1-based in the maths, 0-based in the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mdlens._random import dirichlet_sample
from mdlens.validation import as_integer, check_int, check_order, check_positive, check_transition

# The keyword arguments of MTDTask that rebuild a task drawn from its seed (MTDTask.arguments): the
# task's one spelling (checkpoints record it; mdlens.train_config.TASK_FIELDS maps the flags onto it).
TASK_ARGUMENTS = ("vocab_size", "order", "alpha", "seed", "transition_concentration")


@dataclass(frozen=True)
class MTDSample:
    """A batch of MTD sequences with everything latent that generated them.

    tokens:     [B, T] int64, ``y_1..y_T``.
    weights:    [B, m] float64, the sequence's mixture weights ``lambda``.
    lags:       [B, T] int64, the latent lag ``z_t`` in ``1..m`` (0 for the first ``m`` positions).
    next_probs: [B, q] float64, the true predictive of ``y_{T+1}``: ``sum_g lambda_g pi(y_{T+1-g}, .)``.
    """

    tokens: Int[Tensor, "batch pos"]
    weights: Float[Tensor, "batch m"]
    lags: Int[Tensor, "batch pos"]
    next_probs: Float[Tensor, "batch q"]


class MTDTask:
    """An MTD source: a fixed transition matrix plus the recipe for sampling sequences.

    ``MTDTask(vocab_size=5, order=3, alpha=1.0, seed=0)`` draws the rows of ``pi`` from
    ``Dirichlet(transition_concentration)``; ``MTDTask(order=3, transition=pi)`` uses the given
    matrix (``vocab_size`` is then inferred, and must match if also given). ``sample`` without a
    generator uses the task's own generator seeded from ``seed``: successive calls differ, and a
    fresh task with the same seed reproduces them.
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        order: int = 3,
        alpha: float = 1.0,
        seed: int = 0,
        transition_concentration: float = 1.0,
        transition: Float[Tensor, "q q"] | None = None,
    ) -> None:
        self.order = check_order(order)
        self.alpha = check_positive(alpha, "alpha")
        self.transition_concentration = check_positive(transition_concentration, "transition_concentration")
        self.seed = seed = as_integer(seed, "seed")
        self.generator = torch.Generator().manual_seed(seed)

        if transition is not None:
            transition = check_transition(transition)
            if vocab_size is not None and vocab_size != transition.shape[0]:
                raise ValueError(
                    f"vocab_size={vocab_size} does not match the transition matrix of size {transition.shape[0]}"
                )
            self.transition = transition.clone()
        else:
            if vocab_size is None:
                raise ValueError("give vocab_size (to draw a transition matrix) or transition")
            vocab_size = check_int(vocab_size, "vocab_size", 2)
            rows = torch.full((vocab_size, vocab_size), self.transition_concentration, dtype=torch.float64)
            self.transition = dirichlet_sample(rows, self.generator)
        self.vocab_size = self.transition.shape[0]

    def arguments(self) -> dict:
        """The ``TASK_ARGUMENTS`` of this task: ``MTDTask(**task.arguments())`` is the same task (the same
        transition and sampling stream) when it was drawn from its seed; a task built from a given
        ``transition`` needs that matrix as well."""
        return {name: getattr(self, name) for name in TASK_ARGUMENTS}

    def __repr__(self) -> str:
        return f"MTDTask(vocab_size={self.vocab_size}, order={self.order}, alpha={self.alpha}, seed={self.seed})"

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator | None = None) -> MTDSample:
        """Draw ``batch_size`` sequences of length ``seq_len`` (> order), each with fresh ``lambda``.

        Both sizes are integral numbers: ``int``, numpy integers or 0-d integer tensors (not ``bool``
        or floats)."""
        batch_size = check_int(batch_size, "batch_size", 1)
        seq_len = check_int(seq_len, "seq_len", 1)
        if seq_len <= self.order:
            raise ValueError(f"seq_len must exceed the order: seq_len={seq_len} <= m={self.order}")
        if generator is None:
            generator = self.generator
        elif not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        m, q, n_gen = self.order, self.vocab_size, seq_len - self.order

        weights = dirichlet_sample(torch.full((batch_size, m), self.alpha, dtype=torch.float64), generator)

        # All randomness up front: the first m tokens, the lags, and one uniform per generated token.
        tokens = torch.empty(batch_size, seq_len, dtype=torch.int64)
        tokens[:, :m] = torch.randint(q, (batch_size, m), generator=generator)
        lag_uniforms = torch.rand(batch_size, n_gen, generator=generator, dtype=torch.float64)
        token_uniforms = torch.rand(batch_size, n_gen, generator=generator, dtype=torch.float64)

        # z_t ~ Cat(lambda) by inverse CDF: z = 1 + #{g : cumsum(lambda)_g <= u}.
        weight_cdf = weights.cumsum(dim=1)
        lags_generated = torch.searchsorted(weight_cdf, lag_uniforms, right=True).clamp_(max=m - 1) + 1
        lags = torch.zeros(batch_size, seq_len, dtype=torch.int64)
        lags[:, m:] = lags_generated

        # y_t ~ pi(y_{t - z_t}, .) by inverse CDF on the parent's cumulative row (a zero-probability
        # token has an empty CDF interval and is never chosen). Tokens are kept position-major
        # ([T, B]) during the loop so each step reads and writes contiguous rows.
        transition_cdf = self.transition.cumsum(dim=1)  # [q, q]
        tokens_by_pos = einops.rearrange(tokens, "b t -> t b").contiguous()
        parent_pos = torch.arange(m, seq_len).unsqueeze(0) - lags_generated  # [B, n_gen], 0-based
        parent_pos = einops.rearrange(parent_pos, "b n -> n b").contiguous()
        uniforms_by_pos = einops.rearrange(token_uniforms, "b n -> n b").contiguous()
        batch_index = torch.arange(batch_size)
        for step in range(n_gen):
            parent = tokens_by_pos[parent_pos[step], batch_index]  # [B]
            u = uniforms_by_pos[step].unsqueeze(1)  # [B, 1]
            # #{w : cdf(parent, w) <= u}, as searchsorted(right=True) would give; written as a
            # compare-and-count because searchsorted forks threads for every 200 rows, which for
            # a [B] step costs more than the search (and stalls on a busy machine).
            emitted = (transition_cdf.index_select(0, parent) <= u).sum(dim=1)
            tokens_by_pos[m + step] = emitted.clamp_(max=q - 1)
        tokens = einops.rearrange(tokens_by_pos, "t b -> b t").contiguous()

        # True predictive of y_{T+1}: the parent of lag g is y_{T+1-g}, i.e. tokens[:, -g].
        next_probs = einops.einsum(weights, self.transition[last_tokens(tokens, m)], "b g, b g v -> b v")
        return MTDSample(tokens=tokens, weights=weights, lags=lags, next_probs=next_probs)


def last_tokens(tokens: Int[Tensor, "batch seq"], order: int) -> Int[Tensor, "batch m"]:
    """The lagged rows the next token is read from: column ``g-1`` holds ``y_{T+1-g}``, ``[B, m]``.

    The MTD's next token has law ``sum_g lambda_g pi(y_{T+1-g}, .)`` (:attr:`MTDSample.next_probs`);
    ``mdlens.estimators.predictive`` and the behaviour probes read the same columns
    (``mdlens.estimators.last_tokens`` is this function). ``tokens`` is ``[B, T]`` with ``T >= m`` (unchecked:
    callers have validated it).
    """
    return tokens[:, tokens.shape[1] - order :].flip(1)


def prefix_last_tokens(tokens: Int[Tensor, "batch seq"], order: int) -> Int[Tensor, "batch n_scored m"]:
    """:func:`last_tokens` of every prefix ``y_1..y_t``, ``t = m+1..T``, at once: ``[B, T-m, m]``,
    row ``t - m - 1`` column ``g-1`` holds ``y_{t+1-g}`` (the rows a model predicting at every
    position reads). ``tokens`` is ``[B, T]`` with ``T > m`` (unchecked)."""
    positions = torch.arange(order, tokens.shape[1], device=tokens.device)  # 0-indexed t - 1, for t = m+1..T
    lags = torch.arange(1, order + 1, device=tokens.device)
    return tokens[:, positions[:, None] + 1 - lags[None, :]]  # y_{t+1-g} sits at 0-indexed (t - 1) + 1 - g
