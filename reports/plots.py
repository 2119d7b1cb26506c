"""Pareto plots: test top-1 against params reduction, MACs reduction and measured speedup.

One colour per method (the same in every plot), one marker per family; every (method, ratio) point
is shown with its std over seeds as error bars, and a line joins each method's non-dominated points
(its Pareto front). Each point is labelled by its target ("4x"; layer rates as "rates 5.0x", the
params ratio they reached) and, for a point of a tuning's Pareto front, its number ("4x P2"). The
dense baseline's accuracy is a dotted horizontal line.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot: no global state, no
GUI backend; saving uses Agg for PNG). Saved files carry no date and a fixed SVG hash salt, so the
same summary gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bench.paths import atomic_path
from reports._common import TIMES, family_key, pareto_key, ratio_key

__all__ = ["AXES", "pareto_figure", "pareto_front", "point_label", "save_figure"]

# Plot name -> (summary column of x, its std column or None, axis label with unit).
AXES = {
    "params": ("params_reduction", None, "Params reduction (%), stored values"),
    # the theoretical axis: MACs on stored nonzeros (older runs: their executed MACs)
    "macs": ("macs_nz_reduction", None, "FLOPs nz (MACs on stored nonzeros) reduction (%)"),
    "speedup": (
        "speedup_mean",
        "speedup_std",
        f"Measured speedup ({TIMES}, dense / compressed latency)",
    ),
}
_Y_LABEL = "Test top-1 accuracy (%)"
_MARKERS = {"frequency": "o", "spatial": "s"}
_STABLE_RC = {"svg.hashsalt": "freqbench", "svg.fonttype": "path"}


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points when both coordinates are to be maximised, by x.

    Written by hand: it is ten lines, and no library we already depend on has it. A point is kept
    when no other point is at least as good in both coordinates and better in one; of exact
    duplicates, one is kept.
    """
    order = sorted(range(len(xs)), key=lambda i: (-xs[i], -ys[i], i))
    front: list[int] = []
    best_y = -math.inf
    for i in order:  # x descending: a point survives only by beating every larger-x point's y
        if ys[i] > best_y:
            front.append(i)
            best_y = ys[i]
    return sorted(front, key=lambda i: (xs[i], i))


def _colours(methods: Sequence[str]) -> dict[str, tuple]:
    cmap = mpl.colormaps["tab10"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def point_label(row: pd.Series) -> str:
    """The label of a summary row's point: its target, and its Pareto point if it is one."""
    label = row["ratio"]
    achieved = row.get("params_ratio", math.nan)
    if label.startswith("rates:"):
        text = f"rates {achieved:.1f}{TIMES}" if math.isfinite(achieved) else "rates"
    else:
        text = f"{label}{TIMES}"
    index = row.get("pareto_index", "")
    return f"{text} P{int(index) + 1}" if index else text


def pareto_figure(rows: pd.DataFrame, axis: str, title: str) -> Figure | None:
    """The Pareto plot of one (model, dataset) summary against ``axis`` (a key of :data:`AXES`).

    Args:
        rows: Summary rows of one (model, dataset) (see ``reports.aggregate``).
        axis: "params", "macs" or "speedup".
        title: Figure title.

    Returns:
        The figure, or None when no measured row has a value on this axis.
    """
    column, std_column, x_label = AXES[axis]
    measured = rows[(rows["kind"] == "measured") & rows[column].notna() & rows["top1_mean"].notna()]
    if measured.empty:
        return None
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    methods = sorted(
        {(f, m) for f, m in measured[["family", "method"]].to_numpy()},
        key=lambda fm: (family_key(fm[0]), fm[1]),
    )
    colours = _colours([m for _, m in methods])
    for family, method in methods:
        mine = measured[measured["method"] == method]
        order = sorted(
            range(len(mine)),
            key=lambda i: (
                ratio_key(mine["ratio"].iloc[i]),
                pareto_key(mine["pareto_index"].iloc[i]),
            ),
        )
        mine = mine.iloc[order]
        xs, ys = mine[column].to_numpy(float), mine["top1_mean"].to_numpy(float)
        yerr = np.nan_to_num(mine["top1_std"].to_numpy(float))
        xerr = np.nan_to_num(mine[std_column].to_numpy(float)) if std_column else None
        colour, marker = colours[method], _MARKERS.get(family, "^")
        unstructured = (mine["structured"] == "false").all()
        label = f"{method} ({family}{', unstructured' if unstructured else ''})"
        ax.errorbar(
            xs, ys, yerr=yerr, xerr=xerr, fmt=marker, color=colour, ms=5, capsize=2.5, lw=0.9,
            mfc="none" if unstructured else colour, label=label,
        )  # fmt: skip
        front = pareto_front(list(xs), list(ys))
        ax.plot(
            xs[front], ys[front], color=colour, lw=1.4, ls="-" if family == "frequency" else "--"
        )
        for x, y, (_, row) in zip(xs, ys, mine.iterrows()):
            ax.annotate(
                point_label(row),
                (x, y),
                xytext=(4, 3),
                textcoords="offset points",
                fontsize=7,
                color=colour,
            )
    baseline = rows.loc[rows["kind"] == "baseline", "top1_mean"].dropna()
    base = float(baseline.iloc[0]) if len(baseline) else float(measured["baseline_top1"].mean())
    if math.isfinite(base):
        ax.axhline(base, color="0.25", ls=":", lw=1.2, label=f"dense baseline ({base:.2f} %)")
    if axis == "speedup":
        ax.axvline(1.0, color="0.6", lw=0.8)  # speedup 1: as fast as the dense model
    ax.set_xlabel(x_label)
    ax.set_ylabel(_Y_LABEL)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3, lw=0.6)
    ax.legend(
        loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False
    )
    return fig


def save_figure(
    fig: Figure, stem: Path, formats: Sequence[str] = ("png", "svg"), dpi: int = 200
) -> list[Path]:
    """Save ``fig`` as ``stem.<format>`` for each format, byte-stable; returns the paths.

    Args:
        fig: The figure.
        stem: Path without suffix.
        formats: "png" and/or "svg".
        dpi: Resolution of raster formats (dots per inch; 200 prints sharply at 6.4 in wide).
    """
    paths = []
    with mpl.rc_context(_STABLE_RC):
        for fmt in formats:
            path = stem.with_name(f"{stem.name}.{fmt}")
            # No date, no version string: the same data must give the same bytes.
            metadata = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
            paths.append(path)
    return paths
