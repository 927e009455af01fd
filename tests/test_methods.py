"""Continual-learning methods as plug-ins: a method's loss term reaches the FO gradients and the ZO loss
differences of the step, a method defined outside mozo plugs into a run, and the zero-shot teacher is the
backbone with its units switched off."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import mozo
from conftest import randomize_units
from mozo.engine.config import ConfigError, load_config
from mozo.engine.loop import run_experiment
from mozo.methods import METHODS, Method, MethodConfig, build_method, register_method


class Toy(Method):
    """Defined here, not in mozo: cross-entropy plus a penalty on large logits."""

    name = "toy-test"

    def loss(self, logits, labels, prepared):
        return super().loss(logits, labels, prepared) + 0.5 * logits.pow(2).mean()


def step_outcome(model, method, plan, batch):
    pixels, labels, text = batch
    step = mozo.HybridStep(model, plan, mozo.ZOConfig(rule="sgd", lr=0.0, q=2), fo_lr=0.0, seed=3, method=method)
    theta = {k: v.clone() for k, v in model.units.state_dict().items()}
    model.zero_grad(set_to_none=True)
    # Capture the FO gradients before the optimizer clears them.
    grads = {}
    orig = step.fo_optimizer.step

    def capture():
        grads.update({id(p): p.grad.clone() for p in step.fo_params if p.grad is not None})
        orig()
    step.fo_optimizer.step = capture
    stats = step(pixels, labels, text)
    model.units.load_state_dict(theta)
    return stats, grads


def test_zscl_term_reaches_fo_gradients_and_zo_differences(make_model, batch):
    model = make_model()
    randomize_units(model, std=0.1)
    base, g_base = step_outcome(model, build_method(MethodConfig()), "vision:hop-odd", batch)
    zscl, g_zscl = step_outcome(model, build_method(MethodConfig(name="zscl", distill_weight=1.0)), "vision:hop-odd", batch)
    off, g_off = step_outcome(model, build_method(MethodConfig(name="zscl", distill_weight=0.0)), "vision:hop-odd", batch)
    assert zscl.loss != base.loss and off.loss == base.loss
    assert all(not torch.equal(g_zscl[k], g_base[k]) for k in g_base) and all(torch.equal(g_off[k], g_base[k]) for k in g_base)
    assert zscl.zo.coefs["vision"] != base.zo.coefs["vision"] and off.zo.coefs == base.zo.coefs
    # The teacher's forwards are counted: one image and one text forward beyond the baseline's.
    assert zscl.tower_forwards["vision"] == base.tower_forwards["vision"] + 1
    assert zscl.tower_forwards["language"] == base.tower_forwards["language"] + 1
    assert zscl.forward_passes == base.forward_passes  # loss evaluations unchanged


def test_zscl_teacher_is_the_backbone_without_units(make_model, batch):
    pixels, labels, text = batch
    model = make_model()
    randomize_units(model, std=0.1)
    prepared = build_method(MethodConfig(name="zscl")).prepare(model, pixels, labels, text)
    model.eval()
    with torch.no_grad(), model.units_disabled():
        want = model.logits(model.encode_images(pixels), model.encode_texts(text)).float()
        still_on = model.unit_list()[0].enabled
    assert torch.equal(prepared.values["teacher"], want) and not still_on and model.unit_list()[0].enabled
    with torch.no_grad():
        assert not torch.allclose(model.logits(model.encode_images(pixels), model.encode_texts(text)).float(), want)


def test_a_method_defined_outside_mozo_plugs_into_a_run(tmp_path):
    register_method(Toy)
    try:
        losses = {}
        for name in ("baseline", "toy-test"):
            cfg = load_config("demo", ["train.max_steps_per_task=2", "num_tasks=1", "eval_max_samples=10", f"method.name={name}"])
            run_experiment(cfg, tmp_path / name, progress=False)
            events = [json.loads(line) for line in (tmp_path / name / "events.jsonl").read_text().splitlines()]
            losses[name] = [e["loss"] for e in events if e["event"] == "step"]
        assert len(losses["toy-test"]) == 2 and losses["toy-test"][0] > losses["baseline"][0]
    finally:
        METHODS.pop("toy-test")


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="registered methods: baseline, zscl"):
        load_config("demo", ["method.name=lwf2"])


def test_label_smoothing_changes_the_baseline_loss():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    smooth = build_method(MethodConfig(), label_smoothing=0.2)
    assert float(smooth.loss(logits, labels, None)) == pytest.approx(float(F.cross_entropy(logits, labels, label_smoothing=0.2)))
