"""Attach PEFT units to a frozen CLIP backbone: `MozoCLIP`, the model every other part of mozo uses."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from mozo.backbone.clip import Backbone
from mozo.backbone.towers import MODALITIES, Tower, TowerInput
from mozo.peft.registry import PeftConfig, get_kind
from mozo.peft.units import NoiseControl, PeftUnit, UnitInfo
from mozo.zo.plan import Plan, parse_plan

__all__ = ["MozoCLIP", "PeftConfig"]


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
        """One unit of the configured kind (mozo/peft/registry.py), from that kind's config section."""
        return get_kind(self.peft.kind).unit.from_config(self.peft.section(), info, uid, self.noise, tower)

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
    def encode(self, modality: str, inputs: dict | None = None, start: TowerInput | None = None,
               capture_at: int | list[int] | None = None) -> tuple[torch.Tensor, TowerInput | dict | None]:
        """Features of one tower, from raw inputs or from a cached `TowerInput` mid-encoder.

        `capture_at` (0-based layer) also returns the hidden state entering that layer, detached:
        the prefix cache that lets perturbed forwards skip the layers below the lowest ZO unit. A list of
        layers returns {layer: TowerInput} (zo.granularity=unit: every ZO unit's forwards start at its own layer).
        """
        tower = self.towers[modality]
        x = start if start is not None else tower.embed(inputs)
        layers = capture_at if isinstance(capture_at, list) else ([] if capture_at is None else [capture_at])
        captured = {}
        for layer in sorted(layers):
            if layer > x.layer:
                x = tower.run(x, layer, self._parallel[modality])
            captured[layer] = TowerInput(x.hidden.detach(), x.mask, x.pool_index, x.layer)
        x = tower.run(x, tower.num_layers, self._parallel[modality])
        return tower.head(x), captured if isinstance(capture_at, list) else captured.get(capture_at)

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

    def plan(self, text: str) -> Plan:
        """Parse a plan (zo/plan.py) against the units this model has: layers without units are dropped."""
        depths = {m: self.num_layers(m) for m in dict.fromkeys(u.info.modality for u in self.unit_list())}
        present = {(u.info.modality, u.info.layer) for u in self.unit_list()}
        plan = parse_plan(text, depths)
        return Plan(plan.text, {k: v for k, v in plan.modes.items() if k in present})

    @contextlib.contextmanager
    def units_disabled(self) -> Iterator[None]:
        """Forwards inside run the bare backbone, every unit switched off: the zero-shot model (a
        distillation teacher, `mozo.methods.zscl`) without a second copy of the weights."""
        parallel, self._parallel = self._parallel, {m: {} for m in self._parallel}
        for u in self.unit_list():
            u.enabled = False
        try:
            yield
        finally:
            self._parallel = parallel
            for u in self.unit_list():
                u.enabled = True
