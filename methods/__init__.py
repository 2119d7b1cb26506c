"""Compression methods: one file each, registered by ``@register_method``.

Every public module in this package (a name without a leading underscore) is imported here, so a new
method file registers itself with no other file touched. Methods that live outside the package are
imported by name with ``bench.sweep --plugin my_package.my_method``.
"""

import importlib
import pkgutil

import methods.base as _base
from methods.base import *  # noqa: F403  (the public names, listed once: methods.base.__all__)

__all__ = _base.__all__

for _info in pkgutil.iter_modules(__path__):  # noqa: F405  (the package folder, not a star name)
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
