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
  gamma_k,h`` (then ``sum_k w_k gamma_k`` is proportional to the gradient). This is
  :func:`mdlens.estimators.causal_md_weights` with two steps, which the 5-layer
  :func:`mdlens.construction.build_mdk_transformer` computes exactly.

The scales ``(a, b, c, d)`` (``d`` used by ``attend-final`` only) are fitted per length by L-BFGS on a
tuning batch (from tuned MD1, tuned MD2 and fixed starts; the best scales seen are kept) and scored by
mean KL to the truth on a fresh batch, next to tuned one-, two- and three-step MD. What is learned from
it: the online variants keep almost none of step 2's gain on long sequences, ``attend-final`` keeps all
of it, so a 5-layer causal model is not limited to one-step MD by its architecture.

The constructions: ``attend-final``'s fit is built as the 5-layer model
(:func:`mdlens.construction.build_tuned_mdk_transformer`) and run on the evaluation batch
(``construction_2step``; ``construction_max_abs_diff`` records how far its predictions are from the
estimator's), and likewise the 7-layer three-step construction (``construction_3step``, its fit also
started from the 2-step fit), next to tuned MD3 and exact Bayes: the ``three_step`` table of the JSON.

Run with ``mdlens reproduce two-step --out DIR``: writes ``two_step.json`` and ``two_step.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.ticker
import torch
from jaxtyping import Float, Int
from torch import Tensor

import mdlens
from mdlens import MTDTask, hooks
from mdlens import estimators as E
from mdlens.analyses import TASK, AnalysisResult, plotting, progress, start_run
from mdlens.construction import build_md_transformer, build_mdk_transformer, build_tuned_mdk_transformer
from mdlens.evaluation import exact_bayes_weights, sample_batches, tuned_md
from mdlens.models.layout import paper_layer
from mdlens.predict import model_outputs

FULL = {
    "lengths": [8, 16, 32, 64, 128, 192],
    "n_tune": 512,
    "n_eval": 4096,
    "fit_iterations": 50,  # L-BFGS iterations per start (mdlens.estimators.fit_scales_by_kl)
    "n_model_check": 64,  # the 7-layer model at T=192 takes ~0.16 s per sequence here
    "n_compare": 256,
    "n_sensitivity": 32,
}
QUICK = {
    "lengths": [8, 24],
    "n_tune": 64,
    "n_eval": 64,
    "fit_iterations": 10,
    "n_model_check": 64,
    "n_compare": 24,
    "n_sensitivity": 4,
}
VARIANTS = ("final-grad", "final-resp", "online-grad", "online-resp", "attend-final")
# Starting scales (a, b, c, d) besides tuned MD1 and MD2: a large first step, and a balanced one.
STARTS = ((40.0, 15.0, 0.0, 0.0), (10.0, 10.0, 10.0, 5.0))
TUNED_MD = {"md1_tuned": 1, "md2_tuned": 2, "md3_tuned": 3}  # name -> steps, eta grid-searched per length
TRAINED = "disentangled-5l"  # the shipped model compared with the 2-step construction
COMPARE_SEED = 4_000_000  # + T: the comparison's sequences, apart from the tuning and evaluation batches
MODEL_CHUNK = 256  # sequences per forward pass of a construction (a 7-layer one at T=192: ~0.5 GB)
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
    statistics: tuple[Tensor, Tensor] | None = None,
) -> Float[Tensor, "batch m"]:
    """``lambda2`` of one variant (see the module docstring), ``[batch, m]``; differentiable in the scales.

    ``statistics``: :func:`variant_statistics` of ``tokens``, when a fit calls this for many scales.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "attend-final":  # the library's causal two-step MD, which the construction computes
        return E.causal_md_weights(tokens, transition, order, (a, b, c, d))
    lag_probs, prefix_mean = variant_statistics(tokens, transition, order) if statistics is None else statistics
    final_mean = prefix_mean[:, -1]  # g0(T), [batch, m]
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


def variant_statistics(
    tokens: Int[Tensor, "batch T"], transition: Float[Tensor, "q q"], order: int
) -> tuple[Float[Tensor, "batch n m"], Float[Tensor, "batch n m"]]:
    """What the variants read that no scale changes: the lag likelihoods ``P[b, k, g]`` and the prefix-mean
    responsibilities ``g0(k)``, each ``[batch, T-m, m]``."""
    lag_probs = E.lag_likelihoods(tokens, transition, order)  # P[b, k, g], [batch, T-m, m]
    gamma = lag_probs / lag_probs.sum(dim=-1, keepdim=True)
    return lag_probs, E.prefix_mean_responsibility(gamma)  # g0(k)


def fit_scales(
    tokens: Tensor,
    transition: Tensor,
    order: int,
    target: Tensor,
    variant: str,
    starts: list[tuple[float, ...]],
    fit_iterations: int,
) -> tuple[list[float], float]:
    """The ``(a, b, c, d)`` with the lowest mean KL seen along L-BFGS runs from each start, and that KL
    (:func:`mdlens.estimators.fit_scales_by_kl`, the fit ``attend-final`` gets through the tuned construction)."""
    statistics = variant_statistics(tokens, transition, order)  # once, not at every evaluation of the fit
    best = E.fit_scales_by_kl(
        tokens,
        transition,
        target,
        lambda scales: two_step_weights(tokens, transition, order, variant, *scales, statistics=statistics),
        list(starts),
        fit_iterations,
    )
    return best["scales"], best["tuning_kl"]


def evaluate_length(task: MTDTask, seq_len: int, sizes: dict) -> dict:
    """Tuned MD1-3, every fitted variant, the tuned 2- and 3-step constructions and Bayes at one length:
    mean KL on a fresh batch (scales and step sizes tuned on a separate one)."""
    pi, m = task.transition, task.order
    tune, evaluation = sample_batches(task, seq_len, sizes["n_tune"], sizes["n_eval"])

    def eval_kl(predicted: Tensor) -> float:
        return E.kl_divergence(evaluation.next_probs, predicted).mean().item()

    def eval_weights_kl(weights: Tensor) -> float:
        return eval_kl(E.predictive(evaluation.tokens, pi, weights))

    row: dict = {"seq_len": seq_len, "kl": {}, "scales": {}, "eta": {}}
    for name, steps in TUNED_MD.items():
        eta = tuned_md(tune.tokens, pi, m, tune.next_probs, steps)["eta"]
        row["eta"][name] = eta
        row["kl"][name] = eval_weights_kl(E.md_weights(evaluation.tokens, pi, m, eta, steps))
    # Tuned MD1 and MD2 as starts too (final-grad at the MD2 start is two-step MD exactly).
    eta1, eta2 = row["eta"]["md1_tuned"], row["eta"]["md2_tuned"]
    beta1, beta2 = E.beta_from_eta(eta1, m, seq_len), E.beta_from_eta(eta2, m, seq_len)
    starts = [
        (beta1, beta1, 0.0, 0.0),
        (beta2, beta2, eta2 * (seq_len - m), 0.0),  # c = eta (T - m): the second step's scale
        *STARTS,
    ]
    for variant in VARIANTS:
        if variant == "attend-final":  # fitted below, as the tuned construction
            continue
        scales, _ = fit_scales(tune.tokens, pi, m, tune.next_probs, variant, starts, sizes["fit_iterations"])
        row["scales"][variant] = scales
        with torch.no_grad():
            row["kl"][variant] = eval_weights_kl(two_step_weights(evaluation.tokens, pi, m, variant, *scales))

    fitted = add_constructions(row, tune, evaluation, pi, m, sizes, eval_kl)
    row["scales"]["attend-final"] = fitted[2]
    row["kl"]["attend-final"] = row["kl"]["causal_md2"]
    # The evaluation batch is trained's at this length: its exact Bayes is computed once for both.
    row["kl"]["bayes_exact"] = eval_weights_kl(exact_bayes_weights(evaluation.tokens, pi, m, alpha=task.alpha))
    row["ratio_to_md2"] = {name: kl / row["kl"]["md2_tuned"] for name, kl in row["kl"].items()}
    row["ratio_to_md3"] = {name: kl / row["kl"]["md3_tuned"] for name, kl in row["kl"].items()}
    row["ratio_to_bayes"] = {name: kl / row["kl"]["bayes_exact"] for name, kl in row["kl"].items()}
    return row


def add_constructions(row: dict, tune, evaluation, pi: Tensor, m: int, sizes: dict, eval_kl) -> dict[int, list[float]]:
    """The tuned 2- and 3-step constructions at ``row``'s length, added to ``row`` (their KLs, scales
    and check against their estimators); returns their fitted scales by number of steps.

    Scales are fitted on the tuning batch, the model is run on the evaluation batch. attend-final is
    the 2-step construction's estimator; the 3-step fit also starts from the 2-step fit with a third
    step that changes nothing (b3 = b2, c3 = d3 = 0), so it never tunes worse. Each model (5 or 7
    layers, d_model up to ~1150) runs on the first n_model_check sequences only: its KL on the whole
    batch is its estimator's, which those sequences show it equals (construction_max_abs_diff; the
    tests check it at every position to 1e-12)."""
    row["construction_max_abs_diff"], row["construction_model_sequences"] = {}, {}
    fitted: dict[int, list[float]] = {}
    for steps in (2, 3):
        starts_s = E.default_causal_md_starts(tune.tokens, pi, m, tune.next_probs, steps)
        if steps == 3:
            starts_s.append([*fitted[2], fitted[2][1], 0.0, 0.0])
        model = build_tuned_mdk_transformer(
            tune.tokens, tune.next_probs, pi, m, steps, starts=starts_s, max_iter=sizes["fit_iterations"]
        )
        fitted[steps] = model.md_params["scales"]
        estimator = E.predictive(evaluation.tokens, pi, E.causal_md_weights(evaluation.tokens, pi, m, fitted[steps]))
        n_model = min(sizes["n_model_check"], sizes["n_eval"])
        predicted = model_outputs(model, evaluation.tokens[:n_model], MODEL_CHUNK)
        name = f"construction_{steps}step"
        row["kl"][f"causal_md{steps}"] = eval_kl(estimator)
        row["kl"][name] = eval_kl(predicted) if n_model == sizes["n_eval"] else row["kl"][f"causal_md{steps}"]
        row["scales"][name] = fitted[steps]
        row["construction_max_abs_diff"][name] = (predicted - estimator[:n_model]).abs().max().item()
        row["construction_model_sequences"][name] = n_model
    return fitted


def three_step_table(results: list[dict]) -> list[dict]:
    """Per length: mean KL of the tuned 3-step construction next to tuned MD1-3, the 2-step construction
    and exact Bayes, with its ratios to tuned MD3 and to Bayes."""
    columns = ("md1_tuned", "md2_tuned", "md3_tuned", "construction_2step", "construction_3step", "bayes_exact")
    return [
        {
            "seq_len": row["seq_len"],
            "kl": {name: row["kl"][name] for name in columns},
            "construction_3step_over_md3": row["ratio_to_md3"]["construction_3step"],
            "construction_3step_over_bayes": row["ratio_to_bayes"]["construction_3step"],
        }
        for row in results
    ]


def summary_lines(results: list[dict]) -> list[str]:
    """The printed summary: variants over tuned MD2, then the construction table."""
    lines = []
    for row in results:
        ratios = "  ".join(f"{name} {row['ratio_to_md2'][name]:.3f}" for name in ("md1_tuned", *VARIANTS))
        lines.append(f"T={row['seq_len']:4d}  KL / tuned MD2:  {ratios}")
    lines.append("mean KL (x1e3) on the evaluation batch; constructions = tuned models run on it:")
    lines.append("    T     MD1     MD2     MD3  constr2  constr3   Bayes  constr2/MD2  constr3/MD3  constr3/Bayes")
    for row in results:
        kl = {name: 1e3 * value for name, value in row["kl"].items()}
        lines.append(
            f"{row['seq_len']:5d} {kl['md1_tuned']:7.3f} {kl['md2_tuned']:7.3f} {kl['md3_tuned']:7.3f} "
            f"{kl['construction_2step']:8.3f} {kl['construction_3step']:8.3f} {kl['bayes_exact']:7.3f} "
            f"{row['ratio_to_md2']['construction_2step']:12.4f} {row['ratio_to_md3']['construction_3step']:12.4f} "
            f"{row['ratio_to_bayes']['construction_3step']:14.4f}"
        )
    return lines


def causal_md_targets(
    tokens: Int[Tensor, "batch T"], transition: Tensor, order: int, scales: list[float]
) -> dict[str, Float[Tensor, "batch T m"]]:
    """The 2-step construction's quantities at every position (``E.causal_md_steps`` on each prefix):
    ``lambda1``, ``second_step_mean``, ``lambda2``, name -> ``[batch, T, m]``, NaN at ``t <= m``."""
    names = ("lambda1", "second_step_mean", "lambda2")
    values = {name: torch.full((*tokens.shape, order), float("nan"), dtype=torch.float64) for name in names}
    for t in range(order + 1, tokens.shape[1] + 1):
        quantities = E.causal_md_steps(tokens[:, :t], transition, order, scales)
        for name in names:
            values[name][:, t - 1] = quantities[name]
    return values


def compare_trained(task: MTDTask, row: dict, sizes: dict) -> dict:
    """Does the shipped ``TRAINED`` model implement the tuned 2-step construction at ``row``'s length?

    Per layer, ordered attention agreement with the construction (``hooks.attention_agreement``);
    held-out probe R^2 of ``lambda1``, the second-step mean ``h_1`` and ``lambda2`` (and the one-step
    quantities) at every ``resid_post`` (``hooks.probe_model``, with its random-model control);
    input-sensitivity alignment with the 2-step and the 1-step construction (``hooks.sensitivity_alignment``).
    """
    pi, m, seq_len = task.transition, task.order, row["seq_len"]
    model, model_task = mdlens.load_pretrained(TRAINED)
    if not torch.equal(model_task.transition, pi) or model_task.order != m:
        raise ValueError(f"{TRAINED} was trained on another task than {TASK}")
    two = build_mdk_transformer(pi, m, seq_len, 2, row["scales"]["construction_2step"])
    one = build_md_transformer(pi, m, seq_len, row["eta"]["md1_tuned"])
    generator = torch.Generator().manual_seed(COMPARE_SEED + seq_len)
    tokens = task.sample(sizes["n_compare"], seq_len, generator=generator).tokens
    result: dict = {"model": TRAINED, "seq_len": seq_len, "n_sequences": tokens.shape[0]}

    agreement = hooks.attention_agreement(model, two, tokens, order=m, matching="ordered")
    result["attention"] = {"pairs": agreement.pairs, "tv": agreement.tv, "kl": agreement.kl}

    values = hooks.targets(tokens, pi, m, include_bayes=False)
    values.update(causal_md_targets(tokens, pi, m, row["scales"]["construction_2step"]))
    report = hooks.probe_model(model, tokens, values)
    result["probes"] = {"rows": report.rows, "r2": report.r2, "random_model_r2": report.random_model_r2}

    sensitivity_tokens = tokens[: sizes["n_sensitivity"]]
    result["sensitivity"] = {}
    for name, reference in (("construction_2step", two), ("construction_1step", one)):
        alignment = hooks.sensitivity_alignment(model, reference, sensitivity_tokens)
        result["sensitivity"][name] = {key: alignment[key] for key in ("cosine", "relative_gap", "prediction_kl")}
    return result


def compare_lines(comparison: dict) -> list[str]:
    """The comparison with the trained model, as summary lines."""
    lines = [f"{comparison['model']} against the tuned 2-step construction at T={comparison['seq_len']}:"]
    for (ref, ours), tv in zip(comparison["attention"]["pairs"], comparison["attention"]["tv"], strict=True):
        lines.append(
            f"  construction layer {paper_layer(ref[0])} ~ model layer {paper_layer(ours[0])}: attention TV {tv:.3f}"
        )
    probes = comparison["probes"]
    for name in ("responsibility", "mean_responsibility", "lambda1", "second_step_mean", "lambda2"):
        r2 = "  ".join(f"{value:6.3f}" for value in probes["r2"][name])
        lines.append(f"  probe R^2 of {name:<19} per reading point (embed, L1..): {r2}")
    for name, values in comparison["sensitivity"].items():
        lines.append(
            f"  sensitivity vs {name}: cosine {values['cosine']:.3f}, prediction KL {values['prediction_kl']:.2e}"
        )
    return lines


THREE_STEP_STYLE = {
    "construction_2step": {"color": "tab:green", "marker": "*", "linestyle": "--"},
    "construction_3step": {"color": "tab:purple", "marker": "*", "linestyle": "-", "linewidth": 2.2},
    "md3_tuned": {"color": "tab:red", "marker": "D", "linestyle": "-"},
}


def plot_ratios(results: list[dict], path: Path) -> Path:
    """Left: mean KL of each variant and of tuned MD1 over tuned MD2's. Right: the constructions, tuned
    MD1-3 and Bayes over tuned MD3's. Against T; writes the PNG."""
    lengths = [row["seq_len"] for row in results]
    panels = (
        ("md2", ("md1_tuned", *VARIANTS), "Forms of MD step 2 against the exact one", VARIANT_STYLE),
        (
            "md3",
            ("md1_tuned", "md2_tuned", "construction_2step", "construction_3step", "bayes_exact"),
            "The tuned constructions against tuned 3-step MD",
            THREE_STEP_STYLE,
        ),
    )
    with plotting.style():
        fig, axes = plotting.new_figure(ncols=2, width=5.5)
        for ax, (reference, names, title, styles) in zip(axes, panels, strict=True):
            for name in names:
                style = styles.get(name) or plotting.method_style(name)
                ax.plot(lengths, [row[f"ratio_to_{reference}"][name] for row in results], label=name, **style)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_xticks(lengths)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(f"mean KL / tuned {reference[-1]}-step MD")
            ax.set_title(title)
            ax.legend(fontsize=7)
        return plotting.save_figure(fig, path)


def run(out_dir: Path, quick: bool = False) -> AnalysisResult:
    """Run the analysis; writes ``two_step.json`` and ``two_step.png`` to ``out_dir``."""
    run_start = start_run(out_dir, quick, FULL, QUICK)
    out_dir, sizes = run_start.out_dir, run_start.sizes
    task = MTDTask(**TASK)
    results = [evaluate_length(task, seq_len, sizes) for seq_len in progress(sizes["lengths"], "two-step")]
    comparison = compare_trained(task, results[-1], sizes)
    report = {
        "config": {"task": TASK, **sizes, "starts": STARTS},
        "results": results,
        "three_step": three_step_table(results),
        "trained_comparison": comparison,
        "summary": summary_lines(results) + compare_lines(comparison),
        "wall_clock_s": run_start.seconds(),
    }
    json_path = out_dir / "two_step.json"
    json_path.write_text(json.dumps(report, indent=1))
    png_path = plot_ratios(results, out_dir / "two_step.png")
    print("\n".join(report["summary"]))
    report["files"] = [str(json_path), str(png_path)]
    return AnalysisResult(report, report["files"])
