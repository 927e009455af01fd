"""ZO-SGD: theta -= lr * mean_d c_d z_d, applied direction by direction without materialising g."""
from __future__ import annotations

import torch

from mozo.zo.directions import iter_directions
from mozo.zo.rules.base import Rule


class SGD(Rule):
    name = "sgd"

    @staticmethod
    @torch.no_grad()
    def update_group(params, seeds, coefs, lr, distribution) -> None:
        for seed, c in zip(seeds, coefs):
            for p, z in iter_directions(params, seed, distribution):
                p.add_(z, alpha=-lr * c / len(seeds))
