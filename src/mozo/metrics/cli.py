"""`mozo metrics PATH [--json]`: recompute the summary of a results.json and check the stored one.

The summary is always recomputed from `acc_matrix`, so the numbers printed follow one definition
(DESIGN.md section 2) whatever wrote the file; a stored summary that disagrees is flagged, not trusted.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mozo.metrics.summary import (
    SUMMARY_KEYS,
    ResultsError,
    fmt,
    load_results,
    results_path,
    summarize_results,
    summary_differences,
)

LABELS = {"last": "Last", "avg": "Avg", "transfer": "Transfer", "bwt": "BWT", "forgetting": "Forgetting"}
TOLERANCE = 0.01


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="a results.json, or a run directory containing one")
    parser.add_argument(
        "--json", action="store_true", help="print the recomputed summary as JSON (keys: "
        + ", ".join(SUMMARY_KEYS + ("step_acc",)) + ")"
    )


def format_summary(results: dict[str, Any], summary: dict[str, Any]) -> str:
    """Human-readable summary: the five metrics, then the accuracy after each trained task."""
    tasks = [str(t) for t in results.get("tasks") or []]
    trained = len(summary["step_acc"])
    total = len(tasks) or trained
    step_label = "acc_i (%)" if results["protocol"] == "cil" else "row mean (%)"
    lines = [f"protocol {results['protocol']}, {trained}/{total} tasks trained", ""]
    lines += [f"{'metric':<12}{'value':>8}"]
    lines += [f"{LABELS[key]:<12}{fmt(summary[key]):>8}" for key in SUMMARY_KEYS]
    lines += ["", f"{'step':<6}{'task':<24}{step_label:>14}"]
    for i, acc in enumerate(summary["step_acc"]):
        name = tasks[i] if i < len(tasks) else "-"
        lines.append(f"{i + 1:<6}{name[:23]:<24}{fmt(acc):>14}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        results = load_results(args.path)
        summary = summarize_results(results)
    except (FileNotFoundError, ResultsError) as err:
        print(f"mozo metrics: error: {err}", file=sys.stderr)
        return 1
    stored = results.get("summary")
    if isinstance(stored, dict):
        for key in summary_differences(stored, summary, TOLERANCE):
            shown = fmt(summary[key]) if key != "step_acc" else "see table"
            print(
                f"mozo metrics: warning: stored summary '{key}' differs from the recomputed value "
                f"({shown}) by more than {TOLERANCE}; the recomputed value is shown",
                file=sys.stderr,
            )
    else:
        print("mozo metrics: warning: stored 'summary' is not an object; ignoring it", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{results_path(args.path)}")
        print(format_summary(results, summary))
    return 0
