"""torch.distributed for hybrid ZO/FO training, launched by torchrun.

- FO units: gradients are all-reduced (averaged) before the optimizer step, as DDP does.
- ZO units: every rank uses the same direction seeds; only the q scalar loss differences are
  all-reduced, so every rank applies the identical update and ZO parameters never diverge.
- Evaluation: each rank scores a shard of the test set; correct/total counts are summed.
Only rank 0 writes results, logs and checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    backend: str = "none"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where this rank computes
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run
    bytes_communicated: int = 0  # payload bytes all-reduced by this rank (for the cost section)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average a tensor over ranks (identity on one process)."""
        if not self.active:
            return t
        out = t.detach().clone().to(self.comm_device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        self.bytes_communicated += out.numel() * out.element_size()
        return (out / self.world_size).to(t.device)

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return t
        out = t.detach().clone().to(self.comm_device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        self.bytes_communicated += out.numel() * out.element_size()
        return out.to(t.device)

    def reduce_grads(self, grads: list[torch.Tensor]) -> None:
        """Average FO gradients in one flat all-reduce (what DDP's buckets do, in one bucket)."""
        if not self.active or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.comm_device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        self.bytes_communicated += flat.numel() * flat.element_size()
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g).to(g.device))
            offset += g.numel()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_distributed(backend: str = "auto", device: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a one-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else None)
    if world <= 1:
        return DistContext(device=dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
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
