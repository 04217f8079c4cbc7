"""``mdlens reproduce all --quick``: every analysis of ``all`` runs, REPORT.md links only figures that
exist and quotes the JSON files' numbers, and the step-size analysis agrees with a recomputation."""

import contextlib
import io
import json

import numpy as np
import pytest

from mdlens import cli
from mdlens import estimators as E
from mdlens.analyses import step_sizes
from mdlens.evaluation import effective_eta, sample_batches
from mdlens.pretrained import load_all_pretrained


@pytest.fixture(scope="module")
def run_all(tmp_path_factory):
    """``reproduce all --quick``'s output directory and what it wrote to stderr."""
    directory = tmp_path_factory.mktemp("reproduce_all")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        cli.main(["reproduce", "all", "--out", str(directory), "--quick"])
    return directory, stderr.getvalue()


@pytest.fixture(scope="module")
def out(run_all):
    return run_all[0]


def test_every_stage_but_the_report_shows_a_progress_bar(run_all):
    stderr = run_all[1]
    stages = [name for name, stage in cli.REPRODUCTIONS.items() if stage.in_all and name != "report"]
    assert len(stages) >= 5
    for stage in stages:
        assert f"{stage}: 100%" in stderr, f"no finished progress bar for {stage}"


def test_report_has_every_section_and_only_existing_figures(out):
    report = (out / "REPORT.md").read_text()
    for heading in (
        "## The paper's numbers beside ours",
        "## Estimators",
        "## Step sizes read off the models",
        "## Inside the models",
    ):
        assert heading in report
    figures = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert "step-sizes/step_sizes.png" in figures
    for figure in figures:
        assert (out / figure).exists(), figure


def test_step_size_numbers_in_the_report_are_the_json_ones(out):
    data = json.loads((out / "step-sizes" / "step_sizes.json").read_text())
    report = (out / "REPORT.md").read_text()
    laws = {"tuned": data["fits"]["tuned_eta"]["p"]} | {
        n: data["fits"][n]["effective_eta"]["p"] for n in data["models"]
    }
    assert all(p > 0 for p in laws.values())  # every step falls with T, even at the quick sizes
    assert f"falls like T^-{laws.pop('tuned'):.2f}" in report
    for name, p in laws.items():
        assert f"{name} T^-{p:.2f}" in report


def test_step_sizes_agree_with_a_recomputation(out):
    data = json.loads((out / "step-sizes" / "step_sizes.json").read_text())
    models, task = load_all_pretrained()
    pi, m = task.transition, task.order
    lengths = [row["seq_len"] for row in data["results"]]
    assert lengths == step_sizes.QUICK["lengths"] and data["models"] == list(models)
    for row in data["results"]:
        tune, _ = sample_batches(task, row["seq_len"], step_sizes.QUICK["n_tune"], 1)
        assert row["tuned_eta"] == E.tune_eta_refined(tune.tokens, pi, m, tune.next_probs)["eta"]
        for name, model in models.items():
            entry = row["models"][name]
            assert entry["effective_eta"] == pytest.approx(effective_eta(model, tune.tokens, pi, m), rel=1e-12)
            assert entry["fit_kl"] >= 0 and len(entry["two_step"]["etas"]) == 2
    # The power law is the least-squares line through (log T, log eta).
    for name in data["models"]:
        etas = [row["models"][name]["effective_eta"] for row in data["results"]]
        slope = np.polyfit(np.log(lengths), np.log(etas), 1)[0]
        assert data["fits"][name]["effective_eta"]["p"] == pytest.approx(-slope, rel=1e-9)
    # The fixed-beta schedule: beta / (m (T - m)), equal to the model's own step at the length it is read at.
    schedule = data["construction"]
    longest = data["results"][-1]
    assert schedule["eta"][str(longest["seq_len"])] == pytest.approx(
        longest["models"][schedule["model"]]["effective_eta"], rel=1e-12
    )
    for t, eta in schedule["eta"].items():
        assert eta == pytest.approx(schedule["beta"] / (m * (int(t) - m)), rel=1e-12)
