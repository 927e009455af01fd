"""MoE adapter of MoE-Adapters4CL (CVPR 2024), beside the MLP of every residual block.

    x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)) + moe(x)

Each expert is a bottleneck `up(dropout(relu(down(x)))) * scale` with `up` zero-initialised, so a
fresh adapter adds exactly 0 and training starts at the pretrained model. A noisy top-k router reads
the first token (CLS / SOT) and mixes whole samples: every token of a sample uses the same gates.

The router adds its noise in training only; `eval_noise=True` adds it in evaluation too, as the
reference code does (its `is_train` flag never switches off): docs/experiments.md, deviations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mozo.peft.units import NoiseControl, PeftUnit, UnitInfo
from mozo.zo.config import check_range


@dataclass
class MoEConfig:
    """`peft.moe.*`: the class-incremental MoE-Adapters setting by default."""

    rank: int = 64  # bottleneck width of every expert
    num_experts: int = 2
    top_k: int = 2
    scale: float = 0.1
    dropout: float = 0.1
    noisy_gating: bool = True  # router noise in training
    eval_noise: bool = False  # router noise in evaluation too (the reference code's behaviour)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "peft.moe") -> None:
        for key in ("rank", "num_experts"):
            check_range(f"{prefix}.{key}", getattr(self, key), 1, integer=True)
        check_range(f"{prefix}.top_k", self.top_k, 1, self.num_experts, integer=True)
        check_range(f"{prefix}.scale", self.scale)
        check_range(f"{prefix}.dropout", self.dropout, 0, 1, open_high=True)

    def summary(self) -> str:
        return f"rank {self.rank}, {self.num_experts} experts"


class Bottleneck(nn.Module):
    """down -> relu -> dropout -> up, times `scale`; `up` starts at zero."""

    def __init__(self, width: int, rank: int, scale: float):
        super().__init__()
        self.down = nn.Linear(width, rank)
        self.up = nn.Linear(rank, width)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)


class MoEAdapter(PeftUnit):
    parallel = True

    def __init__(self, info: UnitInfo, uid: int, noise: NoiseControl, width: int, num_experts: int = 2,
                 top_k: int = 2, rank: int = 64, scale: float = 0.1, dropout: float = 0.1, noisy_gating: bool = True,
                 eval_noise: bool = False):
        super().__init__(info, uid, noise)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"moe top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.experts = nn.ModuleList(Bottleneck(width, rank, scale) for _ in range(num_experts))
        # Zero-initialised router weights as in the reference code: gates start uniform over the top-k.
        self.w_gate = nn.Parameter(torch.zeros(width, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(width, num_experts))
        self.top_k, self.p, self.noisy, self.eval_noise = top_k, dropout, noisy_gating, eval_noise

    @classmethod
    def from_config(cls, cfg: MoEConfig, info: UnitInfo, uid: int, noise: NoiseControl, tower) -> "MoEAdapter":
        return cls(info, uid, noise, tower.width, cfg.num_experts, cfg.top_k, cfg.rank, cfg.scale, cfg.dropout,
                   cfg.noisy_gating, cfg.eval_noise)

    def has_noise(self) -> bool:
        return self.p > 0.0 or bool(self.noisy)

    def gates(self, first_token: torch.Tensor) -> torch.Tensor:
        """(B, E) mixing weights: softmax over the top-k of (noisy) logits, zero elsewhere."""
        logits = first_token @ self.w_gate
        if self.noisy and (self.training or self.eval_noise):
            std = F.softplus(first_token @ self.w_noise) + 1e-2
            logits = logits + self.randn(logits.shape, logits) * std
        top, idx = logits.topk(self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, idx, top.softmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates(x[:, 0, :])
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            # stream 0 is the router noise; each expert draws its own dropout mask.
            a = self.dropout(F.relu(expert.down(x)), self.p, stream=e + 1)
            # g * scale * up(a), with the gate applied on the rank-r side: g * (W a + b) = W (g a) + g b. The
            # gate's backward then keeps rank-r tensors instead of a full-width expert output per expert.
            w = g[:, e, None, None] * expert.scale
            out = out + F.linear(a * w, expert.up.weight) + w * expert.up.bias
        return out
