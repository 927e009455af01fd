"""Random directions regenerated from seeds, never stored, and in-place perturbation in fp32.

Each parameter tensor draws its direction from its own generator seeded by (direction seed, index),
so any subset of units can be perturbed or updated independently and a trajectory of
(seed, coefficients, lr) replays exactly.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from mozo.seeds import mix_seed


def direction(param: torch.Tensor, seed: int, index: int, distribution: str) -> torch.Tensor:
    """The fp32 direction of `param` for `seed` (same seed and index -> same tensor, on any call)."""
    g = torch.Generator(device=param.device)
    g.manual_seed(mix_seed(seed, index))
    if distribution == "gaussian":
        return torch.randn(param.shape, generator=g, device=param.device, dtype=torch.float32)
    if distribution == "rademacher":
        return torch.randint(0, 2, param.shape, generator=g, device=param.device).to(torch.float32).mul_(2).sub_(1)
    raise ValueError(f"unknown direction distribution {distribution!r}")


def iter_directions(params: Iterable[torch.Tensor], seed: int, distribution: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i, p in enumerate(params):
        yield p, direction(p, seed, i, distribution)


@torch.no_grad()
def perturb_(params: list[torch.Tensor], seed: int, scale: float, distribution: str) -> None:
    """theta += scale * z(seed), in place. Parameters must be fp32 (eps=1e-3 vanishes in bf16)."""
    for p, z in iter_directions(params, seed, distribution):
        if p.dtype != torch.float32:
            raise TypeError(f"ZO perturbation needs fp32 parameters, got {p.dtype}; keep PEFT units in fp32 (autocast handles the backbone)")
        p.add_(z, alpha=scale)

