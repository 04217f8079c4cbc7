"""``make demo`` writes the executed notebooks as HTML where REPORT.md looks for them, and the
toolchain it uses (``jupyter nbconvert --execute``) runs a notebook and keeps its outputs and figures."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mdlens.analyses import report

ROOT = Path(__file__).resolve().parents[1]
JUPYTER = Path(sys.executable).parent / "jupyter"


def dry_run(*arguments: str) -> str:
    """The commands ``make demo`` would run (``make -n``), nothing executed."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # Run from `make test`, the outer make's flags must not reach this one.
    env = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    command = ["make", "-n", "demo", *arguments]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout


def test_the_full_demo_executes_every_notebook_into_the_reports_folder(tmp_path):
    commands = dry_run(f"DEMO_OUT={tmp_path}")
    convert = next(line for line in commands.splitlines() if "nbconvert" in line)
    assert "--to html --execute" in convert and "notebooks/*.ipynb" in convert
    assert f"--output-dir {tmp_path / report.NOTEBOOKS_DIR}" in convert
    # beside the analyses, and finished (`wait`) before the report is written again, so that
    # REPORT.md links them
    assert commands.index("nbconvert") < commands.index("reproduce all")
    assert commands.index("wait $notebooks") < commands.index(f"reproduce report --out {tmp_path}")


def test_the_demo_runs_the_analyses_on_both_cores(tmp_path):
    for flags in ((), ("DEMO_FLAGS=--quick",)):
        assert "reproduce all" in dry_run(f"DEMO_OUT={tmp_path}", *flags)
        assert "--jobs 2" in dry_run(f"DEMO_OUT={tmp_path}", *flags)


def test_the_quick_demo_leaves_the_notebooks_out(tmp_path):
    assert "nbconvert" not in dry_run(f"DEMO_OUT={tmp_path}", "DEMO_FLAGS=--quick")


def test_nbconvert_executes_a_notebook_with_its_outputs_and_figures(tmp_path):
    if not JUPYTER.exists():
        pytest.skip("jupyter is not installed beside this Python")
    cells = [
        "print('mdlens-' + str(6 * 7))",
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([0, 1], [1, 0])\nplt.show()",
    ]
    notebook = {
        "cells": [
            {"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [], "source": c}
            for i, c in enumerate(cells)
        ],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (tmp_path / "tiny.ipynb").write_text(json.dumps(notebook))

    def convert(*execute: str) -> str:
        out = tmp_path / ("executed" if execute else "as-is")
        command = [str(JUPYTER), "nbconvert", "--to", "html", *execute, "--output-dir", str(out), "tiny.ipynb"]
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True, timeout=300)
        return (out / "tiny.html").read_text()

    executed, as_is = convert("--execute"), convert()
    for output in ("mdlens-42", 'src="data:image/png;base64,'):  # the printed output; the figure, embedded
        assert output in executed and output not in as_is
