"""PEFT units: parameter counts, the MoE router (top-k, first token, noise), reproducible noise, LoRA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mozo.peft.lora import LoRALinear
from mozo.peft.moe import MoEAdapter
from mozo.peft.units import NoiseControl, UnitInfo

pytestmark = pytest.mark.usefixtures("one_thread")


def moe_params(d: int, rank: int = 64, experts: int = 2) -> int:
    """One MoE unit: per expert down (d*r + r) and up (r*d + d); the router's w_gate and w_noise (d*E each)."""
    return experts * (d * rank + rank + rank * d + d) + 2 * d * experts


# -- counts ----------------------------------------------------------------------------------------

def test_counts_per_modality_and_kind_tiny(make_model):
    d, layers = 64, 4
    moe = make_model(kind="moe").trainable_parameter_counts()
    assert moe == {"vision.moe": layers * moe_params(d), "language.moe": layers * moe_params(d), "total": 2 * layers * moe_params(d)}
    assert moe["total"] == 135_168

    adapter = make_model(kind="adapter", rank=16).trainable_parameter_counts()
    per = d * 16 + 16 + 16 * d + d
    assert adapter == {"vision.adapter": layers * per, "language.adapter": layers * per, "total": 2 * layers * per}

    lora = make_model(kind="lora", rank=4, targets=("q_proj", "v_proj", "fc1")).trainable_parameter_counts()
    # q, v: 64 -> 64; fc1: 64 -> 128. A is (r, in), B is (out, r).
    per = 2 * (4 * 64 + 64 * 4) + (4 * 64 + 128 * 4)
    assert lora == {"vision.lora": layers * per, "language.lora": layers * per, "total": 2 * layers * per}

    # Units only where asked: one tower, chosen layers.
    some = make_model(kind="moe", towers=("vision",), layers=[1, 3])
    assert some.trainable_parameter_counts() == {"vision.moe": 2 * moe_params(d), "total": 2 * moe_params(d)}
    assert [(u.info.modality, u.info.layer, u.info.kind) for u in some.unit_list()] == [("vision", 1, "moe"), ("vision", 3, "moe")]
    # Only unit parameters are trainable.
    assert {id(p) for p in some.parameters() if p.requires_grad} == {id(p) for p in some.units.parameters()}


def test_bad_unit_configs_raise(make_model):
    with pytest.raises(ValueError, match="peft kind"):
        make_model(kind="prompt")
    with pytest.raises(ValueError, match="out of range"):
        make_model(kind="moe", layers=[5])
    with pytest.raises(ValueError, match="top_k"):
        make_model(kind="moe", num_experts=2, top_k=3)


@pytest.mark.slow
def test_vit_b16_class_incremental_moe_count():
    """ViT-B/16 geometry, 2 experts of rank 64 and a router per block, 12 layers per tower."""
    import mozo

    bb = mozo.load_backbone("vit-b-16")
    counts = mozo.MozoCLIP(bb, mozo.PeftConfig.of("moe", num_experts=2, rank=64)).trainable_parameter_counts()
    vision, language = 12 * moe_params(768), 12 * moe_params(512)
    assert counts["vision.moe"] == vision == 2_416_128
    assert counts["language.moe"] == language == 1_611_264
    assert counts["total"] == vision + language == 4_027_392


# -- MoE router ------------------------------------------------------------------------------------

def make_moe(width=16, experts=4, top_k=2, rank=8, dropout=0.0, noisy=True, seed=0):
    noise = NoiseControl()
    torch.manual_seed(seed)
    unit = MoEAdapter(UnitInfo("vision", 1, "moe"), 3, noise, width, experts, top_k, rank, 0.1, dropout, noisy)
    with torch.no_grad():  # leave the zero init: every part of the unit must matter
        for p in unit.parameters():
            p.normal_(0, 0.3)
    return unit, noise


def test_topk_gates_sum_to_one_per_sample():
    unit, _ = make_moe(experts=4, top_k=2)
    unit.eval()
    first = torch.randn(10, 16)
    g = unit.gates(first)
    assert g.shape == (10, 4)
    torch.testing.assert_close(g.sum(-1), torch.ones(10))
    assert ((g > 0).sum(-1) == 2).all()
    # The two experts kept are the two largest router logits, weighted by their softmax.
    logits = first @ unit.w_gate
    top, idx = logits.topk(2, dim=-1)
    torch.testing.assert_close(g.gather(-1, idx), top.softmax(-1))
    unit.train()
    g = unit.gates(first)
    torch.testing.assert_close(g.sum(-1), torch.ones(10))
    assert ((g > 0).sum(-1) == 2).all()


def test_routing_reads_the_first_token_and_mixes_whole_samples():
    unit, _ = make_moe()
    unit.eval()
    seen = []
    original = unit.gates
    unit.gates = lambda first: seen.append(original(first)) or seen[-1]
    x = torch.randn(3, 5, 16)
    y = x.clone()
    y[:, 1:] = torch.randn(3, 4, 16)  # every token but the first changes
    z = x.clone()
    z[:, 0] = torch.randn(3, 16)  # only the first token changes
    out_x = unit(x)
    unit(y)
    unit(z)
    assert torch.equal(seen[0], seen[1])
    assert not torch.allclose(seen[0], seen[2])
    # Whole samples: every token of sample b uses the same gates g[b].
    with torch.no_grad():
        experts = torch.stack([e.up(torch.relu(e.down(x))) * e.scale for e in unit.experts], dim=1)  # (B, E, T, D)
        want = (seen[0][:, :, None, None] * experts).sum(1)
    torch.testing.assert_close(out_x, want)


def test_router_noise_only_in_train_mode():
    unit, noise = make_moe()
    first = torch.randn(6, 16)
    unit.eval()
    assert torch.equal(unit.gates(first), unit.gates(first))
    clean = unit.gates(first)
    unit.train()
    a, b = unit.gates(first), unit.gates(first)  # unseeded: fresh noise every call
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, clean)
    unit.noisy = False
    assert torch.equal(unit.gates(first), clean)


def test_seeded_noise_is_reproducible_and_seed_dependent():
    unit, noise = make_moe(dropout=0.5)
    unit.train()
    x = torch.randn(4, 6, 16)
    noise.seed = 11
    a, b = unit(x), unit(x)
    assert torch.equal(a, b)  # router noise and dropout replayed exactly
    noise.seed = 12
    c = unit(x)
    assert not torch.allclose(a, c)
    noise.seed = None
    assert not torch.allclose(unit(x), unit(x))


def test_experts_draw_independent_dropout_masks():
    unit, noise = make_moe(experts=2, top_k=2, dropout=0.5)
    with torch.no_grad():  # two identical experts: only their dropout masks can tell them apart
        unit.experts[1].load_state_dict(unit.experts[0].state_dict())
    inputs = []  # what each expert's up-projection reads: relu(down(x)) after its dropout
    dropout = unit.dropout
    unit.dropout = lambda h, p, stream: inputs.append(dropout(h, p, stream=stream).detach()) or inputs[-1]
    unit.train()
    noise.seed = 3
    unit(torch.randn(2, 4, 16))
    assert len(inputs) == 2
    assert not torch.equal(inputs[0], inputs[1])


# -- LoRA --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("out_proj", "fc1")])
def test_lora_wraps_only_the_targeted_linears(make_model, targets):
    model = make_model(kind="lora", targets=targets)
    for modality in ("vision", "language"):
        for layer in model.towers[modality].layers:
            linears = {
                "q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj, "v_proj": layer.self_attn.v_proj,
                "out_proj": layer.self_attn.out_proj, "fc1": layer.mlp.fc1, "fc2": layer.mlp.fc2,
            }
            for key, module in linears.items():
                if key in targets:
                    assert isinstance(module, LoRALinear), (modality, key)
                    assert isinstance(module.base, nn.Linear) and not module.base.weight.requires_grad
                else:
                    assert type(module) is nn.Linear, (modality, key)
    unit = model.unit("vision", 2)
    assert sorted(unit.A.keys()) == sorted(targets) == sorted(unit.B.keys())
    assert all(torch.count_nonzero(b) == 0 for b in unit.B.values())  # B starts at zero


def test_lora_unknown_target_raises(make_model):
    with pytest.raises(ValueError, match=r"peft.lora.targets must be a non-empty subset of q_proj.*qkv"):
        make_model(kind="lora", targets=("q_proj", "qkv"))
