"""Means, confidence intervals and paired differences over seeds (Student t: a handful of seeds is the norm).

A claim about a plan's zeroth-order part is the paired difference, seed by seed, between the plan and the
same plan with that part switched off; its 95% interval excludes 0 or it is reported as no difference.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

from scipy import stats as _t


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean and the two-sided `level` t-interval of the mean (half-width None for a single value)."""
    n = len(values)
    m = statistics.fmean(values)
    if n < 2:
        return {"mean": m, "ci": None, "n": n}
    half = _t.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": m, "ci": [m - half, m + half], "n": n}


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """a - b seed by seed: mean, t-interval and two-sided p-value of the paired t-test."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    out = mean_ci(d, level)
    p: Optional[float] = None
    if len(d) >= 2:
        sd = statistics.stdev(d)
        p = 1.0 if sd == 0 and out["mean"] == 0 else (0.0 if sd == 0 else
                                                      float(2 * _t.t.sf(abs(out["mean"]) / (sd / math.sqrt(len(d))), len(d) - 1)))
    out.update(p=p, differences=d, verdict=verdict(out["ci"]))
    return out


def verdict(ci: Optional[list[float]]) -> str:
    if ci is None:
        return "one seed: no interval"
    lo, hi = ci
    return "higher" if lo > 0 else ("lower" if hi < 0 else "no difference")
