"""Turn a study's runs into paper-style tables, Pareto plots and one HTML page.

Usage::

    python -m reports --study quickstart
    python -m reports --study vgg16-cifar --out paper/vgg16 \\
        --tracking-uri sqlite:///$PWD/results/mlflow.db --storage sqlite:///$PWD/results/optuna.db

Options:
    --study NAME         the study (== MLflow experiment name); required
    --tracking-uri URI   MLflow store; default MLFLOW_TRACKING_URI or sqlite:///<results>/mlflow.db
    --storage URL        Optuna storage for the tuning views; default: the parent runs' tags
    --out DIR            report folder; default <results>/<study>/report
    --reference FILE     published numbers (default sweeps/reference.yaml); --no-reference for none

It reads the tracking store only (never writes to it, never imports torch) and writes, under --out:
``index.html`` (open it in a browser: everything is inside it), ``summary.csv``, and per (model,
dataset) ``<model>/<dataset>/table.{md,tex,csv}`` (the LaTeX needs ``\\usepackage{booktabs}`` and
``graphicx``), ``pareto_{params,macs,speedup}.{png,svg}`` and the tuning views under ``tuning/``.
Only FINISHED final runs (tag stage=final) feed the tables; a (method, ratio) without one shows as a
"missing" row with the reason. The same runs give byte-identical files.

Exit codes: 0 written; 2 the store is unreachable, the study is unknown, final runs lack required
metrics or the reference file is broken (one line on stderr, nothing written); 1 internal error
(one line; the traceback goes to <results>/logs/).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from bench.paths import results_dir
from reports._common import ReportError, one_line, safe_name
from reports.build import build_report
from reports.reference import DEFAULT_REFERENCE

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    """The command line (argparse exits with code 2 on a usage error)."""
    p = argparse.ArgumentParser(
        prog="python -m reports",
        description="Write tables, Pareto plots and an HTML page from a study's MLflow runs.",
    )
    p.add_argument("--study", required=True, metavar="NAME", help="study (== MLflow experiment)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow store (default: the harness's)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage (default: parent run tags)")
    p.add_argument("--out", type=Path, metavar="DIR", help="default: <results>/<study>/report")
    refs = p.add_mutually_exclusive_group()
    refs.add_argument(
        "--reference",
        type=Path,
        default=DEFAULT_REFERENCE,
        metavar="FILE",
        help="published numbers shown as reported rows (default: sweeps/reference.yaml)",
    )
    refs.add_argument("--no-reference", action="store_true", help="show no reported rows")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = parser().parse_args(argv)
    # Offline machines: no telemetry; an unreachable server fails at once instead of retrying for
    # minutes (MLflow's default is 7 retries with exponential backoff).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")  # seconds
    try:
        report = build_report(
            args.study,
            tracking_uri=args.tracking_uri,
            storage=args.storage,
            out=args.out,
            reference=None if args.no_reference else args.reference,
        )
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the last resort of a CLI: one line, the traceback in a file
        log = results_dir() / "logs" / f"reports-{safe_name(args.study)}.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc(), encoding="utf-8")
            where = f"traceback in {log}"
        except OSError:
            where = "traceback could not be written"
        print(f"internal error: {one_line(error)} ({where})", file=sys.stderr)
        return 1
    print(f"report written: {report.index} ({len(report.files)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
