"""The stores (``bench.stores``): a kill during their first creation leaves nothing broken, and a
store left broken by such a kill (before stores were built atomically) is repaired or refused in
one line, never silently extended.

The broken stores here are made the way they were made in the field: a process killed with
SIGKILL (``os._exit`` from SQLAlchemy's ``before_cursor_execute``) just before one statement of
the library's own schema creation runs.
"""

import contextlib
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

from bench.cli import main_guard
from bench.paths import sqlite_uri
from bench.stores import (
    StoreError,
    _checked,
    open_optuna_storage,
    prepare_tracking_store,
    reflect,
)
from bench.tracking import Tracker

ROOT = Path(__file__).resolve().parent.parent

# Run ``CODE`` in a fresh interpreter that dies (exit 9, as a SIGKILL would: no cleanup) just
# before the first SQL statement that contains ``MATCH`` (or the Nth statement, if MATCH is an int)
KILLER = """
import os, sys, sqlalchemy
from sqlalchemy import event
match, seen = {match!r}, [0]
@event.listens_for(sqlalchemy.engine.Engine, "before_cursor_execute")
def _die(conn, cursor, statement, *args):
    seen[0] += 1
    if (statement.startswith(match) if isinstance(match, str) else seen[0] == match):
        os._exit(9)
{code}
sys.exit(0)
"""


def run_killed(code: str, match) -> int:
    script = KILLER.format(match=match, code=textwrap.dedent(code))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=120)
    return proc.returncode


@pytest.fixture(autouse=True)
def _fresh_check_memo():
    """Each test opens its stores as a new process would (the check is memoised per process)."""
    _checked.clear()
    yield
    _checked.clear()


def index_names(path: Path, table: str) -> set[str]:
    con = sqlite3.connect(path)
    try:
        rows = con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (table,)
        )
        return {r[0] for r in rows}
    finally:
        con.close()


def broken_optuna_store(path: Path) -> str:
    """The store of issue 12: Optuna killed between ``CREATE TABLE studies`` and its unique index,
    then used by two sweeps that each added the same study again, with trials in both."""
    url = sqlite_uri(path)
    code = f"import optuna; optuna.storages.RDBStorage({url!r})"
    assert run_killed(code, "CREATE UNIQUE INDEX ix_studies_study_name") == 9
    assert "ix_studies_study_name" not in index_names(path, "studies")
    storage = optuna.storages.RDBStorage(url)  # plain Optuna does not notice ...
    for value in (1.0, 2.0):  # ... and each create_study(load_if_exists=True) adds a row
        with contextlib.suppress(optuna.exceptions.StorageInternalError):  # then fails on it
            storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "smoke/x/2")
        sid = max(s._study_id for s in storage.get_all_studies())
        trial_id = storage.create_new_trial(sid)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.COMPLETE, [value])
    storage.set_study_user_attr(sid, "fingerprint", "abc")  # only on the second copy
    storage.engine.dispose()
    con = sqlite3.connect(path)
    assert con.execute("SELECT COUNT(*) FROM studies").fetchone() == (2,)
    con.close()
    with pytest.raises(optuna.exceptions.StorageInternalError):
        optuna.load_study(study_name="smoke/x/2", storage=url)
    return url


def test_store_killed_in_optunas_schema_creation_is_repaired(tmp_path):
    url = broken_optuna_store(tmp_path / "optuna.db")
    said = []
    storage = open_optuna_storage(url, say=said.append)
    assert "ix_studies_study_name" in index_names(tmp_path / "optuna.db", "studies")
    (study,) = storage.get_all_studies()  # one study: the copies merged, trials kept in order
    loaded = optuna.load_study(study_name="smoke/x/2", storage=storage)
    assert [(t.number, t.value) for t in loaded.trials] == [(0, 1.0), (1, 2.0)]
    assert study.user_attrs == {"fingerprint": "abc"}
    assert any("stored 2 times: merged" in line for line in said)
    assert all(len(line.splitlines()) == 1 for line in said)
    # from now on the name is unique: Optuna itself refuses a second copy
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "smoke/x/2")


def test_dry_run_refuses_to_repair_in_one_line(tmp_path):
    url = broken_optuna_store(tmp_path / "optuna.db")
    with pytest.raises(StoreError, match=r"needs repair.*lacks its unique index on") as err:
        open_optuna_storage(url, create=False)
    assert len(str(err.value).splitlines()) == 1
    assert "ix_studies_study_name" not in index_names(tmp_path / "optuna.db", "studies")


def test_duplicates_that_cannot_be_merged_are_refused(tmp_path):
    url = broken_optuna_store(tmp_path / "optuna.db")
    con = sqlite3.connect(tmp_path / "optuna.db")
    con.execute("UPDATE study_directions SET direction = 'MINIMIZE' WHERE study_id = 2")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="2 times with different directions"):
        open_optuna_storage(url)


def test_a_kill_during_creation_leaves_no_store_and_the_rerun_builds_it_whole(tmp_path):
    path = tmp_path / "results" / "optuna.db"
    url = sqlite_uri(path)
    code = f"from bench.stores import open_optuna_storage; open_optuna_storage({url!r})"
    assert run_killed(code, "CREATE UNIQUE INDEX ix_studies_study_name") == 9
    assert not path.exists()  # the half-built store is a temp file beside it ...
    (leftover,) = path.parent.iterdir()
    assert leftover.name.endswith(".creating")
    storage = open_optuna_storage(url)
    assert [p.name for p in path.parent.iterdir()] == ["optuna.db"]  # ... removed by the next open
    assert "ix_studies_study_name" in index_names(path, "studies")
    assert storage.get_all_studies() == []


def test_mlflow_killed_during_its_migrations(tmp_path):
    # plain MLflow, killed among its ~1700 first statements: every reopen fails ...
    broken = tmp_path / "plain" / "mlflow.db"
    plain = sqlite_uri(broken)
    code = f"from mlflow.tracking import MlflowClient; MlflowClient({plain!r}).search_experiments()"
    assert run_killed(code, 40) == 9
    # (in a process of its own: MLflow keeps an engine per URI, on the file it first opened)
    reopen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert reopen.returncode == 1 and "duplicate column name: step" in reopen.stderr
    # ... bench.stores sees it, and as it holds no runs, moves it aside and builds a new one
    said = []
    prepare_tracking_store(plain, say=said.append)
    (line,) = said
    assert "half-created" in line and "held no runs: rebuilt" in line
    assert sorted(p.name for p in broken.parent.iterdir())[1].startswith("mlflow.db.broken-")
    assert MlflowClient(plain).search_experiments()
    # the sweep's own creation, killed at the same statement: nothing is left in place
    path = tmp_path / "ours" / "mlflow.db"
    uri = sqlite_uri(path)
    code = f"from bench.stores import prepare_tracking_store; prepare_tracking_store({uri!r})"
    assert run_killed(code, 40) == 9
    assert not path.exists()
    Tracker(uri, "smoke")  # the next start builds it whole
    assert reflect(sqlalchemy.create_engine(uri))["revision"] is not None


def test_damaged_mlflow_store_with_runs_is_refused_by_the_sweep(results, capsys):
    uri = sqlite_uri(results / "mlflow.db")
    tracker = Tracker(uri, "smoke")
    with tracker.run("r", {"stage": "final"}):
        pass
    con = sqlite3.connect(results / "mlflow.db")
    con.execute("DROP INDEX index_latest_metrics_run_uuid")
    con.close()
    _checked.clear()
    from bench.sweep import main

    assert main_guard(main, "bench.sweep")(["--study", "smoke", "--no-preflight"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "is damaged (table latest_metrics lacks its index on (run_uuid)" in err
    assert "holds 1 runs" in err and "mlflow db upgrade" in err


def test_a_storage_error_stops_the_fingerprint_check(tmp_path):
    from bench.runner import Sweep
    from bench.study import load_study
    from bench.tuning import Tuner

    url = sqlite_uri(tmp_path / "optuna.db")
    storage = open_optuna_storage(url)
    study = load_study("smoke", ("tuning.trials=2",))
    tuner = Tuner(Sweep(study, tracker=None), url, storage)
    assert tuner.study_name("l1_filter", 2) == "smoke/vgg16_bn_cifar/fashion-mnist/l1_filter/2"
    con = sqlite3.connect(tmp_path / "optuna.db")
    con.execute("DROP TABLE study_user_attributes")  # where the fingerprints live
    con.close()
    # before: "no studies", so the base name, whatever the fingerprint; now: an error
    with pytest.raises(StoreError, match="cannot read its studies to check their fingerprints"):
        tuner.study_name("l1_filter", 2)


def test_a_store_of_a_newer_optuna_is_refused_in_one_line(tmp_path):
    url = sqlite_uri(tmp_path / "optuna.db")
    open_optuna_storage(url)
    _checked.clear()
    con = sqlite3.connect(tmp_path / "optuna.db")
    con.execute("UPDATE alembic_version SET version_num = 'v9.9.9.a'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match=r"made by a newer Optuna \(schema v9.9.9.a\)") as err:
        open_optuna_storage(url)
    assert len(str(err.value).splitlines()) == 1
