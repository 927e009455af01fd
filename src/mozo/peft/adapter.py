"""Plain bottleneck adapter beside the MLP: one MoE expert without a router."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mozo.peft.moe import Bottleneck
from mozo.peft.units import NoiseControl, PeftUnit, UnitInfo
from mozo.zo.config import check_range


@dataclass
class AdapterConfig:
    """`peft.adapter.*`: the sizes of one MoE expert."""

    rank: int = 64  # bottleneck width
    scale: float = 0.1
    dropout: float = 0.1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "peft.adapter") -> None:
        check_range(f"{prefix}.rank", self.rank, 1, integer=True)
        check_range(f"{prefix}.scale", self.scale)
        check_range(f"{prefix}.dropout", self.dropout, 0, 1, open_high=True)

    def summary(self) -> str:
        return f"rank {self.rank}"


class Adapter(PeftUnit):
    parallel = True

    def __init__(self, info: UnitInfo, uid: int, noise: NoiseControl, width: int, rank: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__(info, uid, noise)
        self.block = Bottleneck(width, rank, scale)
        self.p = dropout

    @classmethod
    def from_config(cls, cfg: AdapterConfig, info: UnitInfo, uid: int, noise: NoiseControl, tower) -> "Adapter":
        return cls(info, uid, noise, tower.width, cfg.rank, cfg.scale, cfg.dropout)

    def has_noise(self) -> bool:
        return self.p > 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.up(self.dropout(F.relu(self.block.down(x)), self.p)) * self.block.scale
