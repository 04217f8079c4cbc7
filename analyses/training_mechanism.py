"""Which recipe factors decide whether a trained 3-layer model learns the paper's mechanism?

The shipped ``disentangled-3l`` predicts like tuned one-step MD, but its layer 1 is not the
construction's responsibility layer: its token-token scores follow ``-pi^T`` (+0.92), not
``(log pi)^T`` (README, "What the models compute inside"). This study trains 3-layer disentangled
models from one base recipe, changing ONE factor at a time, and measures each model *during*
training (every ``measure_every`` steps, through :func:`mdlens.training.train`'s callback) with the
``mdlens.hooks`` probes:

- ``corr_log_pi`` / ``corr_neg_pi``: ``hooks.score_block_correlation`` of layer 1's token-token
  scores (rows centred) with ``(log pi)^T`` (the construction: 1) and with ``-pi^T`` (the shipped
  models: +0.92);
- ``learned_transition_kl``: ``hooks.learned_transition_kl`` (the paper: 0.0376 at T=192); ``None``
  where no row-stochastic ``pi`` gives the scores (``learned_transition`` raises);
- the paper's own form, KL from pi to a softmax of layer 1's token-token scores
  (``hooks.weights.softmax_transition_kl``): ``softmax_over_keys_vs_pi``, ``softmax_over_queries_vs_pi``
  and ``softmax_over_keys_vs_parent_posterior`` (the curve plotted: what attention computes), beside the
  uniform guess's ``uniform_vs_pi`` / ``uniform_vs_parent_posterior``;
- ``responsibility_tv``: layer 1's attention against the responsibilities (``hooks.responsibility_tv``);
- ``layer2_tv`` / ``layer3_tv``: ``hooks.attention_agreement`` (layerwise) against the construction
  built with the model's *own* step (the ``eta`` whose one-step MD is closest to the model's
  predictions): its layer 2 is uniform over keys ``m+1..t`` at every query ``t``, its layer 3 is
  ``softmax(beta * Gamma_bar)`` on the keys ``t+1-g``;
- ``layer1_self_mass``: layer 1's mass on the query itself (``hooks.offset_mass``, offset 0);
- ``kl_model`` / ``kl_md1`` / ``kl_ratio``: the model's KL to the truth on the held-out batch of
  :func:`mdlens.training.held_out_batch` (the one ``train`` evaluates on) against tuned one-step MD on
  the same batch.

Recipes (``RECIPES``): ``base`` is the recipe of the shipped model's first stage at CPU size (MSE on
every position, ``init_std`` 0.02, all four positional terms trainable); the others change one of:
targets (``last``: the paper's, one target per sequence), loss (``ce``: the model then outputs
logits), initial scale (``init_std``), and the per-key-position score ``key_pos_score``, the one
positional term the paper's model does not have (``rel_score``, ``rel_query`` and ``rel_value`` are
the paper's relative position encodings): with ``key_pos: False`` it stays frozen at zero. Two more
change a factor in which the shipped model's first training stage differs from base: the learning
rate (0.03) and the position weighting (``(t - m)^-0.5``); ``paper`` changes two factors at once
(targets last, no ``key_pos``), and ``-seed1`` recipes repeat one with another seed (``seed``: the
model's initialisation and the training batches). The number of steps is the x-axis of every curve.
``pos-weight-1`` / ``-2`` lean on long prefixes instead; their ``-long`` versions run 40000 steps at
T=192 (``LONG_SIZES``). The ``layer1-only`` recipes ask a narrower question: with layers 2-3 and the
readout set to the construction's and frozen (``upper: "construction"``), does training layer 1
alone find the responsibilities (on every position, on the last one, and on the last one for longer)?

Run with ``mdlens reproduce training-mechanism --out DIR`` (``--quick``: a few dozen steps). Each
recipe's curves are written to ``DIR/recipes/<name>.json`` and its model to ``DIR/recipes/<name>/``
as it finishes; a later run with the same sizes reuses them instead of training again, so recipes
can be trained in separate processes (:func:`train_recipe`) and collected by one ``run``.
:func:`train_command_fields` gives the ``mdlens train --config`` fields that train a recipe's model
to the same weights (how ``disentangled-3l-long`` was shipped). Writes ``training_mechanism.json``
and three figures (``FIGURES``). Not part of ``mdlens reproduce all``: it trains models.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mdlens import MTDTask, hooks
from mdlens.analyses import TASK, AnalysisResult, plotting, start_run
from mdlens.checkpoints import save
from mdlens.construction import build_md_transformer
from mdlens.evaluation import evaluate
from mdlens.hooks.weights import PAPER_LEARNED_TRANSITION_KL
from mdlens.jsonable import json_ready
from mdlens.models import DisentangledTransformer
from mdlens.models.disentangled import DEFAULT_INIT_STD
from mdlens.training import RUNTIME_FIELDS, TrainConfig, held_out_batch, train

FULL = {
    "seq_len": 128,
    "steps": 10000,
    "batch_size": 16,
    "lr": 0.01,
    "warmup_steps": 100,
    "measure_every": 250,
    "n_measure": 64,  # sequences for the attention measurements and the model's own step
    "n_eval": 512,  # held-out sequences for the KL (and as many to tune MD's step on)
}
QUICK = {
    "seq_len": 16,
    "steps": 20,
    "batch_size": 8,
    "lr": 0.01,
    "warmup_steps": 5,
    "measure_every": 10,
    "n_measure": 8,
    "n_eval": 32,
}
# One factor changed at a time from ``base``. Keys: TrainConfig fields (over the sizes'), plus
# ``init_std`` (the model's) and ``key_pos`` (False: no per-key-position score term, as in the paper).
BASE = {"targets": "all", "loss": "mse", "init_std": 0.02, "key_pos": True}
RECIPES = {
    "base": {},
    "targets-last": {"targets": "last"},
    "loss-ce": {"loss": "ce"},
    "init-0.2": {"init_std": 0.2},
    "init-0.002": {"init_std": 0.002},
    "no-key-pos": {"key_pos": False},
    # Not one factor: the paper's recipe as far as it differs from base (targets last, no key_pos).
    "paper": {"targets": "last", "key_pos": False},
    # Two more ways the shipped model's first stage differs from base: its learning rate and its
    # position weighting (TrainConfig fields; base takes lr from the sizes and weights uniformly).
    "lr-0.03": {"lr": 0.03},
    "pos-weight--0.5": {"position_weight_exponent": -0.5},
    # The other way: leaning on long prefixes (where one fixed beta is closer to the tuned step).
    "pos-weight-1": {"position_weight_exponent": 1.0},
    "pos-weight-2": {"position_weight_exponent": 2.0},
    # The two at the paper's context length, four times longer (LONG_SIZES): the candidates for a
    # shipped model with the paper's layer 1.
    "pos-weight-1-long": {"position_weight_exponent": 1.0},
    "pos-weight-2-long": {"position_weight_exponent": 2.0},
    "lr-0.003": {"lr": 0.003},
    "lr-0.02": {"lr": 0.02},
    # Not a recipe change but a question: with the construction's layers 2-3 and readout given (and
    # frozen), does training layer 1 alone find the responsibilities (log pi)^T?
    "layer1-only": {"upper": "construction"},
    # The same on the last position only, where the construction's one beta is tuned MD's step.
    "layer1-only-last": {"upper": "construction", "targets": "last"},
    "layer1-only-last-long": {"upper": "construction", "targets": "last"},
    # Replicates with another seed (of the initialisation and of the training batches).
    "base-seed1": {"seed": 1},
    "lr-0.03-seed1": {"lr": 0.03, "seed": 1},
    "loss-ce-seed1": {"loss": "ce", "seed": 1},
    "lr-0.02-seed1": {"lr": 0.02, "seed": 1},
    "pos-weight-1-seed1": {"position_weight_exponent": 1.0, "seed": 1},
    "targets-last-seed1": {"targets": "last", "seed": 1},
}
# Recipes trained longer, and at the paper's context length, than FULL (the full study only; --quick
# trains every recipe at QUICK): name -> the sizes that differ from FULL.
LONG = {"seq_len": 192, "steps": 40000, "measure_every": 2000}
LONG_SIZES: dict[str, dict] = {"pos-weight-1-long": LONG, "pos-weight-2-long": LONG, "layer1-only-last-long": LONG}
MODEL_SETTINGS = ("init_std", "key_pos", "upper")  # the recipe keys that are not TrainConfig fields
MEASURE_SEED = 21
EVAL_SEED = 1234
MODEL_SEED = 0
CURVES = (
    "corr_log_pi",
    "corr_neg_pi",
    "learned_transition_kl",
    "softmax_over_keys_vs_parent_posterior",
    "responsibility_tv",
    "layer1_self_mass",
    "layer2_tv",
    "layer3_tv",
    "kl_ratio",
)


def recipe_sizes(name: str, quick: bool = False) -> dict:
    """The sizes recipe ``name`` trains and is measured at: ``QUICK``, or ``FULL`` with its ``LONG_SIZES``."""
    return dict(QUICK) if quick else FULL | LONG_SIZES.get(name, {})


def recipe_settings(name: str) -> dict:
    """The full recipe ``name``: ``BASE`` with its one change."""
    return {**BASE, **RECIPES[name]}


def make_task() -> MTDTask:
    return MTDTask(**TASK)


def build_model(task: MTDTask, settings: dict, seq_len: int, eta: float | None = None) -> DisentangledTransformer:
    """The untrained 3-layer model of a recipe (``key_pos`` False: ``key_pos_score`` frozen at zero),
    initialised from the recipe's ``seed`` (default ``MODEL_SEED``).

    With ``upper: "construction"``, layers 2 and 3 and the readout are those of
    ``build_md_transformer(pi, m, seq_len, eta)`` and frozen: only layer 1 (freshly initialised) trains.
    """
    model = DisentangledTransformer.from_task(
        task,
        seq_len,
        n_layers=3,
        seed=settings.get("seed", MODEL_SEED),
        init_std=settings["init_std"],
        output="logits" if settings["loss"] == "ce" else "probs",
    )
    if not settings["key_pos"]:
        for block in model.blocks:
            block.attn.key_pos_score.requires_grad_(False)  # train() optimises only what requires grad
    if settings.get("upper", "trained") == "construction":
        if eta is None:
            raise ValueError("upper='construction' needs the construction's step eta")
        construction = build_md_transformer(task.transition, task.order, seq_len, eta)
        for name in ("blocks.1", "blocks.2", "unembed"):
            upper = model.get_submodule(name)
            upper.load_state_dict(construction.get_submodule(name).state_dict())  # float64 -> float32
            upper.requires_grad_(False)
    return model


def train_config(settings: dict, sizes: dict) -> TrainConfig:
    """The recipe's TrainConfig: the sizes, then the recipe's TrainConfig fields over them."""
    fields = dict(
        steps=sizes["steps"],
        batch_size=sizes["batch_size"],
        seq_len=sizes["seq_len"],
        lr=sizes["lr"],
        warmup_steps=sizes["warmup_steps"],
        eval_every=sizes["measure_every"],
        eval_batch_size=sizes["n_eval"],
        eval_seed=EVAL_SEED,
        eval_bayes=False,
        seed=MODEL_SEED,
        device="cpu",
        progress=False,
    ) | {key: value for key, value in settings.items() if key not in MODEL_SETTINGS}
    return TrainConfig(**fields)


def train_command_fields(name: str, quick: bool = False) -> dict:
    """The ``mdlens train --config`` fields that train recipe ``name`` to the same weights as
    :func:`train_recipe` (``tests/test_analyses_training_mechanism.py`` checks it): how a recipe's model
    is shipped. ``ValueError`` for a recipe the command cannot express (an ``init_std`` other than the
    model's default, or a frozen ``key_pos_score``)."""
    settings = recipe_settings(name)
    if settings["init_std"] != DEFAULT_INIT_STD or not settings["key_pos"] or "upper" in settings:
        raise ValueError(f"recipe {name!r} changes the model ({settings}); mdlens train builds the default one")
    config = asdict(train_config(settings, recipe_sizes(name, quick)))
    recipe = {key: value for key, value in config.items() if key not in RUNTIME_FIELDS}
    task = {"vocab": TASK["vocab_size"], "order": TASK["order"], "alpha": TASK["alpha"], "task_seed": TASK["seed"]}
    return {"model": "disentangled", "layers": 3, **task, **recipe}


@torch.no_grad()
def measure(model: DisentangledTransformer, task: MTDTask, tokens: torch.Tensor) -> dict:
    """Every curve of the module docstring except the KLs, for ``model`` as it is now."""
    pi, m = task.transition, task.order
    was_training = model.training
    model.eval()
    try:
        eta = hooks.own_step(model, tokens, pi, m)
    except ValueError:  # a "probs" output row with no positive entry (early in training): no prediction
        eta = None
    # Without the model's own step, layer 3's reference is undefined; layers 1 and 2 do not depend on it.
    comparison = hooks.compare_with_construction(
        model, tokens, pi, m, eta=1.0 if eta is None else eta, matching="layerwise"
    )
    tv = comparison.attention.tv
    result = {
        "corr_log_pi": comparison.score_block_correlation["log_transition_T"],
        "corr_neg_pi": comparison.score_block_correlation["neg_transition_T"],
        "learned_transition_kl": comparison.learned_transition_kl,
        "learned_transition_reason": comparison.learned_transition_reason,
        **comparison.softmax_transition_kl,
        "responsibility_tv": comparison.responsibility_tv[0],
        "layer1_self_mass": float(comparison.offset_mass[0, 0]),
        "layer1_tv": tv[0],
        "layer2_tv": tv[1],
        "layer3_tv": None if eta is None else tv[2],
        "own_eta": eta,
    }
    model.train(was_training)
    return result


def _with_kl(step: int, measured: dict, evaluation: dict) -> dict:
    """A point of the curve: the measurements and the held-out KLs (``inf`` -> ``None`` in the JSON)."""
    kl_model, kl_md1 = evaluation["kl_model"], evaluation["kl_md1"]
    return json_ready({"step": step, **measured, "kl_model": kl_model, "kl_md1": kl_md1, "kl_ratio": kl_model / kl_md1})


def train_recipe(name: str, out_dir: Path, quick: bool = False) -> dict:
    """Train recipe ``name`` and measure it every ``measure_every`` steps (and at step 0).

    Writes ``out_dir / "recipes" / f"{name}.json"`` and returns its content; if that file already
    holds this recipe at these sizes with every measurement of ``SUMMARY_KEYS``, returns it without
    training. The trained model is saved in ``out_dir / "recipes" / name``
    (:func:`mdlens.checkpoints.save`), loadable with ``checkpoints.load``.
    """
    sizes = recipe_sizes(name, quick)
    settings = recipe_settings(name)
    path = Path(out_dir) / "recipes" / f"{name}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        # A record from before a measurement was added lacks it: trained again, not reused.
        if saved["settings"] == settings and saved["sizes"] == sizes and set(SUMMARY_KEYS) <= set(saved["final"]):
            return saved
    task = make_task()
    config = train_config(settings, sizes)
    held_out = held_out_batch(task, config)  # the batch train() evaluates on, handed to it below
    model = build_model(task, settings, sizes["seq_len"], eta=held_out.references["eta_md1"])
    tokens = task.sample(
        sizes["n_measure"], sizes["seq_len"], generator=torch.Generator().manual_seed(MEASURE_SEED)
    ).tokens

    curve = [_with_kl(0, measure(model, task, tokens), {"kl_model": evaluate(model, held_out), **held_out.references})]
    measure_s = 0.0

    def callback(step: int, model, evaluation: dict) -> None:
        nonlocal measure_s
        start = time.perf_counter()
        curve.append(_with_kl(step, measure(model, task, tokens), evaluation))
        measure_s += time.perf_counter() - start

    torch.manual_seed(0)  # nothing here should draw from the global generator; pinned in case
    result = train(model, task, config, callback=callback, held_out=held_out)
    record = {
        "name": name,
        "settings": settings,
        "sizes": sizes,
        "config": asdict(config),
        "curve": curve,
        "final": curve[-1],
        "losses": result.losses,
        "wall_clock_s": result.wall_clock_s,
        "measure_s": measure_s,
        "train_s": result.wall_clock_s - measure_s,
        "threads": torch.get_num_threads(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, path.parent / name, task=task)
    path.write_text(json.dumps(record, indent=1))
    return record


# ----------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------

TITLES = {
    "corr_log_pi": "layer-1 scores: corr with (log pi)^T",
    "corr_neg_pi": "layer-1 scores: corr with -pi^T",
    "learned_transition_kl": "learned-transition KL (where a pi fits)",
    "softmax_over_keys_vs_parent_posterior": "KL(pi's parent posterior || softmax over keys)",
    "responsibility_tv": "layer-1 TV to the responsibilities",
    "layer1_self_mass": "layer-1 mass on the query itself",
    "layer2_tv": "layer-2 TV to uniform over m+1..t",
    "layer3_tv": "layer-3 TV to softmax(beta Gamma_bar)",
    "kl_ratio": "KL / tuned one-step MD's KL",
}
# Every curve's final value, and the numbers behind the KL ratio.
PAPER_FORMS = ("softmax_over_keys_vs_pi", "softmax_over_queries_vs_pi", "uniform_vs_pi", "uniform_vs_parent_posterior")
SUMMARY_KEYS = (*CURVES[:-1], *PAPER_FORMS, "own_eta", "kl_model", "kl_md1", CURVES[-1])
LOG_SCALE = ("learned_transition_kl", "softmax_over_keys_vs_parent_posterior", "kl_ratio")


# The figures: file -> (title, which recipes). A recipe missing from a run is left out of its figure.
FIGURES = {
    "training_mechanism.png": (
        "one factor changed at a time from 'base' (T=128, 10000 steps)",
        lambda name: name not in LONG_SIZES and not name.startswith("layer1-only"),
    ),
    "training_mechanism_long.png": (
        "position weight 1 and 2: 10000 steps at T=128 against 40000 at T=192",
        lambda name: name.removesuffix("-long") in ("pos-weight-1", "pos-weight-2"),
    ),
    "training_mechanism_layer1.png": (
        "layer 1 alone on the construction's frozen layers 2-3, all positions vs the last one (base for scale)",
        lambda name: name.startswith("layer1-only") or name == "base",
    ),
}


def plot_curves(recipes: dict, path: Path, title: str) -> Path:
    """One panel per measurement over training steps, one line per recipe (gaps where undefined)."""

    # A seed replicate ("<recipe>-seed1") gets its recipe's colour, dashed; a long run ("<recipe>-long")
    # its recipe's colour, thick.
    def parent_of(name: str) -> str:
        return name.removesuffix("-seed1").removesuffix("-long")

    parents = list(dict.fromkeys(parent_of(name) for name in recipes))
    colours = plotting.plt.get_cmap("tab10" if len(parents) <= 10 else "tab20")
    with plotting.style():
        fig, axes = plotting.plt.subplots(3, 3, figsize=(13, 10), squeeze=False)
        for ax, key in zip(axes.flat, CURVES, strict=True):
            for name, record in recipes.items():
                style = {
                    "color": colours(parents.index(parent_of(name))),
                    "linestyle": "--" if name.endswith("-seed1") else "-",
                    "linewidth": 2.2 if name.endswith("-long") else 1.2,
                }
                steps = [p["step"] for p in record["curve"]]
                # None (undefined, or an infinite KL) -> NaN: a gap in the line, not a bridge over it
                values = [math.nan if p[key] is None else p[key] for p in record["curve"]]
                ax.plot(steps, values, marker="o", markersize=2, label=name, **style)
            if key in LOG_SCALE:
                ax.set_yscale("log")
            if key == "softmax_over_keys_vs_parent_posterior":
                uniform = next(iter(recipes.values()))["curve"][0]["uniform_vs_parent_posterior"]
                references = [
                    ax.axhline(uniform, color="0.5", linewidth=0.8, linestyle="--", label="uniform guess"),
                    ax.axhline(PAPER_LEARNED_TRANSITION_KL, color="black", linewidth=0.8, linestyle=":", label="paper"),
                ]
                ax.legend(handles=references, fontsize=7)
            if key == "kl_ratio":
                ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle="--")
            if key.startswith("corr"):
                ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
            ax.set_title(TITLES[key], fontsize=9)
            ax.set_xlabel("training step")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"3-layer disentangled models during training: {title}")
        return plotting.save_figure(fig, path)


def run(out_dir: Path, quick: bool = False, recipes: list[str] | None = None) -> AnalysisResult:
    """Train and measure every recipe (reusing finished ones); write the JSON and the figure."""
    run_start = start_run(out_dir, quick, FULL, QUICK)
    out_dir = run_start.out_dir
    names = list(RECIPES) if recipes is None else recipes
    results = {name: train_recipe(name, out_dir, quick) for name in names}
    summary = {
        name: {key: r["final"][key] for key in SUMMARY_KEYS}
        | {"wall_clock_s": r["wall_clock_s"], "train_s": r["train_s"]}
        for name, r in results.items()
    }
    report = {
        "config": {
            "task": TASK,
            "quick": quick,
            "sizes": QUICK if quick else FULL,
            "long_sizes": {} if quick else LONG_SIZES,
            "base": BASE,
            "recipes": RECIPES,
            "model": "3-layer DisentangledTransformer, window m + 1, seed 0",
            "protocol": (
                "measured at step 0 and every measure_every steps on n_measure fixed sequences (seed "
                f"{MEASURE_SEED}); layer TVs against build_md_transformer with the model's own eta; KL on "
                f"mdlens.evaluation.make_held_out(seed {EVAL_SEED}, n_eval), kl_ratio = kl_model / kl_md1"
            ),
        },
        "summary": summary,
        "recipes": results,
    }
    files = []
    for file, (title, member) in FIGURES.items():
        chosen = {name: record for name, record in results.items() if member(name)}
        if chosen:
            files.append(plot_curves(chosen, out_dir / file, title))
    report["files"] = [str(f) for f in files] + [str(out_dir / "training_mechanism.json")]
    report["wall_clock_s"] = run_start.seconds()
    (out_dir / "training_mechanism.json").write_text(json.dumps(report, indent=1))
    return AnalysisResult(report, report["files"])
