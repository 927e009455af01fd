"""LoRA on chosen linears of one block: W x + (alpha / r) * B A dropout(x), with B zero-initialised.

One LoRA *unit* holds the low-rank pairs of every targeted linear of one layer, so that plans act on
the same granularity (modality, layer) for LoRA as for adapters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mozo.peft.units import NoiseControl, PeftUnit, UnitInfo
from mozo.zo.config import check_range

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class LoRAConfig:
    """`peft.lora.*`."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # any of LORA_TARGETS

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "peft.lora") -> None:
        check_range(f"{prefix}.rank", self.rank, 1, integer=True)
        check_range(f"{prefix}.alpha", self.alpha, 0, open_low=True)
        check_range(f"{prefix}.dropout", self.dropout, 0, 1, open_high=True)
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"{prefix}.targets must be a non-empty subset of {', '.join(LORA_TARGETS)}, got {list(self.targets)}")

    def summary(self) -> str:
        return f"rank {self.rank}, targets {','.join(self.targets)}"


class LoRALinear(nn.Module):
    """Wraps a frozen nn.Linear; the low-rank parameters live in the owning `LoRA` unit."""

    def __init__(self, base: nn.Linear, unit: "LoRA", key: str):
        super().__init__()
        self.base = base
        self.key = key
        object.__setattr__(self, "_unit", unit)  # not a submodule: the unit owns the parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._unit.enabled:  # MozoCLIP.units_disabled()
            return self.base(x)
        return self.base(x) + self._unit.delta(self.key, x)


class LoRA(PeftUnit):
    parallel = False

    def __init__(self, info: UnitInfo, uid: int, noise: NoiseControl, block: nn.Module, rank: int = 8,
                 alpha: float = 16.0, dropout: float = 0.0, targets: tuple[str, ...] = ("q_proj", "v_proj")):
        super().__init__(info, uid, noise)
        unknown = set(targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {LORA_TARGETS}")
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        self.scaling, self.p = alpha / rank, dropout
        for key in targets:
            parent = block.self_attn if key in ("q_proj", "k_proj", "v_proj", "out_proj") else block.mlp
            base = getattr(parent, key)
            if isinstance(base, LoRALinear):
                raise ValueError(f"{info.name}: {key} already carries LoRA")
            a = torch.empty(rank, base.in_features)
            nn.init.kaiming_uniform_(a, a=5**0.5)
            self.A[key] = nn.Parameter(a)
            self.B[key] = nn.Parameter(torch.zeros(base.out_features, rank))
            setattr(parent, key, LoRALinear(base, self, key))

    @classmethod
    def from_config(cls, cfg: LoRAConfig, info: UnitInfo, uid: int, noise: NoiseControl, tower) -> "LoRA":
        return cls(info, uid, noise, tower.layers[info.layer - 1], cfg.rank, cfg.alpha, cfg.dropout, tuple(cfg.targets))

    def has_noise(self) -> bool:
        return self.p > 0.0

    def delta(self, key: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.A[key], self.B[key]
        stream = LORA_TARGETS.index(key)  # an independent dropout mask per targeted linear
        return (self.dropout(x, self.p, stream=stream) @ a.t().to(x.dtype)) @ b.t().to(x.dtype) * self.scaling
