"""bench.ui serves the MLflow UI for a study's store on 127.0.0.1 (and refuses other hosts), on the
study's runs table; the tracker tags the study's experiment so that MLflow 3 opens it as model
training, not as a GenAI app."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.cli import main_guard
from bench.paths import default_tracking_uri
from bench.tracking import MlflowClient, Tracker
from bench.ui import main as ui_main

ROOT = Path(__file__).resolve().parent.parent
ui = main_guard(ui_main, "bench.ui")
KIND = "mlflow.experimentKind"  # MLflow 3's UI: "custom_model_development" opens the runs view


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refuses_remote_host_and_unknown_study(results, capsys):
    assert ui(["--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert ui(["--study", "nothing-here"]) == 2
    assert "run a sweep first" in capsys.readouterr().err
    Tracker(default_tracking_uri(), "demo")
    assert ui(["--study", "absent"]) == 2
    assert "has no runs" in capsys.readouterr().err


def test_serves_the_study(results):
    tracker = Tracker(default_tracking_uri(), "demo")
    with tracker.run("r", {"stage": "baseline"}) as run:
        run.log_metrics({"test_top1": 91.5})
    port = free_port()
    env = {**os.environ, "FREQBENCH_RESULTS": str(results)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.ui", "--study", "demo", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        first = proc.stdout.readline()
        runs = f"#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning"
        assert f"http://127.0.0.1:{port}/{runs} " in first
        deadline, body = time.time() + 120, None
        while time.time() < deadline:
            try:
                url = (
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name"
                    "?experiment_name=demo"
                )
                body = json.loads(urllib.request.urlopen(url, timeout=5).read())
                break
            except OSError:
                time.sleep(1)
        assert body is not None, "the UI did not answer within 120 s"
        assert body["experiment"]["name"] == "demo"
        tags = {tag["key"]: tag["value"] for tag in body["experiment"]["tags"]}
        assert tags[KIND] == "custom_model_development"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_tracker_tags_the_experiment_as_model_training(results):
    uri = default_tracking_uri()
    client = MlflowClient(tracking_uri=uri)

    def kind(name):
        return client.get_experiment_by_name(name).tags.get(KIND)

    Tracker(uri, "new")
    assert kind("new") == "custom_model_development"
    # Experiments made before the tag existed, or guessed at by the UI, get it when a sweep opens
    # them; a kind a user chose stays; a read-only open (--dry-run) writes nothing.
    client.create_experiment("old")
    client.create_experiment("guessed", tags={KIND: "genai_development_inferred"})
    client.create_experiment("chosen", tags={KIND: "finetuning"})
    Tracker(uri, "old", create=False)
    assert kind("old") is None
    for name in ("old", "guessed", "chosen"):
        Tracker(uri, name)
    assert kind("old") == kind("guessed") == "custom_model_development"
    assert kind("chosen") == "finetuning"
