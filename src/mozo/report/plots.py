"""PNG plots of a report: accuracy matrix per run, accuracy per step, cost per run.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, not through pyplot, so the
report works headless (servers, CI) and never changes the caller's global matplotlib backend.
matplotlib is imported inside the functions so that `mozo --help` and the metrics stay fast.
Names from run directories and results files go through `_plain`: a `$` would start mathtext (and a
malformed expression fails the whole report), a control character would print as a box.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from mozo.metrics.files import printable
from mozo.report.tables import RunResult

ANNOTATE_MAX_TASKS = 30  # beyond this the cell labels are unreadable; the colour bar still reads


def _plain(text: object) -> str:
    """Text shown as written: control characters escaped, `$` escaped so mathtext never parses it."""
    return printable(text).replace("$", r"\$")


def figure(width: float, height: float):  # -> matplotlib.figure.Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _task_labels(results: dict[str, Any], width: int) -> list[str]:
    tasks = [_plain(t) for t in (results.get("tasks") or [])]
    return tasks if len(tasks) == width and width <= 20 else [str(j + 1) for j in range(width)]


def plot_acc_matrix(run: RunResult, path: str | Path) -> Path:
    """Heatmap of A[i][j] (row = after task i), cells annotated with the accuracy, None left blank."""
    import matplotlib
    import numpy as np

    from mozo.metrics.summary import validate_matrix

    sizes = run.results.get("task_test_sizes")
    matrix = validate_matrix(run.results["acc_matrix"], len(sizes) if isinstance(sizes, list) else None)
    rows, width = len(matrix), len(matrix[0])
    data = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in r] for r in matrix], float))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    fig = figure(min(20.0, 2.5 + 0.55 * width), min(16.0, 1.8 + 0.45 * rows))
    ax = fig.add_subplot()
    image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=100.0, aspect="auto")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    if width <= ANNOTATE_MAX_TASKS:
        for i in range(rows):
            for j in range(width):
                if matrix[i][j] is not None:
                    v = matrix[i][j]
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 60 else "black")
    ax.set_xticks(range(width), _task_labels(run.results, width), rotation=45 if width > 8 else 0, ha="right" if width > 8 else "center")
    ax.set_yticks(range(rows), [str(i + 1) for i in range(rows)])
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    ax.set_title(f"{_plain(run.name)} ({run.results['protocol']}): accuracy matrix")
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_acc_per_step(runs: Sequence[RunResult], path: str | Path) -> Path:
    """All runs' accuracy after each task on one axis: acc_i for CIL, the row mean for MTCL."""
    from matplotlib.ticker import MaxNLocator

    fig = figure(7.0, 4.5)
    ax = fig.add_subplot()
    for run in runs:
        steps = run.summary["step_acc"]
        ax.plot(range(1, len(steps) + 1), steps, marker="o", markersize=3,
                label=f"{_plain(run.name)} ({run.results['protocol']})")
    protocols = {run.results["protocol"] for run in runs}
    ylabel = {"cil": "acc_i: accuracy on seen classes (%)", "mtcl": "mean accuracy over tasks (%)"}
    ax.set_ylabel(ylabel[protocols.pop()] if len(protocols) == 1 else "acc_i (CIL) / row mean (MTCL) (%)")
    ax.set_xlabel("after training task")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy per step")
    fig.savefig(path, dpi=110)
    return Path(path)


def _bars(ax, names: list[str], values: list[Optional[float]], ylabel: str, digits: int) -> None:
    """Bars with value labels; a run without the value gets no bar and a '-' label."""
    heights = [0.0 if v is None or not math.isfinite(v) else v for v in values]
    bars = ax.bar(range(len(names)), heights, color="tab:blue")
    ax.bar_label(bars, labels=["-" if v is None else f"{v:.{digits}f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 3 else 0,
                  ha="right" if len(names) > 3 else "center")
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)


def _bar_pair(rows: Sequence[dict[str, Any]], path: str | Path, panels: Sequence[tuple[str, str, str, int]]) -> Path:
    """Two bar charts side by side, one bar per run: each panel is (row key, y label, title, digits)."""
    names = [_plain(r["run"]) for r in rows]
    fig = figure(max(7.0, 1.2 * len(names) + 3), 4.0)
    for ax, (key, ylabel, title, digits) in zip(fig.subplots(1, len(panels)), panels):
        _bars(ax, names, [r.get(key) for r in rows], ylabel, digits)
        ax.set_title(title)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_cost(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One training step's live-tensor peak (MiB, worst task) and wall time (s) per run, side by side (rows as
    built by `build_row`). Not the process RSS: on a CPU it is the same for every plan."""
    return _bar_pair(rows, path, [("step_peak_mib", "step peak, live tensors (MiB)", "one training step's peak above the model", 0),
                                  ("wall_time_s", "wall time (s)", "wall time", 1)])


def plot_zo_signal(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Per run (rows as built by `build_row`): the ZO step size relative to FO's, and the held-out ZO gain minus
    the gain of a random update of the same size (zo.gain_every runs; engine/signal.py). Runs without ZO units
    have no bars."""
    return _bar_pair(rows, path, [("zo_step_ratio", "ZO step size / FO step size", "how far the ZO units move", 3),
                                  ("zo_gain_excess", "ZO gain - noise gain (loss)", "what the ZO move buys beyond noise", 6)])
