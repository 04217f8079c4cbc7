"""Which step sizes do the trained models run, and do they follow Theorem 2's ``1/T`` law?

Theorem 2 (paper-notes §3) says the best step of one-step MD shrinks like ``1/T``; the construction
bakes in one fixed ``beta`` and so the schedule ``eta_t = beta / (m (t - m))`` (paper-notes §4).
For every shipped model and every length ``T``, on the analyses' tuning batch of that length
(:func:`mdlens.evaluation.sample_batches`), this reads off:

- ``tuned_eta``: tuned one-step MD's step (:func:`mdlens.estimators.tune_eta_refined` against the
  true predictive: the analyses' "tuned MD");
- ``effective_eta``: the one-step-MD step closest to the *model's* predictions
  (:func:`mdlens.evaluation.effective_eta`), with ``fit_kl`` = mean ``KL(model || that MD)``: how well
  one-step MD describes the model at all (next to ``model_kl``, the model's KL to the truth);
- ``two_step``: the schedule ``(eta_1, eta_2)`` of two-step MD with its own step per step
  (:func:`mdlens.estimators.fit_md_step_sizes`), fitted to the truth (``tuned``) and to each model;
  for the 5-layer model these are its effective first- and second-step sizes;
- ``construction_eta``: the schedule of a construction that runs one fixed ``beta``, the 3-layer
  model's own at the longest length (``beta = eta_eff(T_max) m (T_max - m)``): what a model that
  really averages responsibilities with one ``beta`` would do at the shorter lengths.

Each series gets a power-law fit ``eta ~ c T^-p`` (``fits``): Theorem 2's law is ``p = 1``.
Writes ``step_sizes.json`` and ``step_sizes.png``; ``mdlens reproduce step-sizes --out DIR``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.analyses import AnalysisResult, plotting, progress, start_run
from mdlens.evaluation import sample_batches, tuned_md
from mdlens.predict import model_next_probs
from mdlens.pretrained import load_all_pretrained
from mdlens.step_size_laws import fit_step_sizes

FULL = {"lengths": [8, 16, 32, 64, 128, 192], "n_tune": 1024}
QUICK = {"lengths": [8, 16, 32], "n_tune": 32}
# The model whose longest-length step defines the fixed-beta construction schedule.
FIXED_BETA_MODEL = "disentangled-3l"
STYLE = {
    "tuned": {"color": "black", "marker": "o", "linestyle": "-", "linewidth": 2.0},
    "disentangled-3l": {"color": "tab:purple", "marker": "o", "linestyle": "-"},
    "disentangled-3l-long": {"color": "tab:blue", "marker": "D", "linestyle": "-"},
    "disentangled-5l": {"color": "tab:pink", "marker": "s", "linestyle": "-"},
    "standard-3l": {"color": "tab:gray", "marker": "^", "linestyle": "-."},
    "construction": {"color": "tab:purple", "marker": "", "linestyle": ":"},
}


def measure_length(models: dict, task: MTDTask, seq_len: int, n_tune: int) -> dict:
    """Tuned and effective step sizes at one length (module docstring), on the tuning batch."""
    pi, m = task.transition, task.order
    tune, _ = sample_batches(task, seq_len, n_tune, 1)
    tokens, truth = tune.tokens, tune.next_probs
    row = {
        "seq_len": seq_len,
        "tuned_eta": tuned_md(tokens, pi, m, truth, steps=1)["eta"],  # trained's tuned MD1 at this length
        "tuned_two_step": E.fit_md_step_sizes(tokens, pi, m, truth, steps=2),
        "models": {},
    }
    for name, model in models.items():
        if seq_len > model.cfg.n_ctx:
            continue
        predictions = model_next_probs(model, tokens)
        one_step = tuned_md(tokens, pi, m, predictions, steps=1)  # evaluation.effective_eta's fit
        model_kl = E.kl_divergence(truth, predictions)
        finite = torch.isfinite(model_kl)
        row["models"][name] = {
            "effective_eta": one_step["eta"],
            "fit_kl": one_step["tuning_kl"],
            "two_step": E.fit_md_step_sizes(tokens, pi, m, predictions, steps=2),
            "model_kl": model_kl[finite].mean().item(),
            "n_infinite_kl": int((~finite).sum()),
        }
    return row


def fit_laws(rows: list[dict], order: int) -> dict:
    """Power-law fits ``eta ~ c T^-p`` of every step-size series over the lengths (Theorem 2: p = 1)."""

    def law(points: list[tuple[int, float]]) -> dict | None:
        if len(points) < 2:
            return None
        lengths, etas = zip(*points, strict=True)
        return fit_step_sizes(list(lengths), list(etas), order)["power_law"]

    fits = {
        "tuned_eta": law([(r["seq_len"], r["tuned_eta"]) for r in rows]),
        "tuned_eta_1": law([(r["seq_len"], r["tuned_two_step"]["etas"][0]) for r in rows]),
        "tuned_eta_2": law([(r["seq_len"], r["tuned_two_step"]["etas"][1]) for r in rows]),
    }
    names = dict.fromkeys(name for r in rows for name in r["models"])
    for name in names:
        entries = [(r["seq_len"], r["models"][name]) for r in rows if name in r["models"]]
        fits[name] = {
            "effective_eta": law([(t, e["effective_eta"]) for t, e in entries]),
            "eta_1": law([(t, e["two_step"]["etas"][0]) for t, e in entries]),
            "eta_2": law([(t, e["two_step"]["etas"][1]) for t, e in entries]),
        }
    return fits


def construction_schedule(rows: list[dict], order: int) -> dict | None:
    """The fixed-``beta`` schedule ``beta / (m (T - m))`` with ``FIXED_BETA_MODEL``'s longest-length beta."""
    entries = [(r["seq_len"], r["models"][FIXED_BETA_MODEL]) for r in rows if FIXED_BETA_MODEL in r["models"]]
    if not entries:
        return None
    longest, entry = entries[-1]
    beta = E.beta_from_eta(entry["effective_eta"], order, longest)
    return {
        "model": FIXED_BETA_MODEL,
        "beta": beta,
        "from_seq_len": longest,
        "eta": {str(r["seq_len"]): E.eta_from_beta(beta, order, r["seq_len"]) for r in rows},
    }


def two_step_models(report: dict) -> list[str]:
    """The disentangled models deep enough for two MD steps (5 layers or more): whose (eta_1, eta_2) to show."""
    return [name for name, layers in report["layers"].items() if layers >= 5 and name.startswith("disentangled")]


def plot(report: dict, path: Path) -> Path:
    """Left: one-step steps vs T (tuned, each model's, the fixed-beta construction). Right: the
    two-step schedule (eta_1, eta_2) tuned and read off each disentangled model of 5 layers or more."""
    rows = report["results"]
    lengths = [r["seq_len"] for r in rows]
    with plotting.style():
        fig, (left, right) = plotting.new_figure(ncols=2, width=6.0, height=4.2)
        left.plot(lengths, [r["tuned_eta"] for r in rows], label="tuned one-step MD", **STYLE["tuned"])
        for name in report["models"]:
            points = [(r["seq_len"], r["models"][name]["effective_eta"]) for r in rows if name in r["models"]]
            left.plot(*zip(*points, strict=True), label=f"{name} (effective)", **STYLE.get(name, {}))
        schedule = report["construction"]
        if schedule is not None:
            left.plot(
                lengths,
                [schedule["eta"][str(t)] for t in lengths],
                label=f"construction, fixed beta = {schedule['beta']:.2f} ({schedule['model']} at T={schedule['from_seq_len']})",
                **STYLE["construction"],
            )
        plotting.log_log(left, "sequence length T", "step size eta", "one-step MD: tuned vs read off the models")
        for step, marker in ((0, "o"), (1, "s")):
            right.plot(
                lengths,
                [r["tuned_two_step"]["etas"][step] for r in rows],
                label=f"tuned eta_{step + 1}",
                color="black",
                marker=marker,
                linestyle="-" if step == 0 else "--",
            )
            for name in two_step_models(report):
                points = [
                    (r["seq_len"], r["models"][name]["two_step"]["etas"][step]) for r in rows if name in r["models"]
                ]
                right.plot(
                    *zip(*points, strict=True),
                    label=f"{name} eta_{step + 1}",
                    color=STYLE[name]["color"],
                    marker=marker,
                    linestyle="-" if step == 0 else "--",
                )
        plotting.log_log(right, "sequence length T", "step size", "two-step MD: (eta_1, eta_2)")
        left.legend(fontsize=7)
        plotting.legend_outside(right)
        return plotting.save_figure(fig, path)


def summary_lines(report: dict) -> list[str]:
    fits, lines = report["fits"], []
    lines.append(f"tuned one-step eta ~ T^-p, p = {fits['tuned_eta']['p']:.2f}")
    for name in report["models"]:
        law = fits[name]
        lines.append(
            f"{name}: p of the effective eta {law['effective_eta']['p']:.2f}; of the two-step eta_1 "
            f"{law['eta_1']['p']:.2f}, eta_2 {law['eta_2']['p']:.2f}"
        )
    return lines


def run(out_dir: Path, quick: bool = False, root: str | Path | None = None) -> AnalysisResult:
    """Measure every shipped model (from ``root``, default the package's) at every length; write the files."""
    run_start = start_run(out_dir, quick, FULL, QUICK)
    out_dir, sizes = run_start.out_dir, run_start.sizes
    models, task = load_all_pretrained(root)
    rows = [
        measure_length(models, task, seq_len, sizes["n_tune"]) for seq_len in progress(sizes["lengths"], "step-sizes")
    ]
    report = {
        "config": {"quick": quick, "sizes": sizes},
        "models": list(models),
        "layers": {name: model.cfg.n_layers for name, model in models.items()},
        "results": rows,
        "fits": fit_laws(rows, task.order),
        "construction": construction_schedule(rows, task.order),
    }
    files = [plot(report, out_dir / "step_sizes.png")]
    report["files"] = [str(f) for f in files] + [str(out_dir / "step_sizes.json")]
    report["wall_clock_s"] = run_start.seconds()
    (out_dir / "step_sizes.json").write_text(json.dumps(report, indent=1))
    for line in summary_lines(report):
        print(f"[step-sizes] {line}")
    return AnalysisResult(report, report["files"])
