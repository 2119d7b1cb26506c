"""Tuning views: per (method, ratio) with an Optuna study, its trial history and param importances.

The study name and storage URL come from the parent run's tags ``optuna_study`` and
``optuna_storage`` (``--storage`` overrides the URL). A study that cannot be read, or too few trials
for importances, gives a short note instead of a plot: the report is still written.

Trials that break their constraint (``trial.set_constraint``: the harness's achieved-ratio check)
are drawn hollow and never count as the best. Of a multi-objective study (the harness's ``pareto``
mode: accuracy and MACs), the views show the first objective.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bench.paths import atomic_path, default_storage
from reports._common import (
    TIMES,
    family_key,
    inside,
    mask_credentials,
    one_line,
    ratio_key,
)
from reports.aggregate import RUN_KEY, latest_per_key, with_tags
from reports.load import StudyRuns, sqlite_path
from reports.plots import save_figure

__all__ = ["TuningView", "tuning_views"]

_DPI = 110  # small PNGs: the views are for a screen, not for print


@dataclass(frozen=True)
class TuningView:
    """What the report shows about one tuning study.

    Attributes:
        model: Model tag.
        dataset: Dataset tag.
        method: Method tag.
        ratio: Ratio label.
        optuna_study: The Optuna study name.
        storage: Where it was read (credentials masked).
        n_complete: COMPLETE trials found (0 when the study could not be read).
        best: The best feasible value of the (first) objective, NaN when none.
        history: PNG of the objective per trial and the best so far, if drawn.
        importance: PNG of the hyperparameters' importances, if drawn.
        notes: Why something is not drawn (one line each).
        files: Every file written for this view.
    """

    model: str
    dataset: str
    method: str
    ratio: str
    optuna_study: str
    storage: str
    n_complete: int
    best: float
    history: Path | None
    importance: Path | None
    notes: tuple[str, ...]
    files: tuple[Path, ...]


def _parents(study: StudyRuns) -> pd.DataFrame:
    """The parent run (see ``latest_per_key``) of each (model, dataset, method, ratio) with a
    tuning study, in table order."""
    parents = with_tags(study.stage("parent"))
    parents = latest_per_key(parents[parents["tags.optuna_study"] != ""], RUN_KEY)
    keys = [
        (model, dataset, ratio_key(ratio), family_key(family), method)
        for model, dataset, ratio, family, method in parents[
            ["tags.model", "tags.dataset", "tags.ratio", "tags.family", "tags.method"]
        ].to_numpy()
    ]
    return parents.iloc[sorted(range(len(keys)), key=keys.__getitem__)]


def _load(name: str, storage: str) -> optuna.Study:
    db = sqlite_path(storage)
    if db is not None and not db.is_file():
        raise LookupError(f"Optuna storage {mask_credentials(storage)} does not exist")
    return optuna.load_study(study_name=name, storage=storage)


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE,)
    return study.get_trials(deepcopy=False, states=states)


def _feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Optuna's own rule: every constraint value <= 0 (a trial without constraints is feasible)."""
    return all(value <= 0.0 for value in trial.constraints.values())


def _maximize(study: optuna.Study) -> bool:
    return study.directions[0] == optuna.study.StudyDirection.MAXIMIZE


def _best(study: optuna.Study) -> float:
    """Best feasible value of the first objective; NaN without a feasible complete trial."""
    values = [t.values[0] for t in _complete(study) if _feasible(t)]
    if not values:
        return math.nan
    return max(values) if _maximize(study) else min(values)


def _history(study: optuna.Study, title: str, stem: Path) -> Path:
    """First objective per complete trial, the best feasible so far, pruned trials' last report."""
    trials = _complete(study)
    numbers = np.array([t.number for t in trials])
    values = np.array([t.values[0] for t in trials], dtype=float)
    feasible = np.array([_feasible(t) for t in trials], dtype=bool)
    maximize = _maximize(study)
    worst = -np.inf if maximize else np.inf
    best = np.where(feasible, values, worst)
    best = np.maximum.accumulate(best) if maximize else np.minimum.accumulate(best)
    best[~np.isfinite(best)] = np.nan  # no feasible trial yet: no line
    fig = Figure(figsize=(4.2, 2.6))
    ax = fig.add_subplot()
    ax.plot(numbers[feasible], values[feasible], "o", ms=4, color="tab:blue", label="complete")
    if (~feasible).any():
        ax.plot(
            numbers[~feasible], values[~feasible], "o", ms=4, mfc="none", color="0.45",
            label="infeasible (constraint)",
        )  # fmt: skip
    ax.step(numbers, best, where="post", color="tab:orange", lw=1.5, label="best so far")
    pruned = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
    pruned = [t for t in pruned if t.intermediate_values]
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        numbers_pruned = [t.number for t in pruned]
        ax.plot(numbers_pruned, last, "x", ms=4, color="0.55", label="pruned (last report)")
    objective = study.metric_names[0] if study.metric_names else "objective"
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Trial number")
    ax.set_ylabel(f"{objective} ({'maximised' if maximize else 'minimised'})")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3, lw=0.6)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, stem, formats=("png",), dpi=_DPI)[0]


def _varying_params(trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    """Params present in every complete trial that take more than one value across them."""
    common = set.intersection(*(set(t.params) for t in trials)) if trials else set()
    return sorted(p for p in common if len({repr(t.params[p]) for t in trials}) > 1)


def _importance(study: optuna.Study, title: str, stem: Path) -> tuple[Path | None, str | None]:
    """A bar chart of fANOVA importances, or (None, why not)."""
    complete = _complete(study)
    varying = _varying_params(complete)
    if len(complete) < 2 or not varying:
        return None, (
            f"no importances: they need >= 2 complete trials and >= 1 varying hyperparameter "
            f"(this study: {len(complete)} complete, varying: {', '.join(varying) or 'none'})"
        )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # seeded: same bars every time
    try:
        importances = optuna.importance.get_param_importances(
            study,
            evaluator=evaluator,
            params=varying,
            target=(lambda t: t.values[0]) if len(study.directions) > 1 else None,
        )
    # fANOVA on a handful of trials can fail in many ways (a constant objective, degenerate trees);
    # the report notes it and goes on rather than losing the rest of the page.
    except Exception as error:
        return None, f"no importances: {one_line(error)}"
    names = sorted(importances, key=lambda p: (importances[p], p))
    fig = Figure(figsize=(4.2, 0.6 + 0.35 * len(names)))
    ax = fig.add_subplot()
    ax.barh(names, [importances[p] for p in names], color="tab:green")
    ax.set_xlabel("Importance (fANOVA, share of variance)")
    ax.set_xlim(0, 1)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, stem, formats=("png",), dpi=_DPI)[0], None


def _draw(study: optuna.Study, title: str, folder: Path) -> tuple[list[Path], list[str]]:
    """Write the history and importances of a readable study; returns (files, notes)."""
    files: list[Path] = []
    notes: list[str] = []
    if len(study.directions) > 1:
        names = study.metric_names or [f"objective {i + 1}" for i in range(len(study.directions))]
        notes.append(f"multi-objective study ({', '.join(names)}): the views show the first")
    folder.mkdir(parents=True, exist_ok=True)
    if _complete(study):
        files.append(_history(study, title, folder / "history"))
    else:
        notes.append("no complete trial yet: no history")
    importance, note = _importance(study, title, folder / "importance")
    if importance is not None:
        files.append(importance)
    if note:
        notes.append(note)
        files.append(folder / "importance.txt")
        with atomic_path(files[-1]) as tmp:
            tmp.write_text(note + "\n", encoding="utf-8")
    return files, notes


def _view(parent: pd.Series, out: Path, storage: str | None) -> TuningView:
    """The tuning view of one parent run (files under its own folder)."""
    model, dataset = parent["tags.model"], parent["tags.dataset"]
    method, ratio, name = parent["tags.method"], parent["tags.ratio"], parent["tags.optuna_study"]
    url = storage or parent["tags.optuna_storage"] or default_storage()
    numeric = ratio_key(ratio)[0] == 0
    title = f"{method} at {ratio}{TIMES}" if numeric else f"{method} ({ratio})"
    title += f" ({model}, {dataset})"
    try:
        study = _load(name, url)
    # A missing or unreadable storage (moved file, server down, study deleted) costs one view.
    except Exception as error:
        study, files, notes = None, [], [f"cannot read Optuna study {name!r}: {one_line(error)}"]
    else:
        folder = inside(out, model, dataset, "tuning", method, ratio)
        files, notes = _draw(study, title, folder)
    pngs = {p.stem: p for p in files if p.suffix == ".png"}
    return TuningView(
        model=model,
        dataset=dataset,
        method=method,
        ratio=ratio,
        optuna_study=name,
        storage=mask_credentials(url),
        n_complete=len(_complete(study)) if study is not None else 0,
        best=_best(study) if study is not None else math.nan,
        history=pngs.get("history"),
        importance=pngs.get("importance"),
        notes=tuple(notes),
        files=tuple(files),
    )


def tuning_views(study: StudyRuns, out: Path, storage: str | None = None) -> list[TuningView]:
    """Draw the tuning views of every (method, ratio) that has an Optuna study.

    Args:
        study: The study's runs.
        out: Report folder; files go to ``out/<model>/<dataset>/tuning/<method>/<ratio>/``.
        storage: Optuna storage URL overriding the parent runs' ``optuna_storage`` tags.

    Returns:
        One view per parent run with an ``optuna_study`` tag, sorted like the tables.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return [_view(parent, out, storage) for _, parent in _parents(study).iterrows()]
