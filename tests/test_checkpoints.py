"""mdlens.save / mdlens.load / mdlens.load_task: bit-exact round trips and every corrupt-file case."""

import json
import shutil

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import mdlens
from mdlens.checkpoints import CONFIG_FILE, WEIGHTS_FILE
from mdlens.models import disentangled_transformer, standard_transformer
from mdlens.models.layout import ResidualBlock


def _perturbed(model, seed=0):
    """Every trainable parameter moved off its initial value (so a round trip cannot pass by luck)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def _assert_same_weights(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert state_a[name].dtype == state_b[name].dtype, name
        assert torch.equal(state_a[name], state_b[name]), name


MODELS = {
    "disentangled-f32": lambda: disentangled_transformer(5, 3, 24, n_layers=3, seed=1),
    "disentangled-f64-5l": lambda: disentangled_transformer(4, 2, 16, n_layers=5, seed=2, dtype=torch.float64),
    "standard-mlp-ln": lambda: standard_transformer(5, 24, n_layers=2, d_model=16, seed=3),
    "standard-rotary-attn-only": lambda: standard_transformer(
        5,
        24,
        n_layers=1,
        d_model=8,
        n_heads=2,
        attn_only=True,
        normalization=None,
        positions="rotary",
        output="probs",
        seed=4,
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bit_exact(tmp_path, name):
    model = _perturbed(MODELS[name]())
    mdlens.save(model, tmp_path / "ckpt")
    loaded = mdlens.load(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    _assert_same_weights(model, loaded)
    assert loaded.output_type == model.output_type
    tokens = torch.randint(model.cfg.d_vocab, (3, model.cfg.n_ctx), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(tokens), loaded(tokens))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files


def test_layout_aliases_md_params_and_frozen_flags_survive(tmp_path):
    model = _perturbed(disentangled_transformer(5, 3, 24, seed=0))
    model.layout = model.layout.with_aliases([ResidualBlock("L1.responsibility", 15, 18, "gamma(1..m)")])
    model.md_params = {"eta": 0.25, "transition": torch.eye(5, dtype=torch.float64)}
    mdlens.save(model, tmp_path)
    loaded = mdlens.load(tmp_path)
    assert loaded.layout == model.layout and loaded.layout["L1.responsibility"] == slice(15, 18)
    assert loaded.md_params["eta"] == 0.25 and torch.equal(
        loaded.md_params["transition"], torch.eye(5, dtype=torch.float64)
    )
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {n for n, p in loaded.named_parameters() if not p.requires_grad}


def test_task_round_trip_reproduces_the_transition_and_the_sample_stream(tmp_path):
    task = mdlens.MTDTask(vocab_size=4, order=2, alpha=0.5, seed=7)
    model = disentangled_transformer(4, 2, 16)
    mdlens.save(model, tmp_path, task=task)
    loaded = mdlens.load_task(tmp_path)
    assert torch.equal(loaded.transition, task.transition)
    assert (loaded.order, loaded.alpha, loaded.seed) == (2, 0.5, 7)
    fresh = mdlens.MTDTask(vocab_size=4, order=2, alpha=0.5, seed=7)
    assert torch.equal(loaded.sample(4, 10).tokens, fresh.sample(4, 10).tokens)
    # A task given by its matrix comes back with that matrix.
    given = mdlens.MTDTask(order=2, transition=torch.full((3, 3), 1 / 3, dtype=torch.float64))
    mdlens.save(disentangled_transformer(3, 2, 8), tmp_path / "given", task=given)
    assert torch.equal(mdlens.load_task(tmp_path / "given").transition, given.transition)
    mdlens.save(model, tmp_path / "none")
    assert mdlens.load_task(tmp_path / "none") is None


@pytest.fixture
def saved(tmp_path):
    model = _perturbed(disentangled_transformer(5, 3, 24, seed=0))
    directory = tmp_path / "ckpt"
    mdlens.save(model, directory)
    return directory


def _edit_config(directory, **changes):
    config = json.loads((directory / CONFIG_FILE).read_text())
    config.update(changes)
    (directory / CONFIG_FILE).write_text(json.dumps(config))


def test_missing_files_raise_file_not_found(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        mdlens.load(tmp_path / "nowhere")
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing"):
        mdlens.load(saved)
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.json is missing"):
        mdlens.load(saved)


def test_truncated_weights_raise(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        mdlens.load(saved)


def test_weights_from_another_checkpoint_raise(saved, tmp_path):
    other = tmp_path / "other"
    mdlens.save(_perturbed(disentangled_transformer(5, 3, 24, seed=0), seed=1), other)
    shutil.copy(other / WEIGHTS_FILE, saved / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="SHA-256 differs"):
        mdlens.load(saved)


def test_weights_that_do_not_fit_the_recorded_architecture_raise(saved):
    # The hash still matches, but the builder arguments now describe a model of another shape.
    config = json.loads((saved / CONFIG_FILE).read_text())
    _edit_config(saved, args={**config["args"], "n_layers": 2})
    with pytest.raises(ValueError, match="does not fit the model"):
        mdlens.load(saved)
    _edit_config(saved, args={**config["args"], "n_ctx": 32})
    with pytest.raises(ValueError, match="has shape"):
        mdlens.load(saved)


def test_unreadable_safetensors_with_a_matching_hash_raise(saved):
    from mdlens.checkpoints import _sha256

    (saved / WEIGHTS_FILE).write_bytes(b"not a safetensors file at all")
    _edit_config(saved, weights_sha256=_sha256(saved / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        mdlens.load(saved)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"version": 99}, "format version 99"),
        ({"kind": "mystery"}, "unknown model kind"),
        ({"format": "something-else"}, "not an mdlens checkpoint config"),
        ({"args": {"vocab_size": 5, "dtype": "float32", "flavour": "x"}}, "builder arguments do not fit"),
        ({"args": {"vocab_size": 5, "dtype": "bfloat16"}}, "dtype .bfloat16. is not one of"),
    ],
)
def test_mismatched_config_raises(saved, changes, message):
    _edit_config(saved, **changes)
    with pytest.raises(ValueError, match=message):
        mdlens.load(saved)


def test_truncated_config_raises(saved):
    text = (saved / CONFIG_FILE).read_text()
    (saved / CONFIG_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        mdlens.load(saved)


def test_saving_a_model_mdlens_cannot_rebuild_raises(tmp_path):
    class Shifted(HookedTransformer):  # a forward its config does not describe
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs) + 1.0

    cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=8, d_head=8, d_vocab=5, attn_only=True, act_fn=None)
    with pytest.raises(ValueError, match="subclass that mdlens did not build"):
        mdlens.save(Shifted(cfg), tmp_path)
    with pytest.raises(ValueError, match="takes a HookedTransformer"):
        mdlens.save(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(ValueError, match="task must be an MTDTask"):
        mdlens.save(disentangled_transformer(5, 3, 8), tmp_path, task="task")
