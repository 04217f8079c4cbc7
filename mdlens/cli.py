"""The ``mdlens`` command line: ``reproduce``, ``bench`` and ``train`` (from mdlens.train_cli).

The analyses live in ``mdlens.analyses`` (the repository folder ``analyses/``), downstream of the library; the CLI is
the one place that reaches them, and it imports them lazily so that ``import mdlens`` never does.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

from mdlens.train_cli import add_train_arguments

# name -> module in ``analyses`` with a ``run(out_dir: Path, quick: bool) -> dict`` function.
REPRODUCTIONS: dict[str, str] = {
    "estimators": "mdlens.analyses.estimators",
    "trained": "mdlens.analyses.trained",
    "two-step": "mdlens.analyses.causal_two_step",
    "mechanisms": "mdlens.analyses.mechanisms",
    "step-sizes": "mdlens.analyses.step_sizes",
    "training-mechanism": "mdlens.analyses.training_mechanism",
    # Last: REPORT.md from the JSON files the others wrote (into DIR/<name>/ under `all`).
    "report": "mdlens.analyses.report",
}
# Left out of ``reproduce all``: they train models (tens of minutes on a CPU); run them by name.
NOT_IN_ALL = ("training-mechanism",)


def _benchmark_modules() -> list[str]:
    """Every ``analyses/bench_*.py`` module, each with a ``main(quick: bool)`` that prints ratios."""
    import mdlens.analyses as analyses

    return sorted(
        f"mdlens.analyses.{info.name}"
        for info in pkgutil.iter_modules(analyses.__path__)
        if info.name.startswith("bench_")
    )


def _reproduce(args: argparse.Namespace) -> None:
    names = [name for name in REPRODUCTIONS if name not in NOT_IN_ALL] if args.what == "all" else [args.what]
    out = Path(args.out)
    for name in names:
        target = out / name if args.what == "all" and name != "report" else out
        start = time.perf_counter()
        module = importlib.import_module(REPRODUCTIONS[name])
        written = module.run(target, quick=args.quick)
        print(f"[mdlens] reproduce {name}: {time.perf_counter() - start:.1f} s, wrote:")
        for path in written.get("files", []):
            print(f"  {path}")


def _bench(args: argparse.Namespace) -> None:
    modules = _benchmark_modules()
    if args.only:
        modules = [m for m in modules if m.endswith(f"bench_{args.only}")]
        if not modules:
            known = ", ".join(m.removeprefix("mdlens.analyses.bench_") for m in _benchmark_modules())
            raise SystemExit(f"unknown benchmark {args.only!r}; known: {known}")
    for name in modules:
        print(f"\n=== {name} ===", flush=True)
        importlib.import_module(name).main(quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdlens", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    reproduce = commands.add_parser("reproduce", help="run an analysis; writes JSON and PNG")
    reproduce.add_argument("what", choices=[*REPRODUCTIONS, "all"])
    reproduce.add_argument("--out", required=True, help="output directory")
    reproduce.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    reproduce.set_defaults(handler=_reproduce)

    bench = commands.add_parser("bench", help="run the benchmarks in analyses/ and print ratios")
    bench.add_argument("--only", help="run one benchmark, e.g. 'estimators'")
    bench.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    bench.set_defaults(handler=_bench)

    train = commands.add_parser("train", help="train a model on the MTD task; writes a loadable checkpoint")
    add_train_arguments(train)

    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main(sys.argv[1:])
