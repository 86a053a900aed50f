"""One self-contained HTML report of one or more run dirs: config, data, curves, evaluations, diagnostics."""

from selfsight.report.html import write_report

__all__ = ["write_report"]
