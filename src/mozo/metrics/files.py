"""Reading the files `mozo metrics` and `mozo report` summarise, and showing what came from them.

A results file is data from anywhere (a run, a hand-edited file, a published matrix typed in), so
nothing in it is trusted: its encoding, nesting depth, number sizes, types and shapes are checked, and
every defect is one `ResultsError` naming the file, which the commands print as one line (exit 2),
never a traceback. `load_summary` is the one loader both commands use.

Text from a file (or a directory name) is printed through `printable`, so that a name holding an ANSI
escape sequence cannot rewrite the terminal or the markdown report.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from mozo.metrics.summary import ResultsError, check_protocol, describe, summarize_results

RESULTS_FILENAME = "results.json"
# What a summary needs; `summary`, `config` and `cost` (which `mozo run` also writes) are optional, so a
# published matrix typed into a JSON file can be summarised too.
REQUIRED_KEYS = ("protocol", "tasks", "task_test_sizes", "acc_matrix")
RESULTS_KEYS = REQUIRED_KEYS + ("summary", "config", "cost")

# C0 and C1 controls (ESC, CR, ...), DEL, line separators, bidirectional overrides, and lone surrogates
# (an undecodable file name): shown as escapes. Surrogates would also fail to encode as UTF-8.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: Any) -> str:
    r"""`str(text)` with every control character as its escape (ESC -> `\x1b`), safe to print."""
    def escape(m: re.Match) -> str:
        code = ord(m.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _UNPRINTABLE.sub(escape, str(text))


def results_path(path: str | Path) -> Path:
    """A results.json path, given either the file or the run directory holding it."""
    p = Path(path)
    try:
        if p.is_dir():
            p = p / RESULTS_FILENAME
        found = p.is_file()
    except OSError as err:  # a name too long, a parent directory not searchable...
        raise ResultsError(f"{p}: cannot be read ({err.strerror or err})") from None
    if not found:
        raise FileNotFoundError(f"{p} not found; give a results.json or a run directory containing one")
    return p


def check_results(data: Any) -> dict[str, Any]:
    """Check the keys and the types of a parsed results file; protocol lower-cased, task names str.

    The matrix and the sizes are checked by `summarize`, which names the row and column at fault.
    """
    if not isinstance(data, dict):
        raise ResultsError(f"expected a JSON object, got {describe(data)}")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ResultsError(
            f"missing required key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
            f"(a results file needs {', '.join(REQUIRED_KEYS)})"
        )
    data["protocol"] = check_protocol(data["protocol"])
    tasks, sizes = data["tasks"], data["task_test_sizes"]
    if not isinstance(tasks, list) or any(isinstance(t, bool) or not isinstance(t, (str, int)) for t in tasks):
        raise ResultsError(f"tasks must be a list of task names, got {describe(tasks)}")
    if not isinstance(sizes, list):
        raise ResultsError(f"task_test_sizes must be a list of test-set sizes, got {describe(sizes)}")
    if len(tasks) != len(sizes):
        raise ResultsError(f"tasks has {len(tasks)} names but task_test_sizes has {len(sizes)} entries")
    data["tasks"] = [str(t) for t in tasks]
    return data


def _read_text(p: Path) -> str:
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ResultsError(f"not UTF-8 text (byte {err.start} is {err.object[err.start:err.start + 1]!r})") from None
    except OSError as err:
        raise ResultsError(f"cannot be read ({err.strerror or err})") from None


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ResultsError("nested too deeply to be a results file (JSON beyond Python's recursion limit)") from None
    except json.JSONDecodeError as err:
        raise ResultsError(f"not valid JSON ({err})") from None
    except ValueError as err:  # an integer beyond Python's int-string conversion limit (4300 digits)
        raise ResultsError(f"holds a number too large to read ({str(err).split(':')[0]})") from None


def _parse_csv(text: str) -> list[list[Optional[float]]]:
    """Rows of numbers, an empty cell for an entry not evaluated; blank lines are skipped."""
    try:
        lines = [cells for cells in csv.reader(io.StringIO(text)) if cells]
    except csv.Error as err:
        raise ResultsError(f"not a readable CSV ({err})") from None
    rows = []
    for i, cells in enumerate(lines):
        row: list[Optional[float]] = []
        for j, cell in enumerate(cells):
            try:
                row.append(float(cell) if cell.strip() else None)
            except ValueError:
                raise ResultsError(f"{describe(cell)} is not a number (row {i}, column {j}; no header row)") from None
        rows.append(row)
    return rows


def _summarized(p: Path, parse: Callable[[str], Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read, parse, check and summarise `p`; any defect becomes a ResultsError naming `p`."""
    try:
        results = check_results(parse(_read_text(p)))
        return results, summarize_results(results)
    except ResultsError as err:
        raise ResultsError(f"{p}: {err}") from None


def load_summary(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results, recomputed summary) of a results.json or of the one in a run directory.

    Raises FileNotFoundError if there is no file, and `ResultsError` naming the file and the problem
    otherwise (undecodable, invalid JSON, not an object, missing key, wrong type, bad matrix entry).
    """
    return _summarized(results_path(path), _parse_json)


def load_results(path: str | Path) -> dict[str, Any]:
    """The results of `load_summary`: a file that loads is one that summarises."""
    return load_summary(path)[0]


def load_matrix_csv(
    path: str | Path, sizes: Sequence[int], protocol: str = "cil"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results, summary) of an accuracy matrix in a CSV file: row i = after training task i, column j =
    task j, an empty cell = not evaluated (full or lower-triangular rows). `sizes` are the test-set
    sizes of the tasks, which weight the CIL accuracy; the tasks are named "task 1", "task 2"...
    A missing file is a `ResultsError` too ("cannot be read"), like any other unreadable one.
    """
    def parse(text: str) -> dict[str, Any]:
        tasks = [f"task {j + 1}" for j in range(len(sizes))]
        return {"protocol": protocol, "tasks": tasks, "task_test_sizes": list(sizes), "acc_matrix": _parse_csv(text)}

    return _summarized(Path(path), parse)
