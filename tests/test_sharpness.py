"""Sharpness measures: power iteration and random perturbations on quadratics with known Hessians, the
Hessian-vector product of the CLIP loss against finite differences, and `mozo diagnose --sharpness`."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import randomize_units
from mozo.cli import main as cli_main
from mozo.diagnostics.sharpness import ModelLoss, perturbation_sharpness, power_iteration, unit_direction

SHAPES = [(3, 4), (5,)]  # two tensors, P = 17


def _hessian(eigs: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return (q * torch.tensor(eigs, dtype=torch.float64)) @ q.T


def _split(vec: torch.Tensor) -> list[torch.Tensor]:
    out, i = [], 0
    for s in SHAPES:
        n = math.prod(s)
        out.append(vec[i:i + n].reshape(s))
        i += n
    return out


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _autograd_hvp(h: torch.Tensor, params: list[torch.Tensor]):
    """v -> H v by double backward of L = 0.5 x^T H x + b^T x (the route the CLIP measure takes)."""
    b = torch.linspace(-1, 1, h.shape[0], dtype=torch.float64)

    def hvp(v):
        x = _flat(params)
        loss = 0.5 * x @ h @ x + b @ x
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return list(torch.autograd.grad(grads, params, v))

    return hvp


@pytest.mark.parametrize("eigs_top", [(7.0, 3.5), (-9.0, 4.0)])
def test_power_iteration_recovers_the_largest_eigenvalue(eigs_top):
    top, second = eigs_top
    eigs = [top, second] + [float(x) for x in torch.linspace(-2.0, 2.0, 15)]
    h = _hessian(eigs)
    params = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES]
    res = power_iteration(_autograd_hvp(h, params), params, iters=200, tol=1e-6, seed=3)
    assert res["converged"] and res["rel_change"] < 1e-6
    assert res["eigenvalue"] == pytest.approx(top, rel=1e-3)
    assert len(res["history"]) == res["iterations"] < 200


def test_power_iteration_stops_at_the_iteration_cap():
    h = _hessian([1.0, 0.999] + [0.5] * 15)  # almost no gap: no convergence to 1e-12 in 3 steps
    params = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES]
    res = power_iteration(_autograd_hvp(h, params), params, iters=3, tol=1e-12)
    assert res["iterations"] == 3 and not res["converged"] and res["rel_change"] is not None


@pytest.mark.parametrize("relative,off_minimum", [(False, False), (True, False), (False, True)])
def test_perturbation_increase_is_r2_over_2_trace_over_p(relative, off_minimum):
    # Block Hessian: the 12-element tensor has curvature ~1, the 5-element one ~10. A direction normalised
    # per tensor instead of over the whole group would give a mean increase ~ r^2/2 (1 + 10), not r^2/2 tr(H)/P.
    g = torch.Generator().manual_seed(1)
    eigs = [1.0 + 0.2 * i / 11 for i in range(12)] + [10.0, 9.0, 11.0, 10.5, 9.5]
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    h = torch.zeros(17, 17, dtype=torch.float64)
    h[:12, :12] = (q * torch.tensor(eigs[:12], dtype=torch.float64)) @ q.T
    h[12:, 12:] = torch.diag(torch.tensor(eigs[12:], dtype=torch.float64))
    star = torch.randn(17, generator=g, dtype=torch.float64)  # the minimum, away from 0 (relative radii)
    # off the minimum the gradient |H delta| ~ 10 would add rho <g, u> (spread ~ 2.5 rho) to each one-sided
    # draw, 100x the curvature term at rho = 0.01: only the antithetic pairs' exact cancellation passes
    at = star + (torch.randn(17, generator=g, dtype=torch.float64) if off_minimum else 0.0)
    params = [t.clone() for t in _split(at)]

    def loss() -> float:
        e = _flat(params) - star
        return float(0.5 * e @ h @ e)

    k, p = 400, 17
    radii = [0.01, 0.5]
    res = perturbation_sharpness(params, loss, radii, k, seed=2, relative=relative)
    assert torch.equal(_flat(params), at)  # restored exactly
    assert res["param_norm"] == pytest.approx(float(at.norm())) and res["evaluations_per_radius"] == 2 * k
    tr, tr2 = float(torch.trace(h)), float(torch.trace(h @ h))
    var_uhu = 2.0 / (p + 2) * (tr2 / p - (tr / p) ** 2)  # Var(u^T H u), u uniform on the unit sphere
    for row, r in zip(res["by_radius"], radii):
        rho = r * (float(at.norm()) if relative else 1.0)
        assert row["abs_radius"] == pytest.approx(rho)
        expected = rho ** 2 / 2 * tr / p
        assert abs(row["mean"] - expected) < 4 * rho ** 2 / 2 * math.sqrt(var_uhu / k)
        assert row["curvature"] == pytest.approx(2 * row["mean"] / rho ** 2)
        if off_minimum:
            assert row["odd_mean_abs"] > (100 if r < 0.1 else 2) * abs(row["mean"])  # the cancelled gradient part was large
        else:
            assert row["odd_mean_abs"] < 1e-9
            assert min(eigs) * rho ** 2 / 2 - 1e-12 <= row["min"] <= row["mean"] <= row["max"] <= max(eigs) * rho ** 2 / 2 + 1e-12
    # the same directions at every radius: a quadratic's increases scale exactly with rho^2
    a, b = res["by_radius"]
    even = lambda row: torch.tensor(row["diffs"], dtype=torch.float64).view(-1, 2).mean(1) / row["abs_radius"] ** 2  # noqa: E731
    assert torch.allclose(even(a), even(b), rtol=1e-6)


def test_one_sided_draws_carry_the_gradient_term():
    h = _hessian([2.0] * 17)
    star = torch.zeros(17, dtype=torch.float64)
    params = [t.clone() for t in _split(torch.ones(17, dtype=torch.float64))]  # gradient H 1 = 2

    def loss() -> float:
        e = _flat(params) - star
        return float(0.5 * e @ h @ e)

    one = perturbation_sharpness(params, loss, [0.01], 8, seed=0, antithetic=False)["by_radius"][0]
    two = perturbation_sharpness(params, loss, [0.01], 8, seed=0)["by_radius"][0]
    assert len(one["diffs"]) == 8 and len(two["diffs"]) == 16 and two["diffs"][0::2] == one["diffs"]
    assert two["curvature"] == pytest.approx(2.0, rel=1e-6)  # every eigenvalue is 2: exact for each pair
    assert abs(one["curvature"] - 2.0) > 1.0


def test_unit_direction_is_unit_norm_and_seeded():
    params = [torch.zeros(s) for s in SHAPES]
    u = unit_direction(params, 5, 0)
    assert _flat(u).norm().item() == pytest.approx(1.0, rel=1e-6)
    assert torch.equal(_flat(u), _flat(unit_direction(params, 5, 0)))
    assert not torch.equal(_flat(u), _flat(unit_direction(params, 5, 1)))


def test_clip_hvp_matches_finite_differences_of_the_gradient(make_model, tiny_backbone):
    from mozo.diagnostics.measure import make_batches

    model = make_model(seed=0)
    randomize_units(model, seed=0, std=0.05)
    batches = make_batches("random", tiny_backbone, 4, 2, seed=0)
    lf = ModelLoss(model, batches)
    params = [p for p in model.unit("language", 2).parameters()]
    v = unit_direction(params, 0, 0)
    hv = torch.cat([t.reshape(-1) for t in lf.hvp(params, v)])

    def grad() -> torch.Tensor:
        for p in params:
            p.requires_grad_(True)
        total = 0.0
        for b, w in zip(batches, lf.weights):
            img = model.encode("vision", {"pixel_values": b.pixel_values})[0]
            txt = model.encode("language", b.text_inputs)[0]
            total = total + w * torch.nn.functional.cross_entropy(model.logits(img, txt), b.labels)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params, allow_unused=True, materialize_grads=True)])

    h = 1e-3  # small: the experts' ReLU kinks have no autograd second derivative, wider differences cross them
    model.eval()
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.add_(vi, alpha=h)
    gp = grad()
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.add_(vi, alpha=-2 * h)
    gm = grad()
    fd = (gp - gm) / (2 * h)
    assert hv.norm() > 0
    assert float((hv - fd).norm() / fd.norm()) < 2e-2


@pytest.fixture
def tiny_run(tmp_path, fresh_backbone):
    """A run folder as `mozo run` leaves it (config.json + complete checkpoint), without training: plan
    vision-zo on the tiny backbone, units moved off their init."""
    from mozo.engine.checkpoint import save_checkpoint
    from mozo.engine.config import load_config, to_dict
    from mozo.peft.inject import MozoCLIP

    cfg = load_config("demo", ["backbone=tiny", "plan=vision-zo"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    torch.manual_seed(0)
    model = MozoCLIP(fresh_backbone(), cfg.peft)
    randomize_units(model, seed=1)
    save_checkpoint(run, {k: v.detach().clone() for k, v in model.units.state_dict().items()}, {})
    (run / "results.json").write_text("{}")
    return run


def test_cli_sharpness_of_a_tiny_run(tiny_run, tmp_path, capsys):
    out = tmp_path / "sharp.json"
    rc = cli_main(["diagnose", "--sharpness", str(tiny_run), "--data", "random", "--images", "8", "--batch", "4",
                   "--directions", "3", "--radii", "0.1,1", "--power-iters", "4", "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["plan"] == "vision-zo" and rep["mode"] == "eval" and rep["images"] == 8 and rep["radius_scale"] == "absolute"
    g = rep["groups"]
    assert set(g) == {"all", "vision", "language", "fo", "zo"}  # the plan has no frozen unit
    assert g["zo"]["same_as"] == "vision" and g["fo"]["same_as"] == "language"
    assert g["all"]["params"] == g["vision"]["params"] + g["language"]["params"]
    for name in ("all", "vision", "language"):
        rows = g[name]["perturbation"]["by_radius"]
        assert [r["radius"] for r in rows] == [0.1, 1.0] and all(len(r["diffs"]) == 6 for r in rows)  # 3 antithetic pairs
        assert all(math.isfinite(r["mean"]) and r["max"] >= r["mean"] for r in rows)
    for name in ("fo", "all"):
        h = g[name]["hessian"]
        assert 1 <= h["iterations"] <= 4 and math.isfinite(h["eigenvalue"])
    assert "hessian" not in g["vision"]
    printed = capsys.readouterr().out
    assert "lambda_max" in printed and "(= vision)" in printed

    rc = cli_main(["diagnose", "--sharpness", str(tiny_run), "--data", "random", "--images", "4", "--batch", "2", "--directions", "2",
                   "--radii", "0.05", "--relative", "--one-sided", "--train-mode", "--groups", "language", "--hessian-groups", "",
                   "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["mode"] == "train" and not rep["antithetic"] and rep["radius_scale"] == "relative" and list(rep["groups"]) == ["language"]
    pert = rep["groups"]["language"]["perturbation"]
    assert "hessian" not in rep["groups"]["language"] and len(pert["by_radius"][0]["diffs"]) == 2
    assert pert["by_radius"][0]["abs_radius"] == pytest.approx(0.05 * rep["groups"]["language"]["param_norm"])
    # dropout and router noise seeded identically: the cached-vision loss equals the full forward's, bit for bit
    assert pert["loss"] == rep["loss"]


def test_cli_sharpness_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["diagnose", "--sharpness", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    assert cli_main(["diagnose", "--sharpness", str(tmp_path / "bare")]) == 2
    assert "no config.json" in capsys.readouterr().err
    from mozo.engine.config import load_config, to_dict

    (tmp_path / "bare" / "config.json").write_text(json.dumps(to_dict(load_config("demo", ["backbone=tiny"]))))
    assert cli_main(["diagnose", "--sharpness", str(tmp_path / "bare"), "--data", "random"]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "Traceback" not in err
