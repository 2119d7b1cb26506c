"""Compression methods: one file each, registered by ``@register_method``.

Every public module in this package (a name without a leading underscore) is imported by the
registry, :mod:`methods.base`, on its first use (``list_methods``, ``get_method_class``), so a
new method file registers itself with no other file touched. Methods that live outside the
package are imported by name with ``bench.sweep --plugin my_package.my_method``.

This file imports nothing itself: ``methods.list_methods`` (and every public name of
``methods.base``) loads the registry on first use, and torch-free helpers (``methods._targets``)
load without torch, so a command line is checked before torch is imported.
"""

import importlib


def __getattr__(name: str):
    base = importlib.import_module("methods.base")
    if name == "__all__":
        return base.__all__
    if name in base.__all__:
        return getattr(base, name)
    raise AttributeError(f"module 'methods' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *importlib.import_module("methods.base").__all__})
