"""The report generator on a fake MLflow store (see ``_report_fixtures``): files, numbers, marks,
errors, path safety, no torch, determinism, and the page rendered by headless Chromium."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import _report_fixtures as fake  # tests/ is on sys.path (pytest's rootdir-less import mode)
import pandas as pd
import pytest

from reports import ReportError, build_report
from reports.__main__ import main
from reports._common import TIMES, safe_name
from reports.aggregate import summarize
from reports.html import GroupPage, render_page
from reports.load import StudyRuns, load_study
from reports.plots import pareto_figure, pareto_front
from reports.reference import DEFAULT_REFERENCE, load_references
from reports.tables import display_table
from reports.tuning import tuning_views

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)
GROUP = Path(fake.MODEL) / fake.DATASET

# Runs the CLI as a user would, then says whether torch was imported on the way.
_CLI = """
import runpy, sys
sys.argv = ["reports", "--study", sys.argv[1], "--out", sys.argv[2]]
try:
    runpy.run_module("reports", run_name="__main__")
except SystemExit as exit:
    code = exit.code
print("TORCH_IMPORTED", "torch" in sys.modules)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, Optuna storage URL) of the fake store, written once for the module."""
    return fake.write_fake_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def cli_report(store, tmp_path_factory):
    """The report of the fake study written by ``python -m reports`` in a fresh interpreter."""
    out = tmp_path_factory.mktemp("cli") / "report"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store[0],
        "FREQBENCH_RESULTS": str(out.parent / "results"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _CLI, fake.STUDY, str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return out, proc


@pytest.fixture
def quiet_env(monkeypatch, results):
    """What ``main`` would set for itself, set here so that the test process gets it back."""
    for name, value in [
        ("MLFLOW_DISABLE_TELEMETRY", "true"),
        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20"),
    ]:
        monkeypatch.setenv(name, value)
    return results


def _md_row(md: str, method: str, ratio: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[1] == method and cells[0] == ratio:
            return cells
    raise AssertionError(f"no row {method} {ratio} in\n{md}")


# ------------------------------------------------------------------------------------ units
def test_pareto_front_keeps_exactly_the_non_dominated_points():
    xs = [1.0, 2.0, 3.0, 2.0, 0.5, 3.0]
    ys = [5.0, 4.0, 1.0, 3.0, 4.0, 1.0]  # (2,3) is dominated by (2,4); (0.5,4) by (1,5)
    assert pareto_front(xs, ys) == [0, 1, 2]
    assert pareto_front([], []) == []


def test_safe_name_never_leaves_the_folder_and_keeps_names_apart():
    assert safe_name("dct_pruning") == "dct_pruning" and safe_name("2") == "2"
    for evil in ["../../evil", "..", "a/b", "/etc/passwd", "rates:0.5,0.5", ".hidden", ""]:
        name = safe_name(evil)
        assert name and "/" not in name and ".." not in name and not name.startswith(".")
        assert set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    assert safe_name("a/b") != safe_name("a_b")
    assert len(safe_name("rates:" + ",".join(["0.5"] * 60))) < 100


def test_reference_file_is_valid_and_fills_reductions(tmp_path):
    refs = load_references(DEFAULT_REFERENCE)
    assert {(r.method, r.model, r.dataset) for r in refs} == {
        ("dct_pruning", "vgg16_bn_cifar", "cifar10"),
        ("dct_pruning", "resnet50", "imagenet"),
        ("lrsd", "vgg16", "imagenet"),
        ("lrsd", "alexnet", "imagenet"),
    }
    lrsd = next(r for r in refs if r.model == "vgg16")
    assert lrsd.metrics["params_reduction"] == pytest.approx(100 * (1 - 9.2 / 138))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {paper: p, method: m, model: x, dataset: d, source: s, metrics: {acc: 1}}\n")
    with pytest.raises(ReportError, match="unknown metric"):
        load_references(bad)


def _study_of(runs: list[dict]) -> StudyRuns:
    """A StudyRuns built by hand (no MLflow): each run gives stage, status, tags and metrics."""
    records = []
    for i, run in enumerate(runs):
        tags = {"model": "resnet50", "dataset": "imagenet", "seed": "0", "family": "frequency"}
        tags.update({"structured": "true", "stage": run["stage"], **run.get("tags", {})})
        record = {"run_id": f"r{i:02d}", "status": run.get("status", "FINISHED"), "start_time": i}
        record.update({f"tags.{k}": v for k, v in tags.items()})
        record.update({f"metrics.{k}": v for k, v in run.get("metrics", {}).items()})
        records.append(record)
    return StudyRuns("hand", "memory", pd.DataFrame.from_records(records), None)


def _final(method: str, ratio: str, top1: float, achieved: float | None = None, **tags) -> dict:
    """A hand-built final run; ``achieved``: its params ratio (default: the target's)."""
    if achieved is None:
        achieved = float(ratio)
    metrics = {"baseline_test_top1": 76.0, "stored_params": 25e6 / achieved, "macs": 1e9}
    metrics |= {"params_ratio": achieved, "macs_ratio": 4.0, "speedup": 2.0, "test_top5": 90.0}
    tags = {"method": method, "ratio": ratio, **tags}
    return {"stage": "final", "tags": tags, "metrics": {**metrics, "test_top1": top1}}


def test_summary_counts_a_rerun_seed_once_and_shows_top5_when_logged():
    def dct(ratio: str, top1: float, achieved: float | None = None) -> dict:
        return _final("dct_pruning", ratio, top1, achieved)

    study = _study_of(
        [
            {"stage": "baseline", "metrics": {"test_top1": 76.0, "test_top5": 93.0}},
            dct("2", 70.0),
            dct("2", 72.0),
            dct("rates:0.5,0.9", 60.0, achieved=5.0),
            dct("16", 50.0),
            {"stage": "parent", "tags": {"method": "svd", "ratio": "4"}},
            {"stage": "final", "tags": {"method": "svd", "ratio": "4"}, "status": "RUNNING"},
        ]
    )
    summary = summarize(study, load_references(DEFAULT_REFERENCE))
    table = display_table(summary, "resnet50", "imagenet")
    rows = {
        (row[0].text, row[1].text): dict(zip(table.columns, (c.text for c in row)))
        for row in table.rows
    }
    two = rows[(f"2{TIMES}", "dct_pruning")]
    assert two["Top-1 (%)"] == "72.00" and two["Seeds"] == "1"  # the rerun replaced seed 0's run
    assert two["Top-5 (%)"] == "90.00" and two["Baseline top-5 (%)"] == "93.00"
    assert two["Params red. (%)"] == "50.0" and two["FLOPs (MACs) red. (%)"] == "75.0"
    assert rows[(f"4{TIMES}", "svd")]["Status"] == "missing: final run RUNNING"
    reported = rows[("—", "dct_pruning")]
    assert reported["Top-5 (%)"] == "90.77" and reported["Baseline top-5 (%)"] == "92.87"
    ratios = [row[0].text for row, kind in zip(table.rows, table.kinds) if kind != "reported"]
    # per-layer rates: labelled by their spec and the params ratio they reached
    assert ratios == ["—", f"2{TIMES}", f"4{TIMES}", f"16{TIMES}", f"rates:0.5,0.9 (5.00{TIMES})"]
    assert rows[(f"rates:0.5,0.9 (5.00{TIMES})", "dct_pruning")]["Params red. (%)"] == "80.0"


def test_flops_nz_column_and_the_dagger_follow_what_each_run_deployed():
    def run(method: str, ratio: str, structured: str, deployed: str | None, **metrics) -> dict:
        tags = {"structured": structured} | ({} if deployed is None else {"deployed": deployed})
        out = _final(method, ratio, 70.0, **tags)
        out["metrics"] |= metrics
        return out

    runs = [
        {"stage": "baseline", "metrics": {"test_top1": 76.0, "macs": 1e9}},
        # lrsd's S branches deployed sparse: no layer multiplies stored zeros, so no dagger
        run("lrsd", "4", "false", "sparse: 4 layers", macs_nz=2e8, macs_nz_ratio=5.0),
        run(
            "magnitude",
            "4",
            "false",
            "masked dense: 13 layers; sparse: 2 layers",
            macs_nz=3e8,
            macs_nz_ratio=1e9 / 3e8,
        ),
        run("svd", "4", "true", "structured", macs_nz=1e9, macs_nz_ratio=4.0),
        # logged before the deployed tag and macs_nz: the class flag and the executed MACs
        run("random", "4", "false", None),
    ]
    table = display_table(summarize(_study_of(runs), []), "resnet50", "imagenet")
    rows = {row[1].text: dict(zip(table.columns, (c.text for c in row))) for row in table.rows}
    assert rows["lrsd"]["FLOPs (MACs)"] == "1.00G"
    assert rows["lrsd"]["FLOPs nz red. (%)"] == "80.0"
    assert rows["magnitude"]["FLOPs (MACs)"] == "1.00G†"
    assert rows["magnitude"]["FLOPs nz red. (%)"] == "70.0"
    assert rows["svd"]["FLOPs (MACs)"] == "1.00G"
    assert rows["random"]["FLOPs (MACs)"] == "1.00G†"  # fallback: structured=false
    assert rows["random"]["FLOPs nz red. (%)"] == "75.0"
    assert rows["dense baseline"]["FLOPs nz red. (%)"] in ("0.0", "—")
    notes = " ".join(table.footnotes)
    assert "FLOPs nz: those that touch a stored nonzero" in notes
    assert "† Masked dense layers" in notes


def test_a_final_off_its_target_never_stands_under_it():
    # recorded before the harness checked targets: 3.1x under 4x, and rates that compress nothing
    study = _study_of(
        [
            _final("svd", "4", 70.0, achieved=3.1),
            _final("svd", "2", 75.0, achieved=2.03),  # within 2 %
            _final("svd", "rates:0.1", 74.0, achieved=1.0),
            _final("lrsd", "4", 71.0),
            _final("lrsd", "4", 72.0, achieved=4.5),  # a later run of the seed, off target
        ]
    )
    summary = summarize(study, [])
    rows = {(r.method, r.ratio): r for r in summary.itertuples()}
    assert rows[("svd", "4")].kind == "missing"
    assert rows[("svd", "4")].note == (
        "final run missed its target: params ratio 3.100 for target 4 (outside 2%)"
    )
    assert rows[("svd", "rates:0.1")].kind == "missing"
    assert "params ratio 1.00 for layer rates" in rows[("svd", "rates:0.1")].note
    assert rows[("svd", "2")].kind == "measured" and rows[("svd", "2")].top1_mean == 75.0
    assert rows[("lrsd", "4")].top1_mean == 71.0  # the on-target run counts, not the newer one


def test_a_table_names_its_code_versions_and_flags_a_mix():
    v1, v2 = "h1-a1b2c3d4", "h1-c3d4e5f6"
    runs = [
        {"stage": "baseline", "metrics": {"test_top1": 76.0}, "tags": {"code_version": "h1"}},
        _final("lrsd", "2", 70.0, code_version=v1),
        _final("lrsd", "4", 68.0, code_version=v1),
        _final("lrsd", "8", 60.0, code_version=v2),
        _final("svd", "2", 69.0, code_version="h1-99999999"),
    ]
    table = display_table(summarize(_study_of(runs), []), "resnet50", "imagenet")
    notes = [n for n in table.footnotes if "code version" in n.lower()]
    assert notes[0] == (
        "Code versions (h<harness version>-<method code fingerprint>; tag code_version): "
        f"baseline h1 (1 run); lrsd {v1} (2 runs), {v2} (1 run); svd h1-99999999 (1 run)."
    )
    assert notes[1].startswith(
        f"⚠ This table mixes code versions: lrsd {v1} (2 runs), lrsd {v2} (1 run). "
    )
    assert len(notes) == 2
    page = render_page("hand", "memory", [GroupPage(table)], None)
    assert f'<li class="warning">⚠ This table mixes code versions: lrsd {v1} (2 runs)' in page
    # one code per method, one harness: no warning
    same = display_table(summarize(_study_of(runs[:3]), []), "resnet50", "imagenet")
    assert not [n for n in same.footnotes if "mixes" in n]
    # another harness version mixes the table, and so do runs from before the tag existed
    bumped = [*runs[:3], _final("svd", "2", 69.0, code_version="h2-99999999"), _final("x", "2", 1)]
    notes = display_table(summarize(_study_of(bumped), []), "resnet50", "imagenet").footnotes
    (warning,) = [n for n in notes if "mixes" in n]
    assert "harness h1 (3 runs), harness h2 (1 run), harness unversioned (1 run)" in warning
    assert "x unversioned (1 run)" in next(n for n in notes if n.startswith("Code versions"))


# --------------------------------------------------------------------------- the whole report
def test_cli_writes_every_file_and_never_imports_torch(cli_report):
    out, proc = cli_report
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_IMPORTED False" in proc.stdout
    for name in ["table.md", "table.tex", "table.csv"] + [
        f"pareto_{axis}.{fmt}" for axis in ("params", "macs", "speedup") for fmt in ("png", "svg")
    ]:
        assert (out / GROUP / name).stat().st_size > 500, name
    page = (out / "index.html").read_text()
    assert fake.STUDY_YAML.splitlines()[-1] in page  # the study config, from the artifact
    tuning = out / GROUP / "tuning"
    assert (tuning / "dct_pruning" / "2" / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tuning / "dct_pruning" / "2" / "importance.png").stat().st_size > 2000
    assert (tuning / "freq_lowrank" / "2" / "history.png").exists()
    assert f"best feasible objective {fake.TUNED_BEST:.2f}" in page  # 88.0 missed its ratio
    note = (tuning / "freq_lowrank" / "2" / "importance.txt").read_text()
    assert ">= 2 complete trials" in note and "1 complete" in note
    assert not (tuning / "freq_lowrank" / "2" / "importance.png").exists()
    # Two objectives: the views show the first (accuracy) and say so.
    assert (tuning / "magnitude" / "4" / "importance.png").exists()
    assert "multi-objective study (val_acc, macs): the views show the first" in page


def test_table_numbers_are_mean_and_std_over_seeds(cli_report):
    out, _ = cli_report
    csv = pd.read_csv(out / GROUP / "table.csv", dtype={"ratio": str, "seeds": str})
    row = csv[(csv["method"] == "dct_pruning") & (csv["ratio"] == "2")].iloc[0]
    # Seeds 0 and 1 score 89.0 and 90.0; baselines 91.0 and 91.4.
    assert row["kind"] == "measured" and row["n_seeds"] == 2 and row["seeds"] == "0,1"
    assert row["top1_mean"] == pytest.approx(89.5)
    assert row["top1_std"] == pytest.approx(0.5**0.5, abs=1e-6)
    assert row["delta_top1"] == pytest.approx(89.5 - 91.2)
    assert row["params_reduction"] == pytest.approx(100 * (1 - 1 / 2.02), abs=1e-6)
    assert row["macs_reduction"] == pytest.approx(100 * (1 - 1 / 1.6), abs=1e-6)
    assert row["speedup_mean"] == pytest.approx(1.225) and row["trials_used"] == 4
    assert len(csv[csv["kind"] == "measured"]) == 6
    md = (out / GROUP / "table.md").read_text()
    cells = _md_row(md, "dct_pruning", f"2{TIMES}")
    assert "89.50 ± 0.71" in cells and "-1.70" in cells and "7.43M" in cells
    assert "**50.5**" in cells  # params reduction: tied best with freq_lowrank
    assert "FLOPs (MACs)" in md.splitlines()[2]
    magnitude = _md_row(md, "magnitude", f"4{TIMES}")
    assert "314.00M†" in magnitude and "0.0" in magnitude  # unstructured: dense MACs, footnoted
    assert "† Masked dense layers" in md


def test_speedup_columns_say_device_backend_batch_and_threads(cli_report):
    out, _ = cli_report
    md = (out / GROUP / "table.md").read_text()
    header = md.splitlines()[2]
    ort = f"Speedup ({TIMES}) ORT cpu b32"
    assert ort in header and f"Speedup ({TIMES}) torch" not in header  # headline: no twin
    setting = "torch on cpu, batch 32, 2 threads"
    assert f"interleaved, median: {setting}." in md
    assert "<backend> <device> b<batch>: the same runs timed on that backend" in md
    cells = _md_row(md, "dct_pruning", f"2{TIMES}")  # seeds' ORT speedups: 1.5 x (1.2, 1.25)
    assert f"{1.225 * fake.ORT_FACTOR:.2f}" in cells
    csv = pd.read_csv(out / GROUP / "table.csv", dtype={"ratio": str, "seeds": str})
    row = csv[(csv["method"] == "dct_pruning") & (csv["ratio"] == "2")].iloc[0]
    assert row["latency_setting"] == setting
    assert row["speedup.onnxruntime.cpu.b32"] == pytest.approx(1.225 * fake.ORT_FACTOR)
    page = html.unescape((out / "index.html").read_text())
    assert setting in page and ort in page


def test_compression_cost_is_a_column_with_a_dash_for_runs_without_it(cli_report):
    out, _ = cli_report
    csv = pd.read_csv(out / GROUP / "table.csv", dtype={"ratio": str, "seeds": str})
    measured = csv[csv["kind"] == "measured"].set_index(["method", "ratio"])
    # seeds 0 and 1 compressed in 30 and 31 s (freq_lowrank), 4 and 5 s (dct_pruning)
    assert measured.loc[("freq_lowrank", "2"), "compress_s"] == pytest.approx(30.5)
    assert measured.loc[("freq_lowrank", "4"), "compress_epochs"] == pytest.approx(2.5)
    assert measured.loc[("dct_pruning", "2"), "compress_s"] == pytest.approx(4.5)
    assert measured.loc[("magnitude", "2"), ["compress_s", "compress_epochs"]].isna().all()
    md = (out / GROUP / "table.md").read_text()
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    cost = header.index("Compress (s / epochs)")
    assert _md_row(md, "freq_lowrank", f"2{TIMES}")[cost] == "30.5 / 2.50"
    assert _md_row(md, "dct_pruning", f"4{TIMES}")[cost] == "4.5 / 0.00"
    # recorded before the harness timed its steps
    assert _md_row(md, "magnitude", f"2{TIMES}")[cost] == "—"
    assert "Compress: the compression cost" in md
    tex = (out / GROUP / "table.tex").read_text()
    assert "Compress (s / epochs)" in tex and "30.5" in tex


def test_every_pareto_point_is_a_row_and_a_point(store, tmp_path):
    # tuning.mode: pareto: every point of a front has final runs of its own, and each is shown
    out = tmp_path / "pareto"
    summary = build_report(fake.PARETO_STUDY, tracking_uri=store[0], out=out, reference=None)
    summary = summary.summary
    for (method, ratio), points in fake.PARETO.items():
        rows = summary[(summary["method"] == method) & (summary["ratio"] == ratio)]
        measured = rows[rows["kind"] == "measured"]
        assert list(measured["pareto_index"]) == [str(i) for i in range(len(points))]
        assert list(measured["n_seeds"]) == [2] * len(points)
        assert list(measured["top1_mean"]) == pytest.approx([top1 + 0.5 for top1, _ in points])
        reductions = [100 * (1 - 1 / macs) for _, macs in points]
        assert list(measured["macs_reduction"]) == pytest.approx(reductions)
    md = (out / GROUP / "table.md").read_text()
    for i, (top1, _) in enumerate(fake.PARETO[("dct_pruning", "2")]):
        assert f"{top1 + 0.5:.2f} ± 0.71" in _md_row(
            md, f"dct_pruning (Pareto {i + 1}/3)", f"2{TIMES}"
        )
    assert "85.50 ± 0.71" in _md_row(md, "dct_pruning (Pareto 1/2)", f"4{TIMES}")
    failed = _md_row(md, "dct_pruning (Pareto 2/2)", f"4{TIMES}")  # the point that missed
    assert failed[-1] == f"missing: final run FAILED: {fake.PARETO_ERROR}"
    assert "**90.10 ± 0.71**" in _md_row(md, "magnitude", f"2{TIMES}")  # the defaults: no front
    assert "Pareto n/N: point n of the N points on the tuning's Pareto front" in md
    # the plots: one labelled point per Pareto point
    for axis in ("params", "macs", "speedup"):
        fig = pareto_figure(summary, axis, "paretostudy")
        labels = sorted(text.get_text() for text in fig.axes[0].texts)
        assert labels == [f"2{TIMES}", *(f"2{TIMES} P{i}" for i in (1, 2, 3)), f"4{TIMES} P1"]
    assert (out / GROUP / "pareto_macs.png").stat().st_size > 5000


def test_missing_rows_say_why(cli_report):
    md = (cli_report[0] / GROUP / "table.md").read_text()
    assert _md_row(md, "svd", f"2{TIMES}")[-1] == "missing: no final run"
    assert (
        _md_row(md, "l1_filter", f"4{TIMES}")[-1]
        == f"missing: final run FAILED: {fake.FAILED_ERROR}"
    )


def test_the_table_names_the_code_versions_behind_it(cli_report):
    md = (cli_report[0] / GROUP / "table.md").read_text()
    versions = {m: fake.code_version(m) for m in fake.METHODS}
    assert (
        "- Code versions (h<harness version>-<method code fingerprint>; tag code_version): "
        f"baseline h1 (2 runs); dct_pruning {versions['dct_pruning']} (4 runs); freq_lowrank "
        f"{versions['freq_lowrank']} (4 runs); magnitude {versions['magnitude']} (4 runs).\n"
    ) in md
    assert "mixes code versions" not in md
    csv = pd.read_csv(cli_report[0] / GROUP / "table.csv", dtype=str, keep_default_na=False)
    row = csv[(csv["method"] == "magnitude") & (csv["ratio"] == "4")].iloc[0]
    assert row["code_versions"] == f"{versions['magnitude']}:2"


def test_bold_marks_the_best_measured_value_at_each_ratio(cli_report):
    out, _ = cli_report
    md = (out / GROUP / "table.md").read_text()
    assert "**90.10 ± 0.71**" in _md_row(md, "magnitude", f"2{TIMES}")
    assert "89.50 ± 0.71" in _md_row(md, "dct_pruning", f"2{TIMES}")  # not bold
    assert "**88.50 ± 0.71**" in _md_row(md, "freq_lowrank", f"4{TIMES}")
    assert "87.50 ± 0.71" in _md_row(md, "dct_pruning", f"4{TIMES}")
    # Structured methods compress MACs; unstructured magnitude keeps them dense.
    assert "**37.5**" in _md_row(md, "dct_pruning", f"2{TIMES}")
    assert "**37.5**" not in _md_row(md, "magnitude", f"2{TIMES}")
    tex = (out / GROUP / "table.tex").read_text()
    assert r"\textbf{90.10 $\pm$ 0.71}" in tex and r"\textbf{89.50" not in tex


def test_reference_rows_are_marked_reported_and_never_ranked(cli_report):
    md = (cli_report[0] / GROUP / "table.md").read_text()
    reported = _md_row(md, "dct_pruning", "—")
    assert reported[-1] == "reported [1]"
    assert "92.53" in reported and "93.96" in reported and "94.2" in reported and "84.1" in reported
    assert not any("**" in cell for cell in reported)  # 94.2 % beats every measured row: not bold
    assert "Discrete cosine transform for filter pruning" in md
    tex = (cli_report[0] / GROUP / "table.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in tex
    assert r"dct\_pruning" in tex and "reported [1]" in tex and "FLOPs (MACs)" in tex


def test_regenerating_gives_byte_identical_files(store, cli_report, tmp_path):
    first, _ = cli_report
    again = build_report(fake.STUDY, tracking_uri=store[0], out=tmp_path / "again")
    names = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again.out).as_posix() for p in again.files)
    for name in names:  # tables, CSVs, PNG, SVG and the page alike
        assert (first / name).read_bytes() == (again.out / name).read_bytes(), name


def test_a_write_that_fails_midway_leaves_the_old_report_whole(store, cli_report, monkeypatch):
    """A full disk (or a kill) while the report is regenerated: every file already there stays as
    it was, and no temp file is left (files are written beside their place, then moved in)."""
    first, _ = cli_report
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    real = Path.write_text

    def half_then_full(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        build_report(fake.STUDY, tracking_uri=store[0], out=first)
    after = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert after == before


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("study", "uri", "message"),
    [
        ("no-such-study", None, "no study 'no-such-study'"),
        ("emptystudy", None, "has no runs"),
        ("nometrics", None, "lacks metric(s) speedup"),
        ("x", "sqlite:///{tmp}/absent/mlflow.db", "does not exist"),
        ("x", "sqlite:///{tmp}/garbage.db", "cannot read tracking store"),
        ("x", "http://127.0.0.1:9", "cannot read tracking store"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_write_nothing(
    store, quiet_env, tmp_path, capsys, study, uri, message
):
    (tmp_path / "garbage.db").write_text("not a database\n")
    out = tmp_path / "out"
    uri = (uri or store[0]).format(tmp=tmp_path)
    assert main(["--study", study, "--tracking-uri", uri, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_names_from_runs_never_escape_out_and_never_become_markup(store, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    report = build_report("evilstudy", tracking_uri=store[0], out=out)
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and os.listdir(out.parent) == ["out"]
    assert all(p.resolve().is_relative_to(out.resolve()) for p in report.files)
    assert all(
        p.resolve().is_relative_to(out.resolve()) for p in tmp_path.rglob("*") if p.is_file()
    )
    page = (out / "index.html").read_text()
    assert fake.SCRIPT not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_storage_override_reaches_the_tuning_views(store, tmp_path):
    runs = load_study(fake.STUDY, store[0])
    views = tuning_views(runs, tmp_path, storage=f"sqlite:///{tmp_path}/absent.db")
    assert [(v.method, v.ratio) for v in views] == [
        ("dct_pruning", "2"),
        ("freq_lowrank", "2"),
        ("magnitude", "4"),
    ]
    for view in views:  # the tags name a storage that exists; the override does not
        assert view.files == () and view.n_complete == 0
        assert "cannot read Optuna study" in view.notes[0] and "does not exist" in view.notes[0]
    assert not any(tmp_path.iterdir())  # reading never creates the missing storage


def test_no_reference_rows_without_a_reference_file(store, tmp_path):
    summary = summarize(load_study(fake.STUDY, store[0]), load_references(None))
    assert "reported" not in set(summary["kind"]) and len(summary) == 9


# ------------------------------------------------------------------------------ the page
class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        self.tables += tag == "table"
        if tag == "img":
            self.sources.append(dict(attrs).get("src", ""))


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={profile}",
    ]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90)


# Appended to a copy of the page: once it is laid out, write what the test checks into the DOM.
_MEASURE = """<script>
addEventListener("load", () => {
  const page = document.documentElement, box = document.querySelector(".table-box");
  const details = document.querySelector("details.files");
  const out = document.createElement("pre");
  out.id = "measured";
  out.textContent = JSON.stringify({
    client: page.clientWidth, scroll: page.scrollWidth,
    box: box.getBoundingClientRect().right,
    box_client: box.clientWidth, box_scroll: box.scrollWidth,
    method: getComputedStyle(document.querySelector("td.method")).position,
    details_open: details.open, kinds: [...details.querySelectorAll("li > strong")].map(
      (e) => e.textContent),
    links: details.querySelectorAll("a").length,
  });
  document.body.append(out);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_page_renders_in_headless_chromium_with_every_image(cli_report, tmp_path):
    out, _ = cli_report
    url = (out / "index.html").as_uri()
    dom = _chromium(tmp_path / "profile", "--dump-dom", url).stdout
    parser = _Images()
    parser.feed(dom)
    assert parser.tables == 1 and "dct_pruning" in dom and "reported [1]" in dom
    # 3 Pareto plots, history + importances of dct_pruning and magnitude, freq_lowrank history.
    assert len(parser.sources) == 8
    for src in parser.sources:
        head, data = src.split(",", 1)
        assert head == "data:image/png;base64"
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    shot = tmp_path / "shot.png"
    _chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 50_000  # a page with plots, not a blank one
    assert struct.unpack(">II", shot.read_bytes()[16:24]) == (1280, 2000)  # IHDR: width, height


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_page_fits_a_1280px_window_and_folds_its_files(cli_report, tmp_path):
    out, _ = cli_report
    probe = tmp_path / "probe.html"  # a copy: the report stays as written (images are inline)
    probe.write_text((out / "index.html").read_text().replace("</body>", f"{_MEASURE}\n</body>"))
    dom = _chromium(tmp_path / "profile", "--window-size=1280,900", "--dump-dom", probe.as_uri())
    dom = dom.stdout
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    m = json.loads(html.unescape(found.group(1)))
    assert m["client"] > 1200 and m["scroll"] <= m["client"], m  # no page-level sideways scroll
    assert m["box"] <= m["client"] and m["box_scroll"] <= m["box_client"], m  # the table fits
    assert m["method"] == "sticky"  # where it cannot fit, Method stays in view as it scrolls
    # The files: one collapsed list, by kind.
    assert m["details_open"] is False
    assert m["kinds"] == ["Tables", "Data", "Pareto plots", "Tuning views"]
    assert m["links"] == len([p for p in (out / GROUP).rglob("*") if p.is_file()])


def test_regenerating_into_the_same_folder_leaves_nothing_stale(store, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")  # a user's own file in the folder
    (tmp_path / "outside.txt").write_text("keep\n")
    old = build_report("evilstudy", tracking_uri=store[0], out=out)
    gone = {p.relative_to(out).as_posix() for p in old.files}
    # a hand-edited manifest can never reach outside the folder
    with open(out / ".report-files", "a") as f:
        f.write("../outside.txt\n")
    new = build_report(fake.STUDY, tracking_uri=store[0], out=out)
    kept = {p.relative_to(out).as_posix() for p in new.files}
    assert gone - kept, "the two studies must differ for this test to mean anything"
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == kept | {"notes.txt"}
    assert not [p for p in out.rglob("*") if p.is_dir() and not any(p.iterdir())]
    assert (tmp_path / "outside.txt").read_text() == "keep\n"
