"""From runs to one summary row per table row: means and stds over seeds, missing rows, references.

The summary is a tidy table (one row per (model, dataset, kind, ratio, method)); ``kind`` is
``baseline`` (the dense model), ``measured`` (final runs, aggregated over seeds), ``missing`` (a
(method, ratio) that was started but has no FINISHED final run; ``note`` says why) or ``reported``
(a published number from ``sweeps/reference.yaml``). Accuracies and reductions are in percent,
counts are plain numbers, stds are sample stds (ddof=1; NaN with one seed).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from reports._common import ReportError, family_key, ratio_key
from reports.load import StudyRuns
from reports.reference import Reference

__all__ = [
    "REQUIRED_FINAL_METRICS",
    "RUN_KEY",
    "SUMMARY_COLUMNS",
    "groups",
    "latest_per_key",
    "summarize",
    "with_tags",
]

REQUIRED_FINAL_METRICS = (
    "test_top1",
    "baseline_test_top1",
    "stored_params",
    "params_ratio",
    "macs",
    "macs_ratio",
    "speedup",
)
# A summary row: text columns (what the row is), numbers, then a text note.
_KEY_COLUMNS = ["model", "dataset", "kind", "ratio", "method", "family", "structured", "seeds"]
SUMMARY_COLUMNS = [
    *_KEY_COLUMNS,
    "n_seeds",
    "baseline_top1",
    "top1_mean",
    "top1_std",
    "delta_top1",
    "baseline_top5",
    "top5_mean",
    "top5_std",
    "params",
    "params_reduction",
    "macs",
    "macs_reduction",
    "speedup_mean",
    "speedup_std",
    "trials_used",
    "note",
]
_TEXT_COLUMNS = [*_KEY_COLUMNS, "note"]
RUN_KEY = ["tags.model", "tags.dataset", "tags.method", "tags.ratio"]
_TAGS = [*RUN_KEY] + [
    f"tags.{name}"
    for name in ("seed", "family", "structured", "error", "optuna_study", "optuna_storage")
]
# Display order of the blocks of a table; measured and missing rows interleave by ratio.
_BLOCK = {"baseline": 0, "measured": 1, "missing": 1, "reported": 2}


def with_tags(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every tag column the report reads, as text (missing tags read as "")."""
    frame = frame.copy()
    for column in _TAGS:
        frame[column] = frame[column].fillna("").astype(str) if column in frame else ""
    return frame


def _values(frame: pd.DataFrame, metric: str) -> np.ndarray:
    column = f"metrics.{metric}"
    if column not in frame:
        return np.full(len(frame), np.nan)
    return frame[column].to_numpy(dtype=float)


def _mean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else math.nan


def _std(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.std(ddof=1)) if len(values) >= 2 else math.nan


def _reduction(ratios: np.ndarray) -> np.ndarray:
    """Reduction in percent from a dense / compressed ratio: 1 - 1/ratio (ratio 4 -> 75 %)."""
    return 100.0 * (1.0 - 1.0 / ratios)


def _seed_order(seeds: pd.Series) -> list[str]:
    return sorted(
        set(seeds), key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s)
    )


def _latest_per_seed(frame: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """One run per seed: the latest (a rerun of a seed replaces it, never counts twice)."""
    frame = frame.sort_values(["start_time", "run_id"], kind="stable")
    return frame.drop_duplicates([*key, "tags.seed"], keep="last")


def _check_metrics(finals: pd.DataFrame) -> None:
    for _, run in finals.iterrows():
        lacking = [
            m for m in REQUIRED_FINAL_METRICS if not np.isfinite(run.get(f"metrics.{m}", np.nan))
        ]
        if lacking:
            raise ReportError(
                f"final run {run['run_id']} ({run['tags.method']}, ratio {run['tags.ratio']}, "
                f"seed {run['tags.seed']}) lacks metric(s) {', '.join(lacking)}: "
                "rerun its final stage"
            )


def _accuracy_block(runs: pd.DataFrame, baseline_top5: float) -> dict:
    top1, base1 = _values(runs, "test_top1"), _values(runs, "baseline_test_top1")
    top5 = _values(runs, "test_top5")
    return {
        "seeds": ",".join(_seed_order(runs["tags.seed"])),
        "n_seeds": len(runs),
        "baseline_top1": _mean(base1),
        "top1_mean": _mean(top1),
        "top1_std": _std(top1),
        "delta_top1": _mean(top1 - base1),
        "baseline_top5": baseline_top5,
        "top5_mean": _mean(top5),
        "top5_std": _std(top5),
    }


def _measured_row(runs: pd.DataFrame, parent: pd.Series | None, baselines: pd.DataFrame) -> dict:
    first = runs.iloc[0]
    base5 = _mean(_values(runs, "baseline_test_top5"))
    if not math.isfinite(base5) and len(baselines):
        # Older final runs log no baseline top-5: take it from the same seeds' baseline runs.
        same = baselines[baselines["tags.seed"].isin(set(runs["tags.seed"]))]
        base5 = _mean(_values(same, "test_top5"))
    speedup = _values(runs, "speedup")
    return {
        "kind": "measured",
        "family": first["tags.family"],
        "structured": first["tags.structured"].lower(),
        **_accuracy_block(runs, base5),
        "params": _mean(_values(runs, "stored_params")),
        "params_reduction": _mean(_reduction(_values(runs, "params_ratio"))),
        "macs": _mean(_values(runs, "macs")),
        "macs_reduction": _mean(_reduction(_values(runs, "macs_ratio"))),
        "speedup_mean": _mean(speedup),
        "speedup_std": _std(speedup),
        "trials_used": _trials(parent),
        "note": "",
    }


def _trials(parent: pd.Series | None) -> float:
    return math.nan if parent is None else float(parent.get("metrics.trials_used", math.nan))


def _missing_reason(attempts: pd.DataFrame, parent: pd.Series | None) -> str:
    if len(attempts):
        latest = attempts.sort_values(["start_time", "run_id"], kind="stable").iloc[-1]
        if latest["status"] == "FAILED":
            return f"final run FAILED: {latest['tags.error'] or 'no error tag'}"
        return f"final run {latest['status']}"
    if parent is not None and parent["status"] == "FAILED":
        return f"no final run (parent FAILED: {parent['tags.error'] or 'no error tag'})"
    return "no final run"


def _baseline_row(baselines: pd.DataFrame, finals: pd.DataFrame) -> dict | None:
    """The dense model: its baseline runs, else what the final runs logged about it."""
    if len(baselines):
        top1, top5 = _values(baselines, "test_top1"), _values(baselines, "test_top5")
        seeds, params, macs = (
            baselines["tags.seed"],
            _values(baselines, "params"),
            _values(baselines, "macs"),
        )
    elif len(finals):
        per_seed = finals.drop_duplicates("tags.seed")
        top1, top5 = (
            _values(per_seed, "baseline_test_top1"),
            _values(per_seed, "baseline_test_top5"),
        )
        seeds, params, macs = (
            per_seed["tags.seed"],
            _values(finals, "dense_params"),
            _values(finals, "dense_macs"),
        )
    else:
        return None
    return {
        "kind": "baseline",
        "method": "dense baseline",
        "seeds": ",".join(_seed_order(seeds)),
        "n_seeds": len(seeds),
        "top1_mean": _mean(top1),
        "top1_std": _std(top1),
        "top5_mean": _mean(top5),
        "top5_std": _std(top5),
        "params": _mean(params),
        "macs": _mean(macs),
        "params_reduction": 0.0,
        "macs_reduction": 0.0,
        "speedup_mean": 1.0,
        "note": "",
    }


def _reported_row(ref: Reference, families: dict[str, str]) -> dict:
    m = ref.metrics
    delta = m["top1"] - m["baseline_top1"] if {"top1", "baseline_top1"} <= set(m) else math.nan
    named = " on ".join(x for x in (ref.paper_model, ref.paper_dataset) if x)
    return {
        "kind": "reported",
        "method": ref.method,
        "family": families.get(ref.method, ""),
        "baseline_top1": m.get("baseline_top1", math.nan),
        "top1_mean": m.get("top1", math.nan),
        "delta_top1": delta,
        "baseline_top5": m.get("baseline_top5", math.nan),
        "top5_mean": m.get("top5", math.nan),
        "params": m.get("params", math.nan),
        "params_reduction": m.get("params_reduction", math.nan),
        "macs": m.get("macs", math.nan),
        "macs_reduction": m.get("macs_reduction", math.nan),
        "speedup_mean": m.get("speedup", math.nan),
        "note": f"{ref.paper}" + (f" ({named})" if named else "") + f"; {ref.source}",
    }


def _where(frame: pd.DataFrame, columns: list[str], values: tuple[str, ...]) -> pd.DataFrame:
    """The rows of ``frame`` whose ``columns`` equal ``values``."""
    keep = np.ones(len(frame), dtype=bool)
    for column, value in zip(columns, values):
        keep &= (frame[column] == value).to_numpy()
    return frame[keep]


def latest_per_key(frame: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """One run per ``key``: the FINISHED run started last, else the run started last."""
    ranked = frame.assign(_done=frame["status"] == "FINISHED")
    ranked = ranked.sort_values(["_done", "start_time", "run_id"], kind="stable")
    return ranked.drop_duplicates(key, keep="last").drop(columns="_done")


def _latest(frame: pd.DataFrame) -> pd.Series | None:
    """The run :func:`latest_per_key` picks from runs sharing one key; None for no runs."""
    return latest_per_key(frame, RUN_KEY).iloc[-1] if len(frame) else None


def summarize(study: StudyRuns, references: list[Reference]) -> pd.DataFrame:
    """The summary table of a study (columns :data:`SUMMARY_COLUMNS`), sorted for display.

    Raises:
        ReportError: a FINISHED final run lacks one of :data:`REQUIRED_FINAL_METRICS`.
    """
    finals_all = with_tags(study.stage("final"))
    finals = _latest_per_seed(finals_all[finals_all["status"] == "FINISHED"], RUN_KEY)
    _check_metrics(finals)
    parents = with_tags(study.stage("parent"))
    baselines = with_tags(study.stage("baseline"))
    baselines = _latest_per_seed(baselines[baselines["status"] == "FINISHED"], RUN_KEY[:2])

    rows: list[dict] = []
    keys = {tuple(k) for frame in (finals, parents) for k in frame[RUN_KEY].to_numpy()}
    for key in keys:
        model, dataset, method, ratio = key
        parent = _latest(_where(parents, RUN_KEY, key))
        runs = _where(finals, RUN_KEY, key)
        if len(runs):
            row = _measured_row(runs, parent, _where(baselines, RUN_KEY[:2], key[:2]))
        else:
            row = {
                "kind": "missing",
                "family": parent["tags.family"],
                "structured": parent["tags.structured"].lower(),
                "trials_used": _trials(parent),
                "note": _missing_reason(_where(finals_all, RUN_KEY, key), parent),
            }
        rows.append({"model": model, "dataset": dataset, "method": method, "ratio": ratio, **row})

    datasets = {tuple(k) for k in baselines[RUN_KEY[:2]].to_numpy()} | {
        (r["model"], r["dataset"]) for r in rows
    }
    families = {r["method"]: r["family"] for r in rows if r.get("family")}
    for model, dataset in datasets:
        where = (RUN_KEY[:2], (model, dataset))
        base = _baseline_row(_where(baselines, *where), _where(finals, *where))
        if base is not None:
            rows.append({"model": model, "dataset": dataset, "ratio": "", **base})
        for ref in references:
            if (ref.model, ref.dataset) == (model, dataset):
                reported = _reported_row(ref, families)
                rows.append({"model": model, "dataset": dataset, "ratio": "", **reported})
    return _frame(rows)


def _display_key(row: dict) -> tuple:
    """Tables list the baseline, then by ratio, family and method, then the reported rows."""
    block = _BLOCK[row["kind"]]
    by_ratio = block == 1
    return (
        row["model"],
        row["dataset"],
        block,
        ratio_key(row["ratio"]) if by_ratio else (0, 0.0, ""),
        family_key(row.get("family", "")) if by_ratio else (0, ""),
        row["method"],
        row.get("note", ""),
    )


def _frame(rows: list[dict]) -> pd.DataFrame:
    summary = pd.DataFrame.from_records(sorted(rows, key=_display_key), columns=SUMMARY_COLUMNS)
    for column in _TEXT_COLUMNS:
        summary[column] = summary[column].fillna("").astype(str)
    for column in ("n_seeds", "trials_used"):
        summary[column] = pd.to_numeric(summary[column]).round().astype("Int64")
    return summary


def groups(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """The (model, dataset) pairs of a summary, sorted."""
    return sorted({(m, d) for m, d in summary[["model", "dataset"]].to_numpy()})
