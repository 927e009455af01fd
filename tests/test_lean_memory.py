"""Memory-lean forms of CLIP's MLP activation and of the MoE gate: same values and gradients, fewer saved bytes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import QuickGELUActivation

from mozo.backbone import towers
from mozo.backbone.activations import quick_gelu, run_mlp
from test_units import make_moe


def saved_tensors(fn, *args):
    """Run fn(*args) and return the non-parameter tensors autograd kept (unique storages)."""
    kept, seen = [], set()

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, kept


def test_quick_gelu_forward_is_bitwise_transformers_and_gradient_matches():
    x = torch.randn(3, 7, 40) * 4
    assert torch.equal(quick_gelu(x), QuickGELUActivation()(x))
    x64 = torch.randn(5, 6, dtype=torch.float64, requires_grad=True) * 3
    assert torch.autograd.gradcheck(quick_gelu, (x64.detach().requires_grad_(),))
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    g = torch.randn_like(x)
    quick_gelu(a).backward(g)
    QuickGELUActivation()(b).backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    # Large enough for the backward to run in several pieces, with a non-contiguous incoming gradient.
    big = (torch.randn(3, 1000, 300) * 4).requires_grad_()
    ref = big.detach().clone().requires_grad_()
    g = torch.randn(3, 300, 1000).transpose(1, 2)
    quick_gelu(big).backward(g)
    QuickGELUActivation()(ref).backward(g)
    torch.testing.assert_close(big.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_lean_mlp_keeps_one_hidden_tensor_where_transformers_keeps_two(tiny_backbone):
    mlp = tiny_backbone.model.vision_model.encoder.layers[0].mlp
    x = torch.randn(2, 5, mlp.fc1.in_features, requires_grad=True)
    hidden = mlp.fc1.out_features
    ref, ref_kept = saved_tensors(mlp, x)
    out, kept = saved_tensors(run_mlp, mlp, x)
    assert torch.equal(out, ref)
    activations = lambda ts: sum(tuple(t.shape) == (*x.shape[:-1], hidden) for t in ts)
    assert activations(ref_kept) == 2
    assert activations(kept) == 1
    with torch.no_grad():  # nothing recorded: the model's own module runs
        assert torch.equal(run_mlp(mlp, x), ref)


def test_tower_gradients_equal_the_transformers_mlp(make_model, monkeypatch):
    from conftest import PROMPTS, randomize_units

    model = make_model(kind="moe", dropout=0.0)
    randomize_units(model)
    model.eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    text = model.backbone.tokenize(PROMPTS)

    def grads():
        model.zero_grad(set_to_none=True)
        for p in model.units.parameters():
            p.requires_grad_(True)
        loss = model.logits(model.encode_images(pixels), model.encode_texts(text)).logsumexp(-1).sum()
        loss.backward()
        return [p.grad.clone() for p in model.units.parameters() if p.grad is not None]  # w_noise: unused in eval

    lean = grads()
    monkeypatch.setattr(towers, "run_mlp", lambda mlp, x: mlp(x))
    plain = grads()
    assert len(lean) == len(plain) and all(g.abs().sum() > 0 for g in lean)
    for a, b in zip(lean, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_moe_gate_on_the_bottleneck_matches_the_reference_and_saves_no_expert_output():
    unit, _ = make_moe(width=16, experts=3, top_k=2, rank=4)
    unit.eval()
    x = torch.randn(4, 6, 16, requires_grad=True)
    out, kept = saved_tensors(unit, x)

    def reference(x):  # the reference code's form: gates times each expert's full-width output
        g = unit.gates(x[:, 0, :])
        ys = [e.up(F.relu(e.down(x))) * e.scale for e in unit.experts]
        return sum(g[:, i, None, None] * y for i, y in enumerate(ys))

    want, ref_kept = saved_tensors(reference, x)
    torch.testing.assert_close(out, want)
    full_width = lambda ts: [t for t in ts if t.shape[-2:] == x.shape[-2:] and t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()]
    assert len(full_width(ref_kept)) == 3  # one expert output per expert
    assert full_width(kept) == []
    g = torch.randn_like(out)
    params = [x] + list(unit.parameters())
    got = torch.autograd.grad(unit(x), params, g, allow_unused=True)
    ref = torch.autograd.grad(reference(x), params, g, allow_unused=True)
    for a, b in zip(got, ref):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def full_width_features(model, modality, inputs):
    """The tower run the plain way: every token through every layer, then pooling (the reference)."""
    tower = model.towers[modality]
    x = tower.embed(inputs)
    h = x.hidden
    for i, layer in enumerate(tower.layers):
        h = towers.run_block(layer, h, x.mask, model._parallel[modality].get(i))
    return tower.head(towers.TowerInput(h, x.mask, x.pool_index, tower.num_layers))


@pytest.mark.parametrize("kind", ["moe", "adapter", "lora"])
def test_top_layer_on_the_pooled_rows_gives_the_same_features_and_gradients(make_model, kind):
    from conftest import PROMPTS, randomize_units

    model = make_model(kind=kind, **({"targets": ("q_proj", "v_proj", "out_proj", "fc1")} if kind == "lora" else {}))
    randomize_units(model, std=0.1)
    model.eval()
    inputs = {"vision": {"pixel_values": torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))},
              "language": model.backbone.tokenize(PROMPTS + ["a bad photo of the big dark blue square with stripes"])}
    for modality, x in inputs.items():
        params = [p for u in model.unit_list() if u.info.modality == modality for p in u.parameters()]
        for p in params:
            p.requires_grad_(True)
        got = model.encode(modality, x)[0]
        want = full_width_features(model, modality, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(got)
        ga = torch.autograd.grad(got, params, g, allow_unused=True)
        gb = torch.autograd.grad(want, params, g, allow_unused=True)
        assert sum(a is not None and a.abs().sum() > 0 for a in ga) > len(params) // 2
        for a, b in zip(ga, gb):
            if b is None or a is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_top_layer_on_the_pooled_rows_saves_less(make_model):
    model = make_model(kind="moe")
    for p in model.units.parameters():
        p.requires_grad_(True)
    pixels = torch.randn(2, 3, 32, 32)
    _, pruned = saved_tensors(lambda: model.encode("vision", {"pixel_values": pixels})[0])
    _, full = saved_tensors(lambda: full_width_features(model, "vision", {"pixel_values": pixels}))
    nbytes = lambda ts: sum(t.untyped_storage().nbytes() for t in ts)  # noqa: E731
    per_layer = nbytes(full) / model.num_layers("vision")
    assert nbytes(full) - nbytes(pruned) > 0.3 * per_layer  # q, the MLP and the unit of 16 of 17 tokens (keys and values stay)
