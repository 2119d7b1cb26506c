"""Build the whole report of a study: read, check, then write tables, plots, tuning views, page.

Everything that can fail on the user's input (store, study, metrics, reference file) is checked
before the first file is written. The layout under ``out``::

    index.html                       the page (self-contained)
    .report-files                    what this report wrote (the next one deletes what is gone)
    summary.csv                      every table row of every (model, dataset), raw numbers
    <model>/<dataset>/table.{md,tex,csv}
    <model>/<dataset>/pareto_{params,macs,speedup}.{png,svg}
    <model>/<dataset>/tuning/<method>/<ratio>/{history.png,importance.png|importance.txt}

Every folder name made from run data goes through ``reports._common.safe_name``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.paths import atomic_path, default_tracking_uri, results_dir
from reports._common import inside, mask_credentials, safe_name
from reports.aggregate import groups, summarize
from reports.html import GroupPage, render_page
from reports.load import load_study
from reports.plots import AXES, pareto_figure, save_figure
from reports.reference import DEFAULT_REFERENCE, load_references
from reports.tables import display_table, to_csv, to_latex, to_markdown
from reports.tuning import tuning_views

__all__ = ["Report", "build_report", "default_out"]

MANIFEST = ".report-files"  # what the last report wrote in its folder (see _forget_stale)

_PLOT_CAPTIONS = {
    "params": "Test top-1 vs params reduction",
    "macs": "Test top-1 vs FLOPs nz (MACs on stored nonzeros) reduction",
    "speedup": "Test top-1 vs measured speedup",
}


@dataclass(frozen=True)
class Report:
    """What :func:`build_report` wrote.

    Attributes:
        out: The report folder.
        index: The HTML page.
        files: Every file written, sorted.
        summary: The summary table (see ``reports.aggregate``).
    """

    out: Path
    index: Path
    files: tuple[Path, ...]
    summary: pd.DataFrame


def default_out(study: str) -> Path:
    """``<results>/<study>/report`` (the study name made safe as a folder name)."""
    return results_dir() / safe_name(study) / "report"


def _write(path: Path, text: str, written: list[Path]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")
    written.append(path)


def build_report(
    study: str,
    *,
    tracking_uri: str | None = None,
    storage: str | None = None,
    out: Path | None = None,
    reference: Path | None = DEFAULT_REFERENCE,
) -> Report:
    """Read a study's runs and write its report.

    Args:
        study: Study name (== MLflow experiment name).
        tracking_uri: MLflow tracking URI; default ``bench.paths.default_tracking_uri()``.
        storage: Optuna storage URL overriding the parent runs' ``optuna_storage`` tags.
        out: Report folder; default :func:`default_out`.
        reference: Published numbers to show as reported rows; None for none.

    Returns:
        What was written.

    Raises:
        ReportError: unreachable store, unknown study, final runs without required metrics, or a
            broken reference file (nothing is written then).
    """
    uri = tracking_uri or default_tracking_uri()
    runs = load_study(study, uri)
    summary = summarize(runs, load_references(reference))
    out = Path(out) if out is not None else default_out(study)
    out.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    views = tuning_views(runs, out, storage)
    written += [p for v in views for p in v.files]
    pages = []
    for model, dataset in groups(summary):
        folder = inside(out, model, dataset)
        table = display_table(summary, model, dataset)
        _write(folder / "table.md", to_markdown(table), written)
        _write(folder / "table.tex", to_latex(table), written)
        _write(folder / "table.csv", to_csv(summary, model, dataset), written)
        rows = summary[(summary["model"] == model) & (summary["dataset"] == dataset)]
        plots = []
        for axis in AXES:
            fig = pareto_figure(rows, axis, f"{model} on {dataset}")
            if fig is not None:
                png, svg = save_figure(fig, folder / f"pareto_{axis}")
                written += [png, svg]
                plots.append((_PLOT_CAPTIONS[axis], png))
        mine = tuple(v for v in views if (v.model, v.dataset) == (model, dataset))
        files = sorted(p.relative_to(out).as_posix() for p in written if p.is_relative_to(folder))
        pages.append(GroupPage(table, tuple(plots), mine, tuple(files)))
    _write(out / "summary.csv", summary.round(6).to_csv(index=False, lineterminator="\n"), written)
    page = render_page(
        study,
        runs.tracking_uri,
        pages,
        runs.study_yaml,
        mask_credentials(storage) if storage else None,
        summary="summary.csv",
    )
    _write(out / "index.html", page, written)
    _forget_stale(out, written)
    return Report(out, out / "index.html", tuple(sorted(set(written))), summary)


def _forget_stale(out: Path, written: list[Path]) -> None:
    """Delete what the previous report in ``out`` wrote and this one did not (a method or group
    that is gone, a plot no longer drawn), then record this report's files in ``MANIFEST``.

    Only files listed in the previous manifest are candidates, and only inside ``out``: a user's
    own files there are never touched.
    """
    manifest = out / MANIFEST
    now = {p.relative_to(out).as_posix() for p in written} | {MANIFEST}
    before = manifest.read_text(encoding="utf-8").splitlines() if manifest.is_file() else []
    root = out.resolve()
    for name in sorted(set(before) - now, reverse=True):
        path = (out / name).resolve()
        if not name or not path.is_relative_to(root) or path == root or not path.is_file():
            continue
        path.unlink()
        for folder in path.parents:  # and the folders that this leaves empty
            if folder == root or not folder.is_relative_to(root) or any(folder.iterdir()):
                break
            folder.rmdir()
    _write(manifest, "".join(f"{name}\n" for name in sorted(now)), written)
