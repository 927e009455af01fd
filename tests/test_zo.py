"""The ZO estimator: directions, unbiasedness, exact restore, determinism, replay, noise re-seeding."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mozo
from mozo.zo.directions import direction, perturb_
from mozo.seeds import mix_seed
from mozo.backbone.towers import TOWER_STREAMS
from mozo.zo.estimator import Estimator, Group
from mozo.zo.rules import estimate_, replay
from conftest import randomize_units, snapshot, unit_params

pytestmark = pytest.mark.usefixtures("one_thread")

DISTRIBUTIONS = ("gaussian", "rademacher")


# -- a quadratic with a known gradient ---------------------------------------------------------------

class Quadratic:
    """f(x) = 0.5 x'Ax + b'x over two fp32 parameter tensors (8 + 2x2 = 12 coordinates)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(12, 12, generator=g, dtype=torch.float64)
        self.A = m @ m.t() / 12 + 0.5 * torch.eye(12, dtype=torch.float64)
        self.b = torch.randn(12, generator=g, dtype=torch.float64)
        self.params = [torch.randn(8, generator=g), torch.randn(2, 2, generator=g)]

    def x(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.params]).double()

    def f(self) -> float:
        x = self.x()
        return float(0.5 * x @ self.A @ x + self.b @ x)

    def grad(self) -> torch.Tensor:
        return self.A @ self.x() + self.b

    def coef(self, seed: int, eps: float, two_sided: bool, dist: str) -> float:
        """The projected gradient c = (f(x+eps z) - f(x)) / eps, or the central difference."""
        base = None if two_sided else self.f()
        perturb_(self.params, seed, eps, dist)
        plus = self.f()
        if two_sided:
            perturb_(self.params, seed, -2 * eps, dist)
            minus = self.f()
            perturb_(self.params, seed, eps, dist)
            return (plus - minus) / (2 * eps)
        perturb_(self.params, seed, -eps, dist)
        return (plus - base) / eps


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).double()


def test_directions_are_regenerated_from_seeds():
    p = torch.zeros(5, 7)
    for dist in DISTRIBUTIONS:
        a, b = direction(p, 42, 0, dist), direction(p, 42, 0, dist)
        assert torch.equal(a, b) and a.dtype == torch.float32
        assert not torch.equal(a, direction(p, 43, 0, dist))
        assert not torch.equal(a, direction(p, 42, 1, dist))
    assert set(direction(p, 1, 0, "rademacher").unique().tolist()) == {-1.0, 1.0}
    assert mix_seed(5, TOWER_STREAMS["vision"]) != mix_seed(5, TOWER_STREAMS["language"])


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("two_sided", [False, True])
def test_mean_estimate_aligns_with_true_gradient(dist, two_sided):
    q = Quadratic()
    g = q.grad()
    seeds = list(range(1000))
    coefs = [q.coef(s, 1e-3, two_sided, dist) for s in seeds]
    few = flat(estimate_(q.params, seeds[:5], coefs[:5], dist))
    many = flat(estimate_(q.params, seeds, coefs, dist))
    cos_few, cos_many = (F.cosine_similarity(e, g, dim=0).item() for e in (few, many))
    assert cos_many > 0.97
    assert cos_many > cos_few
    # c is the directional derivative g.z (exact for the central difference of a quadratic).
    z = flat(direction(p, seeds[3], i, dist) for i, p in enumerate(q.params))
    assert coefs[3] == pytest.approx(float(g @ z), rel=1e-2, abs=1e-3)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_one_direction_estimate_is_unbiased(dist):
    """q=1 one-sided: the error of the mean of n estimates shrinks like 1/sqrt(n)."""
    q = Quadratic(seed=1)
    g = q.grad()
    pool = 2048
    singles = torch.stack([flat(estimate_(q.params, [s], [q.coef(s, 1e-3, False, dist)], dist)) for s in range(pool)])

    def rms_rel_error(n: int) -> float:  # over the pool // n disjoint means of n estimates
        means = singles.reshape(-1, n, 12).mean(1)
        return math.sqrt(((means - g) ** 2).sum(1).mean().item()) / g.norm().item()

    small, large = rms_rel_error(32), rms_rel_error(512)  # 16x more directions: ~4x smaller error
    assert 2.5 < small / large < 6.5
    # The spread is that of an unbiased estimator: E|cz - g|^2 = (d+1)|g|^2 (Gaussian), (d-1)|g|^2
    # (Rademacher), d = 12; a bias would not shrink with n.
    assert large < 2 * math.sqrt(13 / 512)


# -- perturb and restore ---------------------------------------------------------------------------

def test_perturb_then_restore_is_exact_to_fp32_rounding():
    q = Quadratic()
    before = [p.clone() for p in q.params]
    perturb_(q.params, 9, 1e-3, "gaussian")
    z = [direction(p, 9, i, "gaussian") for i, p in enumerate(before)]
    for p, b, zi in zip(q.params, before, z):
        torch.testing.assert_close(p, b + 1e-3 * zi, rtol=0, atol=1e-6)
        assert not torch.equal(p, b)
    perturb_(q.params, 9, -1e-3, "gaussian")
    ulp = torch.finfo(torch.float32).eps
    for p, b, zi in zip(q.params, before, z):
        assert ((p - b).abs() <= 2 * ulp * (b.abs() + 1e-3 * zi.abs())).all()


def test_perturb_refuses_low_precision_parameters():
    with pytest.raises(TypeError, match="fp32"):
        perturb_([torch.zeros(3, dtype=torch.bfloat16)], 0, 1e-3, "gaussian")


def test_zo_step_with_zero_lr_leaves_parameters_in_place(make_model, batch):
    model = make_model(kind="moe")
    randomize_units(model)
    before = snapshot(model)
    step = mozo.HybridStep(model, "vision:hop-even", mozo.ZOConfig(lr=0.0, q=2, two_sided=True), fo_lr=0.0, seed=3)
    for _ in range(2):
        stats = step(*batch)
        assert any(c != 0 for c in stats.zo.coefs["vision"])
    after = snapshot(model)
    for name, value in before.items():
        zo_unit = name.startswith(("vision_2.", "vision_4."))
        if zo_unit:
            torch.testing.assert_close(after[name], value, rtol=0, atol=1e-7)
        else:
            assert torch.equal(after[name], value), name  # FO at lr 0 and language units: bitwise


# -- determinism and replay ------------------------------------------------------------------------

@pytest.mark.parametrize("plan,zo", [
    ("dual-zo", mozo.ZOConfig(lr=1e-2)),
    ("vision:hop-even", mozo.ZOConfig(lr=1e-2, q=2, two_sided=True, distribution="rademacher")),
    ("language-zo", mozo.ZOConfig(rule="mozo", lr=1e-3)),
    ("fo", mozo.ZOConfig()),
])
def test_same_seed_same_parameters(make_model, batch, plan, zo):
    def train(seed: int) -> dict:
        model = make_model(kind="moe", seed=0)
        step = mozo.HybridStep(model, plan, zo, fo_lr=1e-2, seed=seed)
        for _ in range(3):
            step(*batch)
        return snapshot(model)

    a, b, c = train(0), train(0), train(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("rule", ["sgd", "sign", "sign-scalar", "mozo"])
def test_trajectory_replay(make_model, batch, rule):
    zo = mozo.ZOConfig(rule=rule, lr=1e-2 if rule == "sgd" else 1e-3, q=2)
    model = make_model(kind="moe", seed=0)
    step = mozo.HybridStep(model, "dual-zo", zo, seed=5)
    records = [step(*batch).zo for _ in range(4)]
    trained = snapshot(model)

    fresh = make_model(kind="moe", seed=0)
    start = snapshot(fresh)
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    replay(Estimator({m: Group(unit_params(fresh, m), 1e-3, TOWER_STREAMS[m]) for m in ("vision", "language")}), records)
    replayed = snapshot(fresh)
    for k in trained:
        torch.testing.assert_close(replayed[k], trained[k], rtol=0, atol=1e-6)


# -- noise is re-seeded identically ----------------------------------------------------------------

def loss_at(model, pixels, labels, text, params, eps, noise_seed):
    model.noise.seed = noise_seed
    try:
        with torch.no_grad():
            perturb_(params, 77, eps, "gaussian")
            loss = F.cross_entropy(model.logits(model.encode_images(pixels), model.encode_texts(text)), labels).item()
            perturb_(params, 77, -eps, "gaussian")
    finally:
        model.noise.seed = None
    return loss


def test_loss_difference_vanishes_with_eps_under_dropout_and_router_noise(make_model, batch):
    model = make_model(kind="moe", dropout=0.5, noisy_gating=True)
    randomize_units(model, std=0.1)
    model.train()
    params = unit_params(model)
    base = loss_at(model, *batch, params, 0.0, noise_seed=123)
    diffs = [abs(loss_at(model, *batch, params, eps, noise_seed=123) - base) for eps in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)]
    assert diffs[0] > 1e-3  # the perturbation matters
    assert all(later < earlier for earlier, later in zip(diffs, diffs[1:]))
    assert diffs[-1] < 1e-3 * diffs[0]
    # Without re-seeding the difference measures noise, not the perturbation.
    unseeded = abs(loss_at(model, *batch, params, 1e-5, noise_seed=None) - loss_at(model, *batch, params, 0.0, noise_seed=None))
    assert unseeded > 100 * diffs[-1]


def test_step_coefficients_converge_as_eps_shrinks_with_noise_on(make_model, batch):
    """Inside HybridStep (prefix cache on): c(eps) tends to the directional derivative, not to noise/eps."""
    coefs = []
    for eps in (1e-2, 1e-3, 1e-4):
        model = make_model(kind="moe", dropout=0.5, noisy_gating=True)
        randomize_units(model, std=0.1)
        step = mozo.HybridStep(model, "dual:suffix-2", mozo.ZOConfig(lr=0.0, two_sided=True, eps_vision=eps, eps_language=eps), fo_lr=0.0, seed=4)
        coefs.append(step(*batch).zo.coefs["vision"][0])
    assert abs(coefs[0]) > 1e-3
    assert coefs[2] == pytest.approx(coefs[1], rel=0.05)
    assert coefs[1] == pytest.approx(coefs[0], rel=0.2)


def test_step_coefficient_is_the_autograd_directional_derivative(make_model, batch):
    pixels, labels, text = batch
    # Well-conditioned on purpose: few units, scale 1 (a large directional derivative next to the fp32
    # rounding of the loss), and the upper layers only (fewer ReLU kinks crossed by the perturbation).
    model = make_model(kind="moe", dropout=0.0, noisy_gating=False, layers=[3, 4], rank=8, scale=1.0)
    randomize_units(model, std=0.1)
    params = {m: unit_params(model, m) for m in ("vision", "language")}
    # The true gradient by autograd.
    model.train()
    for p in model.units.parameters():
        p.requires_grad_(True)
    loss = F.cross_entropy(model.logits(model.encode_images(pixels), model.encode_texts(text)), labels)
    grads = {m: torch.autograd.grad(loss, params[m], retain_graph=True, allow_unused=True) for m in params}
    # The ZO coefficient of one two-sided direction, from the real step.
    step = mozo.HybridStep(model, "dual-zo", mozo.ZOConfig(lr=0.0, two_sided=True, eps_vision=1e-3, eps_language=1e-3), seed=8)
    record = step(pixels, labels, text).zo
    want = 0.0
    for m in params:
        seed = step.estimator.group_seed(record.seeds[0], m)
        for i, (p, g) in enumerate(zip(params[m], grads[m])):
            if g is not None:
                want += float((g * direction(p, seed, i, "gaussian")).sum())
    assert abs(want) > 5e-2
    assert record.coefs["vision"][0] == pytest.approx(want, rel=5e-2)
    assert record.coefs["language"][0] == record.coefs["vision"][0]


def test_per_tower_coefficients_are_each_towers_own_directional_derivative(make_model, batch):
    """zo.granularity=tower: each tower's coefficient carries its own directional derivative only (the joint
    estimate above gives both towers the sum), for the same tower forwards as the joint estimate."""
    pixels, labels, text = batch
    model = make_model(kind="moe", dropout=0.0, noisy_gating=False, layers=[3, 4], rank=8, scale=1.0)
    randomize_units(model, std=0.1)
    params = {m: unit_params(model, m) for m in ("vision", "language")}
    before = snapshot(model)
    model.train()
    for p in model.units.parameters():
        p.requires_grad_(True)
    loss = F.cross_entropy(model.logits(model.encode_images(pixels), model.encode_texts(text)), labels)
    grads = {m: torch.autograd.grad(loss, params[m], retain_graph=True, allow_unused=True) for m in params}
    zo = mozo.ZOConfig(lr=0.0, two_sided=True, eps_vision=1e-4, eps_language=2e-4, granularity="tower")
    stats = mozo.HybridStep(model, "dual-zo", zo, seed=1)(pixels, labels, text)
    assert stats.tower_forwards == {"vision": 3, "language": 3}  # theta, then +- per tower: 1 + 2 each
    assert stats.forward_passes == 5
    want = {m: sum(float((g * direction(p, mix_seed(stats.zo.seeds[0], TOWER_STREAMS[m]), i, "gaussian")).sum())
                   for i, (p, g) in enumerate(zip(params[m], grads[m])) if g is not None) for m in params}
    assert abs(want["vision"]) > 2e-2 and abs(want["language"]) > 2e-2
    assert abs(want["vision"] - want["language"]) > 2e-2  # the joint estimate could not pass both checks below
    for m in params:
        assert stats.zo.coefs[m][0] == pytest.approx(want[m], rel=5e-2)
    for name, value in snapshot(model).items():  # lr = 0: every perturbation was undone
        torch.testing.assert_close(value, before[name], rtol=0, atol=1e-6)


def test_per_tower_is_refused_with_fo_at_perturbed():
    with pytest.raises(ValueError, match="needs zo.granularity=joint"):
        mozo.ZOConfig(two_sided=True, fo_at_perturbed=True, granularity="tower")
    with pytest.raises(ValueError, match="zo.granularity must be one of joint, tower, unit"):
        mozo.ZOConfig(granularity="layer")
    from mozo.engine.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="replaced by zo.granularity=tower"):
        load_config("demo", ["zo.per_tower=true"])
