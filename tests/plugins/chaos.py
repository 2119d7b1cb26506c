"""Kill the sweep at an exact instant, for ``tests/test_chaos.py``: ``--plugin chaos`` with
``FREQBENCH_CHAOS=EVENT#N#SIGNAL`` sends SIGNAL (KILL or TERM) to the process itself at the Nth
occurrence of EVENT in this process. Production code knows nothing of it: the plugin wraps the
harness's own functions when it is imported (``--plugin`` imports it before any store is opened).

Events:
    sql:PREFIX        just before an SQL statement starting with PREFIX runs (store creation)
    train:baseline    the baseline's training starts (its MLflow run is RUNNING)
    train:STAGE       a compressed run's fine-tuning starts (STAGE: tune or final)
    saved:checkpoint  a checkpoint's temp file is written, not yet moved into place
    ended:STAGE       the instant after a run of STAGE (baseline, tune, final, parent) FINISHED
    summary           the sweep's closing table is being written
"""

import contextlib
import os
import signal

import sqlalchemy
from sqlalchemy import event

import bench.compressed
import bench.runner
import bench.sweep
from bench.tracking import Tracker

EVENT, N, SIGNAL = os.environ["FREQBENCH_CHAOS"].split("#")
_seen: dict[str, int] = {}
_current_stage = ["none"]  # the stages of the MLflow runs open now, innermost last


def hit(name: str) -> None:
    """One occurrence of event ``name``; the Nth occurrence of the chosen one sends the signal."""
    _seen[name] = _seen.get(name, 0) + 1
    if name == EVENT and _seen[name] == int(N):
        os.kill(os.getpid(), getattr(signal, f"SIG{SIGNAL}"))


@event.listens_for(sqlalchemy.engine.Engine, "before_cursor_execute")
def _sql(conn, cursor, statement, *args):
    if EVENT.startswith("sql:") and statement.startswith(EVENT[4:]):
        hit(EVENT)


def _wrap(module, name: str, event_of):
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        hit(event_of(*args, **kwargs))
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


# training: the baseline's (bench.runner) and a compressed run's (bench.compressed), inside the
# MLflow run of their stage
for _module in (bench.runner, bench.compressed):
    _wrap(_module, "train", lambda *a, **k: f"train:{_current_stage[-1]}")
_wrap(bench.sweep, "summary_table", lambda *a, **k: "summary")

# the checkpoint's temp file written, before os.replace puts it in place
_torch_save = bench.runner.torch.save


def _save(obj, path, *args, **kwargs):
    _torch_save(obj, path, *args, **kwargs)
    if str(getattr(path, "name", path)).endswith(".tmp"):  # a file or a path
        hit("saved:checkpoint")


bench.runner.torch.save = _save

# the instant a run ends FINISHED (Tracker.run's context exits normally)
_run = Tracker.run


@contextlib.contextmanager
def _tracked(self, name, tags, params=None, parent=None):
    _current_stage.append(str(tags.get("stage")))
    try:
        with _run(self, name, tags, params, parent) as handle:
            yield handle
    finally:
        stage = _current_stage.pop()
    hit(f"ended:{stage}")


Tracker.run = _tracked
