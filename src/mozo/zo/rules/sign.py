"""Element-wise sign normalisation: theta -= lr * sign(g), the same step size for every coordinate."""
from __future__ import annotations

import torch

from mozo.zo.rules.base import Rule, estimate_


class Sign(Rule):
    name = "sign"

    @staticmethod
    @torch.no_grad()
    def update_group(params, seeds, coefs, lr, distribution) -> None:
        for p, g in zip(params, estimate_(params, seeds, coefs, distribution)):
            p.add_(g.sign_(), alpha=-lr)
