"""Comparison reports of run directories: markdown/CSV table and PNG plots."""
from mozo.report.cli import default_out_dir, write_report
from mozo.report.tables import COLUMNS, RunResult, build_row, format_table, load_runs, write_csv

__all__ = [
    "COLUMNS",
    "RunResult",
    "build_row",
    "default_out_dir",
    "format_table",
    "load_runs",
    "write_csv",
    "write_report",
]
