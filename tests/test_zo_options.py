"""Estimator options beyond the paper's (issue: making ZO units learn): several ZO updates per batch, and
perturbing only some parameters of the ZO units. Each is tested for doing exactly what it says."""
from __future__ import annotations

import pytest
import torch

import mozo
from conftest import randomize_units
from mozo.backbone.towers import TOWER_STREAMS
from mozo.zo.estimator import Estimator, Group
from mozo.zo.rules import replay


def units(model):
    return {k: v.clone() for k, v in model.units.state_dict().items()}


def test_further_zo_steps_are_replayable_updates_at_successive_points(make_model, batch):
    """steps_per_batch=3: three recorded ZO updates; replaying them on the starting units gives the trained
    ZO units, and the third started where the second ended (its coefficients are not the first's)."""
    model = make_model(dropout=0.0, noisy_gating=False)
    randomize_units(model, std=0.1)
    start = units(model)
    zo = mozo.ZOConfig(rule="sgd", lr=1e-2, q=2, steps_per_batch=3)
    stats = mozo.HybridStep(model, "vision-zo", zo, fo_lr=0.0, seed=4)(*batch)
    assert len(stats.zo_extra) == 2 and len({tuple(r.seeds) for r in [stats.zo, *stats.zo_extra]}) == 3
    trained = units(model)
    fresh = make_model(dropout=0.0, noisy_gating=False)
    fresh.units.load_state_dict(start)
    params = [p for u in fresh.unit_list() if u.info.modality == "vision" for p in u.parameters()]
    replay(Estimator({"vision": Group(params, zo.eps("vision"), TOWER_STREAMS["vision"])}), [stats.zo, *stats.zo_extra])
    for k, v in units(fresh).items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=1e-6)
    assert any(not torch.equal(trained[k], start[k]) for k in start if k.startswith("vision"))


def test_one_step_per_batch_is_the_default_step(make_model, batch):
    a, b = make_model(), make_model()
    sa = mozo.HybridStep(a, "dual:hop-odd", mozo.ZOConfig(rule="mozo"), seed=2)(*batch)
    sb = mozo.HybridStep(b, "dual:hop-odd", mozo.ZOConfig(rule="mozo", steps_per_batch=1), seed=2)(*batch)
    assert sa.zo.coefs == sb.zo.coefs and all(torch.equal(x, y) for x, y in zip(units(a).values(), units(b).values()))


def test_parts_perturb_and_update_only_the_named_parameters(make_model, batch):
    model = make_model()
    randomize_units(model, std=0.1)
    before = units(model)
    step = mozo.HybridStep(model, "vision-zo", mozo.ZOConfig(rule="mozo", lr=1e-2, parts="w_gate"), fo_lr=0.0, seed=1)
    assert sum(p.numel() for p in step.zo_params["vision"]) == sum(
        u.w_gate.numel() for u in model.unit_list() if u.info.modality == "vision")
    step(*batch)
    moved = {k for k, v in units(model).items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith("vision") and k.endswith("w_gate") for k in moved)


def test_parts_that_match_nothing_name_the_parameters(make_model):
    with pytest.raises(ValueError, match="matches no parameter.*w_gate"):
        mozo.HybridStep(make_model(), "vision-zo", mozo.ZOConfig(parts="router"))
    with pytest.raises(ValueError, match="zo.steps_per_batch"):
        mozo.ZOConfig(steps_per_batch=0)
