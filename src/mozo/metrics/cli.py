"""`mozo metrics PATH [--json]`: recompute the summary of a results.json and check the stored one.
`mozo metrics --matrix FILE.csv --sizes N,N,... [--protocol cil|mtcl]`: summarise a bare matrix.

The summary is always recomputed from `acc_matrix`, so the numbers printed follow one definition
(docs/experiments.md, Metrics) whatever wrote the file; a stored summary that disagrees is flagged, not trusted.
Any JSON object with protocol, tasks, task_test_sizes and acc_matrix works (e.g. a published matrix).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mozo.metrics.files import load_matrix_csv, load_summary, printable, results_path
from mozo.metrics.summary import PROTOCOLS, SUMMARY_KEYS, ResultsError, fmt, summary_differences

LABELS = {
    "last": "Last",
    "avg": "Avg",
    "transfer": "Transfer",
    "bwt": "BWT (GEM)",
    "forgetting": "Forgetting (Chaudhry)",
    "bwt_continuum": "BWT (continuum, as MoE-Adapters4CL logs)",
    "forgetting_continuum": "Forgetting (continuum, as MoE-Adapters4CL logs)",
}
TOLERANCE = 0.01
BAD_INPUT = 2  # the exit status for a missing or malformed file and for wrong arguments

EPILOG = """\
BWT (GEM, Lopez-Paz & Ranzato 2017) and Forgetting (Chaudhry et al. 2018) are mozo's definitions; the
continuum rows reproduce the continuum library's variants, which MoE-Adapters4CL logs, so that its
published figures can be compared like for like.

CSV matrix: row i = after training task i, column j = task j, an empty cell = not evaluated; no header.

exit status: 0 summary printed; 2 the file is missing or malformed (one message naming the file and
the problem) or the arguments are wrong."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("path", metavar="PATH", nargs="?",
                        help="a results.json (or any JSON with protocol, tasks, task_test_sizes, acc_matrix), "
                        "or a run directory containing one")
    parser.add_argument("--matrix", metavar="FILE.csv", help="summarise an accuracy matrix in a CSV file instead")
    parser.add_argument("--sizes", metavar="N,N,...", help="with --matrix: the test-set size of each task")
    parser.add_argument("--protocol", choices=PROTOCOLS, help="with --matrix: the protocol (default: cil)")
    parser.add_argument(
        "--json", action="store_true", help="print the recomputed summary as JSON (keys: "
        + ", ".join(SUMMARY_KEYS + ("step_acc",)) + ")"
    )


def format_summary(results: dict[str, Any], summary: dict[str, Any]) -> str:
    """Human-readable summary: the metrics, then the accuracy after each trained task."""
    tasks = [printable(t) for t in results.get("tasks") or []]
    trained = len(summary["step_acc"])
    total = len(tasks) or trained
    step_label = "acc_i (%)" if results["protocol"] == "cil" else "row mean (%)"
    keys = [key for key in SUMMARY_KEYS if key in summary]  # a summary from an older run lacks new keys
    width = max(len(LABELS[key]) for key in keys) + 2
    lines = [f"protocol {results['protocol']}, {trained}/{total} tasks trained", ""]
    lines += [f"{'metric':<{width}}{'value':>8}"]
    lines += [f"{LABELS[key]:<{width}}{fmt(summary[key]):>8}" for key in keys]
    lines += ["", f"{'step':<6}{'task':<24}{step_label:>14}"]
    for i, acc in enumerate(summary["step_acc"]):
        name = tasks[i] if i < len(tasks) else "-"
        lines.append(f"{i + 1:<6}{name[:23]:<24}{fmt(acc):>14}")
    return "\n".join(lines)


def _sizes(text: str) -> list[int]:
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise ResultsError(f"--sizes must be comma-separated integers, got {text[:60]!r}") from None


def _load(args: argparse.Namespace) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    if args.matrix is None:
        if args.path is None or args.sizes is not None or args.protocol is not None:
            raise ResultsError("give PATH, or --matrix FILE.csv --sizes N,N,... [--protocol cil|mtcl]")
        return (results_path(args.path), *load_summary(args.path))
    if args.path is not None or args.sizes is None:
        raise ResultsError("--matrix FILE.csv needs --sizes N,N,... (one test-set size per column) and no PATH")
    return (Path(args.matrix), *load_matrix_csv(args.matrix, _sizes(args.sizes), args.protocol or "cil"))


def main(args: argparse.Namespace) -> int:
    try:
        source, results, summary = _load(args)
    except (FileNotFoundError, ResultsError) as err:
        print(f"mozo metrics: error: {printable(err)}", file=sys.stderr)
        return BAD_INPUT
    stored = results.get("summary")
    if isinstance(stored, dict):
        for key in summary_differences(stored, summary, TOLERANCE):
            shown = fmt(summary[key]) if key != "step_acc" else "see table"
            print(
                f"mozo metrics: warning: stored summary '{key}' differs from the recomputed value "
                f"({shown}) by more than {TOLERANCE}; the recomputed value is shown",
                file=sys.stderr,
            )
    elif "summary" in results:
        print("mozo metrics: warning: stored 'summary' is not an object; ignoring it", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(printable(source))
        print(format_summary(results, summary))
    return 0
