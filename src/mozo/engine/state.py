"""The run's state: every counter and result a checkpoint holds, typed.

One dataclass, written and read through `to_checkpoint` / `from_checkpoint` only, so a field added here is
saved, restored and checked in one place. Everything is a tensor or plain data: checkpoints are read with
`torch.load(weights_only=True)` (engine/checkpoint.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RunState:
    task: int = 0  # the task being trained or evaluated
    trained: bool = False  # task `task` has trained (its evaluation is next)
    epoch: int = 0  # within the task
    batch: int = 0  # within the epoch
    zo_step: int = 0  # the ZO seed counter between tasks (mid-task it lives in `step`)
    step: Optional[dict] = None  # HybridStep.state_dict() of a task interrupted mid-way
    method: dict = field(default_factory=dict)  # the continual-learning method's state_dict()
    signal: dict = field(default_factory=dict)  # engine/signal.py ZOSignal.state_dict(): step sizes and ZO gains
    acc_matrix: list = field(default_factory=list)
    steps: int = 0  # training steps of the whole run
    skipped_nonfinite: int = 0
    skipped_images: list = field(default_factory=list)  # "split:task:index", each unreadable image once
    forward_passes: int = 0
    backward_passes: int = 0
    tower_forwards: dict = field(default_factory=lambda: {"vision": 0, "language": 0})
    wall_time_s: float = 0.0
    step_times: list = field(default_factory=list)
    step_peak_bytes: dict = field(default_factory=dict)  # str(task) -> live bytes of one profiled step

    def to_checkpoint(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> "RunState":
        """The state a checkpoint holds; a key this version does not know means the checkpoint is not ours."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - names)
        if unknown:
            raise ValueError(f"the checkpoint holds state this mozo version does not know ({', '.join(unknown)}); "
                             "resume it with the mozo version that wrote it")
        return cls(**saved)
