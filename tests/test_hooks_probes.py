"""mdlens.hooks.probes: held-out R^2 against its theoretical value, and on the construction."""

import pytest
import torch

from mdlens import MTDTask
from mdlens.construction import build_md_transformer
from mdlens.hooks.probes import ProbeReport, default_hook_names, fit_probe, probe_model
from mdlens.hooks.targets import targets
from mdlens.models import standard_transformer


def test_planted_linear_map_gives_its_theoretical_r2():
    # y = x W + noise with x ~ N(0, I): the population R^2 of coordinate j is |W_j|^2 / (|W_j|^2 + s^2).
    generator = torch.Generator().manual_seed(0)
    n, d, k, noise = 40_000, 12, 3, 1.3
    acts = torch.randn(n, d, generator=generator, dtype=torch.float64)
    planted = torch.randn(d, k, generator=generator, dtype=torch.float64)
    target = acts @ planted + 2.0 + noise * torch.randn(n, k, generator=generator, dtype=torch.float64)
    signal = (planted**2).sum(dim=0)
    theory = signal / (signal + noise**2)
    probe = fit_probe(acts, target, groups=torch.arange(n) // 40)
    assert abs(probe.r2 - theory.mean().item()) < 0.02
    assert (probe.r2_per_target - theory).abs().max() < 0.02
    # The weights are the planted map (ridge is small next to 32000 training rows), the bias the offset.
    torch.testing.assert_close(probe.weight, planted, rtol=0, atol=0.03)
    torch.testing.assert_close(probe.bias, torch.full((k,), 2.0, dtype=torch.float64), rtol=0, atol=0.03)
    assert probe.n_train + probe.n_test == n and probe.n_test == 8000


def test_pure_noise_target_has_r2_near_zero_not_above():
    generator = torch.Generator().manual_seed(1)
    acts = torch.randn(20_000, 8, generator=generator, dtype=torch.float64)
    probe = fit_probe(acts, torch.randn(20_000, 2, generator=generator, dtype=torch.float64))
    assert -0.01 < probe.r2 < 0.005


def test_held_out_groups_are_never_trained_on():
    # Each group has its own random offset: a probe that saw a held-out group's rows would fit it.
    generator = torch.Generator().manual_seed(2)
    groups = torch.arange(3000) // 30
    acts = torch.nn.functional.one_hot(groups).to(torch.float64)  # a group-identity code
    target = torch.randn(100, 1, generator=generator, dtype=torch.float64)[groups]
    probe = fit_probe(acts, target, groups=groups)
    assert probe.r2 < 0.0  # unseen groups: the identity code predicts nothing for them
    assert fit_probe(acts, target).r2 > 0.99  # split by row, every group is seen in training


@pytest.fixture(scope="module")
def construction_report():
    task = MTDTask(vocab_size=5, order=3, seed=0)
    sample = task.sample(96, 40, generator=torch.Generator().manual_seed(3))
    model = build_md_transformer(task.transition, 3, 40, eta=0.05)
    values = targets(sample.tokens, task.transition, 3, beta=model.md_params["beta"], include_bayes=False)
    return model, sample, values, probe_model(model, sample.tokens, values, blocks=["L2.mean_responsibility"])


def test_construction_holds_mean_responsibility_at_layer_2(construction_report):
    model, _, _, report = construction_report
    assert report.rows[0] == "hook_embed" and report.rows[2] == "blocks.1.hook_resid_post"
    mean_r2 = report.r2["mean_responsibility"]
    assert mean_r2[2] >= 0.999 and mean_r2[3] >= 0.999  # layer 2 writes it; layer 3 keeps it
    assert mean_r2[1] < 0.5  # layer 1 holds only the current position's responsibility
    assert report.r2["responsibility"][1] >= 0.999
    assert report.control_target_r2["mean_responsibility"][2] < 0.5
    assert report.random_model_r2["mean_responsibility"][2] < 0.5
    assert report.selectivity["mean_responsibility"][2] > 0.5
    assert report.r2["md_weights"][3] >= 0.999  # layer 3 holds lambda in L3.rel
    assert report.r2["mean_responsibility"][-1] >= 0.999  # the named block alone

    # The probe reads the mean responsibility off fresh sequences: check against the targets.
    task = MTDTask(vocab_size=5, order=3, seed=0)
    fresh = task.sample(8, 40, generator=torch.Generator().manual_seed(4))
    probe = report.probes[("blocks.1.hook_resid_post", "mean_responsibility")]
    _, cache = model.run_with_cache(fresh.tokens)
    predicted = probe.predict(cache["blocks.1.hook_resid_post"][:, 3:].reshape(-1, model.cfg.d_model))
    expected = targets(fresh.tokens, task.transition, 3, include_bayes=False)["mean_responsibility"][:, 3:]
    torch.testing.assert_close(predicted, expected.reshape(-1, 3), rtol=0, atol=1e-3)


def test_probe_model_runs_on_a_plain_hooked_transformer_and_names_bad_input():
    task = MTDTask(vocab_size=5, order=3, seed=0)
    sample = task.sample(24, 16, generator=torch.Generator().manual_seed(5))
    model = standard_transformer(5, 16, n_layers=2, d_model=16, seed=0)
    values = targets(sample.tokens, task.transition, 3, include_bayes=False)
    report = probe_model(model, sample.tokens, values)
    assert report.rows == ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert all(len(v) == 3 for v in report.r2.values())
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        probe_model(model, sample.tokens + 5, values)
    long = task.sample(24, 20, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="n_ctx"):
        probe_model(model, long.tokens, targets(long.tokens, task.transition, 3, include_bayes=False))
    with pytest.raises(ValueError, match="shape"):
        probe_model(model, sample.tokens, {"x": values["responsibility"][:, :10]})
    with pytest.raises(ValueError, match="layout"):
        probe_model(model, sample.tokens, values, blocks=["L2.mean_responsibility"])


def test_fit_probe_names_bad_input():
    acts = torch.randn(50, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        fit_probe(acts, torch.randn(40, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        fit_probe(acts, torch.full((50, 1), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="groups"):
        fit_probe(acts, torch.randn(50, dtype=torch.float64), groups=torch.zeros(50, dtype=torch.int64))


def test_report_plot_names_reading_points_by_the_papers_layers():
    rows = [
        "hook_embed",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
        "blocks.0.attn.hook_z:head1",
        "blocks.2.hook_resid_post:L2.mean_responsibility",
        "blocks.1.attn.hook_result",
    ]
    values = {"mean_responsibility": [0.5] * len(rows)}
    report = ProbeReport(rows, ["mean_responsibility"], values, values, values, values, n_sequences=4, n_rows=8)
    ticks = [label.get_text() for label in report.plot().axes[0].get_xticklabels()]
    assert ticks == ["embed", "L1", "L2", "L1 z h1", "L2.mean_responsibility", "blocks.1.attn.hook_result"]


def test_default_hook_names_are_the_embedding_then_every_residual_output():
    model = standard_transformer(vocab_size=4, n_ctx=8, n_layers=3, d_model=8, seed=0)
    assert default_hook_names(model) == [
        "hook_embed",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
        "blocks.2.hook_resid_post",
    ]
