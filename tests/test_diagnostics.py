"""ZO estimator diagnostics: statistics match their definitions, undefined cosines, the CLI and the sweep."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import mozo
from PIL import Image

from mozo.cli import main as cli_main
from mozo.diagnostics.stats import direction_seed, estimator_statistics, ideal_cosine
from mozo.zo.directions import direction


@pytest.fixture(autouse=True)
def _one_thread():
    """The diagnostics run thousands of tiny forwards: thread hand-offs cost more than they give."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quadratic(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    a = [torch.rand(3, 4, generator=g) + 0.5, torch.rand(5, generator=g) + 0.5]
    b = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]

    def loss() -> float:  # L = sum 0.5 a p^2 + b p, in float64 from the fp32 parameters
        return float(sum((0.5 * ai.double() * p.double() ** 2 + bi.double() * p.double()).sum() for p, ai, bi in zip(params, a, b)))

    grad = [ai * p + bi for p, ai, bi in zip(params, a, b)]
    return params, loss, grad


@torch.no_grad()
def _reference(params, loss, grad, eps, qs, n, seed, dist="gaussian"):
    """Independent recomputation from the definitions, with explicit vectors."""
    base = [p.clone() for p in params]
    l0 = loss()
    gvec = torch.cat([t.reshape(-1) for t in grad]).double()
    zs, cs = [], []
    for d in range(n):
        z = [direction(p, direction_seed(seed, d), i, dist) for i, p in enumerate(params)]
        for p, zi in zip(params, z):
            p.add_(zi, alpha=eps)
        cs.append((loss() - l0) / eps)
        for p, b in zip(params, base):
            p.copy_(b)
        zs.append(torch.cat([t.reshape(-1) for t in z]).double())
    est = torch.stack([c * z for c, z in zip(cs, zs)])  # g_d, one row per direction
    mean = est.mean(0)
    variance = float(((est - mean) ** 2).sum(1).mean())
    cos = {}
    for q in qs:
        vals = []
        for r in range(n // q):
            gq = est[r * q:(r + 1) * q].mean(0)
            vals.append(float(gq @ gvec / (gq.norm() * gvec.norm())))
        cos[q] = sum(vals) / len(vals)
    sign_cos = {}
    for q in qs:
        vals = []
        for r in range(n // q):
            s = torch.sign(est[r * q:(r + 1) * q].mean(0))
            vals.append(float(s @ gvec / (s.norm() * gvec.norm())))
        sign_cos[q] = sum(vals) / len(vals)
    agree = sum(1 for c, z in zip(cs, zs) if math.copysign(1, c) == math.copysign(1, float(z @ gvec))) / n
    return {"mean_sq_norm": float((est ** 2).sum(1).mean()), "variance": variance,
            "variance_about_true": float(((est - gvec) ** 2).sum(1).mean()),
            "normalized_variance": variance / float(gvec @ gvec), "cosine": cos, "sign_cosine": sign_cos, "sign_agreement": agree}


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_statistics_match_definitions(dist):
    params, loss, grad = _quadratic()
    stats = estimator_statistics(params, loss, grad, eps=[1e-3, 1e-2], q=[1, 2, 4], directions=12, seed=5, distribution=dist)
    assert stats["params"] == 17
    assert stats["grad_norm"] == pytest.approx(math.sqrt(sum(float((g.double() ** 2).sum()) for g in grad)))
    for row in stats["by_eps"]:
        ref = _reference(params, loss, grad, row["eps"], [1, 2, 4], 12, 5, dist)
        for key in ("mean_sq_norm", "variance", "variance_about_true", "normalized_variance", "sign_agreement"):
            assert row[key] == pytest.approx(ref[key], rel=1e-9), key
        for q in (1, 2, 4):
            assert row["cosine"][str(q)]["mean"] == pytest.approx(ref["cosine"][q], rel=1e-9, abs=1e-12)
            assert row["cosine"][str(q)]["repeats"] == 12 // q
            assert row["sign_cosine"][str(q)] == pytest.approx(ref["sign_cosine"][q], rel=1e-9, abs=1e-12)
    # parameters are restored exactly
    fresh, _, _ = _quadratic()
    assert all(torch.equal(p, f) for p, f in zip(params, fresh))


def test_exact_linear_estimator_matches_theory():
    """L linear: c_d = <g, z_d> exactly, so trace(cov)/||g||^2 -> P + 1 (Gaussian) and cos(q) ~ sqrt(q/(q+P+1))."""
    g = torch.Generator().manual_seed(1)
    p = torch.randn(10, generator=g)
    b = torch.randn(10, generator=g)

    def loss() -> float:
        return float(p.double() @ b.double())

    stats = estimator_statistics([p], loss, [b], eps=[1.0], q=[1, 8], directions=4000, seed=0)
    row = stats["by_eps"][0]
    assert row["normalized_variance"] == pytest.approx(11.0, rel=0.1)
    assert row["cosine"]["8"]["mean"] == pytest.approx(ideal_cosine(10, 8), abs=0.06)
    assert row["sign_agreement"] == 1.0 and row["loss_diff"]["fd_rel_error"] < 1e-6


def test_zero_gradient_gives_undefined_cosine():
    g = torch.Generator().manual_seed(2)
    used, unused = torch.randn(4, generator=g), torch.randn(6, generator=g)

    def loss() -> float:
        return float((used.double() ** 2).sum())  # does not depend on `unused`

    stats = estimator_statistics([unused], loss, [torch.zeros(6)], eps=[1e-3], q=[1, 2], directions=4, seed=0)
    row = stats["by_eps"][0]
    assert stats["grad_norm"] == 0.0
    assert all(row["cosine"][q]["mean"] is None and row["cosine"][q]["std"] is None for q in ("1", "2"))
    assert row["normalized_variance"] is None and row["sign_agreement"] is None
    assert row["variance"] == 0.0 and row["loss_diff"]["zero_fraction"] == 1.0
    json.dumps(stats)  # None, not NaN: valid JSON


def test_all_zero_loss_differences_leave_cosine_undefined():
    """Non-zero gradient, but eps so small that every loss difference rounds to 0: no estimate, no cosine."""
    p = torch.ones(3)
    stats = estimator_statistics([p], lambda: 1.0, [torch.ones(3)], eps=[1e-3], q=[1, 3], directions=3, seed=0)
    row = stats["by_eps"][0]
    assert row["cosine"]["1"]["mean"] is None and row["cosine"]["1"]["zero_estimates"] == 3
    assert row["loss_diff"]["zero_fraction"] == 1.0 and row["sign_agreement"] == 0.0


def test_clip_unit_closure_and_true_gradient():
    """On the tiny CLIP after FO warm-up: the cached-prefix closure equals a full forward, c_d of a unit
    matches a finite difference of the full model, and the statistics follow the definitions."""
    from mozo.backbone.clip import load_backbone
    from mozo.diagnostics.measure import block_loss_fn, diagnose, random_batches, true_gradients, warmup
    from mozo.peft.inject import MozoCLIP
    from mozo.seeds import mix_seed

    torch.manual_seed(0)
    bb = load_backbone("tiny")
    model = MozoCLIP(bb)
    batches = random_batches(bb, 2, 3, seed=0)
    losses = warmup(model, batches[1:], 2)
    assert len(losses) == 2
    noise = mix_seed(0, 17)
    loss_ag, grads = true_gradients(model, batches[0], noise)
    unit = model.unit("vision", 3)
    down = unit.experts[0].down.weight if hasattr(unit, "experts") else next(unit.parameters())
    assert grads[id(down)].abs().sum() > 0  # warm-up made `up` non-zero, so `down` now has a gradient
    closure = block_loss_fn(model, batches[0], "vision", 3, noise)
    assert closure() == pytest.approx(loss_ag, abs=1e-5)

    result = diagnose(model, batches[0], eps=[1e-2], q=[1, 2], directions=4, seed=0, units=[("vision", 3), ("language", 2)])
    assert [(r["modality"], r["layer"]) for r in result["rows"]] == [("vision", 3), ("language", 2)]
    row = result["rows"][0]
    params = list(unit.parameters())
    ref = _reference(params, closure, [grads[id(p)] for p in params], 1e-2, [1, 2], 4, mix_seed(0, 1, 3))
    assert row["by_eps"][0]["variance"] == pytest.approx(ref["variance"], rel=1e-9)
    assert row["by_eps"][0]["cosine"]["2"]["mean"] == pytest.approx(ref["cosine"][2], rel=1e-9)
    assert set(result["modalities"]) == {"vision", "language"}


def test_cli_tiny_random_writes_rows_for_both_towers(tmp_path, capsys):
    out = tmp_path / "d.json"
    rc = cli_main(["diagnose", "--backbone", "tiny", "--data", "random", "--batch", "2", "--directions", "2",
                   "--eps", "1e-3,1e-2", "--q", "1,2", "--json", str(out), "--plots", str(tmp_path / "img")])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert {(r["modality"], r["layer"]) for r in rep["rows"]} == {(m, k) for m in ("vision", "language") for k in range(1, 5)}
    assert rep["data"]["source"] == "random" and "random" in rep["data"]["note"]
    assert "fresh units" in rep["state"]["description"]
    for r in rep["rows"]:
        assert r["params"] > 0 and len(r["by_eps"]) == 2
        assert set(r["by_eps"][0]["cosine"]) == {"1", "2"}
    assert set(rep["modalities"]) == {"vision", "language"}
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["diag_cosine_vs_q.png", "diag_loss_diff_vs_eps.png", "diag_variance_per_layer.png"]
    assert "per modality" in capsys.readouterr().out


def test_subspace_directions_are_the_ones_the_statistics_use():
    """L linear, rank-2 subspace law: each coefficient is <g, z_d> of the law's own low-rank z_d (fd error ~0, signs
    agree); the reference stays the dense one, P + 1 = 49, for comparison."""
    from mozo.zo.directions import Law

    g = torch.Generator().manual_seed(1)
    p, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    stats = estimator_statistics([p], lambda: float((p.double() * b.double()).sum()), [b], eps=[1.0], q=[1], directions=64,
                                 seed=0, distribution=Law("gaussian", 2, 5))
    row = stats["by_eps"][0]
    assert row["loss_diff"]["fd_rel_error"] < 1e-5 and row["sign_agreement"] == 1.0
    assert stats["ideal_normalized_variance"] == 49.0


def test_cli_subspace_rank_is_recorded_and_refused_when_negative(tmp_path, capsys):
    out = tmp_path / "d.json"
    assert cli_main(["diagnose", "--backbone", "tiny", "--data", "random", "--batch", "2", "--directions", "2", "--q", "1",
                     "--eps", "1e-2", "--modalities", "vision", "--layers", "1", "--subspace-rank", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["estimator"]["subspace_rank"] == 2 and "rank-2 subspace" in capsys.readouterr().out
    assert cli_main(["diagnose", "--backbone", "tiny", "--data", "random", "--subspace-rank", "-1"]) == 2


def test_cli_parts_measure_only_the_named_parameters(tmp_path, capsys):
    out = tmp_path / "d.json"
    base = ["diagnose", "--backbone", "tiny", "--data", "random", "--batch", "2", "--directions", "2", "--q", "1",
            "--eps", "1e-2", "--modalities", "vision", "--layers", "1", "--json", str(out)]
    assert cli_main(base) == 0
    every = json.loads(out.read_text())["rows"][0]["params"]
    assert cli_main(base + ["--parts", "*.up.*"]) == 0
    rep = json.loads(out.read_text())
    from mozo.backbone.clip import load_backbone
    from mozo.peft.inject import MozoCLIP, PeftConfig
    unit = MozoCLIP(load_backbone("tiny", seed=0), PeftConfig()).unit("vision", 1)
    assert rep["estimator"]["parts"] == "*.up.*" and rep["rows"][0]["params"] == sum(
        p.numel() for n, p in unit.named_parameters() if ".up." in n) < every
    capsys.readouterr()
    assert cli_main(base + ["--parts", "router", "--warmup-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "matches no unit parameter" in err and "w_gate" in err and "warm" not in err.lower()


def test_cli_rejects_too_few_directions(tmp_path):
    assert cli_main(["diagnose", "--backbone", "tiny", "--data", "random", "--directions", "2", "--q", "1,4"]) == 2


def test_sweep_on_tiny_imagefolder(tmp_path):
    from mozo.diagnostics.sweep import format_table, sweep

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for k, c in enumerate(("red", "green", "blue", "yellow")):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((32, 32, 3), 60 * k, np.uint8)).save(d / f"{i}.png")
    extra = ["backbone=tiny", "protocol=cil", "data.dataset=imagefolder", "data.increment=2", "batch_size=4",
             "peft.moe.rank=8", "device=cpu"]
    res = sweep("demo", [1e-4], [1e-3], [1e-3], "dual:hop-odd", [0], extra, max_steps=1, out_dir=tmp_path / "runs",
                data_root=tmp_path / "data", log=lambda s: None)
    (row,) = res["settings"]
    assert (row["eps_vision"], row["eps_language"], row["lr"]) == (1e-4, 1e-3, 1e-3)
    assert 0 <= row["last"] <= 100 and 0 <= row["avg"] <= 100
    saved = json.loads((tmp_path / "runs" / "ev0.0001_el0.001_lr0.001_seed0" / "results.json").read_text())
    assert saved["config"]["zo"]["rule"] == "mozo" and saved["config"]["zo"]["eps_vision"] == 1e-4
    assert "eps_vision" in format_table(res)
    again = sweep("demo", [1e-4], [1e-3], [1e-3], "dual:hop-odd", [0], extra, max_steps=1, out_dir=tmp_path / "runs",
                  data_root=tmp_path / "data", log=lambda s: None)
    assert again["settings"][0]["seeds"][0]["reused"]


def test_joint_estimate_is_the_training_steps_estimate():
    """--block joint: one difference for all ZO units of a plan, per-tower epsilons, HybridStep's seeds."""
    from mozo.backbone.clip import load_backbone
    from mozo.diagnostics.measure import diagnose_joint, random_batches, warmup
    from mozo.peft.inject import MozoCLIP
    from mozo.backbone.towers import TOWER_STREAMS
    from mozo.zo.directions import perturb_
    from mozo.seeds import mix_seed

    torch.manual_seed(0)
    bb = load_backbone("tiny")
    model = MozoCLIP(bb, __import__("mozo").PeftConfig.of("moe", rank=8))
    batches = random_batches(bb, 2, 2, seed=1)
    warmup(model, batches[1:], 1)
    res = diagnose_joint(model, batches[0], "vision:4+language:2", [1e-3], [2e-3], q=[1], directions=2, seed=3)
    assert set(res["towers"]) == {"vision", "language"} and res["towers"]["vision"]["units"] == ["vision.4.moe"]
    pair = res["pairs"][0]
    params = {"vision": list(model.unit("vision", 4).parameters()), "language": list(model.unit("language", 2).parameters())}
    eps = {"vision": 1e-3, "language": 2e-3}
    b = batches[0]

    def full_loss() -> float:
        model.train()
        model.noise.seed = mix_seed(3, 17)
        with torch.no_grad():
            out = torch.nn.functional.cross_entropy(model.logits(model.encode_images(b.pixel_values), model.encode_texts(b.text_inputs)), b.labels)
        model.noise.seed = None
        return float(out)

    l0 = full_loss()
    for d in range(2):
        s = mix_seed(3, 99, d)
        saved = {m: [p.clone() for p in ps] for m, ps in params.items()}
        for m, ps in params.items():
            perturb_(ps, mix_seed(s, TOWER_STREAMS[m]), eps[m], "gaussian")
        diff = full_loss() - l0
        for m, ps in params.items():
            for p, v in zip(ps, saved[m]):
                p.data.copy_(v)
        for m in params:
            assert pair[m]["coefs"][d] == pytest.approx(diff / eps[m], rel=1e-3, abs=1e-4)


def test_sweep_records_a_failed_setting_and_goes_on(tmp_path, monkeypatch):
    import mozo.diagnostics.sweep as sw

    def fake_run(preset, overrides, out, data_root, cache):
        if "zo.lr=0.1" in overrides:
            raise FloatingPointError("non-finite loss")
        return {"summary": {"last": 50.0, "avg": 60.0}}

    monkeypatch.setattr(sw, "run_setting", fake_run)
    res = sw.sweep("demo", [1e-3], [1e-3], [1e-3, 0.1], "dual-zo", [0, 1], out_dir=tmp_path, log=lambda s: None)
    ok, bad = res["settings"]
    assert ok["avg"] == 60.0 and ok["avg_std"] == 0.0 and bad["avg"] is None and len(bad["failed"]) == 2
    assert res["best"]["lr"] == 1e-3 and "failed: FloatingPointError" in sw.format_table(res)


@pytest.mark.parametrize("plan,per_tower,two_sided,rank", [("dual:hop-odd", False, False, 0), ("dual-zo", True, True, 0),
                                                            ("vision-zo", False, True, 0), ("dual:hop-odd", False, False, 2)])
def test_step_and_diagnostics_form_the_same_estimate(make_model, batch, plan, per_tower, two_sided, rank):
    """One estimator: the diagnostics' plan_estimate, given the step's direction seeds and noise seed,
    returns the coefficients the training step recorded, bit for bit (default units: dropout and router noise on)."""
    from conftest import randomize_units
    from mozo.diagnostics.measure import Batch, plan_estimate

    pixels, labels, text = batch
    model = make_model()
    randomize_units(model, std=0.1)
    zo = mozo.ZOConfig(rule="sgd", lr=0.0, q=2, two_sided=two_sided, granularity="tower" if per_tower else "joint", subspace_rank=rank)
    step = mozo.HybridStep(model, plan, zo, seed=7)
    noise_seed = step.noise_seed(0)
    theta = {k: v.clone() for k, v in model.units.state_dict().items()}
    record = step(pixels, labels, text).zo
    model.units.load_state_dict(theta)  # undoing a perturbation by subtraction leaves fp32 rounding behind
    eps = {m: zo.eps(m) for m in ("vision", "language")}
    _, coefs, _ = plan_estimate(model, Batch(pixels, labels, text, [], "random"), plan, eps, record.seeds, noise_seed,
                                distribution=record.distribution, two_sided=two_sided, blocks="group" if per_tower else "joint")
    assert set(coefs) == set(record.coefs) and all(len(c) == 2 for c in coefs.values())
    for m in coefs:
        assert coefs[m] == record.coefs[m]  # bit for bit
        assert any(c != 0.0 for c in coefs[m])
