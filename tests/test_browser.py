"""A saved attention view, opened in headless Chromium with no network, draws its grid.

The page holds one empty root ``<div>`` and an inline script; after the script has run, the DOM
(``--dump-dom``) must hold what CircuitsVis's AttentionHeads creates there: one ``<h4>`` tile name
and one ``<canvas>`` per panel, plus the zoomed ``<canvas>`` of the first panel. A screenshot must
show the heat map (purple cells, the grey masked upper triangle); it is kept under
``results/browser/`` for people to look at.

Chromium is a system package (``apt-get install chromium chromium-driver`` on Debian/Ubuntu). Without
it the test skips, except with ``CI=true``, where it fails: CI must run it (.ci/run installs it).
"""

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mdlens
from mdlens.construction import build_md_transformer
from mdlens.hooks import viz

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = "apt-get install chromium chromium-driver"
RESULTS = Path(__file__).resolve().parents[1] / "results" / "browser"
T = 12
WINDOW = (900, 1100)


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    message = f"headless Chromium not found (looked for {', '.join(CHROMIUM_NAMES)}): install it with `{INSTALL}`"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI=true, so this test must run, not skip")
    pytest.skip(message)


def run_chromium(binary: str, profile: Path, *args: str) -> str:
    """Headless Chromium with no network (every host name fails to resolve) and a throw-away
    profile. ``--no-sandbox``: Chromium's sandbox refuses to start as root, as in containers."""
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-3000:]}"
    return result.stdout


class RenderedElements(HTMLParser):
    """Tags and texts inside the CircuitsVis root div (not in the script next to it)."""

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 while inside the root div
        self.canvases: list[dict] = []
        self.texts: dict[str, list[str]] = {"h3": [], "h4": []}
        self._open_heading = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth == 0:
            if tag == "div" and (attrs.get("id") or "").startswith("circuits-vis-"):
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        elif tag == "canvas":
            self.canvases.append(attrs)
        elif tag in self.texts:
            self._open_heading = tag
            self.texts[tag].append("")

    def handle_endtag(self, tag):
        if self.depth and tag == "div":
            self.depth -= 1
        if tag == self._open_heading:
            self._open_heading = None

    def handle_data(self, data):
        if self.depth and self._open_heading:
            self.texts[self._open_heading][-1] += data


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A shipped model next to its construction, saved as a standalone page."""
    model, task = mdlens.load_pretrained("disentangled-3l")
    reference = build_md_transformer(task.transition, task.order, T, 0.05)
    sample = task.sample(1, T, generator=torch.Generator().manual_seed(3))
    view = viz.compare_attention_view(model, reference, sample.tokens, lags=sample.lags)
    return view, view.save(tmp_path_factory.mktemp("view") / "attention.html")


def test_chromium_renders_the_attention_grid_offline(chromium, page, tmp_path):
    view, path = page
    source = path.read_text(encoding="utf-8")
    assert "<canvas" not in source and "<h4" not in source  # whatever we find, the script made

    dom = run_chromium(chromium, tmp_path / "profile", "--dump-dom", path.as_uri())
    rendered = RenderedElements()
    rendered.feed(dom)
    assert rendered.texts["h4"] == view.names  # one tile per panel, in order
    assert len(rendered.canvases) == len(view.names) + 1  # the tiles and the zoomed pattern
    assert "Head Selector (hover to view, click to lock)" in rendered.texts["h3"]
    assert f"{view.names[0]} Zoomed" in rendered.texts["h3"]
    zoomed = rendered.canvases[-1]
    assert int(zoomed["width"]) >= 300 and int(zoomed["height"]) >= 300

    screenshot = tmp_path / "attention.png"
    run_chromium(
        chromium,
        tmp_path / "profile",
        f"--screenshot={screenshot}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        path.as_uri(),
    )
    image = Image.open(screenshot).convert("RGB")
    assert image.size == WINDOW
    pixels = torch.from_numpy(np.array(image)).reshape(-1, 3).to(torch.int32)  # [H*W, 3]
    red, green, blue = pixels.unbind(dim=1)
    # Attention cells: white blended towards CircuitsVis's purple (blue well above green).
    purple = (blue - green > 40) & (red - green > 0)
    # Masked upper triangle: the flat grey CircuitsVis paints above the diagonal.
    grey = ((pixels - 200).abs() <= 8).all(dim=1)
    assert purple.sum() > 20_000, f"only {int(purple.sum())} purple pixels: the grid was not drawn"
    assert grey.sum() > 20_000, f"only {int(grey.sum())} grey pixels: no masked upper triangle"
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, RESULTS / "attention.png")
