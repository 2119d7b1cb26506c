"""Latency per (backend, device, batch): the study's latency block, the metric names, ONNX export
and its check against PyTorch, the timer chosen per device, and bench.profile's options."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import footprint
from bench.cli import main_guard
from bench.deploy import onnx as onnx_deploy
from bench.profile import main as profile_main
from bench.study import StudyError, load_study

GOOD = """
model: vgg16_bn_cifar
dataset: fashion-mnist
methods: [l1_filter]
ratios: [2]
"""


def tiny(width=0.125, in_chans=1):
    from bench.models import create_model

    torch.manual_seed(0)
    return create_model("vgg16_bn_cifar", num_classes=10, in_chans=in_chans, width=width).eval()


def study(tmp_path, latency: str):
    path = tmp_path / "demo.yaml"
    path.write_text(GOOD + f"latency: {latency}\n")
    return load_study(str(path))


# ------------------------------------------------------------------------- the latency block
def test_latency_block_defaults_alias_and_round_trip(tmp_path):
    lat = study(tmp_path, "{threads: 2}").latency
    assert (lat.device, lat.batch_sizes, lat.backends) == (None, (32,), ("torch",))
    old = study(tmp_path, "{batch_size: 64, threads: 4}")  # the older spelling still loads
    assert old.latency.batch_sizes == (64,) and old.latency.batch_size is None
    new = study(tmp_path, "{device: cuda:1, batch_sizes: [1, 32], backends: [onnxruntime, torch]}")
    assert new.latency.batch_sizes == (1, 32) and new.latency.backends == ("onnxruntime", "torch")
    # the resolved study (logged as study.yaml) loads back to the same config
    (tmp_path / "again.yaml").write_text(new.to_yaml().replace("name: demo", "name: again"))
    assert load_study(str(tmp_path / "again.yaml")).latency == new.latency


@pytest.mark.parametrize(
    ("latency", "message"),
    [
        ("{backends: [tensorrt]}", "backends ['tensorrt'] must list some of"),
        ("{backends: []}", "backends [] must list"),
        ("{backends: [torch, torch]}", "each once"),
        ("{batch_sizes: []}", "must list batches >= 1"),
        ("{batch_sizes: [0, 8]}", "must list batches >= 1"),
        ("{batch_sizes: [8, 8]}", "lists a batch twice"),
        ("{batch_size: 8, batch_sizes: [1, 8]}", "disagree: give batch_sizes only"),
        ("{device: tpu}", "must be cpu, cuda or cuda:N"),
        ("{threads: 0}", "threads must be >= 1"),
        ("{min_run_time: 0}", "min_run_time > 0"),
        ("{batch_sizes: 8}", "batch_sizes must be tuple"),
    ],
)
def test_latency_block_errors_are_one_line(tmp_path, latency, message):
    with pytest.raises(StudyError, match="latency") as err:
        study(tmp_path, latency)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_cuda_latency_device_without_cuda_is_refused(tmp_path):
    if torch.cuda.device_count() > 8:
        pytest.skip("this machine has that device")
    from bench.sweep import validate_study

    s = study(tmp_path, "{device: 'cuda:8'}")
    with pytest.raises(StudyError, match=r"latency.device cuda:8: this machine has \d+ CUDA"):
        validate_study(s, data_root=None, download=False, tracking_uri="", preflight=False)


@pytest.mark.parametrize(
    ("tuning", "message"),
    [
        ("{mode: pareto, objectives: [val_top1, energy]}", "must be [val_top1, macs] or"),
        ("{mode: pareto, objectives: [latency, val_top1]}", "must be [val_top1, macs] or"),
        ("{mode: pareto, objectives: [val_top1]}", "must be [val_top1, macs] or"),
        ("{objectives: [val_top1, latency]}", "need tuning.mode: pareto"),
    ],
)
def test_tuning_objectives_are_checked(tmp_path, tuning, message):
    path = tmp_path / "demo.yaml"
    path.write_text(GOOD + f"tuning: {tuning}\n")
    with pytest.raises(StudyError, match="tuning") as err:
        load_study(str(path))
    assert message in str(err.value)
    path.write_text(GOOD + "tuning: {mode: pareto, objectives: [val_top1, latency]}\n")
    assert load_study(str(path)).tuning.objectives == ("val_top1", "latency")


# ---------------------------------------------------------------------- cases and metric names
def test_cases_put_the_headline_first_and_onnxruntime_on_cpu():
    cases = footprint.latency_cases("cuda:1", (1, 32), ("torch", "onnxruntime"))
    assert [c.key for c in cases] == [
        "torch.cuda1.b1",
        "torch.cuda1.b32",
        "onnxruntime.cpu.b1",
        "onnxruntime.cpu.b32",
    ]
    # CUDA kernels run asynchronously: timed by CUDA events; CPU torch and ORT by the Timer
    kinds = [footprint.timer_kind(c) for c in cases]
    assert kinds == ["cuda-events", "cuda-events", "benchmark-timer", "benchmark-timer"]
    assert footprint.timer_kind(footprint.LatencyCase("torch", "cpu", 8)) == "benchmark-timer"


def test_metric_names_per_case():
    cases = footprint.latency_cases("cpu", (8, 1), ("onnxruntime", "torch"))
    results = dict(zip(cases, [(4.0, 2.0), (1.0, 0.5), (6.0, 3.0), (2.0, 4.0)], strict=True))
    m = footprint.latency_metrics(results)
    # the headline: the first backend at the first batch
    assert (m["latency_ms"], m["dense_latency_ms"], m["speedup"]) == (2.0, 4.0, 2.0)
    assert m["speedup.torch.cpu.b1"] == 0.5 and m["latency_ms.onnxruntime.cpu.b1"] == 0.5
    assert m["dense_latency_ms.torch.cpu.b8"] == 6.0
    assert len(m) == 3 + 3 * len(cases)


def test_both_backends_time_both_models():
    dense, small = tiny(0.25), tiny(0.125)
    cases = footprint.latency_cases("cpu", (4, 1), ("torch", "onnxruntime"))
    results = footprint.compare_latencies(
        dense, small, (1, 28, 28), cases, threads=1, min_run_time=0.03, rounds=1
    )
    assert list(results) == cases
    for dense_ms, small_ms in results.values():
        assert 0 < dense_ms < 10_000 and 0 < small_ms < 10_000
    metrics = footprint.latency_metrics(results)
    assert metrics["speedup"] == pytest.approx(results[cases[0]][0] / results[cases[0]][1])


# -------------------------------------------------------------------------- ONNX export, check
class _Doubled(nn.Module):
    """A custom module whose ONNX form is its ``dense_equivalent()``."""

    def __init__(self, conv: nn.Conv2d, equivalent: nn.Module):
        super().__init__()
        self.conv, self.equivalent = conv, equivalent

    def forward(self, x):
        return self.conv(x) * 2

    def dense_equivalent(self):
        return self.equivalent


def test_export_swaps_in_dense_equivalents_and_matches():
    conv = nn.Conv2d(1, 4, 3, padding=1)
    twice = nn.Conv2d(1, 4, 3, padding=1)
    with torch.no_grad():
        twice.weight.copy_(2 * conv.weight)
        twice.bias.copy_(2 * conv.bias)
    model = nn.Sequential(_Doubled(conv, twice), nn.ReLU()).eval()
    swapped = onnx_deploy.for_export(model)
    assert isinstance(swapped[0], nn.Conv2d) and isinstance(model[0], _Doubled)  # a copy
    sess = onnx_deploy.session(onnx_deploy.export(model, (1, 8, 8)), threads=1)
    assert onnx_deploy.check(model, sess, (1, 8, 8), batch_size=5) <= 1e-3


def test_a_mismatching_export_fails_in_one_line():
    conv = nn.Conv2d(1, 4, 3, padding=1)
    model = nn.Sequential(_Doubled(conv, nn.Conv2d(1, 4, 3, padding=1))).eval()  # not equal
    sess = onnx_deploy.session(onnx_deploy.export(model, (1, 8, 8)), threads=1)
    with pytest.raises(onnx_deploy.OnnxMismatch, match="differs from PyTorch by") as err:
        onnx_deploy.check(model, sess, (1, 8, 8))
    assert "\n" not in str(err.value) and "opset 18" in str(err.value)


def test_the_onnx_graph_pins_its_opset_and_takes_any_batch():
    import onnx

    proto = onnx.load_from_string(onnx_deploy.export(tiny(), (1, 28, 28)))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
    sess = onnx_deploy.session(proto.SerializeToString(), threads=1)
    for batch in (1, 7):
        (y,) = sess.run(None, {"x": torch.randn(batch, 1, 28, 28).numpy()})
        assert y.shape == (batch, 10)


# ------------------------------------------------------------------------------ bench.profile
profile = main_guard(profile_main, "bench.profile")
SMALL = ["--model", "vgg16_bn_cifar", "--width", "0.125", "--dataset", "fashion-mnist"]


def test_profile_prints_a_row_per_case(capsys):
    args = [*SMALL, "--method", "l1_filter", "--ratio", "2", "--threads", "1"]
    args += ["--backends", "torch,onnxruntime", "--batch-sizes", "4,1"]
    assert profile(["--json", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    cases = [(c["backend"], c["device"], c["batch_size"]) for c in out["latency"]]
    expected = [("torch", "cpu", 4), ("torch", "cpu", 1), ("onnxruntime", "cpu", 4)]
    assert cases == [*expected, ("onnxruntime", "cpu", 1)]
    assert out["speedup"] == pytest.approx(out["latency"][0]["speedup"])
    headline = (out["backend"], out["device"], out["batch_size"], out["threads"])
    assert headline == ("torch", "cpu", 4, 1)
    assert profile(args) == 0
    text = capsys.readouterr().out
    assert "latency (ms) onnxruntime cpu batch 1" in text
    assert "(onnxruntime on cpu, batch 4, 1 threads)" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backends", "tvm"], "backends ['tvm'] must list some of"),
        (["--batch-sizes", "4,x"], "a batch is not a number"),
        (["--batch-sizes", "4", "--batch-size", "4"], "not both"),
        (["--device", "npu"], "must be cpu, cuda or cuda:N"),
    ],
)
def test_profile_bad_latency_options(capsys, extra, message):
    assert profile([*SMALL, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------ in a sweep
@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_a_run_times_the_trained_baseline_on_every_case(results, monkeypatch):
    """The dense model timed beside a compressed one is the trained baseline (the checkpoint's
    weights), not a fresh init; a final times every case, ONNX Runtime included."""
    from mlflow.tracking import MlflowClient

    from bench.paths import default_tracking_uri
    from bench.sweep import main as sweep_main

    seen = []
    real = footprint.compare_latencies

    def spy(dense, compressed, *args, **kwargs):
        seen.append({k: v.detach().cpu().clone() for k, v in dense.state_dict().items()})
        return real(dense, compressed, *args, **kwargs)

    monkeypatch.setattr(footprint, "compare_latencies", spy)
    args = ["--study", "smoke", "--set", "methods=[l1_filter]", "--no-preflight"]
    args += ["--set", "latency.min_run_time=0.01", "--set", "latency.batch_sizes=[8, 1]"]
    args += ["--set", "latency.backends=[onnxruntime, torch]"]
    assert main_guard(sweep_main, "bench.sweep")(args) == 0
    (ckpt,) = (results / "checkpoints").glob("*.pt")
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    assert len(seen) == 1 and seen[0].keys() == trained.keys()
    assert all(torch.equal(seen[0][k], trained[k]) for k in trained)
    client = MlflowClient(default_tracking_uri())
    exp = client.get_experiment_by_name("smoke")
    (final,) = client.search_runs([exp.experiment_id], "tags.stage = 'final'")
    m, tags = final.data.metrics, final.data.tags
    keys = ["onnxruntime.cpu.b8", "onnxruntime.cpu.b1", "torch.cpu.b8", "torch.cpu.b1"]
    assert tags["latency_cases"] == ",".join(keys) and tags["latency_backend"] == "onnxruntime"
    assert m["speedup"] == m["speedup.onnxruntime.cpu.b8"]
    for key in keys:
        assert m[f"speedup.{key}"] == pytest.approx(
            m[f"dense_latency_ms.{key}"] / m[f"latency_ms.{key}"]
        )
