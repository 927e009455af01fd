"""The registry of PEFT unit kinds: sections per kind, unknown keys and kinds, has_noise, eval_noise, a toy kind."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from mozo.engine.config import ConfigError, load_config, to_dict, from_dict, valid_keys
from mozo.peft.adapter import Adapter, AdapterConfig
from mozo.peft.inject import PeftConfig
from mozo.peft.lora import LoRA, LoRAConfig
from mozo.peft.moe import MoEAdapter, MoEConfig
from mozo.peft.registry import get_kind, kind_names, register_kind, unregister_kind
from mozo.peft.units import NoiseControl, PeftUnit, UnitInfo

pytestmark = pytest.mark.usefixtures("one_thread")


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config("demo", list(overrides))
    return str(err.value)


# -- kinds and sections ----------------------------------------------------------------------------

def test_every_kind_found_by_name_with_its_unit_and_section():
    assert kind_names()[:3] == ("moe", "lora", "adapter")
    for name, unit, config in [("moe", MoEAdapter, MoEConfig), ("lora", LoRA, LoRAConfig), ("adapter", Adapter, AdapterConfig)]:
        kind = get_kind(name)
        assert (kind.unit, kind.config) == (unit, config)
        assert isinstance(PeftConfig().section(name), config)
    assert PeftConfig(kind="lora").section() == LoRAConfig()


def test_defaults_are_the_former_flat_ones():
    p = PeftConfig()
    assert (p.kind, p.towers, p.layers) == ("moe", ("vision", "language"), None)
    assert p.moe == MoEConfig(rank=64, num_experts=2, top_k=2, scale=0.1, dropout=0.1, noisy_gating=True, eval_noise=False)
    assert p.lora == LoRAConfig(rank=8, alpha=16.0, dropout=0.0, targets=("q_proj", "v_proj"))
    assert p.adapter == AdapterConfig(rank=64, scale=0.1, dropout=0.1)


def test_section_keys_load_and_round_trip():
    cfg = load_config("demo", ["peft=lora", "peft.lora.rank=4", "peft.lora.targets=q_proj,fc1", "peft.moe.eval_noise=true"])
    assert (cfg.peft.lora.rank, cfg.peft.lora.targets, cfg.peft.moe.eval_noise) == (4, ("q_proj", "fc1"), True)
    assert cfg.peft.moe.rank == 16  # the demo preset's peft.moe section
    assert to_dict(cfg)["peft"]["lora"] == {"rank": 4, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "fc1"]}
    assert from_dict(to_dict(cfg)) == cfg
    assert {"peft.kind", "peft.moe.rank", "peft.moe.eval_noise", "peft.lora.targets", "peft.adapter.dropout"} <= set(valid_keys())


def test_unknown_kind_lists_the_registered_kinds():
    assert refused("peft=prompt") == "unknown peft kind 'prompt': peft.kind must be one of moe, lora, adapter"
    with pytest.raises(ValueError, match="peft.kind must be one of moe, lora, adapter"):
        PeftConfig.of("prompt")


def test_unknown_key_in_a_section_lists_its_valid_keys():
    msg = refused("peft.moe.rnak=4")
    assert msg.startswith("unknown config key 'peft.moe.rnak'. Did you mean peft.moe.rank?")
    assert msg.endswith("Valid keys of peft.moe: rank, num_experts, top_k, scale, dropout, noisy_gating, eval_noise")
    assert "Valid keys of peft.lora: rank, alpha, dropout, targets" in refused("peft.lora.target=q_proj")
    with pytest.raises(ValueError, match=r"unknown config key 'peft.moe.rnak'.*Valid keys of peft.moe: rank"):
        PeftConfig(moe={"rnak": 4})
    msg = refused("peft.extra.foo=1")
    assert "'peft.extra.foo'" in msg and "peft.extra was removed" in msg
    assert "Valid keys of peft: kind, towers, layers, moe.rank," in msg and "lora.targets" in msg


def test_old_flat_keys_name_the_new_ones():
    assert "use peft.moe.rank or peft.lora.rank or peft.adapter.rank" in refused("peft.rank=4")
    assert "use peft.lora.rank" in refused("peft.lora_rank=4")
    assert "use peft.moe.num_experts" in refused("peft.num_experts=3")
    assert "use peft.lora.targets" in refused("peft.lora_targets=q_proj")
    with pytest.raises(ValueError, match="use peft.moe.rank"):
        PeftConfig(rank=4)
    with pytest.raises(ConfigError, match="use peft.moe.noisy_gating"):
        from_dict({**to_dict(load_config("demo")), "peft": {"kind": "moe", "noisy_gating": False}})


# -- has_noise -------------------------------------------------------------------------------------

def step_expression(u) -> bool:
    """What the training step duck-typed before has_noise(): noise unless p <= 0 and not noisy."""
    return not (getattr(u, "p", 0.0) <= 0.0 and not getattr(u, "noisy", False))


@pytest.mark.parametrize("kind,settings,noisy", [
    ("moe", {}, True), ("moe", {"dropout": 0.0}, True), ("moe", {"noisy_gating": False}, True),
    ("moe", {"dropout": 0.0, "noisy_gating": False}, False), ("moe", {"dropout": 0.0, "noisy_gating": False, "eval_noise": True}, False),
    ("lora", {}, False), ("lora", {"dropout": 0.1}, True), ("adapter", {}, True), ("adapter", {"dropout": 0.0}, False),
])
def test_has_noise_per_kind(make_model, kind, settings, noisy):
    model = make_model(kind=kind, layers=[1], **settings)
    for u in model.unit_list():
        assert u.has_noise() is noisy == step_expression(u)


def test_base_unit_and_registration_refuse_a_kind_without_has_noise():
    unit = PeftUnit(UnitInfo("vision", 1, "x"), 0, NoiseControl())
    with pytest.raises(NotImplementedError, match="has_noise"):
        unit.has_noise()

    class Silent(PeftUnit):
        @classmethod
        def from_config(cls, cfg, info, uid, noise, tower):
            return cls(info, uid, noise)

    with pytest.raises(TypeError, match="must implement has_noise"):
        register_kind("silent", Silent, ToyConfig)
    assert "silent" not in kind_names()


# -- the reference's router noise at evaluation ----------------------------------------------------

def moe_unit(eval_noise: bool) -> MoEAdapter:
    torch.manual_seed(0)
    unit = MoEAdapter(UnitInfo("vision", 1, "moe"), 3, NoiseControl(), 16, 4, 2, 8, 0.1, 0.0, True, eval_noise)
    with torch.no_grad():
        for p in unit.parameters():
            p.normal_(0, 0.3)
    return unit


def test_eval_noise_off_evaluates_without_noise_on_reproduces_the_reference():
    x = torch.randn(6, 5, 16)
    quiet, loud = moe_unit(False).eval(), moe_unit(True).eval()
    assert torch.equal(quiet(x), quiet(x))
    a, b = loud(x), loud(x)  # no seed set: fresh router noise in every eval forward
    assert not torch.allclose(a, b)
    loud._noise.seed = 5
    assert torch.equal(loud(x), loud(x))  # a seed replays it


def test_eval_noise_leaves_training_unchanged():
    x = torch.randn(6, 5, 16)
    quiet, loud = moe_unit(False).train(), moe_unit(True).train()
    for unit in (quiet, loud):
        unit._noise.seed = 9
    assert torch.equal(quiet(x), loud(x))


def test_eval_noise_through_the_model(make_model, batch):
    pixels = batch[0]
    model = make_model(kind="moe", eval_noise=True).eval()
    with torch.no_grad():
        for u in model.unit_list():
            u.w_noise.normal_(0, 1.0)
            u.w_gate.normal_(0, 0.01)
            for e in u.experts:
                e.up.weight.normal_(0, 0.5)
        a, b = model.encode_images(pixels), model.encode_images(pixels)
    assert not torch.allclose(a, b)
    off = make_model(kind="moe").eval()
    with torch.no_grad():
        assert torch.equal(off.encode_images(pixels), off.encode_images(pixels))


# -- a kind registered from outside mozo -----------------------------------------------------------

@dataclasses.dataclass
class ToyConfig:
    gain: float = 0.5

    def validate(self, prefix: str = "peft.toy") -> None:
        if not self.gain > 0:
            raise ValueError(f"{prefix}.gain must be > 0, got {self.gain}")

    def summary(self) -> str:
        return f"gain {self.gain}"


class ToyUnit(PeftUnit):
    """A learnable per-channel shift beside the MLP."""

    parallel = True

    def __init__(self, info, uid, noise, width: int, gain: float):
        super().__init__(info, uid, noise)
        self.shift = nn.Parameter(torch.zeros(width))
        self.gain = gain

    @classmethod
    def from_config(cls, cfg: ToyConfig, info, uid, noise, tower) -> "ToyUnit":
        return cls(info, uid, noise, tower.width, cfg.gain)

    def has_noise(self) -> bool:
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * self.shift.expand_as(x)


@pytest.fixture
def toy_kind():
    register_kind("toy", ToyUnit, ToyConfig)
    yield
    unregister_kind("toy")


def test_toy_kind_builds_through_mozoclip_and_the_config(toy_kind, make_model, batch):
    model = make_model(kind="toy", gain=2.0, towers=("vision",))
    assert model.trainable_parameter_counts() == {"vision.toy": 4 * 64, "total": 4 * 64}
    assert all(isinstance(u, ToyUnit) and u.gain == 2.0 for u in model.unit_list())
    feats = model.encode_images(batch[0])
    assert feats.shape[0] == batch[0].shape[0]
    cfg = load_config("demo", ["peft=toy", "peft.toy.gain=3"])
    assert cfg.peft.toy == ToyConfig(gain=3.0) and from_dict(to_dict(cfg)) == cfg
    assert "Valid keys of peft.toy: gain" in refused("peft=toy", "peft.toy.gian=3")
    assert refused("peft.toy.gain=0") == "peft.toy.gain must be > 0, got 0.0"
    assert "toy" in refused("peft=prompt")


def test_unregistered_toy_kind_is_gone(toy_kind):
    unregister_kind("toy")
    try:
        assert "toy" not in kind_names() and "toy" not in {f.name for f in dataclasses.fields(PeftConfig)}
        assert "unknown config key 'peft.toy.gain'" in refused("peft.toy.gain=3")
    finally:
        register_kind("toy", ToyUnit, ToyConfig)  # the fixture unregisters it again
