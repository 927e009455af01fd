"""Figures of a `mozo diagnose` report (headless Agg figures, as in mozo.report.plots)."""
from __future__ import annotations

from pathlib import Path

from mozo.report.plots import figure

COLOURS = {"vision": "tab:blue", "language": "tab:orange"}


def reference_index(eps: list[float], ref: float | None = None) -> int:
    """Index of the epsilon the per-layer and per-q figures use: `ref`, else the one nearest 1e-3."""
    import math

    target = ref if ref is not None else 1e-3
    return min(range(len(eps)), key=lambda i: abs(math.log10(eps[i]) - math.log10(target)))


def plot_variance_per_layer(report: dict, path: str | Path, ref_eps: float | None = None) -> Path:
    """Variance (trace of covariance) per layer, both towers; right: normalised by ||g||^2, with P + 1."""
    eps = report["estimator"]["eps"]
    i = reference_index(eps, ref_eps)
    fig = figure(10, 4)
    ax1, ax2 = fig.subplots(1, 2)
    for m in ("vision", "language"):
        rows = sorted((r for r in report["rows"] if r["modality"] == m and r["layer"] is not None), key=lambda r: r["layer"])
        if not rows:
            continue
        layers = [r["layer"] for r in rows]
        ax1.plot(layers, [r["by_eps"][i]["variance"] for r in rows], "o-", color=COLOURS[m], label=m)
        nv = [(r["layer"], r["by_eps"][i]["normalized_variance"]) for r in rows if r["by_eps"][i]["normalized_variance"] is not None]
        if nv:
            ax2.plot([a for a, _ in nv], [b for _, b in nv], "o-", color=COLOURS[m], label=m)
        ax2.plot(layers, [r["ideal_normalized_variance"] for r in rows], "--", color=COLOURS[m], alpha=0.6, label=f"{m}: exact-derivative value")
    from matplotlib.ticker import MaxNLocator

    for ax, title in ((ax1, "variance  mean ||g_d - mean g||^2"), (ax2, "normalised variance / ||grad||^2")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"ZO estimate variance per unit, eps={eps[i]:g} ({report['backbone']}, {report['state']['description']})", fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_cosine_vs_q(report: dict, path: str | Path, ref_eps: float | None = None) -> Path:
    """Mean cosine (over units and repeats) of the q-averaged estimate with the true gradient."""
    eps = report["estimator"]["eps"]
    qs = report["estimator"]["q"]
    i = reference_index(eps, ref_eps)
    fig = figure(6, 4)
    ax = fig.subplots()
    for m, agg in report["modalities"].items():
        vals = [(q, agg["by_eps"][i]["cosine"][str(q)]) for q in qs if agg["by_eps"][i]["cosine"][str(q)] is not None]
        if vals:
            ax.plot([a for a, _ in vals], [b for _, b in vals], "o-", color=COLOURS[m], label=f"{m} (measured)")
        rows = [r for r in report["rows"] if r["modality"] == m]
        ideal = [(q, sum(r["by_eps"][i]["cosine"][str(q)]["ideal"] or 0 for r in rows) / len(rows)) for q in qs]
        if report["estimator"]["distribution"] == "gaussian":
            ax.plot([a for a, _ in ideal], [b for _, b in ideal], "--", color=COLOURS[m], alpha=0.6, label=f"{m}: exact-derivative value")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("q (directions averaged)")
    ax.set_ylabel("cosine with autograd gradient")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"cosine vs q, eps={eps[i]:g}, mean over units", fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_loss_diff_vs_eps(report: dict, path: str | Path) -> Path:
    """Left: mean |L(theta+eps z) - L(theta)| and its first-order prediction; right: finite-difference error."""
    eps = report["estimator"]["eps"]
    fig = figure(10, 4)
    ax1, ax2 = fig.subplots(1, 2)
    for m in report["modalities"]:
        rows = [r for r in report["rows"] if r["modality"] == m]
        diff = [sum(r["by_eps"][i]["loss_diff"]["mean_abs"] for r in rows) / len(rows) for i in range(len(eps))]
        pred = [sum(r["by_eps"][i]["loss_diff"]["first_order_mean_abs"] for r in rows) / len(rows) for i in range(len(eps))]
        ax1.plot(eps, diff, "o-", color=COLOURS[m], label=f"{m} measured")
        ax1.plot(eps, pred, "--", color=COLOURS[m], alpha=0.6, label=f"{m} eps*|<grad,z>|")
        err = [report["modalities"][m]["by_eps"][i]["fd_rel_error"] for i in range(len(eps))]
        pts = [(e, v) for e, v in zip(eps, err) if v is not None]
        if pts:
            ax2.plot([a for a, _ in pts], [b for _, b in pts], "o-", color=COLOURS[m], label=m)
    ax1.axhline(report.get("loss_ulp", 0) or 1e-30, color="gray", lw=0.8, ls=":", label="fp32 ulp of L")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("eps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_title("loss difference vs eps (mean over units)", fontsize=10)
    ax2.set_title("finite-difference error mean|c - <grad,z>| / mean|<grad,z>|", fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)


def write_plots(report: dict, out_dir: str | Path, prefix: str = "diag", ref_eps: float | None = None) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_loss_diff_vs_eps(report, out / f"{prefix}_loss_diff_vs_eps.png")]
    if report["estimator"]["block"] == "unit":
        paths.insert(0, plot_variance_per_layer(report, out / f"{prefix}_variance_per_layer.png", ref_eps))
    paths.insert(1, plot_cosine_vs_q(report, out / f"{prefix}_cosine_vs_q.png", ref_eps))
    return paths
