"""Shared fixtures of the core tests: one `tiny` backbone per session, cheap private copies per test.

Loading `tiny` the first time costs a few seconds (the transformers import); copying its CLIPModel
and building a `MozoCLIP` on the copy costs milliseconds, so every test gets its own backbone
(LoRA injects into the backbone's linears, so two models must never share one).
"""
from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

# Subprocesses started by tests (torchrun, `python -m mozo run`) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("MOZO_TEST_THREADS", "1"))

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: builds a full-size (ViT-B/16 geometry) model; deselect with -m 'not slow'")


PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a photo of a green triangle", "a photo of a yellow star"]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models are far too small to gain from intra-op threads, and on a loaded 2-core machine
    two threads per process make every op many times slower (seen: 80x). Every test runs with one
    thread; MOZO_TEST_THREADS overrides the count."""
    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("MOZO_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_backbone():
    """The session's `tiny` backbone. Never build a MozoCLIP on it directly: use `make_model`."""
    from mozo.backbone.clip import load_backbone

    return load_backbone("tiny")


@pytest.fixture
def fresh_backbone(tiny_backbone):
    """A private deep copy of the tiny backbone, same weights."""
    def make():
        return dataclasses.replace(tiny_backbone, model=copy.deepcopy(tiny_backbone.model))

    return make


@pytest.fixture
def make_model(fresh_backbone):
    """make_model(seed=0, kind="moe", towers=..., layers=..., **keys of the kind's section) -> MozoCLIP on a
    private backbone copy, e.g. make_model(kind="lora", rank=4) sets peft.lora.rank (`PeftConfig.of`).

    The same seed gives the same unit initialisation (units draw their init from the global RNG).
    """
    from mozo.peft.inject import MozoCLIP, PeftConfig

    def make(seed: int = 0, kind: str = "moe", **peft):
        torch.manual_seed(seed)
        return MozoCLIP(fresh_backbone(), PeftConfig.of(kind, **peft))

    return make


@pytest.fixture
def batch(tiny_backbone):
    """8 random 32 px images, 4 prompts, labels 0..3 twice: (pixels, labels, text inputs)."""
    g = torch.Generator().manual_seed(1234)
    pixels = torch.randn(8, 3, 32, 32, generator=g)
    labels = torch.arange(8) % 4
    return pixels, labels, tiny_backbone.tokenize(PROMPTS)


def randomize_units(model, seed: int = 0, std: float = 0.05) -> None:
    """Move every unit parameter away from its (partly zero) init so gradients flow everywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.units.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def unit_params(model, modality: str | None = None) -> list[torch.Tensor]:
    """Unit parameters in the order HybridStep uses (unit order, then `parameters()` order)."""
    return [p for u in model.unit_list() if modality is None or u.info.modality == modality for p in u.parameters()]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.units.state_dict().items()}
