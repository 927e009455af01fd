"""Low-rank subspace directions (zo.subspace_rank, LOZO/SubZero) and the ZO learning rate relative to FO's
(zo.lr_relative): each does what its docstring says, in the one estimator and step."""
from __future__ import annotations

import pytest
import torch

import mozo
from conftest import randomize_units
from mozo.backbone.towers import TOWER_STREAMS
from mozo.engine.config import ConfigError, load_config
from mozo.engine.loop import run_experiment
from mozo.zo.directions import Law, direction
from mozo.zo.estimator import Estimator, Group
from mozo.zo.rules import estimate_, replay
from test_data_cil import make_cifar100
from test_run import cfg_for


def test_low_rank_directions_have_rank_r_unit_variance_and_share_the_basis():
    p = torch.zeros(40, 12)
    law = Law("gaussian", rank=3, basis=5)
    zs = [direction(p, s, 0, law) for s in range(300)]
    assert all(torch.linalg.matrix_rank(z) == 3 for z in zs[:5])
    assert abs(torch.stack(zs).var().item() - 1.0) < 0.05  # every entry variance 1: epsilon keeps its meaning
    # 300 directions under one basis lie in the 40 x 3 = 120-dimensional space {U V^T}
    assert torch.linalg.matrix_rank(torch.stack([z.reshape(-1) for z in zs])) == 120
    other = direction(p, 0, 0, Law("gaussian", rank=3, basis=6))
    assert not torch.allclose(other, zs[0])
    # vectors and matrices no wider than the rank keep the dense law, bit for bit
    for shape in [(12,), (40, 3), (2, 40)]:
        q = torch.zeros(shape)
        assert torch.equal(direction(q, 9, 1, law), direction(q, 9, 1, "gaussian"))
    assert torch.equal(direction(p, 9, 1, Law()), direction(p, 9, 1, "gaussian"))


def test_the_subspace_estimate_is_the_gradient_projected_on_the_basis_on_average():
    """For L(theta) = <G, theta> (exact directional derivatives), E_U[c z] = G V V^T / r for z = U V^T / sqrt(r):
    the gradient projected on span(V) (scaled by cols / r on average), and over fresh bases the gradient itself."""
    torch.manual_seed(0)
    G = torch.randn(6, 8)
    theta = torch.zeros(6, 8)
    rank, n = 2, 2000

    def estimate(basis: int, seeds: range) -> torch.Tensor:
        law = Law("gaussian", rank, basis)
        est = Estimator({"w": Group([theta], eps=1.0)}, law)
        diffs = est.differences(list(seeds), lambda names: (G * theta).sum(), torch.tensor(0.0))
        coefs = est.coefficients([float(d) for d in diffs.diffs], diffs.blocks)["w"]
        return estimate_([theta], list(seeds), coefs, law)[0]

    # V of basis 11 for parameter 0 is the dense (cols x rank) draw under seed 11 (zo/directions.py)
    V = direction(torch.zeros(8, rank), 11, 0, "gaussian")
    z0 = direction(theta, 0, 0, Law("gaussian", rank, 11))
    torch.testing.assert_close(z0 @ V @ torch.linalg.pinv(V), z0)  # its rows lie in span(V)
    expected = G @ V @ V.T / rank
    got = estimate(11, range(n))
    err = (got - expected).norm() / expected.norm()
    assert err < 0.2, err  # Monte Carlo error of 2000 samples: 0.05 measured; a dense estimate (of G itself) is off by ~1
    # averaged over bases the projection averages to the identity: the estimator is unbiased for G
    mean = sum(estimate(b, range(b * 30, b * 30 + 30)) for b in range(60)) / 60
    cos = torch.nn.functional.cosine_similarity(mean.reshape(1, -1), G.reshape(1, -1)).item()
    assert cos > 0.85, cos  # 0.96 measured (60 bases); one fixed basis: 0.3-0.5


def _rank(delta: torch.Tensor) -> int:
    """Numerical rank: singular values above 1e-3 of the largest (fp32 rounding of theta + delta is ~1e-7 relative)."""
    sv = torch.linalg.svdvals(delta.double())
    return int((sv > 1e-3 * sv[0]).sum())


def _vision_up_delta(model, before):
    return {k: v - before[k] for k, v in model.units.state_dict().items() if k.startswith("vision") and ".up.weight" in k}


def test_a_window_of_steps_moves_each_matrix_within_its_subspace_and_replays(make_model, batch):
    """zo.subspace_rank=2, zo.subspace_every=3: steps 0-2 share one basis V per matrix, so the summed update of
    every low-rank matrix is orthogonal to span(V)'s complement; step 3 draws a new basis. Replaying the records
    (each carries its law) reproduces the units."""
    model = make_model(dropout=0.0, noisy_gating=False)
    randomize_units(model, std=0.1)
    start = {k: v.clone() for k, v in model.units.state_dict().items()}
    zo = mozo.ZOConfig(rule="sgd", lr=1e-2, q=2, subspace_rank=2, subspace_every=3)
    step = mozo.HybridStep(model, "vision-zo", zo, fo_lr=0.0, seed=4)
    records = [step(*batch).zo for _ in range(4)]
    laws = [r.distribution for r in records]
    assert laws[0] == laws[1] == laws[2] != laws[3] and laws[0].rank == 2
    # after 3 steps in one window: every up.weight delta has rank <= 2 in its column space (rows x cols, V: cols x 2)
    fresh = make_model(dropout=0.0, noisy_gating=False)
    fresh.units.load_state_dict(start)
    params = [p for u in fresh.unit_list() if u.info.modality == "vision" for p in u.parameters()]
    est = Estimator({"vision": Group(params, zo.eps("vision"), TOWER_STREAMS["vision"])})
    replay(est, records[:3])
    deltas = _vision_up_delta(fresh, start)
    assert deltas and all(_rank(d) <= 2 for d in deltas.values() if min(d.shape) > 2)
    replay(est, records[3:])
    trained = model.units.state_dict()
    for k, v in fresh.units.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=1e-6)
    assert any(_rank(d) > 2 for d in _vision_up_delta(fresh, start).values())


def test_dense_default_is_unchanged_and_bad_values_are_refused(make_model, batch):
    a, b = make_model(), make_model()
    sa = mozo.HybridStep(a, "dual:hop-odd", mozo.ZOConfig(rule="mozo"), seed=2)(*batch)
    sb = mozo.HybridStep(b, "dual:hop-odd", mozo.ZOConfig(rule="mozo", subspace_rank=0, subspace_every=7), seed=2)(*batch)
    assert sa.zo.coefs == sb.zo.coefs and sa.zo.distribution == "gaussian"
    for key, value in [("subspace_rank", -1), ("subspace_every", 0), ("lr_relative", -1.0)]:
        with pytest.raises(ValueError, match=f"zo.{key}"):
            mozo.ZOConfig(**{key: value})
    with pytest.raises(ConfigError, match="zo.subspace_rank"):
        load_config("demo", ["zo.subspace_rank=1.5"])


def test_relative_zo_learning_rate_follows_the_fo_rate_and_its_schedule(tmp_path):
    """zo.lr_relative=0.5 in a run whose train.lr is 1e-3 is the run with zo.lr=5e-4, bit for bit (the schedule
    scales both); changing train.lr changes the ZO units' step with it."""
    root = make_cifar100(tmp_path / "data", n_train=2)
    out = {}
    for name, extra in {"relative": ["zo.lr_relative=0.5"], "absolute": ["zo.lr=5e-4"],
                        "relative-2x": ["zo.lr_relative=0.5", "train.lr=2e-3"]}.items():
        cfg = cfg_for("cifar100-10-10", "num_tasks=1", "eval_max_samples=8", "plan=vision-zo", "zo.rule=sign", *extra)
        runner_units = []
        run_experiment(cfg, tmp_path / name, data_root=root, progress=False,
                       on_step=lambda r: runner_units.append({k: v.clone() for k, v in r.model.units.state_dict().items()}))
        out[name] = runner_units[-1]
    assert all(torch.equal(out["relative"][k], out["absolute"][k]) for k in out["absolute"])
    assert any(not torch.equal(out["relative"][k], out["relative-2x"][k]) for k in out["absolute"] if k.startswith("vision"))
    assert mozo.ZOConfig(lr_relative=0.5).learning_rate(1e-2) == 5e-3 and mozo.ZOConfig(lr=3e-4).learning_rate(1e-2) == 3e-4


# ------------------------------------------------------------------------------------------ guided directions
def test_a_guided_direction_mixes_the_scaled_surrogate_with_the_random_one():
    p, s = torch.zeros(5, 7), torch.randn(5, 7)
    rms = s.pow(2).mean().sqrt()
    law = lambda w, guide: Law("gaussian", guide_weight=w, guide=guide)  # noqa: E731
    torch.testing.assert_close(direction(p, 3, 0, law(1.0, {id(p): s})), s / rms)
    mixed = direction(p, 3, 0, law(0.6, {id(p): s}))
    torch.testing.assert_close(mixed, 0.6 * s / rms + 0.8 * direction(p, 3, 0, "gaussian"))
    # no surrogate for this parameter, or an all-zero one: the random direction, bit for bit
    assert torch.equal(direction(p, 3, 0, law(0.6, {})), direction(p, 3, 0, "gaussian"))
    assert torch.equal(direction(p, 3, 0, law(0.6, {id(p): torch.zeros(5, 7)})), direction(p, 3, 0, "gaussian"))


def test_the_guided_coefficient_is_the_derivative_along_the_neighbours_gradient(make_model, batch):
    """vision:hop-even, zo.guide_weight=1: each ZO unit's direction is the mean gradient of the same parameter in its
    FO neighbours (layers k-1, k+1) scaled to RMS 1, so the two-sided coefficient is <grad_zo, s / rms(s)>."""
    import torch.nn.functional as F

    pixels, labels, text = batch
    model = make_model(dropout=0.0, noisy_gating=False)
    randomize_units(model, std=0.1)
    every = [p for u in model.unit_list() for p in u.parameters()]
    model.train()
    loss = F.cross_entropy(model.logits(model.encode_images(pixels), model.encode_texts(text)), labels)
    grads = dict(zip(map(id, every), torch.autograd.grad(loss, every, allow_unused=True)))
    step = mozo.HybridStep(model, "vision:hop-even", mozo.ZOConfig(lr=0.0, two_sided=True, eps_vision=1e-4, guide_weight=1.0),
                           fo_lr=0.0, seed=5)
    stats = step(pixels, labels, text)
    want = 0.0
    for p in step.zo_params["vision"]:
        sources = step.guide_sources.get(id(p))
        g = grads[id(p)]
        if sources and g is not None:
            s = torch.stack([grads[id(q)] for q in sources]).mean(0)
            if s.abs().sum() > 0:
                want += float((g * s).sum() / s.pow(2).mean().sqrt())
    assert set(stats.zo.distribution.guide) <= set(step.guide_sources) and stats.zo.distribution.guide_weight == 1.0
    assert abs(want) > 1e-2 and stats.zo.coefs["vision"][0] == pytest.approx(want, rel=5e-2)


def test_guided_directions_are_refused_where_they_cannot_work(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="no FO unit next to a ZO unit"):
        mozo.HybridStep(model, "vision-zo", mozo.ZOConfig(guide_weight=0.5))
    assert mozo.HybridStep(model, "vision:hop-even+vision:2,4=frozen", mozo.ZOConfig(guide_weight=0.5)).guide_sources == {}  # a frozen control
    with pytest.raises(ValueError, match="zo.guide_weight"):
        mozo.HybridStep(model, "vision:hop-even", mozo.ZOConfig(guide_weight=0.5), accumulate=2)
    for bad in ({"guide_weight": 1.5}, {"guide_weight": 0.5, "two_sided": True, "fo_at_perturbed": True}):
        with pytest.raises(ValueError, match="zo.guide_weight"):
            mozo.ZOConfig(**bad)
