"""Smoke test of the estimators analysis (``mdlens reproduce estimators --quick``): it runs end
to end into a temporary directory and writes a JSON with every method and the three PNGs."""

from __future__ import annotations

import json
import math

from mdlens.analyses import estimator_comparison as estimators


def test_quick_run_writes_every_method_and_plots(tmp_path):
    written = estimators.run(tmp_path, quick=True)
    data = json.loads((tmp_path / "estimators.json").read_text())
    lengths = estimators.QUICK["lengths"]
    assert [r["seq_len"] for r in data["results"]] == lengths
    for result in data["results"]:
        assert set(result["kl"]) == set(estimators.METHOD_LABELS)
        for name, kl in result["kl"].items():
            assert math.isfinite(kl["mean"]) and kl["mean"] >= 0, name
        assert result["kl"]["oracle"]["mean"] == 0.0  # the truth scored against itself
        # exact Bayes is the posterior mean: on average no worse than the uniform guess
        assert result["kl"]["bayes_exact"]["mean"] < result["kl"]["uniform"]["mean"]
        for eta in result["eta"].values():
            assert eta > 0
    assert set(data["eta_fit"]) == set(estimators.TUNED_STEPS)
    for name in ("kl_vs_length.png", "eta_vs_length.png", "kl_ratio_to_bayes.png"):
        path = tmp_path / name
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(written.files) == sorted(data["files"]) and written.report == data
