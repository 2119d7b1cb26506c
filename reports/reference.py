"""Published numbers from the papers (``sweeps/reference.yaml``), checked and made comparable.

They become "reported" rows in the table of the matching (model, dataset): shown beside the measured
rows, never mixed with them and never ranked. The file format is described at its top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reports._common import ReportError, one_line

__all__ = ["DEFAULT_REFERENCE", "METRIC_KEYS", "Reference", "load_references"]

# The repository's copy; an installed package without the sweeps/ folder simply has no references.
DEFAULT_REFERENCE = Path(__file__).resolve().parents[1] / "sweeps" / "reference.yaml"

METRIC_KEYS = frozenset(
    {
        "top1",
        "baseline_top1",
        "top5",
        "baseline_top5",
        "params",
        "baseline_params",
        "params_reduction",
        "macs",
        "baseline_macs",
        "macs_reduction",
        "speedup",
    }
)
_REQUIRED = ("paper", "method", "model", "dataset", "metrics", "source")
_OPTIONAL = ("paper_model", "paper_dataset")


@dataclass(frozen=True)
class Reference:
    """One published result.

    Attributes:
        paper: Authors, title, venue.
        method: Our registry name of the paper's method.
        model: Our model name; ``paper_model`` is the paper's.
        dataset: Our dataset name; ``paper_dataset`` is the paper's.
        metrics: Numbers by key of :data:`METRIC_KEYS` (accuracies and reductions in percent); a
            reduction the paper gives only as two counts is filled in.
        source: Where in the paper the numbers are.
    """

    paper: str
    method: str
    model: str
    dataset: str
    metrics: dict[str, float] = field(hash=False)
    source: str
    paper_model: str = ""
    paper_dataset: str = ""


def _reduction(metrics: dict[str, float], what: str) -> None:
    """Fill ``<what>_reduction`` (percent) from ``<what>`` and ``baseline_<what>`` if it lacks."""
    count, base = metrics.get(what), metrics.get(f"baseline_{what}")
    if f"{what}_reduction" not in metrics and count is not None and base:
        metrics[f"{what}_reduction"] = 100.0 * (1.0 - count / base)


def _entry(raw: Any, where: str) -> Reference:
    if not isinstance(raw, dict):
        raise ReportError(f"{where}: each entry must be a mapping with keys {', '.join(_REQUIRED)}")
    missing = [key for key in _REQUIRED if key not in raw]
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        what = (
            f"lacks {', '.join(missing)}" if missing else f"has unknown key(s) {', '.join(unknown)}"
        )
        raise ReportError(f"{where} {what}: allowed keys are {', '.join(_REQUIRED + _OPTIONAL)}")
    metrics = raw["metrics"]
    if not isinstance(metrics, dict) or not metrics:
        raise ReportError(f"{where}: 'metrics' must be a non-empty mapping")
    bad = sorted(str(k) for k in metrics if k not in METRIC_KEYS)
    if bad:
        raise ReportError(
            f"{where}: unknown metric(s) {', '.join(bad)}; known: {', '.join(sorted(METRIC_KEYS))}"
        )
    numbers: dict[str, float] = {}
    for key, value in metrics.items():
        # bool is an int in Python; "9.2e6" without an exponent sign is a string in YAML 1.1.
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ReportError(f"{where}: metric {key} = {value!r} is not a finite number")
        numbers[key] = float(value)
    _reduction(numbers, "params")
    _reduction(numbers, "macs")
    text = {key: str(raw.get(key, "")) for key in _REQUIRED + _OPTIONAL if key != "metrics"}
    return Reference(metrics=numbers, **text)


def load_references(path: Path | None) -> list[Reference]:
    """Read and check a reference file; ``None`` or a missing default file gives no references.

    Raises:
        ReportError: the file is unreadable, not a YAML list, or an entry breaks the format.
    """
    if path is None:
        return []
    path = Path(path)
    if not path.is_file():
        if path == DEFAULT_REFERENCE:
            return []
        raise ReportError(f"reference file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ReportError(f"cannot read reference file {path}: {one_line(error)}") from None
    if data is None:
        return []
    if not isinstance(data, list):
        raise ReportError(f"reference file {path} must be a YAML list of entries")
    refs = [_entry(raw, f"{path.name} entry {i + 1}") for i, raw in enumerate(data)]
    return sorted(refs, key=lambda r: (r.model, r.dataset, r.method, r.paper))
