"""Held-out evaluation, shared by training and the analyses: the batches, "tuned MD", the reference KLs.

"Tuned MD" means one thing everywhere in mdlens: the step size ``eta`` that
:func:`mdlens.estimators.tune_eta_refined` picks on a *tuning* batch, scored by mean
``KL(true predictive || MD's predictive)`` of ``y_{T+1}`` on a separate *evaluation* batch of fresh
sequences, so that the tuned method gets no in-sample advantage. Training's held-out references
(``kl_md1`` in ``train.json``) and the analyses (``mdlens reproduce trained``, the README's tables)
compute them with :func:`reference_kls`; they differ only in the sizes and seeds of the batches.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mdlens import estimators as E
from mdlens.predict import output_to_probs, output_type_of, predict_next
from mdlens.task import MTDSample, MTDTask

# Reference name -> MD steps, for the tuned multi-step MD references.
TUNED_MD = {"md1_tuned": 1, "md2_tuned": 2}


# ----------------------------------------------------------------------------------------------
# Shared results. ``mdlens reproduce all`` runs its analyses in one process, and several compute the
# same thing on the same batch: trained and step-sizes tune MD on the same batch at every length,
# trained and two-step score exact Bayes on the same evaluation batch. Each such result is computed
# once per process, keyed by the content of its inputs (so equal inputs give the stored result,
# whoever asks). Callers must not modify what these functions return in place.
# ----------------------------------------------------------------------------------------------

SHARED_ENTRIES = 256  # results kept; the least recently used beyond this are dropped
_shared_results: OrderedDict[tuple, object] = OrderedDict()
_Result = TypeVar("_Result")


def fingerprint(tensor: Tensor) -> tuple:
    """A key for a tensor's content: dtype, shape and a 128-bit hash of its bytes."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()
    return str(data.dtype), tuple(data.shape), digest


def shared(key: tuple, compute: Callable[[], _Result]) -> _Result:
    """``compute()``, or the result stored under ``key`` by an earlier call with the same key."""
    if key in _shared_results:
        _shared_results.move_to_end(key)
        return _shared_results[key]
    result = compute()
    _shared_results[key] = result
    while len(_shared_results) > SHARED_ENTRIES:
        _shared_results.popitem(last=False)
    return result


def clear_shared() -> None:
    """Forget every stored result (e.g. to time an analysis on its own)."""
    _shared_results.clear()


def _task_key(task: MTDTask) -> tuple:
    return fingerprint(task.transition), task.order, task.alpha


def seeded_sample(task: MTDTask, batch_size: int, seq_len: int, seed: int) -> MTDSample:
    """``task.sample(batch_size, seq_len)`` from a generator seeded with ``seed``; drawn once per process."""
    return shared(
        ("sample", _task_key(task), batch_size, seq_len, seed),
        lambda: task.sample(batch_size, seq_len, generator=torch.Generator().manual_seed(seed)),
    )


def tuned_md(
    tokens: Int[Tensor, "batch pos"],
    transition: Float[Tensor, "q q"],
    order: int,
    target_probs: Float[Tensor, "batch q"],
    steps: int = 1,
) -> dict:
    """:func:`mdlens.estimators.tune_eta_refined` (``{"eta", "tuning_kl", "etas", "mean_kl"}``),
    computed once per process for the same inputs."""
    key = ("tuned_md", fingerprint(tokens), fingerprint(transition), order, fingerprint(target_probs), steps)
    return dict(shared(key, lambda: E.tune_eta_refined(tokens, transition, order, target_probs, steps=steps)))


def exact_bayes_weights(
    tokens: Int[Tensor, "batch pos"], transition: Float[Tensor, "q q"], order: int, alpha: float = 1.0
) -> Float[Tensor, "batch m"]:
    """:func:`mdlens.estimators.bayes_weights` with ``method="exact"``, ``[B, m]``, computed once per
    process for the same inputs."""
    key = ("bayes_exact", fingerprint(tokens), fingerprint(transition), order, float(alpha))
    return shared(key, lambda: E.bayes_weights(tokens, transition, order, alpha=alpha, method="exact"))


def batch_seeds(seq_len: int) -> dict[str, int]:
    """Generator seeds of the analyses' tuning and evaluation batches at one length (disjoint by design)."""
    return {"tune": 1_000_000 + seq_len, "eval": 2_000_000 + seq_len, "gibbs": 3_000_000 + seq_len}


def sample_batches(task: MTDTask, seq_len: int, n_tune: int, n_eval: int) -> tuple[MTDSample, MTDSample]:
    """The analyses' tuning and evaluation batches at one length, each from its own seeded generator
    (:func:`seeded_sample`: drawn once per process, shared by the analyses that ask for the same sizes)."""
    seeds = batch_seeds(seq_len)
    return seeded_sample(task, n_tune, seq_len, seeds["tune"]), seeded_sample(task, n_eval, seq_len, seeds["eval"])


def mean_and_se(values: Float[Tensor, " n"]) -> dict[str, float]:
    """Mean and its standard error (sample std / sqrt(n)) of per-sequence values."""
    n = values.numel()
    se = values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": values.mean().item(), "se": se}


def tuned_eta(task: MTDTask, tune: MTDSample, steps: int = 1) -> float:
    """Tuned ``steps``-step MD's step size: the ``eta`` with the least mean KL on the tuning batch."""
    return tuned_md(tune.tokens, task.transition, task.order, tune.next_probs, steps)["eta"]


def reference_kls(
    task: MTDTask, tune: MTDSample, evaluation: MTDSample, md: dict[str, int] = TUNED_MD, bayes: bool = True
) -> tuple[dict[str, float], dict[str, Float[Tensor, " batch"]]]:
    """The reference estimators' per-sequence ``KL(p* || p)`` of ``y_{T+1}`` on ``evaluation``.

    References: ``uniform`` (``lambda = 1/m``), tuned MD for every ``name -> steps`` of ``md`` (step
    sizes from :func:`tuned_eta` on ``tune``) and, with ``bayes``, ``bayes_exact`` (the exact posterior
    mean under the task's Dirichlet prior). Returns ``(etas, kls)``: the tuned step size per MD name
    and the KLs per reference, each ``[batch]``.
    """
    pi, m = task.transition, task.order
    tokens, truth = evaluation.tokens, evaluation.next_probs
    if bayes:  # before any work, with the hint this function can take
        E.check_exact_bayes_size(tokens.shape[1], m, remedy="pass bayes=False")
    etas = {name: tuned_eta(task, tune, steps) for name, steps in md.items()}
    weights = {
        "uniform": torch.full((tokens.shape[0], m), 1.0 / m, dtype=torch.float64),
        **{name: E.md_weights(tokens, pi, m, etas[name], steps=steps) for name, steps in md.items()},
    }
    if bayes:
        weights["bayes_exact"] = exact_bayes_weights(tokens, pi, m, alpha=task.alpha)
    kls = {name: E.kl_divergence(truth, E.predictive(tokens, pi, w)) for name, w in weights.items()}
    return etas, kls


def effective_eta(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], transition: Float[Tensor, "q q"], order: int
) -> float:
    """The step size of the one-step MD closest to the model: the ``eta`` of
    :func:`mdlens.estimators.tune_eta_refined` with the model's own predictions of ``y_{T+1}`` as the
    target (least mean ``KL(model || MD)`` over ``tokens``). For the construction built with ``beta``
    it is ``beta / (m (T - m))`` (paper-notes §4), up to the grid's resolution."""
    return tuned_md(tokens, transition, order, predict_next(model, tokens), steps=1)["eta"]


@dataclass
class HeldOut:
    """One held-out batch and the references scored on it once (see :func:`make_held_out`)."""

    tokens: Int[Tensor, "batch pos"]
    truth: Float[Tensor, "batch q"]  # true predictive of y_{T+1}
    references: dict[str, float]


def make_held_out(task: MTDTask, seq_len: int, batch_size: int, seed: int, bayes: bool = True) -> HeldOut:
    """A held-out batch of ``batch_size`` sequences of length ``seq_len`` and its mean reference KLs.

    One generator seeded with ``seed`` draws the held-out batch, then a tuning batch of the same size
    for the step sizes (:func:`reference_kls`). ``references`` holds ``eta_md1`` / ``kl_md1`` and
    ``eta_md2`` / ``kl_md2`` (tuned one- and two-step MD), ``kl_uniform`` and, with ``bayes``,
    ``kl_bayes``.
    """
    generator = torch.Generator().manual_seed(seed)
    evaluation = task.sample(batch_size, seq_len, generator=generator)
    tune = task.sample(batch_size, seq_len, generator=generator)
    etas, kls = reference_kls(task, tune, evaluation, bayes=bayes)
    references = {}
    for name in TUNED_MD:
        short = name.removesuffix("_tuned")  # md1, md2
        references[f"eta_{short}"] = etas[name]
        references[f"kl_{short}"] = kls[name].mean().item()
    references["kl_uniform"] = kls["uniform"].mean().item()
    if bayes:
        references["kl_bayes"] = kls["bayes_exact"].mean().item()
    return HeldOut(evaluation.tokens, evaluation.next_probs, references)


def evaluate(model: HookedTransformer, held_out: HeldOut) -> float:
    """The model's mean ``KL(p* || p_model)`` of ``y_{T+1}`` on the held-out batch (in eval mode).

    ``inf`` when a ``"probs"`` model outputs a row with no positive entry (no distribution to score:
    e.g. a freshly initialised model, whose outputs are small numbers of either sign), so that an
    evaluation early in training reports an infinite KL instead of stopping the run.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            output = model(held_out.tokens.to(next(model.parameters()).device))[:, -1].cpu()
    finally:
        model.train(was_training)
    output_type = output_type_of(model)
    if output_type == "probs" and (output.clamp(min=0).sum(dim=-1) <= 0).any():
        return math.inf  # a row with nothing to renormalise: no distribution, infinite KL
    kl = E.kl_divergence(held_out.truth, output_to_probs(output, output_type)).mean().item()
    return kl
