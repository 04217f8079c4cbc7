"""``REPORT.md``: every figure of ``mdlens reproduce all`` with what it shows, and the paper's numbers
beside ours.

It reads the JSON files the other analyses wrote under one output directory (``estimators/``,
``trained/``, ``two-step/``, ``step-sizes/``, ``mechanisms/``) and writes ``REPORT.md`` there. Every sentence with a
number is built from those files, so a quick run's report states the quick run's numbers. Run it
alone with ``mdlens reproduce report --out DIR`` once the others have run into ``DIR``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mdlens.analyses import AnalysisResult
from mdlens.cli import REPRODUCTIONS
from mdlens.models.layout import paper_layer, resid_post_of_layer

# Where `make demo` writes the executed notebooks as HTML, under the report's directory.
NOTEBOOKS_DIR = "notebooks"


def read_results(out_dir: Path) -> dict[str, AnalysisResult]:
    """What every stage of ``reproduce all`` wrote into ``out_dir / <stage>`` (the CLI's stage table),
    read back from its JSON file, in the order the stages run."""
    results = {}
    for name, stage in REPRODUCTIONS.items():
        if not stage.in_all or stage.json_file is None:
            continue
        path = out_dir / name / stage.json_file
        if not path.exists():
            raise ValueError(
                f"{path} is missing: run `mdlens reproduce {name} --out {out_dir / name}` first "
                f"(or `mdlens reproduce all --out {out_dir}`)"
            )
        report = json.loads(path.read_text())
        results[name] = AnalysisResult(report, report.get("files", []))
    return results


def _figure(lines: list[str], out_dir: Path, path: str, title: str, sentences: str) -> None:
    if not (out_dir / path).exists():
        raise ValueError(f"figure {out_dir / path} is missing")
    lines += [f"### {title}", "", f"![{title}]({path})", "", sentences, ""]


def _kl(result: dict, name: str) -> float | None:
    entry = result["kl"].get(name)
    return None if entry is None else entry["mean"]


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator in (None, 0):
        return "n/a"
    return f"{numerator / denominator:.2f}"


def estimator_section(lines: list[str], out_dir: Path, data: dict) -> None:
    results = data["results"]
    short, long = results[0], results[-1]
    fit = data["eta_fit"]["md1_tuned"]["power_law"]
    lines += ["## Estimators (paper §5, Theorems 1 and 2)", ""]
    _figure(
        lines,
        out_dir,
        "estimators/kl_vs_length.png",
        "KL to the truth against sequence length",
        f"Mean KL of each estimator's prediction to the true next-token distribution, against T. At "
        f"T={short['seq_len']} tuned one-step MD is {_ratio(_kl(short, 'md1_tuned'), _kl(short, 'bayes_exact'))}x "
        f"Bayes's KL; at T={long['seq_len']} it is {_ratio(_kl(long, 'md1_tuned'), _kl(long, 'bayes_exact'))}x and "
        f"two-step MD {_ratio(_kl(long, 'md2_tuned'), _kl(long, 'bayes_exact'))}x (the paper: one step drifts "
        f"away from Bayes on long sequences).",
    )
    _figure(
        lines,
        out_dir,
        "estimators/kl_ratio_to_bayes.png",
        "KL relative to exact Bayes",
        f"The same KLs divided by exact Bayes's. At T={long['seq_len']}: Gibbs-sampled Bayes "
        f"{_ratio(_kl(long, 'bayes_gibbs'), _kl(long, 'bayes_exact'))}x (Monte-Carlo error, "
        f"{data['config']['gibbs_num_samples']} sweeps), the maximum-likelihood fixed point "
        f"{_ratio(_kl(long, 'mle'), _kl(long, 'bayes_exact'))}x (at T={short['seq_len']}: "
        f"{_ratio(_kl(short, 'mle'), _kl(short, 'bayes_exact'))}x).",
    )
    _figure(
        lines,
        out_dir,
        "estimators/eta_vs_length.png",
        "Tuned step size against T (Theorem 2)",
        f"The best one-step step size shrinks with T: a power-law fit gives eta* ~ {fit['c']:.2f} T^-{fit['p']:.2f} "
        f"(R^2 {fit['r2']:.2f}). Theorem 2 bounds stable steps by order 1/T; the fitted exponent is how fast "
        f"the tuned optimum actually falls on this task.",
    )


def trained_section(lines: list[str], out_dir: Path, data: dict, two_step: dict) -> None:
    results = data["results"]
    lines += ["## Trained models against mirror descent (paper §5)", ""]
    models = list(data["models"])

    def ratios(name: str, reference: str) -> str:
        cells = []
        for r in results:
            entry = r["ratio_to"].get(name, {}).get(reference)
            if entry and entry["ratio"] is not None:
                cells.append(f"{entry['ratio']:.2f} (T={r['seq_len']})")
        return ", ".join(cells) or "n/a"

    _figure(
        lines,
        out_dir,
        "trained/trained_kl_vs_length.png",
        "Depth against k-step MD: KL against length",
        f"The shipped models beside tuned one- and two-step MD and Bayes on the same sequences. "
        f"disentangled-3l / one-step MD: {ratios('disentangled-3l', 'md1_tuned')}; disentangled-3l-long / "
        f"one-step MD: {ratios('disentangled-3l-long', 'md1_tuned')}; disentangled-5l / "
        f"two-step MD: {ratios('disentangled-5l', 'md2_tuned')}."
        if "disentangled-3l" in models
        else "The shipped models beside tuned one- and two-step MD and Bayes on the same sequences.",
    )
    _figure(
        lines,
        out_dir,
        "trained/trained_kl_ratio_to_md1.png",
        "KL relative to tuned one-step MD",
        f"Each model's mean KL over tuned one-step MD's on the same sequences. standard-3l: "
        f"{ratios('standard-3l', 'md1_tuned')}; disentangled-5l: {ratios('disentangled-5l', 'md1_tuned')}.",
    )
    rows = two_step["results"]
    best = {r["seq_len"]: r["ratio_to_md2"].get("attend-final") for r in rows}
    cells = ", ".join(f"{v:.3f} (T={t})" for t, v in best.items() if v is not None)
    _figure(
        lines,
        out_dir,
        "two-step/two_step.png",
        "What a causal model can keep of MD step 2",
        f"Causal variants of the second MD step, each with fitted scales, relative to tuned two-step MD. "
        f"Weighing earlier positions by exp(-d <lambda1, gamma_k>) (attend-final): {cells}.",
    )


def _law(fit: dict) -> str:
    """``eta ~ c T^-p`` as ``T^-p`` (or ``T^+p`` for a rising series)."""
    return f"T^-{fit['p']:.2f}" if fit["p"] >= 0 else f"T^+{-fit['p']:.2f}"


def step_size_section(lines: list[str], out_dir: Path, data: dict) -> None:
    fits, rows = data["fits"], data["results"]
    shortest, longest = rows[0], rows[-1]

    def effective(name: str) -> str:
        first = shortest["models"][name]["effective_eta"]
        last = longest["models"][name]["effective_eta"]
        return (
            f"{name} {_law(fits[name]['effective_eta'])} ({first:.3g} at T={shortest['seq_len']}, "
            f"{last:.3g} at T={longest['seq_len']}; KL(model || that MD) {longest['models'][name]['fit_kl']:.4f} "
            f"against the model's KL {longest['models'][name]['model_kl']:.4f} to the truth)"
        )

    sentences = (
        f"Tuned one-step MD's step falls like {_law(fits['tuned_eta'])}; the step of the one-step MD "
        "closest to each model: " + "; ".join(effective(name) for name in data["models"]) + "."
    )
    schedule = data["construction"]
    if schedule is not None:
        name, t = schedule["model"], str(shortest["seq_len"])
        sentences += (
            f" A construction with {name}'s beta = {schedule['beta']:.2f} (read at T={schedule['from_seq_len']}) "
            f"runs eta = {schedule['eta'][t]:.3g} at T={t}, where tuned MD takes {shortest['tuned_eta']:.3g} and "
            f"{name} {shortest['models'][name]['effective_eta']:.3g}: the model does not keep one beta."
        )
    for name in data["models"]:
        if data["layers"][name] >= 5 and name.startswith("disentangled"):
            sentences += (
                f" Two-step MD with one step size per step, fitted to {name}: eta_1 {_law(fits[name]['eta_1'])}, "
                f"eta_2 {_law(fits[name]['eta_2'])}; tuned against the truth: eta_1 {_law(fits['tuned_eta_1'])}, "
                f"eta_2 {_law(fits['tuned_eta_2'])} (R^2 of that law {fits['tuned_eta_2']['r2']:.2f}; at "
                f"T={shortest['seq_len']} the best second step is {shortest['tuned_two_step']['etas'][1]:.2g}). "
                "Theorem 2's law is T^-1."
            )
    lines += ["## Step sizes read off the models (Theorem 2's 1/T law)", ""]
    _figure(lines, out_dir, "step-sizes/step_sizes.png", "Effective step sizes against T", sentences)


def mechanism_section(lines: list[str], out_dir: Path, data: dict) -> None:
    lines += ["## Inside the models (`mdlens.hooks`)", ""]
    probe_and_attention_figures(lines, out_dir, data["models"])
    weight_and_behaviour_figures(lines, out_dir, data)


def _per_model(models: dict, formatter) -> str:
    """``formatter``'s text for every trained model (not the construction), ``"; "``-separated."""
    return "; ".join(f"{name} {formatter(result)}" for name, result in models.items() if name != "construction")


def probe_and_attention_figures(lines: list[str], out_dir: Path, models: dict) -> None:
    """The probes, attention maps and attention agreement of the mechanisms analysis."""

    def per_model(formatter) -> str:
        return _per_model(models, formatter)

    _figure(
        lines,
        out_dir,
        "mechanisms/mechanisms_probes.png",
        "Linear probes layer by layer",
        "Held-out R^2 of ridge probes for each algorithmic quantity at every layer, with a random-init model "
        "(grey) and a control target (red). The construction holds the responsibility after layer 1 and the "
        "mean responsibility after layer 2 exactly (R^2 "
        f"{after_layer(models['construction'], 'probe_r2', 2):.3f}); mean responsibility at layer 2: "
        + per_model(
            lambda r: f"{after_layer(r, 'probe_r2', 2):.2f} (control {after_layer(r, 'probe_control_r2', 2):.2f})"
        )
        + ".",
    )
    _figure(
        lines,
        out_dir,
        "mechanisms/mechanisms_attention_maps.png",
        "Attention maps beside the construction's",
        "Every layer's pattern on one sequence. The construction's layer 1 is a band over offsets 1..m, "
        "layer 2 is uniform over positions after m, layer 3 selects the last m tokens. Layer-1 mass on the "
        "query itself: " + per_model(lambda r: f"{r['layer1_offset_mass'][0][0]:.2f}") + ".",
    )
    _figure(
        lines,
        out_dir,
        "mechanisms/mechanisms_attention.png",
        "Attention agreement with the construction",
        "Mean TV per layer between each model's pattern and the construction built with the model's own step "
        "(layers 1/2/3): " + per_model(lambda r: "/".join(f"{v:.2f}" for v in r["pattern_tv"])) + "; right: "
        "layer 1's mass by offset.",
    )


def weight_and_behaviour_figures(lines: list[str], out_dir: Path, data: dict) -> None:
    """The learned transition (with the paper-form table), implicit weights and patching heatmaps."""
    models = data["models"]

    def per_model(formatter) -> str:
        return _per_model(models, formatter)

    _figure(
        lines,
        out_dir,
        "mechanisms/mechanisms_learned_transition.png",
        "Learned against true transition",
        "The true pi beside each disentangled model's layer-1 token-token scores (rows centred). Learned "
        "transition KL: "
        + per_model(
            lambda r: (
                "n/a"
                if r["learned_transition_kl"] is None and r.get("token_score_block") is None
                else (
                    "none identifiable" if r["learned_transition_kl"] is None else f"{r['learned_transition_kl']:.4f}"
                )
            )
        )
        + ".",
    )
    paper_kl = data["config"]["paper_learned_transition_kl"]
    if softmax_kls(models):
        lines += [
            f"The paper's own form of the claim (KL {paper_kl} at T=192) does not say which KL or which axis: "
            f"{SOFTMAX_DEFINITION}. Every form, for every disentangled model, beside the uniform guess (S = 0):",
            "",
            *softmax_table(models, paper_kl),
        ]
    _figure(
        lines,
        out_dir,
        "mechanisms/mechanisms_implicit_weights.png",
        "Which estimator each model behaves like",
        "Mean L1 distance between the lambda that best explains each model's prediction and each estimator's. "
        "At the longest length: " + per_model(lambda r: _closest(r["implicit_weights"])) + ".",
    )
    _figure(
        lines,
        out_dir,
        "mechanisms/mechanisms_patching_heatmaps.png",
        "Activation patching, layer x position",
        "KL of the clean next-token distribution after patching one residual position (resid_pre of each "
        "layer) from another sequence, one row per model. Largest entry: "
        + per_model(lambda r: _largest_entry(r["patching_heatmap"]))
        + ".",
    )


def after_layer(result: dict, table: str, layer: int, target: str = "mean_responsibility") -> float:
    """A mechanisms probe ``table``'s (``probe_r2``, ``probe_control_r2``, ...) value for ``target`` at
    the reading point after the paper's layer ``layer`` (that layer's ``resid_post``)."""
    return result[table][target][result["probe_rows"].index(resid_post_of_layer(layer))]


def _largest_entry(heatmap: list[list[float]]) -> str:
    """The heatmap's largest entry (rows: TransformerLens blocks, patched at ``resid_pre``; columns: positions)."""
    value, block, position = max((v, i, p) for i, row in enumerate(heatmap) for p, v in enumerate(row) if v is not None)
    return f"{value:.3f} at layer {paper_layer(block)}, position {position + 1} of {len(heatmap[0])}"


def _closest(implicit: dict) -> str:
    longest = max(implicit, key=int)
    distances = {k: v for k, v in implicit[longest].items() if k != "residual_kl"}
    best = min(distances, key=distances.get)
    return f"{best} ({distances[best]:.3f} at T={longest})"


def three_layer_models(mechanisms: dict) -> dict:
    """The trained 3-layer disentangled models' mechanism results, by name."""
    return {name: r for name, r in mechanisms.items() if name.startswith("disentangled-3l")}


def learned_transition_cells(mechanisms: dict) -> list[str]:
    """Per trained 3-layer model: its learned-transition KL (or that none fits) and the layer-1 score
    correlation with the branch it is on, (log pi)^T or -pi^T."""
    cells = []
    for name, r in three_layer_models(mechanisms).items():
        kl = r.get("learned_transition_kl")
        fit = f"KL {kl:.4f}" if kl is not None else "no row-stochastic pi fits"
        corr = r.get("score_block_correlation")
        if corr:
            log_side = corr["log_transition_T"] >= corr["neg_transition_T"]
            fit += (
                f", scores vs (log pi)^T corr {corr['log_transition_T']:+.2f}"
                if log_side
                else f", scores vs -pi^T corr {corr['neg_transition_T']:+.2f}"
            )
        cells.append(f"{name.removeprefix('disentangled-')}: {fit}")
    return cells


# The paper's "KL between pi and a softmax of W_A" read three ways (hooks.weights.softmax_transition_kl):
# form -> (how the report names it, the uniform guess's KL in the same form).
SOFTMAX_FORMS = {
    "softmax_over_keys_vs_pi": ("softmax over keys vs pi", "uniform_vs_pi"),
    "softmax_over_queries_vs_pi": ("softmax over queries vs pi", "uniform_vs_pi"),
    "softmax_over_keys_vs_parent_posterior": (
        "softmax over keys vs pi's parent posterior",
        "uniform_vs_parent_posterior",
    ),
}
SOFTMAX_DEFINITION = (
    "each form is the mean over the q rows (weighted alike) of KL(target row || softmax row) of layer 1's "
    "token-token scores S (row = query token b, column = key token a): softmax over keys per query against "
    "pi's rows (S read as log pi), softmax over queries per key against pi's rows (S read as (log pi)^T), "
    "and softmax over keys per query against pi's column-normalised transpose pi(a, b) / sum_a' pi(a', b) "
    "(what attention computes, blind to per-query constants)"
)


def softmax_kls(mechanisms: dict) -> dict[str, dict]:
    """Every disentangled model's paper-form KLs (the construction first), by name."""
    return {name: r["softmax_transition_kl"] for name, r in mechanisms.items() if r.get("softmax_transition_kl")}


def best_softmax_form(mechanisms: dict) -> tuple[str, str, float, float] | None:
    """The trained model and form with the lowest paper-form KL: ``(model, form, KL, uniform's KL)``."""
    candidates = [
        (kls[form], name, form, kls[uniform])
        for name, kls in softmax_kls(mechanisms).items()
        if name != "construction"
        for form, (_, uniform) in SOFTMAX_FORMS.items()
    ]
    if not candidates:
        return None
    value, name, form, uniform = min(candidates)
    return name, form, value, uniform


def softmax_verdict(mechanisms: dict, paper: float) -> str:
    """The verdict on "softmax of layer-1 W_A recovers pi" from the paper-form KLs: agrees when a trained
    model reaches the paper's KL in some form, partly when its best form is below the uniform guess's."""
    best = best_softmax_form(mechanisms)
    if best is None:
        return "n/a"
    name, form, value, uniform = best
    if value <= paper:
        return f"agrees ({name}, {SOFTMAX_FORMS[form][0]}: {value:.4f})"
    no_better = [
        n
        for n, kls in softmax_kls(mechanisms).items()
        if n != "construction" and all(kls[f] >= kls[u] for f, (_, u) in SOFTMAX_FORMS.items())
    ]
    tail = f"; {', '.join(no_better)}: no form below the uniform guess" if no_better else ""
    if value < uniform:
        return (
            f"partly: {name}'s best ({SOFTMAX_FORMS[form][0]}) is {value / paper:.2f}x the paper's KL and "
            f"{value / uniform:.2f}x the uniform guess's{tail}"
        )
    return f"differs: no trained model beats the uniform guess in any form{tail}"


def softmax_cells(mechanisms: dict) -> list[str]:
    """Per trained disentangled model: its paper-form KLs in ``SOFTMAX_FORMS`` order, then the uniform guess's."""
    kls = {name: r for name, r in softmax_kls(mechanisms).items() if name != "construction"}
    if not kls:
        return []
    labels = " / ".join(label.removeprefix("softmax ") for label, _ in SOFTMAX_FORMS.values())
    cells = [f"KL(pi, softmax of W_A) {labels}:"]
    cells[0] += " " + ", ".join(
        f"{name.removeprefix('disentangled-')} " + " / ".join(f"{r[form]:.3g}" for form in SOFTMAX_FORMS)
        for name, r in kls.items()
    )
    uniform = next(iter(kls.values()))
    cells.append("uniform guess " + " / ".join(f"{uniform[u]:.3g}" for _, u in SOFTMAX_FORMS.values()))
    return cells


def softmax_table(mechanisms: dict, paper: float) -> list[str]:
    """Markdown table: one row per form, the paper's number, the uniform guess and every disentangled model."""
    kls = softmax_kls(mechanisms)
    if not kls:
        return []
    names = list(kls)
    lines = [
        "| KL(target, softmax of layer-1 scores) | paper (T=192) | uniform guess | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for form, (label, uniform) in SOFTMAX_FORMS.items():
        cells = " | ".join(f"{kls[name][form]:.4f}" for name in names)
        lines.append(f"| {label} | {paper} | {kls[names[0]][uniform]:.4f} | {cells} |")
    return [*lines, ""]


# The verdicts of the paper table: each threshold next to the claim it judges.
# "One-step MD drifts from Bayes on long sequences": tuned MD1's KL ratio to Bayes grows by more than
# this from the shortest length to the longest.
DRIFT_MIN = 0.02
# "Tuned step size ~ 1/T" (Theorem 2): the fitted exponent p of eta* ~ T^-p lies in this range.
STEP_EXPONENT_RANGE = (0.8, 1.2)
# "Trained model tracks k-step MD": its paired KL ratio to tuned k-step MD is at most this at every length.
TRACKING_RATIO_MAX = 1.10
# "Trained attention maps match the construction": a layer's mean TV to the construction is below this.
ATTENTION_TV_MAX = 0.15


def drift_row(estimators: dict) -> tuple[str, str, str, str]:
    short, long = estimators["results"][0], estimators["results"][-1]
    drift = _kl(long, "md1_tuned") / _kl(long, "bayes_exact") - _kl(short, "md1_tuned") / _kl(short, "bayes_exact")
    return (
        "One-step MD drifts from Bayes on long sequences",
        "yes (figure)",
        f"MD1 / Bayes = {_ratio(_kl(long, 'md1_tuned'), _kl(long, 'bayes_exact'))} at T={long['seq_len']}",
        "agrees" if drift > DRIFT_MIN else "not seen at these lengths",
    )


def step_law_row(estimators: dict) -> tuple[str, str, str, str]:
    fit = estimators["eta_fit"]["md1_tuned"]["power_law"]
    low, high = STEP_EXPONENT_RANGE
    return (
        "Tuned step size ~ 1/T (Theorem 2)",
        "eta = Theta(1/T)",
        f"eta* ~ T^-{fit['p']:.2f} (R^2 {fit['r2']:.2f})",
        "agrees" if low <= fit["p"] <= high else f"exponent {fit['p']:.2f}, not 1",
    )


def tracking_row(trained: dict, claim: str, label: str, name: str, reference: str) -> tuple[str, str, str, str]:
    """``name``'s paired KL ratio to ``reference`` at the longest length, judged over every length."""
    last = trained["results"][-1]
    entry = last["ratio_to"].get(name, {}).get(reference)
    at_last = "n/a" if not entry or entry["ratio"] is None else f"{entry['ratio']:.2f}x at T={last['seq_len']}"
    entries = [r["ratio_to"].get(name, {}).get(reference) for r in trained["results"]]
    values = [e["ratio"] for e in entries if e and e["ratio"] is not None]
    if not values:
        return (claim, "yes (figure)", f"{label} = {at_last}", "n/a")
    verdict = "agrees" if max(values) <= TRACKING_RATIO_MAX else f"up to {max(values):.2f}x"
    return (claim, "yes (figure)", f"{label} = {at_last}", verdict)


def attention_row(mechanisms: dict) -> tuple[str, str, str, str]:
    tv = mechanisms.get("disentangled-3l", {}).get("pattern_tv", [])
    if not tv:
        verdict = "n/a"
    elif max(tv) < ATTENTION_TV_MAX:
        verdict = "agrees"
    else:
        verdict = "; ".join(
            f"layer {paper_layer(block)} {'agrees' if v < ATTENTION_TV_MAX else 'differs'}"
            for block, v in enumerate(tv)
        )
    return (
        "Trained attention maps match the construction",
        "yes (figure)",
        "TV per layer " + "/".join(f"{v:.2f}" for v in tv) + " (3l)",
        verdict,
    )


def paper_table(data: dict) -> list[str]:
    """The paper's claims (paper-notes §5) beside this run's numbers."""
    estimators, trained, mechanisms = data["estimators"], data["trained"], data["mechanisms"]["models"]
    paper_kl = data["mechanisms"]["config"]["paper_learned_transition_kl"]
    rows = [
        drift_row(estimators),
        step_law_row(estimators),
        tracking_row(trained, "Trained 3-layer model tracks one-step MD", "3l / MD1", "disentangled-3l", "md1_tuned"),
        tracking_row(trained, "5-layer model performs like two-step MD", "5l / MD2", "disentangled-5l", "md2_tuned"),
        attention_row(mechanisms),
        (
            "softmax of layer-1 W_A recovers pi",
            f"KL {paper_kl} at T=192",
            "; ".join([*softmax_cells(mechanisms), *learned_transition_cells(mechanisms)]) or "n/a",
            softmax_verdict(mechanisms, paper_kl),
        ),
    ]
    lines = [
        "## The paper's numbers beside ours",
        "",
        "| claim | paper | mdlens (this run) | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return [*lines, ""]


def alignment_section(lines: list[str], out_dir: Path, data: dict) -> None:
    """Distributed alignment search: per model and variable, the best hook, its held-out interchange
    fidelity and the controls (``mdlens reproduce alignment``)."""
    sizes = data["config"]["sizes"]
    lines += [
        "## Is MD causally inside? Distributed alignment search (`mdlens.hooks.align_variable`)",
        "",
        f"{sizes['n_pairs']} pairs (base A, source B) of T={sizes['seq_len']}, a quarter held out. For each MD "
        "variable, DAS learns a rank-m subspace at every layer's `resid_post` (and the "
        "embedding) whose interchange turns A's output into MD's counterfactual (A read with B's value of "
        "the variable); the best hook is then rerun with its controls (where other hooks came within 0.05 of the "
        "scan's best, each gets the full search first and the best of those is kept; listed below the table). "
        "Fidelity "
        "`1 - KL(cf || intervened) / KL(cf || A's own output)` on held-out pairs: 1 = the subspace carries the "
        "variable and the model reads it as MD does. Controls: the probe's and a random subspace of the same "
        "rank; (a) a random-init model; (b) a wrong high-level model (B's lag weights permuted); (c) the "
        "subspace's own R^2 for the variable and the share of it the output reads. A variable is called "
        "present when DAS reaches 0.9, at least 0.5 above (a), with (b) <= 0.5 and (c)'s R^2 >= 0.5; partial "
        "from 0.5. (a) reads an untrained 'probs' model's output through a softmax: read as probabilities "
        "its KL is mostly clipped entries, which any subspace lifts.",
        "",
        "| model | variable | best hook | DAS | probe subspace | random subspace | (a) random model | "
        "(b) wrong model | (c) subspace R^2 / read share | saturating rank | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def number(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    figures = []
    for name, result in data["models"].items():
        for variable, entry in result["variables"].items():
            best = entry["best"]
            lines.append(
                f"| {name} | {variable} | `{best['hook_name']}` | {number(best['interchange_fidelity'])} | "
                f"{number(best['probe_fidelity'])} | {number(best['random_subspace_fidelity'])} | "
                f"{number(best['random_model_fidelity'])} | {number(best['wrong_model_fidelity'])} | "
                f"{number(best['subspace_r2'])} / {number(best['read_fraction'])} | {best['saturation_rank'] or '-'} | "
                f"{best['verdict']} |"
            )
            figures += entry["files"]
    lines.append("")
    ties = [
        f"{name} {variable}: "
        + ", ".join(f"`{hook}` {number(f)}" for hook, f in entry["full_search_contenders"].items())
        for name, result in data["models"].items()
        for variable, entry in result["variables"].items()
        if entry.get("full_search_contenders")
    ]
    if ties:
        lines += [
            "Near-ties in the scan, with the full search's held-out fidelity at each: " + "; ".join(ties) + ".",
            "",
        ]
    # The mean responsibility's controls as pictures (one per model); every other figure as a link.
    existing = [Path(path).name for path in figures if (out_dir / "alignment" / Path(path).name).exists()]
    shown = [name for name in existing if name.startswith("controls_") and name.endswith("_mean_responsibility.png")]
    lines += [f"![{name}](alignment/{name})" for name in shown]
    others = [name for name in existing if name not in shown]
    if others:
        lines += ["", "Scans and the other variables' controls: " + ", ".join(f"[{n}](alignment/{n})" for n in others)]
    lines.append("")


def notebook_section(out_dir: Path) -> list[str]:
    """Links to the executed notebooks that exist in ``out_dir / NOTEBOOKS_DIR`` (``make demo`` writes them
    there before the report); no section when there are none."""
    notebooks = sorted(p.relative_to(out_dir).as_posix() for p in (out_dir / NOTEBOOKS_DIR).glob("*.html"))
    if not notebooks:
        return []
    return [
        "## The notebooks, executed",
        "",
        "Each notebook of `notebooks/` run top to bottom by `make demo`, as HTML with every output and figure:",
        "",
        *(f"- [{notebook}]({notebook})" for notebook in notebooks),
        "",
    ]


@dataclass(frozen=True)
class Section:
    """A section of the report after the paper table: the stages whose results it presents, and the
    function that writes it, ``write(lines, out_dir, *those stages' reports)``."""

    stages: tuple[str, ...]
    write: Callable[..., None]


# The sections in reading order; every stage of ``reproduce all`` that writes JSON is presented by one.
SECTIONS = (
    Section(("estimators",), estimator_section),
    Section(("trained", "two-step"), trained_section),  # two-step's figure sits with the trained models
    Section(("step-sizes",), step_size_section),
    Section(("mechanisms",), mechanism_section),
    Section(("alignment",), alignment_section),
)


def run(out_dir: Path, quick: bool = False) -> AnalysisResult:
    """Write ``REPORT.md`` in ``out_dir`` from the analyses' JSON files there (it writes no JSON itself)."""
    out_dir = Path(out_dir)
    results = read_results(out_dir)
    data = {name: result.report for name, result in results.items()}
    presented = [name for section in SECTIONS for name in section.stages]  # in reading order
    quick_runs = [name for name in presented if data[name].get("config", {}).get("quick")]
    lines = [
        "# mdlens: reproduction report",
        "",
        "Written by `mdlens reproduce all` from the JSON files beside this report; every number below is "
        "measured by this run"
        + (f" (quick sizes for: {', '.join(quick_runs)}; noisy, for a smoke test)" if quick_runs else "")
        + ".",
        "",
    ]
    lines += paper_table(data)
    for section in SECTIONS:
        section.write(lines, out_dir, *(data[name] for name in section.stages))
    lines += notebook_section(out_dir)
    views = sorted(
        path
        for path in (p.relative_to(out_dir).as_posix() for p in out_dir.glob("**/*.html"))
        if not path.startswith(f"{NOTEBOOKS_DIR}/")
    )
    if views:
        lines += ["## Head views (CircuitsVis, open in a browser; they render offline)", ""]
        lines += [f"- [{view}]({view})" for view in views] + [""]
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines))
    print(f"[mdlens] report: {path}")
    return AnalysisResult({}, [str(path)])
