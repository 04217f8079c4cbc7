"""``mdlens reproduce mechanisms --quick``: the JSON has what the README quotes, and on the
construction every measurement gives the answer known in closed form."""

import json

import pytest

from mdlens.analyses import QUICK_LEFT_OUT, mechanisms
from mdlens.pretrained import list_pretrained


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("mechanisms")
    mechanisms.run(out, quick=True)
    return json.loads((out / "mechanisms.json").read_text()), out


def test_every_model_has_every_measurement(report):
    data, out = report
    # --quick measures one shipped model per architecture (QUICK_LEFT_OUT: disentangled-3l-long).
    assert set(data["models"]) == {"construction", "disentangled-3l", "disentangled-5l", "standard-3l"}
    assert set(data["models"]) == {"construction", *list_pretrained()} - set(QUICK_LEFT_OUT)
    for r in data["models"].values():
        n_points = r["n_layers"] + 1  # the embedding, then every layer's resid_post
        for key in ("probe_r2", "probe_control_r2", "probe_random_model_r2"):
            assert all(len(r[key][t]) == n_points for t in ("responsibility", "mean_responsibility", "log_md_weights"))
        assert len(r["pattern_tv"]) == 3 and r["responsibility_tv"] is not None
        assert "learned_transition_kl" in r and "weight_alignment" in r and "sensitivity_cosine" in r
        assert "patching_agreement" in r and set(r["implicit_weights"]) == {"8", "48"}
        assert {"md1_tuned", "md2_tuned", "bayes_exact", "true"} <= set(r["implicit_weights"]["48"])
    for file in data["files"]:
        assert (out / file.split("/")[-1]).exists()


def test_the_construction_scores_its_known_answers(report):
    r = report[0]["models"]["construction"]
    assert r["probe_r2"]["mean_responsibility"][2] >= 0.999  # layer 2 holds it
    assert r["probe_control_r2"]["mean_responsibility"][2] < 0.3
    assert max(r["pattern_tv"]) < 1e-9 and r["responsibility_tv"] < 1e-9
    assert r["learned_transition_kl"] < 1e-9
    assert r["patching_agreement"] < 1e-9
    assert abs(r["sensitivity_cosine"] - 1) < 1e-9


def test_standard_model_has_no_learned_transition_and_says_why(report):
    r = report[0]["models"]["standard-3l"]
    assert r["learned_transition_kl"] is None and "not a disentangled model" in r["learned_transition_reason"]
