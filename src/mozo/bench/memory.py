"""Peak memory of one call and the bytes it saves for backward, on CPU and CUDA.

CPU: resident-set figures (RSS) are distorted by allocator caches, freed-but-kept pages and one-time
set-up, and were seen to rank plans wrongly. Instead, the call runs under `torch.profiler` with
`profile_memory=True`: the CPU allocator then reports every allocation and every free as a
`[memory]` event carrying `nbytes` (positive for an allocation, negative for a free) and a
timestamp. The running sum of these events in time order is the change of live tensor bytes since
the profiler started; its maximum is the peak above the state before the call. The raw events come
from `prof.profiler.kineto_results.events()` (torch >= 2.0; checked on 2.13). The aggregated views
(`key_averages()`, `FunctionEvent.cpu_memory_usage`) only keep each operator's *net* allocation and
would miss the transient peak inside an operator, so they are not used.

CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (allocated, not reserved).

Saved activations: `torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd keeps for
backward; the sum of the unique storages' sizes, parameters excluded (a frozen weight saved for the
input's gradient costs nothing extra), is exact.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

MEMORY_EVENT = "[memory]"


@dataclass
class PeakMemory:
    """Bytes live before the call (`state_bytes`) and the peak above them during the call."""

    state_bytes: int
    peak_delta_bytes: int
    method: str
    events: int = 0

    @property
    def peak_bytes(self) -> int:
        return self.state_bytes + self.peak_delta_bytes


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the unique storages behind `tensors` (views and shared tensors counted once)."""
    seen: dict[tuple, int] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        seen[(t.device.type, t.device.index, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def live_state_tensors(*objects: Any) -> list[torch.Tensor]:
    """Every tensor reachable in modules, optimizers, dicts, lists (what lives between steps)."""
    out: list[torch.Tensor] = []

    def visit(obj: Any) -> None:
        if obj is None:
            return
        if isinstance(obj, torch.Tensor):
            out.append(obj)
            if obj.grad is not None:
                out.append(obj.grad)
        elif isinstance(obj, torch.nn.Module):
            out.extend(obj.parameters())
            out.extend(p.grad for p in obj.parameters() if p.grad is not None)
            out.extend(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                visit(state)
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    for o in objects:
        visit(o)
    return out


def cpu_alloc_events(prof) -> list[tuple[int, int]]:
    """(timestamp ns, signed bytes) of every CPU allocation / free the profiler recorded."""
    events = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == MEMORY_EVENT and e.device_type() == torch.autograd.DeviceType.CPU:
            events.append((e.start_ns(), int(e.nbytes())))
    events.sort(key=lambda x: x[0])
    return events


def running_peak(events: list[tuple[int, int]]) -> int:
    """Maximum of the running sum of signed byte counts (0 if the sum never rises)."""
    run = peak = 0
    for _, nbytes in events:
        run += nbytes
        peak = max(peak, run)
    return peak


def measure_peak(fn: Callable[[], Any], device: torch.device, state: Iterable[torch.Tensor] = ()) -> tuple[Any, PeakMemory]:
    """Run `fn()` once and return (its result, PeakMemory).

    `state` lists the tensors live before the call (CPU only: on CUDA the allocator knows them).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return result, PeakMemory(before, peak - before, "cuda.max_memory_allocated")
    from torch.profiler import ProfilerActivity, profile

    before = storage_bytes(state)
    with _profiler_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = cpu_alloc_events(prof)
    return result, PeakMemory(before, running_peak(events), "torch.profiler CPU allocation events (running sum)", len(events))


@contextlib.contextmanager
def _profiler_quiet():
    """The CPU profiler's C++ side prints `USDT: ... profiler_start/stop` lines to fd 2 on every use (torch
    2.13); a run that measures one step per task must not litter its terminal with them. Python exceptions
    still propagate; only what C++ writes to stderr meanwhile is dropped."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class SavedTensorCounter:
    """Context manager: bytes of the unique storages autograd saves for backward (parameters excluded)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}
        self.tensors = 0
        self._ctx = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.tensors += 1
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self._exclude and ptr != 0:
            self._seen[ptr] = max(self._seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> "SavedTensorCounter":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

