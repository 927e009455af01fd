"""Zeroth-order update rules, applied from (seed, coefficient) pairs by regenerating directions.

A ZO step is fully described by its direction seeds, the coefficients c_d = projected gradient per
direction, and the learning rate: `apply_update` is used both by the live step and by `replay`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mozo.zo.directions import iter_directions, modality_seed

IN_PLACE_RULES = ("sgd", "sign-scalar")


@dataclass
class ZORecord:
    """What one ZO step did, per modality: enough to replay it exactly."""

    step: int
    seeds: list[int]  # one per direction
    coefs: dict[str, list[float]]  # modality -> c_d per direction
    lr: float
    rule: str
    distribution: str
    extra: dict = field(default_factory=dict)  # e.g. the conservative rule's chosen candidate


@torch.no_grad()
def estimate_(params: list[torch.Tensor], seeds: list[int], coefs: list[float], distribution: str) -> list[torch.Tensor]:
    """Materialise g = mean_d c_d z_d for each parameter (new tensors; needed by sign, adamw, conservative)."""
    out = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for seed, c in zip(seeds, coefs):
        for g, (_, z) in zip(out, iter_directions(params, seed, distribution)):
            g.add_(z, alpha=c / len(seeds))
    return out


@torch.no_grad()
def apply_update(params: list[torch.Tensor], seeds: list[int], coefs: list[float], lr: float, rule: str, distribution: str) -> None:
    """theta <- theta - lr * direction(rule). Rules that need g itself materialise it first."""
    q = len(seeds)
    if rule == "sgd":
        for seed, c in zip(seeds, coefs):
            for p, z in iter_directions(params, seed, distribution):
                p.add_(z, alpha=-lr * c / q)
    elif rule == "sign-scalar":
        for seed, c in zip(seeds, coefs):
            s = float((c > 0) - (c < 0))
            for p, z in iter_directions(params, seed, distribution):
                p.add_(z, alpha=-lr * s / q)
    elif rule == "sign":
        for p, g in zip(params, estimate_(params, seeds, coefs, distribution)):
            p.add_(g.sign_(), alpha=-lr)
    else:
        raise ValueError(f"rule {rule!r} is not applied from coefficients alone (it needs an optimizer or extra forwards)")


def replay(params_by_modality: dict[str, list[torch.Tensor]], records: list[ZORecord]) -> None:
    """Re-apply a logged trajectory of ZO steps (sgd, sign, sign-scalar) to fresh parameters."""
    for r in records:
        for modality, coefs in r.coefs.items():
            seeds = [modality_seed(s, modality) for s in r.seeds]
            apply_update(params_by_modality[modality], seeds, coefs, r.lr, r.rule, r.distribution)
