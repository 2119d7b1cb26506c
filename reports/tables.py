"""Paper-style tables of one (model, dataset): Markdown, LaTeX (booktabs) and CSV.

A :class:`DisplayTable` holds formatted cells (Unicode text + a bold flag); each writer translates
them: Markdown keeps the Unicode, LaTeX escapes the text and spells the symbols as macros, the
HTML page renders the same cells. The CSV holds the summary's raw numbers (machine-readable).

Rows: the dense baseline, then the measured and missing rows ordered by ratio, family (frequency
first), method and Pareto point, then the reported rows. In each ratio, the best measured value of
each ranked column is bold (compared as displayed; ties are all bold; only when at least two rows
compete). A Pareto point (``tuning.mode: pareto``) is labelled in its method cell ("magnitude
(Pareto 2/3)"), a layer-rate target by its spec and the params ratio it achieved. A footnote names
the code versions behind the table and flags a table whose runs come from different code.
"""

from __future__ import annotations

import math
import numbers
import re
from collections import Counter
from dataclasses import dataclass

import pandas as pd

from reports._common import TIMES
from reports.aggregate import SUMMARY_COLUMNS, UNVERSIONED, case_columns

__all__ = ["Cell", "DisplayTable", "display_table", "to_csv", "to_latex", "to_markdown"]

DASH = "—"  # an empty numeric cell
DAGGER = "†"  # masked dense layers: stored zeros are multiplied
WARNING = "⚠"  # a table whose runs come from different code
_TOP5 = ("Baseline top-5 (%)", "Top-5 (%)")
_TEXT_COLUMNS = ("Ratio", "Method", "Family", "Status")
# Ranked columns: header -> (summary column, decimals shown). Larger is better for all of them.
_RANKED = {
    "Top-1 (%)": ("top1_mean", 2),
    "Δ top-1 (pp)": ("delta_top1", 2),
    "Top-5 (%)": ("top5_mean", 2),
    "Params red. (%)": ("params_reduction", 1),
    "FLOPs (MACs) red. (%)": ("macs_reduction", 1),
    "FLOPs nz red. (%)": ("macs_nz_reduction", 1),
    f"Speedup ({TIMES})": ("speedup_mean", 2),
}


@dataclass(frozen=True)
class Cell:
    """One formatted table cell."""

    text: str
    bold: bool = False


@dataclass(frozen=True)
class DisplayTable:
    """The formatted table of one (model, dataset).

    Attributes:
        model: Model name (as tagged).
        dataset: Dataset name (as tagged).
        columns: Column headers.
        rows: Cells, one list per row, in display order.
        kinds: The summary ``kind`` of each row (baseline, measured, missing, reported).
        footnotes: Notes printed under the table (Unicode, like the cells).
    """

    model: str
    dataset: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    kinds: tuple[str, ...]
    footnotes: tuple[str, ...]

    def block_starts(self) -> set[int]:
        """Rows (after the first) that open a block: the baseline, each ratio (its measured and
        missing rows together), the reported rows. Writers draw a rule above them."""
        blocks = [
            (kind if kind in ("baseline", "reported") else "ratio", row[0].text)
            for kind, row in zip(self.kinds, self.rows)
        ]
        return {i for i in range(1, len(blocks)) if blocks[i] != blocks[i - 1]}


def _finite(x: object) -> bool:
    """A real number that is not NaN/inf (numpy scalars included; None and pd.NA are not)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: object, decimals: int, sign: bool = False) -> str:
    return f"{x:{'+' if sign else ''}.{decimals}f}" if _finite(x) else DASH


def _mean_std(mean: object, std: object, decimals: int = 2) -> str:
    if not _finite(mean):
        return DASH
    return f"{mean:.{decimals}f}" + (f" ± {std:.{decimals}f}" if _finite(std) else "")


def _count(x: object) -> str:
    """14_977_000 -> "14.98M" (SI prefixes, as the papers print params and MACs)."""
    if not _finite(x):
        return DASH
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def _ratio(label: str, achieved: object = math.nan) -> str:
    """A ratio target with the times sign; layer rates as their spec and the ratio they reach."""
    try:
        float(label)
    except ValueError:
        return f"{label} ({achieved:.2f}{TIMES})" if _finite(achieved) else label
    return f"{label}{TIMES}"


def pareto_label(method: str, index: str, points: int) -> str:
    """``magnitude (Pareto 2/3)`` for point ``index`` (0-based tag) of ``points``."""
    return f"{method} (Pareto {int(index) + 1}/{points})" if index else method


def _int(x: object) -> str:
    return str(int(x)) if _finite(x) else DASH


def case_header(column: str) -> str:
    """The header of a per-case speedup column: ``speedup.onnxruntime.cpu.b1`` ->
    "Speedup (x) ORT cpu b1" (backend, device, batch; ORT = onnxruntime, short enough for the
    page's width)."""
    backend, device, batch = column.removeprefix("speedup.").split(".")
    return f"Speedup ({TIMES}) {_BACKEND_LABELS.get(backend, backend)} {device} {batch}"


_BACKEND_LABELS = {"onnxruntime": "ORT"}


def masked_dense(row: pd.Series) -> bool:
    """The run deployed layers that multiply stored zeros: from its ``deployed`` tag ("masked
    dense: 13 layers; sparse: 2 layers"); runs logged before the tag: the method's class flag."""
    deployed = row.get("deployed", "")
    if isinstance(deployed, str) and deployed:
        return "masked dense" in deployed
    return row["structured"] == "false"


COMPRESS = "Compress (s / epochs)"


def _cost(seconds: float, epochs: float) -> str:
    """The compression cost cell, "30.5 / 2.50" (a dash for runs recorded before it was logged)."""
    if _num(seconds, 1) == DASH:
        return DASH
    return f"{_num(seconds, 1)} / {_num(epochs, 2)}"


def _row(
    row: pd.Series, top5: bool, ref_number: int | None, points: int, cases: list[str]
) -> dict[str, str]:
    kind = row["kind"]
    macs = _count(row["macs"])
    if kind == "measured" and masked_dense(row) and macs != DASH:
        macs += DAGGER
    status = {
        "measured": "measured",
        "baseline": "baseline",
        "missing": f"missing: {row['note']}",
        "reported": f"reported [{ref_number}]",
    }[kind]
    cells = {
        "Ratio": _ratio(row["ratio"], row["params_ratio"])
        if kind in ("measured", "missing")
        else DASH,
        "Method": pareto_label(row["method"], row["pareto_index"], points),
        "Family": row["family"] or DASH,
        "Baseline top-1 (%)": _num(row["baseline_top1"], 2),
        "Top-1 (%)": _mean_std(row["top1_mean"], row["top1_std"]),
        "Δ top-1 (pp)": _num(row["delta_top1"], 2, sign=True),
        _TOP5[0]: _num(row["baseline_top5"], 2),
        _TOP5[1]: _mean_std(row["top5_mean"], row["top5_std"]),
        "Params": _count(row["params"]),
        "Params red. (%)": _num(row["params_reduction"], 1),
        "FLOPs (MACs)": macs,
        "FLOPs (MACs) red. (%)": _num(row["macs_reduction"], 1),
        "FLOPs nz red. (%)": _num(row["macs_nz_reduction"], 1),
        f"Speedup ({TIMES})": _mean_std(row["speedup_mean"], row["speedup_std"]),
        **{case_header(c): _num(row[c], 2) for c in cases},
        COMPRESS: _cost(row["compress_s"], row["compress_epochs"]),
        "Seeds": _int(row["n_seeds"]),
        "Trials": _int(row["trials_used"]),
        "Status": status,
    }
    if not top5:
        del cells[_TOP5[0]], cells[_TOP5[1]]
    return cells


def _bold_marks(rows: pd.DataFrame) -> set[tuple[int, str]]:
    """(row position, header) of the best measured value per ranked column at each ratio."""
    marks: set[tuple[int, str]] = set()
    measured = rows[rows["kind"] == "measured"]
    for _, same in measured.groupby("ratio", sort=True):
        if len(same) < 2:
            continue
        for header, (column, decimals) in _RANKED.items():
            shown = {i: round(v, decimals) for i, v in same[column].items() if _finite(v)}
            if shown:
                best = max(shown.values())
                marks |= {(i, header) for i, v in shown.items() if v == best}
    return marks


def display_table(summary: pd.DataFrame, model: str, dataset: str) -> DisplayTable:
    """The formatted table of one (model, dataset) from the summary (see ``reports.aggregate``)."""
    rows = summary[(summary["model"] == model) & (summary["dataset"] == dataset)]
    rows = rows.reset_index(drop=True)
    top5 = bool(rows[["top5_mean", "baseline_top5"]].map(_finite).to_numpy().any())
    reported = [i for i in rows.index if rows.at[i, "kind"] == "reported"]
    numbers = {i: n + 1 for n, i in enumerate(reported)}
    marks = _bold_marks(rows)
    points = rows[rows["pareto_index"] != ""].groupby(["method", "ratio"])["pareto_index"].nunique()
    cases = [c for c in case_columns(rows) if rows[c].map(_finite).any()]
    formatted = [
        _row(rows.loc[i], top5, numbers.get(i), points.get((r["method"], r["ratio"]), 0), cases)
        for i, r in rows.iterrows()
    ]
    columns = tuple(formatted[0]) if formatted else ()
    cells = tuple(
        tuple(Cell(text, (i, header) in marks) for header, text in row.items())
        for i, row in enumerate(formatted)
    )
    notes = [
        "Top-1/top-5: test accuracy (%), mean ± sample std over seeds; Δ: top-1 minus the"
        " baseline's top-1 of the same seeds, in percentage points.",
        "Params: values stored (masked weights count by nonzeros); FLOPs (MACs): multiply-"
        "accumulates the deployed model executes in one forward pass; FLOPs nz: those that touch"
        " a stored nonzero (the pruning papers' FLOPs for unstructured sparsity; equal to FLOPs"
        " (MACs) for a structured model); red. = 1 - 1/ratio; speedup = dense / compressed"
        " latency, measured.",
    ]
    notes += latency_notes(rows, cases)
    if rows["kind"].eq("measured").any():
        notes.append(
            "Compress: the compression cost, mean over seeds: wall time of the method's compress"
            " step (its own fine-tuning included; the harness's fine-tuning after it is not) and"
            f" the epochs it fine-tuned there; {DASH} for runs recorded before it was logged."
        )
    if marks:
        notes.append("Bold: the best measured value of each column at each ratio.")
    if any(DAGGER in c.text for row in cells for c in row):
        notes.append(
            f"{DAGGER} Masked dense layers (the run's deployed tag): they store and multiply"
            " their zeros, so their executed MACs stay dense (FLOPs nz counts their nonzeros);"
            " layers deployed sparse execute at their nonzeros."
        )
    if (rows["pareto_index"] != "").any():
        notes.append(
            "Pareto n/N: point n of the N points on the tuning's Pareto front (validation accuracy"
            " vs MACs, tuning.mode: pareto), each with final runs of its own."
        )
    notes += code_notes(rows)
    if reported:
        notes.append(
            "Reported rows: numbers as the papers publish them (sweeps/reference.yaml), under their"
            " own training recipes; not measured here and not ranked."
        )
        notes += [f"[{numbers[i]}] {rows.at[i, 'note']}" for i in reported]
    return DisplayTable(model, dataset, columns, cells, tuple(rows["kind"]), tuple(notes))


def latency_notes(rows: pd.DataFrame, cases: list[str]) -> list[str]:
    """Where the speedups were measured: the headline's backend, device, batch and threads (the
    runs' ``latency_*`` tags), and what the per-case columns are."""
    settings = sorted({s for s in rows["latency_setting"] if s})
    notes = []
    if settings:
        notes.append(
            f"Speedup ({TIMES}): dense baseline / compressed model, both deployed, timed"
            f" interleaved, median: {'; '.join(settings)}."
        )
    if cases:
        notes.append(
            f"Speedup ({TIMES}) <backend> <device> b<batch>: the same runs timed on that"
            " backend (torch: eager PyTorch; ORT: backend onnxruntime, the ONNX export in ONNX"
            " Runtime's CPU session), device and batch, same threads."
        )
    return notes


def _versions(cell: str) -> Counter:
    """``version:runs;...`` (the summary's ``code_versions``) as a Counter."""
    out: Counter = Counter()
    for pair in filter(None, cell.split(";")):
        version, _, n = pair.rpartition(":")
        out[version] += int(n)
    return out


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def code_notes(rows: pd.DataFrame) -> list[str]:
    """The footnotes on code versions: which made the table, and a warning when it mixes them.

    A table mixes code when one method's runs come from more than one version of its code, or
    its runs (baselines included) from more than one harness version ("h1" of "h1-3f2a9c1e").
    """
    by_method: dict[str, Counter] = {}
    for _, row in rows[rows["kind"].isin(["baseline", "measured"])].iterrows():
        name = "baseline" if row["kind"] == "baseline" else row["method"]
        by_method.setdefault(name, Counter()).update(_versions(row["code_versions"]))
    by_method = {name: versions for name, versions in by_method.items() if versions}
    if not by_method:
        return []
    listed = "; ".join(
        f"{name} " + ", ".join(f"{v} ({_runs(n)})" for v, n in sorted(versions.items()))
        for name, versions in sorted(by_method.items(), key=lambda kv: kv[0] != "baseline")
    )
    notes = [
        f"Code versions (h<harness version>-<method code fingerprint>; tag code_version): {listed}."
    ]
    harness: Counter = Counter()
    for versions in by_method.values():
        for version, n in versions.items():
            harness[version.split("-")[0] if version != UNVERSIONED else version] += n
    mixed = [
        f"{name} {v} ({_runs(n)})"
        for name, versions in sorted(by_method.items())
        if len(versions) > 1
        for v, n in sorted(versions.items())
    ]
    if len(harness) > 1:
        mixed += [f"harness {v} ({_runs(n)})" for v, n in sorted(harness.items())]
    if mixed:
        notes.append(
            f"{WARNING} This table mixes code versions: {', '.join(mixed)}. Its rows were not all"
            " measured by the same code: rerun the sweep (python -m bench.sweep) to bring them"
            " to the current code."
        )
    return notes


# ------------------------------------------------------------------------------------- writers
def to_markdown(table: DisplayTable) -> str:
    """A Markdown section: heading, pipe table (pandas ``to_markdown``), footnotes."""

    def text(cell: Cell) -> str:
        escaped = cell.text.replace("|", "\\|")
        return f"**{escaped}**" if cell.bold and cell.text != DASH else escaped

    frame = pd.DataFrame([[text(c) for c in row] for row in table.rows], columns=table.columns)
    align = ["left" if c in _TEXT_COLUMNS else "right" for c in table.columns]
    # disable_numparse: tabulate would otherwise re-format "89.50" as "89.5".
    body = frame.to_markdown(index=False, disable_numparse=True, colalign=align)
    notes = "\n".join(f"- {note}" for note in table.footnotes)
    return f"## {table.model} on {table.dataset}\n\n{body}\n\n{notes}\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_SYMBOLS = {
    "±": r"$\pm$",
    TIMES: r"$\times$",
    "Δ": r"$\Delta$",
    DAGGER: r"$^\dagger$",
    DASH: "---",
    WARNING: r"\textbf{(!)}",
}


def latex_text(text: str) -> str:
    """Escape LaTeX specials, then spell our few Unicode symbols as macros (pdflatex-safe)."""
    escaped = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    return "".join(_LATEX_SYMBOLS.get(ch, ch) for ch in escaped)


def to_latex(table: DisplayTable) -> str:
    """A ``table`` environment around a booktabs tabular (pandas ``to_latex``), with a midrule
    between the baseline, each ratio and the reported block, and the footnotes below."""

    def text(cell: Cell) -> str:
        return rf"\textbf{{{latex_text(cell.text)}}}" if cell.bold else latex_text(cell.text)

    frame = pd.DataFrame(
        [[text(c) for c in row] for row in table.rows],
        columns=[latex_text(c) for c in table.columns],
    )
    spec = "".join("l" if c in _TEXT_COLUMNS else "r" for c in table.columns)
    lines = frame.to_latex(index=False, escape=False, column_format=spec).splitlines()
    first = lines.index(r"\midrule") + 1  # data rows follow the header's midrule, one per line
    breaks = sorted(table.block_starts())
    for i in reversed(breaks):
        lines.insert(first + i, r"\midrule")
    caption = latex_text(f"{table.model} on {table.dataset}")
    label = "tab:" + re.sub(r"[^A-Za-z0-9]+", "-", f"{table.model}-{table.dataset}")
    notes = "\n".join(rf"\par {latex_text(note)}" for note in table.footnotes)
    return "\n".join(
        [
            r"% Needs \usepackage{booktabs} and \usepackage{graphicx} (for \resizebox).",
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{caption}}}",
            rf"\label{{{label}}}",
            r"\resizebox{\linewidth}{!}{%",
            *lines,
            "}",
            r"\smallskip",
            r"{\footnotesize",
            notes,
            "}",
            r"\end{table}",
            "",
        ]
    )


def to_csv(summary: pd.DataFrame, model: str, dataset: str) -> str:
    """The raw summary rows of one (model, dataset) as CSV (numbers rounded to 6 decimals)."""
    rows = summary[(summary["model"] == model) & (summary["dataset"] == dataset)]
    rows = rows[[*SUMMARY_COLUMNS, *case_columns(rows)]].copy()
    numeric = rows.select_dtypes("number").columns
    rows[numeric] = rows[numeric].round(6)
    return rows.to_csv(index=False, lineterminator="\n")
