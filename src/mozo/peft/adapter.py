"""Plain bottleneck adapter beside the MLP: one MoE expert without a router."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mozo.peft.moe import Bottleneck
from mozo.peft.units import NoiseControl, PeftUnit, UnitInfo


class Adapter(PeftUnit):
    parallel = True

    def __init__(self, info: UnitInfo, uid: int, noise: NoiseControl, width: int, rank: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__(info, uid, noise)
        self.block = Bottleneck(width, rank, scale)
        self.p = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.up(self.dropout(F.relu(self.block.down(x)), self.p)) * self.block.scale
