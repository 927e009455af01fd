"""What every zeroth-order update rule shares: the step record, the materialised estimate, the interface.

A rule turns one estimate, given as direction seeds and coefficients per parameter group (c_d, the
projected gradient along direction z_d), into an update of that group's parameters. Directions are
regenerated from their seeds, never stored. Group names (e.g. "vision", "language") are plain strings:
a rule knows nothing of towers or models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch

from mozo.zo.directions import LawLike, iter_directions

Groups = dict[str, list[torch.Tensor]]


@dataclass
class ZORecord:
    """What one ZO step did, per group: enough to replay it exactly (for rules with `replayable`)."""

    step: int
    seeds: list[int]  # one per direction
    coefs: dict[str, list[float]]  # group -> c_d per direction
    lr: float
    rule: str
    distribution: LawLike  # a distribution name, or a Law (zo.subspace_rank: the step's subspace)
    extra: dict = field(default_factory=dict)  # e.g. the conservative rule's chosen candidate


@torch.no_grad()
def estimate_(params: list[torch.Tensor], seeds: list[int], coefs: list[float], distribution: LawLike) -> list[torch.Tensor]:
    """Materialise g = mean_d c_d z_d for each parameter (new fp32 tensors; for rules that need g itself)."""
    out = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for seed, c in zip(seeds, coefs):
        for g, (_, z) in zip(out, iter_directions(params, seed, distribution)):
            g.add_(z, alpha=c / len(seeds))
    return out


@dataclass
class UpdateContext:
    """What a rule may use besides the estimate. `evaluate()` is the loss at the groups' current values
    (the perturbed towers recomputed, noise seeded as in the estimate); `reduce` averages scalars over
    data-parallel ranks; `loss0` is L(theta) of the estimate."""

    evaluate: Optional[Callable[[], torch.Tensor]] = None
    loss0: Optional[torch.Tensor] = None
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t


class Rule:
    """One update rule. Subclasses set `name` and implement `update_group` (rules applied group by group
    from seeds and coefficients alone) or override `apply`.

    Class attributes say what the rule needs, so the step and the cost accounting never special-case it:
      extra_forwards  loss evaluations `apply` makes beyond the estimate's;
      replayable      a record of (seeds, coefficients, lr) reproduces the update with `update_group`;
      default_eps     per-group epsilon defaults (None: the estimator's default);
      applied_as      the name written to ZORecord.rule (the update actually applied).
    """

    name: ClassVar[str] = ""
    extra_forwards: ClassVar[int] = 0
    replayable: ClassVar[bool] = True
    default_eps: ClassVar[Optional[dict[str, float]]] = None
    applied_as: ClassVar[Optional[str]] = None

    def __init__(self, groups: Groups, lr: float = 0.0, weight_decay: float = 0.0) -> None:
        self.groups = groups

    @classmethod
    def record_name(cls) -> str:
        return cls.applied_as or cls.name

    @torch.no_grad()
    def apply(self, seeds: dict[str, list[int]], coefs: dict[str, list[float]], lr: float, distribution: LawLike,
              ctx: UpdateContext) -> dict:
        """Update every group; return extra facts for the step's record (empty for most rules)."""
        for g, params in self.groups.items():
            self.update_group(params, seeds[g], coefs[g], lr, distribution)
        return {}

    @staticmethod
    def update_group(params: list[torch.Tensor], seeds: list[int], coefs: list[float], lr: float, distribution: LawLike) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The rule's own state for checkpoints (empty for stateless rules)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
