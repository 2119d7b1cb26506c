"""``python -m bench.sweep --study NAME``: run a study end to end, resumably.

1. Validate everything first (study keys and names, hyperparameters, targets against the model, data
   on disk, tracking store); on error print one line, exit 2, write nothing.
2. Baselines (cached checkpoints), then for each (method, ratio) a parent run, the tuning trials
   (``bench.tuning``) and the final runs, one per seed. Runs are keyed by a hash of their config
   and code (``bench.code_version``): a rerun skips finished keys and redoes the rest;
   ``--rerun METHOD[@RATIO]`` runs the parent and finals of those pairs again all the same.
3. A summary table and the commands that open the runs (``bench.ui``) and write the report
   (``reports``), with the stores this sweep used.

The runs themselves are values (``bench.runs``) run by ``bench.runner.Sweep``; their body, step by
step, is ``bench.compressed``; tuning is ``bench.tuning``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shlex
import sys
import time
import traceback
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from tabulate import tabulate

from bench.cli import (
    ArgumentParser,
    OutOfMemory,
    UsageError,
    disk_full,
    import_plugins,
    is_out_of_memory,
    main_guard,
)
from bench.dataset_info import dataset_info
from bench.names import unknown_method, unknown_model
from bench.paths import default_storage, default_tracking_uri
from bench.study import Study, StudyError, check_data, load_study

if TYPE_CHECKING:
    from bench.runs import RunResult

# torch, timm and the methods (bench.models, bench.runs, methods.base), MLflow (bench.tracking,
# bench.runner, bench.tuning) and pandas are imported where first needed, after the checks that
# need none of them (check_study): a typo is answered at once, without loading them

__all__ = [
    "check_study",
    "main",
    "next_commands",
    "run_method_ratio",
    "time_table",
    "validate_study",
]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help="study name in sweeps/ (or a path to a YAML)")
    p.add_argument("--data-root", type=Path, help="where datasets live (default: dataset's own)")
    p.add_argument("--download", action="store_true", help="download CIFAR when missing (online)")
    p.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///results/mlflow.db)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///results/optuna.db)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a study value, e.g. --set finetune.epochs=1 (repeatable)",
    )
    p.add_argument("--trials", type=int, help="tuning trials per (method, ratio); overrides study")
    p.add_argument("--no-tune", action="store_true", help="skip tuning: final runs use defaults")
    p.add_argument(
        "--rerun",
        action="append",
        default=[],
        metavar="METHOD[@RATIO]",
        help="run the final runs (and parent) of METHOD, at RATIO or every ratio, again even when "
        "finished runs of their keys exist; the old runs are kept, reports show the newest; "
        "tuning trials are kept (repeatable)",
    )
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module that registers extra methods (repeatable)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (done / to do) and exit")
    p.add_argument(
        "--no-preflight",
        action="store_true",
        help="skip compressing a random-weight model once per (method, target) to "
        "validate targets before any training",
    )
    return p


# ---------------------------------------------------------------------------------- validation
def check_study(study: Study) -> None:
    """The checks that need neither torch, timm nor the methods (``bench.names``): the names of
    the dataset, model and methods, and the data's sizes (:func:`bench.study.check_data`); a
    one-line :class:`StudyError`."""
    where = f"study {study.name}"
    check_data(study)
    problem = unknown_model(study.model)
    if problem:
        raise StudyError(f"{where}: model: {problem}")
    for name in study.method_args:
        if name not in study.methods:
            raise StudyError(f"{where}: method_args.{name}: {name!r} is not in methods")
    for i, name in enumerate(study.methods):
        problem = unknown_method(name)
        if problem:
            raise StudyError(f"{where}: methods[{i}]: {problem}")


def validate_study(
    study: Study,
    *,
    data_root: Path | None,
    download: bool,
    tracking_uri: str,
    preflight: bool = True,
    say=print,
) -> None:
    """Raise a one-line usage error for anything that would fail later; writes nothing.

    :func:`check_study` first, then what builds the model and the methods (torch, timm)."""
    check_study(study)
    import torch  # see the note on imports at the top

    from bench import models
    from bench.data import check_available
    from methods.base import CalibData, MethodConfigError, Target, create_method, no_finetune

    where = f"study {study.name}"
    lat_device = study.latency.device
    if lat_device and lat_device.startswith("cuda"):
        index = int(lat_device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise StudyError(
                f"{where}: latency.device {lat_device}: this machine has "
                f"{torch.cuda.device_count()} CUDA devices; use cpu, or leave it out (the "
                "training device)"
            )
    info = dataset_info(study.dataset)
    try:
        dense = models.create_model(
            study.model, num_classes=info.num_classes, in_chans=info.in_chans, width=study.width
        )
    except models.ModelError as err:
        raise StudyError(f"{where}: model: {err}") from None
    built = {}
    for i, name in enumerate(study.methods):
        try:
            built[name] = create_method(name, **study.method_args.get(name, {}))
        except MethodConfigError as err:
            raise StudyError(f"{where}: methods[{i}]: {err}") from None
    if not download or study.dataset not in ("cifar10", "cifar100"):
        check_available(study.dataset, data_root)
    _check_store(tracking_uri)
    if not preflight:
        return
    t0 = time.perf_counter()
    shape = (info.in_chans, info.height, info.width)
    calib = CalibData.synthetic(shape, info.num_classes, n_batches=2, batch_size=8)
    for name, method in built.items():
        for ratio in study.ratios:
            torch.manual_seed(0)
            try:
                # warnings (a clamped rank) belong to the real runs' tags, not to validation
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    method.compress(copy.deepcopy(dense), Target.parse(ratio), calib, no_finetune())
            except MethodConfigError as err:
                raise StudyError(f"{where}: {name} at ratio {ratio}: {err}") from None
    say(
        f"preflight: {len(built)} methods x {len(study.ratios)} targets compress "
        f"({time.perf_counter() - t0:.1f} s)"
    )


def _check_store(uri: str) -> None:
    from bench.tracking import TrackingError  # MLflow: see the note on imports at the top

    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
        if parent is None or not parent.is_dir() or not _writable(parent):
            raise TrackingError(f"tracking store {uri}: {parent} is not a writable folder")
    elif uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)
        except OSError as err:
            raise TrackingError(
                f"tracking server {uri} is not reachable ({err}); start it or pass --tracking-uri"
            ) from None
    elif "://" not in uri:
        raise TrackingError(
            f"tracking URI {uri!r} needs a scheme: sqlite:///ABS/PATH or http://HOST"
        )


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def parse_reruns(study: Study, texts: list[str]) -> frozenset[tuple[str, str | None]]:
    """``--rerun METHOD[@RATIO]`` values as (method, ratio label, or None for every ratio).

    Raises:
        UsageError: a method or a ratio that is not in the study.
    """
    from methods._targets import MethodConfigError, Target  # torch-free: see the imports note

    labels = [Target.parse(r).label for r in study.ratios]
    out = set()
    for text in texts:
        method, at, ratio = text.partition("@")
        if method not in study.methods:
            raise UsageError(
                f"--rerun {text}: method {method!r} is not in study {study.name}; "
                f"its methods: {', '.join(study.methods)}"
            )
        label = None
        if at:
            try:
                label = Target.parse(ratio.strip()).label
            except MethodConfigError as err:
                raise UsageError(f"--rerun {text}: {err}") from None
            if label not in labels:
                raise UsageError(
                    f"--rerun {text}: ratio {ratio!r} is not in study {study.name}; "
                    f"its ratios: {', '.join(labels)}"
                )
        out.add((method, label))
    return frozenset(out)


def _selected(reruns, method: str, ratio) -> bool:
    """Does ``--rerun`` name (method, ratio)?"""
    from methods._targets import Target

    return bool({(method, None), (method, Target.parse(ratio).label)} & reruns)


# ------------------------------------------------------------------------------------ the plan
def _hyperparameter_sets(sweep, tuner, method: str, ratio, parent) -> list[tuple[dict, str]]:
    """(hyperparameters, source) of the final runs: tuned, or the method's defaults."""
    from bench.runs import method_defaults

    if tuner is None:
        return [(method_defaults(sweep.study, method), "default")]
    return tuner.tune(method, ratio, parent)


def print_plan(sweep, tuner, reruns=frozenset()) -> None:
    """``--dry-run``: every step of the study, done or to do; runs nothing, writes nothing."""
    from bench.runs import BaselineSpec, RunSpec, method_defaults

    study = sweep.study
    rows = []
    for seed in study.seeds:
        done = sweep.tracker.finished(BaselineSpec.of(study, seed).key) is not None
        cached = sweep.checkpoint_path(seed).exists()
        rows.append(
            (
                "baseline",
                "-",
                "-",
                seed,
                "done" if done and cached else ("cached" if cached else "to train"),
            )
        )
    for method in study.methods:
        for ratio in study.ratios:
            if tuner is not None:
                status = tuner.status(method, ratio)
                rows.append(("tune", method, ratio, "-", status))
                status = "after tuning"
                if _selected(reruns, method, ratio):
                    status += " (--rerun)"
                rows.append(("final", method, ratio, ",".join(map(str, study.seeds)), status))
                continue
            hps = method_defaults(study, method)
            for seed in study.seeds:
                key = RunSpec.final(study, method, ratio, seed, hps).key
                done = sweep.tracker.finished(key) is not None
                status = "done" if done else "to do"
                if _selected(reruns, method, ratio):
                    status = "to redo (--rerun)" if done else status
                rows.append(("final", method, ratio, seed, status))
    print(tabulate(rows, headers=["stage", "method", "ratio", "seed", "status"]))
    todo = sum(1 for r in rows if r[-1] not in ("done",))
    print(f"\n{todo} of {len(rows)} steps to do; nothing was run (--dry-run)")


def summary_table(results) -> str:
    """Mean over seeds per (method, ratio): the sweep's closing table."""
    import pandas as pd  # see the note on imports at the top

    rows = []
    for r in results:
        m = r.metrics
        rows.append(
            {
                "method": r.method,
                "ratio": r.ratio,
                "seed": r.seed,
                "top1 before ft": m.get("test_top1_pre_ft"),
                "top1 after ft": m.get("test_top1"),
                "params x": m.get("params_ratio"),
                "MACs x": m.get("macs_ratio"),
                "speedup x": m.get("speedup"),
            }
        )
    if not rows:
        return "(no final runs)"
    df = pd.DataFrame(rows)
    agg = df.groupby(["method", "ratio"], sort=False).agg(
        seeds=("seed", "count"), **{c: (c, "mean") for c in df.columns[3:]}
    )
    return agg.reset_index().to_markdown(index=False, floatfmt=".2f")


def time_table(sweep) -> str:
    """Where this process's time went: the baselines it trained, then per method the seconds of
    its (method, ratio) pairs split into the steps of its compressed runs (trials and finals,
    ``bench.compressed.STEPS``) and ``other`` (what no step covers: tuning, the stores, opening and
    closing runs). Runs skipped as already finished cost nothing and are not counted."""
    from bench.compressed import STEPS  # torch: see the note on imports at the top

    names = {"bn": "BN", "eval": "eval", "finetune": "fine-tune", "log": "logging"}
    lines = [
        f"baseline seed {seed}: trained in {seconds:.0f} s"
        for seed, seconds in sorted(sweep.baseline_seconds.items())
    ]
    rows = []
    for method, total in sweep.method_seconds.items():
        steps = sweep.step_seconds.get(method, {})
        row = {"method": method, "runs": int(steps.get("runs", 0)), "total s": total}
        row |= {names.get(step, step): steps.get(step, 0.0) for step in STEPS}
        row["other"] = max(total - sum(steps.get(step, 0.0) for step in STEPS), 0.0)
        rows.append(row)
    if rows:
        body = tabulate([list(r.values()) for r in rows], headers=list(rows[0]), floatfmt=".1f")
        lines += ["wall time per method (s), split by step:", body]
    return "\n".join(lines) if lines else "(nothing was run: no time to split)"


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import_plugins(args.plugin)
    overrides = list(args.overrides)
    if args.trials is not None:
        if args.trials < 0:
            raise UsageError("--trials must be >= 0")
        overrides.append(f"tuning.trials={args.trials}")
    study = load_study(args.study, tuple(overrides))
    if args.no_tune:
        study = dataclasses.replace(study, tuning=dataclasses.replace(study.tuning, trials=0))
    reruns = parse_reruns(study, args.rerun)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    storage = args.storage or default_storage()
    validate_study(
        study,
        data_root=args.data_root,
        download=args.download,
        tracking_uri=tracking_uri,
        preflight=not args.no_preflight,
    )

    from bench.runner import Sweep, resolve_device  # MLflow: see the note on imports at the top
    from bench.stores import open_stores
    from bench.tracking import Tracker

    # both stores created, migrated and checked once, before any run (never lazily mid-sweep)
    tuned = study.tuning.trials > 0
    optuna_storage = open_stores(tracking_uri, storage if tuned else None, create=not args.dry_run)

    tracker = Tracker(tracking_uri, study.name, create=not args.dry_run)
    sweep = Sweep(
        study,
        tracker,
        data_root=args.data_root,
        download=args.download,
        device=resolve_device(args.device),
    )
    tuner = None
    if tuned:
        from bench.tuning import Tuner  # MLflow: see the note on imports at the top

        tuner = Tuner(sweep, storage, optuna_storage)
    if args.dry_run:
        print_plan(sweep, tuner, reruns)
        return 0
    stale = tracker.mark_stale()
    if stale:
        print(f"marked {stale} runs of a dead process KILLED; resuming")
    t0 = time.perf_counter()
    results, failures = run_study(sweep, tuner, reruns)
    skipped = sum(r.skipped for r in results)
    print(
        f"\nstudy {study.name}: {len(results)} final runs ({skipped} already done, "
        f"{len(results) - skipped} run now) in {time.perf_counter() - t0:.0f} s"
    )
    if skipped == len(results) and results:
        print("nothing to train: every run of this study is already finished")
    print(summary_table(results))
    print(f"\n{time_table(sweep)}")
    browse, report = next_commands(study.name, tracking_uri, storage if tuner else None)
    print(f"\nbrowse the runs:  {browse}")
    print(f"paper tables:     {report}")
    if failures:
        print(
            f"{len(failures)} (method, ratio) pairs failed (see their 'error' tag):",
            file=sys.stderr,
        )
        for line in failures:
            print(f"  {line[:300]}", file=sys.stderr)
        return 1
    return 0


def next_commands(study: str, tracking_uri: str, storage: str | None) -> tuple[str, str]:
    """The commands that open the runs (``bench.ui``) and write the report (``reports``), as
    they must be typed: with ``--tracking-uri`` and ``--storage`` wherever the sweep used other
    stores than those commands find by themselves (``storage``: None when nothing was tuned)."""
    stores = []
    if tracking_uri != default_tracking_uri():
        stores += ["--tracking-uri", tracking_uri]
    if storage is not None and storage != default_storage():
        stores += ["--storage", storage]
    return (
        shlex.join(["python", "-m", "bench.ui", "--study", study, *stores]),
        shlex.join(["python", "-m", "reports", "--study", study, *stores]),
    )


def run_study(sweep, tuner, reruns=frozenset()) -> tuple[list[RunResult], list[str]]:
    """Baselines, then every (method, ratio); a failed pair is reported and the sweep goes on,
    except when memory runs out: that stops the sweep (:class:`bench.cli.OutOfMemory`, saying
    what to lower), since every further run would need as much. ``reruns``: the pairs
    ``--rerun`` names (:func:`parse_reruns`), run again.

    Returns the final runs' results and one line per failed (method, ratio).
    """
    from methods.base import Target

    study = sweep.study
    for seed in study.seeds:
        with _stop_when_out_of_memory(study, f"baseline seed {seed}"):
            sweep.baseline(seed)
    results, failures = [], []
    for method in study.methods:
        for ratio in study.ratios:
            label = Target.parse(ratio).label
            started = time.perf_counter()
            try:
                force = _selected(reruns, method, ratio)
                with _stop_when_out_of_memory(study, f"{method} @ {label}"):
                    results += run_method_ratio(sweep, tuner, method, ratio, force=force)
            except (KeyboardInterrupt, SystemExit, OutOfMemory):
                raise
            except Exception as err:  # recorded as FAILED in MLflow; the sweep goes on
                if disk_full(err):  # ... unless every pair after it would fail the same way
                    raise
                failures.append(f"{method} @ {label}: {type(err).__name__}: {err}")
                print(
                    f"FAILED {method} @ {label}: {' '.join(str(err).split())[:200]}",
                    file=sys.stderr,
                )
            finally:
                spent = time.perf_counter() - started
                sweep.method_seconds[method] = sweep.method_seconds.get(method, 0.0) + spent
    return results, failures


@contextlib.contextmanager
def _stop_when_out_of_memory(study: Study, what: str):
    """Turn running out of memory into an :class:`OutOfMemory` that says what to lower."""
    try:
        yield
    except Exception as err:
        if not is_out_of_memory(err) or isinstance(err, OutOfMemory):
            raise
        raise OutOfMemory(
            f"out of memory in {what} ({type(err).__name__}): lower {_what_to_lower(study, err)}; "
            "the runs so far are kept (the failed ones FAILED), rerun to resume"
        ) from err


def _what_to_lower(study: Study, err: BaseException) -> str:
    """The setting to lower, from where memory ran out (the harness's functions on the stack)."""
    here = Path(__file__).resolve().parent
    called = {
        f.name for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).parent == here
    }
    width = f"width (now {study.width or 1.0:g}) or a smaller model"
    if called & {"compare_latencies", "measure", "dense_footprint"}:
        return f"latency.batch_sizes (now {list(study.latency.batch_sizes)}), or {width}"
    if "_train_baseline" in called and "train" in called:
        return f"baseline.batch_size (now {study.baseline.batch_size}), or {width}"
    if called & {"train", "recalibrate_bn"}:
        return f"finetune.batch_size (now {study.finetune.batch_size}), or {width}"
    return width


def run_method_ratio(sweep, tuner, method: str, ratio, *, force=False) -> list[RunResult]:
    """The parent run of one (method, ratio): tuning (if any), then one final run per seed (per
    Pareto point, each tagged ``pareto_index``, with ``tuning.mode: pareto``).

    ``force`` (``--rerun``): a new parent and new final runs even where finished ones exist; the
    Optuna study keeps its trials (its budget is met: no trial runs again). A final that misses
    its target fails (``bench.compressed.TargetMissed``); the others still run, then the pair fails.
    """
    from bench.compressed import TargetMissed  # torch: see the note on imports at the top
    from bench.runs import RunResult, RunSpec

    study = sweep.study
    spec = RunSpec.parent(study, method, ratio)
    done = None if force else sweep.tracker.finished(spec.key)
    if done is not None:  # everything below it finished: rebuild the results from MLflow
        keys = [k for k in done.data.tags.get("final_keys", "").split(",") if k]
        runs = [sweep.tracker.finished(k) for k in keys]
        if keys and all(runs):
            return [RunResult.recorded(r, skipped=True) for r in runs]
    results, misses = [], []
    pareto = tuner is not None and study.tuning.mode == "pareto"
    with sweep.tracker.run(spec.name, spec.tags(study.name, sweep.sha)) as parent:
        sets = _hyperparameter_sets(sweep, tuner, method, ratio, parent)
        for index, (hps, source) in enumerate(sets):
            for seed in study.seeds:
                tags = {"params_source": source}
                if pareto and source == "tuned":  # a point of the front (not the defaults)
                    tags["pareto_index"] = index
                final = RunSpec.final(study, method, ratio, seed, hps, extra_tags=tags)
                try:
                    results.append(sweep.compressed_run(final, parent=parent, force=force))
                except TargetMissed as err:  # that run is FAILED with the reason
                    misses.append(str(err))
        if tuner is None:
            parent.log_params({f"best.{k}": v for k, v in sets[0][0].items()})
        parent.set_tags({"final_keys": ",".join(r.run_key for r in results)})
        if misses:
            raise TargetMissed(f"{len(misses)} final run(s) missed the target: {misses[0]}")
    return results


if __name__ == "__main__":
    sys.exit(main_guard(main, "bench.sweep")())
