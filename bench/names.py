"""The names a command line may use, known without importing torch, timm or the methods.

A typo (``--set methods=[l1_filtr]``, ``--model resnet18x``) is answered at once, before the
heavy imports (torch alone takes seconds). Each lookup is exact or defers to the real registry:

- methods: the classes decorated with ``@register_method`` in ``methods/*.py`` (read with
  :mod:`ast`, as the package imports its public modules); once ``methods.base`` is imported (a
  ``--plugin``), its registry instead.
- models: the CIFAR models of ``bench.models`` (:data:`CIFAR_MODELS`) and timm's names, from a
  cache written by ``bench.models`` the first time it imports timm, one file per timm version
  (``importlib.metadata``); without the cache, or once timm is imported, timm's own registry.

A name these lists do not know is refused with the message the registry would give; a name they
cannot decide (no cache) is left to the registry.
"""

from __future__ import annotations

import ast
import difflib
import importlib.metadata
import os
import sys
import tempfile
from collections.abc import Iterable
from functools import cache
from pathlib import Path

__all__ = [
    "CIFAR_MODELS",
    "method_names",
    "timm_cache_path",
    "timm_names",
    "unknown_method",
    "unknown_model",
    "unknown_model_message",
    "write_timm_cache",
]

# the models bench.models registers in timm (its _entrypoint refuses a name missing here)
CIFAR_MODELS = ("resnet110_cifar", "resnet20_cifar", "resnet56_cifar", "vgg16_bn_cifar")

_METHODS_DIR = Path(__file__).resolve().parent.parent / "methods"


# ------------------------------------------------------------------------------------- methods
def _registered_in(path: Path) -> list[str]:
    """``name`` of each class in ``path`` decorated with ``register_method``."""
    names = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if not isinstance(node, ast.ClassDef):
            continue
        decorators = {ast.unparse(d).rsplit(".", 1)[-1] for d in node.decorator_list}
        if "register_method" not in decorators:
            continue
        for stmt in node.body:
            target = getattr(stmt, "target", None) or (getattr(stmt, "targets", None) or [None])[0]
            value = getattr(stmt, "value", None)
            if getattr(target, "id", None) == "name" and isinstance(value, ast.Constant):
                names.append(str(value.value))
    return names


@cache
def _package_methods() -> tuple[str, ...]:
    found: list[str] = []
    for path in sorted(_METHODS_DIR.glob("*.py")):
        if not path.stem.startswith("_") and path.stem != "base":
            found += _registered_in(path)
    return tuple(sorted(found))


def method_names() -> list[str]:
    """Every method a study may name: the registry once ``methods.base`` is imported (plugins
    included), else the package's method files read as text."""
    base = sys.modules.get("methods.base")
    if base is not None:
        return base.list_methods()
    return list(_package_methods())


def unknown_method(name: str) -> str | None:
    """The registry's one-line error for an unknown method name; None when it is known."""
    known = method_names()
    if name in known:
        return None
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown method {name!r}{hint}; registered: {', '.join(known)}"


# -------------------------------------------------------------------------------------- models
def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root).expanduser() / "freqbench"


def timm_cache_path() -> Path | None:
    """Where timm's model names are cached for the installed timm; None without timm."""
    try:
        version = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        return None
    return _cache_dir() / f"timm-{version}-models.txt"


def write_timm_cache(names: Iterable[str]) -> None:
    """Write timm's model names for the installed timm, atomically (best effort: a read-only
    home only makes the next typo slower)."""
    path = timm_cache_path()
    if path is None or path.exists():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(sorted(set(names))) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def timm_names() -> frozenset[str] | None:
    """timm's model names as cached for the installed timm, or None without a cache."""
    path = timm_cache_path()
    try:
        return frozenset(path.read_text().split()) if path is not None else None
    except OSError:
        return None


def unknown_model_message(name: str, known: Iterable[str]) -> str:
    """The one-line error for a model name that is not registered (with a did-you-mean)."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown model {name!r}{hint} (CIFAR models: {', '.join(CIFAR_MODELS)})"


def unknown_model(name: str) -> str | None:
    """The one-line error for an unknown model name; None when it is known, or when only
    importing timm can tell (no cache of its names)."""
    if name in CIFAR_MODELS:
        return None
    timm = sys.modules.get("timm")
    if timm is not None:  # imported already (a plugin): its registry is the truth
        return None if timm.is_model(name) else unknown_model_message(name, timm.list_models())
    names = timm_names()
    if names is None or name.split(".", 1)[0] in names:  # "resnet18.a1_in1k": timm's tagged name
        return None
    return unknown_model_message(name, names)
