"""Data-parallel hybrid training: 2 processes with gloo on CPU against 1 process (issue 7, docs/distributed.md).

One `torchrun --standalone --nproc_per_node 2` job runs this file as a worker (`_worker` below), because
every process pays for importing torch and transformers: the job does all the distributed phases in a
row while the pytest process computes the one-process references next to it.

Phases of the worker (each rank holds its half of every global batch):
1. `HybridStep` for fo, vision-zo and dual-zo: N steps of global batch B (B/2 per rank), ZO parameters
   all-gathered and compared bitwise after every step; a NaN on one rank only; the MOZO_CHECK_ZO_SYNC checksum.
2. `run_experiment` on a tiny CIFAR-100 layout, interrupted by rank 0 alone (as a Ctrl-C seen by one
   rank), then resumed distributed (MOZO_CHECK_ZO_SYNC=1 is set for the whole job).
3. `mozo run` (the CLI entry that `torchrun -m mozo run` and the console script call) on the same config.

Tolerance against one process: 1e-5 absolute on parameters and losses. The mean loss of B samples and the
mean of two B/2-sample means are equal in exact arithmetic but sum floats in a different order (relative
error ~1e-7 per loss); a ZO coefficient divides a loss difference by eps=1e-3, so it carries ~3e-4 of that
rounding, times the ZO lr (1e-4) and |z| < 5: ~1e-7 per step; AdamW's FO update is lr * m / (sqrt(v) + 1e-8),
insensitive to 1e-7 relative changes of g. Between ranks there is no tolerance: bitwise equal.

Noise: dropout masks and router noise are drawn per batch tensor, so the masks of two B/2 shards cannot
equal those of one B batch (and ranks draw independent streams). The equality tests therefore use
PeftConfig(dropout=0.0, noisy_gating=False); with noise on, runs agree in distribution, not in value.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

WORLD = 2
B, N_STEPS, N_CLASSES = 8, 3, 5
PLANS = ("fo", "vision-zo", "dual-zo")
ATOL = 1e-5
# vision-zo: FO gradients of the language tower and ZO scalars in the same step; no noise (see above).
RUN_ARGS = ["backbone=tiny", "batch_size=4", "num_tasks=2", "plan=vision-zo", "device=cpu", "peft.rank=8",
            "peft.dropout=0.0", "peft.noisy_gating=false", "data.eval_batch_size=8", "train.warmup_iters=2"]
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
    return bb, MozoCLIP(bb, PeftConfig(kind="moe", rank=8, dropout=0.0, noisy_gating=False))


def _step(model, plan: str, dist_ctx=None):
    from mozo import HybridStep, ZOConfig

    kw = dict(reduce_scalars=dist_ctx.reduce_mean, reduce_grads=dist_ctx.reduce_grads) if dist_ctx else {}
    return HybridStep(model, plan, ZOConfig(rule="sgd", lr=1e-4), fo_lr=1e-3, seed=7, **kw)


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


def _worker(out: Path, data_root: Path) -> None:
    from mozo.cli import main as cli
    from mozo.engine.config import load_config
    from mozo.engine.distributed import init_distributed
    from mozo.engine.loop import RunInterrupted, run_experiment
    from mozo.engine.step import NonFiniteLossError

    ctx = init_distributed("auto", "cpu")
    r, w = ctx.rank, ctx.world_size
    assert w == WORLD and ctx.backend == "gloo"
    rep: dict = {"steps": {}}
    lo, hi = r * B // w, (r + 1) * B // w

    # 1. HybridStep: this rank's shard of every global batch.
    for plan in PLANS:
        bb, model = _model()
        step = _step(model, plan, ctx)
        step.noise_rank = r
        zo = [p for m in step.zo_towers for p in step.zo_params[m]]
        before = dict(ctx.payload_bytes)
        losses, zo_equal, fo_equal, seeds_equal = [], [], [], []
        for pixels, labels, text in _batches(bb):
            stats = step(pixels[lo:hi], labels[lo:hi], text)
            losses.append(stats.loss)
            zo_equal.append(_all_equal(zo))
            fo_equal.append(_all_equal(step.fo_params))
            seeds_equal.append(_all_equal([torch.tensor(stats.zo.seeds if stats.zo else [0], dtype=torch.int64)]))
        comm = {k: (v - before.get(k, 0)) / N_STEPS for k, v in ctx.payload_bytes.items() if v != before.get(k, 0)}
        rep["steps"][plan] = dict(units=_units(model), losses=losses, zo_equal=zo_equal, fo_equal=fo_equal,
                                  seeds_equal=seeds_equal, comm=comm, n_fo=_n_with_grad(model, step))

    # A NaN on rank 1 only: every rank raises at the same point (no rank left waiting in a collective),
    # nothing moves, and the next step runs in lockstep again.
    bb, model = _model()
    step = _step(model, "vision-zo", ctx)
    real = step._loss
    poisoned = {"on": r == 1}
    step._loss = lambda f, y: real(f, y) * float("nan") if poisoned["on"] else real(f, y)
    pixels, labels, text = next(_batches(bb))
    start = _units(model)
    try:
        step(pixels[lo:hi], labels[lo:hi], text)
        rep["nan_raised"] = False
    except NonFiniteLossError as exc:
        rep["nan_raised"] = str(exc)
    # ZO units were perturbed and restored in place (theta + eps z - eps z: rounding), alike on every rank
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

    # 2. The task loop: interrupted by rank 0 alone, resumed on both ranks.
    cfg = load_config("cifar100-10-10", RUN_ARGS)
    try:
        run_experiment(cfg, out / "cut", data_root=data_root, progress=False, dist=ctx,
                       interrupt_after_steps=CUT_AFTER if r == 0 else None)
        rep["interrupted"] = False
    except RunInterrupted:
        rep["interrupted"] = True
    rep["resumed"] = run_experiment(cfg, out / "cut", data_root=data_root, progress=False, dist=ctx, resume=True)

    # 3. The CLI entry point (last: it shuts the process group down).
    rep["cli_rc"] = cli(["run", "cifar100-10-10", *RUN_ARGS, "--data-root", str(data_root), "--out", str(out / "full"), "--no-progress"])
    torch.save(rep, out / f"rank{r}.pt")


# ------------------------------------------------------------------------------------------ pytest side
@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Start the 2-process job, compute the 1-process references meanwhile, then wait for the job."""
    from mozo.engine.config import load_config
    from mozo.engine.loop import run_experiment

    tmp = tmp_path_factory.mktemp("dist")
    data = _make_cifar100(tmp / "data")
    out = tmp / "out"
    out.mkdir()
    env = {**os.environ, "MOZO_CHECK_ZO_SYNC": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           __file__, "worker", str(out), str(data)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        ref: dict = {"steps": {}}
        for plan in PLANS:
            bb, model = _model()
            step = _step(model, plan)
            losses = [step(p, y, t).loss for p, y, t in _batches(bb)]
            ref["steps"][plan] = dict(units=_units(model), losses=losses)
        ref["results"] = run_experiment(load_config("cifar100-10-10", RUN_ARGS), tmp / "one", data_root=data, progress=False)
        log, _ = proc.communicate(timeout=400)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    assert proc.returncode == 0, log[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return dict(ref=ref, ranks=ranks, out=out, one=tmp / "one", log=log)


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
        assert rk["nan_raised"] and "non-finite" in rk["nan_raised"] and rk["nan_moved"] < 1e-6 and rk["after_nan_equal"]
        assert rk["sync_raised"] and "vs rank 0" in rk["sync_raised"]
    assert "first forward" in job["ranks"][1]["nan_raised"] and "another rank" in job["ranks"][0]["nan_raised"]


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
    assert two["comm_eval_bytes"] == one["comm_eval_bytes"] == 16 * 3  # (correct, total) float64 per evaluated task
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


def test_only_rank_zero_writes(job):
    for name, starts in (("full", 1), ("cut", 2)):
        run = job["out"] / name
        assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "config.json", "events.jsonl", "results.json"]
        events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        kinds = [e["event"] for e in events]
        assert kinds.count("start") == starts and kinds.count("done") == 1
        assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 6)) * 2  # one line per step, not two
    assert job["log"].count("results: ") == 1  # the CLI summary is printed by rank 0 only


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(Path(sys.argv[2]), Path(sys.argv[3]))
