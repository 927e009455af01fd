"""Comparison table of run directories: one row per run, metrics recomputed, cost alongside.

Metrics are recomputed from each run's `acc_matrix` (as `mozo metrics` does) so that runs written by
different versions are compared under one definition. Cost keys other than the trainable-parameter
total are optional: a run without them shows "-" in the markdown table and an empty cell in the CSV
(empty cells load as missing values in spreadsheets and pandas, "-" would turn a column into text).

Names (runs, plans, PEFT kinds) come from directory names and results files, so they are shown through
`printable` in the markdown and the CSV, and a CSV text cell that a spreadsheet would run as a formula
is prefixed with a quote (`csv_cell`).
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from mozo.metrics.files import load_summary, printable, results_path
from mozo.metrics.summary import ResultsError

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
    Column("step_peak_mib", "step peak (MiB, tensors)", _fixed(2)),
    Column("zo_step_ratio", "ZO/FO step size", _fixed(3)),
    Column("zo_gain_excess", "ZO gain - noise gain", _fixed(6)),
    Column("peak_mem_mib", "process peak (MiB)", _fixed(1)),
    Column("wall_time_s", "wall time (s)", _fixed(1)),
)


def safe_name(name: str) -> str:
    """A run name usable in a file name (acc_matrix_<run>.png)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def load_runs(run_dirs: Sequence[str | Path]) -> list[RunResult]:
    """Load and summarise every run; names are directory names, suffixed -2, -3... when they repeat."""
    if not run_dirs:
        raise ResultsError("no run directory given")
    runs: list[RunResult] = []
    seen: dict[str, int] = {}
    for path in run_dirs:
        source = results_path(path)  # a run directory, or the results.json in one
        run_dir = source.parent
        results, summary = load_summary(source)
        base = run_dir.resolve().name or "run"
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}-{seen[base]}"
        runs.append(RunResult(name, run_dir, results, summary))
    return runs


def _label(value: Any) -> Optional[str]:
    """config['plan'] / config['peft'] may be a name or a section; show its name (or kind).

    Only a string or a number is shown: str() of a deeply nested list from a file can overflow the stack.
    """
    if isinstance(value, dict):
        value = next((value[k] for k in ("name", "kind", "type") if value.get(k) is not None), None)
    if not isinstance(value, (str, int, float)):
        return None
    return str(value)


def _number(value: Any) -> Optional[float]:
    """A finite float, or None for anything else (a string, NaN, an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        x = float(value)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


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
    # one training step's live tensors above the model, worst task (what `mozo bench` measures); the process
    # peak is the CPU's max RSS, which is the same for every plan on a CPU (peak_mem_kind says which)
    steps = [_number(v) for v in cost.get("step_peak_bytes") or [] if _number(v) is not None] \
        if isinstance(cost.get("step_peak_bytes"), list) else []
    signal = run.results.get("zo_signal") if isinstance(run.results.get("zo_signal"), dict) else {}
    tasks = [v for v in signal.values() if isinstance(v, dict)]
    ratios = [_number(r) for t in tasks for r in (t.get("zo_to_fo_step_ratio") or {}).values()]
    excess = [_number(t.get("mean_zo_gain")) - _number(t.get("mean_noise_gain")) for t in tasks
              if _number(t.get("mean_zo_gain")) is not None and _number(t.get("mean_noise_gain")) is not None]
    ratios = [r for r in ratios if r is not None]
    return {
        "run": run.name,
        "plan": _label(config.get("plan")),
        "peft": _label(config.get("peft")),
        **{key: run.summary[key] for key in ("last", "avg", "transfer", "bwt", "forgetting")},
        "trainable_params": _trainable_total(cost),
        "step_peak_mib": max(steps) / MIB if steps else None,
        # engine/signal.py: mean over tasks and ZO towers of the ZO step size relative to FO's, and of the held-out
        # loss decrease of the ZO update minus that of a random update of the same size (zo.gain_every runs)
        "zo_step_ratio": sum(ratios) / len(ratios) if ratios else None,
        "zo_gain_excess": sum(excess) / len(excess) if excess else None,
        "peak_mem_mib": None if peak is None else peak / MIB,
        "wall_time_s": _number(cost.get("wall_time_s")),
    }


def _escape(cell: str) -> str:
    return printable(cell.replace("\n", " ")).replace("|", "\\|")


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


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may run as a formula (OWASP)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_cell(value: Any) -> Any:
    """A CSV cell: None -> empty, numbers as they are (a negative BWT stays a number), text escaped.

    Text starting with = + - @ tab or CR is prefixed with a single quote (OWASP's advice against CSV
    formula injection), unless it reads as a number ("-5" is no formula); control characters are shown
    as escapes, as in the markdown.
    """
    if value is None:
        return ""
    if not isinstance(value, str):
        return value
    if value.startswith(FORMULA_START) and not _is_number(value):
        value = "'" + value
    return printable(value)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """CSV with the table's headers and full-precision values; missing values are empty cells."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([c.header for c in COLUMNS])
        for row in rows:
            writer.writerow([csv_cell(row.get(c.key)) for c in COLUMNS])
    return path
