"""A run's log: RUN_DIR/events.jsonl, mirrored to TensorBoard and Weights & Biases.

`events.jsonl` is the record (one JSON object per line: every step's loss, lr, time and ZO coefficients,
every evaluation row, start, resume, stop and the final summary). The mirrors are for watching a run:

- TensorBoard (`log.tensorboard=true`, the default, whenever `tensorboard` is installed:
  `pip install tensorboard`): RUN_DIR/tb holds `train/loss` and `train/lr` per step, `eval/taskJ`
  (accuracy on task J's test set) after each task, and `summary/*` (Last, Avg, ...) at the end, all
  against the global training step (`summary/step_acc` against the task number). A resumed run purges
  what the interrupted one logged after its checkpoint, so no step appears twice.
- Weights & Biases (`log.wandb=true`, `pip install wandb`): the same scalars, the resolved configuration
  as the run's config and the summary as its summary; the run's files go to RUN_DIR/wandb. A resume
  continues the same W&B run (its id is kept in RUN_DIR/wandb/mozo-run-id). `WANDB_MODE=offline` logs
  without an account or network (`wandb sync RUN_DIR/wandb/offline-run-*` uploads later);
  `log.wandb_project` (else `$WANDB_PROJECT`, else "mozo") names the project.

Only the main process (rank 0) writes. The mirrors are closed after the run's last event (done,
interrupted, nonfinite).
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import time
from numbers import Real
from pathlib import Path
from typing import Any, Optional

FINAL_EVENTS = ("done", "interrupted", "nonfinite")  # nothing is logged after these
WANDB_ID_FILE = "mozo-run-id"


class LogSetupError(ValueError):
    """A requested log mirror cannot be used (its package is missing); the message says what to install."""


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def check_available(wandb: bool) -> None:
    """Refuse `log.wandb=true` without the package, before anything loads (TensorBoard is optional: without
    it the run logs to events.jsonl only)."""
    if wandb and not wandb_installed():
        raise LogSetupError("log.wandb=true needs Weights & Biases: pip install wandb (or pip install 'mozo[wandb]'); "
                            "or drop log.wandb=true to log to events.jsonl (and TensorBoard) only")


def _scalar(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, Real) and not isinstance(value, bool) else None


class RunLog:
    """events.jsonl plus the mirrors; `write(event, fields, global_step)` for each event, `close()` at the end.

    Files are opened at the first write (a RunLog that never writes leaves nothing behind) and reopened by a
    write after `close()`.
    """

    def __init__(self, out_dir: str | Path, is_main: bool = True, config: Optional[dict] = None,
                 tensorboard: bool = True, wandb: bool = False, wandb_project: Optional[str] = None):
        self.out = Path(out_dir)
        self.is_main = is_main
        self.config = config or {}
        self.tensorboard = bool(tensorboard) and tensorboard_installed()
        self.wandb = bool(wandb)
        self.wandb_project = wandb_project
        if is_main:
            check_available(self.wandb)
        self._file = None
        self._tb = None  # torch.utils.tensorboard.SummaryWriter
        self._wb = None  # wandb Run

    # -- writing -------------------------------------------------------------------------------
    def write(self, event: str, fields: dict[str, Any], global_step: int) -> None:
        """One event: a line of events.jsonl, and its scalars at `global_step` (training steps so far)."""
        if not self.is_main:
            return
        if self._file is None:
            self._file = open(self.out / "events.jsonl", "a")
        self._file.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
        self._file.flush()
        scalars = self._scalars(event, fields)
        if self.tensorboard:
            self._tensorboard(event, scalars, fields, global_step)
        if self.wandb:
            self._wandb(event, scalars, fields, global_step)
        if event in FINAL_EVENTS:
            self.close()

    @staticmethod
    def _scalars(event: str, fields: dict[str, Any]) -> dict[str, float]:
        """The numbers an event contributes to the mirrors (tag -> value)."""
        if event == "step":
            return {k: v for k, v in (("train/loss", _scalar(fields.get("loss"))), ("train/lr", _scalar(fields.get("lr"))))
                    if v is not None}
        if event == "eval":
            return {f"eval/task{j + 1}": float(acc) for j, acc in enumerate(fields.get("row") or []) if acc is not None}
        if event == "done":
            summary = fields.get("summary") or {}
            return {f"summary/{k}": _scalar(v) for k, v in summary.items() if _scalar(v) is not None}
        return {}

    def _tensorboard(self, event: str, scalars: dict[str, float], fields: dict, global_step: int) -> None:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # after a resume: drop what the interrupted run logged past the checkpoint it continues from (the
            # checkpoint holds `global_step` steps; step k is logged at k)
            purge = global_step + 1 if event == "resumed" else None
            self._tb = SummaryWriter(str(self.out / "tb"), purge_step=purge, flush_secs=10)
        for tag, value in scalars.items():
            self._tb.add_scalar(tag, value, global_step)
        if event == "done":
            for i, acc in enumerate((fields.get("summary") or {}).get("step_acc") or []):
                if _scalar(acc) is not None:
                    self._tb.add_scalar("summary/step_acc", float(acc), i + 1)
        if event != "step":
            self._tb.flush()

    def _wandb(self, event: str, scalars: dict[str, float], fields: dict, global_step: int) -> None:
        if self._wb is None:
            self._wb = self._wandb_init()
        if event == "done":
            self._wb.summary.update({k.split("/", 1)[1]: v for k, v in scalars.items()})
            if (fields.get("summary") or {}).get("step_acc") is not None:
                self._wb.summary["step_acc"] = fields["summary"]["step_acc"]
            return
        if event == "eval":
            scalars = {**scalars, "eval/after_task": fields["task"] + 1}
        if scalars:
            self._wb.log(scalars, step=global_step)

    def _wandb_init(self):
        import wandb

        folder = self.out / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if not run_id:
            run_id = secrets.token_hex(6)  # W&B run ids: lower-case letters and digits
            id_file.write_text(run_id)
        run = wandb.init(project=self.wandb_project or os.environ.get("WANDB_PROJECT") or "mozo",
                         name=f"{self.config.get('name', 'run')}:{self.out.name}", id=run_id, resume="allow",
                         dir=str(self.out), config=self.config, reinit="create_new")
        run.define_metric("eval/after_task")
        run.define_metric("eval/*", step_metric="eval/after_task")  # accuracy per task against the task number
        return run

    def close(self) -> None:
        """Flush and close everything opened; a later write opens again."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wb is not None:
            self._wb.finish()
            self._wb = None
