"""Read one study's runs from the MLflow tracking store into a pandas table (read only).

One row per run; columns ``run_id``, ``status``, ``start_time`` (ms since the epoch),
``parent_run_id`` and one column per tag, metric and param, named as MLflow's own ``search_runs``
names them: ``tags.<name>``, ``metrics.<name>`` (latest value), ``params.<name>``. Per-epoch
histories are not read: the report needs final values only.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import pandas as pd

from reports._common import ReportError, mask_credentials, one_line

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["StudyRuns", "load_study", "sqlite_path"]

_PAGE = 1000  # runs per search_runs page
_YAML_TRIES = (
    3  # runs whose artifacts are listed when looking for study.yaml (each is a round trip)
)


@dataclass(frozen=True)
class StudyRuns:
    """Every active run of one study.

    Attributes:
        study: The study (== MLflow experiment) name.
        tracking_uri: Where the runs were read (credentials masked).
        runs: One row per run, sorted by start time then run id (columns: see the module
            docstring).
        study_yaml: The resolved study config (``study_yaml`` tag or ``study.yaml`` artifact), if
            any.
    """

    study: str
    tracking_uri: str
    runs: pd.DataFrame
    study_yaml: str | None

    def stage(self, stage: str) -> pd.DataFrame:
        """The runs tagged ``stage=<stage>`` (a copy, same columns)."""
        if "tags.stage" not in self.runs:
            return self.runs.iloc[0:0].copy()
        return self.runs[self.runs["tags.stage"] == stage].copy()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for other schemes (and in-memory)."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite" or parsed.path in ("", "/", "/:memory:"):
        return None
    # sqlite:////abs/path -> path "//abs/path"; sqlite:///rel/path -> "/rel/path" (relative to cwd).
    return Path(unquote(parsed.path)[1:])


def _client(tracking_uri: str) -> MlflowClient:
    """An MLflow client on a store that must already exist (we never create one by reading).

    mlflow is imported here, not at the top: it takes seconds, and ``--help`` should not wait.
    """
    db = sqlite_path(tracking_uri)
    shown = mask_credentials(tracking_uri)
    if db is not None and not db.is_file():
        raise ReportError(
            f"tracking store {shown} does not exist: run a sweep first or pass --tracking-uri"
        )
    # MLflow and alembic announce schema checks at INFO level; a report prints only what matters.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def load_study(study: str, tracking_uri: str) -> StudyRuns:
    """Read every active run of ``study`` from ``tracking_uri``.

    Raises:
        ReportError: the store is unreachable, has no experiment named ``study``, or it has no runs.
    """
    shown = mask_credentials(tracking_uri)
    try:
        client = _client(tracking_uri)
        experiment = client.get_experiment_by_name(study)
        runs = [] if experiment is None else _search_all(client, experiment.experiment_id)
    except ReportError:
        raise
    # Any failure to talk to the store (bad file, refused connection, wrong schema) is the user's
    # to fix: MLflow raises MlflowException, SQLAlchemy and requests errors alike: catch them all.
    except Exception as error:
        raise ReportError(f"cannot read tracking store {shown}: {one_line(error)}") from None
    if experiment is None:
        raise ReportError(
            f"no study {study!r} in tracking store {shown}: check --study or --tracking-uri"
        )
    if not runs:
        raise ReportError(f"study {study!r} in {shown} has no runs yet: run the sweep first")
    frame = _frame(runs)
    return StudyRuns(study, shown, frame, _study_yaml(client, frame))


def _search_all(client: MlflowClient, experiment_id: str) -> list:
    """Every active run of the experiment (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=_PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _frame(runs: list) -> pd.DataFrame:
    records = []
    for run in runs:
        record = {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "start_time": run.info.start_time or 0,
            "parent_run_id": run.data.tags.get("mlflow.parentRunId"),
        }
        record.update({f"tags.{k}": v for k, v in run.data.tags.items()})
        record.update({f"metrics.{k}": float(v) for k, v in run.data.metrics.items()})
        record.update({f"params.{k}": v for k, v in run.data.params.items()})
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    frame = frame.reindex(columns=sorted(frame.columns))
    return frame.sort_values(["start_time", "run_id"], kind="stable").reset_index(drop=True)


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No download progress bar on stderr (MLflow reads this variable on every download)."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _study_yaml(client: MlflowClient, frame: pd.DataFrame) -> str | None:
    """The ``study_yaml`` tag of the first run with one, else the first ``study.yaml`` artifact."""
    if "tags.study_yaml" in frame:
        tagged = frame["tags.study_yaml"].dropna()
        if len(tagged):
            return str(tagged.iloc[0])
    for run_id in frame["run_id"].head(_YAML_TRIES):
        # Artifact stores differ (local, S3, HTTP proxy); a run without the file is not an error.
        try:
            names = {info.path for info in client.list_artifacts(run_id)}
            if "study.yaml" not in names:
                continue
            with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
                local = client.download_artifacts(run_id, "study.yaml", tmp)
                return Path(local).read_text(encoding="utf-8")
        except Exception:  # see above: the config is optional in the report
            continue
    return None
