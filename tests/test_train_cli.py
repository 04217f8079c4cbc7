"""mdlens train's flags are TrainConfig's and RunConfig's fields; the shipped recipes are config files that
equal the MANIFEST's commands; a run killed between its state and its model resumes to the same model."""

import argparse
import json
import shlex
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import numpy as np
import pytest
import torch

import mdlens
from mdlens import train_cli
from mdlens.cli import build_parser
from mdlens.cli import main as cli_main
from mdlens.pretrained import PRETRAINED_DIR, manifest
from mdlens.train_cli import RunConfig, make_configs, read_config_file
from mdlens.training import RUNTIME_FIELDS, TrainConfig


def train_parser():
    """The ``mdlens train`` subparser."""
    (subparsers,) = [action for action in build_parser()._actions if action.dest == "command"]
    return subparsers.choices["train"]


def test_flags_are_the_config_fields_with_their_defaults():
    actions = {action.dest: action for action in train_parser()._actions if action.dest not in ("help", "config")}
    all_fields = [*fields(RunConfig), *fields(TrainConfig)]
    assert set(actions) == {spec.name for spec in all_fields}
    assert len(actions) == len(all_fields)  # no field has two flags of its own, no two fields share one
    for spec in all_fields:
        action = actions[spec.name]
        assert spec.default is not MISSING
        assert f"--{spec.name.replace('_', '-')}" in action.option_strings
        assert action.default is argparse.SUPPRESS  # "not given": a --config file may set it
        if spec.name == "out":  # no default to show: the run's check refuses None
            assert action.help.endswith("(required)") and "default" not in action.help
            continue
        assert action.help.endswith(f"(default: {'none' if spec.default is None else spec.default})")
    # Nothing given but --out: exactly the dataclass's defaults, the training state next to the model.
    run, config = make_configs({"out": "runs/x"})
    assert asdict(config) == asdict(TrainConfig(checkpoint_dir="runs/x"))
    assert asdict(run) == {**{spec.name: spec.default for spec in fields(RunConfig)}, "out": "runs/x"}


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for spec in fields(TrainConfig):
        flag = f"--{spec.name.replace('_', '-')}"
        assert flag in text, flag
        shown = "none" if spec.default is None else str(spec.default)
        help_text = " ".join(spec.metadata["help"].split())
        assert f"{help_text} (default: {shown})" in text, spec.name
    assert "(default: 500)" in text.split("--checkpoint-every")[-1][:200]  # the dataclass's, in the CLI too


def test_flag_values_are_parsed_by_the_fields_types(tmp_path):
    args = train_parser().parse_args(
        ["--grad-clip", "none", "--curriculum-start-len", "8", "--no-eval-bayes", "--batch", "4", "--out", "o"]
    )
    run, config = train_cli.resolve_configs(args)
    assert config.grad_clip is None and config.curriculum_start_len == 8 and config.eval_bayes is False
    assert config.batch_size == 4 and run.out == "o" and config.checkpoint_dir == "o"
    # Flags override the config file, which overrides the defaults.
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.01, "steps": 7, "layers": 2}))
    run, config = train_cli.resolve_configs(
        train_parser().parse_args(["--config", str(path), "--lr", "0.02", "--out", "o"])
    )
    assert (config.lr, config.steps, run.layers) == (0.02, 7, 2)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_config_file(path)


@pytest.mark.parametrize("five", [np.int64(5), np.int32(5), torch.tensor(5), np.array(5)])
def test_configs_keep_plain_python_values(five, tmp_path):
    """An integer given as numpy or as a 0-d tensor, a numpy float and a path are stored as int, float
    and str, so the configs' JSON (the training state's and train.json's) holds plain values and reads
    back into an equal config."""
    config = TrainConfig(steps=five, eval_every=five, lr=np.float32(0.5), checkpoint_dir=tmp_path)
    run = RunConfig(layers=five, out=tmp_path)
    plain = json.loads(json.dumps({**asdict(run), **asdict(config)}))
    assert (plain["steps"], plain["eval_every"], plain["layers"], plain["lr"]) == (5, 5, 5, 0.5)
    assert plain["checkpoint_dir"] == plain["out"] == str(tmp_path)
    assert [type(value) for value in (config.steps, config.eval_every, run.layers, config.lr)] == [int] * 3 + [float]
    assert TrainConfig(**json.loads(json.dumps(asdict(config)))) == config


@pytest.mark.parametrize("value", [True, np.bool_(True), torch.tensor(True), torch.tensor(5.0), torch.tensor([5]), 5.0])
def test_configs_refuse_what_is_not_an_integer(value):
    with pytest.raises(ValueError, match="steps must be an integer"):
        TrainConfig(steps=value)


# ---------------------------------------------------------------------------------------------------
# The shipped recipes


def manifest_stages(entry: dict) -> list[list[str]]:
    """The argument lists of the ``mdlens train`` runs in a MANIFEST entry's command."""
    command = entry["command"].split("  (then")[0]
    return [shlex.split(stage)[1:] for stage in command.split("&&")]


@pytest.mark.parametrize("name", sorted(manifest()))
def test_recipe_files_are_the_manifest_commands(name):
    entry = manifest()[name]
    stages = manifest_stages(entry)
    assert len(entry["recipe"]) == len(stages)
    parser = train_parser()
    reports = [stage["report"] for stage in entry.get("stages", [{"report": "train.json"}])]
    previous_out = None
    for path, argv, report_name in zip(entry["recipe"], stages, reports, strict=True):
        values = read_config_file(PRETRAINED_DIR / name / path)
        # The file sets exactly the fields the command's flags set, to the same values.
        args = parser.parse_args(argv[1:])
        given = {dest: value for dest, value in vars(args).items() if dest not in ("config", "handler")}
        assert values == given, path
        run, config = make_configs(values)
        assert (run, config) == train_cli.resolve_configs(args)
        # Each stage grows the model the stage before wrote.
        assert run.init_from == previous_out, path
        previous_out = run.out
        # The recipe is what that run recorded (train.json), up to fields that cannot change the weights.
        report = json.loads((PRETRAINED_DIR / name / report_name).read_text())
        recorded = {**{spec.name: spec.default for spec in fields(TrainConfig)}, **report["train_config"]}
        for spec in fields(TrainConfig):
            if spec.name not in RUNTIME_FIELDS:
                assert getattr(config, spec.name) == recorded[spec.name], (path, spec.name)
        recorded_run = {**{spec.name: spec.default for spec in fields(RunConfig)}, **report["fields"]}
        for spec in fields(RunConfig):
            if spec.name != "init_from":  # some stages ran from the shipped directory, see the MANIFEST
                assert getattr(run, spec.name) == recorded_run[spec.name], (path, spec.name)


def test_disentangled_5l_has_its_five_stage_recipe():
    recipe = manifest()["disentangled-5l"]["recipe"]
    assert recipe == [f"recipe/stage{i}.json" for i in range(1, 6)]
    for path in recipe:
        run, config = make_configs(read_config_file(PRETRAINED_DIR / "disentangled-5l" / path))
        assert (run.model, run.layers, config.seq_len, config.batch_size) == ("disentangled", 5, 192, 16)


# ---------------------------------------------------------------------------------------------------
# Killed between the training state and the model


class Killed(Exception):
    """Stands for the process dying."""


def test_killed_after_the_state_before_the_model_resumes_to_the_same_model(tmp_path, monkeypatch):
    common = ["train", "--layers", "2", "--seq-len", "16", "--steps", "6", "--batch-size", "8", "--eval-every", "0"]
    common += ["--device", "cpu", "--no-progress"]
    cli_main([*common, "--out", str(tmp_path / "whole")])

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(train_cli, "save", killed)  # dies after train_state.pt, before model.safetensors
        with pytest.raises(Killed):
            cli_main([*common, "--out", str(tmp_path / "killed")])
    assert (tmp_path / "killed" / "train_state.pt").exists()
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    cli_main([*common, "--resume", "--out", str(tmp_path / "killed")])
    whole, resumed = mdlens.load(tmp_path / "whole"), mdlens.load(tmp_path / "killed")
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    report = json.loads(Path(tmp_path / "killed" / "train.json").read_text())
    assert report["fields"]["resume"] is True and report["samples"] == 6 * 8


def test_a_run_in_out_is_replaced_only_with_overwrite(tmp_path, capsys):
    common = ["train", "--layers", "1", "--seq-len", "8", "--steps", "2", "--batch-size", "2", "--eval-every", "0"]
    common += ["--eval-batch-size", "4", "--device", "cpu", "--no-progress", "--out", str(tmp_path)]
    cli_main([*common, "--seed", "0"])
    first = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(SystemExit) as refused:
        cli_main([*common, "--seed", "1"])
    assert refused.value.code == 2
    assert "already holds files (model.json, model.safetensors, train.json, train_state.pt)" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == first  # nothing was touched
    cli_main([*common, "--seed", "1", "--overwrite"])
    replaced = json.loads((tmp_path / "train.json").read_text())
    assert replaced["train_config"]["seed"] == 1 and replaced["fields"]["overwrite"] is True
    assert (tmp_path / "model.safetensors").read_bytes() != first["model.safetensors"]
