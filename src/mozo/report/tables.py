"""Comparison table of run directories: one row per run, metrics recomputed, cost alongside.

Metrics are recomputed from each run's `acc_matrix` (as `mozo metrics` does) so that runs written by
different versions are compared under one definition. Cost keys other than the trainable-parameter
total are optional: a run without them shows "-" in the markdown table and an empty cell in the CSV
(empty cells load as missing values in spreadsheets and pandas, "-" would turn a column into text).
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from mozo.metrics.summary import RESULTS_FILENAME, ResultsError, load_results, summarize_results

MIB = 2**20


@dataclass
class RunResult:
    """One run: its display name (unique within a report), directory, results.json and recomputed summary."""

    name: str
    run_dir: Path
    results: dict[str, Any]
    summary: dict[str, Any]


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: Callable[[Any], str]
    numeric: bool = True


def _fixed(digits: int) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else f"{v:.{digits}f}"


def _text(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def _count(v: Any) -> str:
    return "-" if v is None else f"{int(v):,}"


COLUMNS: tuple[Column, ...] = (
    Column("run", "run", _text, numeric=False),
    Column("plan", "plan", _text, numeric=False),
    Column("peft", "peft", _text, numeric=False),
    Column("last", "Last", _fixed(2)),
    Column("avg", "Avg", _fixed(2)),
    Column("transfer", "Transfer", _fixed(2)),
    Column("bwt", "BWT", _fixed(2)),
    Column("forgetting", "Forgetting", _fixed(2)),
    Column("trainable_params", "trainable params", _count),
    Column("peak_mem_mib", "peak memory (MiB)", _fixed(1)),
    Column("wall_time_s", "wall time (s)", _fixed(1)),
)


def safe_name(name: str) -> str:
    """A run name usable in a file name (acc_matrix_<run>.png)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def _run_dir(path: str | Path) -> Path:
    p = Path(path)
    return p.parent if p.name == RESULTS_FILENAME and p.is_file() else p


def load_runs(run_dirs: Sequence[str | Path]) -> list[RunResult]:
    """Load and summarise every run; names are directory names, suffixed -2, -3... when they repeat."""
    if not run_dirs:
        raise ResultsError("no run directory given")
    runs: list[RunResult] = []
    seen: dict[str, int] = {}
    for path in run_dirs:
        run_dir = _run_dir(path)
        results = load_results(run_dir)
        try:
            summary = summarize_results(results)
        except ResultsError as err:
            raise ResultsError(f"{run_dir}: {err}") from err
        base = run_dir.resolve().name or "run"
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}-{seen[base]}"
        runs.append(RunResult(name, run_dir, results, summary))
    return runs


def _label(value: Any) -> Optional[str]:
    """config['plan'] / config['peft'] may be a name or a section; show its name (or kind)."""
    if value is None:
        return None
    if isinstance(value, dict):
        for key in ("name", "kind", "type"):
            if value.get(key) is not None:
                return str(value[key])
        return None
    return str(value)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _trainable_total(cost: dict[str, Any]) -> Optional[int]:
    params = cost.get("trainable_params")
    if isinstance(params, dict):
        params = params.get("total")
    value = _number(params)
    return None if value is None else int(value)


def build_row(run: RunResult) -> dict[str, Any]:
    """Raw values of one table row (None where the run does not say); formatting happens later."""
    config = run.results.get("config") if isinstance(run.results.get("config"), dict) else {}
    cost = run.results.get("cost") if isinstance(run.results.get("cost"), dict) else {}
    peak = _number(cost.get("peak_mem_bytes"))
    return {
        "run": run.name,
        "plan": _label(config.get("plan")),
        "peft": _label(config.get("peft")),
        **{key: run.summary[key] for key in ("last", "avg", "transfer", "bwt", "forgetting")},
        "trainable_params": _trainable_total(cost),
        "peak_mem_mib": None if peak is None else peak / MIB,
        "wall_time_s": _number(cost.get("wall_time_s")),
    }


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of report rows (dicts keyed like `build_row`); missing values show as "-"."""
    headers = [c.header for c in COLUMNS]
    body = [[_escape(c.fmt(row.get(c.key))) for c in COLUMNS] for row in rows]
    widths = [max([len(h)] + [len(r[k]) for r in body]) for k, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(
            cell.rjust(w) if c.numeric else cell.ljust(w) for cell, w, c in zip(cells, widths, COLUMNS)
        ) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if c.numeric else ("-" * (w + 2)) for w, c in zip(widths, COLUMNS)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in body])


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """CSV with the table's headers and full-precision values; missing values are empty cells."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([c.header for c in COLUMNS])
        for row in rows:
            writer.writerow(["" if row.get(c.key) is None else row.get(c.key) for c in COLUMNS])
    return path
