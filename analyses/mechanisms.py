"""Which parts of the one-step-MD construction does each model implement? (``mdlens.hooks`` on every model)

For the construction (built with tuned one-step MD's step at the context length) and every shipped
model, on the same sequences of the shared task:

- **probes** (``hooks.probe_model``): held-out R^2 of the responsibilities, their mean, one-step MD's
  weights (and their log), two-step MD and Bayes at every reading point (embedding, then each layer's
  ``resid_post``), next to a random-init model of the same architecture and a control target;
- **attention** (``hooks.attention_agreement``): per-layer TV / KL to the construction built with the
  model's *own* step (the ``eta`` whose one-step MD is closest to the model's predictions), with
  layer-ordered matching where depths differ; layer 1's TV to the responsibilities and its mass
  at offset 0 (the query) and at offsets 1..m;
- **weights** (``hooks.learned_transition``, ``hooks.weight_alignment``): the ``pi`` layer 1 stores
  (disentangled models), KL to the true one (the paper: 0.0376), score-matrix cosines; and the paper's
  own form, KL from pi to a softmax of layer 1's token-token scores along either axis or against pi's
  parent posterior, beside the uniform guess's (``hooks.weights.softmax_transition_kl``);
- **behaviour** (``hooks.sensitivity_alignment``, ``hooks.implicit_weights``): input-gradient cosine
  with the construction; the ``lambda`` each model predicts with, against one- and two-step MD, Bayes
  and the true ``lambda`` at every length;
- **patching** (``hooks.patch_mean_responsibility``): B's mean responsibility written into A's run
  (the named block on the construction, the probe's subspace elsewhere: after layer 2, where the
  construction holds it, and where the model's probe is most selective) against the counterfactual
  one-step-MD prediction; and layer x position heatmaps (``hooks.patching_heatmap``);
- **two-step** (``hooks.key_score_correlation``): does any layer's last-position score follow
  ``-<lambda1, gamma_k>`` over the keys, the weighing two-step MD needs (paper-notes §6)?

Run with ``mdlens reproduce mechanisms --out DIR`` (``--quick``: small sizes, under 2 minutes).
Writes ``mechanisms.json``, PNG figures and a summary.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from mdlens import estimators as E
from mdlens import hooks
from mdlens.analyses import QUICK_LEFT_OUT, AnalysisResult, plotting, progress, start_run
from mdlens.construction import build_md_transformer
from mdlens.hooks.weights import PAPER_LEARNED_TRANSITION_KL
from mdlens.jsonable import json_ready
from mdlens.models import DisentangledTransformer
from mdlens.models.layout import layer_label, paper_layer, resid_post_of_layer
from mdlens.pretrained import load_all_pretrained

FULL = {
    "seq_len": 192,
    "n_probe": 512,
    "n_tune": 512,
    "n_attention": 256,
    "n_sensitivity": 32,
    "n_patch": 256,
    "n_heatmap": 16,
    "heatmap_len": 32,
    "n_implicit": 512,
    "lengths": [8, 16, 32, 64, 128, 192],
    "left_out": [],  # shipped models not measured
}
QUICK = {
    "seq_len": 48,
    "n_probe": 64,
    "n_tune": 128,
    "n_attention": 32,
    "n_sensitivity": 8,
    "n_patch": 32,
    "n_heatmap": 4,
    "heatmap_len": 12,
    "n_implicit": 64,
    "lengths": [8, 48],
    "left_out": list(QUICK_LEFT_OUT),  # mdlens.analyses.QUICK_LEFT_OUT
}
SEEDS = {
    "tune": 11,
    "probe": 12,
    "patch_a": 13,
    "patch_b": 14,
    "heatmap_clean": 15,
    "heatmap_corrupt": 16,
    "implicit": 17,
}
PROBE_TARGETS = (
    "responsibility",
    "mean_responsibility",
    "md_weights",
    "log_md_weights",
    "md2_weights",
    "bayes_weights",
)
CONSTRUCTION = "construction"


def _sample(task, batch: int, seq_len: int, seed: int):
    return task.sample(batch, seq_len, generator=torch.Generator().manual_seed(seed))


# Where the construction keeps the mean responsibility: the residual after layer 2. Patching a
# probe's subspace there reaches every later layer (patching the final residual would only reach
# the unembedding).
PATCH_HOOK = resid_post_of_layer(2)
# The construction's named blocks of the probed quantities (probed beside every reading point); a
# model whose layout names them is patched through its named block, any other through a probe.
NAMED_BLOCKS = ("L1.responsibility", "L2.mean_responsibility", "L3.lag_weights")


def named_blocks(model) -> list[str] | None:
    """``NAMED_BLOCKS`` when ``model``'s residual layout names them all (the construction), else None."""
    layout = getattr(model, "layout", None)
    return list(NAMED_BLOCKS) if layout is not None and all(name in layout for name in NAMED_BLOCKS) else None


def measure_model(model, task, data: dict, sizes: dict) -> dict:
    """Every mechanism measurement of one model (module docstring), against the construction with its own step."""
    pi, m, seq_len = task.transition, task.order, sizes["seq_len"]
    eta = hooks.own_step(model, data["tune"].tokens, pi, m)
    beta = E.beta_from_eta(eta, m, seq_len)
    result: dict = {"eta": eta, "beta": beta, "n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads}
    report = probe_report(model, data, pi, m, beta)
    result.update(probe_results(report, named_blocks(model) is not None))
    # Layer order kept: a deeper model's match for construction layer l+1 lies above its match for l.
    comparison = hooks.compare_with_construction(model, data["attention"].tokens, pi, m, eta=eta, matching="ordered")
    result.update(comparison_results(comparison))
    own_construction = comparison.construction
    result["weight_alignment"] = hooks.weight_alignment(
        model, own_construction, tokens=data["patch_a"].tokens[:64], transition=pi, order=m
    )
    result.update(behaviour_results(model, own_construction, data, pi, m))
    result.update(patching_results(model, report, data, pi, m, beta))
    result["two_step_score_correlation"] = two_step_score_correlation(model, data, pi, m, seq_len)
    return result


def probe_report(model, data: dict, pi, m: int, beta: float):
    """Probes of ``PROBE_TARGETS`` at every reading point (and the named blocks), with both controls.
    md2 uses tuned two-step MD's scale (the two-step reference); Bayes is the same for every model."""
    probe_tokens = data["probe"].tokens
    values = hooks.targets(probe_tokens, pi, m, beta=beta, beta2=data["beta_md2"], include_bayes=False)
    values["bayes_weights"] = data["probe_bayes"]
    values = {key: values[key] for key in PROBE_TARGETS}
    return hooks.probe_model(model, probe_tokens, values, blocks=named_blocks(model))


def probe_results(report, with_blocks: bool) -> dict:
    """The probe report's reading points (embedding, then every layer) and, with named blocks, their R^2."""
    layer_rows = [row for row in report.rows if ":" not in row]
    n = len(layer_rows)
    result = {
        "probe_rows": layer_rows,
        "probe_r2": {t: report.r2[t][:n] for t in report.targets},
        "probe_control_r2": {t: report.control_target_r2[t][:n] for t in report.targets},
        "probe_random_model_r2": {t: report.random_model_r2[t][:n] for t in report.targets},
        "probe_selectivity": {t: report.selectivity[t][:n] for t in report.targets},
    }
    if with_blocks:
        result["probe_named_blocks"] = {
            row.partition(":")[2]: {t: report.r2[t][i] for t in report.targets}
            for i, row in enumerate(report.rows)
            if ":" in row
        }
    return result


def comparison_results(comparison: hooks.ConstructionComparison) -> dict:
    """Attention against the construction with the model's own step, layer 1 (the best of its heads)
    against the responsibilities and by offset, and what layer 1's scores store (disentangled models)."""
    result = {
        "attention": comparison.attention.to_dict(),
        "pattern_tv": comparison.attention.tv,
        "responsibility_tv": min(comparison.responsibility_tv),
        "layer1_offset_mass": comparison.offset_mass,
    }
    if comparison.score_block_correlation is not None:
        result["score_block_correlation"] = comparison.score_block_correlation
        result["token_score_block"] = comparison.token_score_block
    return result | {
        "softmax_transition_kl": comparison.softmax_transition_kl,
        "learned_transition": comparison.learned_transition,
        "learned_transition_kl": comparison.learned_transition_kl,
        "learned_transition_reason": comparison.learned_transition_reason,
    }


def behaviour_results(model, own_construction, data: dict, pi, m: int) -> dict:
    """Input sensitivity against the construction, and the implicit weights at every length."""
    sensitivity = hooks.sensitivity_alignment(model, own_construction, data["sensitivity"].tokens)
    result = {
        "sensitivity": {key: value for key, value in sensitivity.items() if not isinstance(value, torch.Tensor)},
        "sensitivity_cosine": sensitivity["cosine"],
        "implicit_weights": {},
    }
    for length, (sample, references) in data["implicit"].items():
        if length <= model.cfg.n_ctx:
            result["implicit_weights"][length] = hooks.implicit_weights_distances(
                model, sample.tokens, pi, m, references
            )
    return result


def patching_results(model, report, data: dict, pi, m: int, beta: float) -> dict:
    """B's mean responsibility written into A's run: through the named block where the model has one,
    else through the probe's subspace after layer 2 and where the probe is most selective; the heatmap."""
    tokens_a, tokens_b = data["patch_a"].tokens, data["patch_b"].tokens
    probe = None if named_blocks(model) else report.probes[(PATCH_HOOK, "mean_responsibility")]
    patch = hooks.patch_mean_responsibility(model, tokens_a, tokens_b, pi, m, beta=beta, probe=probe)
    result = {"patching": patch.to_dict(), "patching_agreement": patch.max_abs_deviation}
    if probe is not None:
        # Also where the model holds the mean responsibility best (the most selective probe, after
        # layer 1): for a model that forms it later than layer 2, e.g. standard-3l. A disentangled
        # model's readout reads only its last layer's block, so its final residual is left out there:
        # a patch of the earlier blocks it carries could not reach the output.
        selectivity = report.selectivity["mean_responsibility"]
        last = len(report.rows) - (1 if isinstance(model, DisentangledTransformer) else 0)
        best = max(range(1, last), key=lambda row: selectivity[row])
        if report.rows[best] != PATCH_HOOK:
            best_probe = report.probes[(report.rows[best], "mean_responsibility")]
            best_patch = hooks.patch_mean_responsibility(model, tokens_a, tokens_b, pi, m, beta=beta, probe=best_probe)
            result["patching_most_selective"] = best_patch.to_dict()
        else:
            result["patching_most_selective"] = result["patching"]
    heatmap_clean, heatmap_corrupt = data["heatmap_clean"].tokens, data["heatmap_corrupt"].tokens
    result["patching_heatmap"] = hooks.patching_heatmap(model, heatmap_clean, heatmap_corrupt)
    return result


def two_step_score_correlation(model, data: dict, pi, m: int, seq_len: int) -> list:
    """Correlation of each layer's last-position scores with ``-<lambda1, gamma_k>`` over keys ``k > m``."""
    tokens = data["probe"].tokens[:128]
    lambda1 = E.md_weights(tokens, pi, m, data["eta_md1"])  # [B, m], the final first step
    gamma = E.responsibilities(tokens, pi, m)  # [B, T-m, m]
    key_quantity = torch.full(tokens.shape, float("nan"), dtype=torch.float64)
    key_quantity[:, m:] = -torch.einsum("bg,bkg->bk", lambda1, gamma)
    return hooks.key_score_correlation(model, tokens, key_quantity, first_key=m, last_key=seq_len - 2)


def prepare_data(task, sizes: dict) -> dict:
    """Every batch of sequences, the tuned steps and the references of the implicit weights."""
    pi, m, seq_len = task.transition, task.order, sizes["seq_len"]
    data = {
        "tune": _sample(task, sizes["n_tune"], seq_len, SEEDS["tune"]),
        "probe": _sample(task, sizes["n_probe"], seq_len, SEEDS["probe"]),
        "patch_a": _sample(task, sizes["n_patch"], seq_len, SEEDS["patch_a"]),
        "patch_b": _sample(task, sizes["n_patch"], seq_len, SEEDS["patch_b"]),
        "heatmap_clean": _sample(task, sizes["n_heatmap"], sizes["heatmap_len"], SEEDS["heatmap_clean"]),
        "heatmap_corrupt": _sample(task, sizes["n_heatmap"], sizes["heatmap_len"], SEEDS["heatmap_corrupt"]),
    }
    data["attention"] = _sample(task, sizes["n_attention"], seq_len, SEEDS["probe"])
    data["sensitivity"] = _sample(task, sizes["n_sensitivity"], seq_len, SEEDS["probe"])
    tune = data["tune"]
    data["eta_md1"] = E.tune_eta_refined(tune.tokens, pi, m, tune.next_probs, steps=1)["eta"]
    data["eta_md2"] = E.tune_eta_refined(tune.tokens, pi, m, tune.next_probs, steps=2)["eta"]
    data["beta_md2"] = E.beta_from_eta(data["eta_md2"], m, seq_len)
    data["probe_bayes"] = hooks.targets(data["probe"].tokens, pi, m, alpha=task.alpha)["bayes_weights"]
    data["implicit"] = {}
    for length in progress(sizes["lengths"], "mechanisms (references)"):
        length_tune = _sample(task, sizes["n_tune"], length, SEEDS["tune"] + 1000 * length)
        sample = _sample(task, sizes["n_implicit"], length, SEEDS["implicit"] + 1000 * length)
        etas = {
            steps: E.tune_eta_refined(length_tune.tokens, pi, m, length_tune.next_probs, steps=steps)["eta"]
            for steps in (1, 2)
        }
        references = {
            "md1_tuned": E.md_weights(sample.tokens, pi, m, etas[1]),
            "md2_tuned": E.md_weights(sample.tokens, pi, m, etas[2], steps=2),
            "bayes_exact": E.bayes_weights(sample.tokens, pi, m, alpha=task.alpha),
            "true": sample.weights,
        }
        data["implicit"][length] = (sample, references)
    return data


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

MODEL_COLOURS = {
    CONSTRUCTION: "tab:green",
    "disentangled-3l": "tab:purple",
    "disentangled-3l-long": "tab:blue",
    "disentangled-5l": "tab:pink",
    "standard-3l": "black",
}


def plot_probes(results: dict, path: Path) -> Path:
    """R^2 per reading point, one row per model, one column per target, controls dashed."""
    names = list(results)
    with plotting.style():
        fig, axes = plotting.plt.subplots(
            len(names),
            len(PROBE_TARGETS),
            figsize=(2.6 * len(PROBE_TARGETS), 2.3 * len(names)),
            squeeze=False,
            sharey=True,
        )
        for row, name in enumerate(names):
            r = results[name]
            x = list(range(len(r["probe_rows"])))
            labels = ["emb"] + [layer_label(block) for block in range(len(x) - 1)]  # rows: embed, resid_post
            for col, target in enumerate(PROBE_TARGETS):
                ax = axes[row][col]
                ax.plot(x, r["probe_r2"][target], "o-", color=MODEL_COLOURS.get(name, "tab:blue"), label="model")
                ax.plot(
                    x, r["probe_random_model_r2"][target], "s--", color="0.55", markersize=3, label="random-init model"
                )
                ax.plot(x, r["probe_control_r2"][target], "x:", color="tab:red", markersize=4, label="control target")
                ax.set_xticks(x, labels, fontsize=7)
                ax.set_ylim(-0.15, 1.05)
                if row == 0:
                    ax.set_title(target, fontsize=8)
                if col == 0:
                    ax.set_ylabel(f"{name}\nheld-out $R^2$", fontsize=8)
        axes[0][-1].legend(fontsize=6, loc="lower right")
        fig.suptitle("Linear probes of the algorithm's quantities, layer by layer (T = positions m+1..T)", fontsize=10)
        return plotting.save_figure(fig, path)


def plot_attention(results: dict, path: Path) -> Path:
    """Per-layer TV to the construction (own step), and layer 1's mass by offset."""
    names = list(results)
    with plotting.style():
        fig, (left, right) = plotting.new_figure(ncols=2, width=5.2, height=3.6)
        for name in names:
            tvs = results[name]["pattern_tv"]
            left.plot(range(1, len(tvs) + 1), tvs, "o-", color=MODEL_COLOURS.get(name), label=name)
            for head, tv in zip(results[name]["attention"]["heads"], tvs, strict=True):  # which model layer was matched
                if head["model_layer"] != head["reference_layer"]:
                    left.annotate(
                        layer_label(head["model_layer"]),
                        (head["reference_layer"] + 1, tv),
                        fontsize=7,
                        xytext=(4, 4),
                        textcoords="offset points",
                        color=MODEL_COLOURS.get(name),
                    )
        left.set_xticks(range(1, len(tvs) + 1))
        left.set_xlabel("construction layer (model layer matched in order, named where it differs)")
        left.set_ylabel("mean TV(model pattern, construction pattern)")
        left.set_title("Attention vs the construction with the model's own step", fontsize=9)
        left.set_ylim(0, 1)
        left.legend(fontsize=7)
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            mass = results[name]["layer1_offset_mass"][0]  # head 0, offsets 0..m
            right.bar(
                [o + i * width for o in range(len(mass))], mass, width=width, color=MODEL_COLOURS.get(name), label=name
            )
        right.set_xticks([o + 0.4 for o in range(len(mass))], ["0 (self)"] + [str(o) for o in range(1, len(mass))])
        right.set_xlabel("offset i - j")
        right.set_ylabel("mean layer-1 attention mass")
        right.set_title("Layer 1: mass on the lag window 1..m vs the query itself", fontsize=9)
        return plotting.save_figure(fig, path)


def plot_learned_transition(results: dict, transition: torch.Tensor, path: Path) -> Path:
    """True pi, the pi layer 1 encodes where one is identified, and every disentangled model's layer-1
    token-token score block (rows centred: what attention can see), beside the construction's (log pi)^T."""
    with_scores = [name for name, r in results.items() if r.get("token_score_block") is not None]
    learned = [name for name, r in results.items() if r.get("learned_transition") is not None and name != CONSTRUCTION]
    with plotting.style():
        fig, axes = plotting.new_figure(ncols=1 + len(learned) + len(with_scores), width=2.9, height=3.0)
        panels = [(axes[0], "true $\\pi$ (row = parent a)", transition, "viridis", (0, 1))]
        panels += [
            (
                ax,
                f"{name}: learned $\\pi$\nKL {results[name]['learned_transition_kl']:.3g}",
                torch.as_tensor(results[name]["learned_transition"]),
                "viridis",
                (0, 1),
            )
            for ax, name in zip(axes[1:], learned, strict=False)
        ]  # the score panels follow
        for ax, name in zip(axes[1 + len(learned) :], with_scores, strict=True):
            scores = torch.as_tensor(results[name]["token_score_block"])
            scores = scores - scores.mean(dim=1, keepdim=True)
            corr = results[name]["score_block_correlation"]
            limit = float(scores.abs().max())
            title = (
                f"{name}: layer-1 scores\ncorr $(\\log\\pi)^T$ {corr['log_transition_T']:+.2f}, "
                f"$-\\pi^T$ {corr['neg_transition_T']:+.2f}"
            )
            panels.append((ax, title, scores, "RdBu_r", (-limit, limit)))
        for ax, title, matrix, cmap, (low, high) in panels:
            image = ax.imshow(torch.as_tensor(matrix).numpy(), vmin=low, vmax=high, cmap=cmap)
            ax.set_title(title, fontsize=7)
            ax.grid(False)
            fig.colorbar(image, ax=ax, fraction=0.046)
        axes[0].set_xlabel("next token b")
        for ax in axes[1 + len(learned) :]:
            ax.set_xlabel("key token (parent)")
            ax.set_ylabel("query token (child)")
        missing = [name for name in with_scores if results[name].get("learned_transition_reason")]
        if missing:
            fig.text(0.01, 0.01, "no row-stochastic pi gives these scores for: " + ", ".join(missing), fontsize=7)
        return plotting.save_figure(fig, path)


def plot_implicit(results: dict, path: Path) -> Path:
    """Mean L1 distance of each model's implicit weights to each estimator, against T."""
    references = ["md1_tuned", "md2_tuned", "bayes_exact", "true"]
    names = [n for n in results if n != CONSTRUCTION]
    with plotting.style():
        fig, axes = plotting.new_figure(ncols=len(names), width=3.6, height=3.2)
        for ax, name in zip(axes, names, strict=True):
            per_length = results[name]["implicit_weights"]
            lengths = sorted(per_length, key=int)
            for reference in references:
                colour = "black" if reference == "true" else plotting.method_style(reference)["color"]
                ax.plot(
                    [int(t) for t in lengths],
                    [per_length[t][reference] for t in lengths],
                    "o-",
                    label=reference,
                    color=colour,
                )
            ax.set_xscale("log")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("sequence length T")
        axes[0].set_ylabel("mean L1(implicit $\\lambda$, estimator's $\\lambda$)")
        axes[-1].legend(fontsize=7)
        return plotting.save_figure(fig, path)


def plot_attention_maps(models: dict, tokens: torch.Tensor, order: int, path: Path) -> Path:
    """Every layer's attention pattern on one short sequence, one row per model (the paper's
    attention-map figure, with the construction on top for comparison)."""
    patterns = {}
    for name, model in models.items():
        names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens[None], names_filter=names)
        patterns[name] = [cache[hook][0, 0].to(torch.float64).numpy() for hook in names]  # head 0
    n_cols = max(len(p) for p in patterns.values())
    labels = [f"{i + 1}" if i % 4 == 3 else "" for i in range(tokens.numel())]
    with plotting.style():
        fig, axes = plotting.plt.subplots(
            len(patterns), n_cols, figsize=(2.2 * n_cols, 2.3 * len(patterns)), squeeze=False
        )
        for row, (name, layers) in enumerate(patterns.items()):
            for col in range(n_cols):
                ax = axes[row][col]
                ax.grid(False)
                if col >= len(layers):
                    ax.axis("off")
                    continue
                ax.imshow(layers[col], vmin=0, vmax=1, cmap="Blues")
                ax.axhline(order - 0.5, color="tab:red", linewidth=0.6)  # rows below: t > m
                ax.set_xticks(range(tokens.numel()), labels, fontsize=6)
                ax.set_yticks(range(tokens.numel()), labels, fontsize=6)
                if row == 0 or col >= 3:
                    ax.set_title(f"layer {paper_layer(col)}", fontsize=8)
                if col == 0:
                    ax.set_ylabel(f"{name}\nquery position", fontsize=8)
                if row == len(patterns) - 1:
                    ax.set_xlabel("key position", fontsize=7)
        fig.suptitle(f"Attention patterns (head 0) on one sequence of T={tokens.numel()}; red line: t = m", fontsize=9)
        return plotting.save_figure(fig, path)


def plot_heatmaps(results: dict, path: Path) -> Path:
    names = list(results)
    with plotting.style():
        fig, axes = plotting.plt.subplots(len(names), 1, figsize=(7.5, 1.3 + 1.1 * len(names)), squeeze=False)
        for ax, name in zip(axes[:, 0], names, strict=True):
            heatmap = torch.as_tensor(results[name]["patching_heatmap"]).numpy()
            image = ax.imshow(heatmap, aspect="auto", cmap="magma")
            ax.set_ylabel(f"{name}\nlayer", fontsize=7)
            ax.set_yticks(range(heatmap.shape[0]))
            ax.grid(False)
            fig.colorbar(image, ax=ax, fraction=0.03)
        axes[-1, 0].set_xlabel("position patched (resid_pre, clean <- corrupt)")
        fig.suptitle("KL(clean || patched) of the next-token distribution", fontsize=9)
        return plotting.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Summary and entry point
# ----------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def summary_lines(report: dict) -> list[str]:
    lines = []
    for name, r in report["models"].items():
        lines.append(f"== {name} (own eta {r['eta']:.4g}, beta {r['beta']:.3g})")
        for target in ("responsibility", "mean_responsibility", "log_md_weights", "md2_weights"):
            cells = ", ".join(
                f"{_fmt(a, 2)}({_fmt(c, 2)})"
                for a, c in zip(r["probe_r2"][target], r["probe_control_r2"][target], strict=True)
            )
            lines.append(f"   R^2 {target:<20} by layer emb..L{len(r['probe_rows']) - 1} (control target): {cells}")
        lines.append("   pattern TV to the construction per layer: " + ", ".join(_fmt(v) for v in r["pattern_tv"]))
        mass = torch.as_tensor(r["layer1_offset_mass"])[0]
        lines.append(
            f"   layer 1: TV to responsibilities {_fmt(r['responsibility_tv'])}, mass on self {_fmt(float(mass[0]))}, "
            f"on offsets 1..m {_fmt(float(mass[1:].sum()))}"
        )
        if r.get("score_block_correlation"):
            corr = r["score_block_correlation"]
            lines.append(
                "   layer-1 token scores (rows centred) corr with "
                + ", ".join(f"{k} {_fmt(v)}" for k, v in corr.items())
            )
        lines.append(
            f"   learned transition KL {_fmt(r['learned_transition_kl'], 4)}"
            + (f" ({r['learned_transition_reason']})" if r["learned_transition_reason"] else "")
        )
        if r.get("softmax_transition_kl"):
            lines.append(
                f"   KL(pi || softmax of layer-1 scores), the paper's {PAPER_LEARNED_TRANSITION_KL}: "
                + ", ".join(f"{k} {_fmt(v, 4)}" for k, v in r["softmax_transition_kl"].items())
            )
        lines.append(
            f"   sensitivity cosine to the construction {_fmt(r['sensitivity_cosine'])}; patching: "
            f"max |patched - counterfactual MD| {_fmt(r['patching_agreement'], 4)}, KL patched "
            f"{_fmt(r['patching'].get('kl_patched'), 4)} / unpatched {_fmt(r['patching'].get('kl_unpatched'), 4)}"
            f" / random subspace {_fmt(r['patching'].get('kl_random'), 4)}"
        )
        implicit = r["implicit_weights"]
        for length in sorted(implicit, key=int):
            d = implicit[length]
            lines.append(
                f"   implicit lambda at T={length}: L1 to " + ", ".join(f"{k} {_fmt(v)}" for k, v in d.items())
            )
        lines.append(
            "   last-position score corr with -<lambda1, gamma_k>, per layer: "
            + ", ".join(_fmt(heads[0]) for heads in r["two_step_score_correlation"])
        )
    lines.append(f"total time {report['timings']['total_seconds']:.1f} s")
    return lines


def run(out_dir: Path, quick: bool = False, root: str | Path | None = None) -> AnalysisResult:
    """Measure the construction and every shipped model; write ``mechanisms.json``, PNGs, a summary."""
    run_start = start_run(out_dir, quick, FULL, QUICK)
    out_dir, sizes = run_start.out_dir, run_start.sizes
    models, task = load_all_pretrained(root)
    models = {name: model for name, model in models.items() if name not in sizes["left_out"]}
    pi, m = task.transition, task.order
    data = prepare_data(task, sizes)
    construction = build_md_transformer(pi, m, sizes["seq_len"], data["eta_md1"])
    all_models = {CONSTRUCTION: construction, **models}

    results, timings = {}, {}
    for name in progress(all_models, "mechanisms", name="model"):
        model, model_start = all_models[name], time.perf_counter()
        results[name] = json_ready(measure_model(model, task, data, sizes))
        timings[name] = time.perf_counter() - model_start

    report = {
        "config": {
            "task": {"vocab_size": task.vocab_size, "order": m, "alpha": task.alpha, "seed": task.seed},
            "quick": quick,
            **sizes,
            "seeds": SEEDS,
            "eta_md1": data["eta_md1"],
            "eta_md2": data["eta_md2"],
            "paper_learned_transition_kl": PAPER_LEARNED_TRANSITION_KL,
            "protocol": (
                "probes: held-out R^2 (20% of sequences held out, ridge by 5-fold grouped CV) at positions "
                "t > m; index 0 = hook_embed, then blocks.{l}.hook_resid_post. md_weights / log_md_weights "
                "use each model's own step (eta whose one-step MD is closest to its predictions), "
                "md2_weights tuned two-step MD's. Attention is compared with the construction built with the "
                "model's own step. Implicit weights: mean L1 after merging lags that point at the same token."
            ),
        },
        "models": results,
        "timings": {**timings},
    }
    files = [
        plot_probes(results, out_dir / "mechanisms_probes.png"),
        plot_attention(results, out_dir / "mechanisms_attention.png"),
        plot_learned_transition(results, pi, out_dir / "mechanisms_learned_transition.png"),
        plot_implicit(results, out_dir / "mechanisms_implicit_weights.png"),
        plot_heatmaps(results, out_dir / "mechanisms_patching_heatmaps.png"),
        plot_attention_maps(all_models, data["heatmap_clean"].tokens[0], m, out_dir / "mechanisms_attention_maps.png"),
    ]
    # CircuitsVis head views (offline HTML): each trained model beside the construction, same sequence.
    view_sample = data["heatmap_clean"]
    for name, model in models.items():
        view = hooks.compare_attention_view(
            model, construction, view_sample.tokens, lags=view_sample.lags, names=(name, CONSTRUCTION)
        )
        files.append(view.save(out_dir / f"heads_{name}_vs_construction.html"))
    json_path = out_dir / "mechanisms.json"
    report["timings"]["total_seconds"] = run_start.seconds()
    report["files"] = [str(json_path), *map(str, files)]
    report["summary"] = summary_lines(report)
    json_path.write_text(json.dumps(json_ready(report), indent=1))
    print("\n".join(report["summary"]))
    return AnalysisResult(report, report["files"])
