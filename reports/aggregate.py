"""From runs to one summary row per table row: means and stds over seeds, missing rows, references.

The summary is a tidy table (one row per (model, dataset, kind, ratio, method, pareto_index));
``kind`` is ``baseline`` (the dense model), ``measured`` (final runs, aggregated over seeds),
``missing`` (a (method, ratio) that was started but has no FINISHED final run that met its target;
``note`` says why) or ``reported`` (a published number from ``sweeps/reference.yaml``). Accuracies
and reductions are in percent, counts are plain numbers, stds are sample stds (ddof=1; NaN with one
seed).

Which runs count: per (method, ratio, Pareto point, seed) the FINISHED final run started last (a
rerun replaces the run before it, never counts twice; nothing recorded is deleted). With
``tuning.mode: pareto`` every point of the front is a row of its own (``pareto_index``, 0-based).
A finished final whose achieved params ratio misses its target (recorded before the harness
checked targets) never counts: its numbers do not belong under that ratio. ``code_versions`` says
which code (``code_version`` tags: harness version and method fingerprint) made the runs of a row,
as ``version:runs`` pairs joined by ``;``.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd

from reports._common import ReportError, family_key, pareto_key, ratio_key
from reports.load import StudyRuns
from reports.reference import Reference

__all__ = [
    "REQUIRED_FINAL_METRICS",
    "ROW_KEY",
    "RUN_KEY",
    "SUMMARY_COLUMNS",
    "TARGET_TOLERANCE",
    "UNVERSIONED",
    "case_columns",
    "code_versions",
    "groups",
    "latency_setting",
    "latest_per_key",
    "summarize",
    "target_miss",
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
_KEY_COLUMNS = [
    "model",
    "dataset",
    "kind",
    "ratio",
    "method",
    "pareto_index",
    "family",
    "structured",
    "seeds",
]
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
    "params_ratio",
    "params_reduction",
    "macs",
    "macs_reduction",
    "macs_nz",
    "macs_nz_reduction",
    "speedup_mean",
    "speedup_std",
    "latency_setting",
    "compress_s",
    "compress_epochs",
    "trials_used",
    "deployed",
    "code_versions",
    "note",
]
_TEXT_COLUMNS = [*_KEY_COLUMNS, "latency_setting", "deployed", "code_versions", "note"]
# Per latency case (bench.footprint.LatencyCase.key, "onnxruntime.cpu.b1"): metrics
# "speedup.<key>"; a summary column "speedup.<key>" (mean over seeds) for each case besides the
# headline, after SUMMARY_COLUMNS.
CASE_PREFIX = "speedup."
RUN_KEY = ["tags.model", "tags.dataset", "tags.method", "tags.ratio"]
ROW_KEY = [*RUN_KEY, "tags.pareto_index"]  # a table row: a Pareto point of its own
_TAGS = [*ROW_KEY] + [
    f"tags.{name}"
    for name in (
        "seed",
        "family",
        "structured",
        "deployed",
        "error",
        "optuna_study",
        "optuna_storage",
        "code_version",
        "latency_device",
        "latency_backend",
        "latency_batch",
        "latency_threads",
        "latency_cases",
    )
]
# methods.base.Target's tolerance of the achieved params ratio (reports never import torch)
TARGET_TOLERANCE = 0.02
UNVERSIONED = "unversioned"  # runs recorded before the code_version tag
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


def target_miss(run: pd.Series) -> str:
    """Why a final run's achieved params ratio misses its target ("" when it meets it, or when
    it logged no ratio: :func:`_check_metrics` reports that). The finals' check of the harness
    (``bench.compressed.target_miss``): a ratio within :data:`TARGET_TOLERANCE` either side; per-
    layer rates compress at all."""
    achieved, label = float(run.get("metrics.params_ratio", math.nan)), run["tags.ratio"]
    if not math.isfinite(achieved):
        return ""
    try:
        ratio = float(label)
    except ValueError:  # "rates:...": no ratio set
        return "" if achieved > 1.0 else f"params ratio {achieved:.2f} for layer rates"
    if abs(achieved / ratio - 1.0) <= TARGET_TOLERANCE + 1e-9:
        return ""
    return f"params ratio {achieved:.3f} for target {label} (outside {TARGET_TOLERANCE:.0%})"


def code_versions(runs: pd.DataFrame) -> str:
    """``version:runs`` pairs of the runs' ``code_version`` tags, sorted, joined by ``;``."""
    counts = Counter(v or UNVERSIONED for v in runs["tags.code_version"])
    return ";".join(f"{version}:{n}" for version, n in sorted(counts.items()))


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
    headline = {case.split(",")[0] for case in runs["tags.latency_cases"]}
    cases = {
        column.removeprefix("metrics.")
        for column in runs.columns
        if column.startswith(f"metrics.{CASE_PREFIX}") and runs[column].notna().any()
    } - {f"{CASE_PREFIX}{h}" for h in headline}
    return {
        "kind": "measured",
        "family": first["tags.family"],
        "structured": first["tags.structured"].lower(),
        **_accuracy_block(runs, base5),
        "params": _mean(_values(runs, "stored_params")),
        "params_ratio": _mean(_values(runs, "params_ratio")),
        "params_reduction": _mean(_reduction(_values(runs, "params_ratio"))),
        "macs": _mean(_values(runs, "macs")),
        "macs_reduction": _mean(_reduction(_values(runs, "macs_ratio"))),
        # runs logged before macs_nz: their MACs (what they executed) stand in
        "macs_nz": _mean(_values_or(runs, "macs_nz", "macs")),
        "macs_nz_reduction": _mean(_reduction(_values_or(runs, "macs_nz_ratio", "macs_ratio"))),
        "speedup_mean": _mean(speedup),
        "speedup_std": _std(speedup),
        "latency_setting": latency_setting(runs),
        **{case: _mean(_values(runs, case)) for case in sorted(cases)},
        # the compression cost: NaN for runs recorded before the harness timed its steps
        "compress_s": _mean(_values(runs, "time_compress_s")),
        "compress_epochs": _mean(_values(runs, "compress_epochs")),
        "trials_used": _trials(parent),
        "deployed": first["tags.deployed"],
        "code_versions": code_versions(runs),
        "note": "",
    }


def latency_setting(runs: pd.DataFrame) -> str:
    """What the headline speedup of ``runs`` was measured on, from their ``latency_*`` tags:
    "torch on cpu, batch 32, 2 threads" ("" for runs recorded before those tags; settings that
    differ between runs are joined by " / ")."""
    settings = []
    for _, run in runs.iterrows():
        if run["tags.latency_backend"]:
            settings.append(
                f"{run['tags.latency_backend']} on {run['tags.latency_device']}, batch "
                f"{run['tags.latency_batch']}, {run['tags.latency_threads']} threads"
            )
    return " / ".join(sorted(set(settings)))


def _values_or(runs: pd.DataFrame, metric: str, fallback: str) -> np.ndarray:
    """``metric`` of each run, ``fallback`` where a run did not log it (older runs)."""
    values = _values(runs, metric)
    return np.where(np.isnan(values), _values(runs, fallback), values)


def _trials(parent: pd.Series | None) -> float:
    return math.nan if parent is None else float(parent.get("metrics.trials_used", math.nan))


def _missing_reason(attempts: pd.DataFrame, parent: pd.Series | None) -> str:
    if len(attempts):
        latest = attempts.sort_values(["start_time", "run_id"], kind="stable").iloc[-1]
        if latest["status"] == "FAILED":
            return f"final run FAILED: {latest['tags.error'] or 'no error tag'}"
        if latest["status"] == "FINISHED":  # it counts only when it met its target
            return f"final run missed its target: {target_miss(latest)}"
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
        "macs_nz": _mean(macs),  # the dense model stores no zeros
        "params_reduction": 0.0,
        "macs_reduction": 0.0,
        "macs_nz_reduction": 0.0,
        "speedup_mean": 1.0,
        "code_versions": code_versions(baselines) if len(baselines) else "",
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
        "macs_nz": m.get("macs_nz", math.nan),
        "macs_nz_reduction": m.get("macs_nz_reduction", math.nan),
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
    finished = finals_all[finals_all["status"] == "FINISHED"]
    on_target = np.array([not target_miss(run) for _, run in finished.iterrows()], dtype=bool)
    finals = _latest_per_seed(finished[on_target], ROW_KEY)
    _check_metrics(finals)
    parents = with_tags(study.stage("parent"))
    baselines = with_tags(study.stage("baseline"))
    baselines = _latest_per_seed(baselines[baselines["status"] == "FINISHED"], RUN_KEY[:2])

    rows: list[dict] = []
    keys = {tuple(k) for frame in (finals_all, parents) for k in frame[RUN_KEY].to_numpy()}
    for key in keys:
        model, dataset, method, ratio = key
        parent = _latest(_where(parents, RUN_KEY, key))
        attempts = _where(finals_all, RUN_KEY, key)
        for point in set(attempts["tags.pareto_index"]) or {""}:  # "": not a Pareto point
            runs = _where(finals, ROW_KEY, (*key, point))
            if len(runs):
                row = _measured_row(runs, parent, _where(baselines, RUN_KEY[:2], key[:2]))
            else:
                tried = _where(attempts, ["tags.pareto_index"], (point,))
                about = parent if parent is not None else tried.iloc[-1]
                row = {
                    "kind": "missing",
                    "family": about["tags.family"],
                    "structured": about["tags.structured"].lower(),
                    "trials_used": _trials(parent),
                    "note": _missing_reason(tried, parent),
                }
            where = {"model": model, "dataset": dataset, "method": method, "ratio": ratio}
            rows.append({**where, "pareto_index": point, **row})

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
        pareto_key(row.get("pareto_index", "")),
        row.get("note", ""),
    )


def case_columns(frame: pd.DataFrame) -> list[str]:
    """The per-latency-case speedup columns of a summary (``speedup.<case key>``), sorted."""
    return sorted(c for c in frame.columns if c.startswith(CASE_PREFIX))


def _frame(rows: list[dict]) -> pd.DataFrame:
    extra = sorted({k for row in rows for k in row if k.startswith(CASE_PREFIX)})
    summary = pd.DataFrame.from_records(
        sorted(rows, key=_display_key), columns=[*SUMMARY_COLUMNS, *extra]
    )
    for column in _TEXT_COLUMNS:
        summary[column] = summary[column].fillna("").astype(str)
    for column in ("n_seeds", "trials_used"):
        summary[column] = pd.to_numeric(summary[column]).round().astype("Int64")
    return summary


def groups(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """The (model, dataset) pairs of a summary, sorted."""
    return sorted({(m, d) for m, d in summary[["model", "dataset"]].to_numpy()})
