"""Progress bars: in a Jupyter kernel (as nbmake runs the notebooks) importing mdlens and drawing a bar
prints no ``TqdmWarning: IProgress not found``, and the analyses' length loop draws a bar on stderr."""

import contextlib
import io

import nbformat
from nbclient import NotebookClient

from mdlens.analyses import progress

FIRST_CELL = """
import mdlens
from mdlens import hooks
import mdlens.analyses
from tqdm.auto import tqdm
for _ in tqdm(range(3), desc="bar"):
    pass
"""


def test_a_notebook_kernel_draws_bars_without_a_tqdm_warning():
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(FIRST_CELL)])
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    outputs = notebook.cells[0].outputs
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "IProgress" not in text and "TqdmWarning" not in text, text
    assert not [output for output in outputs if output.output_type == "error"]
    # The bar is a widget (ipywidgets' progress bar), not text on stderr.
    assert any("application/vnd.jupyter.widget-view+json" in output.get("data", {}) for output in outputs)


def test_progress_names_the_stage_and_the_length_on_stderr():
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert list(progress([8, 16, 32], "estimators")) == [8, 16, 32]
    text = stderr.getvalue()
    assert "estimators: 100%" in text and "3/3" in text and "T=32" in text
