"""Names a package defines on first use (a module ``__getattr__``, PEP 562).

``import mdlens`` and ``import mdlens.models.layout`` then cost nothing until a name that needs torch
or TransformerLens is asked for: ``mdlens --help`` answers at once, and the report reads the layer
numbering without TransformerLens.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable


def lazy_names(
    package: str, namespace: dict, public_names: dict[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose globals are ``namespace``.

    ``public_names`` maps a name to the module that defines it; ``submodules`` are the package's
    modules reachable as attributes (``mdlens.estimators``). Each is imported on first access and then
    kept in ``namespace``, so the next access is a plain attribute.
    """
    submodules = tuple(submodules)

    def __getattr__(name: str) -> object:
        if name in public_names:
            value = getattr(importlib.import_module(public_names[name]), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *public_names, *submodules})

    return __getattr__, __dir__
