"""The sweep's two stores (MLflow tracking, Optuna tuning), created, migrated and checked once,
before any run starts (``docs/design.md`` "One sweep, start to end", point 1).

Why: both libraries create their schema lazily, one DDL statement at a time, and SQLite commits
each ``CREATE`` on its own. A process killed between Optuna's ``CREATE TABLE studies`` and its
``CREATE UNIQUE INDEX ix_studies_study_name`` left a store that SQLAlchemy's ``create_all`` never
completes (it skips existing tables, indexes included); every later ``create_study(...,
load_if_exists=True)`` then inserted one more row of the same name and ``load_study`` failed for
good. MLflow's first creation runs ~90 migrations (~1700 statements): killed among them, the
store fails on every reopen (``duplicate column name``, ``table _alembic_tmp_... already exists``).

So:

- a new SQLite store is built whole in a temp file beside its place, then linked into place
  (``os.link``: atomic, and never over a store another process made meanwhile); a kill leaves
  either no store or a complete one;
- an existing store is checked on open: its alembic revision, and its tables, columns and
  indexes against those of a store the library itself just created (built once per library
  version, cached in ``~/.cache/freqbench``; SQLAlchemy inspection on both sides);
- a damaged Optuna store is repaired where that is safe: studies of one name merged into the
  oldest (their trials renumbered in order), then the missing tables and indexes created; an
  older Optuna schema is migrated (Optuna's own alembic upgrade). A damaged store that holds no
  runs or studies is moved aside and rebuilt; anything else is refused with one line saying what
  to do (:class:`StoreError`, exit 2).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy

from bench.paths import sqlite_uri

__all__ = [
    "StoreError",
    "open_optuna_storage",
    "open_stores",
    "prepare_tracking_store",
    "remove_leftovers",
    "schema_problems",
]

# Store URIs already checked by this process: the sweep checks once up front, and Tracker,
# reports or bench.ui opening the same store again do not pay for it twice
_checked: set[str] = set()


class StoreError(Exception):
    """A store is damaged or cannot be opened; the message is one line saying what to do."""


def _one_line(err: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


# ------------------------------------------------------------------------ schema comparison
Schema = dict  # {"revision": str | None, "tables": {table: {"columns": [...], "keys": [...]}}}


def reflect(engine: sqlalchemy.engine.Engine) -> Schema:
    """Tables, their columns and keys (``[unique, [columns]]``: primary key, unique constraints
    and indexes alike, so that dialects that report one as the other compare equal) and the
    alembic revision, by SQLAlchemy inspection."""
    insp = sqlalchemy.inspect(engine)
    tables = {}
    for table in insp.get_table_names():
        keys = set()
        pk = insp.get_pk_constraint(table).get("constrained_columns") or []
        if pk:
            keys.add((True, tuple(pk)))
        for uc in insp.get_unique_constraints(table):
            keys.add((True, tuple(uc["column_names"])))
        for ix in insp.get_indexes(table):
            keys.add((bool(ix["unique"]), tuple(c for c in ix["column_names"] if c)))
        columns = sorted(c["name"] for c in insp.get_columns(table))
        tables[table] = {"columns": columns, "keys": sorted([u, list(c)] for u, c in keys)}
    revision = None
    if "alembic_version" in tables:
        with engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version"))
            revision = ",".join(sorted(r[0] for r in rows)) or None
    return {"revision": revision, "tables": tables}


def schema_problems(found: Schema, reference: Schema) -> list[str]:
    """What ``found`` lacks of ``reference`` (extra tables, columns and indexes are fine), and
    leftovers of an interrupted migration; [] when the store is whole."""
    problems = []
    tables = found["tables"]
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if leftovers:
        problems.append(f"an interrupted migration left {', '.join(leftovers)}")
    if found["revision"] != reference["revision"]:
        problems.append(
            f"schema revision {found['revision']} (this library creates {reference['revision']})"
        )
    for name, want in sorted(reference["tables"].items()):
        if name not in tables:
            problems.append(f"no table {name}")
            continue
        have = tables[name]
        missing = sorted(set(want["columns"]) - set(have["columns"]))
        if missing:
            problems.append(f"table {name} lacks columns {', '.join(missing)}")
        have_keys = {(u, tuple(c)) for u, c in have["keys"]}
        for unique, cols in want["keys"]:
            key = (unique, tuple(cols))
            if key in have_keys or (not unique and (True, key[1]) in have_keys):
                continue
            kind = "unique index" if unique else "index"
            problems.append(f"table {name} lacks its {kind} on ({', '.join(cols)})")
    return problems


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "freqbench" / "schemas"


def _cache_path(kind: str, version: str) -> Path:
    return _cache_dir() / f"{kind}-{version}.json"


def _remember(kind: str, version: str, uri: str) -> Schema:
    """Reflect the store the library just built at ``uri`` and cache it as the reference."""
    engine = sqlalchemy.create_engine(uri)
    try:
        schema = reflect(engine)
    finally:
        engine.dispose()
    path = _cache_path(kind, version)
    with contextlib.suppress(OSError):  # no cache (read-only home): rebuilt next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = path.with_suffix(f".{os.getpid()}.tmp")
        tmp_path.write_text(json.dumps(schema, sort_keys=True))
        os.replace(tmp_path, path)
    return schema


def _reference(kind: str, version: str, build: Callable[[str], None]) -> Schema:
    """The schema the library creates (``build(uri)`` makes a fresh store at ``uri``), reflected
    once per library version and cached on disk (every new store we build refreshes it);
    MLflow's takes ~5 s to build."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads(_cache_path(kind, version).read_text())
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        uri = sqlite_uri(Path(tmp) / "reference.db")
        build(uri)
        return _remember(kind, version, uri)


# ------------------------------------------------------------------ creating SQLite stores
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(path: Path, kind: str) -> None:
    """Remove the temp files ``.NAME.PID.KIND*`` that processes killed while writing ``path``
    left beside it (those of live processes are still being written)."""
    for tmp in path.parent.glob(f".{path.name}.*.{kind}*"):
        pid = tmp.name.removeprefix(f".{path.name}.").split(".")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _create_sqlite(path: Path, build: Callable[[str], None]) -> bool:
    """Build a store at a temp path beside ``path``, then link it into place; False when
    another process created ``path`` meanwhile (its store is kept, ours dropped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path, "creating")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.creating")
    try:
        build(sqlite_uri(tmp))
        for suffix in ("-wal", "-journal"):  # a whole store is one file once its engine closed
            if Path(f"{tmp}{suffix}").exists():
                raise StoreError(f"building {path}: {tmp}{suffix} was left open")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: replace, if still absent
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        for leftover in (tmp, Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    return aside


def _count(engine: sqlalchemy.engine.Engine, table: str) -> int:
    """Rows of ``table`` (0 when it does not exist)."""
    if table not in sqlalchemy.inspect(engine).get_table_names():
        return 0
    with engine.connect() as conn:
        return conn.execute(sqlalchemy.text(f'SELECT COUNT(*) FROM "{table}"')).scalar_one()


# ----------------------------------------------------------------------------------- MLflow
@contextlib.contextmanager
def _quiet(*loggers: str):
    """The libraries log each creation step at INFO; the sweep prints its own progress."""
    saved = [(log, log.level) for log in map(logging.getLogger, loggers)]
    for log, _ in saved:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for log, level in saved:
            log.setLevel(level)


def _build_mlflow(uri: str) -> None:
    import mlflow
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    with _quiet("mlflow.store.db.utils", "alembic"):
        store = SqlAlchemyStore(uri, DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
    store.engine.dispose()
    if not _cache_path("mlflow", mlflow.__version__).exists():  # spares a reference build later
        _remember("mlflow", mlflow.__version__, uri)


def _mlflow_reference() -> Schema:
    import mlflow

    return _reference("mlflow", mlflow.__version__, _build_mlflow)


def prepare_tracking_store(uri: str, *, create: bool = True, say=print) -> None:
    """Make sure the MLflow store at ``uri`` is whole before anything is logged to it.

    A missing SQLite store is built atomically (``create``; without it nothing is written and a
    missing store stays missing); an existing one is checked against the schema MLflow creates.
    A damaged store with no runs is moved aside and rebuilt; one with runs is refused
    (:class:`StoreError`). Other URIs (a tracking server) are the server's business.
    """
    path = _sqlite_path(uri)
    if path is None or uri in _checked:
        return
    if not path.exists():
        if create:
            _create_sqlite(path, _build_mlflow)
            _checked.add(uri)
        return
    engine = sqlalchemy.create_engine(uri)
    try:
        problems = schema_problems(reflect(engine), _mlflow_reference())
        runs = _count(engine, "runs") if problems else 0
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise StoreError(f"tracking store {uri} cannot be read: {_one_line(err)}") from None
    finally:
        engine.dispose()
    if problems:
        what = "; ".join(problems[:3]) + (
            f"; {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        if runs or not create:
            raise StoreError(
                f"tracking store {uri} is damaged ({what}; it holds {runs} runs): back it up, then "
                f"run `mlflow db upgrade {uri}`, or move it away and rerun to start a new store"
            )
        aside = _move_aside(path)
        _create_sqlite(path, _build_mlflow)
        say(f"tracking store {path} was half-created ({what}) and held no runs: rebuilt ({aside})")
    _checked.add(uri)


# ----------------------------------------------------------------------------------- Optuna
def _build_optuna(uri: str) -> None:
    import optuna

    with _quiet("optuna"):
        storage = optuna.storages.RDBStorage(uri)
    storage.scoped_session.remove()
    storage.engine.dispose()


def _optuna_reference() -> Schema:
    import optuna

    return _reference("optuna", optuna.__version__, _build_optuna)


def _merge_duplicate_studies(engine: sqlalchemy.engine.Engine, url: str, say) -> int:
    """Merge studies that share a name into the oldest one (trials moved and renumbered by their
    order of creation; attributes the oldest lacks copied); returns how many rows went."""
    text = sqlalchemy.text
    merged = 0
    with engine.begin() as conn:
        dupes = conn.execute(
            text("SELECT study_name FROM studies GROUP BY study_name HAVING COUNT(*) > 1")
        ).scalars()
        for name in list(dupes):
            ids = conn.execute(
                text("SELECT study_id FROM studies WHERE study_name = :n ORDER BY study_id"),
                {"n": name},
            ).scalars()
            keep, *others = list(ids)

            def directions(sid):
                return conn.execute(
                    text(
                        "SELECT objective, direction FROM study_directions "
                        "WHERE study_id = :s ORDER BY objective"
                    ),
                    {"s": sid},
                ).all()

            for sid in others:
                if directions(sid) and directions(sid) != directions(keep):
                    raise StoreError(
                        f"Optuna storage {url} holds study {name!r} {len(others) + 1} times with "
                        "different directions: delete the wrong ones "
                        f"(`optuna delete-study --storage {url}`) or move the store away"
                    )
                for table in ("study_user_attributes", "study_system_attributes"):
                    conn.execute(
                        text(
                            f"INSERT INTO {table} (study_id, key, value_json) "
                            f"SELECT :keep, key, value_json FROM {table} AS o WHERE o.study_id = :s"
                            f" AND key NOT IN (SELECT key FROM {table} WHERE study_id = :keep)"
                        ),
                        {"keep": keep, "s": sid},
                    )
                    conn.execute(text(f"DELETE FROM {table} WHERE study_id = :s"), {"s": sid})
                conn.execute(text("DELETE FROM study_directions WHERE study_id = :s"), {"s": sid})
                conn.execute(
                    text("UPDATE trials SET study_id = :keep WHERE study_id = :s"),
                    {"keep": keep, "s": sid},
                )
                conn.execute(text("DELETE FROM studies WHERE study_id = :s"), {"s": sid})
                merged += 1
            # Optuna numbers a study's trials 0, 1, ... in order of creation (trial_id)
            trial_ids = conn.execute(
                text("SELECT trial_id FROM trials WHERE study_id = :k ORDER BY trial_id"),
                {"k": keep},
            ).scalars()
            for number, trial_id in enumerate(list(trial_ids)):
                conn.execute(
                    text("UPDATE trials SET number = :n WHERE trial_id = :t"),
                    {"n": number, "t": trial_id},
                )
            say(f"Optuna storage: study {name!r} was stored {len(others) + 1} times: merged")
    return merged


def _repair_optuna(engine, url: str, problems: list[str], say) -> None:
    """Merge duplicate studies, then create what ``create_all`` skips: the indexes of tables
    that exist. Refuse (one line) what cannot be repaired in place."""
    from optuna.storages._rdb import models

    unfixable = [p for p in problems if not p.startswith("no table ") and "lacks its" not in p]
    if unfixable:
        raise StoreError(
            f"Optuna storage {url} is damaged ({'; '.join(unfixable[:3])}): move it away and "
            "rerun (tuning starts over), or pass --storage with another store"
        )
    _merge_duplicate_studies(engine, url, say)
    models.BaseModel.metadata.create_all(engine)  # missing tables, with their indexes
    existing = {
        ix["name"]
        for t in sqlalchemy.inspect(engine).get_table_names()
        for ix in sqlalchemy.inspect(engine).get_indexes(t)
    }
    for table in models.BaseModel.metadata.sorted_tables:
        for index in table.indexes:
            if index.name not in existing:
                index.create(engine)
                say(f"Optuna storage: index {index.name} was missing: created")


def open_optuna_storage(url: str, *, create: bool = True, say=print):
    """The Optuna ``RDBStorage`` at ``url``, whole: built atomically when it is a missing
    SQLite file (``create``; without it, None), else checked against the schema Optuna creates,
    migrated and repaired where safe (``create``; without it, a store that needs either is
    refused), or refused with one line (:class:`StoreError`)."""
    import optuna

    path = _sqlite_path(url)
    kwargs = {}
    if path is None:  # several machines: a dead worker's trials go stale after the grace period
        kwargs = {"heartbeat_interval": 60, "grace_period": 180}
    try:
        if path is not None and not path.exists():
            if not create:
                return None
            _create_sqlite(path, _build_optuna)
        elif url not in _checked:
            _check_optuna(url, create, say)
        storage = optuna.storages.RDBStorage(url, **kwargs)
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise StoreError(f"Optuna storage {url} cannot be used: {_one_line(err)}") from None
    except RuntimeError as err:  # Optuna's "no longer compatible with the table schema"
        raise StoreError(f"Optuna storage {url}: {_one_line(err, 300)}") from None
    _checked.add(url)
    return storage


def _check_optuna(url: str, create: bool, say) -> None:
    """Migrate an older schema, then repair what the store lacks (see :func:`_repair_optuna`)."""
    import optuna

    reference = _optuna_reference()
    engine = sqlalchemy.create_engine(url)
    try:
        found = reflect(engine)
        revision = found["revision"]
        if revision is not None and revision != reference["revision"]:
            if not create:
                raise StoreError(
                    f"Optuna storage {url} has schema {revision}, not {reference['revision']}: "
                    "run the sweep without --dry-run to migrate it"
                )
            storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True)
            if revision not in storage.get_all_versions():
                raise StoreError(
                    f"Optuna storage {url} was made by a newer Optuna (schema {revision}): "
                    "upgrade optuna (`pip install -U optuna`) or pass --storage with another store"
                )
            storage.upgrade()
            storage.engine.dispose()
            say(f"Optuna storage {url}: schema migrated from {revision} to {reference['revision']}")
            found = reflect(engine)
        # no revision at all: killed before Optuna stamped it; RDBStorage stamps it on open
        problems = [p for p in schema_problems(found, reference) if "schema revision" not in p]
        if problems and not create:
            raise StoreError(
                f"Optuna storage {url} needs repair ({'; '.join(problems[:3])}): "
                "run the sweep without --dry-run to repair it"
            )
        if problems:
            _repair_optuna(engine, url, problems, say)
    finally:
        engine.dispose()


def open_stores(tracking_uri: str, optuna_url: str | None, *, create: bool = True, say=print):
    """Both stores of a sweep, created, migrated and checked before any run; returns the Optuna
    storage (None when ``optuna_url`` is None, or with ``create=False`` when it does not exist).
    """
    prepare_tracking_store(tracking_uri, create=create, say=say)
    if optuna_url is None:
        return None
    return open_optuna_storage(optuna_url, create=create, say=say)
