"""Sign of the scalar directional derivative (ZeroFlow-style): theta -= lr * mean_d sign(c_d) z_d."""
from __future__ import annotations

import torch

from mozo.zo.directions import iter_directions
from mozo.zo.rules.base import Rule


class SignScalar(Rule):
    name = "sign-scalar"

    @staticmethod
    @torch.no_grad()
    def update_group(params, seeds, coefs, lr, distribution) -> None:
        for seed, c in zip(seeds, coefs):
            s = float((c > 0) - (c < 0))
            for p, z in iter_directions(params, seed, distribution):
                p.add_(z, alpha=-lr * s / len(seeds))
