"""What a run's result depends on in code: the harness's declared version and each method's code
fingerprint. Both join the run keys (``bench.runs``) and the ``code_version`` tag of every run.

- The harness (``bench``: data, models, training, measuring, the steps of a compressed run)
  declares :data:`HARNESS_VERSION`. It is refactored often, and a fingerprint of it would retrain
  every baseline after every refactor, so it is a number a person bumps.
- A method's fingerprint (:func:`method_fingerprint`) is computed, never declared: a hash of the
  syntax tree of its module and of every module it imports, transitively, from ``methods`` or from
  its own package (``methods/base.py`` always), package ``__init__`` files excepted (the
  ``methods`` package imports every method). Docstrings are dropped and the tree holds no comments
  or layout, so editing a comment, a docstring or the formatting keeps the fingerprint; any other
  edit, even a pure refactor, changes it and reruns that method's finals and tuning. A declared
  per-method version would cost nothing on a refactor, but a forgotten bump keeps stale numbers
  silently, which is the failure this exists to prevent; a rerun only costs compute.
- Not covered: third-party libraries (torch, torch-pruning) and the data files. ``bench.sweep
  --rerun METHOD`` forces new runs after such a change.

A fingerprint is computed once per process and method class, from the files as they are when it
is first asked for (``bench.runner.Sweep`` asks at its start): editing a file while a sweep runs
does not relabel the code that sweep imported.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import sys
from pathlib import Path

__all__ = ["HARNESS_VERSION", "code_version", "method_fingerprint", "source_digest"]

# Bump when a change to bench/ alters a number a run records (training, evaluation, measuring,
# data splits, BatchNorm re-estimation): every baseline and compressed run gets a new key.
# Refactors that keep every number leave it alone.
HARNESS_VERSION = 1

_BASE = "methods.base"  # every method depends on the contract's module


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Drop the docstring of the module and of each class and function (in place)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", 0), str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def _canonical(node) -> str:
    """A text of the tree without positions; empty fields are left out, so that a newer Python
    whose nodes gain fields that stay empty (``type_params``) gives the same text."""
    if isinstance(node, ast.AST):
        fields = [
            f"{name}={_canonical(value)}"
            for name, value in ast.iter_fields(node)
            if value is not None and value != []
        ]
        return f"{type(node).__name__}({','.join(fields)})"
    if isinstance(node, list):
        return "[" + ",".join(_canonical(item) for item in node) + "]"
    return repr(node)


def source_digest(source: str) -> str:
    """A hash of Python source that ignores comments, docstrings and formatting."""
    return _parsed(source, "")[0]


@functools.cache
def _parsed(source: str, name: str) -> tuple[str, frozenset[str]]:
    """(:func:`source_digest`, the modules it imports) of module ``name``'s source: parsed once
    per process, whichever methods share the module."""
    tree = ast.parse(source)
    imported = frozenset(_imported(tree, name))
    digest = hashlib.sha256(_canonical(_strip_docstrings(tree)).encode()).hexdigest()
    return digest, imported


def _file_of(name: str) -> Path | None:
    """The source file of module ``name`` (None: not a module, a package, or no source)."""
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None)
    if module is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError, AttributeError):  # a name imported from a module
            return None
        if spec is None or spec.submodule_search_locations is not None:
            return None
        origin = spec.origin
    if not origin or not origin.endswith(".py") or Path(origin).name == "__init__.py":
        return None
    return Path(origin)


def _imported(tree: ast.AST, name: str) -> set[str]:
    """Module names ``tree`` (module ``name``) imports, anywhere in it; ``from a import b``
    gives ``a`` and ``a.b`` (``b`` may be a module)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of ``name``
                package = name.split(".")[: -node.level]
                base = ".".join([*package, base] if base else package)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _followed(name: str, own: str) -> bool:
    """Is module ``name`` part of a method whose module's top-level package is ``own``?"""
    return name.startswith("methods.") or (own != "" and name.startswith(f"{own}."))


def _module_digests(module: str) -> dict[str, str]:
    """``{module name: source_digest}`` of ``module`` and the modules it depends on."""
    top = module.split(".")[0] if "." in module else ""
    digests: dict[str, str] = {}
    todo = [module, _BASE]
    while todo:
        name = todo.pop()
        if name in digests:
            continue
        path = _file_of(name)
        if path is None:
            if name == module:
                digests[name] = "no source"
            continue
        digests[name], imported = _parsed(path.read_text(encoding="utf-8"), name)
        todo += [n for n in imported if _followed(n, top)]
    return digests


@functools.cache
def _fingerprint_of_class(cls: type) -> str:
    digests = _module_digests(cls.__module__)
    text = "\n".join(f"{name} {digest}" for name, digest in sorted(digests.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def method_fingerprint(method: str) -> str:
    """The code fingerprint of a registered method (16 hex digits; see the module docstring)."""
    from methods.base import get_method_class  # torch: only where a method is asked for

    return _fingerprint_of_class(get_method_class(method))


def code_version(method: str | None = None) -> str:
    """The ``code_version`` tag: ``h<harness version>`` for a baseline, ``h<harness>-<the first 8
    digits of the method's fingerprint>`` for a compressed run."""
    harness = f"h{HARNESS_VERSION}"
    return harness if method is None else f"{harness}-{method_fingerprint(method)[:8]}"
