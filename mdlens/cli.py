"""The mdlens command line: reproduce, bench and train (mdlens.train_cli).

The analyses live in ``mdlens.analyses`` (the repository folder ``analyses/``), downstream of the
library; the CLI is the one place that reaches them. Everything heavy (torch, TransformerLens, the
analyses) is imported only by the command that runs, so that ``mdlens --help`` and each command's
``--help`` answer at once. A mistake in what the user gave ends in argparse's ``error:`` form (usage
line, ``mdlens <command>: error: ...``, exit status 2); a traceback means a bug.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import multiprocessing
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mdlens.train_config import add_train_arguments, check_run_directories, resolve_configs


@dataclass(frozen=True)
class Stage:
    """One ``mdlens reproduce`` stage: a module with ``run(out_dir: Path, quick: bool)`` that returns an
    ``mdlens.analyses.AnalysisResult`` and writes ``json_file`` into ``out_dir`` (the report reads it there)."""

    module: str
    summary: str
    json_file: str | None = None  # None: the stage writes no JSON (the report)
    in_all: bool = True  # False: too long for ``reproduce all``; run it by name
    # ``reproduce all --jobs N`` runs the stages of one group in one process, in table order: they
    # reuse each other's batches, tuned steps and exact Bayes (``mdlens.evaluation.shared``).
    group: str = ""
    # About how long the stage takes in a full run (seconds, as the README's demo measured it, one core
    # per process): ``--jobs`` starts the groups with the most of it first, so the long ones do not end last.
    seconds: float = 0.0


# The stages that score the references and the shipped models on the shared batches of each length.
REFERENCES = "references"

# The stages of ``mdlens reproduce``, in the order ``all`` runs them. A new analysis is one more row
# (before "report", which reads the JSON files the others wrote into DIR/<name>/ under ``all``).
REPRODUCTIONS: dict[str, Stage] = {
    "estimators": Stage(
        "mdlens.analyses.estimator_comparison",
        "MD vs Bayes across sequence lengths",
        "estimators.json",
        seconds=50,  # its own batch sizes: it shares nothing with the other stages
    ),
    "trained": Stage(
        "mdlens.analyses.trained",
        "the shipped trained models against the references",
        "trained.json",
        group=REFERENCES,
        seconds=75,
    ),
    "two-step": Stage(
        "mdlens.analyses.causal_two_step",
        "causal multi-step MD and the two-step construction",
        "two_step.json",
        group=REFERENCES,
        seconds=60,
    ),
    "mechanisms": Stage(
        "mdlens.analyses.mechanisms",
        "probes, patching and attention of each model",
        "mechanisms.json",
        group="mechanisms",
        seconds=120,
    ),
    "step-sizes": Stage(
        "mdlens.analyses.step_sizes",
        "the step size each model implements",
        "step_sizes.json",
        group=REFERENCES,
        seconds=45,
    ),
    "alignment": Stage(
        "mdlens.analyses.alignment",
        "distributed alignment search: is MD causally inside?",
        "alignment.json",
        group="alignment",
        seconds=220,
    ),
    "training-mechanism": Stage(
        "mdlens.analyses.training_mechanism",
        "the training study (trains models: tens of minutes)",
        "training_mechanism.json",
        in_all=False,
    ),
    "report": Stage("mdlens.analyses.report", "REPORT.md from the JSON files the others wrote"),
}


class UsageError(Exception):
    """A mistake in the command line, printed in argparse's ``error:`` form (see :func:`_handler`)."""


def _handler(parser: argparse.ArgumentParser, command: Callable[[argparse.Namespace], None]):
    """``command`` with its :class:`UsageError` shown as ``parser``'s usage line and
    ``mdlens <command>: error: ...``, exit status 2 (``argparse.ArgumentParser.error``)."""

    def handle(args: argparse.Namespace) -> None:
        try:
            command(args)
        except UsageError as error:
            parser.error(str(error))

    return handle


def _benchmark_names() -> list[str]:
    """Every benchmark of ``mdlens.analyses.bench``, by name; each module has a ``main(quick: bool)`` that
    prints ratios."""
    # Loaded like the stages, by name: the library below never imports the analyses (the package's
    # __init__ is light, no torch).
    return importlib.import_module("mdlens.analyses.bench").benchmark_names()


def _reproduce(args: argparse.Namespace) -> None:
    names = [name for name, stage in REPRODUCTIONS.items() if stage.in_all] if args.what == "all" else [args.what]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    # Under ``all`` each analysis writes into DIR/<name>/ and the report into DIR itself.
    folders = {name: out / name if args.what == "all" and name != "report" else out for name in names}
    stages = [(name, REPRODUCTIONS[name].module, str(folders[name])) for name in names]
    analyses, last = (stages[:-1], stages[-1:]) if args.what == "all" else (stages, [])
    if args.jobs == 1 or len(analyses) == 1:
        _run_stages(analyses, args.quick)
    else:
        _run_groups(analyses, args.quick, args.jobs, preload=tuple(module for _, module, _ in last))
    _run_stages(last, args.quick)  # the report, once every JSON file is written


def _run_stages(stages: list[tuple[str, str, str]], quick: bool) -> None:
    """Run ``(name, module, out_dir)`` stages one after the other in this process, printing what each wrote."""
    for name, module_name, out_dir in stages:
        start = time.perf_counter()
        module = importlib.import_module(module_name)
        try:
            written = module.run(Path(out_dir), quick=quick)
        except ValueError as error:
            if name != "report":  # an analysis computes from nothing the user gave: a bug
                raise
            raise UsageError(str(error)) from error  # the report reads what earlier stages wrote
        print(f"[mdlens] reproduce {name}: {time.perf_counter() - start:.1f} s, wrote:", flush=True)
        for path in written.files:  # an mdlens.analyses.AnalysisResult
            print(f"  {path}", flush=True)


def _run_groups(stages: list[tuple[str, str, str]], quick: bool, jobs: int, preload: tuple[str, ...] = ()) -> None:
    """The stages in ``jobs`` worker processes, one :attr:`Stage.group` per task (the longest groups by
    :attr:`Stage.seconds` first), each group's stages in table order. Every stage computes from its own
    seeds, so the numbers are those of a run in one process; only the wall time changes. A failure
    stops the run with its traceback. The modules in ``preload`` (the stages this process runs next)
    are imported here while the workers compute (the report's imports took 1.5 s at the end)."""
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for stage in stages:
        groups.setdefault(REPRODUCTIONS[stage[0]].group or stage[0], []).append(stage)
    # Longest first (the longest-processing-time rule): a short group then fills the gap a worker has
    # while the longest finishes. Ties keep the table order.
    order = sorted(groups.values(), key=lambda group: -sum(REPRODUCTIONS[name].seconds for name, _, _ in group))
    # Fresh interpreters ("spawn"): a forked copy of a process that has run torch can hang. Leaving the
    # pool terminates the workers: once every group has returned they hold nothing, and a normal exit
    # tears down torch and TransformerLens for about 2 s in each, which the run would wait for.
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=min(jobs, len(groups))) as pool:
        # One group per task, handed out in this order as workers come free; each result in the order
        # the groups finish, so that a failure is raised (with the worker's traceback) as soon as it happens.
        finished = pool.imap_unordered(functools.partial(_run_stages, quick=quick), order, chunksize=1)
        for module in preload:
            importlib.import_module(module)
        for _ in finished:
            pass


def _bench(args: argparse.Namespace) -> None:
    names = [args.only] if args.only else _benchmark_names()
    for name in names:
        module = f"mdlens.analyses.bench.{name}"
        print(f"\n=== {module} ===", flush=True)
        importlib.import_module(module).main(quick=args.quick)


def _train(args: argparse.Namespace) -> None:
    try:  # the configs first, without torch: a mistake in them is reported at once
        run, config = resolve_configs(args)
        check_run_directories(run, config)
    except ValueError as error:
        raise UsageError(str(error)) from error
    from mdlens.train_cli import CommandLineError, train_run  # torch and TransformerLens

    try:
        train_run(run, config)
    except CommandLineError as error:
        raise UsageError(str(error)) from error


def _stage_list() -> str:
    width = max(map(len, REPRODUCTIONS))
    lines = [f"  {name:<{width}}  {stage.summary}" for name, stage in REPRODUCTIONS.items()]
    left_out = [name for name, stage in REPRODUCTIONS.items() if not stage.in_all]
    lines.append(f"  {'all':<{width}}  every stage above but {', '.join(left_out)}, into DIR/<stage>/")
    return "stages:\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdlens", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    reproduce = commands.add_parser(
        "reproduce",
        help="run an analysis; writes JSON and PNG",
        description="Run an analysis of the paper's claims; it writes JSON and PNG files into --out.",
        epilog=_stage_list(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reproduce.add_argument("what", choices=[*REPRODUCTIONS, "all"], help="the stage to run (listed below)")
    reproduce.add_argument("--out", required=True, help="output directory")
    reproduce.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    reproduce.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="with 'all': run the analyses in this many processes (the stages that share batches stay "
        "together; the numbers do not change); one core each, so at most the number of cores",
    )
    reproduce.set_defaults(handler=_handler(reproduce, _reproduce))

    benchmarks = _benchmark_names()
    bench = commands.add_parser(
        "bench",
        help="run the benchmarks in analyses/ and print ratios",
        description="Run the benchmarks (analyses/bench/*.py) and print their speed ratios.",
    )
    bench.add_argument("--only", choices=benchmarks, help=f"run one benchmark: {', '.join(benchmarks)}")
    bench.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    bench.set_defaults(handler=_handler(bench, _bench))

    train = commands.add_parser(
        "train",
        help="train a model on the MTD task; writes a loadable checkpoint",
        description=(
            "Train a model on the MTD task and save it to --out (mdlens.load(out) reads it). Every flag is a "
            "field of the run's configs; --config FILE.json sets any of them by name."
        ),
    )
    add_train_arguments(train)
    train.set_defaults(handler=_handler(train, _train))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main(sys.argv[1:])
