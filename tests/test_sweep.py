"""The sweep end to end on the `smoke` study: runs, MLflow records, resume, bad inputs."""

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench.cli import main_guard
from bench.paths import default_storage, default_tracking_uri
from bench.runs import RunSpec, method_defaults
from bench.study import load_study
from bench.sweep import main as sweep_main
from bench.sweep import next_commands

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = str(Path(__file__).parent / "plugins")
FAST = ("--set", "latency.min_run_time=0.01", "--no-preflight")
needs_fmnist = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (bash .ci/setup installs it)",
)


def sweep(*args):
    return main_guard(sweep_main, "bench.sweep")(["--study", "smoke", *args])


def runs(study="smoke", stage=None):
    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name(study)
    flt = f"tags.stage = '{stage}'" if stage else ""
    return client, client.search_runs([exp.experiment_id], filter_string=flt)


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    """One smoke sweep for the whole module (the expensive part)."""
    root = tmp_path_factory.mktemp("smoke") / "results"
    old = os.environ.get("FREQBENCH_RESULTS")
    os.environ["FREQBENCH_RESULTS"] = str(root)
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert sweep(*FAST) == 0
        (root / "sweep-stdout.txt").write_text(out.getvalue())  # what the first sweep printed
        yield root
    finally:
        if old is None:
            os.environ.pop("FREQBENCH_RESULTS", None)
        else:
            os.environ["FREQBENCH_RESULTS"] = old


@needs_fmnist
def test_sweep_logs_every_run(smoke_results, monkeypatch):
    monkeypatch.setenv("FREQBENCH_RESULTS", str(smoke_results))
    client, finals = runs(stage="final")
    assert {r.data.tags["method"] for r in finals} == {"l1_filter", "magnitude"}
    for run in finals:
        assert run.info.status == "FINISHED"
        tags, m = run.data.tags, run.data.metrics
        for key in (
            "study",
            "stage",
            "model",
            "dataset",
            "seed",
            "run_key",
            "git_sha",
            "family",
            "ratio",
            "structured",
        ):
            assert key in tags, key
        for key in (
            "test_top1",
            "val_top1",
            "test_top1_pre_ft",
            "params",
            "stored_params",
            "macs",
            "latency_ms",
            "params_ratio",
            "macs_ratio",
            "speedup",
            "baseline_test_top1",
            "dense_latency_ms",
            "speedup.torch.cpu.b8",  # one per latency case: backend, device, batch
        ):
            assert key in m, key
        assert m["speedup.torch.cpu.b8"] == m["speedup"]  # smoke's only case is the headline
        latency = {k: tags[k] for k in tags if k.startswith("latency_")}
        assert latency == {
            "latency_device": "cpu",
            "latency_backend": "torch",
            "latency_batch": "8",
            "latency_threads": "1",
            "latency_cases": "torch.cpu.b8",
        }
        assert abs(m["params_ratio"] / 2 - 1) <= 0.02
        # BatchNorm re-estimated after compression (default 20 batches), the raw number kept
        assert run.data.params["bn_recalibration_batches"] == "20" and "val_top1_pre_bn" in m
        assert 0 <= m["test_top1"] <= 100
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"study.yaml", "layers.csv", "model_state.pt"} <= arts
        assert "hp.schedule" in run.data.params or "hp.allocation" in run.data.params
    by_method = {r.data.tags["method"]: r.data.metrics for r in finals}
    # structured pruning really removes MACs; unstructured masks do not
    assert by_method["l1_filter"]["macs_ratio"] > 1.5
    assert by_method["magnitude"]["macs_ratio"] == pytest.approx(1.0)
    _, baselines = runs(stage="baseline")
    assert len(baselines) == 1 and "test_top1" in baselines[0].data.metrics
    assert list((smoke_results / "checkpoints").glob("*.pt"))


STEP_TIMES = ("compress", "bn", "eval", "finetune", "latency", "log")


@needs_fmnist
def test_runs_log_their_time_per_step(smoke_results, monkeypatch):
    monkeypatch.setenv("FREQBENCH_RESULTS", str(smoke_results))
    _, finals = runs(stage="final")
    study = load_study("smoke")
    for run in finals:
        m = run.data.metrics
        steps = [m[f"time_{step}_s"] for step in STEP_TIMES]
        assert all(s >= 0 for s in steps)
        # every second in one step only: the steps add up to at most the run's wall time, and
        # compressing, fine-tuning, evaluating and measuring each take some time
        assert sum(steps) <= m["wall_time_s"]
        assert sum(steps) >= 0.5 * m["wall_time_s"]
        for step in ("compress", "eval", "finetune", "latency", "log"):
            assert m[f"time_{step}_s"] > 0, step
        assert m["time_bn_s"] > 0  # BN re-estimated (20 batches by default)
        assert m["epochs_total"] == m["compress_epochs"] + study.finetune.epochs
    # both one-shot by default (magnitude's schedule: oneshot): no training inside compress
    assert {r.data.metrics["compress_epochs"] for r in finals} == {0}


@needs_fmnist
def test_summary_splits_each_methods_time_by_step(smoke_results):
    out = (smoke_results / "sweep-stdout.txt").read_text()
    assert re.search(r"^baseline seed 0: trained in \d+ s$", out, re.M)
    table = out[out.index("wall time per method (s), split by step:") :].splitlines()
    header = table[1].split()
    assert header == [
        "method", "runs", "total", "s", "compress", "BN", "eval", "fine-tune", "latency",
        "logging", "other",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split()[1:] for line in table[3:5]}
    assert set(rows) == {"l1_filter", "magnitude"}
    for cells in rows.values():
        runs_now, total, *steps = cells
        assert runs_now == "1"  # one final, no tuning
        # the steps and "other" add up to the pair's total (to the rounding of 8 cells)
        assert abs(sum(map(float, steps)) - float(total)) <= 0.05 * 8


@needs_fmnist
def test_rerun_trains_nothing(smoke_results, monkeypatch, capsys):
    monkeypatch.setenv("FREQBENCH_RESULTS", str(smoke_results))
    _, before = runs()
    assert sweep(*FAST) == 0
    out = capsys.readouterr().out
    assert "nothing to train" in out
    _, after = runs()
    assert len(after) == len(before)
    assert sweep("--dry-run", *FAST) == 0
    plan = capsys.readouterr().out
    assert "0 of 3 steps to do" in plan and "to train" not in plan


@needs_fmnist
def test_changed_recipe_reuses_baseline_and_redoes_finals(smoke_results, monkeypatch, capsys):
    monkeypatch.setenv("FREQBENCH_RESULTS", str(smoke_results))
    _, before = runs(stage="final")
    assert sweep("--set", "finetune.lr=0.02", "--set", "methods=[l1_filter]", *FAST) == 0
    out = capsys.readouterr().out
    assert "training vgg16_bn_cifar" not in out  # the cached baseline is reused
    _, after = runs(stage="final")
    assert len(after) == len(before) + 1


@needs_fmnist
def test_changed_method_args_redo_the_finals(smoke_results, monkeypatch, capsys):
    # the (method, ratio) parent stands for its fixed hyperparameters: other method_args are new
    # finals, never the old parent's summary
    monkeypatch.setenv("FREQBENCH_RESULTS", str(smoke_results))
    args = ("--set", "methods=[l1_filter]", *FAST)
    assert sweep("--set", "method_args={l1_filter: {allocation: uniform}}", *args) == 0
    capsys.readouterr()
    assert sweep("--set", "method_args={l1_filter: {allocation: global}}", *args) == 0
    assert "1 run now" in capsys.readouterr().out
    _, finals = runs(stage="final")
    allocations = {
        r.data.params.get("hp.allocation") for r in finals if r.data.tags["method"] == "l1_filter"
    }
    assert {"uniform", "global"} <= allocations


@needs_fmnist
def test_bn_recalibration_can_be_turned_off(smoke_results, monkeypatch, capsys):
    monkeypatch.setenv("FREQBENCH_RESULTS", str(smoke_results))
    args = ("--set", "methods=[l1_filter]", *FAST)
    assert sweep("--set", "bn_recalibration_batches=0", *args) == 0
    assert "1 run now" in capsys.readouterr().out  # a setting of its own: a new run key
    _, finals = runs(stage="final")
    off = [r for r in finals if r.data.params["bn_recalibration_batches"] == "0"]
    assert len(off) == 1 and "val_top1_pre_bn" not in off[0].data.metrics


@needs_fmnist
def test_printed_next_commands_work_as_printed(smoke_results, monkeypatch, capsys, tmp_path):
    # the module's results folder: its baseline checkpoint is reused, only the finals run again
    monkeypatch.setenv("FREQBENCH_RESULTS", str(smoke_results))
    uri = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    assert sweep("--tracking-uri", uri, *FAST) == 0
    lines = capsys.readouterr().out.splitlines()
    browse = next(x for x in lines if x.startswith("browse the runs:")).split(":", 1)[1].strip()
    report = next(x for x in lines if x.startswith("paper tables:")).split(":", 1)[1].strip()
    assert shlex.split(browse)[-2:] == shlex.split(report)[-2:] == ["--tracking-uri", uri]
    out = smoke_results / "smoke" / "report"
    assert not out.exists()
    # run the line as printed, in a shell whose `python` is this interpreter, same environment
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        report, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "index.html").is_file() and (out / "summary.csv").is_file()


@needs_fmnist
def test_rerun_forces_new_finals_and_keeps_the_old(smoke_results, monkeypatch, capsys):
    monkeypatch.setenv("FREQBENCH_RESULTS", str(smoke_results))
    study = load_study("smoke")
    key = RunSpec.final(study, "l1_filter", 2, 0, method_defaults(study, "l1_filter")).key

    def finished(stage, method="l1_filter"):
        _, found = runs(stage=stage)
        return [
            r
            for r in found
            if r.info.status == "FINISHED" and r.data.tags["method"] == method
            and (method != "l1_filter" or stage != "final" or r.data.tags["run_key"] == key)
        ]  # fmt: skip

    finals, parents = finished("final"), finished("parent")
    magnitude = finished("final", "magnitude")
    assert len(finals) == 1
    assert sweep("--rerun", "l1_filter@2", "--dry-run", *FAST) == 0
    plan = capsys.readouterr().out
    assert "to redo (--rerun)" in plan and "1 of 3 steps to do" in plan
    assert sweep("--rerun", "l1_filter", *FAST) == 0
    assert "(1 already done, 1 run now)" in capsys.readouterr().out  # magnitude: done
    again = finished("final")
    assert len(again) == 2 and {r.info.run_id for r in finals} < {r.info.run_id for r in again}
    assert len(finished("parent")) == len(parents) + 1
    assert len(finished("final", "magnitude")) == len(magnitude)  # not named: not rerun
    assert sweep(*FAST) == 0  # without --rerun the newest finished run counts
    assert "nothing to train" in capsys.readouterr().out


SLOPPY = ("--plugin", "probe_method", "--set", "methods=[probe]")
SLOPPY += ("--set", "method_args={probe: {sloppy: true}}")  # the probe reaches 1.2x for 2x
MISSES = {
    "no-tune": (SLOPPY, "probe", "2", "achieved params ratio 1.2"),
    # sloppy fixed: every trial is infeasible, and the finals fall back to the defaults
    "no feasible trial": (
        (*SLOPPY, "--set", "tuning.trials=1", "--set", "tuning.epochs=0.25"),
        "probe",
        "2",
        "achieved params ratio 1.2",
    ),
    "layer rates": (
        ("--set", "methods=[l1_filter]", "--set", "ratios=['[0.0]*12']"),
        "l1_filter",
        "rates:" + ",".join(["0"] * 12),
        "compress nothing: params ratio 1.000x",
    ),
}


def newest(found, method, ratio):
    """The run of (method, ratio) started last."""
    ours = [r for r in found if (r.data.tags["method"], r.data.tags["ratio"]) == (method, ratio)]
    return max(ours, key=lambda r: r.info.start_time)


@needs_fmnist
@pytest.mark.parametrize("case", MISSES)
def test_a_final_that_misses_its_target_fails_with_the_reason(
    smoke_results, monkeypatch, capsys, case
):
    args, method, ratio, reason = MISSES[case]
    monkeypatch.setenv("FREQBENCH_RESULTS", str(smoke_results))
    monkeypatch.syspath_prepend(PLUGINS)
    assert sweep(*args, *FAST) == 1
    err = capsys.readouterr().err
    assert f"FAILED {method} @ {ratio}: 1 final run(s) missed the target: " in err
    _, finals = runs(stage="final")
    final = newest(finals, method, ratio)
    assert reason in final.data.tags["error"]
    assert final.info.status == "FAILED" and final.data.tags["error"].startswith("TargetMissed: ")
    assert "\n" not in final.data.tags["error"]
    if ratio == "2":
        assert "the target 2x (allowed 1.960x to 2.040x: 2% tolerance)" in final.data.tags["error"]
        assert final.data.metrics["params_ratio"] < 1.96
    assert "test_top1" not in final.data.metrics  # stopped before fine-tuning and testing
    _, parents = runs(stage="parent")
    parent = newest(parents, method, ratio)
    assert parent.info.status == "FAILED"
    if case == "no feasible trial":
        assert parent.data.tags["tuning_note"].startswith("no feasible complete trial")


def test_next_commands_name_the_stores_only_when_not_the_defaults(results, tmp_path):
    browse, report = next_commands("smoke", default_tracking_uri(), default_storage())
    assert browse == "python -m bench.ui --study smoke"
    assert report == "python -m reports --study smoke"
    uri, storage = f"sqlite:///{tmp_path}/my runs.db", f"sqlite:///{tmp_path}/tuning.db"
    browse, report = next_commands("smoke", uri, storage)
    for line, prog in ((browse, "bench.ui"), (report, "reports")):
        argv = ["python", "-m", prog, "--study", "smoke", "--tracking-uri", uri]
        assert shlex.split(line) == [*argv, "--storage", storage]
    # no tuning ran (storage None): --storage would name a store the sweep never used
    assert "--storage" not in next_commands("smoke", uri, None)[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "methods=[l1_filtr]"], "did you mean 'l1_filter'"),
        (["--set", "ratios=[0.5]"], "must be a number > 1"),
        (["--set", "model=vgg17_bn_cifar"], "did you mean"),
        (["--set", "dataset=cifar11"], "did you mean 'cifar10'"),
        (["--set", "finetune.epochs=lots"], "finetune.epochs must be float"),
        (["--set", "methods=[]"], "methods is empty"),
        (["--set", "bn_recalibration_batches=-1"], "bn_recalibration_batches = -1 must be >= 0"),
        (["--set", "ratios=['[0.5]*3']", "--set", "methods=[l1_filter]"], "layer rates"),
        (["--set", "dataset=cifar10"], "--download"),
        (["--set", "data.val_size=0"], "data.val_size must be >= 1, not 0"),
        (["--set", "data.train_subset=60000"], "data.train_subset must be in [1, 59744]"),
        (["--set", "baseline.batch_size=600"], "600 is more than the 512 training images"),
        (["--set", "finetune.batch_size=513"], "use finetune.batch_size <= 512"),
        (["--set", "finetune.epochs=0.01"], "finetune.epochs = 0.01 is no training step"),
        (["--set", "tuning.trials=2", "--set", "tuning.epochs=0.05"], "use at least 0.125 epochs"),
        (["--bogus"], "unrecognized arguments"),
        (["--plugin", "no_such_module_xyz"], "cannot import"),
        (["--rerun", "svd"], "--rerun svd: method 'svd' is not in study smoke"),
        (["--rerun", "l1_filter@4"], "ratio '4' is not in study smoke; its ratios: 2"),
        (["--rerun", "l1_filter@half"], "--rerun l1_filter@half: cannot read layer rates"),
    ],
)
def test_bad_input_exit_2_one_line_nothing_written(results, capsys, args, message):
    assert sweep(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert not results.exists(), "a rejected sweep must write nothing"


def test_cli_subprocess_exit_code(results):
    env = {**os.environ, "FREQBENCH_RESULTS": str(results)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sweep", "--study", "smoke", "--set", "ratios=[1]"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "ratios[0]" in proc.stderr


def test_usage_errors_need_no_import_and_cli_loads_no_torch():
    code = (
        "import sys, bench.cli as c; assert 'torch' not in sys.modules, 'torch'; "
        "assert c.usage_errors() == (c.UsageError,); import bench.study as s; "
        "assert s.StudyError in c.usage_errors()"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# ------------------------------------------------------------------ usage errors before torch
HEAVY = ("torch", "timm", "mlflow", "optuna", "torchvision", "torch_pruning")


def run_importtime(args, cache_home, results):
    """``python -X importtime -m bench.sweep ARGS``: exit code, the lines it printed (not the
    import log) and the top-level modules it imported."""
    env = {**os.environ, "FREQBENCH_RESULTS": str(results), "XDG_CACHE_HOME": str(cache_home)}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "bench.sweep", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.splitlines()
    imported = {
        ln.split("|")[-1].strip().split(".")[0] for ln in lines if ln.startswith("import time:")
    }
    said = [ln for ln in lines if not ln.startswith("import time:")]
    return proc.returncode, said + proc.stdout.splitlines(), imported


@pytest.fixture
def timm_cache(tmp_path, monkeypatch):
    """A cache folder holding timm's names, as bench.models writes it on its first import."""
    import bench.models

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bench.models.cache_timm_names()
    return tmp_path / "cache"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--study", "nope"], "no study 'nope'"),
        (["--study", "smoke", "--set", "finetune.epoch=1"], "did you mean 'epochs'"),
        (["--study", "smoke", "--set", "methods=[l1_filtr]"], "did you mean 'l1_filter'"),
        (["--study", "smoke", "--set", "model=resnet18x"], "did you mean 'resnet18'"),
        (["--study", "smoke", "--set", "ratios=['[0.5]*x']"], "cannot read layer-rates term"),
        (["--study", "smoke", "--set", "data.val_size=0"], "val_size must be >= 1"),
    ],
)
def test_usage_errors_come_before_torch_timm_and_mlflow(timm_cache, results, args, message):
    code, said, imported = run_importtime(args, timm_cache, results)
    assert code == 2
    assert len(said) == 1 and message in said[0], said
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert not results.exists()


def test_unknown_model_without_a_cache_asks_timm_and_writes_the_cache(tmp_path, results):
    cache = tmp_path / "empty-cache"
    code, said, imported = run_importtime(
        ["--study", "smoke", "--set", "model=resnet18x"], cache, results
    )
    assert code == 2 and len(said) == 1 and "did you mean 'resnet18'" in said[0], said
    assert "timm" in imported  # no cache: timm itself decides
    (written,) = (cache / "freqbench").glob("timm-*-models.txt")
    names = set(written.read_text().split())
    assert "resnet18" in names and "vgg16_bn_cifar" not in names  # timm's own names only


# ---------------------------------------------------------------------------- out of memory
def _allocate_too_much(*args, **kwargs):
    import torch

    return torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator's own RuntimeError


def test_what_counts_as_out_of_memory():
    import torch

    from bench.cli import is_out_of_memory

    with pytest.raises(RuntimeError) as cpu:
        _allocate_too_much()
    assert is_out_of_memory(cpu.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("Given groups=3, weight of size [24, 0, 3, 3]"))
    assert not is_out_of_memory(ValueError("out of memory"))


@needs_fmnist
@pytest.mark.parametrize("trials", [0, 2])
def test_out_of_memory_stops_the_sweep_with_what_to_lower(results, capsys, monkeypatch, trials):
    """Memory running out in the latency timing of the first (method, ratio), a final or a
    trial: one line naming latency.batch_sizes, exit 1, the runs FAILED with the reason, and no
    further run (magnitude never starts; no second trial)."""
    import optuna

    import bench.footprint

    monkeypatch.setattr(bench.footprint, "compare_latencies", _allocate_too_much)
    assert sweep(*FAST, "--trials", str(trials)) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if " INFO mlflow" not in ln]
    assert len(err) == 1, err
    assert "out of memory in l1_filter @ 2" in err[0]
    assert "lower latency.batch_sizes (now [8])" in err[0]
    _, all_runs = runs()
    compressed = [r for r in all_runs if r.data.tags["stage"] != "baseline"]
    assert {r.data.tags["method"] for r in compressed} == {"l1_filter"}
    stages = sorted(r.data.tags["stage"] for r in compressed)
    assert stages == sorted(["parent", "tune" if trials else "final"])
    for run in compressed:
        assert run.info.status == "FAILED"
        assert "can't allocate memory" in run.data.tags["error"]
    if trials:
        (summary,) = optuna.get_all_study_summaries(default_storage())
        loaded = optuna.load_study(study_name=summary.study_name, storage=default_storage())
        (only,) = loaded.get_trials()
        assert only.state == optuna.trial.TrialState.FAIL
        assert "can't allocate memory" in only.user_attrs["error"]
