"""Report generator: a study's MLflow runs -> paper-style tables, Pareto plots, one HTML page.

It needs only the tracking store (and, for the tuning views, the Optuna storage): it never
imports torch, so a laptop without it can rebuild every table. Command line:
``python -m reports --study NAME`` (see ``reports/__main__.py``); from Python::

    from reports import build_report
    report = build_report("quickstart", out=Path("report"))
"""

from reports._common import ReportError
from reports.build import Report, build_report, default_out

__all__ = ["Report", "ReportError", "build_report", "default_out"]
