"""`mozo report RUN_DIR... [--out DIR]`: compare runs in a markdown/CSV table and PNG plots.

`write_report` is the programmatic entry (used by `mozo demo`); the command prints the markdown table
and where the files went. Exit status: 0 written; 2 a run's results.json is missing or malformed (one
message naming the file and the problem, before anything is written); 1 the report could not be written.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from mozo.metrics.files import printable
from mozo.metrics.summary import ResultsError
from mozo.report.tables import build_row, format_table, load_runs, safe_name, write_csv


def default_out_dir(run_dirs: Sequence[str | Path]) -> Path:
    """`<common parent of the runs>/report`, or ./report when the runs share no parent but the root."""
    parents = [str(Path(d).resolve().parent) for d in run_dirs]
    try:
        common = Path(os.path.commonpath(parents))
    except ValueError:  # different drives, or nothing given
        return Path("report")
    return Path("report") if common.parent == common else common / "report"


def write_report(run_dirs: Sequence[str | Path], out_dir: Optional[str | Path] = None) -> dict[str, Path]:
    """Write report.md, report.csv, acc_matrix_<run>.png, acc_per_step.png and cost.png.

    Returns {file name: path} for every file written. Raises FileNotFoundError / ResultsError
    (a ValueError) naming the run whose results.json is missing or invalid, before writing anything.
    """
    runs = load_runs(run_dirs)
    from mozo.report.plots import plot_acc_matrix, plot_acc_per_step, plot_cost, plot_zo_signal

    out = Path(out_dir) if out_dir is not None else default_out_dir([r.run_dir for r in runs])
    out.mkdir(parents=True, exist_ok=True)
    rows = [build_row(run) for run in runs]
    paths: dict[str, Path] = {}
    md = out / "report.md"
    md.write_text(format_table(rows) + "\n", encoding="utf-8")
    paths[md.name] = md
    paths["report.csv"] = write_csv(rows, out / "report.csv")
    used: set[str] = set()
    for run in runs:
        stem = safe_name(run.name)
        while stem in used:  # names that differ only in unsafe characters
            stem += "_"
        used.add(stem)
        name = f"acc_matrix_{stem}.png"
        paths[name] = plot_acc_matrix(run, out / name)
    paths["acc_per_step.png"] = plot_acc_per_step(runs, out / "acc_per_step.png")
    paths["cost.png"] = plot_cost(rows, out / "cost.png")
    if any(r.get("zo_step_ratio") is not None or r.get("zo_gain_excess") is not None for r in rows):
        paths["zo_signal.png"] = plot_zo_signal(rows, out / "zo_signal.png")
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("exit status: 0 report written; 2 a run's results.json is missing or malformed "
                     "(one message naming the file and the problem); 1 the report could not be written")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding a results.json")
    parser.add_argument(
        "--out", metavar="DIR", default=None,
        help="output directory (default: <common parent of the runs>/report, or ./report)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        paths = write_report(args.run_dirs, args.out)
    except (FileNotFoundError, ResultsError) as err:
        print(f"mozo report: error: {printable(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the output directory is not writable, the disk is full...
        print(f"mozo report: error: cannot write the report: {printable(err)}", file=sys.stderr)
        return 1
    print(paths["report.md"].read_text(encoding="utf-8"), end="")
    out = paths["report.md"].parent
    print("\n" + printable(f"wrote {len(paths)} files to {out}: {', '.join(paths)}"))
    return 0
