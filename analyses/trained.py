"""Do trained transformers reach mirror descent? KL to the truth vs sequence length (paper §5).

For the shipped models (``mdlens.list_pretrained()``: ``disentangled-3l``, ``disentangled-3l-long``,
``disentangled-5l``, ``standard-3l``) and, on the same sequences, the reference estimators of ``mdlens.evaluation``:

- ``uniform``      lambda = 1/m,
- ``md1_tuned``    one-step mirror descent, eta grid-searched per length on a separate tuning batch,
- ``md2_tuned``    two-step MD, tuned the same way,
- ``bayes_exact``  the posterior mean (dynamic programming over lag counts).

The paper's claims to check: a trained 3-layer disentangled model tracks tuned one-step MD (close to
Bayes on short sequences, drifting with MD on long ones), and a 5-layer model tracks two-step MD.
The criteria: ``disentangled-3l`` and ``disentangled-3l-long`` within 10% of tuned one-step MD's KL, ``disentangled-5l``
within 10% of tuned two-step MD's KL (or better), at the context length and at shorter lengths.

A model that outputs probabilities (the disentangled ones, trained with MSE) can put zero mass on a
token after clipping (``mdlens.predict_next``); its KL is then infinite for that sequence. Such
sequences are counted (``n_infinite``) and the mean is reported as ``null``, with the mean over the
finite ones next to it: nothing is hidden by the averaging.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.analyses import AnalysisResult, plotting, progress, start_run
from mdlens.evaluation import batch_seeds, mean_and_se, reference_kls, sample_batches
from mdlens.predict import model_next_probs
from mdlens.pretrained import load_all_pretrained

# n_eval: the criteria compare mean KLs within 10%, and per-sequence KL is heavy-tailed: with 512
# sequences the model/MD ratio has a standard error of about 2% at T=192, with 4096 about 0.7-1.8%
# (paired: the model and the references are scored on the same sequences).
FULL = {"lengths": [8, 16, 32, 64, 128, 192], "n_tune": 1024, "n_eval": 4096}
QUICK = {"lengths": [8, 16, 32], "n_tune": 32, "n_eval": 48}
MODEL_CHUNK = 512  # sequences per model forward (memory: one [chunk, T, T] pattern per layer)
TUNED_STEPS = {"md1_tuned": 1, "md2_tuned": 2}
REFERENCES = {
    "uniform": "uniform $\\lambda = 1/m$",
    "md1_tuned": "1-step MD, best $\\eta$",
    "md2_tuned": "2-step MD, best $\\eta$",
    "bayes_exact": "Bayes, exact DP",
}
MODEL_STYLE = {
    "disentangled-3l": {"color": "tab:purple", "marker": "o", "linestyle": "-", "linewidth": 2.2},
    "disentangled-3l-long": {"color": "tab:blue", "marker": "D", "linestyle": "-", "linewidth": 2.2},
    "disentangled-5l": {"color": "tab:pink", "marker": "s", "linestyle": "-", "linewidth": 2.2},
    "standard-3l": {"color": "black", "marker": "^", "linestyle": "-.", "linewidth": 1.6},
}
# The criteria: model -> (reference it must match, allowed ratio of mean KLs).
CRITERIA = {
    "disentangled-3l": ("md1_tuned", 1.10),
    "disentangled-3l-long": ("md1_tuned", 1.10),
    "disentangled-5l": ("md2_tuned", 1.10),
}


def kl_summary(values: torch.Tensor) -> dict:
    """Mean KL and standard error; infinite values are counted and the mean is then ``None``."""
    finite = torch.isfinite(values)
    n_inf = int((~finite).sum())
    summary = mean_and_se(values[finite]) if finite.any() else {"mean": None, "se": None}
    return {
        "mean": summary["mean"] if n_inf == 0 else None,
        "se": summary["se"] if n_inf == 0 else None,
        "finite_mean": summary["mean"],
        "n_infinite": n_inf,
    }


def paired_ratio(model_kl: torch.Tensor, reference_kl: torch.Tensor) -> dict:
    """``mean(model) / mean(reference)`` on the same sequences, with its delta-method standard error
    ``std(model - ratio * reference) / (sqrt(n) mean(reference))``.

    A model KL can be infinite (a clipped probability output put zero mass on a possible token): the
    ratio is then ``None``, and ``finite_ratio`` / ``finite_se`` are taken over the other sequences,
    with ``n_infinite`` counting the ones left out.
    """
    finite = torch.isfinite(model_kl)
    kept_model, kept_reference = model_kl[finite], reference_kl[finite]
    ratio = kept_model.mean() / kept_reference.mean()
    residual = kept_model - ratio * kept_reference
    se = residual.std(unbiased=True) / (residual.numel() ** 0.5 * kept_reference.mean())
    n_infinite = int((~finite).sum())
    return {
        "ratio": ratio.item() if n_infinite == 0 else None,
        "se": se.item() if n_infinite == 0 else None,
        "finite_ratio": ratio.item(),
        "finite_se": se.item(),
        "n_infinite": n_infinite,
    }


def evaluate_length(models: dict, task: MTDTask, seq_len: int, sizes: dict) -> dict:
    """References (steps tuned on one batch) and models, all scored on a fresh evaluation batch; each
    model's paired KL ratio to the tuned MDs."""
    tune, evaluation = sample_batches(task, seq_len, sizes["n_tune"], sizes["n_eval"])
    tokens, truth = evaluation.tokens, evaluation.next_probs
    etas, per_sequence = reference_kls(task, tune, evaluation, TUNED_STEPS)
    kl = {name: kl_summary(values) for name, values in per_sequence.items()}
    ratios = {}
    for name, model in models.items():
        if seq_len > model.cfg.n_ctx:
            kl[name] = None  # beyond the model's context
            continue
        model_kl = E.kl_divergence(truth, model_next_probs(model, tokens, MODEL_CHUNK))
        kl[name] = kl_summary(model_kl)
        ratios[name] = {reference: paired_ratio(model_kl, per_sequence[reference]) for reference in TUNED_STEPS}
    return {"seq_len": seq_len, "kl": kl, "ratio_to": ratios, "eta": etas}


def check_criteria(results: list[dict]) -> dict:
    """Per model and length: the paired ratio of its mean KL to its reference's (with its standard
    error), and whether the ratio is <= the bound."""
    checks = {}
    for name, (reference, bound) in CRITERIA.items():
        rows = []
        for r in results:
            if r["kl"].get(name) is None:
                continue
            ratio = r["ratio_to"][name][reference]
            rows.append(
                {"seq_len": r["seq_len"], **ratio, "ok": ratio["ratio"] is not None and ratio["ratio"] <= bound}
            )
        if rows:
            checks[name] = {
                "reference": reference,
                "bound": bound,
                "per_length": rows,
                "all_ok": all(row["ok"] for row in rows),
            }
    return checks


def model_label(results: list[dict], name: str) -> str:
    """Legend label of a trained model; names the lengths its curve skips because some KL was inf."""
    infinite = [
        f"T={r['seq_len']} ({r['kl'][name]['n_infinite']} seq)"
        for r in results
        if r["kl"].get(name) and r["kl"][name]["mean"] is None
    ]
    return f"trained {name}" + (f"\nKL = inf, not drawn: {', '.join(infinite)}" if infinite else "")


def plot_kl(results: list[dict], model_names: list[str], path: Path) -> Path:
    lengths = [r["seq_len"] for r in results]
    with plotting.style():
        fig, (ax,) = plotting.new_figure(width=8.5, height=4.5)
        for name, label in REFERENCES.items():
            means = [r["kl"][name]["mean"] for r in results]
            ax.plot(lengths, means, label=label, markersize=4, **plotting.method_style(name))
        for name in model_names:
            # Draw only finite means; a length where some sequence got KL = inf is left out (see JSON).
            points = [
                (r["seq_len"], r["kl"][name]["mean"])
                for r in results
                if r["kl"].get(name) and r["kl"][name]["mean"] is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(
                    xs,
                    ys,
                    label=model_label(results, name),
                    markersize=5,
                    **MODEL_STYLE.get(name, {"marker": "o", "linestyle": "-"}),
                )
        plotting.log_log(
            ax,
            "sequence length $T$",
            "mean KL(true || prediction) of $y_{T+1}$",
            "Trained transformers vs mirror descent and Bayes",
            xticks=lengths,
        )
        plotting.legend_outside(ax)
        return plotting.save_figure(fig, path)


def plot_ratio(results: list[dict], model_names: list[str], path: Path) -> Path:
    lengths = [r["seq_len"] for r in results]
    with plotting.style():
        fig, (ax,) = plotting.new_figure(width=8.5, height=4.3)
        for name in ["md2_tuned", "bayes_exact", *model_names]:
            points = [
                (r["seq_len"], r["kl"][name]["mean"] / r["kl"]["md1_tuned"]["mean"])
                for r in results
                if r["kl"].get(name) and r["kl"][name]["mean"] is not None
            ]
            if not points:
                continue
            style = MODEL_STYLE.get(name) or plotting.method_style(name)
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=REFERENCES.get(name) or model_label(results, name), **style)
        ax.axhline(1.0, color="tab:blue", linewidth=1, label="1-step MD, best $\\eta$ (= 1)")
        ax.axhline(1.1, color="tab:blue", linewidth=0.8, linestyle=":", label="+10%")
        plotting.log_log(
            ax,
            "sequence length $T$",
            "mean KL / mean KL of tuned 1-step MD",
            "KL relative to tuned one-step MD",
            xticks=lengths,
        )
        plotting.legend_outside(ax)
        return plotting.save_figure(fig, path)


def summary_lines(report: dict) -> list[str]:
    names = [*REFERENCES, *report["models"]]

    def cell(entry):
        if entry is None:
            return f"{'-':>15}"
        if entry["mean"] is None:
            return f"{'inf (' + str(entry['n_infinite']) + ')':>15}"
        return f"{entry['mean']:15.4e}"

    lines = [
        "mean KL(true || prediction), fresh evaluation batch (MD steps tuned on a separate batch):",
        "    T  " + " ".join(f"{name:>15}" for name in names),
    ]
    for r in report["results"]:
        lines.append(f"{r['seq_len']:5d}  " + " ".join(cell(r["kl"].get(name)) for name in names))
    for name, check in report["criteria"].items():
        ratios = ", ".join(
            f"T={row['seq_len']}: {row['ratio']:.3f}±{row['se']:.3f}"
            if row["ratio"] is not None
            else f"T={row['seq_len']}: inf ({row['n_infinite']} seq; others "
            f"{row['finite_ratio']:.3f}±{row['finite_se']:.3f})"
            for row in check["per_length"]
        )
        lines.append(
            f"{name} / {check['reference']} (bound {check['bound']}): {ratios} -> "
            f"{'OK' if check['all_ok'] else 'NOT MET'}"
        )
    lines.append(f"total time {report['timings']['total_seconds']:.1f} s")
    return lines


def run(out_dir: Path, quick: bool = False, root: str | Path | None = None) -> AnalysisResult:
    """Run the analysis, write ``trained.json`` and two PNGs to ``out_dir``, print a summary.

    ``root``: where the pretrained models live (default: the ones shipped in ``mdlens/pretrained``).
    """
    run_start = start_run(out_dir, quick, FULL, QUICK)
    out_dir, sizes = run_start.out_dir, run_start.sizes
    models, task = load_all_pretrained(root)
    torch.manual_seed(0)  # nothing should draw from the global RNG; this pins it if something does

    results = [evaluate_length(models, task, seq_len, sizes) for seq_len in progress(sizes["lengths"], "trained")]
    names = list(models)
    report = {
        "config": {
            "task": {"vocab_size": task.vocab_size, "order": task.order, "alpha": task.alpha, "seed": task.seed},
            "quick": quick,
            **sizes,
            "batch_seeds": {str(t): batch_seeds(t) for t in sizes["lengths"]},
            "protocol": (
                "MD step sizes are grid-searched on a tuning batch of n_tune sequences; every KL is measured "
                "on a separate evaluation batch of n_eval sequences. "
                "KL(true predictive of y_{T+1} || prediction), averaged over the evaluation batch; "
                "ratio_to: a model's mean KL over a tuned MD's on the same sequences, with the delta-method "
                "standard error; the criteria use these ratios. "
                "models are read with mdlens.predict_next. mean = null when some sequence has KL = inf "
                "(a clipped probability output put zero mass on a possible token); n_infinite counts them."
            ),
        },
        "models": {
            name: {
                "n_layers": model.cfg.n_layers,
                "n_ctx": model.cfg.n_ctx,
                "kind": getattr(model, "mdlens_kind", None),
            }
            for name, model in models.items()
        },
        "references": REFERENCES,
        "results": results,
        "criteria": check_criteria(results),
        "timings": {},
    }
    files = [
        plot_kl(results, names, out_dir / "trained_kl_vs_length.png"),
        plot_ratio(results, names, out_dir / "trained_kl_ratio_to_md1.png"),
    ]
    json_path = out_dir / "trained.json"
    report["timings"] = {"total_seconds": run_start.seconds()}
    report["files"] = [str(json_path), *map(str, files)]
    report["summary"] = summary_lines(report)
    json_path.write_text(json.dumps(report, indent=1))
    print("\n".join(report["summary"]))
    return AnalysisResult(report, report["files"])
