"""Every mistake a user can make on the mdlens command line ends in argparse's error form: exit status
2, the usage line first, ``mdlens <command>: error: <what is wrong>`` last, no traceback. Each case
runs the real command in a subprocess and fails before any training step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdlens import estimators as E


def run_mdlens(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mdlens.cli", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def assert_usage_error(result: subprocess.CompletedProcess, command: str, message: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"usage: mdlens {command}"), result.stderr
    assert lines[-1].startswith(f"mdlens {command}: error: "), result.stderr
    assert message in lines[-1], result.stderr


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# (argv after "train", a fragment of the error line); {tmp} is the test's directory.
TRAIN_ERRORS = {
    "unknown model": (["--model", "foo", "--out", "{tmp}/x"], "--model must be one of ('disentangled', 'standard')"),
    "no steps": (["--steps", "0", "--out", "{tmp}/x"], "steps must be an int >= 1, got 0"),
    "negative lr": (["--lr", "-1", "--out", "{tmp}/x"], "lr must be finite and > 0, got -1.0"),
    "nan weight decay": (["--weight-decay", "nan", "--out", "{tmp}/x"], "weight_decay must be finite"),
    "missing config": (["--config", "/nonexistent.json", "--out", "{tmp}/x"], "cannot read the config file"),
    "config is a directory": (["--config", "{tmp}", "--out", "{tmp}/x"], "cannot read the config file"),
    "bad json": (["--config", "{tmp}/bad.json", "--out", "{tmp}/x"], "is not valid JSON"),
    "json list": (["--config", "{tmp}/list.json", "--out", "{tmp}/x"], "must hold a JSON object of fields"),
    "unknown field": (["--config", "{tmp}/unknown.json", "--out", "{tmp}/x"], "unknown fields in"),
    "wrong type in config": (["--config", "{tmp}/typed.json", "--out", "{tmp}/x"], "layers must be an integer"),
    "no out": (["--steps", "2"], "mdlens train needs --out"),
    "not an int": (["--steps", "two", "--out", "{tmp}/x"], "argument --steps: invalid int value: 'two'"),
    "unknown loss": (["--loss", "kl", "--out", "{tmp}/x"], "loss must be one of ('mse', 'ce')"),
    "zero layers": (["--layers", "0", "--out", "{tmp}/x"], "--layers must be an int >= 1"),
    "one-token vocabulary": (["--vocab", "1", "--out", "{tmp}/x"], "--vocab must be an int >= 2"),
    "negative alpha": (["--alpha", "-2", "--out", "{tmp}/x"], "--alpha must be finite and > 0"),
    "short sequences": (["--seq-len", "3", "--out", "{tmp}/x"], "--seq-len must exceed --order"),
    "too many frozen layers": (["--freeze-layers", "4", "--out", "{tmp}/x"], "--freeze-layers 4 exceeds"),
    "new layers without init": (["--new-layers", "repeat_last", "--out", "{tmp}/x"], "only applies with --init-from"),
    "init from nothing": (
        ["--init-from", "{tmp}/none", "--out", "{tmp}/x"],
        "--init-from {tmp}/none: no such directory",
    ),
    "init from no model": (["--init-from", "{tmp}/done", "--out", "{tmp}/x"], "no saved model there (no model.json)"),
    "standard grown": (["--model", "standard", "--init-from", "{tmp}", "--out", "{tmp}/x"], "disentangled models only"),
    "overwrite and resume": (["--overwrite", "--resume", "--out", "{tmp}/x"], "give one of them"),
    "out is a file": (["--out", "{tmp}/bad.json"], "is a file, not a directory"),
    "existing run": (["--out", "{tmp}/done"], "already holds files (train.json): pass --resume"),
    "existing state": (["--checkpoint-dir", "{tmp}/state", "--out", "{tmp}/x"], "already holds files (train_state.pt)"),
    "unreadable state": (["--resume", "--out", "{tmp}/state"], "not an mdlens training state"),
    "bayes out of reach": (
        ["--seq-len", "1200", "--out", "{tmp}/x"],
        "pass eval_bayes=False (mdlens train --no-eval-bayes)",
    ),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli_inputs")
    write(tmp / "bad.json", '{"steps": 3,')
    write(tmp / "list.json", "[1, 2]")
    write(tmp / "unknown.json", json.dumps({"layer": 2}))
    write(tmp / "typed.json", json.dumps({"layers": "3"}))
    (tmp / "done").mkdir()
    write(tmp / "done" / "train.json", "{}")
    (tmp / "state").mkdir()
    torch.save({"something": "else"}, tmp / "state" / "train_state.pt")
    return tmp


@pytest.mark.parametrize("case", sorted(TRAIN_ERRORS))
def test_train_errors_are_usage_errors(case, inputs):
    argv, message = TRAIN_ERRORS[case]
    result = run_mdlens("train", *(arg.format(tmp=inputs) for arg in argv), cwd=inputs)
    assert_usage_error(result, "train", message.format(tmp=inputs))
    assert not (inputs / "x").exists()  # nothing was written


def test_the_cap_in_the_bayes_case_is_the_estimators_cap():
    # The "bayes out of reach" case uses T=1200, m=3: over the cap, which takes T up to longest_exact_bayes(3).
    assert E.longest_exact_bayes(3) < 1200


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is no mistake here")
def test_train_on_a_missing_gpu_is_a_usage_error(tmp_path):
    result = run_mdlens("train", "--device", "cuda", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert_usage_error(result, "train", "device='cuda' but CUDA is not available")


REPRODUCE_AND_BENCH_ERRORS = {
    "unknown stage": (["reproduce", "everything", "--out", "{tmp}/r"], "reproduce", "argument what: invalid choice"),
    "reproduce without out": (["reproduce", "estimators"], "reproduce", "the following arguments are required: --out"),
    "reproduce into a file": (["reproduce", "estimators", "--out", "{tmp}/bad.json"], "reproduce", "is a file"),
    "report before the stages": (["reproduce", "report", "--out", "{tmp}/empty"], "reproduce", "is missing: run"),
    "unknown benchmark": (["bench", "--only", "speed"], "bench", "argument --only: invalid choice: 'speed'"),
    "no jobs": (
        ["reproduce", "all", "--out", "{tmp}/r", "--jobs", "0"],
        "reproduce",
        "--jobs must be at least 1, got 0",
    ),
    "jobs not a number": (["reproduce", "all", "--out", "{tmp}/r", "--jobs", "two"], "reproduce", "invalid int value"),
}


@pytest.mark.parametrize("case", sorted(REPRODUCE_AND_BENCH_ERRORS))
def test_reproduce_and_bench_errors_are_usage_errors(case, inputs):
    argv, command, message = REPRODUCE_AND_BENCH_ERRORS[case]
    (inputs / "empty").mkdir(exist_ok=True)
    result = run_mdlens(*(arg.format(tmp=inputs) for arg in argv), cwd=inputs)
    assert_usage_error(result, command, message)
