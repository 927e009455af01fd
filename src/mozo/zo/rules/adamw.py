"""AdamW applied to the materialised estimate g as if it were a gradient (torch's AdamW, its state checkpointed)."""
from __future__ import annotations

import torch

from mozo.zo.rules.base import Rule, UpdateContext, estimate_


class AdamW(Rule):
    name = "adamw"
    replayable = False  # the update depends on the optimizer's moments, not on the record alone

    def __init__(self, groups, lr: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(groups)
        params = [p for ps in groups.values() for p in ps]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if params else None

    @torch.no_grad()
    def apply(self, seeds, coefs, lr, distribution, ctx: UpdateContext) -> dict:
        for g, params in self.groups.items():
            for p, grad in zip(params, estimate_(params, seeds[g], coefs[g], distribution)):
                p.grad = grad
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {}

    def state_dict(self) -> dict:
        return self.optimizer.state_dict() if self.optimizer else {}

    def load_state_dict(self, state: dict) -> None:
        if state and self.optimizer is not None:
            self.optimizer.load_state_dict(state)
