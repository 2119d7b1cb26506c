"""Optuna tuning: constraint, NaN trials, Pareto mode, and resume after SIGKILL mid-trial."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from bench.cli import main_guard
from bench.paths import default_storage, default_tracking_uri
from bench.sweep import main as sweep_main

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = str(Path(__file__).parent / "plugins")
pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
TUNE = (
    "--study",
    "smoke",
    "--plugin",
    "probe_method",
    "--set",
    "methods=[probe]",
    "--set",
    "tuning.sampler=random",
    "--set",
    "tuning.epochs=0.25",
    "--set",
    "finetune.epochs=0.25",
    "--set",
    "latency.min_run_time=0.01",
    "--no-preflight",
)


@pytest.fixture
def probe_path(monkeypatch):
    monkeypatch.syspath_prepend(PLUGINS)


def sweep(*args):
    return main_guard(sweep_main, "bench.sweep")([*TUNE, *args])


def optuna_trials():
    name = "smoke/vgg16_bn_cifar/fashion-mnist/probe/2"
    return optuna.load_study(study_name=name, storage=default_storage()).get_trials()


def mlflow_runs(stage):
    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name("smoke")
    return client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'")


def test_constraint_and_nan_trials(results, probe_path):
    assert sweep("--set", "tuning.trials=4", "--set", "tuning.seed=3") == 0
    trials = optuna_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4  # the budget counts COMPLETE trials exactly
    exploded = [t for t in trials if t.params.get("explode")]
    assert exploded and all(t.state == TrialState.FAIL for t in exploded)
    assert all(
        "non-finite" in t.user_attrs["error"] or "nan" in t.user_attrs["error"].lower()
        for t in exploded
    )
    sloppy = [t for t in complete if t.params["sloppy"]]
    assert all(t.constraints["params_ratio_shortfall"] > 0 for t in sloppy)
    # the finals use a feasible trial: sloppy=False, and they meet the ratio
    (final,) = mlflow_runs("final")
    assert final.data.params["hp.sloppy"] == "False"
    assert abs(final.data.metrics["params_ratio"] / 2 - 1) <= 0.02
    assert final.data.tags["params_source"] in ("tuned", "default")
    failed = [r for r in mlflow_runs("tune") if r.info.status == "FAILED"]
    assert len(failed) == len(exploded)
    assert all(len(r.data.tags["error"].splitlines()) == 1 for r in failed)
    (parent,) = mlflow_runs("parent")
    assert parent.data.metrics["trials_used"] == 4
    assert parent.data.tags["optuna_study"].endswith("/probe/2")
    # tune runs never see the test split
    assert all("test_top1" not in r.data.metrics for r in mlflow_runs("tune"))


def test_pareto_mode(results, probe_path):
    assert sweep("--set", "tuning.trials=3", "--set", "tuning.mode=pareto") == 0
    (parent,) = mlflow_runs("parent")
    front = parent.data.tags["pareto_trials"].split(",")
    assert len(front) >= 1
    assert len(mlflow_runs("final")) == len(front)
    # each point's finals say which point they are: reports show every one as a row of its own
    indices = sorted(int(r.data.tags["pareto_index"]) for r in mlflow_runs("final"))
    assert indices == list(range(len(front)))
    study = optuna.load_study(
        study_name="smoke/vgg16_bn_cifar/fashion-mnist/probe/2", storage=default_storage()
    )
    assert len(study.directions) == 2


def test_dry_run_shows_trial_budget_and_writes_nothing(results, probe_path, capsys):
    assert sweep("--set", "tuning.trials=5", "--dry-run") == 0
    assert "0/5 trials complete" in capsys.readouterr().out
    assert not results.exists()


def test_resume_after_sigkill_mid_trial(results):
    env = {**os.environ, "PYTHONPATH": PLUGINS, "FREQBENCH_RESULTS": str(results)}
    cmd = [
        sys.executable,
        "-m",
        "bench.sweep",
        *TUNE,
        "--set",
        "tuning.trials=3",
        "--set",
        "tuning.sampler=tpe",
        "--set",
        "method_args={probe: {delay: 1.5}}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    killed_mid_trial = False
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.3)
            try:
                trials = optuna_trials()
            except Exception:  # the study does not exist yet
                continue
            states = [t.state for t in trials]
            if TrialState.COMPLETE in states and states[-1] == TrialState.RUNNING:
                # kill only once the running trial's MLflow run exists: between Optuna's ask and
                # that run's creation there is nothing for the rerun to mark KILLED
                running = str(trials[-1].number)
                try:
                    runs = mlflow_runs("tune")
                except Exception:  # the store is busy being written
                    continue
                if not any(
                    r.info.status == "RUNNING" and r.data.tags.get("trial_number") == running
                    for r in runs
                ):
                    continue
                os.kill(proc.pid, signal.SIGKILL)
                killed_mid_trial = True
                break
    finally:
        proc.wait(timeout=30)
    assert killed_mid_trial, "the sweep finished before it could be killed mid-trial"
    before = {t.number: t.value for t in optuna_trials() if t.state == TrialState.COMPLETE}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = optuna_trials()
    complete = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    assert len(complete) == 3, "the budget is met exactly"
    assert all(complete[n] == v for n, v in before.items()), "finished trials are kept"
    assert sum(t.state == TrialState.FAIL for t in trials) >= 1  # the killed one
    tune_runs = mlflow_runs("tune")
    finished = [r for r in tune_runs if r.info.status == "FINISHED"]
    numbers = [r.data.tags["trial_number"] for r in finished]
    assert len(numbers) == len(set(numbers)) == 3, "no finished trial is repeated"
    assert any(r.info.status == "KILLED" for r in tune_runs)


def all_studies():
    return {s.study_name: s for s in optuna.get_all_study_summaries(default_storage())}


def test_first_trial_runs_the_defaults(results, probe_path):
    assert sweep("--set", "tuning.trials=2", "--set", "tuning.seed=5") == 0
    first = optuna_trials()[0]
    assert first.params == {"sloppy": False, "explode": False}  # Probe's defaults
    assert first.user_attrs["source"] == "defaults"
    assert first.state == TrialState.COMPLETE


def test_other_fixed_settings_get_their_own_study(results, probe_path):
    base = "smoke/vgg16_bn_cifar/fashion-mnist/probe/2"
    assert sweep("--set", "tuning.trials=2") == 0
    assert set(all_studies()) == {base}
    # other fixed hyperparameters: a new objective, so a new study; the first is left alone
    assert sweep("--set", "tuning.trials=2", "--set", "method_args={probe: {delay: 0.01}}") == 0
    studies = all_studies()
    (other,) = set(studies) - {base}
    assert other.startswith(base + "#")
    assert studies[base].n_trials == 2 and studies[other].n_trials == 2
    assert studies[base].user_attrs["fingerprint"] != studies[other].user_attrs["fingerprint"]
    # the first settings again: their study is found by its fingerprint, its budget already met
    assert sweep("--set", "tuning.trials=2") == 0
    assert {k: s.n_trials for k, s in all_studies().items()} == {base: 2, other: 2}
    parents = mlflow_runs("parent")
    assert {p.data.tags["optuna_study"] for p in parents} == {base, other}


def test_pruner_stops_early_but_never_wastes_a_finished_trial():
    from bench.tuning import report

    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    good = study.ask()
    report(good, 90.0, epoch=1, n_reports=1)
    study.tell(good, 90.0)
    # a hopeless trial is stopped before its last epoch ...
    with pytest.raises(optuna.TrialPruned, match="pruned at epoch 1"):
        report(study.ask(), 10.0, epoch=1, n_reports=3)
    # ... but at its last report it has paid in full: it completes and counts
    last = study.ask()
    report(last, 10.0, epoch=1, n_reports=1)
    study.tell(last, 10.0)
    assert [t.state for t in study.trials][-1] == TrialState.COMPLETE


def test_a_defaults_trial_whose_process_died_is_queued_again(tmp_path):
    import socket

    from bench.runner import Sweep
    from bench.stores import open_optuna_storage
    from bench.study import load_study
    from bench.tuning import Tuner

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = load_study("smoke", ("tuning.trials=2", "methods=[magnitude]"))
    tuner = Tuner(Sweep(study, tracker=None), url, open_optuna_storage(url))
    optuna_study = tuner._study("magnitude", 2)
    tuner._enqueue_defaults(optuna_study, "magnitude")
    first = optuna_study.ask()  # the defaults trial, then its process dies (no pid 2**22 + 1)
    first.set_user_attr("worker", f"{socket.gethostname()}:{2**22 + 1}")
    assert first.user_attrs["source"] == "defaults"
    assert tuner._fail_stale(optuna_study) == 1
    tuner._enqueue_defaults(optuna_study, "magnitude")
    trials = optuna_study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == trials[0].params and trials[1].user_attrs["source"] == "defaults"
    # a defaults trial that failed by itself (NaN loss, say) is not tried again and again
    optuna_study.tell(optuna_study.ask(), state=TrialState.FAIL)
    tuner._enqueue_defaults(optuna_study, "magnitude")
    assert len(optuna_study.get_trials()) == 2


def test_pareto_on_measured_latency(results, probe_path):
    """objectives [val_top1, latency]: the second objective is each trial's measured speedup
    (its deployed model timed interleaved with the dense baseline), maximised."""
    args = ("--set", "tuning.trials=2", "--set", "tuning.mode=pareto")
    latency = ("--set", "tuning.objectives=[val_top1, latency]")
    assert sweep(*args, *latency) == 0
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(default_storage())]
    assert name == "smoke/vgg16_bn_cifar/fashion-mnist/probe/2"
    study = optuna.load_study(study_name=name, storage=default_storage())
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    speedups = {
        int(r.data.tags["trial_number"]): r.data.metrics["speedup"] for r in mlflow_runs("tune")
    }
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 2
    for t in complete:  # the value Optuna got is the speedup the trial's run logged
        assert t.values[1] == pytest.approx(speedups[t.number]) and t.values[1] > 0
    # a trial times the headline case only, briefly; a final every case
    tune = mlflow_runs("tune")[0].data
    assert "speedup.torch.cpu.b8" in tune.metrics and tune.tags["latency_backend"] == "torch"
