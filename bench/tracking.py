"""MLflow logging for the harness: one experiment per study, runs keyed by ``run_key``.

Written by hand on ``MlflowClient`` rather than through ``optuna_integration.MLflowCallback``
(deprecated) or the fluent API (one global active run; we nest parents, trials and finals).

Schema (the report generator reads exactly this; README "What is logged" documents it):
tags ``study, stage, model, dataset, seed, run_key, git_sha, worker`` on every run, plus ``method,
family, structured, ratio`` on compressed runs; params ``hp.<name>`` and recipe fields; metrics in
percent for accuracies. A run that raised is FAILED with a one-line ``error`` tag; one interrupted
is KILLED.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow logs its database migrations at INFO on first use; the sweep prints its own progress
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from bench.paths import results_dir
from bench.stores import prepare_tracking_store

# MLflow logs each database error it re-raises, traceback and all (a full disk: ~60 lines); the
# harness reports the error it gets in one line itself
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

__all__ = ["RunHandle", "Tracker", "TrackingError", "git_sha", "worker_id", "worker_is_dead"]

# MLflow 3's UI opens an experiment by its kind: without one it shows the GenAI overview (traces,
# none here); as model development, the runs table. The UI itself may store a guess ("..._inferred",
# "no_inferred_type"), which we replace; a kind a user picked stays.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _needs_kind(tags: Mapping[str, str]) -> bool:
    kind = tags.get(EXPERIMENT_KIND_TAG, "")
    return not kind or kind.endswith("_inferred") or kind == "no_inferred_type"


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used; the message is one line."""


def git_sha() -> str:
    """The repository's HEAD commit (``+dirty`` when the tree has changes), or "unknown"."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def worker_id() -> str:
    """``host:pid`` of this process: the ``worker`` tag of its runs and trials."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_is_dead(worker: str) -> bool:
    """``worker`` (a :func:`worker_id`) is a process of this host that no longer runs.

    Workers of other hosts (a shared store) are never called dead: their pids mean nothing here.
    """
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def _one_line(text: str, limit: int = 480) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class RunHandle:
    """One MLflow run: batched metric logging and small artifacts."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        """Log many metrics in one call (one call ~0.02 s vs ~0.7 s for 20 single ones)."""
        from mlflow.entities import Metric

        ts = mlflow.utils.time.get_current_time_millis()
        batch = [
            Metric(key, float(value), ts, step or 0)
            for key, value in metrics.items()
            if value is not None
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _one_line(v, 6000)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 90])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_rows(self, rows: list[Mapping[str, Any]], name: str) -> None:
        """A list of dicts as a CSV artifact (the per-layer table)."""
        if not rows:
            return
        keys = list(dict.fromkeys(k for row in rows for k in row))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        self.log_text(buf.getvalue(), name)

    def log_file(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_state_dict(self, state: Mapping[str, Any], name: str = "model_state.pt") -> None:
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            with open(path, "wb") as f:  # a Python file: a full disk raises OSError(ENOSPC)
                torch.save(dict(state), f)
            self.client.log_artifact(self.run_id, str(path))


class Tracker:
    """The study's experiment in one tracking store."""

    def __init__(self, uri: str, experiment: str, *, create: bool = True) -> None:
        """Open (and with ``create``, make) the study's experiment, tagged as model development
        (``mlflow.experimentKind``) so that the MLflow UI opens it on its runs.

        With ``create=False`` nothing is written: a missing store or experiment reads as empty
        (``--dry-run`` uses this). A damaged SQLite store raises :class:`bench.stores.StoreError`.
        """
        self.uri = uri
        self.experiment_name = experiment
        self.experiment_id: str | None = None
        if (
            not create
            and uri.startswith("sqlite:///")
            and not Path(uri.removeprefix("sqlite:///")).exists()
        ):
            self.client = None
            return
        # a SQLite store is built whole or checked first (bench.stores: never half-created)
        prepare_tracking_store(uri, create=create)
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                self.experiment_id = found.experiment_id
                if create and _needs_kind(found.tags):
                    self.client.set_experiment_tag(
                        self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                    )
            elif create:
                artifacts = None
                if uri.startswith("sqlite:///"):
                    artifacts = (results_dir() / "mlartifacts" / experiment).resolve().as_uri()
                self.experiment_id = self.client.create_experiment(
                    experiment,
                    artifact_location=artifacts,
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
        except Exception as err:  # mlflow raises many types for an unreachable store
            raise TrackingError(
                f"cannot use tracking store {uri}: {_one_line(err, 200)} "
                "(check --tracking-uri / MLFLOW_TRACKING_URI)"
            ) from None

    # ------------------------------------------------------------------------------- queries
    def runs(self, filter_string: str = "", statuses: tuple[str, ...] = ()) -> list:
        """All runs of the experiment matching an MLflow filter (paged through)."""
        if self.experiment_id is None:
            return []
        out, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=filter_string,
                max_results=1000,
                page_token=token,
            )
            out += [r for r in page if not statuses or r.info.status in statuses]
            token = page.token
            if not token:
                return out

    def finished(self, run_key: str):
        """The FINISHED run with this key, or None."""
        runs = self.runs(f"tags.run_key = '{run_key}'", statuses=("FINISHED",))
        return runs[0] if runs else None

    def mark_stale(self) -> int:
        """Mark KILLED the RUNNING runs whose worker process on this host is gone; returns how many.

        Runs of workers on other hosts (a shared tracking server) are left alone.
        """
        stale = 0
        for run in self.runs(statuses=("RUNNING",)):
            if worker_is_dead(run.data.tags.get("worker", "")):
                self.client.set_tag(run.info.run_id, "error", "process died; rerun resumes")
                self.client.set_terminated(run.info.run_id, status="KILLED")
                stale += 1
        return stale

    # -------------------------------------------------------------------------------- runs
    @contextlib.contextmanager
    def run(
        self,
        name: str,
        tags: Mapping[str, Any],
        params: Mapping[str, Any] | None = None,
        parent: RunHandle | None = None,
    ) -> Iterator[RunHandle]:
        """Start a run; FINISHED on success, FAILED (with an ``error`` tag) on an exception,
        KILLED on an interrupt. The exception propagates."""
        all_tags = {"worker": worker_id(), **{k: str(v) for k, v in tags.items()}}
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        handle = RunHandle(self.client, run.info.run_id)
        if params:
            handle.log_params(params)
        try:
            yield handle
        except (KeyboardInterrupt, SystemExit):
            self.client.set_tag(handle.run_id, "error", "interrupted; rerun resumes")
            self.client.set_terminated(handle.run_id, status="KILLED")
            raise
        except BaseException as err:
            # an exception may say the run ended normally (an Optuna-pruned trial: FINISHED)
            status = getattr(err, "run_status", "FAILED")
            tag = "error" if status == "FAILED" else "stopped"
            self.client.set_tag(handle.run_id, tag, _one_line(f"{type(err).__name__}: {err}"))
            self.client.set_terminated(handle.run_id, status=status)
            raise
        else:
            self.client.set_terminated(
                handle.run_id, status=RunStatus.to_string(RunStatus.FINISHED)
            )
