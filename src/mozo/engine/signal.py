"""What the zeroth-order units actually do in a run, measured beside training (docs/findings.md).

Two measurements, both outside the step (the step's own memory and time stay what `mozo bench` reports):

- Step size. After every training step, the root-mean-square change per element of each part's units
  (`fo`, `zo.vision`, `zo.language`), from a copy of the units taken before the step. Per task the mean
  over steps and the ratio of each ZO tower's step size to the FO one: a ZO part moving far less than the
  FO part cannot matter, one moving as much can (whether it helps is the next measurement).
- ZO gain (`zo.gain_every = N`, off at 0). Every N steps, on a fixed held-out batch of the task (training
  images the step did not use, the evaluation transform, units in eval mode so no noise): the loss at the
  units before the step, after applying the step's ZO change alone, and after a random change of the same
  norm per tower ("noise gain"). A ZO update that carries information about the loss lowers it more than
  the noise does on average; `mozo study` tests that difference over seeds. Three forwards per
  measurement, not counted as training forwards.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional

import torch

from mozo.seeds import mix_seed


class ZOSignal:
    def __init__(self, model, plan, gain_every: int, seed: int) -> None:
        self.model, self.gain_every, self.seed = model, gain_every, seed
        self.parts: dict[str, list[torch.nn.Parameter]] = {}
        for u in model.unit_list():
            mode = plan.mode(u.info.modality, u.info.layer)
            if mode != "frozen":
                key = "fo" if mode == "fo" else f"zo.{u.info.modality}"
                self.parts.setdefault(key, []).extend(u.parameters())
        if not any(k.startswith("zo.") for k in self.parts):  # nothing zeroth-order to measure: no copy per step
            self.parts = {}
        self.step_rms: dict[str, dict[str, list[float]]] = {}  # task -> part -> per-step RMS change
        self.gains: dict[str, list[dict]] = {}  # task -> measurements
        self._before: Optional[dict[str, list[torch.Tensor]]] = None

    def before_step(self) -> None:
        self._before = {k: [p.detach().clone() for p in ps] for k, ps in self.parts.items()}

    @torch.no_grad()
    def after_step(self, task: int, step: int, heldout: Optional[tuple]) -> Optional[dict]:
        """Record the step sizes; on gain steps also the held-out losses (returned for the event log)."""
        if self._before is None:
            return None
        before, self._before = self._before, None
        rms = self.step_rms.setdefault(str(task), {})
        # one device-to-host transfer for all parts (a sync per tensor would stall a GPU run)
        sq = torch.stack([torch.stack([(p.detach() - b).float().pow(2).sum() for p, b in zip(ps, before[k])]).sum()
                          for k, ps in self.parts.items()]).tolist() if self.parts else []
        for (k, ps), total in zip(self.parts.items(), sq):
            rms.setdefault(k, []).append(math.sqrt(total / max(1, sum(p.numel() for p in ps))))
        zo_parts = [k for k in self.parts if k.startswith("zo.")]
        if not (self.gain_every and heldout is not None and zo_parts and step % self.gain_every == 0):
            return None
        after = {k: [p.detach().clone() for p in self.parts[k]] for k in zo_parts}
        was_training = self.model.training
        self.model.eval()
        try:
            self._set(before, zo_parts)
            loss_before = self._loss(heldout)
            self._set(after, zo_parts)
            loss_zo = self._loss(heldout)
            noise = {}
            g = torch.Generator().manual_seed(mix_seed(self.seed, task, step, "noise-gain"))
            for k in zo_parts:
                delta = [a - b for a, b in zip(after[k], before[k])]
                norm = math.sqrt(sum(float(d.pow(2).sum()) for d in delta))
                r = [torch.randn(d.shape, generator=g).to(d) for d in delta]
                rnorm = math.sqrt(sum(float(x.pow(2).sum()) for x in r)) or 1.0
                noise[k] = [b + x * (norm / rnorm) for b, x in zip(before[k], r)]
            self._set(noise, zo_parts)
            loss_noise = self._loss(heldout)
        finally:
            self._set(after, zo_parts)
            self.model.train(was_training)
        record = {"step": step, "loss_before": loss_before, "zo_gain": loss_before - loss_zo, "noise_gain": loss_before - loss_noise}
        self.gains.setdefault(str(task), []).append(record)
        return record

    def _set(self, values: dict[str, list[torch.Tensor]], parts: list[str]) -> None:
        for k in parts:
            for p, v in zip(self.parts[k], values[k]):
                p.copy_(v)

    def _loss(self, heldout: tuple) -> float:
        pixels, labels, text = heldout
        logits = self.model.logits(self.model.encode_images(pixels), self.model.encode_texts(text)).float()
        return float(torch.nn.functional.cross_entropy(logits, labels))

    def summary(self) -> dict:
        """Per task: mean step RMS per part, each ZO tower's ratio to FO, and the mean gains."""
        out = {}
        for task, rms in self.step_rms.items():
            mean = {k: statistics.fmean(v) for k, v in rms.items() if v}
            fo = mean.get("fo")
            gains = self.gains.get(task, [])
            out[task] = {
                "step_rms": mean,
                "zo_to_fo_step_ratio": {k: (v / fo if fo else None) for k, v in mean.items() if k.startswith("zo.")},
                "gain_measurements": len(gains),
                "mean_zo_gain": statistics.fmean(g["zo_gain"] for g in gains) if gains else None,
                "mean_noise_gain": statistics.fmean(g["noise_gain"] for g in gains) if gains else None,
            }
        return out

    def state_dict(self) -> dict:
        return {"step_rms": self.step_rms, "gains": self.gains}

    def load_state_dict(self, state: dict) -> None:
        self.step_rms, self.gains = state.get("step_rms", {}), state.get("gains", {})
