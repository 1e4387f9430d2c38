"""Figures through matplotlib's object API: no pyplot, so no global backend switch and no open figures
left in a user's session (Jupyter included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6, 4), squeeze: bool = True):
    """A figure and its axes, laid out as `matplotlib.pyplot.subplots` would."""
    fig = Figure(figsize=figsize)
    axes: Any = fig.subplots(nrows, ncols, squeeze=squeeze)
    return fig, axes


def save_figure(fig: Figure, path: str | Path, dpi: int = 100, tight: bool = True) -> None:
    """Write `fig` to `path` (the format from its suffix)."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
