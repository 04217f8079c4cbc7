"""The README's quick start runs as written and says what it claims."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    printed = out.getvalue()
    # The quick start prints torch.allclose(construction, one-step MD): it must be True.
    assert "True" in printed and "False" not in printed, printed
    kl_md = float(re.search(r"KL one-step MD: (\S+)", printed).group(1))
    kl_bayes = float(re.search(r"KL Bayes\s+: (\S+)", printed).group(1))
    assert 0 < kl_bayes and 0 < kl_md
    # The probe line: R^2 of the mean responsibility at embed, L1, L2, L3 of the construction.
    r2 = [float(x) for x in re.search(r"^\[(.*)\]$", printed, flags=re.M).group(1).split(",")[:4]]
    assert r2[0] < 0.1 and r2[1] < 0.5 and r2[2] > 0.999 and r2[3] > 0.999
