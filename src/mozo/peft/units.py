"""What every PEFT training unit shares: where it sits (modality, layer, kind) and reproducible noise.

A *training unit* is the set of PEFT parameters of one layer of one tower: the granularity at which
plans choose first-order, zeroth-order or frozen (the paper's "layer k in modality m").

Noise (dropout, router noise) must be identical in every forward of one ZO estimate, or the loss
difference measures noise instead of the perturbation. Each unit therefore draws its noise from a
generator seeded by (evaluation seed, unit id), set through the shared `NoiseControl`; seeding per
unit (not one stream for the model) keeps the noise identical even when a perturbed forward skips
the layers below the lowest ZO unit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from mozo.seeds import mix_seed


@dataclass(frozen=True)
class UnitInfo:
    modality: str  # "vision" | "language"
    layer: int  # 1-based, as in the paper (layer 1 is next to the input)
    kind: str  # a registered unit kind: "moe" | "lora" | "adapter" | ...

    @property
    def name(self) -> str:
        return f"{self.modality}.{self.layer}.{self.kind}"


class NoiseControl:
    """Shared by all units of a model: `seed` set means reproducible noise for the next forwards."""

    def __init__(self) -> None:
        self.seed: Optional[int] = None

    def generator(self, uid: int, device: torch.device, stream: int = 0) -> Optional[torch.Generator]:
        """A fresh generator for (seed, unit id, stream); `stream` separates the independent draws of
        one unit in one forward (router noise, the dropout of each expert or LoRA target)."""
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(mix_seed(self.seed, uid, stream))
        return g


class PeftUnit(nn.Module):
    """Base class: a unit knows its place and draws noise only through `noise_generator`.

    A unit kind (mozo/peft/registry.py) implements `from_config` (build one unit from its config
    section) and `has_noise`; the base raises NotImplementedError so a new kind cannot forget them.
    """

    parallel: bool = False  # True: called with the block input, output added after the MLP

    def __init__(self, info: UnitInfo, uid: int, noise: NoiseControl):
        super().__init__()
        self.info = info
        self.uid = uid
        self._noise = noise  # plain attribute: not a submodule, not in state_dict
        self.enabled = True  # False inside MozoCLIP.units_disabled()

    @classmethod
    def from_config(cls, cfg: Any, info: UnitInfo, uid: int, noise: NoiseControl, tower: Any) -> "PeftUnit":
        """The unit of `info`'s layer built from its kind's config section `cfg` (`peft.<kind>.*`);
        `tower` (mozo.backbone.towers.Tower) gives the width and the blocks."""
        raise NotImplementedError(f"{cls.__name__} must implement from_config(cfg, info, uid, noise, tower)")

    def has_noise(self) -> bool:
        """True when a training-mode forward draws noise (dropout with p > 0, router noise): then
        two forwards of one input differ unless `NoiseControl.seed` is set."""
        raise NotImplementedError(f"{type(self).__name__} must implement has_noise()")

    def noise_generator(self, device: torch.device, stream: int = 0) -> Optional[torch.Generator]:
        return self._noise.generator(self.uid, device, stream)

    def dropout(self, x: torch.Tensor, p: float, stream: int = 0) -> torch.Tensor:
        """Inverted dropout drawing its mask from the unit's generator (identity in eval mode).
        Distinct draws of one forward (e.g. one per expert) must pass distinct `stream`s."""
        if not self.training or p <= 0.0:
            return x
        keep = torch.rand(x.shape, generator=self.noise_generator(x.device, stream), device=x.device, dtype=torch.float32) >= p
        return x * keep.to(x.dtype) / (1.0 - p)

    def randn(self, shape: torch.Size, like: torch.Tensor, stream: int = 0) -> torch.Tensor:
        return torch.randn(shape, generator=self.noise_generator(like.device, stream), device=like.device, dtype=like.dtype)
