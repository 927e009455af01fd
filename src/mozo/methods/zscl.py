"""ZSCL-style distillation from the zero-shot model: the loss adds
    w * T^2 * KL(softmax(teacher / T) || softmax(student / T))
with the teacher the same backbone with every PEFT unit switched off (`MozoCLIP.units_disabled()`), on the
step's own images and the current task's prompts. (ZSCL distils on a reference dataset over many class
names; mozo uses the training batch, which needs no extra data; say so when comparing.)

Cost: one image-tower forward per step, and one text-tower forward per task's prompts (the teacher's text
features do not change: units off, backbone frozen, no noise); both are counted as tower forwards.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mozo.methods.base import Method, Prepared


class ZSCL(Method):
    name = "zscl"

    def __init__(self, config, label_smoothing: float = 0.0) -> None:
        super().__init__(config, label_smoothing)
        self._text: tuple[dict, torch.Tensor] | None = None  # (prompt tensors, teacher text features)

    def begin_task(self, task: int, model) -> None:
        self._text = None

    @torch.no_grad()
    def prepare(self, model, pixel_values, labels, text_inputs) -> Prepared:
        forwards = {"vision": 1}
        with model.units_disabled():
            if self._text is None or not _same(self._text[0], text_inputs):
                self._text = ({k: v.clone() for k, v in text_inputs.items()}, model.encode_texts(text_inputs))
                forwards["language"] = 1
            teacher = model.logits(model.encode_images(pixel_values), self._text[1]).float()
        return Prepared({"teacher": teacher}, forwards)

    def loss(self, logits, labels, prepared):
        t = self.config.temperature
        distill = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(prepared.values["teacher"] / t, -1),
                           reduction="batchmean", log_target=True) * t * t
        return super().loss(logits, labels, prepared) + self.config.distill_weight * distill


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
