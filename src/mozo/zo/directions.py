"""Random directions regenerated from seeds, never stored, and in-place perturbation in fp32.

Each parameter tensor draws its direction from its own generator seeded by (direction seed, index),
so any subset of units can be perturbed or updated independently and a trajectory of
(seed, coefficients, lr) replays exactly.

A direction's law is a distribution name ("gaussian", "rademacher": i.i.d. entries) or a `Law`, which can
also confine the directions of matrices to a random low-rank subspace (LOZO, Chen et al. 2024; SubZero,
Yu et al. 2024): z = U V^T / sqrt(r) for a (rows x cols) weight, U (rows x r) fresh from the direction seed
and V (cols x r) from the law's `basis` seed, which the training step redraws every `zo.subspace_every`
steps. Every entry of z still has variance 1, so an epsilon means the same perturbation size; what changes
is that all the directions drawn under one basis lie in the same rows x r dimensional space per matrix.

A `Law` can also be guided (Guided ES, Maheswaranathan et al. 2019): a parameter with a surrogate gradient s
gets z = w s / rms(s) + sqrt(1 - w^2) z_random, so a direction leans towards where the surrogate points while
every entry keeps variance about 1. The training step takes s from the FO units of the neighbouring layers
(`zo.guide_weight`), whose gradients exist in the step before any ZO forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Optional, Union

import torch

from mozo.seeds import mix_seed

DISTRIBUTIONS = ("gaussian", "rademacher")


@dataclass(frozen=True)
class Law:
    """How the direction of each parameter is drawn from a direction seed.

    rank 0: i.i.d. entries of `distribution`. rank r > 0: a 2-D parameter whose sides both exceed r gets
    U V^T / sqrt(r) (U and V with i.i.d. entries of `distribution`; V from `basis`, shared by every direction
    under this law); other parameters (biases, routers' vectors, matrices thinner than r) stay dense.

    guide: surrogate gradients by `id(param)` (parameters without one, or with an all-zero one, keep the random
    direction), mixed in with weight `guide_weight`. A guided law belongs to the parameters it was built for."""

    distribution: str = "gaussian"
    rank: int = 0
    basis: int = 0
    guide_weight: float = 0.0
    guide: Optional[Mapping[int, torch.Tensor]] = field(default=None, compare=False, repr=False)

    def low_rank(self, param: torch.Tensor) -> bool:
        return self.rank > 0 and param.ndim == 2 and min(param.shape) > self.rank


LawLike = Union[str, Law]


def as_law(law: LawLike) -> Law:
    return law if isinstance(law, Law) else Law(law)


def _draw(shape, seed: int, distribution: str, device) -> torch.Tensor:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    if distribution == "gaussian":
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    if distribution == "rademacher":
        return torch.randint(0, 2, shape, generator=g, device=device).to(torch.float32).mul_(2).sub_(1)
    raise ValueError(f"unknown direction distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")


def direction(param: torch.Tensor, seed: int, index: int, law: LawLike) -> torch.Tensor:
    """The fp32 direction of `param` for `seed` (same seed, index and law -> same tensor, on any call)."""
    law = as_law(law)
    if not law.low_rank(param):
        z = _draw(param.shape, mix_seed(seed, index), law.distribution, param.device)
    else:
        rows, cols = param.shape
        u = _draw((rows, law.rank), mix_seed(seed, index), law.distribution, param.device)
        v = _draw((cols, law.rank), mix_seed(law.basis, index), law.distribution, param.device)
        z = (u @ v.T).mul_(1.0 / math.sqrt(law.rank))
    surrogate = law.guide.get(id(param)) if law.guide else None
    if surrogate is not None:
        rms = surrogate.float().pow(2).mean().sqrt()
        if rms > 0:
            w = law.guide_weight
            z = z.mul_(math.sqrt(1.0 - w * w)).add_(surrogate.float(), alpha=w / float(rms))
    return z


def iter_directions(params: Iterable[torch.Tensor], seed: int, law: LawLike) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i, p in enumerate(params):
        yield p, direction(p, seed, i, law)


@torch.no_grad()
def perturb_(params: list[torch.Tensor], seed: int, scale: float, law: LawLike) -> None:
    """theta += scale * z(seed), in place. Parameters must be fp32 (eps=1e-3 vanishes in bf16)."""
    for p, z in iter_directions(params, seed, law):
        if p.dtype != torch.float32:
            raise TypeError(f"ZO perturbation needs fp32 parameters, got {p.dtype}; keep PEFT units in fp32 (autocast handles the backbone)")
        p.add_(z, alpha=scale)
