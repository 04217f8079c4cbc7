"""``mdlens reproduce training-mechanism --quick``: every recipe has every curve, the step-0 point is
the untrained model's own numbers (computed here without the hooks), and ``reproduce all`` leaves the
study out."""

import json
import types

import pytest
import torch

import mdlens
from mdlens import checkpoints, cli
from mdlens import estimators as E
from mdlens.analyses import AnalysisResult
from mdlens.analyses import training_mechanism as tm
from mdlens.construction import build_md_transformer
from mdlens.evaluation import make_held_out
from mdlens.training import train

# A few recipes keep the test short; every recipe shares the code that these exercise.
RECIPES = ["base", "init-0.2", "no-key-pos", "paper", "lr-0.03", "lr-0.03-seed1", "layer1-only-last"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("training_mechanism")
    tm.run(out, quick=True, recipes=RECIPES)
    return json.loads((out / "training_mechanism.json").read_text()), out


def test_every_recipe_has_every_curve_at_every_measured_step(report):
    data, out = report
    sizes = tm.QUICK
    steps = list(range(0, sizes["steps"] + 1, sizes["measure_every"]))
    assert list(data["recipes"]) == RECIPES == list(data["summary"])
    for name, record in data["recipes"].items():
        assert [point["step"] for point in record["curve"]] == steps
        for point in record["curve"]:
            assert set(tm.CURVES) <= set(point)
            assert -1 <= point["corr_log_pi"] <= 1 and -1 <= point["corr_neg_pi"] <= 1
            assert 0 <= point["responsibility_tv"] <= 1 and 0 <= point["layer2_tv"] <= 1
            # learned_transition_kl is None exactly when learned_transition said why not
            assert (point["learned_transition_kl"] is None) == (point["learned_transition_reason"] is not None)
            if point["kl_model"] is not None:
                assert point["kl_ratio"] == pytest.approx(point["kl_model"] / point["kl_md1"])
        assert data["summary"][name]["corr_neg_pi"] == record["curve"][-1]["corr_neg_pi"]
        # one factor changed from base (the 'paper' recipe changes two, a replicate adds a seed)
        changed = {key for key, value in record["settings"].items() if value != tm.BASE.get(key)}
        expected = {"base": 0, "paper": 2, "layer1-only-last": 2, "layer1-only-last-long": 2}.get(name, 1) + (
            "seed" in changed and name != "base-seed1"
        )
        assert len(changed) == expected
    assert data["recipes"]["lr-0.03"]["config"]["lr"] == 0.03 and data["recipes"]["base"]["config"]["lr"] == 0.01
    assert data["recipes"]["lr-0.03-seed1"]["config"]["seed"] == 1 and data["recipes"]["base"]["config"]["seed"] == 0
    assert data["recipes"]["paper"]["config"]["targets"] == "last"
    for file in data["files"]:
        assert (out / file.split("/")[-1]).exists()


def _row_centred_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_step_zero_is_the_untrained_model_measured_directly(report):
    data, _ = report
    task = tm.make_task()
    pi, q = task.transition, task.vocab_size
    for name in ("base", "init-0.2"):
        point = data["recipes"][name]["curve"][0]
        model = tm.build_model(task, tm.recipe_settings(name), tm.QUICK["seq_len"])
        # Layer 1's token-token block: query token b (row) against key token a (column).
        scores = model.blocks[0].attn.W_Q[0, :q, :q].detach().to(torch.float64)
        assert point["corr_log_pi"] == pytest.approx(_row_centred_cosine(scores, pi.log().T), abs=1e-9)
        assert point["corr_neg_pi"] == pytest.approx(_row_centred_cosine(scores, -pi.T), abs=1e-9)
    # tuned one-step MD's KL is the held-out reference of mdlens.evaluation, the same at every step
    held_out = make_held_out(task, tm.QUICK["seq_len"], tm.QUICK["n_eval"], tm.EVAL_SEED, bayes=False)
    curve = data["recipes"]["base"]["curve"]
    assert {point["kl_md1"] for point in curve} == {held_out.references["kl_md1"]}
    # and it is one-step MD with its tuned step, recomputed here
    md = E.predictive(
        held_out.tokens, pi, E.md_weights(held_out.tokens, pi, task.order, held_out.references["eta_md1"])
    )
    assert curve[0]["kl_md1"] == pytest.approx(float(E.kl_divergence(held_out.truth, md).mean()), rel=1e-9)


def test_a_finished_recipe_is_reused_not_retrained(report, monkeypatch):
    _, out = report
    monkeypatch.setattr(tm, "train", lambda *args, **kwargs: pytest.fail("retrained a finished recipe"))
    saved = json.loads((out / "recipes" / "base.json").read_text())
    assert tm.train_recipe("base", out, quick=True) == saved


def test_reproduce_all_leaves_the_training_study_out(tmp_path, monkeypatch):
    assert list(cli.REPRODUCTIONS).index("training-mechanism") < list(cli.REPRODUCTIONS).index("report")
    ran = []
    real_import = cli.importlib.import_module

    def fake_import(module_name):
        if module_name == "mdlens.analyses.bench":  # the parser lists the benchmarks from it
            return real_import(module_name)
        return types.SimpleNamespace(run=lambda out, quick: ran.append(module_name) or AnalysisResult({}, []))

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    cli.main(["reproduce", "all", "--out", str(tmp_path), "--quick"])
    assert "mdlens.analyses.training_mechanism" not in ran and "mdlens.analyses.report" in ran
    assert len(ran) == len(cli.REPRODUCTIONS) - 1


def test_without_key_pos_the_per_key_position_score_stays_zero_and_the_rest_trains():
    task = tm.make_task()
    trained = {}
    for name in ("base", "no-key-pos"):
        settings = tm.recipe_settings(name)
        model = tm.build_model(task, settings, tm.QUICK["seq_len"])
        before = model.blocks[0].attn.W_Q.detach().clone()
        train(model, task, tm.train_config(settings, tm.QUICK))
        assert not torch.equal(model.blocks[0].attn.W_Q, before)
        trained[name] = torch.stack([block.attn.key_pos_score.detach() for block in model.blocks])
    assert torch.count_nonzero(trained["no-key-pos"]) == 0
    assert torch.count_nonzero(trained["base"]) > 0


def test_mdlens_train_with_the_recipe_fields_trains_the_recipe_model(tmp_path):
    """A study recipe's model is shipped by running ``mdlens train --config`` with
    ``train_command_fields``: that command must give the weights the study measured, bit for bit."""
    name = "pos-weight-1"
    studied = tm.train_recipe(name, tmp_path / "study", quick=True)
    measured = checkpoints.load(tmp_path / "study" / "recipes" / name)
    fields = tm.train_command_fields(name, quick=True)
    assert fields["position_weight_exponent"] == 1.0 and fields["steps"] == studied["config"]["steps"]
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps(fields))
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--config", str(config), "--out", str(tmp_path / "cli"), "--no-progress"])
    args.handler(args)
    trained = checkpoints.load(tmp_path / "cli")
    for (key, value), (other_key, other) in zip(
        measured.state_dict().items(), trained.state_dict().items(), strict=True
    ):
        assert key == other_key and torch.equal(value, other), key
    with pytest.raises(ValueError, match=r"init-0\.2"):
        tm.train_command_fields("init-0.2")
    with pytest.raises(ValueError, match="no-key-pos"):
        tm.train_command_fields("no-key-pos")


def test_layer1_only_trains_layer_1_on_top_of_the_frozen_construction():
    task, eta = tm.make_task(), 0.1
    pi, m, seq_len = task.transition, task.order, tm.QUICK["seq_len"]
    settings = tm.recipe_settings("layer1-only")
    model = tm.build_model(task, settings, seq_len, eta=eta)
    before = model.blocks[0].attn.W_Q.detach().clone()
    train(model, task, tm.train_config(settings, tm.QUICK))
    assert not torch.equal(model.blocks[0].attn.W_Q, before)
    construction = build_md_transformer(pi, m, seq_len, eta)
    for name in ("blocks.1", "blocks.2", "unembed"):
        for key, value in model.get_submodule(name).state_dict().items():
            assert torch.equal(value, construction.get_submodule(name).state_dict()[key].to(value.dtype)), (name, key)
    # With the construction's layer 1 put back, the model is one-step MD (to float32 rounding).
    model.blocks[0].load_state_dict(construction.blocks[0].state_dict())
    tokens = task.sample(16, seq_len, generator=torch.Generator().manual_seed(3)).tokens
    md = E.predictive(tokens, pi, E.md_weights(tokens, pi, m, eta))
    torch.testing.assert_close(mdlens.predict_next(model, tokens), md, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="eta"):
        tm.build_model(task, settings, seq_len)
