"""mdlens.load_pretrained / list_pretrained: the shipped models, and the loader on a directory of our own."""

import json

import pytest
import torch
from transformer_lens import HookedTransformer

import mdlens
from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.evaluation import reference_kls, sample_batches
from mdlens.models import DisentangledTransformer, disentangled_transformer

SHIPPED = {"disentangled-3l", "disentangled-3l-long", "standard-3l", "disentangled-5l"}


def test_every_shipped_model_loads_and_predicts():
    names = mdlens.list_pretrained()
    assert set(names) == SHIPPED
    for name in names:
        model, task = mdlens.load_pretrained(name)
        assert isinstance(model, HookedTransformer), name
        assert isinstance(task, MTDTask), name
        # The one shared task of the issue: q = 5, m = 3, alpha = 1, seed 0; context >= 192.
        assert (task.vocab_size, task.order, task.alpha) == (5, 3, 1.0), name
        assert torch.equal(task.transition, MTDTask(vocab_size=5, order=3, alpha=1.0, seed=0).transition), name
        assert model.cfg.d_vocab == task.vocab_size and model.cfg.n_ctx >= 192, name
        assert isinstance(model, DisentangledTransformer) == name.startswith("disentangled"), name
        if name.startswith("disentangled"):
            assert model.cfg.n_layers == int(name.split("-")[1].removesuffix("l")), name
        tokens = task.sample(8, model.cfg.n_ctx, generator=torch.Generator().manual_seed(0)).tokens
        probs = mdlens.predict_next(model, tokens)
        assert probs.shape == (8, 5) and (probs >= 0).all(), name
        torch.testing.assert_close(probs.sum(-1), torch.ones(8, dtype=torch.float64))


def test_every_shipped_model_predicts_well_at_its_context_length():
    """A cheap guard against a regressed checkpoint: at T=192, on 256 fresh sequences, each model's
    mean KL to the truth beside tuned one-step MD's (the README's ratios are 1.0-1.1x for the
    disentangled models and about 1.9x for standard-3l; the bounds leave room for sampling noise)."""
    task = MTDTask(vocab_size=5, order=3, alpha=1.0, seed=0)
    tune, evaluation = sample_batches(task, 192, 256, 256)
    _, references = reference_kls(task, tune, evaluation, {"md1_tuned": 1}, bayes=False)
    md1 = references["md1_tuned"].mean().item()
    for name in mdlens.list_pretrained():
        model, _ = mdlens.load_pretrained(name)
        kl = E.kl_divergence(evaluation.next_probs, mdlens.predict_next(model, evaluation.tokens)).mean().item()
        bound = 1.25 if name.startswith("disentangled") else 2.5
        assert kl < bound * md1, (name, kl / md1)
        assert kl < 0.5 * references["uniform"].mean().item(), name


def test_shipped_manifest_records_how_each_model_was_made():
    from mdlens.pretrained import manifest

    for name, entry in manifest().items():
        assert entry["command"].startswith("mdlens train"), name
        assert entry["wall_clock_s"] > 0 and entry["steps"] > 0 and entry["samples"] > 0, name


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown pretrained model 'gpt-2'") as info:
        mdlens.load_pretrained("gpt-2")
    for name in mdlens.list_pretrained():
        assert name in str(info.value)


@pytest.fixture
def tiny_root(tmp_path):
    """A directory laid out like mdlens/pretrained/ with one tiny model in it."""
    task = MTDTask(vocab_size=4, order=2, alpha=1.0, seed=3)
    model = disentangled_transformer(4, 2, 12, n_layers=2, seed=5)
    mdlens.save(model, tmp_path / "tiny-2l", task=task)
    entry = {
        "command": "mdlens train --vocab 4 --order 2 --seq-len 12 --layers 2 --out tiny-2l",
        "wall_clock_s": 1.0,
        "steps": 1,
        "samples": 1,
        "description": "a test model",
    }
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"tiny-2l": entry}))
    return tmp_path, model, task


def test_load_pretrained_from_a_root(tiny_root):
    root, saved_model, saved_task = tiny_root
    assert mdlens.list_pretrained(root=root) == ["tiny-2l"]
    model, task = mdlens.load_pretrained("tiny-2l", root=root)
    assert isinstance(model, DisentangledTransformer)
    for name, value in saved_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert torch.equal(task.transition, saved_task.transition) and task.order == 2
    tokens = task.sample(3, 12, generator=torch.Generator().manual_seed(0)).tokens
    torch.testing.assert_close(mdlens.predict_next(model, tokens), mdlens.predict_next(saved_model, tokens))


def test_loader_errors_say_what_is_wrong(tiny_root, tmp_path_factory):
    root, _, _ = tiny_root
    with pytest.raises(ValueError, match="known: tiny-2l"):
        mdlens.load_pretrained("tiny-3l", root=root)
    # Listed in the manifest, but the weights are gone: the error names the file and the command.
    (root / "tiny-2l" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*mdlens train --vocab 4"):
        mdlens.load_pretrained("tiny-2l", root=root)
    # A directory without a manifest ships nothing.
    empty = tmp_path_factory.mktemp("empty")
    assert mdlens.list_pretrained(root=empty) == []
    with pytest.raises(ValueError, match="known: none"):
        mdlens.load_pretrained("tiny-2l", root=empty)
    # A checkpoint saved without its task cannot be a pretrained (model, task) pair.
    mdlens.save(disentangled_transformer(4, 2, 12, n_layers=1), root / "tiny-2l")
    with pytest.raises(ValueError, match="without its task"):
        mdlens.load_pretrained("tiny-2l", root=root)
    (root / "MANIFEST.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"MANIFEST\.json is not valid JSON"):
        mdlens.list_pretrained(root=root)


def test_trained_analysis_scores_a_model_like_the_estimators(tmp_path):
    """``mdlens reproduce trained`` on a root holding the exact one-step-MD construction: its KL must be
    one-step MD's KL at the construction's step, recomputed here from the estimators."""
    from mdlens import estimators as E
    from mdlens.analyses import trained
    from mdlens.construction import build_md_transformer
    from mdlens.evaluation import sample_batches

    task = MTDTask(vocab_size=5, order=3, alpha=1.0, seed=0)
    seq_len, eta = 16, 0.05
    root = tmp_path / "models"
    mdlens.save(build_md_transformer(task.transition, 3, seq_len, eta), root / "disentangled-3l", task=task)
    (root / "MANIFEST.json").write_text(
        json.dumps({"disentangled-3l": {"command": "built", "wall_clock_s": 1.0, "steps": 1, "samples": 1}})
    )
    result = trained.run(tmp_path / "out", quick=True, root=root)
    report = result.report
    assert {p.rsplit("/", 1)[-1] for p in result.files} == {
        "trained.json",
        "trained_kl_vs_length.png",
        "trained_kl_ratio_to_md1.png",
    }
    assert json.loads((tmp_path / "out" / "trained.json").read_text())["criteria"].keys() == {"disentangled-3l"}

    by_length = {r["seq_len"]: r for r in report["results"]}
    assert by_length[32]["kl"]["disentangled-3l"] is None  # beyond the model's context
    _, evaluation = sample_batches(task, seq_len, trained.QUICK["n_tune"], trained.QUICK["n_eval"])
    md = E.predictive(evaluation.tokens, task.transition, E.md_weights(evaluation.tokens, task.transition, 3, eta))
    expected = E.kl_divergence(evaluation.next_probs, md).mean().item()
    assert by_length[seq_len]["kl"]["disentangled-3l"]["mean"] == pytest.approx(expected, rel=1e-9)
    uniform = torch.full((evaluation.tokens.shape[0], 3), 1 / 3, dtype=torch.float64)
    expected_uniform = E.kl_divergence(evaluation.next_probs, E.predictive(evaluation.tokens, task.transition, uniform))
    assert by_length[seq_len]["kl"]["uniform"]["mean"] == pytest.approx(expected_uniform.mean().item(), rel=1e-12)
    # The tuned step is the best of a grid, so on the evaluation batch it cannot be far worse than eta = 0.05.
    ratio = by_length[seq_len]["kl"]["md1_tuned"]["mean"] / expected
    assert ratio < 1.2


def test_paired_ratio_and_its_standard_error_against_resampling():
    """The delta-method standard error of mean(a)/mean(b) on paired samples matches the spread of the
    ratio over many independent draws of the same size; an exactly proportional pair has zero error."""
    from mdlens.analyses.trained import paired_ratio

    exact = paired_ratio(2.5 * torch.arange(1.0, 9.0, dtype=torch.float64), torch.arange(1.0, 9.0, dtype=torch.float64))
    assert exact["ratio"] == pytest.approx(2.5) and exact["se"] == pytest.approx(0.0, abs=1e-12)
    assert exact["n_infinite"] == 0
    with_inf = paired_ratio(torch.tensor([1.0, 3.0, float("inf")]), torch.tensor([1.0, 1.0, 5.0]))
    assert with_inf["ratio"] is None and with_inf["n_infinite"] == 1 and with_inf["finite_ratio"] == pytest.approx(2.0)

    generator = torch.Generator().manual_seed(0)

    def draw(n):  # heavy-tailed, correlated per-sequence "KLs", like a model's and MD's
        reference = torch.empty(n, dtype=torch.float64).exponential_(generator=generator) ** 2
        noise = torch.empty(n, dtype=torch.float64).exponential_(generator=generator)
        return 1.1 * reference + 0.2 * noise, reference

    n = 400
    ratios = torch.tensor([paired_ratio(*draw(n))["ratio"] for _ in range(2000)])
    predicted = paired_ratio(*draw(200_000))["se"] * (200_000 / n) ** 0.5
    assert ratios.std().item() == pytest.approx(predicted, rel=0.1)


def test_plot_label_names_the_lengths_left_out_for_an_infinite_kl():
    """A length whose mean KL is inf is not drawn; the legend must say which and on how many sequences."""
    from mdlens.analyses.trained import model_label

    results = [
        {"seq_len": 8, "kl": {"m": {"mean": None, "n_infinite": 2}}},
        {"seq_len": 16, "kl": {"m": {"mean": 0.01, "n_infinite": 0}}},
        {"seq_len": 32, "kl": {"m": None}},
    ]
    assert model_label(results, "m") == "trained m\nKL = inf, not drawn: T=8 (2 seq)"
    assert model_label(results[1:], "m") == "trained m"
