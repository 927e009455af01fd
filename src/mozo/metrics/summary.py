"""Continual-learning metrics from an accuracy matrix (the files holding one are read in `files.py`).

The accuracy matrix `A[i][j]` is the accuracy (%) on task j's test set after training task i
(docs/experiments.md, Metrics). Rows are the tasks trained so far, so a partial run (fewer rows than tasks,
e.g. a `num_tasks` limit) is summarised over the rows it has: `T` below is the last row, not the
number of tasks in the protocol. Entries not evaluated are `None` (`null` in JSON).

Numbers keep full precision; only printing rounds (to 2 decimals), so that a summary recomputed from
a results.json can be compared with the stored one without accumulating rounding errors.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Optional, Sequence

PROTOCOLS = ("cil", "mtcl")
# bwt / forgetting follow GEM / Chaudhry et al.; the *_continuum keys reproduce the continuum library's
# variants, which MoE-Adapters4CL logs, so that its published figures can be compared like for like.
SUMMARY_KEYS = ("last", "avg", "transfer", "bwt", "forgetting", "bwt_continuum", "forgetting_continuum")
MAX_TEST_SIZE = 2**53  # beyond this a size is not exactly a float, and no test set is that large

Matrix = list[list[Optional[float]]]


class ResultsError(ValueError):
    """A results.json (or an accuracy matrix) is missing something or holds an invalid value."""


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def describe(value: Any) -> str:
    """A short repr for error messages: a value read from a file may be a 4000-digit number, a long
    string with control characters (repr escapes them) or a deeply nested list (named by its type)."""
    if value is None or isinstance(value, (int, float, str)):
        try:
            text = repr(value)
        except ValueError:  # an int beyond Python's int-to-string digit limit
            return "an integer too large to print"
        return text if len(text) <= 40 else text[:37] + "..."
    return f"a {type(value).__name__}"


def check_protocol(protocol: str) -> str:
    """Return the protocol in canonical (lower-case) form; the metrics differ between the two."""
    if not isinstance(protocol, str):
        raise ResultsError(f"protocol must be a string ({', '.join(PROTOCOLS)}), got {describe(protocol)}")
    name = protocol.strip().lower()
    if name not in PROTOCOLS:
        raise ResultsError(f"unknown protocol {describe(protocol)}; expected one of {', '.join(PROTOCOLS)}")
    return name


def _check_entry(value: Any, i: int, j: int) -> Optional[float]:
    """An entry is None (not evaluated) or a finite percentage; anything else is a bug upstream."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ResultsError(f"acc_matrix[{i}][{j}] = {describe(value)} is not a number (row {i}, column {j})")
    # Ints are range-checked before float(): float() of a huge int raises OverflowError.
    if not isinstance(value, int) and not math.isfinite(value):
        raise ResultsError(f"acc_matrix[{i}][{j}] = {describe(value)} is not finite (row {i}, column {j})")
    if not 0 <= value <= 100:
        raise ResultsError(
            f"acc_matrix[{i}][{j}] = {describe(value)} is outside [0, 100] (row {i}, column {j}); "
            "accuracies are percentages"
        )
    return float(value)


def validate_matrix(acc_matrix: Sequence[Sequence[Any]], num_tasks: Optional[int] = None) -> Matrix:
    """Check the accuracy matrix and return it as a rectangular list of floats / None.

    Two layouts are accepted, because both occur in practice: full rows (one entry per task, `None`
    where not evaluated; what mozo writes) and the lower-triangular layout of published CIL results
    (row i holds tasks 0..i only; the reference MoE-Adapters metrics.json). Triangular rows are padded
    with `None`. Any other row length is ragged and rejected, naming the row.
    """
    if isinstance(acc_matrix, (str, bytes)) or not isinstance(acc_matrix, Sequence):
        raise ResultsError(f"acc_matrix must be a list of rows, got {type(acc_matrix).__name__}")
    if len(acc_matrix) == 0:
        raise ResultsError("acc_matrix is empty: no task has been trained and evaluated")
    for i, row in enumerate(acc_matrix):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ResultsError(f"acc_matrix row {i} must be a list, got {type(row).__name__}")
    width = num_tasks if num_tasks is not None else max(len(row) for row in acc_matrix)
    if len(acc_matrix) > width:
        raise ResultsError(
            f"acc_matrix has {len(acc_matrix)} rows but only {width} tasks; row {width} is one too many"
        )
    matrix: Matrix = []
    for i, row in enumerate(acc_matrix):
        if len(row) != width and len(row) != i + 1:
            raise ResultsError(
                f"acc_matrix row {i} has {len(row)} entries; expected {width} (one per task) "
                f"or {i + 1} (lower-triangular layout)"
            )
        values = [_check_entry(v, i, j) for j, v in enumerate(row)]
        matrix.append(values + [None] * (width - len(values)))
    return matrix


def _check_sizes(task_test_sizes: Optional[Sequence[Any]], width: int) -> Optional[list[int]]:
    """Test-set sizes weight the CIL step accuracy; they must cover every task and be positive."""
    if task_test_sizes is None:
        return None
    if isinstance(task_test_sizes, (str, bytes)) or not isinstance(task_test_sizes, Sequence):
        raise ResultsError(f"task_test_sizes must be a list, got {type(task_test_sizes).__name__}")
    if len(task_test_sizes) != width:
        raise ResultsError(
            f"task_test_sizes has {len(task_test_sizes)} entries but acc_matrix has {width} columns"
        )
    sizes = []
    for j, n in enumerate(task_test_sizes):
        whole = isinstance(n, int) or (isinstance(n, float) and n.is_integer())  # NaN, inf: not whole
        if isinstance(n, bool) or not whole or not 0 < n <= MAX_TEST_SIZE:
            raise ResultsError(f"task_test_sizes[{j}] = {describe(n)} must be a positive integer (at most 2**53)")
        sizes.append(int(n))
    return sizes


def _require(matrix: Matrix, i: int, j: int, why: str) -> float:
    """Fetch an entry a metric cannot do without; None there means the run skipped an evaluation."""
    value = matrix[i][j]
    if value is None:
        raise ResultsError(f"acc_matrix[{i}][{j}] is None (row {i}, column {j}) but {why}")
    return value


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def cil_step_accuracies(matrix: Matrix, sizes: Optional[list[int]]) -> list[float]:
    """acc_i: accuracy over all test samples of the classes seen up to task i.

    That is the mean of `A[i][0..i]` weighted by the test-set sizes, not a plain mean, because tasks
    may have different numbers of test images. Without sizes, every task weighs the same (a plain
    mean), which is exact when the tasks have equal test sets.
    """
    accs = []
    for i in range(len(matrix)):
        why = f"the CIL step accuracy after task {i} needs every task seen so far"
        values = [_require(matrix, i, j, why) for j in range(i + 1)]
        weights = sizes[: i + 1] if sizes is not None else [1] * (i + 1)
        accs.append(sum(w * v for w, v in zip(weights, values)) / sum(weights))
    return accs


def mtcl_row_means(matrix: Matrix) -> list[float]:
    """Mean accuracy over every task (trained or zero-shot) after each task: the MTCL per-step curve."""
    for i, row in enumerate(matrix):
        for j in range(len(row)):
            _require(matrix, i, j, "MTCL evaluates every task after every task (the matrix must be full)")
    return [sum(row) / len(row) for row in matrix]  # type: ignore[arg-type]


def mtcl_transfer(matrix: Matrix) -> Optional[float]:
    """Transfer = mean over j >= 1 of mean_{i<j} A[i][j]: zero-shot accuracy on tasks not yet trained.

    For a partial run, columns beyond the last row are averaged over all rows (all are before them).
    Undefined (None) with a single task.
    """
    per_task = []
    for j in range(1, len(matrix[0])):
        before = [matrix[i][j] for i in range(min(j, len(matrix)))]
        per_task.append(sum(before) / len(before))  # type: ignore[arg-type]
    return _mean(per_task)


def mtcl_avg(matrix: Matrix) -> float:
    """Avg = mean over tasks j of mean over all rows i of A[i][j]."""
    width = len(matrix[0])
    return sum(sum(row[j] for row in matrix) / len(matrix) for j in range(width)) / width  # type: ignore[misc]


def backward_transfer(matrix: Matrix) -> Optional[float]:
    """BWT (GEM, Lopez-Paz & Ranzato 2017) = mean_{j<T} (A[T][j] - A[j][j]): how the final model
    changed old tasks (negative = forgot).

    None with a single trained task, where there is no earlier task.
    """
    last = len(matrix) - 1
    why = "BWT compares the final row with the diagonal"
    diffs = [_require(matrix, last, j, why) - _require(matrix, j, j, why) for j in range(last)]
    return _mean(diffs)


def forgetting(matrix: Matrix) -> Optional[float]:
    """F (Chaudhry et al. 2018, eq. 3) = mean_{j<T} (max_{j<=i<T} A[i][j] - A[T][j]): drop from the
    best accuracy a task ever had.

    The max runs over the rows after task j was trained (rows before it are zero-shot or not evaluated)
    and ignores None entries. None with a single trained task.
    """
    last = len(matrix) - 1
    drops = []
    for j in range(last):
        final = _require(matrix, last, j, "forgetting compares the final row with earlier rows")
        earlier = [matrix[i][j] for i in range(j, last) if matrix[i][j] is not None]
        if not earlier:
            raise ResultsError(f"forgetting of task {j}: no evaluation of column {j} in rows {j}..{last - 1}")
        drops.append(max(earlier) - final)  # type: ignore[type-var]
    return _mean(drops)


def backward_transfer_continuum(matrix: Matrix) -> Optional[float]:
    """BWT as continuum's `backward_transfer` computes it, which is what MoE-Adapters4CL logs.

    Kept apart from `backward_transfer` because it is a different number, and published results use it:
    the sum of A[i][j] - A[j][j] over rows i >= 1 and tasks j < i - 1 (continuum's loop leaves out the
    task just before row i), divided by T(T-1)/2 pairs, T the number of rows. On MoE-Adapters' CIFAR-100
    10-10 matrix: -9.80, where GEM's definition gives -11.99. None with a single row (continuum: 0).
    """
    rows = len(matrix)
    if rows <= 1:
        return None
    why = "continuum's BWT compares every row with the diagonal"
    total = sum(
        _require(matrix, i, j, why) - _require(matrix, j, j, why) for i in range(1, rows) for j in range(i - 1)
    )
    return total / (rows * (rows - 1) / 2)


def forgetting_continuum(matrix: Matrix) -> Optional[float]:
    """Forgetting as continuum's `forgetting` computes it, which is what MoE-Adapters4CL logs.

    Chaudhry's eq. 3 with continuum's ranges: tasks j < T-2 only, the best accuracy over rows
    j..T-3 (the second-to-last row is left out), the sum divided by T-1; T the number of rows.
    On MoE-Adapters' CIFAR-100 10-10 matrix: 11.79, where Chaudhry's definition gives 11.99.
    None with a single row (continuum: 0).
    """
    rows = len(matrix)
    if rows <= 1:
        return None
    why = "continuum's forgetting compares the final row with earlier rows"
    drops = [
        max(_require(matrix, i, j, why) for i in range(j, rows - 2)) - _require(matrix, rows - 1, j, why)
        for j in range(rows - 2)
    ]
    return sum(drops) / (rows - 1)


def summarize(
    acc_matrix: Sequence[Sequence[Any]],
    protocol: str,
    task_test_sizes: Optional[Sequence[Any]] = None,
) -> dict[str, Any]:
    """Summarise an accuracy matrix: last, avg, transfer, bwt, forgetting and step_acc.

    - CIL: `step_acc[i]` = acc_i, the sample-weighted mean of `A[i][0..i]` with `task_test_sizes` as
      weights. If `task_test_sizes` is None, a plain mean is used instead (correct only when every task
      has the same number of test images). Last = acc_T, Avg = mean_i acc_i. Transfer (as MTCL's) only
      when every entry above the diagonal is present, i.e. the run evaluated each future task zero-shot
      on its own classes (`data.eval_future`); otherwise None.
    - MTCL: `step_acc[i]` = mean of row i; Last = mean_j A[T][j]; Avg = mean_j mean_i A[i][j];
      Transfer = mean_{j>=1} mean_{i<j} A[i][j] (None with a single task). The matrix must be full.
    - Both: bwt and forgetting (GEM / Chaudhry: `backward_transfer`, `forgetting`), and bwt_continuum,
      forgetting_continuum (the variants MoE-Adapters4CL logs: `backward_transfer_continuum`,
      `forgetting_continuum`); all None with a single row.

    T is the last row, so partial runs (fewer rows than tasks) work. Values keep full precision.
    Raises `ResultsError` (a ValueError) naming the row/column of a ragged, non-numeric, non-finite or
    out-of-range entry, or of a None where the metric needs a value.
    """
    proto = check_protocol(protocol)
    sizes_is_list = isinstance(task_test_sizes, Sequence) and not isinstance(task_test_sizes, (str, bytes))
    width = len(task_test_sizes) if sizes_is_list else None  # type: ignore[arg-type]
    if width is not None:
        for i, row in enumerate(acc_matrix if isinstance(acc_matrix, Sequence) else []):
            if isinstance(row, Sequence) and len(row) > width:
                raise ResultsError(
                    f"acc_matrix row {i} has {len(row)} entries but task_test_sizes lists only {width} tasks"
                )
    matrix = validate_matrix(acc_matrix, width)
    sizes = _check_sizes(task_test_sizes, len(matrix[0]))
    if proto == "cil":
        step_acc = cil_step_accuracies(matrix, sizes)
        # Transfer only when the run also evaluated every not-yet-trained task (data.eval_future).
        future = all(matrix[i][j] is not None for j in range(1, len(matrix[0])) for i in range(min(j, len(matrix))))
        last, avg = step_acc[-1], sum(step_acc) / len(step_acc)
        transfer = mtcl_transfer(matrix) if future else None
    else:
        step_acc = mtcl_row_means(matrix)
        last, avg, transfer = step_acc[-1], mtcl_avg(matrix), mtcl_transfer(matrix)
    return {
        "last": last,
        "avg": avg,
        "transfer": transfer,
        "bwt": backward_transfer(matrix),
        "forgetting": forgetting(matrix),
        "bwt_continuum": backward_transfer_continuum(matrix),
        "forgetting_continuum": forgetting_continuum(matrix),
        "step_acc": step_acc,
    }


def summary_differences(stored: dict[str, Any], recomputed: dict[str, Any], tol: float = 0.01) -> list[str]:
    """Names of summary keys whose stored value differs from the recomputed one by more than `tol`.

    A stale or hand-edited summary is the usual cause; a key absent from the stored summary is skipped
    (transfer may be omitted for CIL), but None against a number counts as a difference.
    """
    differ = []
    for key in SUMMARY_KEYS + ("step_acc",):
        if key not in stored:
            continue
        a, b = stored[key], recomputed.get(key)
        if key == "step_acc":
            if not isinstance(a, list) or len(a) != len(b) or any(
                not _close(x, y, tol) for x, y in zip(a, b)
            ):
                differ.append(key)
        elif not _close(a, b, tol):
            differ.append(key)
    return differ


def _close(a: Any, b: Any, tol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    try:
        return abs(float(a) - float(b)) <= tol
    except (TypeError, ValueError, OverflowError):
        return False


def summarize_results(results: dict[str, Any]) -> dict[str, Any]:
    """`summarize` applied to a loaded results.json."""
    return summarize(results["acc_matrix"], results["protocol"], results.get("task_test_sizes"))


def fmt(value: Optional[float], digits: int = 2) -> str:
    """Print a metric with `digits` decimals, '-' when undefined."""
    return "-" if value is None else f"{value:.{digits}f}"
