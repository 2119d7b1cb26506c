"""``index.html``: one self-contained page (CSS inline, images as base64 data URIs).

Rendered by jinja2 from ``reports/page.html`` with autoescaping on: every string from run data
(method names, errors, the study config) is escaped, so a tag cannot inject markup.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from reports._common import safe_name
from reports.tables import WARNING, DisplayTable
from reports.tuning import TuningView

__all__ = ["GroupPage", "data_uri", "render_page"]

# CSS classes of the table's columns: numbers right-aligned; Ratio and Method stay in view when
# the table scrolls sideways inside its box; Status wraps (a failed run's error can be long).
_COLUMN_CSS = {"Ratio": "ratio key", "Method": "method key", "Family": "", "Status": "status"}
_MIME = {".png": "image/png", ".svg": "image/svg+xml"}
# The group's files as the page lists them, by kind, in this order.
_FILE_KINDS = ("Tables", "Data", "Pareto plots", "Tuning views", "Other")


@dataclass(frozen=True)
class GroupPage:
    """What the page shows of one (model, dataset).

    Attributes:
        table: The formatted table.
        plots: (caption, PNG path) of each Pareto plot.
        tuning: The tuning views of this (model, dataset).
        files: Paths of the written files, relative to the page.
    """

    table: DisplayTable
    plots: tuple[tuple[str, Path], ...] = ()
    tuning: tuple[TuningView, ...] = ()
    files: tuple[str, ...] = field(default=())


def data_uri(path: Path) -> str:
    """The file as a ``data:`` URI (base64), so that the page needs no other file."""
    mime = _MIME[path.suffix.lower()]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _file_kind(name: str) -> tuple[str, str]:
    """(kind, label) of a file, from its path below the group's folder."""
    if name.startswith("tuning/"):
        return "Tuning views", name.removeprefix("tuning/")  # <method>/<ratio>/<file>
    if name.startswith("pareto_"):
        return "Pareto plots", name
    if name.endswith(".csv"):
        return "Data", name
    if name.startswith("table."):
        return "Tables", name
    return "Other", name


def _file_groups(files: tuple[str, ...], folder: str) -> list[dict]:
    """The files by kind, in the order of ``_FILE_KINDS``."""
    kinds: dict[str, list[dict]] = {kind: [] for kind in _FILE_KINDS}
    for href in files:
        kind, label = _file_kind(href.removeprefix(f"{folder}/"))
        kinds[kind].append({"href": href, "name": label})
    return [{"kind": kind, "files": found} for kind, found in kinds.items() if found]


def _group_context(group: GroupPage) -> dict:
    table = group.table
    folder = f"{safe_name(table.model)}/{safe_name(table.dataset)}"  # as reports.build writes it
    starts = table.block_starts()
    columns = [{"name": c, "css": _COLUMN_CSS.get(c, "num")} for c in table.columns]
    rows = [
        {
            "css": f"{kind}{' first-of-block' if i in starts else ''}",
            "cells": [
                {"text": cell.text, "bold": cell.bold, "css": column["css"]}
                for cell, column in zip(row, columns)
            ],
        }
        for i, (kind, row) in enumerate(zip(table.kinds, table.rows))
    ]
    plots = [
        {"uri": data_uri(path), "alt": caption, "caption": caption} for caption, path in group.plots
    ]
    tuning = []
    for view in group.tuning:
        images = [
            {"uri": data_uri(path), "alt": f"{view.method} {view.ratio}: {what}"}
            for what, path in (("trial history", view.history), ("importances", view.importance))
            if path is not None
        ]
        tuning.append(
            {
                "method": view.method,
                "ratio": view.ratio,
                "study": view.optuna_study,
                "n_complete": view.n_complete,
                "best": f"{view.best:.2f}" if math.isfinite(view.best) else "",
                "images": images,
                "notes": view.notes,
            }
        )
    return {
        "model": table.model,
        "dataset": table.dataset,
        "anchor": safe_name(f"{table.model}-{table.dataset}"),
        "columns": columns,
        "rows": rows,
        "footnotes": table.footnotes,
        "folder": folder,
        "n_files": len(group.files),
        "file_groups": _file_groups(group.files, folder),
        "plots": plots,
        "tuning": tuning,
    }


def render_page(
    study: str,
    tracking_uri: str,
    groups: list[GroupPage],
    study_yaml: str | None,
    storage: str | None = None,
    summary: str | None = None,
) -> str:
    """The HTML of the report page.

    Args:
        study: Study name.
        tracking_uri: Where the runs were read (credentials already masked).
        groups: One entry per (model, dataset), in display order.
        study_yaml: The study config text, if found.
        storage: The Optuna storage override, if any (credentials already masked).
        summary: The summary CSV (every row of every table), relative to the page, if written.
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,  # a typo in the template fails loudly, not silently
        keep_trailing_newline=True,
    )
    return env.get_template("page.html").render(
        study=study,
        tracking_uri=tracking_uri,
        storage=storage,
        summary=summary,
        study_yaml=study_yaml,
        groups=[_group_context(g) for g in groups],
        warning=WARNING,  # a footnote that warns (a table mixing code versions) stands out
    )
