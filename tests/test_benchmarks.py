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
