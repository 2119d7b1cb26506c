"""What every command-line entry point shares: exit codes, one-line errors, signals, plugins.

Exit codes: 0 done; 1 internal error (one-line summary + the file the traceback was written to)
or out of memory (one line: what to lower) or a full disk (one line; nothing half-written is
kept, a rerun with space resumes); 2 usage or configuration error (one line: what is
wrong and what to do), raised before anything is written; 130 interrupted (Ctrl-C), 143
terminated (SIGTERM). Interrupted runs are marked KILLED by ``bench.tracking``; a rerun resumes.

Out of memory is 1, not 2: it is found while running, after runs were recorded (FAILED, with the
reason), and the same command may fit another machine or device; 2 keeps meaning "rejected, nothing
ran".
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import importlib
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.paths import results_dir

__all__ = [
    "OutOfMemory",
    "UsageError",
    "disk_full",
    "import_plugins",
    "is_out_of_memory",
    "main_guard",
    "usage_errors",
]


class UsageError(ValueError):
    """A bad command line (the message is one line)."""


class OutOfMemory(RuntimeError):
    """The device or the host ran out of memory; the message (one line) says what to lower.

    Stops a sweep: every further run would need as much (exit 1, see the module docstring)."""


# what torch's CPU allocator (and older CUDA, MPS, HIP builds) put in a plain RuntimeError
_OUT_OF_MEMORY_TEXT = ("can't allocate memory", "out of memory")


def is_out_of_memory(err: BaseException) -> bool:
    """``err`` says memory ran out: :class:`MemoryError`, ``torch.OutOfMemoryError`` (CUDA), or
    a ``RuntimeError`` from an allocator ("DefaultCPUAllocator: can't allocate memory")."""
    torch = sys.modules.get("torch")  # no torch imported: no torch error raised
    oom = getattr(torch, "OutOfMemoryError", None)
    if isinstance(err, MemoryError | OutOfMemory) or (oom is not None and isinstance(err, oom)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(t in text for t in _OUT_OF_MEMORY_TEXT)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that runs end KILLED; exits 143."""


# (module, class) of every error that means "bad input": exit 2 with its one-line message
_USAGE_ERROR_CLASSES = (
    ("bench.study", "StudyError"),
    ("methods._targets", "MethodConfigError"),
    ("bench.dataset_info", "DataError"),
    ("bench.models", "ModelError"),
    ("bench.tracking", "TrackingError"),
    ("bench.stores", "StoreError"),
)


def usage_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean "bad input" (exit 2, one line), :class:`UsageError` first.

    A function, not a tuple: it is called when an error is caught and looks the classes up among
    the modules already imported (an error whose module was never imported cannot have been
    raised), so importing ``bench.cli`` loads neither torch nor MLflow (``bench.ui`` starts at
    once) and never imports its own importers.
    """
    errors: list[type[BaseException]] = [UsageError]
    for module, name in _USAGE_ERROR_CLASSES:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            errors.append(cls)
    return tuple(errors)


def import_plugins(modules: Sequence[str]) -> None:
    """Import user modules that register methods (``--plugin my_pkg.my_method``).

    The current directory is importable, as for ``python -m``.
    """
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise UsageError(
                f"--plugin {name}: cannot import it ({err}); is it on PYTHONPATH or in this folder?"
            ) from None


def _causes(err: BaseException | None):
    """``err`` and the errors it was raised from or while handling, innermost last."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _says_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "database or disk is full" in str(e) or "No space left on device" in str(e)


def disk_full(err: BaseException) -> bool:
    """``err`` (or an error it came from) says a disk is full: an OSError ENOSPC or EDQUOT, or
    SQLite's "database or disk is full" wrapped by SQLAlchemy, Optuna or MLflow."""
    return any(map(_says_full, _causes(err)))


def _short(err: BaseException) -> str:
    """The innermost error that says the disk is full, on one line."""
    e = [e for e in _causes(err) if _says_full(e)][-1]
    return " ".join(f"{type(e).__name__}: {e}".split())[:160]


def _log_traceback() -> Path | None:
    try:
        folder = results_dir() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"error-{dt.datetime.now():%Y%m%d-%H%M%S}.log"
        path.write_text(traceback.format_exc())
        return path
    except OSError:
        return None


def _on_sigterm(signum, frame):
    raise Terminated()


def main_guard(
    main: Callable[[list[str] | None], int | None],
    prog: str,
    lower: str = "the batch size or the model's width",
) -> Callable:
    """Wrap ``main(argv)``: errors become the project's exit codes and one-line messages.

    ``lower`` names what to lower when memory runs out (an :class:`OutOfMemory` says it itself).
    """

    def wrapped(argv: list[str] | None = None) -> int:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return int(main(argv) or 0)
        except SystemExit as err:  # argparse: --help (0) and usage errors (2)
            return err.code if isinstance(err.code, int) else (0 if err.code is None else 2)
        except usage_errors() as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 2
        except Terminated:
            print(f"{prog}: terminated; finished runs are kept, rerun to resume", file=sys.stderr)
            return 143
        except KeyboardInterrupt:
            print(f"{prog}: interrupted; finished runs are kept, rerun to resume", file=sys.stderr)
            return 130
        except OutOfMemory as err:
            print(f"{prog}: {err}", file=sys.stderr)
            return 1
        except Exception as err:
            if disk_full(err):  # writing a traceback would fail too; finished runs are whole
                print(
                    f"{prog}: error: no space left on device ({_short(err)}): free some space "
                    f"in {results_dir()} (or the store's disk), then rerun; finished runs are kept",
                    file=sys.stderr,
                )
                return 1
            line = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            if is_out_of_memory(err):
                print(f"{prog}: out of memory ({line[:160]}): lower {lower}", file=sys.stderr)
                return 1
            where = _log_traceback()
            print(f"{prog}: internal error: {line} (traceback: {where})", file=sys.stderr)
            return 1
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with the project's one-line errors (argparse itself already exits 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
