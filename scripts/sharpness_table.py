"""Tables of `mozo diagnose --sharpness` reports over seeds: per-plan means and paired differences.

    python scripts/sharpness_table.py ROOT --plans fo,zo,frozen --pairs zo:frozen,zo:fo --seeds 0,1,2

reads ROOT/<plan>-<seed>/sharp.json (the layout of docs/findings.md#sharpness) and prints markdown:
mean [95% t interval] over seeds per plan, then for each pair X:Y the seed-by-seed difference X - Y
with its standard deviation, 95% t interval and the seed-to-seed standard deviation of Y for scale.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from scipy import stats


def metrics(rep: dict) -> dict[str, float]:
    g = rep["groups"]
    out = {"loss": rep["loss"]}
    for name in ("all", "vision", "language"):
        rows = {r["radius"]: r for r in g[name]["perturbation"]["by_radius"]}
        lo, hi = min(rows), max(rows)
        out[f"{name} curv r={lo:g} (x1e4)"] = rows[lo]["curvature"] * 1e4
        out[f"{name} mean dL r={hi:g} (x1e3)"] = rows[hi]["mean"] * 1e3
        out[f"{name} max dL r={hi:g} (x1e3)"] = rows[hi]["max"] * 1e3
    for name in ("all", "fo"):
        if "hessian" in g.get(name, {}):
            out[f"lambda_max {name}"] = g[name]["hessian"]["eigenvalue"]
    return out


def interval(xs: list[float]) -> tuple[float, float, float]:
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    h = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return m, sd, h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root")
    ap.add_argument("--plans", default="fo,zo,frozen")
    ap.add_argument("--pairs", default="zo:frozen")
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    plans, seeds = a.plans.split(","), [int(s) for s in a.seeds.split(",")]
    vals = {p: [metrics(json.loads((Path(a.root) / f"{p}-{s}" / "sharp.json").read_text())) for s in seeds] for p in plans}
    keys = list(vals[plans[0]][0])
    print("| metric | " + " | ".join(plans) + " |")
    print("|---|" + "---|" * len(plans))
    for k in keys:
        cells = []
        for p in plans:
            m, _, h = interval([v[k] for v in vals[p]])
            cells.append(f"{m:.4g} [{m - h:.4g}, {m + h:.4g}]")
        print(f"| {k} | " + " | ".join(cells) + " |")
    for pair in a.pairs.split(","):
        x, y = pair.split(":")
        print(f"\n| metric | {x} - {y} per seed | mean | sd | 95% CI | sd of {y} over seeds | reading |")
        print("|---|---|---|---|---|---|---|")
        for k in keys:
            d = [vx[k] - vy[k] for vx, vy in zip(vals[x], vals[y])]
            m, sd, h = interval(d)
            _, sd_y, _ = interval([v[k] for v in vals[y]])
            reading = "no difference" if m - h <= 0 <= m + h else ("higher" if m > 0 else "lower")
            print(f"| {k} | {', '.join(f'{v:.3g}' for v in d)} | {m:.3g} | {sd:.2g} | [{m - h:.3g}, {m + h:.3g}] | {sd_y:.2g} | {reading} |")


if __name__ == "__main__":
    main()
