"""Can a causal transformer run the *second* mirror-descent step, and in what form?

One-step MD needs, at the last position, only the mean responsibility under the uniform prior, a
quantity every position computes from its own lag window and uniform attention averages. The second
step needs the lag likelihoods at every position ``k`` weighed by the *final* first-step estimate
``lambda1`` (the one from all ``T`` tokens), which position ``k`` of a causal model cannot see. Two ways
round that are measured here, against the exact step, within small families of the form

    g0(k)      = mean_{j <= k} gamma_j                       (prefix-mean responsibility, uniform prior)
    lambda1    = softmax(a g0(T));  lambda1(k) = softmax(a g0(k))
    lambda2    = softmax(b g0(T) + c g1)                     (the weights of the prediction)

with the second-step term ``g1`` one of

- ``final-grad``:  ``mean_k P[k, g] / sum_h lambda1_h P[k, h]``, the log-likelihood gradient at the
  final estimate; with ``a = b = eta m (T - m)`` and ``c = eta (T - m)`` this *is* two-step MD (the
  tests check it against ``mdlens.estimators.md_weights``). Not formable as is.
- ``final-resp``:  ``mean_k`` of the responsibilities under ``lambda1`` (no division by ``lambda1``).
- ``online-grad`` / ``online-resp``: the same with ``lambda1(k)`` at row ``k``: each position runs
  step 2 on its own prefix estimate (a lag-window attention with ``log lambda1(k)`` added to its scores
  per offset), and a uniform layer averages.
- ``attend-final``: ``sum_k w_k gamma_k`` with ``w = softmax_k(-d <lambda1, gamma_k>)``: the *last*
  position attends over every earlier one with a score bilinear in its own ``lambda1`` and the key's
  responsibilities, the first-order form of weighing position ``k`` by ``1 / sum_h lambda1_h
  gamma_k,h`` (then ``sum_k w_k gamma_k`` is proportional to the gradient). One disentangled layer can
  compute exactly this, so layers 1-5 = responsibilities, mean, ``lambda1`` (by offset, into ``L3.rel``),
  this attention, the final lag weighting.

The scales ``(a, b, c, d)`` (``d`` used by ``attend-final`` only) are fitted per length by Adam on a
tuning batch (from tuned MD1, tuned MD2 and fixed starts; the best scales seen are kept) and scored by
mean KL to the truth on a fresh batch, next to tuned one- and two-step MD. What is learned from it:
the online variants keep almost none of step 2's gain on long sequences, ``attend-final`` keeps all of
it, so a 5-layer causal model is not limited to one-step MD by its architecture.

Run with ``mdlens reproduce two-step --out DIR``: writes ``two_step.json`` and ``two_step.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib.ticker
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.analyses import plotting
from mdlens.analyses.estimators import TASK, sample_batches

FULL = {"lengths": [8, 16, 32, 64, 128, 192], "n_tune": 256, "n_eval": 1024, "adam_steps": 150}
QUICK = {"lengths": [8, 24], "n_tune": 64, "n_eval": 64, "adam_steps": 40}
VARIANTS = ("final-grad", "final-resp", "online-grad", "online-resp", "attend-final")
# Starting scales (a, b, c, d) besides tuned MD1 and MD2: a large first step, and a balanced one.
STARTS = ((40.0, 15.0, 0.0, 0.0), (10.0, 10.0, 10.0, 5.0))
ADAM_LR = 0.3
VARIANT_STYLE = {
    "final-grad": {"color": "tab:orange", "marker": "s", "linestyle": "-"},
    "final-resp": {"color": "tab:olive", "marker": "D", "linestyle": "-"},
    "online-grad": {"color": "tab:red", "marker": "^", "linestyle": "--"},
    "online-resp": {"color": "tab:purple", "marker": "v", "linestyle": "--"},
    "attend-final": {"color": "tab:green", "marker": "*", "linestyle": "-", "linewidth": 2.2},
}


def two_step_weights(
    tokens: Int[Tensor, "batch T"],
    transition: Float[Tensor, "q q"],
    order: int,
    variant: str,
    a: Tensor | float,
    b: Tensor | float,
    c: Tensor | float,
    d: Tensor | float = 0.0,
) -> Float[Tensor, "batch m"]:
    """``lambda2`` of one variant (see the module docstring), ``[batch, m]``; differentiable in the scales."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    lag_probs = E.lag_likelihoods(tokens, transition, order)  # P[b, k, g], [batch, T-m, m]
    gamma = lag_probs / lag_probs.sum(dim=-1, keepdim=True)
    rows = torch.arange(1, lag_probs.shape[1] + 1, dtype=lag_probs.dtype)
    prefix_mean = gamma.cumsum(dim=1) / rows[None, :, None]  # g0(k)
    final_mean = prefix_mean[:, -1]  # g0(T), [batch, m]
    if variant == "attend-final":
        final_step = torch.softmax(a * final_mean, dim=-1)  # lambda1, [batch, m]
        key_weights = torch.softmax(-d * torch.einsum("bg,bkg->bk", final_step, gamma), dim=-1)
        second_term = torch.einsum("bk,bkg->bg", key_weights, gamma)
        return torch.softmax(b * final_mean + c * second_term, dim=-1)
    if variant.startswith("online"):
        first_step = torch.softmax(a * prefix_mean, dim=-1)  # lambda1(k) at row k
    else:
        first_step = torch.softmax(a * final_mean, dim=-1)[:, None, :]  # lambda1(T) at every row
    mixture = (first_step * lag_probs).sum(dim=-1, keepdim=True)
    if variant.endswith("grad"):
        second_term = (lag_probs / mixture).mean(dim=1)
    else:
        second_term = (first_step * lag_probs / mixture).mean(dim=1)
    return torch.softmax(b * final_mean + c * second_term, dim=-1)


def fit_scales(
    tokens: Tensor,
    transition: Tensor,
    order: int,
    target: Tensor,
    variant: str,
    starts: list[tuple[float, ...]],
    adam_steps: int,
) -> tuple[list[float], float]:
    """The ``(a, b, c, d)`` with the lowest mean KL seen along Adam runs from each start, and that KL."""
    best_scales, best_kl = None, float("inf")
    for start in starts:
        scales = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.Adam([scales], lr=ADAM_LR)
        for _ in range(adam_steps + 1):
            optimiser.zero_grad()
            weights = two_step_weights(tokens, transition, order, variant, *scales)
            loss = E.kl_divergence(target, E.predictive(tokens, transition, weights)).mean()
            if loss.item() < best_kl:  # the loss of the current scales, before this step moves them
                best_scales, best_kl = scales.detach().tolist(), loss.item()
            loss.backward()
            optimiser.step()
    return best_scales, best_kl


def evaluate_length(task: MTDTask, seq_len: int, sizes: dict) -> dict:
    """Tuned MD1 and MD2 and every fitted variant at one length: mean KL on a fresh batch."""
    pi, m = task.transition, task.order
    tune, evaluation = sample_batches(task, seq_len, sizes["n_tune"], sizes["n_eval"])

    def eval_kl(weights: Tensor) -> float:
        return E.kl_divergence(evaluation.next_probs, E.predictive(evaluation.tokens, pi, weights)).mean().item()

    row: dict = {"seq_len": seq_len, "kl": {}, "scales": {}, "eta": {}}
    for name, steps in (("md1_tuned", 1), ("md2_tuned", 2)):
        eta = E.tune_eta_refined(tune.tokens, pi, m, tune.next_probs, steps)["eta"]
        row["eta"][name] = eta
        row["kl"][name] = eval_kl(E.md_weights(evaluation.tokens, pi, m, eta, steps))
    # Tuned MD1 and MD2 as starts too (final-grad at the MD2 start is two-step MD exactly).
    context = seq_len - m
    eta1, eta2 = row["eta"]["md1_tuned"], row["eta"]["md2_tuned"]
    starts = [
        (eta1 * m * context, eta1 * m * context, 0.0, 0.0),
        (eta2 * m * context, eta2 * m * context, eta2 * context, 0.0),
        *STARTS,
    ]
    for variant in VARIANTS:
        scales, _ = fit_scales(tune.tokens, pi, m, tune.next_probs, variant, starts, sizes["adam_steps"])
        row["scales"][variant] = scales
        with torch.no_grad():
            row["kl"][variant] = eval_kl(two_step_weights(evaluation.tokens, pi, m, variant, *scales))
    row["ratio_to_md2"] = {name: kl / row["kl"]["md2_tuned"] for name, kl in row["kl"].items()}
    return row


def plot_ratios(results: list[dict], path: Path) -> Path:
    """Mean KL of each variant and of tuned MD1 over tuned MD2's, against T; writes the PNG."""
    lengths = [row["seq_len"] for row in results]
    with plotting.style():
        fig, (ax,) = plotting.new_figure(width=6.0)
        for name in ("md1_tuned", *VARIANTS):
            style = VARIANT_STYLE.get(name) or plotting.method_style(name)
            ax.plot(lengths, [row["ratio_to_md2"][name] for row in results], label=name, **style)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.axhline(1.1, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_xticks(lengths)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("mean KL / tuned 2-step MD")
        ax.set_title("Forms of MD step 2 against the exact one")
        plotting.legend_outside(ax)
        return plotting.save_figure(fig, path)


def run(out_dir: Path, quick: bool = False) -> dict:
    """Run the analysis; writes ``two_step.json`` and ``two_step.png`` to ``out_dir``."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if quick else FULL
    task = MTDTask(**TASK)
    results = [evaluate_length(task, seq_len, sizes) for seq_len in tqdm(sizes["lengths"], desc="lengths")]
    report = {
        "config": {"task": TASK, **sizes, "starts": STARTS, "adam_lr": ADAM_LR},
        "results": results,
        "wall_clock_s": time.perf_counter() - start,
    }
    json_path = out_dir / "two_step.json"
    json_path.write_text(json.dumps(report, indent=1))
    png_path = plot_ratios(results, out_dir / "two_step.png")
    for row in results:
        ratios = "  ".join(f"{name} {ratio:.3f}" for name, ratio in row["ratio_to_md2"].items())
        print(f"T={row['seq_len']:4d}  KL / tuned MD2:  {ratios}")
    report["files"] = [str(json_path), str(png_path)]
    return report
