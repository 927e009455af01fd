"""What a continual-learning method may change in a run, and nothing more.

A method is a small object with hooks the runner calls (as Mammoth's one-class methods and Avalanche's
plugins, which served as models):

    begin_task(task, model)     before task `task` trains (e.g. snapshot a teacher)
    prepare(model, batch)       once per training step, before any loss evaluation, under no_grad: per-batch
                                constants the loss needs (a teacher's logits); it returns them with the
                                tower forwards it ran, so the step counts them like every other forward
    loss(logits, labels, prep)  the training loss, evaluated identically in the first-order forward and in
                                every zeroth-order evaluation of the step: whatever the method adds reaches
                                the FO gradients and the ZO loss differences alike
    end_task(task, model)       after task `task` trained, before it is evaluated
    state_dict / load_state_dict  what a checkpoint must hold to resume bitwise (tensors and plain data)

The default method is the MoE-Adapters baseline (`baseline`): cross-entropy over the current task's
classes. A new method is one module with a `Method` subclass and one line in `mozo.methods.METHODS`
(or `register_method` from the user's own code).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class Prepared:
    """Per-batch constants of a method and the tower forwards that made them ({"vision": 1, ...})."""

    values: dict[str, Any] = field(default_factory=dict)
    tower_forwards: dict[str, int] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """The `method:` section: which method, and the options the registered methods read."""

    name: str = "baseline"
    distill_weight: float = 1.0  # zscl: weight of the distillation term
    temperature: float = 2.0  # zscl: softmax temperature of the distillation


class Method:
    """Base class; subclasses set `name` and override what they need."""

    name: ClassVar[str] = ""

    def __init__(self, config: MethodConfig, label_smoothing: float = 0.0) -> None:
        self.config, self.label_smoothing = config, label_smoothing

    def begin_task(self, task: int, model) -> None:
        pass

    def prepare(self, model, pixel_values: torch.Tensor, labels: torch.Tensor, text_inputs: dict) -> Prepared:
        return Prepared()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """Cross-entropy over the classes of the logits (the current task's prompts)."""
        return torch.nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def end_task(self, task: int, model) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
