"""The README's quick start runs as written and says what it claims."""

import contextlib
import io
import re
import warnings
from pathlib import Path

from mdlens.models.disentangled import RescaledStepWarning

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    assert len(blocks[0].strip().splitlines()) <= 25, "the quick start must stay at most 25 lines"
    monkeypatch.chdir(tmp_path)  # it saves heads.html in the working directory
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    printed = out.getvalue()
    # The quick start prints torch.allclose(construction, one-step MD): it must be True.
    assert "True" in printed and "False" not in printed, printed
    kl_md = float(re.search(r"KL one-step MD (\S+)", printed).group(1))
    assert 0 < kl_md < 0.05
    # The probe line: R^2 of the mean responsibility at embed, L1, L2, L3 of disentangled-3l, whose
    # layer 2 holds it linearly (0.84 on 512 sequences in `mdlens reproduce mechanisms`).
    r2 = [float(x) for x in re.search(r"^\[(.*)\]$", printed, flags=re.M).group(1).split(",")]
    assert len(r2) == 4 and r2[0] < 0.1 and r2[1] < 0.3 and r2[2] > 0.6
    check_stated_output(text, printed)
    check_stated_warning(text, caught)
    # The head view renders offline: the page carries its script and imports nothing from the web.
    page = (tmp_path / "heads.html").read_text()
    assert "<script" in page and not re.search(r"(from|src=|href=)\s*[\"']https?://", page)


NUMBER = r"-?\d+\.\d+(?:e-?\d+)?"


def check_stated_output(readme: str, printed: str) -> None:
    """The README states what the quick start prints, with a tolerance: every printed line has the
    stated line's words, and each number is within the stated relative tolerance (the R^2 list:
    the stated absolute one)."""
    stated = re.search(r"```\n\nIt prints \(([^)]*)\):\n\n```text\n(.*?)```", readme, flags=re.S)
    assert stated, "the quick start must be followed by 'It prints (...):' and a text block"
    tolerances, expected = stated.groups()
    relative = float(re.search(r"within (\d+)%", tolerances).group(1)) / 100
    absolute = float(re.search(r"R\^2 values to within ±(\S+?)\)?$", tolerances).group(1))
    printed_lines, expected_lines = printed.strip().splitlines(), expected.strip().splitlines()
    assert len(printed_lines) == len(expected_lines), (printed, expected)
    for got, want in zip(printed_lines, expected_lines, strict=True):
        assert re.sub(NUMBER, "#", got) == re.sub(NUMBER, "#", want), (got, want)
        for value, target in zip(re.findall(NUMBER, got), re.findall(NUMBER, want), strict=True):
            if want.startswith("["):  # held-out R^2 per layer
                assert abs(float(value) - float(target)) <= absolute, (got, want)
            else:
                assert abs(float(value) - float(target)) <= relative * abs(float(target)), (got, want)


def check_stated_warning(readme: str, caught: list[warnings.WarningMessage]) -> None:
    """The one warning a user sees (deprecations aside) is the RescaledStepWarning the README explains
    after the quick start, with the two steps it states (to within 1%, as for the printed numbers)."""
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert [w.category for w in shown] == [RescaledStepWarning], [str(w.message) for w in shown]
    steps = re.search(rf"= ({NUMBER}), not the eta = ({NUMBER})", str(shown[0].message))
    stated = re.search(
        rf"`RescaledStepWarning`.*?\(({NUMBER})\s+at\s+T=16,\s+not\s+the\s+({NUMBER})\s+it\s+has\s+at\s+T=96\)",
        readme,
        re.S,
    )
    assert steps and stated, (str(shown[0].message), "the README must state both steps")
    for got, want in zip(steps.groups(), stated.groups(), strict=True):
        assert abs(float(got) - float(want)) <= 0.01 * float(want), (got, want)
