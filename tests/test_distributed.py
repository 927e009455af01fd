"""Data-parallel hybrid training: 2 processes with gloo on CPU against 1 process (issue 7, docs/distributed.md).

One `torchrun --standalone --nproc_per_node 2` job runs this file as a worker (`_worker` below) and does
everything in a row, because every process pays for importing torch and transformers (seconds each on a
loaded 2-core machine). Each rank holds its half of every global batch. Phases of the worker:
0. `run_experiment` (vision-zo) on a tiny CIFAR-100 layout, interrupted by rank 0 alone, as a Ctrl-C
   seen by one rank: rank 1 must stop at the same step.
1. One-process work shared by the ranks, with no collective: rank 0 runs `HybridStep` on global batches
   (the references) and resumes a copy of the 2-rank checkpoint alone; rank 1 runs `run_experiment`
   with world_size 1 (the reference run).
2. `HybridStep` for fo, vision-zo and dual-zo: N steps of global batch B, B/2 per rank; all unit
   parameters all-gathered and compared bitwise after every step; a NaN on one rank only; the
   MOZO_CHECK_ZO_SYNC checksum (the variable is set for the whole job, so the runs check every step too).
3. The interrupted run resumed on both ranks.
4. `mozo run` (what `torchrun -m mozo run` and the console script call) with the reference run's config.
zo.rank_directions (each rank its own q = 2 directions, the 2 x 2 loss differences all-gathered): phase 1 also
rebuilds the 2-rank update on one process (`_rank_directions_reference`), phase 2 runs it for dual-zo and
vision-zo with a NaN on one rank, a run without the exact restore (which diverges) and a `run_experiment`
with MOZO_CHECK_ZO_SYNC.

Tolerance against one process: 1e-5 absolute on parameters and losses. The mean loss of B samples and the
mean of two B/2-sample means are equal in exact arithmetic but sum floats in a different order (~1e-7
relative). A ZO coefficient divides a loss difference by eps=1e-3, so it carries ~3e-4 of rounding, times
the ZO lr (1e-4) and |z| < 5: ~1e-7 per step. AdamW's first FO updates are close to lr * sign(g) and
amplify the rounding of gradient components near its eps=1e-8: measured, at most 1.3e-6 after 3 steps
(fo, vision-zo) and 1.3e-7 (dual-zo). Between ranks there is no tolerance: bitwise equal.

Noise: dropout masks and router noise are drawn per batch tensor, so the masks of two B/2 shards cannot
equal those of one B batch (and ranks draw independent streams). The equality tests therefore use
PeftConfig.of("moe", dropout=0.0, noisy_gating=False); with noise on, runs agree in distribution, not in value.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

WORLD = 2
B, N_STEPS, N_CLASSES = 8, 3, 5
# "/per-tower": zo.granularity=tower; "/guided": zo.guide_weight=1 (the guide from the all-reduced FO gradients)
PLANS = ("fo", "vision-zo", "dual-zo", "dual-zo/per-tower", "dual:hop-odd/guided")
ATOL = 1e-5
RD_PLANS = ("dual-zo/rank-directions", "vision-zo/rank-directions")  # zo.rank_directions=true, q=RD_Q per rank
RD_Q = 2
# The one-process rebuild of the rank_directions update evaluates the same B/2 shards along the same seeds and
# applies the same SGD update (a replay of the record), so only the forward path differs: a full forward
# there, a forward from the prefix cache at layer 1 in the step. Measured: bitwise equal (0.0). 1e-7 allows one
# ulp of a loss (~2e-7 at loss ~1.6) / eps 1e-3 = 2e-4 in a coefficient, x lr 1e-4 x |z| < 5 / 4 directions,
# x 3 steps: ~8e-8; the units move by 7.8e-6 in those steps, so a wrong shard or seed is far outside it.
ATOL_RD = 1e-7
# vision-zo: FO gradients of the language tower and ZO scalars in the same step; no noise (see above).
RUN_ARGS = ["backbone=tiny", "batch_size=4", "num_tasks=2", "plan=vision-zo", "device=cpu", "peft.moe.rank=8",
            "peft.moe.dropout=0.0", "peft.moe.noisy_gating=false", "data.eval_batch_size=8", "train.warmup_iters=2"]
STEPS_PER_RUN = 10  # 2 tasks x 20 training images / global batch 4
CUT_AFTER = 3


# ------------------------------------------------------------------------------------------ shared parts
def _make_cifar100(root: Path, n_train: int = 2, n_test: int = 2) -> Path:
    """cifar-100-python with random pixels: every image differs, so a wrong shard changes the result."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, per_class in (("train", n_train), ("test", n_test)):
        labels = [c for c in range(100) for _ in range(per_class)]
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        with open(base / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{c:02d}" for c in range(100)], "coarse_label_names": ["x"] * 20}, f)
    return root


def _model():
    from mozo import MozoCLIP, PeftConfig, load_backbone

    bb = load_backbone("tiny", seed=0)
    torch.manual_seed(0)
    return bb, MozoCLIP(bb, PeftConfig.of("moe", rank=8, dropout=0.0, noisy_gating=False))


def _step(model, plan: str, dist_ctx=None):
    from mozo import HybridStep, ZOConfig

    kw = dict(reduce_scalars=dist_ctx.reduce_mean, reduce_grads=dist_ctx.reduce_grads, gather_scalars=dist_ctx.gather,
              world_size=dist_ctx.world_size) if dist_ctx else {}
    plan, _, option = plan.partition("/")
    rd = option == "rank-directions"
    zo = ZOConfig(rule="sgd", lr=1e-4, granularity="tower" if option == "per-tower" else "joint", rank_directions=rd, q=RD_Q if rd else 1,
                  guide_weight=1.0 if option == "guided" else 0.0)
    return HybridStep(model, plan, zo, fo_lr=1e-3, seed=7, **kw)


def _batches(bb):
    text = bb.tokenize([f"a bad photo of a {w}." for w in ("one", "two", "three", "four", "five")])
    for k in range(N_STEPS):
        g = torch.Generator().manual_seed(100 + k)
        yield torch.randn(B, 3, bb.image_size, bb.image_size, generator=g), torch.randint(0, N_CLASSES, (B,), generator=g), text


def _n_with_grad(model, step) -> int:
    """FO parameters that receive a gradient: all but the router's noise weights (noisy_gating=False)."""
    fo = {id(p) for p in step.fo_params}
    return sum(p.numel() for n, p in model.units.named_parameters() if id(p) in fo and "w_noise" not in n)


def _units(model) -> dict:
    return {k: v.detach().clone() for k, v in model.units.state_dict().items()}


def _rank_directions_reference(plan: str = "dual-zo") -> dict:
    """The 2-rank zo.rank_directions steps rebuilt on one process: for each rank r, the loss differences of
    r's shard along r's own seeds (mix_seed(seed, step, d + 1), and mix_seed(seed, step, d + 1, r) for r > 0),
    then one SGD update over all 2 x RD_Q directions (the mean of c z), applied as a replay of the record."""
    from mozo.seeds import mix_seed
    from mozo.zo.rules import ZORecord, replay

    bb, model = _model()
    step = _step(model, plan)  # for its estimator, loss and ZO groups only: step() is never called
    zo = [p for m in step.zo_towers for p in step.zo_params[m]]
    model.train()
    start = _units(model)

    @torch.no_grad()
    def loss(pixels, labels, text):
        return step._loss({"vision": model.encode("vision", {"pixel_values": pixels})[0],
                           "language": model.encode("language", text)[0]}, labels)

    records, losses = [], []
    for k, (pixels, labels, text) in enumerate(_batches(bb)):
        seeds, diffs, shard_losses = [], [], []
        for r in range(WORLD):
            sl = slice(r * B // WORLD, (r + 1) * B // WORLD)
            base = loss(pixels[sl], labels[sl], text)
            shard_losses.append(float(base))
            for d in range(RD_Q):
                seed = mix_seed(7, k, d + 1) if r == 0 else mix_seed(7, k, d + 1, r)
                saved = [p.detach().clone() for p in zo]
                step.estimator.perturb(seed, +1.0, step.zo_towers)
                diffs.append(float(loss(pixels[sl], labels[sl], text) - base))
                step.estimator.perturb(seed, -1.0, step.zo_towers)
                with torch.no_grad():
                    for p, s0 in zip(zo, saved):
                        p.copy_(s0)
                seeds.append(seed)
        record = ZORecord(k, seeds, {m: [x / step.zo.eps(m) for x in diffs] for m in step.zo_towers}, step.zo.lr, "sgd", "gaussian")
        replay(step.estimator, [record])
        records.append(dict(seeds=record.seeds, coefs=record.coefs))
        losses.append(sum(shard_losses) / WORLD)
    return dict(units=_units(model), records=records, losses=losses, start=start)


# ------------------------------------------------------------------------------------------ the worker
def _all_equal(tensors: list[torch.Tensor]) -> bool:
    """Bitwise equality of these tensors on every rank (all-gathers them: tests only)."""
    import torch.distributed as dist

    if not tensors:
        return True
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return all(torch.equal(out[0], o) for o in out[1:])



def _poison(step, on: bool) -> dict:
    """Make the step's loss NaN while the returned flag's "on" is true (the caller turns it off)."""
    real, flag = step._loss, {"on": on}
    step._loss = lambda f, y: real(f, y) * float("nan") if flag["on"] else real(f, y)
    return flag


def _raised(step, pixels, labels, text):
    """The NonFiniteLossError message the step raised, or False."""
    from mozo.engine.step import NonFiniteLossError

    try:
        step(pixels, labels, text)
        return False
    except NonFiniteLossError as exc:
        return str(exc)

def _worker(out: Path, data_root: Path) -> None:
    from mozo.cli import main as cli
    from mozo.engine.config import load_config
    from mozo.engine.distributed import init_distributed
    from mozo.engine.loop import RunInterrupted, run_experiment

    t0 = time.perf_counter()
    ctx = init_distributed("auto", "cpu")
    log = lambda what: print(f"[rank {ctx.rank}] {what} at {time.perf_counter() - t0:.1f}s", flush=True)  # noqa: E731
    r, w = ctx.rank, ctx.world_size
    assert w == WORLD and ctx.backend == "gloo"
    rep: dict = {"steps": {}}
    lo, hi = r * B // w, (r + 1) * B // w
    cfg = load_config("cifar100-10-10", RUN_ARGS)

    # 0. The task loop on 2 ranks, interrupted by rank 0 alone (rank 1 must stop at the same step).
    try:
        run_experiment(cfg, out / "cut", data_root=data_root, progress=False, dist=ctx,
                       on_step=(lambda rn: rn.request_stop() if rn.state.steps >= CUT_AFTER else None) if r == 0 else None)
        rep["interrupted"] = False
    except RunInterrupted:
        rep["interrupted"] = True
    log("cut done")

    # 1. One-process work, the ranks sharing it (no collectives): references, and the 2-rank checkpoint
    # resumed by one process.
    if r == 0:
        ref = {}
        for plan in PLANS:
            bb, model = _model()
            step = _step(model, plan)
            losses = [step(p, y, t).loss for p, y, t in _batches(bb)]
            ref[plan] = dict(units=_units(model), losses=losses)
        ref["rank-directions"] = _rank_directions_reference()
        torch.save(ref, out / "ref_steps.pt")
        shutil.copytree(out / "cut", out / "cut_on_one")
        run_experiment(cfg, out / "cut_on_one", data_root=data_root, progress=False, resume=True)
    else:
        run_experiment(cfg, out / "one", data_root=data_root, progress=False)
    ctx.barrier()
    log("one-process work done")

    # 2. HybridStep: this rank's shard of every global batch.
    for plan in PLANS + RD_PLANS:
        bb, model = _model()
        step = _step(model, plan, ctx)
        step.noise_rank = r
        zo = [p for m in step.zo_towers for p in step.zo_params[m]]
        before = dict(ctx.payload_bytes)
        losses, zo_equal, fo_equal, seeds_equal, records = [], [], [], [], []
        for pixels, labels, text in _batches(bb):
            stats = step(pixels[lo:hi], labels[lo:hi], text)
            losses.append(stats.loss)
            records.append(dict(seeds=stats.zo.seeds, coefs=stats.zo.coefs) if stats.zo else None)
            zo_equal.append(_all_equal(zo))
            fo_equal.append(_all_equal(step.fo_params))
            seeds_equal.append(_all_equal([torch.tensor(stats.zo.seeds if stats.zo else [0], dtype=torch.int64)]))
        comm = {k: (v - before.get(k, 0)) / N_STEPS for k, v in ctx.payload_bytes.items() if v != before.get(k, 0)}
        rep["steps"][plan] = dict(units=_units(model), losses=losses, zo_equal=zo_equal, fo_equal=fo_equal,
                                  seeds_equal=seeds_equal, comm=comm, n_fo=_n_with_grad(model, step), records=records)

    log("steps done")
    # A NaN on rank 1 only: every rank raises at the same point (no rank left waiting in a collective),
    # nothing moves, and the next step runs in lockstep again.
    bb, model = _model()
    step = _step(model, "vision-zo", ctx)
    poisoned = _poison(step, r == 1)
    pixels, labels, text = next(_batches(bb))
    start = _units(model)
    rep["nan_raised"] = _raised(step, pixels[lo:hi], labels[lo:hi], text)
    # ZO units were perturbed and restored in place (theta + eps z - eps z: rounding), alike on every rank
    rep["nan_equal"] = _all_equal(list(model.units.parameters()))
    rep["nan_moved"] = max(float((v - _units(model)[k]).abs().max()) for k, v in start.items())
    poisoned["on"] = False
    step(pixels[lo:hi], labels[lo:hi], text)
    rep["after_nan_equal"] = _all_equal(list(model.units.parameters()))

    # The MOZO_CHECK_ZO_SYNC checksum: silent when equal, raises on every rank on a one-ulp difference.
    named = list(model.units.named_parameters())
    ctx.check_synced(named, "identical")
    with torch.no_grad():
        if r == 1:
            named[3][1].view(-1)[0] = torch.nextafter(named[3][1].view(-1)[0], torch.tensor(1.0))
    try:
        ctx.check_synced(named, "test")
        rep["sync_raised"] = False
    except RuntimeError as exc:
        rep["sync_raised"] = str(exc)

    # zo.rank_directions: a NaN on rank 1 only raises on both ranks, each rank restored from its own copy.
    bb, model = _model()
    step = _step(model, "vision-zo/rank-directions", ctx)
    step.noise_rank = r
    poisoned = _poison(step, r == 1)
    start = _units(model)
    rep["rd_nan_raised"] = _raised(step, pixels[lo:hi], labels[lo:hi], text)
    rep["rd_nan_equal"] = _all_equal(list(model.units.parameters()))
    rep["rd_nan_unchanged"] = all(torch.equal(v, _units(model)[k]) for k, v in start.items())
    poisoned["on"] = False
    step(pixels[lo:hi], labels[lo:hi], text)
    rep["rd_after_nan_equal"] = _all_equal(list(model.units.parameters()))
    # Without the restore from the copy (undone by subtraction only), the replicas drift apart.
    bb, model = _model()
    step = _step(model, "dual-zo/rank-directions", ctx)
    step.noise_rank = r
    step._restore_saved = lambda: setattr(step, "_saved", None)
    rep["rd_no_restore_equal"] = []
    for pixels_k, labels_k, text_k in _batches(bb):
        step(pixels_k[lo:hi], labels_k[lo:hi], text_k)
        rep["rd_no_restore_equal"].append(_all_equal(list(model.units.parameters())))
    # The task loop with zo.rank_directions, MOZO_CHECK_ZO_SYNC=1 (set for the job): checksums after every step.
    debug_before = ctx.payload_bytes.get("debug", 0)
    rd_cfg = load_config("cifar100-10-10", [*RUN_ARGS, "plan=dual-zo", "num_tasks=1", "zo.rank_directions=true", f"zo.q={RD_Q}"])
    rep["rd_run"] = run_experiment(rd_cfg, out / "rd", data_root=data_root, progress=False, dist=ctx)
    rep["rd_run_debug_bytes"] = ctx.payload_bytes.get("debug", 0) - debug_before

    log("checks done")
    # 3. The interrupted run resumed on both ranks.
    rep["resumed"] = run_experiment(cfg, out / "cut", data_root=data_root, progress=False, dist=ctx, resume=True)

    log("resume done")
    # 4. The CLI entry point (last: it shuts the process group down).
    rep["cli_rc"] = cli(["run", "cifar100-10-10", *RUN_ARGS, "--data-root", str(data_root), "--out", str(out / "full"), "--no-progress"])
    log("cli done")
    torch.save(rep, out / f"rank{r}.pt")


# ------------------------------------------------------------------------------------------ pytest side
@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run the 2-process job (it also computes the 1-process references) and load what it saved."""
    tmp = tmp_path_factory.mktemp("dist")
    data = _make_cifar100(tmp / "data")
    out = tmp / "out"
    out.mkdir()
    env = {**os.environ, "MOZO_CHECK_ZO_SYNC": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           __file__, "worker", str(out), str(data)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=400)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    assert proc.returncode == 0, log[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ref = {"steps": torch.load(out / "ref_steps.pt"), "results": json.loads((out / "one" / "results.json").read_text())}
    return dict(ref=ref, ranks=ranks, out=out, one=out / "one", log=log)


@pytest.mark.parametrize("plan", PLANS)
def test_two_ranks_with_half_batches_match_one_process(job, plan):
    ref, ranks = job["ref"]["steps"][plan], [rk["steps"][plan] for rk in job["ranks"]]
    for k, v in ref["units"].items():
        assert torch.allclose(ranks[0]["units"][k], v, rtol=0, atol=ATOL), (plan, k, (ranks[0]["units"][k] - v).abs().max())
        assert torch.equal(ranks[0]["units"][k], ranks[1]["units"][k]), (plan, k)
    assert ref["units"]["vision_1.experts.0.up.weight"].abs().max() > 0  # the parameters did move
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the all-reduced global loss
    assert ranks[0]["losses"] == pytest.approx(ref["losses"], abs=ATOL)


@pytest.mark.parametrize("plan", PLANS)
def test_parameters_bitwise_equal_across_ranks_after_every_step(job, plan):
    for rk in job["ranks"]:
        s = rk["steps"][plan]
        assert s["zo_equal"] == [True] * N_STEPS and s["fo_equal"] == [True] * N_STEPS
        assert s["seeds_equal"] == [True] * N_STEPS  # the same ZO direction seeds on every rank


def test_only_scalars_travel_for_zo_and_gradients_for_fo(job):
    s = job["ranks"][0]["steps"]
    n_unit = s["fo"]["n_fo"]  # all units FO
    assert s["fo"]["comm"] == {"scalars": 4.0, "fo_grads": 4.0 * n_unit}  # the loss, the flat gradient
    assert s["dual-zo"]["comm"] == {"scalars": 8.0}  # q=1 loss difference + the loss: 8 bytes a step
    assert s["vision-zo"]["comm"] == {"scalars": 8.0, "fo_grads": 4.0 * s["vision-zo"]["n_fo"]}
    assert s["vision-zo"]["n_fo"] * 2 == n_unit  # the language tower holds half of the units


def test_nan_on_one_rank_raises_on_all_and_sync_check_catches_divergence(job):
    for rk in job["ranks"]:
        assert rk["nan_raised"] and "non-finite" in rk["nan_raised"] and rk["nan_moved"] < 1e-6
        assert rk["nan_equal"] and rk["after_nan_equal"]
        assert rk["sync_raised"] and "vs rank 0" in rk["sync_raised"]
    assert "first forward" in job["ranks"][1]["nan_raised"] and "another rank" in job["ranks"][0]["nan_raised"]


@pytest.mark.parametrize("plan", RD_PLANS)
def test_rank_directions_keep_ranks_bitwise_equal(job, plan):
    from mozo.seeds import mix_seed

    s0, s1 = (rk["steps"][plan] for rk in job["ranks"])
    for s in (s0, s1):
        assert s["zo_equal"] == s["fo_equal"] == s["seeds_equal"] == [True] * N_STEPS
    assert all(torch.equal(s0["units"][k], s1["units"][k]) for k in s0["units"]) and s0["losses"] == s1["losses"]
    for k, rec in enumerate(s0["records"]):  # all 2 x RD_Q directions, rank 0's first: the one-process seeds
        assert rec["seeds"] == [mix_seed(7, k, d + 1) for d in range(RD_Q)] + [mix_seed(7, k, d + 1, 1) for d in range(RD_Q)]
        assert all(len(c) == WORLD * RD_Q for c in rec["coefs"].values())
        assert rec == s1["records"][k]


def test_rank_directions_update_equals_the_one_process_rebuild(job):
    """dual-zo, 2 ranks x RD_Q directions: the units equal the one-process rebuild (each shard's differences along
    its rank's seeds, one SGD update over all 2 x RD_Q) within ATOL_RD, and differ from the averaged default."""
    ref, got = job["ref"]["steps"]["rank-directions"], job["ranks"][0]["steps"]["dual-zo/rank-directions"]
    for a, b in zip(ref["records"], got["records"]):
        assert a["seeds"] == b["seeds"]
        for m in a["coefs"]:
            assert b["coefs"][m] == pytest.approx(a["coefs"][m], rel=1e-5, abs=1e-3)  # 1e-3: one loss ulp / eps
    fresh = ref["start"]
    moved = max(float((v - fresh[k]).abs().max()) for k, v in ref["units"].items())  # 7.8e-6 over the 3 steps
    worst = max(float((got["units"][k] - v).abs().max()) for k, v in ref["units"].items())  # measured: 0.0
    assert worst <= ATOL_RD < moved / 50, (worst, moved)
    assert got["losses"] == pytest.approx(ref["losses"], abs=1e-6)
    default = job["ref"]["steps"]["dual-zo"]["units"]  # q = 1, the same seeds on both ranks: another estimate
    assert any(not torch.allclose(got["units"][k], v, rtol=0, atol=ATOL) for k, v in default.items())


def test_rank_directions_gather_the_differences(job):
    s = job["ranks"][0]["steps"]
    per_step = 4.0 * WORLD * (RD_Q + 1)  # every rank's RD_Q differences and its loss, gathered: 24 bytes
    assert s["dual-zo/rank-directions"]["comm"] == {"scalars": per_step}
    assert s["vision-zo/rank-directions"]["comm"] == {"scalars": per_step, "fo_grads": 4.0 * s["vision-zo"]["n_fo"]}
    res = job["ranks"][0]["rd_run"]  # the task loop under MOZO_CHECK_ZO_SYNC=1: it checked, and found nothing
    assert res["config"]["zo"]["rank_directions"] is True and job["ranks"][0]["rd_run_debug_bytes"] > 0
    assert res["cost"]["comm_payload_bytes_per_step"]["scalars"] == per_step
    assert job["ranks"][0]["rd_run"]["acc_matrix"] == job["ranks"][1]["rd_run"]["acc_matrix"]


def test_rank_directions_nan_on_one_rank_and_the_exact_restore(job):
    for rk in job["ranks"]:
        assert rk["rd_nan_raised"] and "non-finite" in rk["rd_nan_raised"]
        assert rk["rd_nan_equal"] and rk["rd_nan_unchanged"] and rk["rd_after_nan_equal"]  # restored from the copy: exactly
        assert False in rk["rd_no_restore_equal"]  # undone by subtraction along per-rank directions: replicas differ
    assert "first forward" in job["ranks"][1]["rd_nan_raised"] and "another rank" in job["ranks"][0]["rd_nan_raised"]


def _checkpoint_units(run_dir: Path) -> dict:
    from mozo.engine.checkpoint import load_checkpoint

    return load_checkpoint(run_dir)[0]


def test_distributed_run_results_match_one_process(job):
    one = job["ref"]["results"]
    two = json.loads((job["out"] / "full" / "results.json").read_text())
    assert [rk["cli_rc"] for rk in job["ranks"]] == [0, 0]
    assert two["cost"]["world_size"] == 2 and one["cost"]["world_size"] == 1 and two["cost"]["steps"] == STEPS_PER_RUN
    assert two["task_test_sizes"] == one["task_test_sizes"] == [20, 20]
    # accuracies agree exactly unless a test image's top two logits tie within the 1e-5 parameter tolerance:
    # allow one test sample (5 points of 20) anywhere.
    diffs = [abs(a - b) for ra, rb in zip(one["acc_matrix"], two["acc_matrix"]) for a, b in zip(ra, rb) if a is not None or b is not None]
    assert max(diffs) <= 100 / 20 + 1e-9 and sum(d > 0 for d in diffs) <= 1, (one["acc_matrix"], two["acc_matrix"])
    a, b = _checkpoint_units(job["one"]), _checkpoint_units(job["out"] / "full")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=ATOL) for k in a)
    assert two["config"] == one["config"]


def test_comm_volume_in_cost_section(job):
    one = job["ref"]["results"]["cost"]
    two = json.loads((job["out"] / "full" / "results.json").read_text())["cost"]
    n_w_noise = 4 * 64 * 2  # language units x width x experts: the router noise weights get no gradient here
    n_fo = two["trainable_params"]["by_part"]["language.fo"] - n_w_noise
    per_step = {"fo_grads": 4.0 * n_fo, "scalars": 8.0, "control": 4.0}
    assert two["comm_payload_bytes_per_step"] == per_step == one["comm_payload_bytes_per_step"]
    assert two["comm_bytes_per_step"] == sum(per_step.values()) and one["comm_bytes_per_step"] == 0.0
    # per evaluated test set: (correct, total) in float64 and the stop flag
    assert two["comm_eval_bytes"] == one["comm_eval_bytes"] == (16 + 4) * 3
    assert two["comm_backend"] == "gloo"


def test_distributed_resume_ends_where_the_uninterrupted_run_ends(job):
    full = json.loads((job["out"] / "full" / "results.json").read_text())
    for rk in job["ranks"]:
        assert rk["interrupted"]  # rank 1 stopped too, at rank 0's step
        assert rk["resumed"]["acc_matrix"] == full["acc_matrix"]
    cut = job["out"] / "cut"
    res = json.loads((cut / "results.json").read_text())
    assert res["acc_matrix"] == full["acc_matrix"] and res["cost"]["steps"] == STEPS_PER_RUN
    # the resumed process ran 7 steps; per-step volume is per step of this process, as in the full run
    assert res["cost"]["comm_payload_bytes_per_step"] == full["cost"]["comm_payload_bytes_per_step"]
    a, b = _checkpoint_units(cut), _checkpoint_units(job["out"] / "full")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_rank_checkpoint_resumes_on_one_process(job):
    """The checkpoint holds nothing per rank (data order, seeds and counters are global): N may change."""
    one = job["ref"]["results"]
    res = json.loads((job["out"] / "cut_on_one" / "results.json").read_text())
    assert res["cost"]["steps"] == STEPS_PER_RUN and res["cost"]["world_size"] == 1
    diffs = [abs(a - b) for ra, rb in zip(one["acc_matrix"], res["acc_matrix"]) for a, b in zip(ra, rb) if a is not None]
    assert max(diffs) <= 100 / 20 + 1e-9 and sum(d > 0 for d in diffs) <= 1
    a, b = _checkpoint_units(job["one"]), _checkpoint_units(job["out"] / "cut_on_one")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=ATOL) for k in a)


def test_only_rank_zero_writes(job):
    from mozo.engine.logs import tensorboard_installed

    for name, starts in (("full", 1), ("cut", 2)):
        run = job["out"] / name
        assert sorted(p.name for p in run.iterdir() if p.name != "tb") == ["checkpoint", "checkpoint.old", "config.json", "events.jsonl",
                                                                              "results.json", "run.json"]  # no .lock left behind
        # TensorBoard mirror (when installed): one event file per start of rank 0, none from rank 1
        assert len(list((run / "tb").glob("events.out.tfevents.*"))) == (starts if tensorboard_installed() else 0)
        events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        kinds = [e["event"] for e in events]
        assert kinds.count("start") == starts and kinds.count("done") == 1
        assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 6)) * 2  # one line per step, not two
    assert job["log"].count("results: ") == 1  # the CLI summary is printed by rank 0 only


# ------------------------------------------------------------------------------------------ no processes
def test_backend_choice_and_override_are_checked(monkeypatch):
    from mozo.engine.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; both errors come before joining any group
    with pytest.raises(ValueError, match="distributed_backend must be one of"):
        init_distributed("glooo", "cpu")
    with pytest.raises(ValueError, match="distributed_backend=gloo"):
        init_distributed("nccl", "cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("nccl", "cpu").backend == "none"  # one process: no group, nothing to choose


def test_one_process_context_counts_what_ranks_would_send():
    from mozo.engine.distributed import DistContext

    ctx = DistContext()
    grads = [torch.ones(3, 4), torch.ones(5)]
    ctx.reduce_grads(grads)
    assert torch.equal(ctx.reduce_mean(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))
    ctx.reduce_sum(torch.zeros(2, dtype=torch.float64))
    assert ctx.any(True) and not ctx.any(False)
    assert ctx.payload_bytes == {"fo_grads": 68, "scalars": 8, "eval": 16, "control": 8}
    assert ctx.bytes_communicated == 0 and torch.equal(grads[1], torch.ones(5))
    ctx.check_synced([("w", torch.ones(2))])  # one process: nothing to compare


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(Path(sys.argv[2]), Path(sys.argv[3]))
