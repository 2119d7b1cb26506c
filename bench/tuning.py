"""Optuna tuning of each (method, ratio) on the validation split, resumable across kills.

One Optuna study per (sweep study, model, dataset, method, ratio) in the sweep's storage. Each trial
asks the method's own ``search_space`` (``study.ask(fixed_distributions)``: methods never see a
trial), compresses the baseline, fine-tunes for ``tuning.epochs`` and reports validation top-1 per
epoch, so the pruner stops hopeless trials (sampler and pruner by name: ``bench.samplers``). The
objective is validation accuracy subject to the achieved params ratio meeting the target
(``trial.set_constraint``); ``mode: pareto`` maximises accuracy and minimises MACs with NSGA-II
instead, or, with ``objectives: [val_top1, latency]``, maximises the measured speedup of the
trial's deployed model (timed briefly, interleaved with the dense baseline). The test split is
never used here.

The first trial of a new study runs the method's defaults (``tuning.defaults_first``), so the
tuned configuration is never below the defaults on validation; a defaults trial whose process
died is queued again. A study remembers a fingerprint of
what its trials' values depend on besides their parameters (fixed hyperparameters, fine-tuning
recipe, baseline, trial epochs, the method's code); a sweep with other settings gets a study of
its own (``name#<fingerprint>``) instead of mixing two objectives in one.

The budget counts COMPLETE trials, so a rerun finishes it exactly and never grows it. Trials left
RUNNING by a dead process on this host are marked FAIL at the next start (their MLflow runs KILLED
by ``bench.tracking``); workers on other machines are covered by the storage heartbeat.
"""

from __future__ import annotations

import math
import os
from typing import Any

import optuna
from optuna.trial import TrialState

from bench.cli import disk_full, is_out_of_memory
from bench.runner import Sweep
from bench.runs import BaselineSpec, RunSpec, after_compression, code_key, method_defaults
from bench.samplers import PRUNERS, SAMPLERS, pareto_sampler
from bench.stores import StoreError, open_optuna_storage
from bench.study import config_hash
from bench.tracking import worker_id, worker_is_dead
from bench.training import NonFiniteLoss
from methods.base import MethodConfigError, Target, get_method_class

__all__ = ["Tuner"]

optuna.logging.set_verbosity(optuna.logging.WARNING)

_CONSTRAINT = "params_ratio_shortfall"


class _Pruned(optuna.TrialPruned):
    """Raised from the epoch callback; the trial's MLflow run ends FINISHED, tagged PRUNED."""

    run_status = "FINISHED"


class Tuner:
    """Runs the tuning stage of a :class:`bench.runner.Sweep` (one Optuna study per (method,
    ratio) in the storage at ``storage_url``)."""

    def __init__(
        self, sweep: Sweep, storage_url: str, storage: optuna.storages.RDBStorage | None = None
    ) -> None:
        """``storage``: the store at ``storage_url`` as :func:`bench.stores.open_stores` opened
        and checked it before the sweep started (None: opened, and checked, on first use; with
        nothing at ``storage_url`` yet, a dry run reads it as empty)."""
        self.sweep = sweep
        self.cfg = sweep.study.tuning
        self.storage_url = storage_url
        self._storage = storage

    @property
    def storage(self) -> optuna.storages.RDBStorage:
        """The Optuna storage (created and checked by ``bench.stores`` if not given)."""
        if self._storage is None:
            self._storage = open_optuna_storage(self.storage_url, say=self.sweep.say)
        return self._storage

    def base_name(self, method: str, ratio) -> str:
        s = self.sweep.study
        return f"{s.name}/{s.model}/{s.dataset}/{method}/{Target.parse(ratio).label}"

    def fingerprint(self, method: str) -> str:
        """A hash of everything a trial's value depends on besides its own parameters."""
        study = self.sweep.study
        return config_hash(
            {
                "fixed": method_defaults(study, method),
                "searched": sorted(self._space(method)),
                "baseline": BaselineSpec.of(study, study.seeds[0]).key,
                **after_compression(study.finetune, study.bn_recalibration_batches),
                **code_key(method),  # the method's code: a fix gets a study of its own
                "tuning": {k: getattr(self.cfg, k) for k in ("epochs", "mode", "metric")}
                # the default (MACs) is left out: studies made before objectives keep their name
                | ({"cost": self.cfg.objectives[1]} if self._cost != "macs" else {}),
            }
        )

    @property
    def _cost(self) -> str:
        """The Pareto mode's cost objective: "macs" (minimised) or "latency" (as speedup,
        maximised)."""
        return self.cfg.objectives[1]

    def study_name(self, method: str, ratio) -> str:
        """``study/model/dataset/method/ratio``; ``#<fingerprint>`` appended when a study of
        that name exists but was tuned under other fixed settings (method_args, fine-tuning
        recipe, baseline, trial epochs): trials of different objectives are never mixed."""
        base, fp = self.base_name(method, ratio), self.fingerprint(method)
        known = self._fingerprints().get(base, fp)
        return base if known in (fp, None) else f"{base}#{fp[:8]}"

    def _fingerprints(self) -> dict[str, str | None]:
        """Existing studies' fingerprints by name, read-only (None: made before fingerprints).

        A store that cannot be read is an error, never "no studies": that would skip the
        fingerprint check and mix the trials of two objectives in one study.
        """
        storage = self._storage
        if storage is None:
            path = self.storage_url.removeprefix("sqlite:///")
            if self.storage_url.startswith("sqlite:///") and not os.path.exists(path):
                return {}  # nothing stored yet (a dry run before the first sweep)
            storage = self.storage
        try:
            studies = storage.get_all_studies()
        except Exception as err:  # SQLAlchemy and Optuna raise many types
            raise StoreError(
                f"Optuna storage {self.storage_url}: cannot read its studies to check their "
                f"fingerprints ({' '.join(str(err).split())[:200]})"
            ) from None
        return {s.study_name: s.user_attrs.get("fingerprint") for s in studies}

    def _space(self, method: str) -> dict[str, Any]:
        """The method's search space minus the hyperparameters the study fixes."""
        fixed = set(self.sweep.study.method_args.get(method, {}))
        space = get_method_class(method).search_space
        return {k: v for k, v in space.items() if k not in fixed}

    def _study(self, method: str, ratio) -> optuna.Study:
        study = self._create(method, ratio)
        if "fingerprint" not in study.user_attrs:
            study.set_user_attr("fingerprint", self.fingerprint(method))
        return study

    def _enqueue_defaults(self, study: optuna.Study, method: str) -> None:
        """Queue the defaults trial (``tuning.defaults_first``) in a new study, and again where
        the defaults trial's process died (:meth:`_fail_stale`, called first, marks it): a
        resumed study tunes the same trials as an uninterrupted one."""
        trials = study.get_trials(deepcopy=False)
        last = [t for t in trials if t.user_attrs.get("source") == "defaults"][-1:]
        died = bool(last) and last[0].state == TrialState.FAIL and last[0].user_attrs.get("stale")
        if not self.cfg.defaults_first or (trials and not died):
            return
        defaults = method_defaults(self.sweep.study, method)
        study.enqueue_trial(
            {k: defaults[k] for k in self._space(method)}, user_attrs={"source": "defaults"}
        )

    def _create(self, method: str, ratio) -> optuna.Study:
        """Create (or load) the Optuna study of (method, ratio), its sampler and pruner by name."""
        cfg = self.cfg
        if cfg.mode == "pareto":  # accuracy up, cost down; Optuna cannot prune multi-objective
            cost = "minimize" if self._cost == "macs" else "maximize"  # latency: as speedup
            how = {"directions": ["maximize", cost], "sampler": pareto_sampler(cfg)}
        else:
            how = {
                "direction": "maximize",
                "sampler": SAMPLERS[cfg.sampler](cfg),
                "pruner": PRUNERS[cfg.pruner](cfg),
            }
        return optuna.create_study(
            storage=self.storage,
            study_name=self.study_name(method, ratio),
            load_if_exists=True,
            **how,
        )

    # --------------------------------------------------------------------------------- status
    def status(self, method: str, ratio) -> str:
        """ "C/N complete" for the dry-run plan, without creating anything."""
        name = self.study_name(method, ratio)
        if name not in self._fingerprints():
            return f"0/{self.cfg.trials} trials complete"
        loaded = optuna.load_study(study_name=name, storage=self.storage)
        done = len(loaded.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        return f"{min(done, self.cfg.trials)}/{self.cfg.trials} trials complete"

    def _fail_stale(self, study: optuna.Study) -> int:
        """Mark FAIL the trials left RUNNING by a dead process of this host; returns how many."""
        storage, n = self.storage, 0
        study_id = storage.get_study_id_from_name(study.study_name)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if worker_is_dead(trial.user_attrs.get("worker", "")):
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                storage.set_trial_user_attr(trial_id, "stale", True)
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
                n += 1
        return n

    # ---------------------------------------------------------------------------------- tuning
    def tune(self, method: str, ratio, parent) -> list[tuple[dict[str, Any], str]]:
        """Run the missing trials, then return the hyperparameter sets for the final runs."""
        sweep, cfg = self.sweep, self.cfg
        study = self._study(method, ratio)
        stale = self._fail_stale(study)
        if stale:
            sweep.say(f"tune {method} @ {ratio}: {stale} stale trials marked FAIL")
        self._enqueue_defaults(study, method)
        space = self._space(method)
        defaults = method_defaults(sweep.study, method)
        target = Target.parse(ratio)
        parent.set_tags({"optuna_study": study.study_name, "optuna_storage": self.storage_url})

        def complete() -> int:
            return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

        # every trial ends COMPLETE, PRUNED or FAIL; only COMPLETE ones count towards the budget,
        # with a cap on attempts so a method that always fails cannot loop forever
        attempts = 0
        while complete() < cfg.trials and attempts < 3 * cfg.trials:
            attempts += 1
            self._one_trial(study, method, ratio, target, space, defaults, parent)
        done = complete()
        parent.log_metrics({"trials_used": done})
        sweep.say(f"tune {method} @ {target.label}: {done}/{cfg.trials} complete trials")
        return self._best(study, defaults, parent)

    def _one_trial(self, study, method, ratio, target, space, defaults, parent) -> None:
        """Ask one trial, run it (``bench.runs.RunSpec.trial``) and tell Optuna how it ended."""
        sweep, pareto = self.sweep, self.cfg.mode == "pareto"
        trial = study.ask(fixed_distributions=space)
        trial.set_user_attr("worker", worker_id())
        hps = {**defaults, **trial.params}
        spec = RunSpec.trial(
            sweep.study, method, ratio, hps, number=trial.number, optuna_study=study.study_name
        )
        key = spec.key
        n_reports = math.ceil(spec.finetune_epochs - 1e-9)  # one per (possibly partial) epoch

        def on_epoch(result):
            if not pareto:  # Optuna has no pruning for multi-objective studies
                report(trial, result.val_top1, result.epoch, n_reports)

        try:
            res = sweep.compressed_run(spec, parent=parent, on_epoch=on_epoch)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            self._tag_state(key, "PRUNED")
            return
        except (NonFiniteLoss, MethodConfigError, RuntimeError, ValueError) as err:
            if disk_full(err):  # not the trial's fault: stop the sweep (bench.cli)
                raise
            trial.set_user_attr("error", " ".join(str(err).split())[:300])
            study.tell(trial, state=TrialState.FAIL)
            self._tag_state(key, "FAIL")
            if is_out_of_memory(err):  # so would every further trial: the sweep stops
                raise
            sweep.say(f"trial {trial.number} of {method} failed: {str(err)[:160]}")
            return
        m = res.metrics
        achieved = m.get("params_ratio", 0.0)
        # > 0: outside the target's band, either side (the finals' check, bench.compressed)
        miss = 0.0
        if target.ratio:
            low, high = target.bounds()
            miss = max(low - achieved, achieved - high)
        trial.set_constraint(_CONSTRAINT, miss)
        cost = m["macs"] if self._cost == "macs" else m["speedup"]
        values = [m["val_top1"], cost] if pareto else m["val_top1"]
        study.tell(trial, values)
        self._tag_state(key, "COMPLETE")

    def _tag_state(self, key: str, state: str) -> None:
        runs = self.sweep.tracker.runs(f"tags.run_key = '{key}'")
        for run in runs:
            self.sweep.tracker.client.set_tag(run.info.run_id, "trial_state", state)

    def _best(self, study, defaults, parent) -> list[tuple[dict[str, Any], str]]:
        feasible = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if all(v <= 0 for v in t.constraints.values())
        ]
        if not feasible:
            parent.set_tags({"tuning_note": "no feasible complete trial: finals use defaults"})
            return [(defaults, "default")]
        if self.cfg.mode == "pareto":
            signs = (1, -1 if self._cost == "macs" else 1)  # +1: more is better
            front, seen = [], set()
            for t in sorted(feasible, key=lambda t: t.number):
                key = tuple(sorted(t.params.items()))  # a point sampled twice runs once
                if key not in seen and not any(_dominates(o, t, signs) for o in feasible):
                    seen.add(key)
                    front.append(t)
            parent.set_tags({"pareto_trials": ",".join(str(t.number) for t in front)})
            return [({**defaults, **t.params}, "tuned") for t in front]
        best = max(feasible, key=lambda t: (t.value, -t.number))
        parent.log_params({f"best.{k}": v for k, v in {**defaults, **best.params}.items()})
        parent.set_tags({"best_trial": best.number})
        return [({**defaults, **best.params}, "tuned")]


def report(trial: optuna.Trial, value: float, epoch: int, n_reports: int) -> None:
    """Report epoch ``epoch`` (1-based) of ``n_reports``; raise if the pruner says stop.

    Never prunes at the last report: the trial has already paid for all its epochs, and a
    PRUNED trial does not count towards the budget, so pruning it then would only waste it.
    """
    trial.report(value, epoch - 1)
    if epoch < n_reports and trial.should_prune():
        raise _Pruned(f"pruned at epoch {epoch}: val {value:.2f}%")


def _dominates(a, b, signs=(1, -1)) -> bool:
    """Trial a dominates trial b: no worse in every objective and better in one; ``signs``
    says per objective whether more (+1) or less (-1) is better."""
    va = [s * v for s, v in zip(signs, a.values, strict=True)]
    vb = [s * v for s, v in zip(signs, b.values, strict=True)]
    return all(x >= y for x, y in zip(va, vb)) and any(x > y for x, y in zip(va, vb))
