"""Bar chart of memory per plan (PNG), drawn on a bare Agg figure (headless, no pyplot state)."""
from __future__ import annotations

from pathlib import Path

MiB = 2**20


def plot_memory(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Two bars per plan: peak live bytes including the model, and above the model's parameters;
    a dashed line marks the model's own parameters."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plans = [r["plan"] for r in rows]
    total = np.array([r["peak_mem_bytes"] / MiB for r in rows])
    above = np.array([r["peak_above_model_bytes"] / MiB for r in rows])
    saved = np.array([r["saved_activation_bytes"] / MiB for r in rows])
    fig = Figure(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    w = 0.27
    bars = [ax.bar(x - w, total, w, label="peak incl. model"),
            ax.bar(x, above, w, label="peak above model params"),
            ax.bar(x + w, saved, w, label="saved for backward")]
    for group in bars:
        ax.bar_label(group, fmt="%.0f", fontsize=7, padding=1)
    model = rows[0]["model_param_bytes"] / MiB
    ax.axhline(model, color="gray", linestyle="--", linewidth=1, label=f"model parameters ({model:.0f} MiB)")
    ax.set_xticks(x, plans, rotation=20 if len(rows) > 5 else 0)
    ax.set_ylabel("MiB")
    ax.set_title(title or "memory of one training step per plan")
    ax.legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return Path(path)
