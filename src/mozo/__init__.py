"""mozo: continual learning of CLIP with hybrid zeroth-/first-order optimization of PEFT units.

The Python API, without the CLI::

    import mozo
    backbone = mozo.load_backbone("tiny")                    # or "openai/clip-vit-base-patch16", a folder
    model = mozo.MozoCLIP(backbone, mozo.PeftConfig(kind="moe"))
    step = mozo.HybridStep(model, "vision:hop-even", mozo.ZOConfig(rule="mozo"))
    stats = step(pixel_values, labels, backbone.tokenize(prompts))   # one hybrid training step

Names are imported lazily so `mozo --help` does not pay for importing torch and transformers.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_backbone": "mozo.backbone.clip",
    "Backbone": "mozo.backbone.clip",
    "MozoCLIP": "mozo.peft.inject",
    "PeftConfig": "mozo.peft.inject",
    "Plan": "mozo.zo.plan",
    "parse_plan": "mozo.zo.plan",
    "ZOConfig": "mozo.zo.config",
    "HybridStep": "mozo.engine.step",
    "StepStats": "mozo.engine.step",
    "NonFiniteLossError": "mozo.engine.step",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mozo' has no attribute {name!r}")
