"""The benchmarks (``mdlens bench``): every module of this package is one, with a ``main(quick: bool)``
that prints speed ratios against a reference and returns them.

This ``__init__`` stays light (no torch): the command line lists the benchmarks from it for its help.
"""

import pkgutil

__all__ = ["benchmark_names"]


def benchmark_names() -> list[str]:
    """Every benchmark of this package, by module name (``mdlens bench --only NAME``), sorted."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
