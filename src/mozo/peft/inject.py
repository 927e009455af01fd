"""Attach PEFT units to a frozen CLIP backbone: `MozoCLIP`, the model every other part of mozo uses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from mozo.backbone.clip import Backbone
from mozo.backbone.towers import MODALITIES, Tower, TowerInput
from mozo.peft.adapter import Adapter
from mozo.peft.lora import LORA_TARGETS, LoRA
from mozo.peft.moe import MoEAdapter
from mozo.peft.units import NoiseControl, PeftUnit, UnitInfo
from mozo.zo.config import check_range

PEFT_KINDS = ("moe", "lora", "adapter")


@dataclass
class PeftConfig:
    """Which units, where, and their sizes. Defaults: the class-incremental MoE-Adapters setting."""

    kind: str = "moe"  # moe | lora | adapter
    towers: tuple[str, ...] = MODALITIES
    layers: Optional[list[int]] = None  # 1-based layers that get a unit; None = every layer
    rank: int = 64  # bottleneck width of experts / adapters
    num_experts: int = 2
    top_k: int = 2
    scale: float = 0.1
    dropout: float = 0.1
    noisy_gating: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every value checked before a backbone loads (layers beyond a tower's depth: MozoCLIP)."""
        if self.kind not in PEFT_KINDS:
            raise ValueError(f"unknown peft kind {self.kind!r}: peft.kind must be one of {', '.join(PEFT_KINDS)}")
        towers = tuple(self.towers)
        if not towers or not set(towers) <= set(MODALITIES) or len(set(towers)) < len(towers):
            raise ValueError(f"peft.towers must be one or both of {', '.join(MODALITIES)}, got {','.join(map(str, towers))!r}")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("peft.layers must be null (every layer) or a non-empty list of layers >= 1, got []")
            for layer in self.layers:
                check_range("peft.layers entries", layer, 1, integer=True)
        for key in ("rank", "num_experts", "lora_rank"):
            check_range(f"peft.{key}", getattr(self, key), 1, integer=True)
        check_range("peft.top_k", self.top_k, 1, self.num_experts, integer=True)
        check_range("peft.scale", self.scale)
        check_range("peft.lora_alpha", self.lora_alpha, 0, open_low=True)
        for key in ("dropout", "lora_dropout"):
            check_range(f"peft.{key}", getattr(self, key), 0, 1, open_high=True)
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown or not self.lora_targets:
            raise ValueError(f"peft.lora_targets must be a non-empty subset of {', '.join(LORA_TARGETS)}, got {list(self.lora_targets)}")


class MozoCLIP(nn.Module):
    """A frozen CLIPModel plus PEFT units, with tower forwards that can start at any layer."""

    def __init__(self, backbone: Backbone, peft: PeftConfig | None = None):
        super().__init__()
        peft = peft or PeftConfig()
        peft.validate()  # again: fields may have been set after construction
        from mozo.peft.lora import LoRALinear

        if any(isinstance(m, LoRALinear) for m in backbone.model.modules()):
            raise ValueError("this backbone already carries the LoRA units of another MozoCLIP (LoRA wraps the "
                             "backbone's linears in place); load a fresh backbone for each model")
        self.backbone = backbone
        self.clip = backbone.model
        self.peft = peft
        self.noise = NoiseControl()
        self.towers = {m: Tower(self.clip, m) for m in MODALITIES}
        self.units = nn.ModuleDict()
        device = next(self.clip.parameters()).device
        for modality in peft.towers:
            tower = self.towers[modality]
            layers = peft.layers or list(range(1, tower.num_layers + 1))
            for layer in layers:
                if not 1 <= layer <= tower.num_layers:
                    raise ValueError(f"peft layer {layer} out of range 1..{tower.num_layers} for the {modality} tower")
                info = UnitInfo(modality, layer, peft.kind)
                unit = self._make_unit(info, len(self.units), tower)
                self.units[f"{modality}_{layer}"] = unit.to(device=device, dtype=torch.float32)
        self._parallel = {m: {u.info.layer - 1: u for u in self.unit_list() if u.info.modality == m and u.parallel} for m in MODALITIES}

    def _make_unit(self, info: UnitInfo, uid: int, tower: Tower) -> PeftUnit:
        p = self.peft
        if p.kind == "moe":
            return MoEAdapter(info, uid, self.noise, tower.width, p.num_experts, p.top_k, p.rank, p.scale, p.dropout, p.noisy_gating)
        if p.kind == "adapter":
            return Adapter(info, uid, self.noise, tower.width, p.rank, p.scale, p.dropout)
        return LoRA(info, uid, self.noise, tower.layers[info.layer - 1], p.lora_rank, p.lora_alpha, p.lora_dropout, tuple(p.lora_targets))

    # -- structure -------------------------------------------------------------------------------
    def unit_list(self) -> list[PeftUnit]:
        return list(self.units.values())

    def unit(self, modality: str, layer: int) -> PeftUnit:
        return self.units[f"{modality}_{layer}"]

    def num_layers(self, modality: str) -> int:
        return self.towers[modality].num_layers

    def train(self, mode: bool = True) -> "MozoCLIP":
        """Only units switch mode: the backbone stays in eval (frozen, deterministic)."""
        self.training = mode
        self.units.train(mode)
        self.clip.eval()
        return self

    # -- forwards --------------------------------------------------------------------------------
    def start(self, modality: str, inputs: dict) -> TowerInput:
        return self.towers[modality].embed(inputs)

    def encode(self, modality: str, inputs: dict | None = None, start: TowerInput | None = None,
               capture_at: int | None = None) -> tuple[torch.Tensor, TowerInput | None]:
        """Features of one tower, from raw inputs or from a cached `TowerInput` mid-encoder.

        `capture_at` (0-based layer) also returns the hidden state entering that layer, detached:
        the prefix cache that lets perturbed forwards skip the layers below the lowest ZO unit.
        """
        tower = self.towers[modality]
        x = start if start is not None else tower.embed(inputs)
        captured = None
        if capture_at is not None and capture_at > x.layer:
            x = tower.run(x, capture_at, self._parallel[modality])
        if capture_at is not None:
            captured = TowerInput(x.hidden.detach(), x.mask, x.pool_index, x.layer)
        x = tower.run(x, tower.num_layers, self._parallel[modality])
        return tower.head(x), captured

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encode("vision", {"pixel_values": pixel_values})[0]

    def encode_texts(self, text_inputs: dict) -> torch.Tensor:
        return self.encode("language", text_inputs)[0]

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.clip.logit_scale.exp() * image_features @ text_features.t()

    # -- bookkeeping -----------------------------------------------------------------------------
    def trainable_parameter_counts(self) -> dict[str, int]:
        """Unit parameters per modality and kind (e.g. {'vision.moe': ..., 'language.moe': ..., 'total': ...})."""
        counts: dict[str, int] = {}
        for u in self.unit_list():
            key = f"{u.info.modality}.{u.info.kind}"
            counts[key] = counts.get(key, 0) + sum(p.numel() for p in u.parameters())
        counts["total"] = sum(counts.values())
        return counts

    def unit_state(self) -> dict[str, torch.Tensor]:
        """Trainable parameters only (what checkpoints store)."""
        return {k: v.detach().clone() for k, v in self.units.state_dict().items()}
