"""Small shared pieces: the one-line error, safe file names from run data, sort orders."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

__all__ = [
    "FAMILY_ORDER",
    "TIMES",
    "ReportError",
    "family_key",
    "inside",
    "mask_credentials",
    "one_line",
    "pareto_key",
    "ratio_key",
    "safe_name",
]

TIMES = "\N{MULTIPLICATION SIGN}"  # the unit of ratios and speedups, as the papers print it

# Frequency-domain methods first: they are what the benchmark is about; spatial ones are baselines.
FAMILY_ORDER = ("frequency", "spatial")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DOTS = re.compile(r"\.{2,}")
_MAX_NAME = 80  # characters; long "rates:..." labels get shortened + hashed


class ReportError(Exception):
    """A problem the user can fix (no such study, unreachable store, incomplete runs).

    The message is one line; the CLI prints it and exits with code 2.
    """


def safe_name(text: str) -> str:
    """A file-name component made from run data that can never leave its folder.

    Keeps only ``[A-Za-z0-9._-]``, never ``..`` nor a leading dot. When anything had to change (or
    the name is long), a short hash of the original is appended so that two different names can
    never land on the same file ("a/b" and "a_b" stay apart).
    """
    cleaned = _DOTS.sub("_", _UNSAFE.sub("_", text)).strip(".")
    if cleaned == text and 0 < len(text) <= _MAX_NAME:
        return text
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned[:_MAX_NAME] or 'x'}-{digest}"


def inside(root: Path, *parts: str) -> Path:
    """``root / safe_name(part) / ...``, checked to resolve inside ``root`` (belt and braces)."""
    path = Path(root).joinpath(*(safe_name(p) for p in parts))
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise ReportError(f"refusing to write {path}: it is outside {root}")
    return path


def ratio_key(label: str) -> tuple[int, float, str]:
    """Sort key of a ratio label: numeric targets ascending ("2" < "4" < "16"), then "rates:..."."""
    try:
        value = float(label)
    except ValueError:
        return (1, math.inf, label)
    return (0, value, label)


def pareto_key(index: str) -> tuple[int, int]:
    """Sort key of a ``pareto_index`` tag: none ("") first, then the points in order."""
    return (1, int(index)) if index.isdigit() else (0, 0)


def family_key(family: str) -> tuple[int, str]:
    """Sort key of a family: frequency, spatial, then anything else alphabetically."""
    return (FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER), family)


def one_line(error: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters (for one-line errors)."""
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}".strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def mask_credentials(uri: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db`` for display."""
    return re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", uri)
