"""Shared plot style for the analyses: readable axes, legends, log scales, one colour per method.

Every analysis draws with matplotlib's non-interactive ``Agg`` backend (no display needed),
inside ``with style():`` (so the shared rcParams apply without touching the caller's global
settings), and saves PNGs through :func:`save_figure`, so the look stays the same across the project.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}

# One fixed colour and marker per method, so a method looks the same in every figure.
METHOD_STYLE: dict[str, dict] = {
    "oracle": {"color": "black", "marker": "", "linestyle": ":"},
    "uniform": {"color": "0.5", "marker": "x", "linestyle": "--"},
    "md1_tuned": {"color": "tab:blue", "marker": "o", "linestyle": "-"},
    "md1_fixed": {"color": "tab:cyan", "marker": "v", "linestyle": "--"},
    "md2_tuned": {"color": "tab:orange", "marker": "s", "linestyle": "-"},
    "md5_tuned": {"color": "tab:red", "marker": "D", "linestyle": "-"},
    "mle": {"color": "tab:brown", "marker": "^", "linestyle": "-."},
    "bayes_exact": {"color": "tab:green", "marker": "*", "linestyle": "-"},
    "bayes_gibbs": {"color": "tab:olive", "marker": "P", "linestyle": ":"},
}


def style():
    """Context manager applying the shared rcParams: ``with style(): fig, axes = new_figure()``."""
    return plt.rc_context(STYLE)


def new_figure(ncols: int = 1, width: float = 5.0, height: float = 3.8) -> tuple[Figure, list[Axes]]:
    """A figure with ``ncols`` side-by-side axes (call inside :func:`style`)."""
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def method_style(name: str) -> dict:
    """Colour/marker/linestyle for a method name (a neutral default for unknown names)."""
    return dict(METHOD_STYLE.get(name, {"marker": "o", "linestyle": "-"}))


def log_log(ax: Axes, xlabel: str, ylabel: str, title: str | None = None, xticks: list[float] | None = None) -> None:
    """Log scales on both axes with labels; ``xticks`` (e.g. the sequence lengths) are written
    as plain numbers, which read better than powers of ten."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if xticks is not None:
        ax.set_xticks(list(xticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def legend_outside(ax: Axes) -> None:
    """A legend to the right of the axes, so it never hides a curve."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def save_figure(fig: Figure, path: Path) -> Path:
    """Tighten the layout, write the PNG, close the figure, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
