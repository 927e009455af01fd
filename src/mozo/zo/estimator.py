"""The finite-difference estimator: the one place where perturbations, loss differences and coefficients
are formed. The training step (`engine/step.py`) and every diagnostic (`diagnostics/`) call it, so what
the diagnostics measure is what trains.

Parameter groups are named by plain strings (the step names them after towers; a diagnostic after a
unit); the estimator does not know what they are. Each group has its own epsilon and direction stream:
direction d of group g is regenerated from `mix_seed(seed_d, stream_g)` (or `seed_d` itself when the
stream is None), so the groups never share a direction and any group can be replayed alone.

The caller supplies `evaluate(names)`: the loss at the groups' current values, recomputing only what the
perturbed groups `names` touch (the step re-runs a tower from its prefix cache and reuses the other
tower's features). One estimate for direction seeds s_1..s_q is, per block of groups B:

    one-sided  c_{d,g} = (L(theta + eps z_d on B) - L(theta)) / eps_g
    two-sided  c_{d,g} = (L(theta + eps z_d on B) - L(theta - eps z_d on B)) / (2 eps_g)

`blocks="joint"`: one block holding every group (one loss difference per direction, the paper's
estimator for a whole plan); `blocks="group"`: one block per group (each group perturbed alone, so no
group's coefficient carries another group's term, at the cost of one forward per group and direction).

Perturbations are applied in place in fp32 and undone by subtraction in the order +1, (-2, +1) | -1;
a perturbation that an exception interrupts is undone by `undo()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from mozo.zo.directions import LawLike, perturb_
from mozo.seeds import mix_seed

BLOCKS = ("joint", "group")


@dataclass
class Group:
    """A named set of fp32 parameters estimated together: its epsilon and its direction stream."""

    params: list[torch.Tensor]
    eps: float
    stream: Optional[int] = None


@dataclass
class Differences:
    """The raw outcome of one estimate, before any all-reduce: per evaluated block (in order) the loss
    difference, the groups it perturbed, and the perturbed losses."""

    diffs: list[torch.Tensor] = field(default_factory=list)
    blocks: list[tuple[str, ...]] = field(default_factory=list)
    plus: list[torch.Tensor] = field(default_factory=list)
    minus: list[torch.Tensor] = field(default_factory=list)  # two-sided only


class Estimator:
    """Forms ZO estimates over named parameter groups. Stateless between estimates except for a
    perturbation in progress (undone by `undo()` after an error)."""

    def __init__(self, groups: dict[str, Group], distribution: LawLike = "gaussian", two_sided: bool = False,
                 blocks: str = "joint") -> None:
        if blocks not in BLOCKS:
            raise ValueError(f"blocks must be one of {', '.join(BLOCKS)}, got {blocks!r}")
        self.groups = groups
        # The directions' law; the step sets it per step when zo.subspace_rank confines them to a subspace.
        self.law, self.two_sided = distribution, two_sided
        self.block_names = [tuple(groups)] if blocks == "joint" else [(g,) for g in groups]
        self._outstanding: Optional[tuple[int, float, tuple[str, ...]]] = None  # (seed, offset, names)

    def group_seed(self, seed: int, name: str) -> int:
        """The seed of group `name`'s direction for direction seed `seed` (what rules and replays use)."""
        stream = self.groups[name].stream
        return seed if stream is None else mix_seed(seed, stream)

    def seeds_of(self, seeds: Sequence[int]) -> dict[str, list[int]]:
        return {g: [self.group_seed(s, g) for s in seeds] for g in self.groups}

    @property
    def perturbed(self) -> bool:
        return self._outstanding is not None

    def perturb(self, seed: int, scale: float, names: Sequence[str]) -> None:
        """theta_g += scale * eps_g * z_g(seed) for each group in `names`; tracked until it sums to 0."""
        names = tuple(names)
        for g in names:
            grp = self.groups[g]
            perturb_(grp.params, self.group_seed(seed, g), scale * grp.eps, self.law)
        offset = (self._outstanding[1] if self._outstanding else 0.0) + scale
        self._outstanding = None if offset == 0.0 else (seed, offset, names)

    def undo(self) -> None:
        """Return the groups to theta after an interrupted estimate (nothing to do otherwise)."""
        if self._outstanding is not None:
            seed, offset, names = self._outstanding
            self.perturb(seed, -offset, names)

    def differences(self, seeds: Sequence[int], evaluate: Callable[[tuple[str, ...]], torch.Tensor],
                    loss0: Optional[torch.Tensor] = None,
                    check: Callable[[torch.Tensor, str], None] = lambda loss, where: None) -> Differences:
        """Loss differences for every direction seed and block. `loss0` = L(theta) (one-sided baseline).

        If the groups are already at theta + eps z(seeds[0]) on every group when this is called (the step's
        `fo_at_perturbed`: the FO forward ran there), `loss0` is that loss and is taken as the first plus."""
        out = Differences()
        for seed in seeds:
            for names in self.block_names:
                if self._outstanding is None:
                    self.perturb(seed, +1.0, names)
                    plus = evaluate(names)
                else:  # already at theta + eps z: the caller's forward was that evaluation
                    plus = loss0
                check(plus, "a perturbed forward")
                if self.two_sided:
                    self.perturb(seed, -2.0, names)
                    minus = evaluate(names)
                    check(minus, "a perturbed forward")
                    self.perturb(seed, +1.0, names)
                    out.diffs.append(plus - minus)
                    out.minus.append(minus)
                else:
                    self.perturb(seed, -1.0, names)
                    out.diffs.append(plus - loss0)
                out.plus.append(plus)
                out.blocks.append(names)
        return out

    def coefficients(self, diffs: Sequence[float], blocks: Sequence[tuple[str, ...]]) -> dict[str, list[float]]:
        """c_{d,g} per group, in direction order, from (possibly all-reduced) loss differences."""
        denom = 2.0 if self.two_sided else 1.0
        return {g: [float(x) / (denom * grp.eps) for x, names in zip(diffs, blocks) if g in names]
                for g, grp in self.groups.items()}

    def forwards(self, q: int) -> int:
        """Perturbed loss evaluations of one estimate with q directions."""
        return q * len(self.block_names) * (2 if self.two_sided else 1)
