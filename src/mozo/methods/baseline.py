"""The MoE-Adapters baseline: cross-entropy over the current task's classes (with optional label
smoothing, `train.label_smoothing`, which the MTCL reference uses at 0.2)."""
from __future__ import annotations

from mozo.methods.base import Method


class Baseline(Method):
    name = "baseline"
