"""Every knob of the zeroth-order estimator and update, with the defaults mozo chose and why."""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

from mozo.zo.directions import DISTRIBUTIONS, Law, LawLike
from mozo.zo.rules import RULES, get_rule

GRANULARITIES = ("joint", "tower", "unit")
DEFAULT_EPS = 1e-3  # the paper's epsilon; a rule may set its own per group (MoZO: mozo/zo/rules/mozo.py)


def check_range(key: str, value: Any, low: float | None = None, high: float | None = None, *, integer: bool = False,
                open_low: bool = False, open_high: bool = False, optional: bool = False) -> None:
    """Raise a ValueError naming `key`, `value` and the allowed range unless `value` is an integer (or a
    finite number) within [low, high] (`open_*`: that bound excluded); `optional` also allows None.

    The one range check of every config section (zo here, peft, and the run's own keys)."""
    if value is None and optional:
        return
    if integer:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if ok:
        return
    if low is not None and high is not None:
        allowed = f" in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    elif low is not None:
        allowed = f" {'>' if open_low else '>='} {low}"
    elif high is not None:
        allowed = f" {'<' if open_high else '<='} {high}"
    else:
        allowed = ""
    kind = "an integer" if integer else "a finite number"
    raise ValueError(f"{key} must be {kind}{allowed}{' or null' if optional else ''}, got {value!r}")


def in_parts(name: str, parts: str) -> bool:
    """Whether a unit parameter's name (e.g. `experts.0.up.weight`) matches zo.parts' comma-separated shell patterns."""
    return any(fnmatch.fnmatchcase(name, pattern.strip()) for pattern in parts.split(","))


@dataclass
class ZOConfig:
    """Zeroth-order estimation and update.

    rule:
      sgd           g = mean_d c_d * z_d, theta -= lr * g      (aggressive ZO-SGD, one step per estimate)
      sign          theta -= lr * sign(g), element-wise        (sign normalisation of the estimate)
      sign-scalar   theta -= lr * mean_d sign(c_d) * z_d       (sign of the scalar directional derivative, ZeroFlow-style)
      conservative  try theta - lr*g and theta + lr*g, keep whichever of them and theta has the lowest loss
      adamw         torch AdamW applied to g as if it were a gradient
      mozo          `sign` with eps_vision < eps_language (modality-aware ZO of the paper)
      noise         mozo's perturbations and step size along random coefficients: the null control
    with c_d = (L(theta + eps*z_d) - L(theta)) / eps (one-sided, the paper's Eq. 2) or
    (L(theta + eps*z_d) - L(theta - eps*z_d)) / (2*eps) (two-sided).

    Defaults: one-sided, because the FO forward already yields L(theta) so a q=1 step costs one extra
    forward; Gaussian directions, for which E[c z] is the gradient exactly (Rademacher is also unbiased
    and has lower variance per coordinate; both are offered).

    rank_directions (data-parallel runs, docs/distributed.md): false (default), every rank uses the same q
    direction seeds and the ranks' loss differences are averaged (the one-process estimate of the global
    batch). True (as lebrice/MeZO does), rank r draws its own q seeds, a function of (seed, step, direction,
    rank) with rank 0 keeping the one-process seeds, evaluates them on its own shard, and the q x N loss
    differences are all-gathered: every rank applies the same update over all q x N directions (the rule's
    update for q x N directions, e.g. their mean), so q grows with the number of ranks at no extra time.
    Each rank restores its ZO units from a copy saved before its own perturbations (memory: one fp32 copy
    of the ZO units), so replicas stay bitwise equal. On one process it changes nothing.
    """

    rule: str = "sgd"
    lr: float = 1e-4
    # The ZO learning rate as a multiple of the FO one at every step (its per-task value and schedule included);
    # when set it replaces zo.lr (a preset's zo.lr included). For sign rules 1.0 is AdamW's per-element step of
    # its first updates (|m / sqrt(v)| ~ 1); over a demo run such sign steps move the units 3.6-3.9x as far as
    # AdamW moves its own (docs/findings.md), whose per-element steps shrink.
    lr_relative: Optional[float] = None
    q: int = 1
    two_sided: bool = False
    distribution: str = "gaussian"
    eps_vision: Optional[float] = None  # None: DEFAULT_EPS, or the MoZO default under rule=mozo
    eps_language: Optional[float] = None
    weight_decay: float = 0.0  # for rule=adamw
    fo_at_perturbed: bool = False  # two-sided, q=1: take the FO gradient at theta+eps*z, saving one forward
    # What one loss difference covers. joint: every ZO unit of the plan at once (one forward per direction).
    # tower: each ZO tower perturbed alone, the other's features reused (the same tower forwards, without the
    # other tower's term in each tower's coefficient). unit: each ZO unit alone (the paper's Eq. 2 per training
    # unit), its tower re-run from the cached input of its own layer (one partial forward per unit and direction).
    granularity: str = "joint"
    rank_directions: bool = False  # data-parallel: each rank its own q directions, q x N differences all-gathered
    # Which parameters of each ZO unit are perturbed and updated, as comma-separated shell patterns of their names
    # within the unit (MoE: w_gate (the router), w_noise, experts.N.down.*, experts.N.up.*): a smaller perturbed
    # space raises the estimate's cosine with the gradient as 1/sqrt(d). The other parameters of a ZO unit stay put.
    parts: str = "*"
    # ZO updates per batch: each further one a fresh estimate at the point the previous reached, forward-only
    # (the prefix cache and the other tower's features reused): more ZO steps in a task's fixed number of batches.
    steps_per_batch: int = 1
    # Low-rank directions (LOZO / SubZero, zo/directions.py): matrices perturbed along U V^T / sqrt(r) with V fixed
    # for subspace_every steps, so the steps of a window estimate the gradient within one rows x r space per matrix.
    # 0: dense directions (the paper's).
    subspace_rank: int = 0
    subspace_every: int = 50
    # Guided directions (zo/directions.py): each ZO parameter's direction leans, with this weight in [0, 1], towards
    # the mean FO gradient of the same parameter in the neighbouring layers' FO units of its tower (layer-wise
    # plans), which the step has computed (and, data parallel, all-reduced) before any ZO forward. 0: random
    # directions (the paper's).
    guide_weight: float = 0.0
    gain_every: int = 0  # every N steps, the held-out ZO gain against a noise step of the same size (engine/signal.py); 0: off

    def __post_init__(self) -> None:
        get_rule(self.rule)  # an unknown name lists the registered rules
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"zo.distribution must be one of {', '.join(DISTRIBUTIONS)}, got {self.distribution!r}")
        check_range("zo.lr", self.lr, 0)  # 0: the documented 'frozen' control
        check_range("zo.lr_relative", self.lr_relative, 0, optional=True)
        check_range("zo.subspace_rank", self.subspace_rank, 0, integer=True)
        check_range("zo.subspace_every", self.subspace_every, 1, integer=True)
        check_range("zo.guide_weight", self.guide_weight, 0, 1)
        if self.guide_weight and self.fo_at_perturbed:
            raise ValueError("zo.guide_weight needs the FO gradients before the perturbation; zo.fo_at_perturbed takes them at it")
        check_range("zo.q", self.q, 1, integer=True)
        check_range("zo.gain_every", self.gain_every, 0, integer=True)
        check_range("zo.steps_per_batch", self.steps_per_batch, 1, integer=True)
        if self.steps_per_batch > 1 and self.rank_directions:
            raise ValueError("zo.steps_per_batch > 1 is not implemented with zo.rank_directions; use one of them")
        if not isinstance(self.parts, str) or not all(p.strip() for p in self.parts.split(",")):
            raise ValueError(f"zo.parts must be comma-separated parameter-name patterns, e.g. '*' or 'w_gate,*.up.*', got {self.parts!r}")
        check_range("zo.weight_decay", self.weight_decay, 0)
        for f in dataclasses.fields(self):  # one epsilon key per parameter group the step names (eps_<group>)
            if f.name.startswith("eps_"):
                check_range(f"zo.{f.name}", getattr(self, f.name), 0, open_low=True, optional=True)
        if self.fo_at_perturbed and not (self.two_sided and self.q == 1):
            raise ValueError("zo.fo_at_perturbed needs zo.two_sided=true and zo.q=1 (it replaces L(theta) by L(theta+eps z))")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"zo.granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.fo_at_perturbed and self.granularity != "joint":
            raise ValueError("zo.fo_at_perturbed perturbs every tower in the FO forward; it needs zo.granularity=joint")

    def learning_rate(self, fo_lr: float) -> float:
        """The ZO learning rate at a step whose FO learning rate is `fo_lr` (zo.lr, or zo.lr_relative x fo_lr)."""
        return self.lr if self.lr_relative is None else self.lr_relative * fo_lr

    def law(self, basis: int) -> LawLike:
        """The directions' law of a step whose subspace seed is `basis` (unused for dense directions)."""
        return Law(self.distribution, self.subspace_rank, basis) if self.subspace_rank else self.distribution

    @property
    def update(self) -> str:
        """The update actually applied (`mozo` is `sign` with modality-aware epsilons)."""
        return get_rule(self.rule).record_name()

    def eps(self, group: str) -> float:
        """Epsilon of a parameter group: zo.eps_<group> if set, else the rule's default, else DEFAULT_EPS."""
        explicit = getattr(self, f"eps_{group}", None)
        if explicit is not None:
            return explicit
        return (get_rule(self.rule).default_eps or {}).get(group, DEFAULT_EPS)
