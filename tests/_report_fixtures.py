"""A fake study written straight into a temporary MLflow store, following the harness's schema.

``write_fake_store(root)`` creates ``root/mlflow.db`` (experiments ``fakestudy``, ``evilstudy``,
``nometrics``, ``emptystudy``, ``paretostudy``) and ``root/optuna.db`` (two tuning studies) and
returns their URIs. The numbers are chosen so that tests can check means, stds and the bold marks
by hand (see TOP1; PARETO for the study tuned with ``tuning.mode: pareto``).
"""

from __future__ import annotations

import warnings

import optuna
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

STUDY = "fakestudy"
MODEL, DATASET = "vgg16_bn_cifar", "cifar10"  # matches a reference row in sweeps/reference.yaml
SEEDS = (0, 1)
RATIOS = ("2", "4")
METHODS = {  # name: (family, structured)
    "dct_pruning": ("frequency", True),
    "freq_lowrank": ("frequency", True),
    "magnitude": ("spatial", False),
}
DENSE_PARAMS, DENSE_MACS, DENSE_LATENCY_MS = 15_000_000, 314_000_000, 10.0
BASELINE_TOP1 = {0: 91.0, 1: 91.4}
# Seed 0's test top-1; seed 1 scores exactly one point more, so every std is sqrt(0.5) = 0.71.
# Best per ratio: magnitude at "2" (90.10 mean), freq_lowrank at "4" (88.50 mean).
TOP1 = {
    ("dct_pruning", "2"): 89.0,
    ("dct_pruning", "4"): 87.0,
    ("freq_lowrank", "2"): 88.0,
    ("freq_lowrank", "4"): 88.0,
    ("magnitude", "2"): 89.6,
    ("magnitude", "4"): 87.8,
}
NO_FINAL = ("svd", "2")  # a parent run, no final run
FAILED_FINAL = ("l1_filter", "4")  # a parent run whose final run FAILED
FAILED_ERROR = "RuntimeError: out of memory"
TUNED = f"{STUDY}/dct_pruning/2"  # Optuna study with 4 complete trials
TUNED_BEST = 87.0  # best objective among the feasible trials of TUNED
TUNED_ONE = f"{STUDY}/freq_lowrank/2"  # Optuna study with 1 complete trial (no importances)
TUNED_PARETO = f"{STUDY}/magnitude/4"  # two objectives (accuracy, MACs), 3 trials
SCRIPT = "<script>alert(1)</script>"  # a method tag that must not become markup
STUDY_YAML = "name: fakestudy\nmodel: vgg16_bn_cifar\ndataset: cifar10\nratios: [2, 4]\n"
# paretostudy (tuning.mode: pareto): (method, ratio) -> test top-1 (seed 0) and MACs ratio of each
# point of the front, by pareto_index; seed 1 scores one point more. dct_pruning @ 4's second point
# FAILED (it missed its target); magnitude @ 2 had no feasible trial: one final of the defaults.
PARETO_STUDY = "paretostudy"
PARETO = {
    ("dct_pruning", "2"): [(89.0, 1.2), (88.0, 1.6), (86.0, 2.0)],
    ("dct_pruning", "4"): [(85.0, 3.0)],
}
PARETO_FAILED = ("dct_pruning", "4", "1")
PARETO_ERROR = "TargetMissed: achieved params ratio 3.500x misses the target 4x"
PARETO_DEFAULTS = ("magnitude", "2")


def code_version(method: str | None = None) -> str:
    """The ``code_version`` tag of a run (harness 1, a made-up method fingerprint)."""
    return "h1" if method is None else f"h1-{sum(map(ord, method)):08x}"


class _Writer:
    """Creates runs with increasing start times (so that the order of runs is known)."""

    def __init__(self, client: MlflowClient, experiment_id: str) -> None:
        self.client, self.experiment_id, self.clock = client, experiment_id, 1_700_000_000_000

    def run(
        self,
        tags: dict[str, str],
        metrics: dict[str, float] | None = None,
        params: dict[str, str] | None = None,
        status: str = "FINISHED",
        parent: str | None = None,
    ) -> str:
        self.clock += 1000
        tags = dict(tags)
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, start_time=self.clock, tags=tags)
        run_id = run.info.run_id
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), self.clock, 0) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
        )
        if status != "RUNNING":
            self.client.set_terminated(run_id, status, end_time=self.clock + 500)
        return run_id


def _common(stage: str, seed: int = 0, model: str = MODEL) -> dict[str, str]:
    return {
        "study": STUDY,
        "stage": stage,
        "model": model,
        "dataset": DATASET,
        "seed": str(seed),
        "run_key": f"{stage}-{seed}",
        "git_sha": "0" * 40,
        "code_version": code_version(),
    }


def _compressed(method: str, ratio: str, stage: str, seed: int = 0, **extra: str) -> dict[str, str]:
    family, structured = METHODS.get(method, ("spatial", True))
    tags = _common(stage, seed, extra.pop("model", MODEL))
    tags.update(method=method, family=family, structured=str(structured).lower(), ratio=ratio)
    tags["run_key"] = f"{stage}-{method}-{ratio}-{seed}"
    tags["code_version"] = code_version(method)
    if stage == "final":  # what the headline speedup was measured on (bench.runner.latency_tags)
        tags |= LATENCY_TAGS
    return {**tags, **extra}


LATENCY_TAGS = {
    "latency_device": "cpu",
    "latency_backend": "torch",
    "latency_batch": "32",
    "latency_threads": "2",
    "latency_cases": "torch.cpu.b32,onnxruntime.cpu.b32",
}
ORT_FACTOR = 1.5  # the ONNX Runtime speedup of a final, x its torch speedup


def final_metrics(method: str, ratio: str, seed: int) -> dict[str, float]:
    """Plausible final-run metrics; the top-1 follows TOP1, the rest follows the ratio."""
    structured = METHODS[method][1]
    params_ratio = float(ratio) * (1.01 if structured else 1.0)
    macs_ratio = float(ratio) * 0.8 if structured else 1.0
    speedup = float(ratio) * 0.6 + 0.05 * seed if structured else 0.95
    top1 = TOP1[(method, ratio)] + seed
    cost = {
        k: v + seed * (k == "time_compress_s") for k, v in COMPRESS_COST.get(method, {}).items()
    }
    return {
        "test_top1": top1,
        "val_top1": top1 + 0.3,
        "test_top1_pre_ft": top1 - 10,
        "val_top1_pre_ft": top1 - 9.7,
        "baseline_test_top1": BASELINE_TOP1[seed],
        "baseline_val_top1": BASELINE_TOP1[seed] + 0.2,
        "params": DENSE_PARAMS / (params_ratio if structured else 1.0),
        "stored_params": DENSE_PARAMS / params_ratio,
        "macs": DENSE_MACS / macs_ratio,
        "latency_ms": DENSE_LATENCY_MS / speedup,
        "dense_params": DENSE_PARAMS,
        "dense_macs": DENSE_MACS,
        "dense_latency_ms": DENSE_LATENCY_MS,
        "params_ratio": params_ratio,
        "macs_ratio": macs_ratio,
        "speedup": speedup,
        "speedup.torch.cpu.b32": speedup,
        "speedup.onnxruntime.cpu.b32": speedup * ORT_FACTOR,
        "wall_time_s": 12.5,
        "epochs_total": 3,
        **cost,
    }


# The compression cost per method (seed 1 one second slower); magnitude's runs predate it.
COMPRESS_COST = {
    "dct_pruning": {"time_compress_s": 4.0, "compress_epochs": 0.0},
    "freq_lowrank": {"time_compress_s": 30.0, "compress_epochs": 2.5},
}


def _optuna_studies(storage: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {
        "band": optuna.distributions.CategoricalDistribution(["full", "low"]),
        "lam": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
    }
    study = optuna.create_study(study_name=TUNED, storage=storage, direction="maximize")
    # The best value (88.0) missed its ratio (constraint > 0): the best feasible one is TUNED_BEST.
    for band, lam, value, shortfall in [
        ("full", 1e-4, 85.0, 0.0),
        ("low", 1e-3, TUNED_BEST, -0.1),
        ("full", 3e-3, 86.0, 0.0),
        ("low", 1e-5, 88.0, 0.2),
    ]:
        trial = optuna.trial.create_trial(
            params={"band": band, "lam": lam},
            distributions=space,
            value=value,
            constraints={"ratio_shortfall": shortfall},
        )
        study.add_trial(trial)
    pareto = optuna.create_study(
        study_name=TUNED_PARETO, storage=storage, directions=["maximize", "minimize"]
    )
    with warnings.catch_warnings():  # set_metric_names is "experimental" since Optuna 3.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        pareto.set_metric_names(["val_acc", "macs"])
    for lam, acc, macs in [(1e-4, 80.0, 3e8), (1e-3, 82.0, 2e8), (1e-2, 81.0, 1e8)]:
        pareto.add_trial(
            optuna.trial.create_trial(
                params={"lam": lam}, distributions={"lam": space["lam"]}, values=[acc, macs]
            )
        )
    one = optuna.create_study(study_name=TUNED_ONE, storage=storage, direction="maximize")
    one.add_trial(
        optuna.trial.create_trial(
            params={"band": "full"}, distributions={"band": space["band"]}, value=80.0
        )
    )


def write_fake_store(root) -> tuple[str, str]:
    """Write the fake studies under ``root``; returns (tracking URI, Optuna storage URL)."""
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    storage = f"sqlite:///{root / 'optuna.db'}"
    _optuna_studies(storage)
    client = MlflowClient(tracking_uri=tracking)
    artifacts = (root / "artifacts").as_uri()
    w = _Writer(client, client.create_experiment(STUDY, artifact_location=artifacts))
    for seed in SEEDS:
        base = w.run(
            _common("baseline", seed),
            {
                "test_top1": BASELINE_TOP1[seed],
                "val_top1": 90.0,
                "params": DENSE_PARAMS,
                "macs": DENSE_MACS,
            },
        )
        if seed == 0:
            client.log_text(base, STUDY_YAML, "study.yaml")
    for method in METHODS:
        for ratio in RATIOS:
            tuned = f"{STUDY}/{method}/{ratio}" in {TUNED, TUNED_ONE, TUNED_PARETO}
            tags = (
                {"optuna_study": f"{STUDY}/{method}/{ratio}", "optuna_storage": storage}
                if tuned
                else {}
            )
            parent = w.run(
                _compressed(method, ratio, "parent", **tags), {"trials_used": 4 if tuned else 0}
            )
            w.run(
                _compressed(method, ratio, "tune", trial_number="0", trial_state="COMPLETE"),
                {"val_top1": 80.0, "params_ratio": float(ratio), "macs_ratio": 1.0},
                parent=parent,
            )
            for seed in SEEDS:
                w.run(
                    _compressed(method, ratio, "final", seed, params_source="tuned"),
                    final_metrics(method, ratio, seed),
                    {"hp.band": "full", "target_ratio": ratio, "finetune.epochs": 3},
                    parent=parent,
                )
    w.run(_compressed(*NO_FINAL, "parent"), {"trials_used": 0})
    parent = w.run(_compressed(*FAILED_FINAL, "parent"), {"trials_used": 0})
    w.run(_compressed(*FAILED_FINAL, "final", error=FAILED_ERROR), status="FAILED", parent=parent)

    # Run data that tries to write outside --out.
    w = _Writer(client, client.create_experiment("evilstudy", artifact_location=artifacts))
    evil = {"optuna_study": "../../evil", "optuna_storage": storage}
    parent = w.run(
        _compressed("../../evil", "../x", "parent", model="../../m", **evil), {"trials_used": 1}
    )
    metrics = final_metrics("magnitude", "2", 0)
    w.run(_compressed("../../evil", "../x", "final", model="../../m"), metrics, parent=parent)
    w.run(_compressed(SCRIPT, "2", "parent", error=SCRIPT), status="FAILED")

    w = _Writer(client, client.create_experiment("nometrics", artifact_location=artifacts))
    metrics = {k: v for k, v in final_metrics("dct_pruning", "2", 0).items() if k != "speedup"}
    w.run(_compressed("dct_pruning", "2", "final"), metrics)

    client.create_experiment("emptystudy", artifact_location=artifacts)
    _pareto_study(client, artifacts)
    return tracking, storage


def _pareto_study(client: MlflowClient, artifacts: str) -> None:
    """The ``paretostudy`` experiment: finals of every point of the fronts (see PARETO)."""
    w = _Writer(client, client.create_experiment(PARETO_STUDY, artifact_location=artifacts))

    def run(tags: dict[str, str], *args, **kwargs) -> str:
        return w.run({**tags, "study": PARETO_STUDY}, *args, **kwargs)

    for seed in SEEDS:
        metrics = {"test_top1": BASELINE_TOP1[seed], "params": DENSE_PARAMS, "macs": DENSE_MACS}
        run(_common("baseline", seed), metrics)
    for (method, ratio), points in PARETO.items():
        failed = (method, ratio) == PARETO_FAILED[:2]
        front = ",".join(str(3 * i) for i in range(len(points) + failed))  # trial numbers
        parent = run(_compressed(method, ratio, "parent", pareto_trials=front), {"trials_used": 6})
        for index, (top1, macs_ratio) in enumerate(points):
            for seed in SEEDS:
                metrics = final_metrics(method, ratio, seed)
                metrics |= {"test_top1": top1 + seed, "macs_ratio": macs_ratio}
                metrics["macs"] = DENSE_MACS / macs_ratio
                tags = _compressed(method, ratio, "final", seed, pareto_index=str(index))
                run({**tags, "run_key": f"{tags['run_key']}-p{index}"}, metrics, parent=parent)
        if failed:
            index = PARETO_FAILED[2]
            tags = _compressed(method, ratio, "final", 0, pareto_index=index, error=PARETO_ERROR)
            run(tags, {"params_ratio": 3.5}, status="FAILED", parent=parent)
    parent = run(_compressed(*PARETO_DEFAULTS, "parent"), {"trials_used": 6})
    for seed in SEEDS:
        tags = _compressed(*PARETO_DEFAULTS, "final", seed, params_source="default")
        run(tags, final_metrics(*PARETO_DEFAULTS, seed), parent=parent)
