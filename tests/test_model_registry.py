"""mdlens.models.registry (the model kinds and their one builder), the task's one spelling and the
readout a loss trains, and the one token check that models and probes share."""

import pytest
import torch

import mdlens.models
from mdlens import MTDTask, checkpoints, train_config
from mdlens.hooks._checks import check_model_tokens
from mdlens.models import DisentangledTransformer, registry, standard_transformer
from mdlens.train_config import RunConfig, output_for_loss, task_arguments, task_fields

TASK = MTDTask(vocab_size=5, order=3, alpha=1.0, seed=0)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(torch.equal(state_a[name], state_b[name]) for name in state_a)


@pytest.mark.parametrize(
    "model",
    [
        DisentangledTransformer(5, 12, n_layers=2, window=4, seed=3, order=3, dtype=torch.float64),
        standard_transformer(5, 12, n_layers=2, d_model=16, seed=3, output="probs"),
    ],
    ids=["disentangled", "standard"],
)
def test_build_model_from_the_recorded_arguments_is_the_same_model(model):
    rebuilt = registry.build_model(model.mdlens_kind, model.mdlens_args)
    assert type(rebuilt) is type(model) and rebuilt.output_type == model.output_type
    assert same_state(rebuilt, model)
    reseeded = registry.build_model(model.mdlens_kind, {**model.mdlens_args, "seed": 4})
    assert not same_state(reseeded, model)


@pytest.mark.parametrize(
    "kind, args, message",
    [
        ("transformer", {"vocab_size": 5, "dtype": "float32"}, "unknown model kind"),
        ("disentangled", {"vocab_size": 5, "n_ctx": 8, "dtype": "float16"}, "dtype 'float16' is not one of"),
        ("disentangled", {"vocab_size": 5, "n_ctx": 8}, "dtype None is not one of"),
        ("standard", {"vocab_size": 5, "n_ctx": 8, "dtype": "float32", "flavour": 1}, "builder arguments do not fit"),
    ],
)
def test_build_model_names_what_is_wrong(kind, args, message):
    with pytest.raises(ValueError, match=message):
        registry.build_model(kind, args)


def test_build_for_task_is_the_kinds_own_builder_sized_for_the_task():
    disentangled = registry.build_for_task("disentangled", 5, 3, 16, n_layers=2, seed=7, output="probs")
    by_hand = DisentangledTransformer(5, 16, n_layers=2, window=4, seed=7, order=3, output="probs")
    assert same_state(disentangled, by_hand) and disentangled.mdlens_args == by_hand.mdlens_args
    from_task = DisentangledTransformer.from_task(TASK, 16, n_layers=2, seed=7, init_std=0.2, output="logits")
    built = registry.build_for_task("disentangled", 5, 3, 16, n_layers=2, seed=7, output="logits", init_std=0.2)
    assert same_state(built, from_task) and built.mdlens_args == from_task.mdlens_args
    standard = registry.build_for_task("standard", 5, 3, 16, n_layers=2, seed=7, output="logits", d_model=24)
    assert same_state(standard, standard_transformer(5, 16, n_layers=2, d_model=24, seed=7, output="logits"))
    with pytest.raises(ValueError, match="unknown model kind"):
        registry.build_for_task("hooked_transformer", 5, 3, 16, n_layers=2, seed=7, output="logits")


def test_build_like_keeps_the_architecture_and_lives_with_the_models():
    assert mdlens.models.build_like is registry.build_like  # the import path hooks and users use
    assert not hasattr(checkpoints, "build_like")  # models are built by the registry, not by persistence
    model = DisentangledTransformer(5, 12, n_layers=2, window=4, seed=3, order=3)
    fresh = registry.build_like(model, seed=9)
    assert fresh.mdlens_args == {**model.mdlens_args, "seed": 9}
    assert same_state(fresh, DisentangledTransformer(5, 12, n_layers=2, window=4, seed=9, order=3))


def test_the_kinds_mdlens_train_builds_are_the_registrys():
    assert tuple(registry.BUILDERS) == train_config.ARCHITECTURES
    assert (*train_config.ARCHITECTURES, "hooked_transformer") == registry.MODEL_KINDS


def test_output_for_loss():
    expected = {
        ("disentangled", "mse"): "probs",
        ("disentangled", "ce"): "logits",
        ("standard", "mse"): "logits",
        ("standard", "ce"): "logits",
    }
    assert {pair: output_for_loss(*pair) for pair in expected} == expected
    with pytest.raises(ValueError, match="loss must be one of"):
        output_for_loss("disentangled", "kl")
    with pytest.raises(ValueError, match="model must be one of"):
        output_for_loss("hooked_transformer", "mse")


def test_the_task_has_one_spelling_from_the_flags_to_the_checkpoint():
    run = RunConfig(vocab=4, order=2, alpha=0.5, task_seed=11, out="unused")
    arguments = task_arguments(run)
    assert arguments == {"vocab_size": 4, "order": 2, "alpha": 0.5, "seed": 11}
    task = MTDTask(**arguments)
    assert task.arguments() == {**arguments, "transition_concentration": 1.0}
    again = MTDTask(**task.arguments())
    assert torch.equal(again.transition, task.transition)
    assert torch.equal(again.sample(3, 6).tokens, task.sample(3, 6).tokens)
    assert task_fields(arguments) == {"vocab": 4, "order": 2, "alpha": 0.5, "task_seed": 11}
    with pytest.raises(ValueError, match="transition_concentration"):
        task_fields(task.arguments())


def test_models_and_probes_check_token_input_with_the_same_message():
    model = DisentangledTransformer(5, 8, n_layers=1, window=4, seed=0, order=3)
    for tokens in (torch.zeros(1, 9, dtype=torch.long), torch.full((1, 6), 5), torch.zeros(2, 0, dtype=torch.long)):
        with pytest.raises(ValueError) as by_model:
            model(tokens)
        with pytest.raises(ValueError) as by_probe:
            check_model_tokens(model, tokens)
        assert str(by_model.value) == str(by_probe.value)
