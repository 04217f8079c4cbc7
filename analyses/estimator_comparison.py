"""How good is each estimator of the mixture weights, as the context grows? (paper §5, Theorem 2)

For a fixed MTD task and each sequence length ``T`` this measures the mean
``KL(true predictive || estimator's predictive)`` of ``y_{T+1}`` for:

- ``oracle``       the true lambda (KL = 0: the reference point),
- ``uniform``      lambda = 1/m,
- ``md1_tuned``    one-step mirror descent, eta grid-searched per length,
- ``md1_fixed``    one-step mirror descent with eta = 1/(m+1) (Theorem 1's step),
- ``md2_tuned``    two-step MD, eta grid-searched per length,
- ``md5_tuned``    five-step MD, eta grid-searched per length,
- ``mle``          MD iterated to convergence (the maximum-likelihood / EM fixed point),
- ``bayes_exact``  the posterior mean by dynamic programming over lag counts,
- ``bayes_gibbs``  the posterior mean by Rao-Blackwellised Gibbs sampling.

Step sizes are tuned on a separate *tuning* batch and every KL is measured on a fresh
*evaluation* batch, so the tuned methods get no in-sample advantage. Theorem 2 says stable steps
scale like ``1/T``: we fit ``log eta* = log c - p log T`` (expect ``p ~ 1``) and ``eta* = c/(T-m)``.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.analyses import TASK, AnalysisResult, plotting, progress, start_run
from mdlens.evaluation import batch_seeds, mean_and_se, sample_batches  # shared with the other analyses
from mdlens.step_size_laws import fit_step_sizes

FULL = {
    "lengths": [8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256],
    "n_tune": 256,
    "n_eval": 512,
    "gibbs_num_samples": 1000,
    "gibbs_burn_in": 200,
}
QUICK = {
    "lengths": [8, 16, 32],
    "n_tune": 32,
    "n_eval": 48,
    "gibbs_num_samples": 100,
    "gibbs_burn_in": 20,
}
# Coarse log-spaced eta grid, then a fine grid around the coarse optimum (one coarse step each side).
COARSE_ETAS, FINE_POINTS = E.COARSE_ETAS, E.FINE_POINTS  # the tuning grid, recorded in the JSON
TUNED_STEPS = {"md1_tuned": 1, "md2_tuned": 2, "md5_tuned": 5}

METHOD_LABELS = {
    "oracle": "oracle (true $\\lambda$)",
    "uniform": "uniform $\\lambda = 1/m$",
    "md1_tuned": "1-step MD, best $\\eta$",
    "md1_fixed": "1-step MD, $\\eta = 1/(m+1)$",
    "md2_tuned": "2-step MD, best $\\eta$",
    "md5_tuned": "5-step MD, best $\\eta$",
    "mle": "MD to convergence (MLE)",
    "bayes_exact": "Bayes, exact DP",
    "bayes_gibbs": "Bayes, Gibbs",
}


def fixed_eta_of(order: int) -> float:
    """Theorem 1's step ``1/(m+1)``: ``md1_fixed``'s."""
    return 1.0 / (order + 1)


def tune_steps(tune, pi: Tensor, m: int, seconds: dict[str, float]) -> tuple[dict[str, dict], dict[str, float]]:
    """Every tuned method's step size, on the tuning batch only, and each method's KL there (the fixed
    step's too); the time of each tuning goes into ``seconds``."""
    tuned: dict[str, dict] = {}
    for name, steps in TUNED_STEPS.items():
        start = time.perf_counter()
        tuned[name] = E.tune_eta_refined(tune.tokens, pi, m, tune.next_probs, steps)
        seconds[f"tune_{name}"] = time.perf_counter() - start
    fixed_on_tune = E.predictive(tune.tokens, pi, E.md_weights(tune.tokens, pi, m, fixed_eta_of(m)))
    tuning_kl = {name: t["tuning_kl"] for name, t in tuned.items()}
    tuning_kl["md1_fixed"] = E.kl_divergence(tune.next_probs, fixed_on_tune).mean().item()
    return tuned, tuning_kl


def evaluate_length(task: MTDTask, seq_len: int, sizes: dict) -> dict:
    """Every estimator at one length: tune on one batch, score mean KL on a fresh one."""
    pi, m = task.transition, task.order
    tune, evaluation = sample_batches(task, seq_len, sizes["n_tune"], sizes["n_eval"])
    tokens, target = evaluation.tokens, evaluation.next_probs
    seconds: dict[str, float] = {}

    tuned, tuning_kl = tune_steps(tune, pi, m, seconds)
    fixed_eta = fixed_eta_of(m)

    not_converged: list[int] = []  # MLE sequences whose EM stopped at max_iter (reported, see below)
    gibbs_generator = torch.Generator().manual_seed(batch_seeds(seq_len)["gibbs"])
    weight_fns = {
        "oracle": lambda: evaluation.weights,
        "uniform": lambda: torch.full((tokens.shape[0], m), 1.0 / m, dtype=torch.float64),
        **{
            name: (lambda s=TUNED_STEPS[name], e=tuned[name]["eta"]: E.md_weights(tokens, pi, m, e, steps=s))
            for name in TUNED_STEPS
        },
        "md1_fixed": lambda: E.md_weights(tokens, pi, m, fixed_eta),
        "mle": lambda: mle_with_count(tokens, pi, m, not_converged),
        "bayes_exact": lambda: E.bayes_weights(tokens, pi, m, alpha=task.alpha, method="exact"),
        "bayes_gibbs": lambda: E.bayes_weights(
            tokens,
            pi,
            m,
            alpha=task.alpha,
            method="gibbs",
            num_samples=sizes["gibbs_num_samples"],
            burn_in=sizes["gibbs_burn_in"],
            generator=gibbs_generator,
        ),
    }
    kl: dict[str, dict[str, float]] = {}
    for name in METHOD_LABELS:
        start = time.perf_counter()
        weights = weight_fns[name]()
        seconds[name] = time.perf_counter() - start
        kl[name] = mean_and_se(E.kl_divergence(target, E.predictive(tokens, pi, weights)))

    etas = {name: t["eta"] for name, t in tuned.items()}
    etas["md1_fixed"] = fixed_eta
    return {
        "seq_len": seq_len,
        "kl": kl,
        "eta": etas,
        # The step a transformer's layer-3 scale would need: eta = beta / (m (T - m)).
        "beta": {name: E.beta_from_eta(eta, m, seq_len) for name, eta in etas.items()},
        "tuning_kl": tuning_kl,
        "kl_ratio_to_bayes": {name: kl[name]["mean"] / kl["bayes_exact"]["mean"] for name in kl},
        "md1_tuning_curve": {
            "etas": tuned["md1_tuned"]["etas"].tolist(),
            "mean_kl": tuned["md1_tuned"]["mean_kl"].tolist(),
        },
        "seconds": seconds,
        "mle_not_converged": sum(not_converged),
    }


def mle_with_count(tokens: Tensor, transition: Tensor, order: int, not_converged: list[int]) -> Tensor:
    """``E.mle_weights``, with its "did not converge" warning turned into a count for the report.

    On short contexts the maximiser often lies on a face of the simplex, where EM converges
    sublinearly; the weights it returns after ``max_iter`` are then within ~1e-4 of the face.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights = E.mle_weights(tokens, transition, order)
    for warning in caught:
        match = re.search(r"for (\d+) sequence", str(warning.message))
        if match is None:  # not the convergence warning: pass it on
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        else:
            not_converged.append(int(match.group(1)))
    return weights


def plot_kl(results: list[dict], path: Path) -> Path:
    lengths = [r["seq_len"] for r in results]
    with plotting.style():
        fig, (ax,) = plotting.new_figure(width=8.5, height=4.5)
        for name, label in METHOD_LABELS.items():
            if name == "oracle":
                continue  # KL = 0 exactly: nothing to draw on a log axis
            means = [r["kl"][name]["mean"] for r in results]
            errors = [r["kl"][name]["se"] for r in results]
            style = plotting.method_style(name)
            ax.errorbar(lengths, means, yerr=errors, label=label, capsize=2, markersize=4, **style)
        plotting.log_log(
            ax,
            "sequence length $T$",
            "mean KL(true || estimate) of $y_{T+1}$",
            "Estimators of $\\lambda$ vs context length (oracle: KL = 0, not drawn)",
            xticks=lengths,
        )
        plotting.legend_outside(ax)
        return plotting.save_figure(fig, path)


def plot_eta(results: list[dict], fit: dict, order: int, path: Path) -> Path:
    lengths = np.asarray([r["seq_len"] for r in results], dtype=np.float64)
    grid = np.geomspace(lengths.min(), lengths.max(), 100)
    with plotting.style():
        fig, (ax,) = plotting.new_figure(width=8.0, height=4.3)
        for name, steps in TUNED_STEPS.items():
            ax.plot(
                lengths,
                [r["eta"][name] for r in results],
                label=f"tuned, {steps}-step MD",
                **plotting.method_style(name),
            )
        power, context = fit["power_law"], fit["inverse_context"]
        ax.plot(
            grid,
            power["c"] * grid ** (-power["p"]),
            color="black",
            linewidth=1,
            label=f"fit 1-step: ${power['c']:.3g}\\,T^{{-{power['p']:.2f}}}$",
        )
        ax.plot(
            grid,
            context["c"] / (grid - order),
            color="black",
            linewidth=1,
            linestyle="--",
            label=f"fit 1-step: ${context['c']:.3g}/(T-m)$",
        )
        ax.axhline(1.0 / (order + 1), color="tab:cyan", linestyle=":", label="$1/(m+1)$")
        plotting.log_log(
            ax,
            "sequence length $T$",
            "tuned step size $\\eta^*$",
            "Tuned MD step vs length (Theorem 2: $\\eta = \\Theta(1/T)$)",
            xticks=[int(t) for t in lengths],
        )
        plotting.legend_outside(ax)
        return plotting.save_figure(fig, path)


def plot_ratio(results: list[dict], path: Path) -> Path:
    lengths = [r["seq_len"] for r in results]
    with plotting.style():
        fig, (ax,) = plotting.new_figure(width=8.5, height=4.3)
        for name, label in METHOD_LABELS.items():
            if name in ("oracle", "bayes_exact"):
                continue
            ax.plot(
                lengths, [r["kl_ratio_to_bayes"][name] for r in results], label=label, **plotting.method_style(name)
            )
        ax.axhline(1.0, color="tab:green", linewidth=1)
        plotting.log_log(
            ax,
            "sequence length $T$",
            "mean KL / mean KL of exact Bayes",
            "KL relative to the Bayes-optimal estimate (1 = Bayes)",
            xticks=lengths,
        )
        plotting.legend_outside(ax)
        return plotting.save_figure(fig, path)


def summary_lines(report: dict) -> list[str]:
    """A short text table: KL per length for the main methods, and the step-size fit."""
    shown = ["uniform", "md1_fixed", "md1_tuned", "md2_tuned", "md5_tuned", "mle", "bayes_exact", "bayes_gibbs"]
    lines = [
        "mean KL(true || estimate), evaluation batch (eta tuned on a separate batch):",
        "    T  " + " ".join(f"{name:>11}" for name in shown) + "   eta*_1step",
    ]
    for r in report["results"]:
        row = " ".join(f"{r['kl'][name]['mean']:11.3e}" for name in shown)
        lines.append(f"{r['seq_len']:5d}  {row}   {r['eta']['md1_tuned']:.4g}")
    fit = report["eta_fit"]["md1_tuned"]
    lines.append(
        f"1-step eta* fit: {fit['power_law']['c']:.3g} * T^-{fit['power_law']['p']:.3f} "
        f"(R^2 {fit['power_law']['r2']:.3f}); {fit['inverse_context']['c']:.3g}/(T-m) "
        f"(rms log residual {fit['inverse_context']['rms_log_residual']:.3f})"
    )
    lines.append(f"total time {report['timings']['total_seconds']:.1f} s")
    return lines


def run(out_dir: Path, quick: bool = False) -> AnalysisResult:
    """Run the analysis, write ``estimators.json`` and three PNGs to ``out_dir``, print a summary."""
    run_start = start_run(out_dir, quick, FULL, QUICK)
    out_dir, sizes = run_start.out_dir, run_start.sizes
    task = MTDTask(**TASK)
    torch.manual_seed(0)  # nothing should draw from the global RNG; this pins it if something does

    results = [evaluate_length(task, seq_len, sizes) for seq_len in progress(sizes["lengths"], "estimators")]
    eta_fit = {
        name: fit_step_sizes(sizes["lengths"], [r["eta"][name] for r in results], task.order) for name in TUNED_STEPS
    }
    report = {
        "config": {
            "task": TASK,
            "quick": quick,
            **sizes,
            "coarse_eta_grid": {
                "low": COARSE_ETAS[0],
                "high": COARSE_ETAS[1],
                "points": COARSE_ETAS[2],
                "plus": "1/(m+1)",
            },
            "fine_eta_points": FINE_POINTS,
            "batch_seeds": {str(t): batch_seeds(t) for t in sizes["lengths"]},
            "protocol": (
                "Step sizes are grid-searched on a tuning batch of n_tune sequences and every KL is "
                "measured on a separate, fresh evaluation batch of n_eval sequences (different seeds). "
                "KL is KL(true predictive of y_{T+1} || the estimator's predictive), averaged over "
                "the evaluation batch; 'se' is its standard error."
            ),
        },
        "transition": task.transition.tolist(),
        "methods": METHOD_LABELS,
        "results": results,
        "eta_fit": eta_fit,
        "timings": {},
    }
    files = [
        plot_kl(results, out_dir / "kl_vs_length.png"),
        plot_eta(results, eta_fit["md1_tuned"], task.order, out_dir / "eta_vs_length.png"),
        plot_ratio(results, out_dir / "kl_ratio_to_bayes.png"),
    ]
    json_path = out_dir / "estimators.json"
    report["timings"] = {
        "total_seconds": run_start.seconds(),
        "per_method_seconds": {name: sum(r["seconds"][name] for r in results) for name in results[0]["seconds"]},
    }
    report["files"] = [str(json_path), *map(str, files)]
    report["summary"] = summary_lines(report)
    json_path.write_text(json.dumps(report, indent=1))
    print("\n".join(report["summary"]))
    return AnalysisResult(report, report["files"])
