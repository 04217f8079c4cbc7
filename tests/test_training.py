"""mdlens.training and mdlens train: targets, schedule, a tiny run that learns, determinism, kill + resume,
the command line and its flags, growing a model."""

import contextlib
import io
import json
import os
import re

import pytest
import torch

import mdlens
from mdlens import MTDTask, training
from mdlens import estimators as E
from mdlens.cli import main as cli_main
from mdlens.models import DisentangledTransformer, disentangled_transformer, grow, standard_transformer
from mdlens.training import TrainConfig, _loss, learning_rate, next_token_targets, sequence_length, train

TASK = MTDTask(vocab_size=5, order=3, alpha=1.0, seed=0)


def small_config(**overrides) -> TrainConfig:
    """A few-second run: short sequences, small batches, a small held-out batch, no Bayes reference."""
    fields = dict(
        steps=20,
        batch_size=16,
        seq_len=16,
        lr=1e-2,
        eval_every=0,
        eval_batch_size=32,
        eval_bayes=False,
        device="cpu",
        progress=False,
        log_every=1,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def weights_of(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


# ---------------------------------------------------------------------------------------------------
# Targets and schedules against the formulas, written out


def test_next_token_targets_match_an_explicit_loop():
    sample = TASK.sample(4, 12, generator=torch.Generator().manual_seed(3))
    targets = next_token_targets(sample.tokens, sample.weights, TASK.transition)
    m, q, seq_len = TASK.order, TASK.vocab_size, 12
    assert targets.shape == (4, seq_len - m, q)
    pi = TASK.transition.tolist()
    for b in range(4):
        y = sample.tokens[b].tolist()
        lam = sample.weights[b].tolist()
        for row, t in enumerate(range(m + 1, seq_len + 1)):  # 1-indexed t: predict y_{t+1} from y_1..y_t
            # y_{t+1-g} (1-indexed) is y[t - g] (0-indexed).
            expected = [sum(lam[g - 1] * pi[y[t - g]][v] for g in range(1, m + 1)) for v in range(q)]
            assert targets[b, row].tolist() == pytest.approx(expected, abs=1e-12)
    # The last row is the predictive of y_{T+1} that the sampler reports.
    torch.testing.assert_close(targets[:, -1], sample.next_probs, rtol=0, atol=1e-12)


def test_next_token_targets_rejects_bad_input():
    sample = TASK.sample(2, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="row-stochastic"):
        next_token_targets(sample.tokens, sample.weights, TASK.transition * 2)
    with pytest.raises(ValueError, match="simplex"):
        next_token_targets(sample.tokens, sample.weights * 2, TASK.transition)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        next_token_targets(sample.tokens + 5, sample.weights, TASK.transition)
    with pytest.raises(ValueError, match=r"\[B, m\]"):
        next_token_targets(sample.tokens, sample.weights[0], TASK.transition)


def test_learning_rate_schedule_formula():
    config = small_config(steps=100, lr=2e-3, warmup_steps=10, min_lr_ratio=0.1, lr_schedule="cosine")
    assert learning_rate(0, config) == pytest.approx(2e-3 / 10)
    assert learning_rate(9, config) == pytest.approx(2e-3)
    assert learning_rate(10, config) == pytest.approx(2e-3)  # cosine starts at the peak
    # Half-way through the decay the cosine factor is 1/2: lr * (0.1 + 0.9 * 0.5).
    assert learning_rate(55, config) == pytest.approx(2e-3 * 0.55)
    assert learning_rate(100, config) == pytest.approx(2e-3 * 0.1)
    constant = small_config(steps=100, lr=2e-3, lr_schedule="constant")
    assert {learning_rate(s, constant) for s in (0, 50, 99)} == {2e-3}


def test_curriculum_grows_the_length_linearly():
    config = small_config(seq_len=40, curriculum_start_len=10, curriculum_steps=30)
    assert sequence_length(0, config, order=3) == 10
    assert sequence_length(15, config, order=3) == 25
    assert sequence_length(30, config, order=3) == 40
    assert sequence_length(1000, config, order=3) == 40


def first_step_loss(**fields):
    """The loss a one-step run (3 sequences of T=10) records, with the initial model's output and the
    targets of that first batch, for recomputing the loss by hand: (recorded, output, targets)."""
    config = small_config(steps=1, seq_len=10, batch_size=3, **fields)
    model = disentangled_transformer(TASK.vocab_size, TASK.order, 10, n_layers=2, seed=4)
    initial = weights_of(model)
    recorded = train(model, TASK, config).losses[0][1]
    model.load_state_dict(initial)
    sample = TASK.sample(3, 10, generator=torch.Generator().manual_seed(config.seed))  # the first batch
    targets = next_token_targets(sample.tokens, sample.weights, TASK.transition)
    with torch.no_grad():
        output = model(sample.tokens).double()
    return recorded, output, targets


@pytest.mark.parametrize("exponent", [0.0, 1.0, -0.5])
def test_position_weighted_loss_matches_an_explicit_sum(exponent):
    # The loss the loop records at step 1 is that of the initial model on the first batch: recompute
    # it position by position, weighting position t (1-indexed) by (t - m)^exponent / mean.
    recorded, output, targets = first_step_loss(position_weight_exponent=exponent)
    m = TASK.order
    raw = [(t - m) ** exponent for t in range(m + 1, 11)]
    weights = [w * len(raw) / sum(raw) for w in raw]
    total = 0.0
    for b in range(3):
        for row, t in enumerate(range(m + 1, 11)):  # the output at 0-indexed t - 1 predicts y_{t+1}
            total += weights[row] * ((output[b, t - 1] - targets[b, row]) ** 2).sum().item()
    assert recorded == pytest.approx(total / (3 * len(raw)), rel=1e-5)


def test_shortfall_penalty_matches_an_explicit_sum():
    # Step-1 loss with shortfall_weight w: MSE plus w * (p*_v / 2 - p_v)^2 / p*_v for every token whose
    # output p_v is below half its true probability p*_v, recomputed entry by entry.
    shortfall_weight = 10.0
    recorded, output, targets = first_step_loss(shortfall_weight=shortfall_weight)
    output, targets = output.tolist(), targets.tolist()
    m, squared_error, shortfall = TASK.order, 0.0, 0.0
    for b in range(3):
        for row, t in enumerate(range(m + 1, 11)):
            for v in range(TASK.vocab_size):
                predicted, true = output[b][t - 1][v], targets[b][row][v]
                squared_error += (predicted - true) ** 2
                if predicted < true / 2:
                    shortfall += (true / 2 - predicted) ** 2 / true
    assert shortfall > 0  # the untrained model does fall short somewhere, so the term is exercised
    n_positions = 3 * (10 - m)
    assert recorded == pytest.approx((squared_error + shortfall_weight * shortfall) / n_positions, rel=1e-5)


def test_shortfall_penalty_by_hand_and_zero_where_the_truth_is_zero():
    # truth (0, .5, .5), output (-.1, .1, 1): squared error .01 + .16 + .25 = .42. Token 0 has truth 0,
    # so no shortfall (its KL term is 0 whatever the output); token 1 falls .25 - .1 = .15 short of half
    # its truth: .15^2 / .5 = .045; token 2 is above. With weight 2: .42 + .09.
    target = torch.tensor([[[0.0, 0.5, 0.5]]], dtype=torch.float64)
    output = torch.tensor([[[-0.1, 0.1, 1.0]]], dtype=torch.float64)
    assert _loss(output, target, "probs", "mse", shortfall_weight=2.0).item() == pytest.approx(0.51)
    assert _loss(output, target, "probs", "mse").item() == pytest.approx(0.42)


# ---------------------------------------------------------------------------------------------------
# A tiny run learns


def test_tiny_run_lowers_the_loss_and_beats_the_uniform_guess():
    # alpha = 0.1 makes each sequence lean on one lag, so the context is informative and the uniform
    # guess is far from the truth: 200 steps at T = 24 (seconds) separate in-context learning from
    # chance. A logits readout with cross-entropy keeps every KL finite (a clipped 'probs' output can
    # put zero mass on a possible token early in training).
    task = MTDTask(vocab_size=5, order=3, alpha=0.1, seed=0)
    model = DisentangledTransformer.from_task(task, 24, n_layers=3, seed=0, output="logits")
    config = small_config(
        steps=200,
        batch_size=32,
        seq_len=24,
        lr=3e-2,
        lr_schedule="constant",
        loss="ce",
        eval_batch_size=256,
        log_every=10,
    )
    result = train(model, task, config)
    losses = [loss for _, loss in result.losses]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.03, losses
    assert result.final_eval["kl_model"] < result.final_eval["kl_uniform"]
    # Recomputed here from the definitions, on fresh samples the run never saw: the model's KL
    # against the uniform-weights predictive sum_g (1/m) pi(y_{T+1-g}, .).
    fresh = task.sample(512, 24, generator=torch.Generator().manual_seed(99))
    kl_model = E.kl_divergence(fresh.next_probs, mdlens.predict_next(model, fresh.tokens)).mean().item()
    uniform = torch.full((512, 3), 1 / 3, dtype=torch.float64)
    kl_uniform = E.kl_divergence(fresh.next_probs, E.predictive(fresh.tokens, task.transition, uniform)).mean().item()
    assert kl_model < 0.8 * kl_uniform, (kl_model, kl_uniform)
    assert result.steps == 200 and result.samples == 200 * 32


# ---------------------------------------------------------------------------------------------------
# Determinism, kill and resume


def test_same_seed_same_weights_different_seed_different_weights():
    runs = []
    for seed in (0, 0, 1):
        model = disentangled_transformer(5, 3, 16, n_layers=2, seed=0)  # same init: only the data differ
        train(model, TASK, small_config(steps=8, seed=seed))
        runs.append(weights_of(model))
    assert_same_weights(runs[0], runs[1])
    assert not torch.equal(runs[0]["unembed.W_U"], runs[2]["unembed.W_U"])


def test_callback_sees_every_evaluation_and_does_not_change_the_run():
    plain = disentangled_transformer(5, 3, 16, n_layers=2, seed=0)
    train(plain, TASK, small_config(steps=10, eval_every=4))
    seen = []
    watched = disentangled_transformer(5, 3, 16, n_layers=2, seed=0)

    def callback(step, model, evaluation):
        assert model is watched
        seen.append((step, evaluation["kl_model"], mdlens.predict_next(model, TASK.sample(2, 16).tokens).shape))

    result = train(watched, TASK, small_config(steps=10, eval_every=4), callback=callback)
    assert [step for step, _, _ in seen] == [4, 8, 10]  # every eval_every steps and at the end
    assert [kl for _, kl, _ in seen] == [e["kl_model"] for e in result.evals]
    assert_same_weights(weights_of(plain), weights_of(watched))


def test_held_out_batch_is_the_batch_train_evaluates_on():
    config = small_config(steps=4, eval_every=2, eval_seed=7)
    held_out = training.held_out_batch(TASK, config)
    # drawn first from a generator seeded with eval_seed, whatever the training seed
    drawn = TASK.sample(config.eval_batch_size, config.seq_len, generator=torch.Generator().manual_seed(7))
    assert torch.equal(held_out.tokens, drawn.tokens)
    assert torch.equal(held_out.truth, drawn.next_probs)
    model = disentangled_transformer(5, 3, 16, n_layers=2, seed=0)
    result = train(model, TASK, config)
    for evaluation in result.evals:
        assert {key: evaluation[key] for key in held_out.references} == held_out.references
    from mdlens.evaluation import evaluate

    assert result.evals[-1]["kl_model"] == evaluate(model, held_out)  # the final model, on this batch


def test_train_takes_its_held_out_batch_and_refuses_another():
    config = small_config(steps=6, eval_every=3)
    made = disentangled_transformer(5, 3, 16, n_layers=2, seed=0)
    made_result = train(made, TASK, config)
    given = disentangled_transformer(5, 3, 16, n_layers=2, seed=0)
    given_result = train(given, TASK, config, held_out=training.held_out_batch(TASK, config))
    assert given_result.evals == made_result.evals and given_result.losses == made_result.losses
    assert_same_weights(weights_of(made), weights_of(given))
    other_seed = training.held_out_batch(TASK, small_config(eval_seed=config.eval_seed + 1))
    with pytest.raises(ValueError, match="eval_seed"):
        train(given, TASK, config, held_out=other_seed)
    with pytest.raises(ValueError, match="eval_bayes"):
        train(given, TASK, small_config(steps=6, eval_bayes=True), held_out=training.held_out_batch(TASK, config))
    with pytest.raises(ValueError, match="HeldOut"):
        train(given, TASK, config, held_out={"tokens": None})


def test_evaluation_of_an_output_with_no_positive_entry_is_infinite():
    from mdlens.evaluation import evaluate, make_held_out

    model = disentangled_transformer(5, 3, 16, n_layers=2, seed=0)
    with torch.no_grad():
        model.unembed.W_U.fill_(-1.0)  # every output negative: no distribution to renormalise
        model.blocks[0].attn.W_Q.zero_()
    assert evaluate(model, make_held_out(TASK, 16, 8, seed=0, bayes=False)) == float("inf")


class Killed(Exception):
    """Stands for the process dying (SIGKILL, power cut) in the middle of a run."""


class DiesAfter:
    """The task, except that the run dies when it asks for training batch number ``batches + 1``.

    ``train`` draws one held-out batch first (``eval_batch_size`` sequences), then one training batch
    per step; only the training batches are counted.
    """

    def __init__(self, task: MTDTask, batches: int, batch_size: int):
        self.task, self.batches, self.batch_size, self.drawn = task, batches, batch_size, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def sample(self, batch_size, seq_len, generator=None):
        if batch_size == self.batch_size:
            if self.drawn == self.batches:
                raise Killed
            self.drawn += 1
        return self.task.sample(batch_size, seq_len, generator=generator)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_run_killed_half_way_and_resumed_matches_an_uninterrupted_run(tmp_path, loss):
    def fresh_model(seed):
        if loss == "ce":
            return standard_transformer(5, 16, n_layers=1, d_model=16, seed=seed)
        return disentangled_transformer(5, 3, 16, n_layers=2, seed=seed)

    # Cosine schedule over all 20 steps, warm-up, clipping: everything that depends on the step.
    config = small_config(steps=20, loss=loss, lr_schedule="cosine", warmup_steps=3, eval_every=5)
    reference = fresh_model(0)
    reference_result = train(reference, TASK, config)

    checkpointed = small_config(
        steps=20,
        loss=loss,
        lr_schedule="cosine",
        warmup_steps=3,
        eval_every=5,
        checkpoint_dir=str(tmp_path),
        checkpoint_every=10,
    )
    with pytest.raises(Killed):  # dies at step 15, five steps after the checkpoint at step 10
        train(fresh_model(0), DiesAfter(TASK, 15, config.batch_size), checkpointed)
    # A new process: a model with another initialisation, the same config, resume=True.
    resumed = fresh_model(7)
    resumed_result = train(resumed, TASK, small_config(**{**vars(checkpointed), "resume": True}))

    assert_same_weights(weights_of(reference), weights_of(resumed))
    assert resumed_result.losses == reference_result.losses
    assert [e["kl_model"] for e in resumed_result.evals] == [e["kl_model"] for e in reference_result.evals]
    assert resumed_result.samples == reference_result.samples == 20 * 16


def test_resume_with_another_recipe_is_refused(tmp_path):
    config = small_config(steps=4, checkpoint_dir=str(tmp_path))
    train(disentangled_transformer(5, 3, 16, n_layers=2), TASK, config)
    changed = small_config(steps=4, lr=5e-3, checkpoint_dir=str(tmp_path), resume=True)
    with pytest.raises(ValueError, match="lr"):
        train(disentangled_transformer(5, 3, 16, n_layers=2), TASK, changed)


def test_resume_reads_a_field_missing_from_an_older_state_as_its_default(tmp_path):
    train(disentangled_transformer(5, 3, 16, n_layers=2), TASK, small_config(steps=4, checkpoint_dir=str(tmp_path)))
    path = tmp_path / "train_state.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["freeze_layers"]  # as written before TrainConfig had the field
    torch.save(state, path)
    result = train(
        disentangled_transformer(5, 3, 16, n_layers=2),
        TASK,
        small_config(steps=4, checkpoint_dir=str(tmp_path), resume=True),
    )
    assert result.losses[-1][0] == 4 and result.samples == 4 * 16  # the saved run, loaded
    with pytest.raises(ValueError, match="freeze_layers"):
        train(
            disentangled_transformer(5, 3, 16, n_layers=2),
            TASK,
            small_config(steps=4, freeze_layers=1, checkpoint_dir=str(tmp_path), resume=True),
        )


def killed_writing_the_state(monkeypatch, how: str):
    """Make the second training-state write of a run die: ``"mid-write"`` after half of its bytes went to
    the temporary file, ``"before-rename"`` with the whole temporary file written but not yet renamed."""
    calls = {"save": 0}
    real_save, real_replace = torch.save, os.replace

    def save(state, file):
        calls["save"] += 1
        if how == "mid-write" and calls["save"] == 2:
            buffer = io.BytesIO()
            real_save(state, buffer)
            file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise Killed
        real_save(state, file)

    def replace(source, destination):
        if how == "before-rename" and calls["save"] == 2:
            raise Killed
        real_replace(source, destination)

    monkeypatch.setattr(training.torch, "save", save)
    monkeypatch.setattr(training.os, "replace", replace)


@pytest.mark.parametrize("how", ["mid-write", "before-rename"])
def test_killed_while_writing_the_state_resumes_from_the_state_before(tmp_path, monkeypatch, how):
    # Checkpoints at steps 5 and 10; the run dies while writing the second. The state on disk must then
    # be the whole step-5 state, and resuming from it must end with the uninterrupted run's weights.
    config = small_config(steps=12, warmup_steps=2, eval_every=4, checkpoint_dir=str(tmp_path), checkpoint_every=5)
    reference = disentangled_transformer(5, 3, 16, n_layers=2, seed=0)
    reference_result = train(reference, TASK, small_config(**{**vars(config), "checkpoint_dir": None}))

    with monkeypatch.context() as patch:
        killed_writing_the_state(patch, how)
        with pytest.raises(Killed):
            train(disentangled_transformer(5, 3, 16, n_layers=2, seed=0), TASK, config)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["step"] == 5 and state["samples"] == 5 * 16 and state["losses"][-1][0] == 5

    resumed = disentangled_transformer(5, 3, 16, n_layers=2, seed=7)  # another init: all of it is loaded
    resumed_result = train(resumed, TASK, small_config(**{**vars(config), "resume": True}))
    assert_same_weights(weights_of(reference), weights_of(resumed))
    assert resumed_result.losses == reference_result.losses
    assert resumed_result.evals == reference_result.evals


def test_resume_refuses_a_state_it_cannot_continue(tmp_path):
    config = small_config(steps=4, checkpoint_dir=str(tmp_path), resume=True)
    # Without atomic renames (a copy, a foreign file system) a state could be cut short: refused.
    train(disentangled_transformer(5, 3, 16, n_layers=2), TASK, small_config(steps=4, checkpoint_dir=str(tmp_path)))
    path = tmp_path / "train_state.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable training state"):
        train(disentangled_transformer(5, 3, 16, n_layers=2), TASK, config)
    # A state of another model.
    train(disentangled_transformer(5, 3, 16, n_layers=2), TASK, small_config(steps=4, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="does not fit this model"):
        train(disentangled_transformer(5, 3, 16, n_layers=1), TASK, config)
    # A state in the format before train_state.pt (weights and JSON written one after the other).
    path.unlink()
    (tmp_path / "train_state.safetensors").write_bytes(b"")
    (tmp_path / "train_state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"format before train_state\.pt"):
        train(disentangled_transformer(5, 3, 16, n_layers=2), TASK, config)


def test_resume_without_a_state_starts_afresh(tmp_path):
    resumed = disentangled_transformer(5, 3, 16, n_layers=2, seed=0)
    train(resumed, TASK, small_config(steps=4, checkpoint_dir=str(tmp_path / "new"), resume=True))
    fresh = disentangled_transformer(5, 3, 16, n_layers=2, seed=0)
    train(fresh, TASK, small_config(steps=4))
    assert_same_weights(weights_of(fresh), weights_of(resumed))


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": -1}, "batch_size"),
        ({"seq_len": 2.5}, "seq_len"),
        ({"lr": 0.0}, "lr"),
        ({"loss": "l1"}, "loss"),
        ({"targets": "first"}, "targets"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"device": "tpu"}, "device"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"eval_every": -1}, "eval_every"),
        ({"curriculum_start_len": 100}, "curriculum_start_len"),
        ({"resume": True}, "checkpoint_dir"),
        ({"freeze_layers": -1}, "freeze_layers"),
        ({"position_weight_exponent": float("nan")}, "position_weight_exponent"),
        ({"position_weight_exponent": 1.0, "targets": "last"}, "one position"),
        ({"shortfall_weight": -1.0}, "shortfall_weight"),
        ({"shortfall_weight": float("inf")}, "shortfall_weight"),
        ({"shortfall_weight": 1.0, "loss": "ce"}, "shortfall_weight"),
    ],
)
def test_bad_config_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        small_config(**fields)


def test_train_rejects_a_model_that_does_not_fit():
    probs_model = disentangled_transformer(5, 3, 16, n_layers=1)
    with pytest.raises(ValueError, match="ce"):
        train(probs_model, TASK, small_config(loss="ce"))
    with pytest.raises(ValueError, match="vocabulary"):
        train(disentangled_transformer(4, 3, 16, n_layers=1), TASK, small_config())
    with pytest.raises(ValueError, match="n_ctx"):
        train(probs_model, TASK, small_config(seq_len=32))
    with pytest.raises(ValueError, match="freeze_layers=2 exceeds"):
        train(probs_model, TASK, small_config(freeze_layers=2))


@pytest.mark.parametrize("model_kind", ["disentangled", "standard"])
def test_frozen_layers_keep_their_weights_and_the_rest_trains(model_kind):
    model = (
        disentangled_transformer(5, 3, 16, n_layers=3, seed=0)
        if model_kind == "disentangled"
        else standard_transformer(5, 16, n_layers=3, d_model=16, seed=0)
    )
    before = weights_of(model)
    trainable_before = {name for name, p in model.named_parameters() if p.requires_grad}
    train(model, TASK, small_config(steps=5, freeze_layers=2))
    after = weights_of(model)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if name.startswith(("blocks.0.", "blocks.1.")):
            assert not changed, f"{name} is in a frozen layer but changed"
        elif name in trainable_before and name.startswith(("blocks.2.attn.W_Q", "unembed.W_U")):
            assert changed, f"{name} should have trained"
    # Training leaves the model as trainable as it found it.
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable_before


# ---------------------------------------------------------------------------------------------------
# ``mdlens train`` end to end


@contextlib.contextmanager
def cli_error(message: str, capsys):
    """The command ends in argparse's error form: exit status 2 and ``message`` in its error line."""
    with pytest.raises(SystemExit) as exit_info:
        yield
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])


def test_cli_train_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    cli_main(
        [
            "train",
            "--model",
            "disentangled",
            "--layers",
            "2",
            "--seq-len",
            "16",
            "--steps",
            "6",
            "--batch",
            "8",
            "--eval-every",
            "0",
            "--checkpoint-every",
            "3",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert f"checkpoint: {out}" in printed
    model, task = mdlens.load(out), mdlens.load_task(out)
    assert isinstance(model, type(disentangled_transformer(5, 3, 16, n_layers=2)))
    assert torch.equal(task.transition, TASK.transition)
    report = json.loads((out / "train.json").read_text())
    assert report["steps"] == 6 and report["samples"] == 48

    # The same run through the Python API gives the same weights as the command.
    reference = disentangled_transformer(5, 3, 16, n_layers=2, seed=0)
    train(reference, TASK, TrainConfig(steps=6, batch_size=8, seq_len=16, eval_every=0, device="cpu", progress=False))
    assert_same_weights(weights_of(reference), weights_of(model))
    tokens = TASK.sample(4, 16, generator=torch.Generator().manual_seed(0)).tokens
    probs = mdlens.predict_next(model, tokens)
    assert torch.allclose(probs.sum(-1), torch.ones(4, dtype=torch.float64))


def test_cli_train_config_file_and_bad_fields(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "model": "standard",
                "layers": 1,
                "d_model": 16,
                "seq_len": 12,
                "steps": 2,
                "batch_size": 4,
                "eval_every": 0,
                "loss": "ce",
                "device": "cpu",
            }
        )
    )
    out = tmp_path / "std"
    cli_main(["train", "--config", str(config), "--no-progress", "--out", str(out)])
    assert mdlens.load(out).output_type == "logits"
    # A disentangled model trained with cross-entropy reads its output as logits.
    cli_main(
        [
            "train",
            "--layers",
            "1",
            "--seq-len",
            "12",
            "--steps",
            "2",
            "--batch",
            "4",
            "--loss",
            "ce",
            "--eval-every",
            "0",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(tmp_path / "dce"),
        ]
    )
    assert mdlens.load(tmp_path / "dce").output_type == "logits"
    config.write_text(json.dumps({"layer": 2}))
    with cli_error("unknown fields", capsys):
        cli_main(["train", "--config", str(config), "--out", str(out)])
    with cli_error("--model", capsys):
        cli_main(["train", "--model", "lstm", "--out", str(out)])
    with cli_error("--threads", capsys):
        cli_main(["train", "--threads", "0", "--out", str(out)])
    with cli_error("--out", capsys):
        cli_main(["train", "--steps", "2"])


# ---------------------------------------------------------------------------------------------------
# Growing a deeper model from a trained shallower one (``--init-from``)


@pytest.mark.parametrize("new_layers", ["fresh", "repeat_last", "insert_fresh"])
def test_grown_model_computes_the_shallower_models_function(new_layers):
    shallow = disentangled_transformer(5, 3, 16, n_layers=2, seed=1, init_std=0.5)
    with torch.no_grad():  # non-trivial position and value terms too, not just the initial ones
        for block in shallow.blocks:
            block.attn.rel_score.normal_(generator=torch.Generator().manual_seed(2))
            block.attn.rel_value.add_(0.3)
    deep = disentangled_transformer(5, 3, 16, n_layers=4, seed=0)
    grow(shallow, deep, new_layers=new_layers)
    tokens = TASK.sample(8, 16, generator=torch.Generator().manual_seed(0)).tokens
    with torch.no_grad():
        _, deep_cache = deep.run_with_cache(tokens)
        _, shallow_cache = shallow.run_with_cache(tokens)
        assert torch.allclose(deep(tokens), shallow(tokens), atol=1e-6)
    # The shallow residual is a prefix of the deep one, layer by layer.
    width = shallow.cfg.d_model
    assert torch.allclose(deep_cache["resid_post", 1][..., :width], shallow_cache["resid_post", 1], atol=1e-6)
    read = shallow.blocks[1].attn.read_width
    copies_of_last = {"fresh": [1], "repeat_last": [1, 2, 3], "insert_fresh": [1, 3]}[new_layers]
    for index, block in enumerate(deep.blocks[1:], start=1):
        if index in copies_of_last:  # the shallow model's layer 2, reading the same coordinates
            assert torch.equal(block.attn.W_A[:read, :read], shallow.blocks[1].attn.W_A)
            assert torch.equal(block.attn.rel_score, shallow.blocks[1].attn.rel_score)
        else:  # the deep model's own initialisation: small random W_A, zero position scores
            assert block.attn.W_A.abs().sum() > 0 and block.attn.rel_score.abs().sum() == 0
    # The readout, block by name: the shallow model's last block L2 is read where the deep model's
    # highest copy of layer 2 writes it, every earlier block where it was, and nothing else.
    reader = {"fresh": "L2", "repeat_last": "L4", "insert_fresh": "L4"}[new_layers]
    read_rows = torch.zeros(deep.cfg.d_model, dtype=torch.bool)
    for leaf in shallow.layout.leaves():
        name = reader + leaf.name.removeprefix("L2") if leaf.name.startswith("L2.") else leaf.name
        assert torch.equal(deep.unembed.W_U[deep.layout[name]], shallow.unembed.W_U[leaf.slice]), name
        read_rows[deep.layout[name]] = True
    assert (deep.unembed.W_U[~read_rows] == 0).all()


def test_grow_rejects_models_that_do_not_fit():
    deep = disentangled_transformer(5, 3, 16, n_layers=2)
    with pytest.raises(ValueError, match="more than"):
        grow(disentangled_transformer(5, 3, 16, n_layers=3), deep)
    with pytest.raises(ValueError, match="vocabulary"):
        grow(disentangled_transformer(4, 3, 16, n_layers=1), deep)
    with pytest.raises(ValueError, match="window"):
        grow(disentangled_transformer(5, 2, 16, n_layers=1), deep)
    with pytest.raises(ValueError, match="n_ctx"):
        grow(disentangled_transformer(5, 3, 24, n_layers=1), deep)
    with pytest.raises(ValueError, match="source must be a DisentangledTransformer"):
        grow(standard_transformer(5, 16, n_layers=1, d_model=8), deep)
    with pytest.raises(ValueError, match="target must be a DisentangledTransformer"):
        grow(disentangled_transformer(5, 3, 16, n_layers=1), standard_transformer(5, 16, n_layers=1, d_model=8))
    with pytest.raises(ValueError, match="new_layers"):
        grow(disentangled_transformer(5, 3, 16, n_layers=1), deep, new_layers="copy")


@pytest.mark.parametrize("new_layers", ["fresh", "repeat_last", "insert_fresh"])
def test_cli_init_from_grows_the_saved_model_then_trains(tmp_path, new_layers, capsys):
    common = ["--seq-len", "16", "--batch", "8", "--eval-every", "0", "--device", "cpu", "--no-progress"]
    cli_main(["train", "--layers", "1", "--steps", "4", *common, "--out", str(tmp_path / "one")])
    cli_main(
        [
            "train",
            "--layers",
            "2",
            "--steps",
            "3",
            "--init-from",
            str(tmp_path / "one"),
            "--new-layers",
            new_layers,
            "--freeze-layers",
            "1",
            *common,
            "--out",
            str(tmp_path / "two"),
        ]
    )
    # The same through the Python API: grow, then train with the same recipe.
    reference = disentangled_transformer(5, 3, 16, n_layers=2, seed=0)
    grow(mdlens.load(tmp_path / "one"), reference, new_layers=new_layers)
    train(
        reference,
        TASK,
        TrainConfig(steps=3, batch_size=8, seq_len=16, eval_every=0, device="cpu", progress=False, freeze_layers=1),
    )
    assert_same_weights(weights_of(reference), weights_of(mdlens.load(tmp_path / "two")))

    with cli_error("not trained on this task", capsys):
        cli_main(
            [
                "train",
                "--layers",
                "2",
                "--steps",
                "1",
                "--task-seed",
                "1",
                "--init-from",
                str(tmp_path / "one"),
                *common,
                "--out",
                str(tmp_path / "other"),
            ]
        )
    with cli_error("disentangled models only", capsys):
        cli_main(
            [
                "train",
                "--model",
                "standard",
                "--layers",
                "1",
                "--steps",
                "1",
                "--init-from",
                str(tmp_path / "one"),
                *common,
                "--out",
                str(tmp_path / "std"),
            ]
        )
    with cli_error("--new-layers must", capsys):
        cli_main(["train", "--new-layers", "copy", "--init-from", str(tmp_path / "one"), "--out", str(tmp_path / "x")])
    with cli_error("only applies with --init-from", capsys):
        cli_main(["train", "--new-layers", "repeat_last", "--out", str(tmp_path / "x")])
