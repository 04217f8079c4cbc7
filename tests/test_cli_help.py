"""``mdlens --help`` and each command's help answer without importing torch or TransformerLens, in plain
text (no docstring markup, nothing contradictory); the lazy ``import mdlens`` keeps the public names;
the training bar shows no KL before there is one."""

import subprocess
import sys
from pathlib import Path

import pytest

from mdlens.cli import REPRODUCTIONS, _benchmark_names, build_parser

HELP_COMMANDS = ([], ["train"], ["reproduce"], ["bench"])

IMPORTS_AFTER_HELP = """
import sys
from mdlens import cli
for argv in ([], ["train"], ["reproduce"], ["bench"]):
    try:
        cli.main([*argv, "--help"])
    except SystemExit:
        pass
print(sorted(name for name in ("torch", "transformer_lens", "numpy", "matplotlib") if name in sys.modules))
"""


def python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_imports_neither_torch_nor_transformer_lens():
    assert python(IMPORTS_AFTER_HELP).strip().splitlines()[-1] == "[]"


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", HELP_COMMANDS, ids=lambda argv: " ".join(["mdlens", *argv]))
def test_help_is_plain_and_consistent(argv, capsys):
    text = help_text(argv, capsys)
    flat = " ".join(text.split())
    for markup in ("``", ":func:", ":class:", ":mod:", ":meth:"):
        assert markup not in text, markup
    assert "(required) (default" not in flat and "required (default" not in flat


def test_train_help_says_the_cli_builds_the_model_ce_needs(capsys):
    flat = " ".join(help_text(["train"], capsys).split())
    loss_help = flat.split("--loss LOSS")[-1].split("--targets")[0]  # the option's entry, after the usage line
    assert "ce" in loss_help and "needs a model" not in loss_help
    assert "--out OUT output directory (as a flag or as 'out' in the --config file) (required)" in flat
    assert "--overwrite, --no-overwrite" in flat


def test_bench_and_reproduce_help_list_their_choices(capsys):
    names = _benchmark_names()
    bench_folder = Path(__file__).resolve().parents[1] / "analyses" / "bench"
    assert names == sorted(path.stem for path in bench_folder.glob("*.py") if path.stem != "__init__") and names
    bench = " ".join(help_text(["bench"], capsys).split())
    assert "--only {" + ",".join(names) + "}" in bench and ", ".join(names) in bench
    reproduce = help_text(["reproduce"], capsys)
    for name, stage in REPRODUCTIONS.items():
        assert f"  {name} " in reproduce and stage.summary in reproduce, name


def test_lazy_package_keeps_the_public_names():
    printed = python(
        "import sys\n"
        "import mdlens\n"
        "print('torch' in sys.modules)\n"
        "from mdlens import hooks, estimators as E\n"
        "from mdlens import MTDTask, MTDSample, load, load_pretrained, list_pretrained, load_task, predict_next, save\n"
        "print(mdlens.MTDTask is MTDTask, E.bayes_weights.__module__, hooks.targets.__module__)\n"
        "print(mdlens.load_pretrained is load_pretrained, callable(mdlens.save), mdlens.models.__name__)\n"
        "print(sorted(set(mdlens.__all__) - set(dir(mdlens))))\n"
        "try:\n"
        "    mdlens.no_such_name\n"
        "except AttributeError as error:\n"
        "    print('AttributeError', error)\n"
    )
    assert printed.splitlines() == [
        "False",
        "True mdlens.estimators mdlens.hooks.targets",
        "True True mdlens.models",
        "[]",
        "AttributeError module 'mdlens' has no attribute 'no_such_name'",
    ]


def test_training_bar_shows_no_kl_before_the_first_evaluation(capsys):
    from mdlens import MTDTask
    from mdlens.models import DisentangledTransformer
    from mdlens.training import TrainConfig, train

    task = MTDTask(vocab_size=5, order=3, alpha=1.0, seed=0)
    model = DisentangledTransformer(5, 12, n_layers=1, window=4, seed=0, order=3)
    config = TrainConfig(
        steps=6, batch_size=2, seq_len=12, log_every=1, eval_every=4, eval_batch_size=8, device="cpu", eval_bayes=False
    )
    train(model, task, config)
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert "kl=nan" not in bar
    states = [line for line in bar.splitlines() if "loss=" in line]  # one per refresh of the postfix
    assert "kl=" not in states[0]  # step 1's loss, before the first evaluation (step 4)
    assert "kl=" in states[-1] and "6/6" in states[-1]
    float(states[-1].split("kl=")[1].split(",")[0].rstrip("]"))  # a number once there is one
