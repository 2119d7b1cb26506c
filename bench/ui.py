"""``python -m bench.ui``: serve the MLflow UI (or optuna-dashboard) for a study's store.

Binds 127.0.0.1 by default; another host is refused unless ``--allow-remote`` says so explicitly
(the UI has no authentication). Runs ``mlflow server`` with job execution disabled, as MLflow 3
needs on an offline machine, and prints the address of the study's runs table in the UI's model
training mode (``#/experiments/<id>/runs?workflowType=machine_learning``): MLflow 3.17 opens an
experiment's bare address on its GenAI overview (traces, none here), and takes its mode from the
address or the browser's last choice, not from the experiment's ``mlflow.experimentKind`` tag (which
the tracker sets too, for the UIs that read it).

Examples:
    python -m bench.ui --study quickstart
    python -m bench.ui --study quickstart --port 5001
    python -m bench.ui --optuna            # optuna-dashboard for the tuning storage, if installed
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys

from bench.cli import ArgumentParser, UsageError, main_guard
from bench.paths import default_storage, default_tracking_uri

__all__ = ["main"]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m bench.ui", description=__doc__.split("\n")[0])
    p.add_argument("--study", help="open this study's experiment (checked to exist)")
    p.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///results/mlflow.db)")
    p.add_argument("--storage", help="Optuna storage for --optuna (default: results/optuna.db)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host other than loopback (no authentication: be careful)",
    )
    p.add_argument("--optuna", action="store_true", help="serve optuna-dashboard instead")
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _experiment_path(uri: str, study: str | None) -> str:
    if study is None:
        return ""
    from bench.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        raise UsageError(
            f"no tracking store at {uri}: run a sweep first (python -m bench.sweep --study {study})"
        )
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(study)
    if exp is None:
        raise UsageError(
            f"study {study!r} has no runs in {uri}: run python -m bench.sweep --study {study}"
        )
    return f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not _is_loopback(args.host) and not args.allow_remote:
        raise UsageError(
            f"--host {args.host} would expose the UI beyond this machine; add "
            "--allow-remote to do that on purpose"
        )
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} must lie in 1..65535")
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    if args.optuna:
        exe = shutil.which("optuna-dashboard")
        if exe is None:
            raise UsageError("optuna-dashboard is not installed: pip install optuna-dashboard")
        storage = args.storage or default_storage()
        cmd = [exe, storage, "--host", args.host, "--port", str(args.port)]
        url = f"http://{args.host}:{args.port}/"
    else:
        uri = args.tracking_uri or default_tracking_uri()
        url = f"http://{args.host}:{args.port}/{_experiment_path(uri, args.study)}"
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            uri,
            "--host",
            args.host,
            "--port",
            str(args.port),
            "--workers",
            "1",
        ]
    print(f"serving on {url}  (Ctrl-C stops it)", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=10)
        return 130


if __name__ == "__main__":
    sys.exit(main_guard(main, "bench.ui")())
