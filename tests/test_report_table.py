"""The report's paper table judges each claim by its named threshold, and reads the stages the CLI
lists: checked on small hand-made analysis results (no analysis runs here)."""

import json

import pytest

from mdlens.analyses import AnalysisResult, report
from mdlens.cli import REPRODUCTIONS


def trained_results(ratios: list[float | None]) -> dict:
    """A trained.json with one model's paired ratio to tuned MD1 at lengths 8, 16, ..."""
    return {
        "results": [
            {"seq_len": 8 * 2**i, "ratio_to": {"disentangled-3l": {"md1_tuned": {"ratio": r}}}}
            for i, r in enumerate(ratios)
        ]
    }


def test_tracking_is_judged_over_every_length_against_the_named_bound():
    bound = report.TRACKING_RATIO_MAX
    row = report.tracking_row(trained_results([0.9, bound]), "claim", "3l / MD1", "disentangled-3l", "md1_tuned")
    assert row == ("claim", "yes (figure)", f"3l / MD1 = {bound:.2f}x at T=16", "agrees")
    worse = report.tracking_row(trained_results([bound + 0.05, 1.0]), "c", "l", "disentangled-3l", "md1_tuned")
    assert worse[2] == "l = 1.00x at T=16" and worse[3] == f"up to {bound + 0.05:.2f}x"
    missing = report.tracking_row(trained_results([None]), "c", "l", "disentangled-5l", "md2_tuned")
    assert missing[2:] == ("l = n/a", "n/a")


def test_attention_verdict_names_each_layer_by_the_papers_number():
    limit = report.ATTENTION_TV_MAX
    assert report.attention_row({"disentangled-3l": {"pattern_tv": [0.0, limit / 2]}})[3] == "agrees"
    verdict = report.attention_row({"disentangled-3l": {"pattern_tv": [0.0, limit, 0.5]}})[3]
    assert verdict == "layer 1 agrees; layer 2 differs; layer 3 differs"
    assert report.attention_row({})[3] == "n/a"


def test_drift_and_step_law_verdicts_use_their_thresholds():
    def estimators(short_ratio: float, long_ratio: float, p: float) -> dict:
        kl = [{"kl": {"md1_tuned": {"mean": r}, "bayes_exact": {"mean": 1.0}}} for r in (short_ratio, long_ratio)]
        kl[0]["seq_len"], kl[1]["seq_len"] = 8, 256
        return {"results": kl, "eta_fit": {"md1_tuned": {"power_law": {"p": p, "r2": 0.9}}}}

    step = report.DRIFT_MIN
    assert report.drift_row(estimators(1.0, 1.0 + 2 * step, 1.0))[3] == "agrees"
    assert report.drift_row(estimators(1.0, 1.0 + step / 2, 1.0))[3] == "not seen at these lengths"
    low, high = report.STEP_EXPONENT_RANGE
    assert report.step_law_row(estimators(1.0, 1.0, low))[3] == "agrees"
    assert report.step_law_row(estimators(1.0, 1.0, high + 0.1))[3] == f"exponent {high + 0.1:.2f}, not 1"


def test_results_are_read_from_the_files_the_cli_stages_name(tmp_path):
    stages = [name for name, stage in REPRODUCTIONS.items() if stage.in_all and stage.json_file]
    assert "estimators" in stages and "report" not in stages
    for name in stages:
        folder = tmp_path / name
        folder.mkdir()
        (folder / REPRODUCTIONS[name].json_file).write_text(json.dumps({"stage": name, "files": [f"{name}.png"]}))
    results = report.read_results(tmp_path)
    assert list(results) == stages
    assert results["trained"] == AnalysisResult({"stage": "trained", "files": ["trained.png"]}, ["trained.png"])
    (tmp_path / stages[-1] / REPRODUCTIONS[stages[-1]].json_file).unlink()
    with pytest.raises(ValueError, match=f"run `mdlens reproduce {stages[-1]} --out"):
        report.read_results(tmp_path)


def test_every_stage_that_writes_json_has_one_section():
    stages = [name for name, stage in REPRODUCTIONS.items() if stage.in_all and stage.json_file]
    presented = [name for section in report.SECTIONS for name in section.stages]
    assert sorted(presented) == sorted(stages) and len(set(presented)) == len(presented)
