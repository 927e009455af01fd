"""Conservative ZO: try theta - lr g and theta + lr g, keep whichever of them and theta has the lowest loss on
the batch (two extra loss evaluations; all ranks compare the same averaged losses)."""
from __future__ import annotations

import torch

from mozo.zo.rules.base import Rule, UpdateContext, estimate_


class Conservative(Rule):
    name = "conservative"
    extra_forwards = 2
    replayable = False  # the choice depends on the batch's losses

    @torch.no_grad()
    def apply(self, seeds, coefs, lr, distribution, ctx: UpdateContext) -> dict:
        grads = {g: estimate_(params, seeds[g], coefs[g], distribution) for g, params in self.groups.items()}

        def move(scale: float) -> None:
            for g, params in self.groups.items():
                for p, d in zip(params, grads[g]):
                    p.add_(d, alpha=scale)

        move(-lr)
        minus = ctx.evaluate()
        move(2 * lr)
        plus = ctx.evaluate()
        losses = ctx.reduce(torch.stack([ctx.loss0.float(), minus.float(), plus.float()]))
        choice = int(torch.argmin(losses))
        move(-lr if choice == 0 else (-2 * lr if choice == 1 else 0.0))
        return {"conservative_choice": ("stay", "minus", "plus")[choice]}
