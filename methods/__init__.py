"""Compression methods: one file each, registered by ``@register_method``.

Every public module in this package (a name without a leading underscore) is imported here, so a new
method file registers itself with no other file touched. Methods that live outside the package are
imported by name with ``bench.sweep --plugin my_package.my_method``.
"""

import importlib
import pkgutil

from methods.base import (
    CalibData,
    CompressionMethod,
    CompressionWarning,
    Finetune,
    MethodConfigError,
    Target,
    count_params,
    create_method,
    get_method_class,
    list_methods,
    register_method,
    stored_params,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "CalibData",
    "CompressionMethod",
    "CompressionWarning",
    "Finetune",
    "MethodConfigError",
    "Target",
    "count_params",
    "create_method",
    "get_method_class",
    "list_methods",
    "register_method",
    "stored_params",
]
