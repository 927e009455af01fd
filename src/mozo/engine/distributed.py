"""torch.distributed for hybrid ZO/FO training, launched by torchrun (docs/distributed.md).

- FO units: gradients are all-reduced (averaged) before the optimizer step, as DDP does.
- ZO units: every rank uses the same direction seeds; only the q scalar loss differences (with the
  step's loss, in the same all-reduce) are communicated, so every rank applies the identical update
  and ZO parameters never diverge. With zo.rank_directions each rank uses its own seeds and the q x N
  differences are all-gathered (`gather`) instead of averaged.
- Evaluation: each rank scores a shard of the test set; correct/total counts are summed.
Only rank 0 writes results, logs and checkpoints.

Every collective is counted by kind in `payload_bytes` (the bytes this rank contributes to
all-reduces, or the gathered tensor of an all-gather: `fo_grads`, `scalars`, `control`, `eval`,
`checkpoint`, `debug`), also on one process, where nothing is sent but the numbers say what a
data-parallel run of the same plan would all-reduce per step.
`bytes_communicated` is what was actually all-reduced (0 on one process).
"""
from __future__ import annotations

import os
from datetime import timedelta
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist

BACKENDS = ("auto", "nccl", "gloo", "mpi", "ucc")
TRAIN_KINDS = ("fo_grads", "scalars", "control")  # communicated by training steps (eval and debug are not)
SYNC_ENV = "MOZO_CHECK_ZO_SYNC"


def _sync_check_requested() -> bool:
    return os.environ.get(SYNC_ENV, "").strip().lower() not in ("", "0", "false", "no")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    backend: str = "none"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where this rank computes
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run
    bytes_communicated: int = 0  # payload bytes all-reduced by this rank (0 on one process)
    payload_bytes: dict = field(default_factory=dict)  # kind -> payload bytes, counted on one process too
    check_sync: bool = field(default_factory=_sync_check_requested)  # MOZO_CHECK_ZO_SYNC=1: verify after every step

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def _count(self, kind: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        self.payload_bytes[kind] = self.payload_bytes.get(kind, 0) + n
        if self.active:
            self.bytes_communicated += n

    def reduce_sum(self, t: torch.Tensor, kind: str = "eval") -> torch.Tensor:
        """Sum a tensor over ranks (identity on one process)."""
        self._count(kind, t)
        if not self.active:
            return t
        out = t.detach().clone().to(self.comm_device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def reduce_mean(self, t: torch.Tensor, kind: str = "scalars") -> torch.Tensor:
        """Average a tensor over ranks (identity on one process)."""
        total = self.reduce_sum(t, kind)
        return total / self.world_size if self.active else total

    def gather(self, t: torch.Tensor, kind: str = "scalars") -> torch.Tensor:
        """Every rank's `t` stacked in rank order, shape (world_size, *t.shape), bitwise the same on every rank
        (`t.unsqueeze(0)` on one process). zo.rank_directions gathers the ranks' own loss differences with it.

        Counted as the gathered tensor's bytes, world_size x t (what every rank ends up holding; a ring
        all-gather sends and receives (N-1)/N of it per rank)."""
        n = t.numel() * t.element_size() * self.world_size
        self.payload_bytes[kind] = self.payload_bytes.get(kind, 0) + n
        if not self.active:
            return t.unsqueeze(0)
        self.bytes_communicated += n
        src = t.detach().contiguous().to(self.comm_device)
        out = [torch.empty_like(src) for _ in range(self.world_size)]
        dist.all_gather(out, src)
        return torch.stack(out).to(t.device)

    def reduce_grads(self, grads: list[torch.Tensor]) -> None:
        """Average FO gradients in one flat all-reduce (what DDP's buckets do, in one bucket).

        Every rank must pass the same list of shapes (the FO parameters that received a gradient).
        """
        if not grads:
            return
        self.payload_bytes["fo_grads"] = self.payload_bytes.get("fo_grads", 0) + sum(g.numel() * g.element_size() for g in grads)
        if not self.active:
            return
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.comm_device)
        self.bytes_communicated += flat.numel() * flat.element_size()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g).to(g.device))
            offset += g.numel()

    def any(self, flag: bool, kind: str = "control") -> bool:
        """True on every rank if it is true on any rank (e.g. Ctrl-C seen by one rank: all stop at the same step)."""
        t = torch.tensor([1.0 if flag else 0.0])
        self._count(kind, t)
        if not self.active:
            return bool(flag)
        t = t.to(self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def check_synced(self, named: Iterable[tuple[str, torch.Tensor]], where: str = "") -> None:
        """Raise on every rank if any tensor differs bitwise between ranks (debug: MOZO_CHECK_ZO_SYNC=1).

        Cheap: two int64 checksums of the raw bits per tensor are all-gathered, not the tensors.
        """
        named = list(named)
        if not self.active or not named:
            return
        sums = torch.stack([s for _, t in named for s in _bit_checksums(t)]).to(self.comm_device)
        self._count("debug", sums)
        gathered = [torch.empty_like(sums) for _ in range(self.world_size)]
        dist.all_gather(gathered, sums)
        ref = gathered[0].cpu().view(-1, 2)
        bad = {}
        for r in range(1, self.world_size):
            differs = (gathered[r].cpu().view(-1, 2) != ref).any(dim=1)
            for i in differs.nonzero().flatten().tolist():
                bad.setdefault(named[i][0], []).append(r)
        if bad:
            names = ", ".join(f"{n} (rank {rs} vs rank 0)" for n, rs in list(bad.items())[:8])
            raise RuntimeError(f"{len(bad)} parameter tensor(s) differ between ranks{' after ' + where if where else ''}: "
                               f"{names}{' ...' if len(bad) > 8 else ''}. Data-parallel replicas have diverged "
                               f"(ZO units must see identical seeds and all-reduced scalars on every rank)")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_checksums(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the raw bit patterns, position-weighted sum), in wrapping int64: equal tensors, equal sums."""
    bits = t.detach().contiguous().reshape(-1).view(_INT_OF_SIZE[t.element_size()]).to(torch.int64)
    pos = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
    return bits.sum(), (bits * pos).sum()


def init_distributed(backend: str = "auto", device: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a one-process context.

    backend: `auto` picks nccl when this rank computes on a CUDA device, gloo otherwise; the config key
    `distributed_backend` overrides it (e.g. gloo on GPUs without NCCL).
    timeout_s: how long a collective waits for the other ranks before failing (the backends' defaults,
    30 min for gloo and 10 min for NCCL, leave a run with one stalled rank hanging for that long).
    """
    if backend not in BACKENDS:
        raise ValueError(f"distributed_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else None)
    if world <= 1:
        return DistContext(device=dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(f"distributed_backend=nccl needs CUDA devices, but this rank computes on {dev}; use distributed_backend=gloo (or auto)")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    comm_device = dev if backend == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), backend, dev, comm_device)


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device} requested but CUDA is not available; use device=cpu")
        if local_rank is not None and dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
