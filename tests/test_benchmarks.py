"""The benchmark scripts run end to end on tiny inputs and print what they promise."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (bash .ci/setup installs it)",
)
def test_filter_criteria_compares_criteria_at_equal_per_layer_counts(tmp_path):
    env = {**os.environ, "FREQBENCH_RESULTS": str(tmp_path / "results"), "CI": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "benchmarks/filter_criteria.py", "--study", "smoke", "--ratio", "2",
         "--draws", "2", "--bn-batches", "2", "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    counts = re.search(r"same filters per layer for all: \[([\d, ]+)\]", out)
    assert counts and len(counts.group(1).split(",")) == 12  # VGG-16's 13 convs, the last kept
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for name in ("dct_pruning band=full", "l1_filter", "random (mean of 2"):
        assert any(r.startswith(name) for r in rows), (name, out)
    l1 = [c.strip() for c in rows["l1_filter"].strip("|").split("|")]
    assert 0.0 <= float(l1[1]) <= 100.0 and float(l1[4]) == pytest.approx(1.0)  # L1 vs itself
    assert list((tmp_path / "results" / "checkpoints").glob("*.pt"))  # the baseline it trained


def test_speedup_prints_macs_macs_nz_and_both_backends(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/speedup.py", "--models", "vgg16_bn_cifar", "--width",
         "0.125", "--methods", "l1_filter,magnitude", "--ratios", "2", "--batch", "4",
         "--threads", "1", "--min-run-time", "0.02"],
        cwd=ROOT, env={**os.environ, "CI": "true"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for column in ("MACs x", "MACs_nz x", "torch-cpu x", "torch-cpu / MACs", "onnxruntime-cpu x"):
        assert column in header, header
    rows = {r[1]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:])}
    col = {name: header.index(name) for name in header}
    # filter pruning removes MACs; masking removes only the MACs of its zeros (MACs_nz)
    assert float(rows["l1_filter"][col["MACs x"]]) > 1.2
    assert float(rows["magnitude"][col["MACs x"]]) == 1.0
    assert float(rows["magnitude"][col["MACs_nz x"]]) > 1.2
    for row in rows.values():
        ratio = float(row[col["torch-cpu x"]]) / float(row[col["MACs x"]])
        assert ratio == pytest.approx(float(row[col["torch-cpu / MACs"]]), abs=0.01)
    bad = subprocess.run(
        [sys.executable, "benchmarks/speedup.py", "--backends", "tvm"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "backends ['tvm']" in bad.stderr
