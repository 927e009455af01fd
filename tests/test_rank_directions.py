"""zo.rank_directions on one process (the 2-process gloo checks are in tests/test_distributed.py).

- world_size 1: the option changes nothing, bitwise (units, losses, records, counted payload);
- a simulated second rank (a gather callback that stacks two rows): the q x 2 seeds in rank order, rank 0's
  the one-process seeds; the ZO units come back from this rank's own perturbations bit for bit (restored from a
  copy), where the default restore by subtraction leaves rounding residue; a non-finite loss on the other
  rank raises with the units untouched.
"""
from __future__ import annotations

import pytest
import torch

import mozo
from mozo.engine.distributed import DistContext
from mozo.engine.step import NonFiniteLossError
from mozo.seeds import mix_seed


def _model():
    bb = mozo.load_backbone("tiny", seed=0)
    torch.manual_seed(0)
    return bb, mozo.MozoCLIP(bb, mozo.PeftConfig.of("moe", rank=8, dropout=0.0, noisy_gating=False))


def _batches(bb, n=3, b=4):
    text = bb.tokenize([f"a photo of a {w}." for w in ("one", "two", "three")])
    for k in range(n):
        g = torch.Generator().manual_seed(50 + k)
        yield torch.randn(b, 3, bb.image_size, bb.image_size, generator=g), torch.randint(0, 3, (b,), generator=g), text


def _units(model) -> dict:
    return {k: v.detach().clone() for k, v in model.units.state_dict().items()}


@pytest.mark.parametrize("plan,extra", [("dual-zo", {}), ("vision-zo", {"two_sided": True}), ("dual-zo", {"granularity": "tower"}),
                                        ("vision-zo", {"two_sided": True, "fo_at_perturbed": True, "q": 1})])
def test_world_size_one_is_bitwise_the_default(plan, extra):
    runs = []
    for rank_directions in (False, True):
        bb, model = _model()
        ctx = DistContext()
        zo = mozo.ZOConfig(**{"lr": 1e-2, "q": 2, **extra}, rank_directions=rank_directions)
        step = mozo.HybridStep(model, plan, zo, fo_lr=1e-2, seed=3, reduce_scalars=ctx.reduce_mean, reduce_grads=ctx.reduce_grads,
                               gather_scalars=ctx.gather, world_size=ctx.world_size)
        stats = [step(*batch) for batch in _batches(bb)]
        runs.append((_units(model), [s.loss for s in stats], [(s.zo.seeds, s.zo.coefs) for s in stats], ctx.payload_bytes))
    (a, la, ra, ca), (b, lb, rb, cb) = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert la == lb and ra == rb and ca == cb
    assert any(not torch.equal(a[k], _units(_model()[1])[k]) for k in a)  # the units did move


def _two_rank_step(model, q=2, lr=0.0, other=lambda t: t):
    """Rank 1 of a simulated 2-rank run: the gather returns (other(row), this rank's row)."""
    zo = mozo.ZOConfig(lr=lr, q=q, rank_directions=True)
    return mozo.HybridStep(model, "dual-zo", zo, seed=3, noise_rank=1, world_size=2,
                           gather_scalars=lambda t: torch.stack([other(t), t]))


def test_each_rank_its_own_seeds_and_an_exact_restore():
    bb, model = _model()
    start = _units(model)
    step = _two_rank_step(model)  # lr = 0: the units must come back exactly
    for k, batch in enumerate(_batches(bb)):
        record = step(*batch).zo
        assert record.seeds == [mix_seed(3, k, 1), mix_seed(3, k, 2), mix_seed(3, k, 1, 1), mix_seed(3, k, 2, 1)]
        assert all(len(c) == 4 for c in record.coefs.values())
        assert step.direction_seeds(k, 0) == [mix_seed(3, k, d + 1) for d in range(2)]  # rank 0: the one-process seeds
    assert all(torch.equal(v, _units(model)[k]) for k, v in start.items())
    assert step._saved is None  # the copy (ZO units, fp32) lives only during the estimate
    # Restored by subtraction instead (the default scheme), theta + eps z - eps z is not theta bit for bit: the
    # residue depends on z, so ranks with different directions would drift apart.
    _, plain = _model()
    default = mozo.HybridStep(plain, "dual-zo", mozo.ZOConfig(lr=0.0, q=2), seed=3, noise_rank=1)
    for batch in _batches(bb):
        default(*batch)
    assert any(not torch.equal(v, _units(plain)[k]) for k, v in start.items())


def test_nonfinite_on_the_other_rank_raises_and_leaves_the_units():
    bb, model = _model()
    start = _units(model)
    step = _two_rank_step(model, lr=1e-2, other=lambda t: t * float("nan"))
    with pytest.raises(NonFiniteLossError, match="another rank"):
        step(*next(_batches(bb)))
    assert all(torch.equal(v, _units(model)[k]) for k, v in start.items()) and step._saved is None


def test_rank_directions_on_several_ranks_needs_a_gather():
    _, model = _model()
    with pytest.raises(ValueError, match="gather_scalars"):
        mozo.HybridStep(model, "dual-zo", mozo.ZOConfig(rank_directions=True), world_size=2)
    step = mozo.HybridStep(model, "dual-zo", mozo.ZOConfig(rank_directions=True), world_size=2,
                           gather_scalars=lambda t: t.unsqueeze(0))  # a gather that disagrees with world_size
    bb, _ = _model()
    with pytest.raises(ValueError, match="world_size is 2"):
        step(*next(_batches(bb)))


def test_the_copy_costs_the_zo_units_bytes_of_peak_memory():
    from mozo.bench.memory import measure_peak

    peaks = []
    for rank_directions in (False, True):
        bb, model = _model()
        kw = dict(world_size=2, noise_rank=1, gather_scalars=lambda t: torch.stack([t, t])) if rank_directions else {}
        step = mozo.HybridStep(model, "dual-zo", mozo.ZOConfig(q=2, rank_directions=rank_directions), seed=3, **kw)
        batch = next(_batches(bb))
        step(*batch)  # warm-up (text cache, allocator)
        peaks.append(measure_peak(lambda: step(*batch), torch.device("cpu"))[1].peak_delta_bytes)
    zo_bytes = sum(p.numel() * p.element_size() for m in step.zo_towers for p in step.zo_params[m])
    assert peaks[1] - peaks[0] == zo_bytes  # one fp32 copy of the ZO units (78,336 B here), nothing else
