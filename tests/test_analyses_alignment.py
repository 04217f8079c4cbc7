"""mdlens reproduce alignment: the verdict thresholds and the summary, on made-up numbers."""

import pytest

from mdlens.analyses import alignment


def best(fidelity, random_model, wrong_model, **extra):
    return {
        "interchange_fidelity": fidelity,
        "random_model_fidelity": random_model,
        "wrong_model_fidelity": wrong_model,
        **extra,
    }


@pytest.mark.parametrize(
    ("fidelity", "random_model", "wrong_model", "expected"),
    [
        (0.99, 0.0, 0.1, "present"),
        (0.99, 0.40, 0.1, "present"),  # the random-init model is a baseline: 0.59 above it
        (0.90, 0.40, 0.50, "present"),  # the thresholds themselves count
        (0.89, 0.0, 0.1, "partial"),
        (0.50, 0.0, 0.1, "partial"),
        (0.49, 0.0, 0.1, "absent"),
        (0.99, 0.50, 0.1, "absent"),  # a random-init model gets almost as far: nothing shown
        (0.99, 0.0, 0.51, "absent"),  # DAS fits a wrong counterfactual as well: no evidence
        (None, 0.0, 0.1, "absent"),
    ],
)
def test_verdict_thresholds(fidelity, random_model, wrong_model, expected):
    assert alignment.verdict(best(fidelity, random_model, wrong_model)) == expected


@pytest.mark.parametrize(("subspace_r2", "expected"), [(0.5, "present"), (0.49, "absent"), (None, "present")])
def test_the_subspace_must_hold_the_variable(subspace_r2, expected):
    """Control (c): a subspace that steers the output without holding the variable is no evidence."""
    assert alignment.verdict(best(0.99, 0.0, 0.1, subspace_r2=subspace_r2)) == expected


def test_summary_line_quotes_the_numbers():
    entry = best(
        0.5, 0.01, 0.2, hook_name="blocks.1.hook_resid_post", probe_fidelity=0.25, random_subspace_fidelity=-1.0,
        subspace_r2=None, read_fraction=0.75, saturation_rank=2, verdict="partial",
    )  # fmt: skip
    report = {"models": {"m": {"variables": {"mean_responsibility": {"best": entry}}}}}
    (line,) = alignment.summary_lines(report)
    assert line.startswith("m mean_responsibility: partial at blocks.1.hook_resid_post (DAS 0.500;")
    for text in ("probe 0.250", "random subspace -1.000", "random model 0.010", "wrong model 0.200",
                 "subspace R^2 -", "read 0.750", "saturates at rank 2"):  # fmt: skip
        assert text in line


def test_scan_contenders_are_the_hooks_near_the_best():
    scan = {"hook_embed": 0.219, "blocks.0.hook_resid_post": 0.232, "blocks.1.hook_resid_post": 0.223,
            "blocks.2.hook_resid_post": -0.054, "blocks.3.hook_resid_post": float("nan")}  # fmt: skip
    assert alignment.scan_contenders(scan) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "hook_embed"]
    assert alignment.scan_contenders({"a": 0.9, "b": 0.84, "c": 0.86}) == ["a", "c"]  # 0.05 below 0.9 is out
    with pytest.raises(ValueError, match="finite"):
        alignment.scan_contenders({"a": float("nan")})
