"""What a researcher meets in the first hour with the models, checked against independent computations:

- the TL loss of every shipped model is finite, with finite weight and backward-hook gradients, at
  T=32 and T=192, and equals the cross-entropy of ``predict_next`` on every prefix it scores;
- ``run_with_cache`` gives ``model(tokens)`` bit for bit; ``model.all_composition_scores`` is
  mdlens's (finite on the construction, TransformerLens's on a standard model);
- ``probe_model`` reads hooks with a head axis per head and refuses patterns and unknown names;
- a plain ``HookedTransformer`` survives ``mdlens.save`` / ``mdlens.load`` unchanged;
- ``patching_heatmap`` is quiet unless asked and refuses a vector metric; ``fit_probe`` refuses a
  constant target; integral numbers of any kind are ints; a construction read on fewer tokens than
  it was built for says which step it then takes.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ETA, M, Q, T
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.utilities import lm_cross_entropy_loss

import mdlens
from mdlens import MTDTask
from mdlens.checkpoints import CONFIG_FILE
from mdlens.construction import build_md_transformer
from mdlens.hooks.patching import patching_heatmap
from mdlens.hooks.probes import fit_probe, probe_model
from mdlens.models import composition_scores, standard_transformer
from mdlens.models.disentangled import RescaledStepWarning
from mdlens.models.tokenizer import attach_tokenizer
from mdlens.predict import output_to_probs, predict_next

SHIPPED = tuple(mdlens.list_pretrained())


@pytest.fixture(scope="module")
def shipped():
    return {name: mdlens.load_pretrained(name) for name in SHIPPED}


def sample_tokens(task, batch, length, seed):
    return task.sample(batch, length, generator=torch.Generator().manual_seed(seed)).tokens


def first_scored(model) -> int:
    """The first 0-based position the TL loss scores: the order for a "probs" model that knows it."""
    return model.order if model.output_type == "probs" and getattr(model, "order", None) else 0


# ----------------------------------------------------------------------------------------------
# The TL loss: finite, with finite gradients, and the cross-entropy of predict_next


@pytest.mark.parametrize("length", [32, 192])
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_loss_and_every_gradient_are_finite(name, length, shipped):
    model, task = shipped[name]
    tokens = sample_tokens(task, 8 if length == 192 else 32, length, seed=5)
    model.zero_grad(set_to_none=True)
    loss, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    assert torch.isfinite(loss)
    gradients = {key: value for key, value in cache.cache_dict.items() if key.endswith("_grad")}
    assert "hook_embed_grad" in gradients and "blocks.0.hook_resid_pre_grad" in gradients
    assert all(torch.isfinite(value).all() for value in gradients.values()), [
        key for key, value in gradients.items() if not torch.isfinite(value).all()
    ]
    trained = [(key, p.grad) for key, p in model.named_parameters() if p.requires_grad]
    assert trained and all(grad is not None and torch.isfinite(grad).all() for _, grad in trained)
    assert any(grad.abs().sum() > 0 for _, grad in trained)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_loss_is_the_cross_entropy_of_predict_next_on_the_scored_prefixes(name, shipped):
    model, task = shipped[name]
    tokens = sample_tokens(task, 4, 32, seed=6)
    first = first_scored(model)
    assert first == (task.order if model.output_type == "probs" else 0)
    by_hand = torch.zeros(4, 31, dtype=torch.float64)
    for t in range(first, 31):  # position t predicts tokens[:, t + 1] from tokens[:, :t + 1]
        p = predict_next(model, tokens[:, : t + 1])
        by_hand[:, t] = -p[torch.arange(4), tokens[:, t + 1]].log()
    with torch.no_grad():
        loss = model(tokens, return_type="loss")
        per_token = model(tokens, return_type="loss", loss_per_token=True)
    assert per_token.shape == (4, 31)
    assert torch.equal(per_token[:, :first], torch.zeros(4, first, dtype=per_token.dtype))
    torch.testing.assert_close(per_token.double(), by_hand, rtol=2e-5, atol=2e-5)
    assert loss.item() == pytest.approx(by_hand[:, first:].mean().item(), rel=2e-5)


def test_probs_loss_with_a_left_padded_mask_counts_from_the_first_real_token(construction, task):
    tokens = sample_tokens(task, 2, T, seed=7)
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0  # two pad tokens on the left of row 1
    with torch.no_grad():
        output = construction(tokens)
        per_token = construction.loss_fn(output, tokens, mask, per_token=True)
        loss = construction.loss_fn(output, tokens, mask)
    nll = -output_to_probs(output[:, :-1], "probs").gather(-1, tokens[:, 1:, None])[..., 0].log()
    counts = torch.zeros(2, T - 1, dtype=torch.bool)
    counts[0, M:] = True  # row 0: positions t >= m
    counts[1, 2 + M :] = True  # row 1: m real tokens after the two pads
    torch.testing.assert_close(per_token, torch.where(counts, nll, 0.0), rtol=1e-12, atol=1e-12)
    assert loss.item() == pytest.approx(nll[counts].mean().item(), rel=1e-12)
    # TransformerLens's own loss on the same distribution (log p as logits), masked the same way.
    theirs = lm_cross_entropy_loss(output_to_probs(output, "probs").log(), tokens, counts_to_mask(counts))
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-12)


def counts_to_mask(counts: torch.Tensor) -> torch.Tensor:
    """An attention mask under which TL counts exactly the positions ``counts`` marks (each row's
    counted positions are contiguous and end at the last one): unmask from the first counted one."""
    mask = torch.zeros(counts.shape[0], counts.shape[1] + 1, dtype=torch.long)
    for row in range(counts.shape[0]):
        first = int(counts[row].nonzero()[0])
        mask[row, first:] = 1
    return mask


def test_an_impossible_observed_token_gives_inf_and_one_warning_per_call(construction, task):
    tokens = sample_tokens(task, 2, T, seed=8)
    with torch.no_grad():
        output = construction(tokens).clone()
    output[0, M + 1, tokens[0, M + 2]] = -0.5  # clipped to 0 at the observed next token
    output[1, M + 3, tokens[1, M + 4]] = -0.5
    output[0, 0, tokens[0, 1]] = -0.5  # at an unscored position: no effect
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = construction.loss_fn(output, tokens)
    assert loss.item() == float("inf")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "2 observed token(s) have probability 0" in messages[0]
    assert f"batch 0, position {M + 1}" in messages[0]
    output[0, M + 1, tokens[0, M + 2]] = 0.1
    output[1, M + 3, tokens[1, M + 4]] = 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(construction.loss_fn(output, tokens))


def test_a_probs_loss_over_no_scored_position_raises(construction, task):
    tokens = sample_tokens(task, 2, M + 1, seed=9)
    with pytest.raises(ValueError, match="no position predicts a scored token"):
        construction(tokens, return_type="loss")


# ----------------------------------------------------------------------------------------------
# TransformerLens fidelity: cached runs bit for bit, composition scores


@pytest.mark.parametrize("name", ["construction", "construction-float32", *SHIPPED])
def test_run_with_cache_and_hooked_runs_give_the_output_bit_for_bit(name, shipped, construction, task):
    if name.startswith("construction"):
        model = (
            construction if name == "construction" else build_md_transformer(task.transition, M, T, ETA, torch.float32)
        )
        tokens = sample_tokens(task, 4, T, seed=10)
    else:
        model, model_task = shipped[name]
        tokens = sample_tokens(model_task, 4, 64, seed=10)
    with torch.no_grad():
        output = model(tokens)
        cached, _ = model.run_with_cache(tokens)
        assert torch.equal(output, cached)
        for hook in (
            "blocks.0.attn.hook_rel_scores",
            "blocks.0.attn.hook_key_pos_scores",
            "blocks.0.attn.hook_pattern",
        ):
            if hook in model.hook_dict:
                hooked = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda x, hook: x)])
                assert torch.equal(output, hooked), hook


def test_all_composition_scores_on_the_construction_are_mdlens_scores(construction):
    with pytest.warns(UserWarning, match="Q-composition: these matrices are zero"):
        scores = construction.all_composition_scores("Q")
    assert scores.shape == (3, 1, 3, 1) and torch.isfinite(scores).all()
    with pytest.warns(UserWarning):
        assert torch.equal(scores, composition_scores(construction, "Q").total)
    # TransformerLens's own method divides 0 by 0 on the construction's zero W_Q layers.
    assert torch.isnan(HookedTransformer.all_composition_scores(construction, "Q")).any()
    # By hand: the writer [W_OV ; R] of layer l1 against the reader [W_QK | U] of layer l2 (Frobenius).
    d_model = construction.cfg.d_model

    def by_hand(l1: int, l2: int) -> float:
        writer_attn, reader_attn = construction.blocks[l1].attn, construction.blocks[l2].attn
        ov = writer_attn.W_V[0] @ writer_attn.W_O[0]
        writer = torch.cat([ov, writer_attn.rel_value @ writer_attn.W_O[0][d_model:]]).detach()
        reader = torch.cat([reader_attn.W_Q[0] @ reader_attn.W_K[0].T, reader_attn.rel_query], dim=1).detach()
        return (torch.linalg.norm(writer @ reader) / (torch.linalg.norm(writer) * torch.linalg.norm(reader))).item()

    # Layer 3 reads the mean responsibility that layer 2 wrote (its rel_query), nothing layer 1 wrote.
    assert scores[1, 0, 2, 0].item() == pytest.approx(by_hand(1, 2), rel=1e-10) and scores[1, 0, 2, 0] > 0.01
    assert scores[0, 0, 2, 0].item() == pytest.approx(by_hand(0, 2), abs=1e-12)
    assert torch.equal(scores[1:, :, 0], torch.zeros_like(scores[1:, :, 0]))  # l2 <= l1 is 0


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_all_composition_scores_on_a_standard_model_are_transformer_lens_scores(standard, mode):
    ours = standard.all_composition_scores(mode)
    theirs = HookedTransformer.all_composition_scores(standard, mode).detach()
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# probe_model on hooks with a head axis, patterns, unknown names


def nan_before_order(values: torch.Tensor) -> torch.Tensor:
    values = values.clone()
    values[:, :M] = float("nan")
    return values


def test_probe_model_probes_a_head_axis_per_head(standard, task):
    tokens = sample_tokens(task, 40, T, seed=11)
    with torch.no_grad():
        _, cache = standard.run_with_cache(tokens)
    z = cache["blocks.0.attn.hook_z"]  # [batch, pos, head, d_head]
    assert z.shape[2] == 2
    readout = torch.randn(z.shape[-1], 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    planted = {"planted": nan_before_order(z[:, :, 1] @ readout)}  # linear in head 1 only
    report = probe_model(standard, tokens, planted, hook_names=["blocks.0.attn.hook_z"], random_model=False)
    assert report.rows == ["blocks.0.attn.hook_z:head0", "blocks.0.attn.hook_z:head1"]
    assert report.r2["planted"][1] > 0.9999
    assert report.r2["planted"][0] < 0.99
    probe = report.probes[("blocks.0.attn.hook_z:head1", "planted")]
    assert probe.head == 1 and probe.hook_name == "blocks.0.attn.hook_z" and probe.weight.shape == (z.shape[-1], 2)
    # The same probe fit directly on head 1's activations at positions t > m.
    direct = fit_probe(
        z[:, M:, 1].reshape(-1, z.shape[-1]),
        planted["planted"][:, M:].reshape(-1, 2),
        groups=torch.arange(40).repeat_interleave(T - M),
    )
    assert report.r2["planted"][1] == pytest.approx(direct.r2, abs=1e-9)


def test_probe_model_reads_the_disentangled_value_rpe_per_head(construction, task):
    tokens = sample_tokens(task, 12, T, seed=12)
    targets = mdlens.hooks.targets(tokens, task.transition, M, include_bayes=False)
    report = probe_model(
        construction,
        tokens,
        {"responsibility": targets["responsibility"]},
        hook_names=["blocks.0.attn.hook_rel_values"],
        random_model=False,
    )
    assert report.rows == ["blocks.0.attn.hook_rel_values:head0"]
    assert report.r2["responsibility"][0] > 0.999999  # layer 1's value RPE is the responsibilities


@pytest.mark.parametrize(
    "hook", ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_attn_scores", "blocks.0.attn.hook_rel_scores"]
)
def test_probe_model_refuses_attention_patterns_and_scores(construction, task, hook):
    tokens = sample_tokens(task, 12, T, seed=13)
    targets = mdlens.hooks.targets(tokens, task.transition, M, include_bayes=False)
    with pytest.raises(ValueError, match=r"attention scores or a pattern, \[batch, head, query_pos, key_pos\]"):
        probe_model(construction, tokens, targets, hook_names=[hook], random_model=False)


def test_probe_model_names_the_valid_hooks_for_an_unknown_one(standard, task):
    tokens = sample_tokens(task, 12, T, seed=14)
    targets = mdlens.hooks.targets(tokens, task.transition, M, include_bayes=False)
    with pytest.raises(ValueError, match=r"no hook named 'blocks.7.hook_resid_post'.*blocks.\{l\}.attn.hook_z"):
        probe_model(standard, tokens, targets, hook_names=["blocks.7.hook_resid_post"])
    with pytest.raises(ValueError, match=r"never calls 'blocks\.0\.attn\.hook_result'"):
        probe_model(standard, tokens, targets, hook_names=["blocks.0.attn.hook_result"])


# ----------------------------------------------------------------------------------------------
# mdlens.save / mdlens.load of a plain HookedTransformer


@pytest.mark.parametrize(
    "architecture",
    [
        dict(attn_only=True),
        dict(d_mlp=32, act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary", rotary_dim=4),
    ],
    ids=["attention-only", "with-mlp"],
)
def test_a_plain_hooked_transformer_round_trips(tmp_path, architecture):
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=12, d_head=4, d_vocab=6, seed=3, **architecture)
    model = HookedTransformer(cfg)
    mdlens.save(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["kind"] == "hooked_transformer"
    loaded = mdlens.load(tmp_path)
    assert type(loaded) is HookedTransformer and loaded.tokenizer is None
    assert loaded.cfg.to_dict() == model.cfg.to_dict()
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys() and all(torch.equal(original[k], reloaded[k]) for k in original)
    tokens = torch.randint(6, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
        assert torch.equal(model(tokens, return_type="loss"), loaded(tokens, return_type="loss"))


def test_a_plain_hooked_transformer_keeps_its_tokenizer_and_dtype(tmp_path):
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=8, n_ctx=8, d_head=4, d_vocab=5, attn_only=True, dtype=torch.float64, seed=1
    )
    model = attach_tokenizer(HookedTransformer(cfg))
    loaded = mdlens.load(mdlens.save(model, tmp_path))
    assert loaded.cfg.dtype == torch.float64 and torch.equal(
        loaded.to_tokens("3 1 4", prepend_bos=False), model.to_tokens("3 1 4", prepend_bos=False)
    )
    with torch.no_grad():
        assert torch.equal(
            model(model.to_tokens("3 1 4", prepend_bos=False)), loaded(loaded.to_tokens("3 1 4", prepend_bos=False))
        )


# ----------------------------------------------------------------------------------------------
# Small surprises


def test_patching_heatmap_is_quiet_unless_asked_and_refuses_a_vector_metric(construction, task, capsys):
    clean, corrupt = sample_tokens(task, 2, T, seed=15), sample_tokens(task, 2, T, seed=16)
    quiet = patching_heatmap(construction, clean, corrupt)
    assert "it/s" not in capsys.readouterr().err
    loud = patching_heatmap(construction, clean, corrupt, progress=True)
    assert "it/s" in capsys.readouterr().err
    assert torch.equal(quiet, loud)
    with pytest.raises(ValueError, match=r"one number per patched run .* shape \(2,\)"):
        patching_heatmap(construction, clean, corrupt, metric=lambda output: output[:, -1, 0])


def test_fit_probe_refuses_a_constant_target():
    acts = torch.randn(100, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="R\\^2 is undefined for a constant target"):
        fit_probe(acts, torch.ones(100, dtype=torch.float64))
    mixed = torch.stack([acts[:, 0], torch.full((100,), 2.5, dtype=torch.float64)], dim=1)
    with pytest.raises(ValueError, match=r"column\(s\) \[1\] of 2"):
        fit_probe(acts, mixed)
    assert fit_probe(acts, acts[:, 0] * 2.0).r2 > 0.999999


def test_probe_model_refuses_a_constant_target(standard, task):
    tokens = sample_tokens(task, 12, T, seed=17)
    constant = nan_before_order(torch.ones(12, T, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"target 'flat'.*constant target"):
        probe_model(standard, tokens, {"flat": constant}, random_model=False)


@pytest.mark.parametrize("size", [np.int64(4), np.int32(4), torch.tensor(4), torch.tensor(4, dtype=torch.int32)])
def test_task_sample_takes_any_integral_number(size):
    task = MTDTask(vocab_size=5, order=3, seed=np.int64(2))
    assert type(task.seed) is int and task.seed == 2
    sample = task.sample(size, size + 6, generator=torch.Generator().manual_seed(0))
    reference = MTDTask(vocab_size=5, order=3, seed=2).sample(4, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample.tokens, reference.tokens)


@pytest.mark.parametrize("size", [True, 4.0, np.float64(4.0), torch.tensor(4.0), torch.tensor([4]), "4"])
def test_task_sample_refuses_what_is_not_an_integer(size):
    task = MTDTask(vocab_size=5, order=3, seed=2)
    with pytest.raises(ValueError, match="batch_size must be an int"):
        task.sample(size, 10)


def test_models_built_from_numpy_integers_record_python_ints(tmp_path, task):
    model = standard_transformer(np.int64(Q), np.int64(T), n_layers=np.int64(1), d_model=np.int64(8))
    assert all(type(model.mdlens_args[k]) is int for k in ("vocab_size", "n_ctx", "n_layers", "d_model"))
    mdlens.load(mdlens.save(model, tmp_path))  # the arguments are JSON
    construction = build_md_transformer(task.transition, np.int64(M), np.int64(T), ETA)
    assert type(construction.md_params["seq_len"]) is int and type(construction.md_params["order"]) is int


def test_a_construction_read_on_fewer_tokens_warns_once_with_its_step(task):
    model = build_md_transformer(task.transition, M, T, ETA)
    beta = ETA * M * (T - M)
    short = T - 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(sample_tokens(task, 2, T, seed=18))  # its own length: nothing to say
        predict_next(model, sample_tokens(task, 2, short, seed=19))
        predict_next(model, sample_tokens(task, 2, short - 1, seed=20))  # once per model
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and caught[0].category is RescaledStepWarning
    assert f"built for seq_len={T}; on T={short} tokens" in messages[0]
    assert f"eta_T = beta / (m (T - m)) = {beta / (M * (short - M)):.4g}" in messages[0]
    assert f"not the eta = {ETA:.4g}" in messages[0]
    assert caught[0].filename == __file__  # it names the user's line, not a frame inside TransformerLens


def test_notebook_02_draws_the_score_blocks_with_zero_white_and_a_colourbar(shipped):
    """The notebook's score-block cell, run as it stands (Agg backend): every diverging panel has
    colour limits symmetric about 0 (white in RdBu_r) and every panel a colourbar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    notebook = json.loads((Path(__file__).parents[1] / "notebooks" / "02_circuit_analysis.ipynb").read_text())
    (source,) = [
        "".join(cell["source"])
        for cell in notebook["cells"]
        if cell["cell_type"] == "code" and "token_score_block" in "".join(cell["source"])
    ]
    _, shipped_task = shipped["disentangled-3l"]
    pi = shipped_task.transition
    namespace = {
        "plt": plt,
        "hooks": mdlens.hooks,
        "pi": pi,
        "models": {name: model for name, (model, _) in shipped.items()},
        "construction": build_md_transformer(pi, shipped_task.order, 192, 0.03),
    }
    exec(source, namespace)
    fig = namespace["fig"]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 4 and len(fig.axes) == 8  # four panels, four colourbars
    for ax in panels:
        (image,) = ax.get_images()
        low, high = image.get_clim()
        if "scores" in ax.get_title():
            assert image.get_cmap().name == "RdBu_r" and high > 0 and low == -high
        else:
            assert low == 0
    plt.close(fig)
