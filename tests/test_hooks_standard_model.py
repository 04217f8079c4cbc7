"""Every probe runs on a plain HookedTransformer (the shipped standard-3l) from the task's tokens
alone, and refuses bad input with a ValueError that names the problem."""

import pytest
import torch

import mdlens
from mdlens import hooks
from mdlens.construction import build_md_transformer


@pytest.fixture(scope="module")
def setting():
    model, task = mdlens.load_pretrained("standard-3l")
    sample = task.sample(24, 32, generator=torch.Generator().manual_seed(0))
    other = task.sample(24, 32, generator=torch.Generator().manual_seed(1))
    construction = build_md_transformer(task.transition, task.order, 32, eta=0.05)
    return model, task, sample, other, construction


def test_every_probe_runs_on_standard_3l(setting):
    model, task, sample, other, construction = setting
    pi, m = task.transition, task.order
    values = hooks.targets(sample.tokens, pi, m, beta=5.0, include_bayes=False)
    report = hooks.probe_model(model, sample.tokens, values)
    assert len(report.rows) == model.cfg.n_layers + 1
    agreement = hooks.attention_agreement(model, construction, sample.tokens)
    assert len(agreement.heads) == 3 and all(0 <= h.tv <= 1 for h in agreement.heads)
    sensitivity = hooks.sensitivity_alignment(model, construction, sample.tokens[:4])
    assert -1 <= sensitivity["cosine"] <= 1
    probe = report.probes[("blocks.1.hook_resid_post", "mean_responsibility")]
    patch = hooks.patch_mean_responsibility(model, sample.tokens, other.tokens, pi, m, beta=5.0, probe=probe)
    assert patch.subspace_rank >= 1 and patch.kl_unpatched >= 0
    heatmap = hooks.patching_heatmap(model, sample.tokens[:4, :12], other.tokens[:4, :12])
    assert heatmap.shape == (3, 12)
    implicit = hooks.implicit_weights(model, sample.tokens, pi, m)
    assert torch.allclose(implicit.weights.sum(-1), torch.ones(24, dtype=torch.float64))


def _calls(setting, tokens, pi, m, values):
    model, _, _, _, construction = setting
    probe_tokens = tokens if tokens.ndim == 2 else tokens.unsqueeze(0)
    return {
        "probe_model": lambda: hooks.probe_model(model, tokens, values),
        "attention_agreement": lambda: hooks.attention_agreement(model, construction, tokens, order=m),
        "sensitivity_alignment": lambda: hooks.sensitivity_alignment(model, construction, tokens),
        "patch_mean_responsibility": lambda: hooks.patch_mean_responsibility(
            model,
            tokens,
            probe_tokens.flip(0),
            pi,
            m,
            beta=5.0,
            probe=type(
                "P",
                (),
                {
                    "weight": torch.ones(model.cfg.d_model, 1, dtype=torch.float64),
                    "hook_name": "blocks.1.hook_resid_post",
                },
            )(),
        ),
        "implicit_weights": lambda: hooks.implicit_weights(model, tokens, pi, m),
        "responsibility_tv": lambda: hooks.responsibility_tv(model, tokens, pi, m),
    }


@pytest.mark.parametrize(
    "name",
    [
        "probe_model",
        "attention_agreement",
        "sensitivity_alignment",
        "patch_mean_responsibility",
        "implicit_weights",
        "responsibility_tv",
    ],
)
def test_bad_input_gives_a_named_value_error(setting, name):
    _, task, sample, _, _ = setting
    pi, m = task.transition, task.order
    good_values = hooks.targets(sample.tokens, pi, m, include_bayes=False)
    outside = sample.tokens.clone()
    outside[0, 5] = 7
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        _calls(setting, outside, pi, m, good_values)[name]()
    too_long = task.sample(4, 193, generator=torch.Generator().manual_seed(2)).tokens
    with pytest.raises(ValueError, match=r"n_ctx|context"):
        _calls(setting, too_long, pi, m, hooks.targets(too_long, pi, m, include_bayes=False))[name]()
    # probe_model reads m off the targets' NaNs (targets() refuses T <= m itself); sensitivity_alignment
    # compares two models' input gradients and needs no m.
    if name not in ("probe_model", "sensitivity_alignment"):
        with pytest.raises(ValueError, match=r"order|T=3 <= m=3"):
            _calls(setting, sample.tokens[:, :3], pi, m, good_values)[name]()
    if name in ("implicit_weights", "responsibility_tv", "patch_mean_responsibility"):
        with pytest.raises(ValueError, match=r"d_vocab|q="):
            _calls(setting, sample.tokens, torch.full((4, 4), 0.25, dtype=torch.float64), m, good_values)[name]()
    if name == "probe_model":
        with pytest.raises(ValueError, match="shape"):
            _calls(setting, sample.tokens, pi, m, {"mean_responsibility": good_values["mean_responsibility"][:, :20]})[
                name
            ]()
