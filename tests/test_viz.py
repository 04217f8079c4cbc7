"""mdlens.hooks.viz: offline CircuitsVis attention views and probe tables.

The pattern values embedded in a page are read back from its JSON and checked against
run_with_cache computed here and against the construction's closed forms (layer 1 =
responsibilities, layer 2 = uniform over m+1..t, layer 3 = one-step MD weights). Pages must load
nothing over the network: no CDN import, no external script or stylesheet, no internet probe.
(tests/test_browser.py opens a page in headless Chromium.)
"""

import json
import re
from pathlib import Path

import circuitsvis
import pytest
import torch
from helpers import ETA, M, Q, T

import mdlens
from mdlens import estimators as E
from mdlens import hooks
from mdlens.construction import build_md_transformer
from mdlens.hooks import viz
from mdlens.models import standard_transformer

ATOL = 10.0**-viz.DIGITS  # the page keeps DIGITS decimal places
BUNDLE = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"


@pytest.fixture(scope="module")
def sample(task):
    return task.sample(2, T, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def view(construction, sample):
    return viz.attention_view(construction, sample.tokens, lags=sample.lags, sequence=1)


def rendered_props(html: str) -> dict:
    """The JSON props of the page's CircuitsVis.render(id, CircuitsVis.AttentionHeads, {...}) call."""
    call = html[html.rindex("CircuitsVis.render(") :]
    start = call.index("CircuitsVis.AttentionHeads,") + len("CircuitsVis.AttentionHeads,")
    props, _ = json.JSONDecoder().raw_decode(call[start:].lstrip())
    return props


def patterns_of(model, tokens, layer):
    """``[head, T, T]`` pattern of one sequence, computed here with run_with_cache."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None])
    return cache["pattern", layer][0].to(torch.float64)


# ----------------------------------------------------------------------------------------------
# attention_view: panels, labels and the values in the page


def test_panels_labels_and_embedded_values_on_the_construction(view, construction, sample):
    tokens, lags = sample.tokens[1], sample.lags[1]
    assert view.names == ["L1", "L2", "L3"]
    expected_labels = [f"y{t + 1}={tokens[t].item()},z={lags[t].item() if t >= M else '-'}" for t in range(T)]
    assert view.labels == expected_labels
    assert lags[:M].tolist() == [0] * M and all(1 <= z <= M for z in lags[M:].tolist())

    props = rendered_props(view.html)
    assert props["tokens"] == expected_labels
    assert props["attentionHeadNames"] == ["L1", "L2", "L3"]
    assert (props["minValue"], props["maxValue"]) == (0.0, 1.0)
    page = torch.tensor(props["attention"], dtype=torch.float64)
    assert page.shape == (3, T, T)
    for layer in range(3):
        independent = patterns_of(construction, tokens, layer)[0]
        assert torch.allclose(page[layer], independent, rtol=0, atol=ATOL)
        assert torch.allclose(view.patterns[layer], independent, rtol=0, atol=1e-15)

    # Layer 1 = responsibilities: A[i, i - g] = gamma_i(g) for 0-based queries i >= m.
    pi = construction.md_params["transition"]
    gamma = E.responsibilities(tokens[None], pi, M)[0]  # [T - m, m]
    for i in (M, M + 2, T - 1):
        for g in range(1, M + 1):
            assert abs(page[0, i, i - g].item() - gamma[i - M, g - 1].item()) <= ATOL
        assert page[0, i, i].item() == 0.0 and torch.all(page[0, i, : i - M] == 0)
    # Layer 2: the last query spreads 1/(T - m) over keys m..T-1 (1-based m+1..T).
    assert torch.allclose(page[1, T - 1, M:], torch.full((T - M,), 1 / (T - M), dtype=torch.float64), atol=ATOL)
    assert torch.all(page[1, T - 1, :M] == 0)
    # Layer 3: the last query puts one-step MD's lambda_g on key T - g (offset g - 1).
    lam = E.md_weights(tokens[None], pi, M, ETA)[0]
    assert torch.allclose(page[2, T - 1, [T - 1 - o for o in range(M)]], lam, atol=ATOL)
    # The page's numbers keep DIGITS places: one of them written out as the page has it.
    value = round(gamma[T - 1 - M, 0].item(), viz.DIGITS)
    assert json.dumps(value) in view.html


def test_heads_of_a_multi_head_layer_and_labels_without_lags(standard, sample):
    view = viz.attention_view(standard, sample.tokens, layers=1)
    assert view.names == ["L2.H0", "L2.H1"]
    assert view.labels == [f"y{t + 1}={v}" for t, v in enumerate(sample.tokens[0].tolist())]
    page = torch.tensor(rendered_props(view.html)["attention"], dtype=torch.float64)
    independent = patterns_of(standard, sample.tokens[0], 1)
    assert torch.allclose(page, independent, rtol=0, atol=ATOL)
    assert not torch.allclose(page[0], page[1], atol=1e-3)  # two different heads, in order

    both = viz.attention_view(standard, sample.tokens[0], layers=[1, 0])
    assert both.names == ["L2.H0", "L2.H1", "L1.H0", "L1.H1"]
    assert torch.allclose(both.patterns[2:], patterns_of(standard, sample.tokens[0], 0), atol=1e-15)


def test_token_labels():
    tokens = torch.tensor([3, 0, 2, 1])
    assert viz.token_labels(tokens) == ["y1=3", "y2=0", "y3=2", "y4=1"]
    assert viz.token_labels(tokens, torch.tensor([0, 0, 2, 1])) == ["y1=3,z=-", "y2=0,z=-", "y3=2,z=2", "y4=1,z=1"]


# ----------------------------------------------------------------------------------------------
# Offline: nothing fetched, nothing probed


EXTERNAL = re.compile(
    r"""(from\s*["']https?://|import\s*\(\s*["']https?://|\bsrc\s*=\s*["']?https?://|"""
    r"""\bhref\s*=\s*["']?https?://|url\(\s*["']?https?://|@import\s*["']https?://)""",
    re.I,
)


def test_saved_page_is_standalone_and_offline(view, tmp_path):
    path = view.save(tmp_path / "nested" / "attention.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    assert view.html in page
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    assert "unpkg.com" not in page and "cdn.jsdelivr" not in page
    # The one script of the page is inline (the bundle itself mentions "<script>" in strings), and
    # the CircuitsVis bundle is in the page.
    assert re.findall(r"<script[^>]*>", page)[0] == '<script crossorigin type="module">'
    assert not re.search(r"<script[^>]*\bsrc\s*=", page)
    assert BUNDLE.read_text(encoding="utf-8")[:2000] in page
    assert len(page) > 1_000_000
    # The render call targets a root div that is closed (CircuitsVis writes an invalid <div/>).
    root = re.search(r'<div id="(circuits-vis-[^"]+)" style="[^"]*"></div>', page)
    assert root and f'"{root.group(1)}"' in page[page.rindex("CircuitsVis.render(") :]


def test_repr_html_is_the_offline_form_and_never_probes_the_internet(view, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the view tried to reach the network")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    monkeypatch.setattr("circuitsvis.utils.render.internet_on", no_network)
    assert view._repr_html_() == view.html
    assert not EXTERNAL.search(view.html)
    assert "CircuitsVis.render(" in view.html
    assert len(repr(view)) < 200  # printing a view does not dump 1.3 MB


# ----------------------------------------------------------------------------------------------
# compare_attention_view


def test_compare_interleaves_model_and_construction(standard, construction, sample):
    view = viz.compare_attention_view(standard, construction, sample.tokens, lags=sample.lags)
    assert view.names == [
        "model L1.H0",
        "model L1.H1",
        "construction L1",
        "model L2.H0",
        "model L2.H1",
        "construction L2",
        "construction L3",
    ]
    page = torch.tensor(rendered_props(view.html)["attention"], dtype=torch.float64)
    tokens = sample.tokens[0]
    assert torch.allclose(page[0:2], patterns_of(standard, tokens, 0), atol=ATOL)
    assert torch.allclose(page[2], patterns_of(construction, tokens, 0)[0], atol=ATOL)
    assert torch.allclose(page[3:5], patterns_of(standard, tokens, 1), atol=ATOL)
    assert torch.allclose(page[6], patterns_of(construction, tokens, 2)[0], atol=ATOL)
    assert rendered_props(view.html)["tokens"][M] == f"y{M + 1}={tokens[M].item()},z={sample.lags[0, M].item()}"

    # layers alone applies to both; reference_layers picks the reference's own.
    assert viz.compare_attention_view(standard, construction, sample.tokens, layers=[0]).names == [
        "model L1.H0",
        "model L1.H1",
        "construction L1",
    ]
    named = viz.compare_attention_view(
        construction, construction, sample.tokens, layers=[2], reference_layers=[0, 1], names=("trained", "MD")
    )
    assert named.names == ["trained L3", "MD L1", "MD L2"]


def test_compare_a_shipped_model_with_its_construction():
    model, task = mdlens.load_pretrained("disentangled-3l")
    reference = build_md_transformer(task.transition, task.order, 12, 0.05)
    sample = task.sample(1, 12, generator=torch.Generator().manual_seed(3))
    view = viz.compare_attention_view(model, reference, sample.tokens, lags=sample.lags)
    assert view.names == ["model L1", "construction L1", "model L2", "construction L2", "model L3", "construction L3"]
    page = torch.tensor(rendered_props(view.html)["attention"], dtype=torch.float64)
    for layer in range(3):
        assert torch.allclose(page[2 * layer], patterns_of(model, sample.tokens[0], layer)[0], atol=ATOL)
        assert torch.allclose(page[2 * layer + 1], patterns_of(reference, sample.tokens[0], layer)[0], atol=ATOL)
    assert torch.allclose(page.sum(dim=-1), torch.ones(6, 12, dtype=torch.float64), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# ValueErrors


def test_attention_view_rejects_bad_input(construction, standard, sample, task):
    tokens = sample.tokens
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 4\)"):
        viz.attention_view(construction, torch.tensor([0, 1, 2, 4, 1]))
    with pytest.raises(ValueError, match="n_ctx=10"):
        viz.attention_view(construction, task.sample(1, T + 1).tokens)
    for layers, match in [
        (3, r"\[0, 3\)"),
        ([-1], r"\[0, 3\)"),
        ([True], "block indices"),
        ([], "layers is empty"),
        ([0, 0], "repeats"),
    ]:
        with pytest.raises(ValueError, match=match):
            viz.attention_view(construction, tokens, layers=layers)
    with pytest.raises(ValueError, match=r"sequence must be an int in \[0, 2\)"):
        viz.attention_view(construction, tokens, sequence=2)
    with pytest.raises(ValueError, match="lags have shape"):
        viz.attention_view(construction, tokens, lags=sample.lags[0])
    with pytest.raises(ValueError, match="integer"):
        viz.attention_view(construction, tokens, lags=sample.lags.double())
    with pytest.raises(ValueError, match="lags must be >= 0"):
        viz.attention_view(construction, tokens, lags=-sample.lags)
    with pytest.raises(ValueError, match="HookedTransformer"):
        viz.attention_view("model", tokens)

    with pytest.raises(ValueError, match="reference_layers"):
        viz.compare_attention_view(standard, construction, tokens, reference_layers=[3])
    with pytest.raises(ValueError, match="reference_layers"):  # layers=[2] applies to both; standard has 2
        viz.compare_attention_view(construction, standard, tokens, layers=[2])
    with pytest.raises(ValueError, match="names"):
        viz.compare_attention_view(standard, construction, tokens, names=("a", "a"))
    other_vocab = standard_transformer(Q + 1, T, n_layers=1, d_model=8, n_heads=1, seed=0)
    with pytest.raises(ValueError, match="d_vocab"):
        viz.compare_attention_view(other_vocab, construction, tokens)
    longer = standard_transformer(Q, T + 2, n_layers=1, d_model=8, n_heads=1, seed=0)
    with pytest.raises(ValueError, match="n_ctx=10"):
        viz.compare_attention_view(longer, construction, task.sample(1, T + 2).tokens)


# ----------------------------------------------------------------------------------------------
# probe_view


@pytest.fixture(scope="module")
def probe_setup(construction, task):
    """A probe for the mean responsibility read from the construction's named block, a fresh
    sequence, its cache and its targets."""
    train = task.sample(40, T, generator=torch.Generator().manual_seed(1)).tokens
    report = hooks.probe_model(
        construction,
        train,
        hooks.targets(train, task.transition, M, include_bayes=False),
        hook_names=[],
        blocks=["L2.mean_responsibility"],
        random_model=False,
    )
    probe = report.probes[("blocks.1.hook_resid_post:L2.mean_responsibility", "mean_responsibility")]
    sample = task.sample(2, T, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, cache = construction.run_with_cache(sample.tokens)
    targets = hooks.targets(sample.tokens, task.transition, M, include_bayes=False)
    return probe, sample, cache, targets


def test_probe_view_from_a_report_probe_and_a_cache(probe_setup):
    probe, sample, cache, targets = probe_setup
    view = viz.probe_view(probe, cache, targets, sample.tokens, lags=sample.lags, sequence=1)
    target = targets["mean_responsibility"][1]
    assert view.prediction.shape == view.target.shape == (T, M)
    assert torch.equal(view.target.isnan(), target.isnan()) and view.target[:M].isnan().all()
    assert torch.allclose(view.target[M:], target[M:], atol=0)
    # The block holds the mean responsibility exactly: the probe recovers it.
    assert torch.allclose(view.prediction[M:], target[M:], atol=1e-6)
    assert view.mean_abs_error < 1e-6
    assert torch.allclose(view.prediction, probe.predict(cache["blocks.1.hook_resid_post"][1]), atol=0)
    assert view.coordinate_names == ["g=1", "g=2", "g=3"]
    assert view.labels[M] == f"y{M + 1}={sample.tokens[1, M].item()},z={sample.lags[1, M].item()}"

    # The table: one row per position, target / probe / error per lag; '-' where undefined.
    rows = re.findall(r"<tr><td[^>]*>([^<]*)</td>(.*?)</tr>", view.html)
    assert [label for label, _ in rows] == view.labels
    first_defined = re.findall(r">(-?\d+\.\d{3})</td>", rows[M][1])
    expected = []
    for g in range(M):
        expected += [f"{target[M, g].item():.3f}", f"{view.prediction[M, g].item():.3f}", "0.000"]
    assert first_defined == expected
    assert rows[0][1].count(">-</td>") == 2 * M  # target and error undefined at t <= m
    assert f"R^2 = {probe.r2:.4f}" in view.html and "L2.mean_responsibility" in view.html
    assert "<script" not in view.html and not EXTERNAL.search(view.html)

    # The same view from the activations and the target tensor directly.
    direct = viz.probe_view(
        probe,
        cache["blocks.1.hook_resid_post"],
        targets["mean_responsibility"],
        sample.tokens,
        sequence=1,
        coordinate_names=["lag 1", "lag 2", "lag 3"],
    )
    assert torch.equal(direct.prediction, view.prediction)
    assert "lag 2" in direct.html and "z=" not in direct.html


def test_probe_view_rejects_bad_input(probe_setup, construction):
    probe, sample, cache, targets = probe_setup
    tokens = sample.tokens
    acts = cache["blocks.1.hook_resid_post"]
    bare = hooks.fit_probe(
        acts[:, M:].reshape(-1, acts.shape[-1]),
        targets["mean_responsibility"][:, M:].reshape(-1, M),
        n_folds=2,
        test_fraction=0.3,
    )
    with pytest.raises(ValueError, match="no hook_name"):
        viz.probe_view(bare, cache, targets["mean_responsibility"], tokens)
    with pytest.raises(ValueError, match="not in the targets dict"):
        viz.probe_view(probe, cache, {"md_weights": targets["responsibility"]}, tokens)
    with torch.no_grad():
        _, embed_only = construction.run_with_cache(tokens, names_filter=["hook_embed"])
    with pytest.raises(ValueError, match="the cache has no"):
        viz.probe_view(probe, embed_only, targets, tokens)
    with pytest.raises(ValueError, match="the probe reads d="):
        viz.probe_view(probe, acts[..., :5], targets, tokens)
    with pytest.raises(ValueError, match="the probe predicts k=3"):
        viz.probe_view(probe, cache, targets["mean_responsibility"][..., :2], tokens)
    with pytest.raises(ValueError, match=r"shape \[B=2, T=10"):
        viz.probe_view(probe, acts[:1], targets, tokens)
    with pytest.raises(ValueError, match="coordinate_names"):
        viz.probe_view(probe, cache, targets, tokens, coordinate_names=["a"])
    with pytest.raises(ValueError, match="sequence"):
        viz.probe_view(probe, cache, targets, tokens, sequence=-1)
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        viz.probe_view(probe, cache, targets, -tokens - 1)
    with pytest.raises(ValueError, match="Probe"):
        viz.probe_view("probe", cache, targets, tokens)
