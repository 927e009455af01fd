"""The null rule: MoZO's perturbations and update magnitude with the information removed.

It runs the same perturbed forwards as `mozo` (the same epsilons, so the same cost) and takes the same
element-wise sign step of size lr, but along sign(sum_d r_d z_d) with r_d drawn from a generator seeded by
the direction's seed instead of the loss differences c_d. Its update therefore carries no information from
the loss at all: a plan trained with it against the same plan with `mozo` asks whether the ZO units'
loss differences help, beyond moving the units by the same amount. Deterministic and resumable.
"""
from __future__ import annotations

import torch

from mozo.seeds import mix_seed
from mozo.zo.rules.mozo import MoZO
from mozo.zo.rules.sign import Sign


def random_coefs(seeds: list[int]) -> list[float]:
    """One N(0, 1) value per direction, a function of its seed alone."""
    return [float(torch.randn(1, generator=torch.Generator().manual_seed(mix_seed(s, 0x6E6F)))) for s in seeds]


class Noise(MoZO):
    name = "noise"
    applied_as = "noise"

    @staticmethod
    @torch.no_grad()
    def update_group(params, seeds, coefs, lr, distribution) -> None:
        Sign.update_group(params, seeds, random_coefs(seeds), lr, distribution)
