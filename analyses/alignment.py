"""Is mirror descent causally inside each model? Distributed alignment search on every model.

For the one-step construction, the two-step construction and every shipped model, and for the MD
variables of each (``VARIABLES``: ``mean_responsibility`` and ``responsibility``; ``lambda1`` and
``second_step_mean`` for the models deep enough for two steps), on pairs of fresh sequences of the
shared task:

1. a **scan** (``hooks.alignment_scan``): DAS at rank ``m`` at the embedding and at every layer's
   ``resid_post``, scored on held-out pairs;
2. the full search (``steps``) at the scan's best hook and at every hook within ``SCAN_TIE`` of it
   (the short scan searches can rank near-equal hooks either way; disentangled-3l's responsibility
   scored 0.22-0.23 at the embedding, L1 and L2), and at the hook where the full search does best,
   DAS again with its controls (``hooks.align_variable``): the probe
   subspace and a random subspace of the same rank, (a) a random-init model of the same
   architecture, (b) the wrong high-level model (B's lag weights cyclically permuted), (c) the
   subspace's own R^2 for the variable and the share of it downstream computation reads; and the
   rank sweep ``m-1..2m`` with the rank where fidelity saturates.

Each model is compared with the MD it behaves like (``hooks.high_level_model``): the construction's
own scales, otherwise the model's effective step fitted to its predictions on the base sequences.
Run with ``mdlens reproduce alignment --out DIR`` (``--quick``: small sizes, under 2 minutes).
Writes ``alignment.json``, one scan figure per model and one control figure per model and variable.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mdlens import MTDTask, hooks
from mdlens import estimators as E
from mdlens.analyses import QUICK_LEFT_OUT, TASK, AnalysisResult, plotting, start_run
from mdlens.construction import build_md_transformer, build_mdk_transformer
from mdlens.hooks.alignment import RESTARTS
from mdlens.pretrained import load_all_pretrained

# The scan finds the hook with short searches (scan_steps); the best hook gets the full search
# (steps) and its controls, the rank sweep shorter ones (sweep_steps).
# The scan covers every layer's resid_post (and the embedding): in a disentangled model each layer's
# attn_out is a block of its resid_post, so the residual holds whatever the attention output does.
# ``restarts``: DAS's random starts beside the probe's (hooks.align_variable).
FULL = {
    "seq_len": 32, "n_pairs": 256, "n_tune": 512, "scan_steps": 20, "steps": 80, "sweep_steps": 20, "sweep": True,
    "restarts": RESTARTS, "left_out": [],
}  # fmt: skip
# --quick, a smoke test of every step but the rank sweep, on small sizes: DAS from the probe's subspace
# alone (no random restart) and the shipped models but mdlens.analyses.QUICK_LEFT_OUT.
QUICK = {
    "seq_len": 12, "n_pairs": 32, "n_tune": 32, "scan_steps": 1, "steps": 2, "sweep_steps": 1, "sweep": False,
    "restarts": 0, "left_out": list(QUICK_LEFT_OUT),
}  # fmt: skip
SCAN_HOOKS = ("resid_post",)
# Hooks whose scan fidelity is within this of the best also get the full search (module docstring).
SCAN_TIE = 0.05
SEEDS = {"tune": 21, "base": 22, "source": 23}
ONE_STEP_VARIABLES = ("mean_responsibility", "responsibility")
TWO_STEP_VARIABLES = ("lambda1", "second_step_mean")
# What each kind of model is asked about: the one-step variables in the one-step construction and the
# 3-layer models; in the 5-layer ones the mean responsibility and the two-step variables (their
# residual is 140-284 wide, which makes the all-position responsibility search the costliest by far);
# the two-step construction, only its two-step variables (its first three layers are the one-step one).
VARIABLES = {
    "one_step": ONE_STEP_VARIABLES,
    "five_layer": ("mean_responsibility", *TWO_STEP_VARIABLES),
    "construction-2step": TWO_STEP_VARIABLES,
}
# A variable counts as causally present at a hook when DAS's held-out fidelity reaches
# PRESENT_FIDELITY (partial: PARTIAL_FIDELITY), the wrong-model control stays at most WRONG_MODEL_MAX,
# the learned subspace holds the variable (its own held-out R^2 at least SUBSPACE_R2_MIN: control (c),
# e.g. an all-position "responsibility" subspace that only carries their mean fails it), and DAS beats
# the same search on a random-init model by at least RANDOM_MODEL_MARGIN (that model's output read
# through a softmax, mdlens.hooks.alignment's docstring: 0.02-0.04 on every shipped architecture).
PRESENT_FIDELITY = 0.9
PARTIAL_FIDELITY = 0.5
WRONG_MODEL_MAX = 0.5
SUBSPACE_R2_MIN = 0.5
RANDOM_MODEL_MARGIN = 0.5


def verdict(result: dict) -> str:
    """``present`` / ``partial`` / ``absent`` for one variable's best hook (thresholds above)."""
    fidelity = result["interchange_fidelity"]
    if fidelity is None:
        return "absent"
    wrong, random_model = result["wrong_model_fidelity"], result["random_model_fidelity"]
    subspace_r2 = result.get("subspace_r2")
    controls_hold = (
        (wrong is None or wrong <= WRONG_MODEL_MAX)
        and (random_model is None or fidelity - random_model >= RANDOM_MODEL_MARGIN)
        and (subspace_r2 is None or subspace_r2 >= SUBSPACE_R2_MIN)
    )
    if fidelity >= PRESENT_FIDELITY and controls_hold:
        return "present"
    if fidelity >= PARTIAL_FIDELITY and controls_hold:
        return "partial"
    return "absent"


def build_models(task: MTDTask, sizes: dict, root=None) -> dict:
    """The constructions and the shipped models (but those in ``sizes["left_out"]``). The one-step
    construction runs tuned MD's step (on ``n_tune`` sequences of length ``seq_len``); the two-step one
    the first-order two-step scales built from it (``a = b2 = c2 = eta m (T - m)``, ``d2 = m``: the second start of
    :func:`mdlens.estimators.default_causal_md_starts`), where both ``lambda1`` and the second-step
    mean move the prediction."""
    pi, m, seq_len = task.transition, task.order, sizes["seq_len"]
    tune = task.sample(sizes["n_tune"], seq_len, generator=torch.Generator().manual_seed(SEEDS["tune"]))
    eta = E.tune_eta_refined(tune.tokens, pi, m, tune.next_probs)["eta"]
    construction = build_md_transformer(pi, m, seq_len, eta)
    beta = construction.md_params["beta"]
    models = {
        "construction": construction,
        "construction-2step": build_mdk_transformer(pi, m, seq_len, steps=2, scales=(beta, beta, beta, float(m))),
    }
    shipped, _ = load_all_pretrained(root)
    return {**models, **{name: model for name, model in shipped.items() if name not in sizes["left_out"]}}


def variables_of(name: str, model) -> tuple[str, ...]:
    if name == "construction-2step":
        return VARIABLES["construction-2step"]
    return VARIABLES["five_layer"] if model.cfg.n_layers >= 5 else VARIABLES["one_step"]


def measure_model(name: str, model, task: MTDTask, tokens_a, tokens_b, sizes: dict, out_dir: Path) -> dict:
    """Scan and controls for every variable of one model (module docstring)."""
    pi, m = task.transition, task.order
    result = {"n_layers": model.cfg.n_layers, "variables": {}}
    for variable in variables_of(name, model):
        high_level = hooks.high_level_model(model, tokens_a, pi, m, steps=2 if variable in TWO_STEP_VARIABLES else 1)
        scan = hooks.alignment_scan(
            model,
            variable,
            tokens_a,
            tokens_b,
            pi,
            m,
            hooks=SCAN_HOOKS,
            high_level=high_level,
            steps=sizes["scan_steps"],
            restarts=sizes["restarts"],
            progress=False,
        )
        contenders = scan_contenders({hook: a.interchange_fidelity for hook, a in scan.alignments.items()})
        full_searches = {}
        if len(contenders) > 1:
            for hook in contenders:
                full_searches[hook] = hooks.align_variable(
                    model, variable, hook, tokens_a, tokens_b, pi, m, high_level=high_level, steps=sizes["steps"],
                    restarts=sizes["restarts"], controls=False, rank_sweep=False,
                ).interchange_fidelity  # fmt: skip
        best = max(full_searches, key=full_searches.get) if full_searches else contenders[0]
        alignment = hooks.align_variable(
            model, variable, best, tokens_a, tokens_b, pi, m, high_level=high_level, steps=sizes["steps"],
            restarts=sizes["restarts"], sweep_steps=sizes["sweep_steps"], rank_sweep=sizes["sweep"],
        )  # fmt: skip
        with plotting.style():
            scan_figure = plotting.save_figure(
                scan.plot(f"{name}: {variable}"), out_dir / f"scan_{name}_{variable}.png"
            )
            control_figure = plotting.save_figure(
                alignment.plot(f"{name}: {variable} at {best}"), out_dir / f"controls_{name}_{variable}.png"
            )
        summary = alignment.to_dict()
        summary["verdict"] = verdict(summary)
        result["variables"][variable] = {
            "scan": scan.to_dict(),
            "full_search_contenders": full_searches,  # hook -> held-out fidelity (empty: one clear best)
            "best": summary,
            "files": [str(scan_figure), str(control_figure)],
        }
    return result


def scan_contenders(scan_fidelity: dict[str, float]) -> list[str]:
    """The hooks whose scan fidelity is within ``SCAN_TIE`` of the best, best first (non-finite ones
    never count)."""
    finite = {hook: f for hook, f in scan_fidelity.items() if f is not None and math.isfinite(f)}
    if not finite:
        raise ValueError("no hook of the scan has a finite fidelity")
    best = max(finite.values())
    return sorted((hook for hook, f in finite.items() if f >= best - SCAN_TIE), key=lambda hook: -finite[hook])


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary_lines(report: dict) -> list[str]:
    lines = []
    for name, result in report["models"].items():
        for variable, entry in result["variables"].items():
            best = entry["best"]
            controls = ", ".join(
                f"{label} {_number(best[key])}"
                for label, key in (
                    ("probe", "probe_fidelity"),
                    ("random subspace", "random_subspace_fidelity"),
                    ("random model", "random_model_fidelity"),
                    ("wrong model", "wrong_model_fidelity"),
                    ("subspace R^2", "subspace_r2"),
                    ("read", "read_fraction"),
                )
            )
            lines.append(
                f"{name} {variable}: {best['verdict']} at {best['hook_name']} "
                f"(DAS {_number(best['interchange_fidelity'])}; {controls}; saturates at rank {best['saturation_rank']})"
            )
    return lines


def run(out_dir: Path, quick: bool = False, root: str | Path | None = None) -> AnalysisResult:
    """Align every variable in every model; write ``alignment.json`` and the figures."""
    run_start = start_run(out_dir, quick, FULL, QUICK)
    out_dir, sizes = run_start.out_dir, run_start.sizes
    task = MTDTask(**TASK)
    models = build_models(task, sizes, root)
    tokens_a = task.sample(sizes["n_pairs"], sizes["seq_len"], generator=torch.Generator().manual_seed(SEEDS["base"]))
    tokens_b = task.sample(sizes["n_pairs"], sizes["seq_len"], generator=torch.Generator().manual_seed(SEEDS["source"]))
    report = {"config": {"quick": quick, "sizes": sizes, "task": TASK}, "models": {}}
    for name, model in tqdm(models.items(), desc="alignment"):
        report["models"][name] = measure_model(name, model, task, tokens_a.tokens, tokens_b.tokens, sizes, out_dir)
    files = [f for result in report["models"].values() for v in result["variables"].values() for f in v["files"]]
    report["files"] = [*files, str(out_dir / "alignment.json")]
    report["wall_clock_s"] = run_start.seconds()
    (out_dir / "alignment.json").write_text(json.dumps(report, indent=1))
    for line in summary_lines(report):
        print(f"[alignment] {line}")
    return AnalysisResult(report, report["files"])
