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


@pytest.mark.parametrize("plan", ["fo", "vision-zo", "dual-zo"])
def test_accumulated_step_equals_the_step_on_the_whole_batch(make_model, batch, plan):
    """train.accumulate=k, noise off: the FO update and the ZO coefficients of k micro-batches equal the
    unaccumulated step's on the concatenated batch. Tolerances: FO gradients 1e-4 relative (fp32 sums in another
    order); ZO coefficients 5e-5 absolute: one fp32 ulp of a loss near 1.4 is 2.4e-7, which over eps=1e-2 is
    2.4e-5 of a coefficient, and the micro-batch losses are rounded separately (a few ulps)."""
    out = {}
    for k in (1, 4):
        model = make_model(dropout=0.0, noisy_gating=False)
        randomize_units(model, std=0.1)
        step = mozo.HybridStep(model, plan, mozo.ZOConfig(rule="sgd", lr=1e-3, q=2, eps_vision=1e-2, eps_language=1e-2),
                               fo_lr=0.0, seed=3, accumulate=k)
        grads = []
        if step.fo_optimizer is not None:  # the FO gradients as the optimizer receives them
            step.fo_optimizer.step = lambda: grads.extend(p.grad.clone() for p in step.fo_params if p.grad is not None)
        stats = step(*batch)
        out[k] = (stats, units(model), grads)
    (s1, u1, g1), (s4, u4, g4) = out[1], out[4]
    assert s4.loss == pytest.approx(s1.loss, rel=1e-6) and s4.forward_passes == 4 * s1.forward_passes
    assert len(g1) == len(g4) and (len(g1) > 0) == bool(step.fo_params)  # w_noise gets no gradient with noise off
    for a, b in zip(g4, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for name in u1:  # ZO units moved by sgd along the (nearly equal) coefficients
        torch.testing.assert_close(u4[name], u1[name], rtol=0, atol=1e-6)
    if s1.zo:
        for m in s1.zo.coefs:
            assert s4.zo.coefs[m] == pytest.approx(s1.zo.coefs[m], rel=0, abs=5e-5)
            assert max(abs(c) for c in s1.zo.coefs[m]) > 1e-3  # the tolerance is far below the coefficients


def test_accumulated_step_with_noise_runs_with_its_own_masks(make_model, batch):
    """With dropout and router noise on, each micro-batch draws its own masks (the masks of a forward are drawn for
    its own shape), so the accumulated step is a different sample from the unaccumulated one: finite, same seeds."""
    a = mozo.HybridStep(make_model(), "vision-zo", mozo.ZOConfig(q=2), seed=3, accumulate=2)(*batch)
    b = mozo.HybridStep(make_model(), "vision-zo", mozo.ZOConfig(q=2), seed=3)(*batch)
    assert a.zo.seeds == b.zo.seeds and all(map(lambda c: c == c, a.zo.coefs["vision"]))


def test_accumulate_refuses_what_it_does_not_implement(make_model):
    with pytest.raises(ValueError, match="train.accumulate=2 is not implemented with zo.rule=conservative"):
        mozo.HybridStep(make_model(), "vision-zo", mozo.ZOConfig(rule="conservative"), accumulate=2)
    from mozo.engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="not implemented with zo.steps_per_batch"):  # before anything loads
        load_config("demo", ["train.accumulate=2", "zo.steps_per_batch=2"])


def test_per_unit_coefficients_are_each_units_own_directional_derivative(make_model, batch):
    """zo.granularity=unit (the paper's Eq. 2 per training unit): one two-sided difference per unit and direction, each
    unit perturbed alone and its tower re-run from the input of its own layer; coefficient ~ <grad_u, z_u>."""
    import torch.nn.functional as F

    pixels, labels, text = batch
    model = make_model(dropout=0.0, noisy_gating=False, layers=[2, 4])
    randomize_units(model, std=0.1)
    step = mozo.HybridStep(model, "vision-zo", mozo.ZOConfig(lr=0.0, two_sided=True, granularity="unit", eps_vision=1e-4), seed=5)
    groups = {g: list(p for p in grp.params) for g, grp in step.estimator.groups.items()}
    assert set(groups) == {"vision.2", "vision.4"}
    model.train()
    for ps in groups.values():
        for p in ps:
            p.requires_grad_(True)
    loss = F.cross_entropy(model.logits(model.encode_images(pixels), model.encode_texts(text)), labels)
    grads = {g: torch.autograd.grad(loss, ps, retain_graph=True, allow_unused=True) for g, ps in groups.items()}
    stats = step(pixels, labels, text)
    n = model.num_layers("vision")
    assert stats.layer_forwards["vision"] == n + 2 * (n - 1) + 2 * (n - 3)  # theta, then +- from layers 2 and 4
    for g, ps in groups.items():
        seed = step.estimator.group_seed(stats.zo.seeds[0], g)
        want = sum(float((gr * mozo.zo.directions.direction(p, seed, i, "gaussian")).sum())
                   for i, (p, gr) in enumerate(zip(ps, grads[g])) if gr is not None)
        assert abs(want) > 1e-3 and stats.zo.coefs[g][0] == pytest.approx(want, rel=5e-2)
