"""The task loop: train each task with the hybrid step, evaluate, checkpoint, write results.json.

Everything that decides a run's outcome is a function of the configuration and of counters that
checkpoints store (task, epoch, batch, ZO step index): data order and augmentations are seeded by
(seed, epoch, index), ZO directions and unit noise by (seed, step), so a resumed run ends exactly
where an uninterrupted one ends.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from mozo.backbone.clip import load_backbone
from mozo.bench.memory import live_state_tensors, measure_peak, storage_bytes
from mozo.data.loader import TransformedDataset, describe_workers, make_loader, plan_workers
from mozo.data.scenario import Scenario
from mozo.data.transforms import make_transform
from mozo.engine.checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mozo.engine.config import RunConfig, check_lr_per_task, from_dict, task_lr, to_dict
from mozo.engine import rundir
from mozo.engine.distributed import TRAIN_KINDS, DistContext
from mozo.engine.overview import run_overview
from mozo.engine.signal import ZOSignal
from mozo.engine.state import RunState
from mozo.engine.step import HybridStep, NonFiniteLossError
from mozo.methods import build_method
from mozo.metrics.summary import summarize
from mozo.peft.inject import MozoCLIP
from mozo.seeds import mix_seed


class RunInterrupted(KeyboardInterrupt):
    """Raised after the checkpoint was saved on Ctrl-C or SIGTERM; `exit_code` is 130 or 143."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class RunFailed(RuntimeError):
    """Training cannot go on (non-finite values); the message says what is kept and the command that continues."""


STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # exit codes 128 + signal number, as shells report


class _Interrupt:
    """Turns SIGINT and SIGTERM (what SLURM, Kubernetes and torchrun send) into a flag checked between steps
    and evaluation batches, so a step is never cut in half and a checkpoint is written. A second signal
    stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self.exit_code = 130
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped at once")
        self.requested, self.exit_code = True, STOP_SIGNALS[signum]

    def __enter__(self) -> "_Interrupt":
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# Keys `mozo run --resume DIR key=value` may change: they steer how the rest of the run is computed, not what
# was computed so far. The change is recorded in config.json and in the `resumed` event.
RESUME_OVERRIDES = ("train.lr", "zo.lr", "zo.lr_relative", "train.checkpoint_every", "train.skip_nonfinite", "train.max_nonfinite_fraction",
                    "data.eval_batch_size", "data.num_workers", "device", "distributed_timeout_s",
                    "log.tensorboard", "log.wandb", "log.wandb_project")


def _fixed_part(flat: dict) -> dict:
    """A flattened configuration without the keys a resume may change."""
    return {k: v for k, v in flat.items() if k not in RESUME_OVERRIDES}


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over `warmup` iterations, then cosine decay to 0 (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Runner:
    """One run: a model, a scenario, a run directory. `run()` trains and evaluates every task."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, scenario: Scenario, dist: DistContext | None = None,
                 progress: bool = True, on_step: Optional[Callable[["Runner"], None]] = None, show_overview: bool = False):
        self.cfg, self.scenario = cfg, scenario
        self.dist = dist or DistContext(device=_device(cfg.device))
        self.out = Path(out_dir)
        self.progress = progress and self.dist.is_main
        self.on_step = on_step  # called after every training step; may call request_stop()
        self.show_overview = show_overview  # print the one-screen plan of the run before training (mozo run)
        self._interrupt = _Interrupt()
        self.device = self.dist.device
        if cfg.num_tasks is not None and cfg.num_tasks > len(scenario.tasks):  # before the backbone loads
            raise ValueError(f"num_tasks={cfg.num_tasks} but scenario {scenario.name!r} has {len(scenario.tasks)} tasks; "
                             f"choose num_tasks between 1 and {len(scenario.tasks)}")
        check_lr_per_task(cfg, len(scenario.tasks))  # protocol=cil: the number of tasks is known from the data only now
        torch.manual_seed(cfg.seed)
        self.backbone = load_backbone(cfg.backbone, self.device, seed=cfg.seed)
        self.model = MozoCLIP(self.backbone, cfg.peft)
        self.plan = self.model.plan(cfg.plan)
        self.tasks = scenario.tasks[: cfg.num_tasks] if cfg.num_tasks else scenario.tasks
        n = len(self.tasks)
        empty = [t.name for t in self.tasks if len(t.test) == 0]
        if empty:
            raise ValueError(f"tasks {empty} have no test images, so their accuracy is undefined; "
                             "check the dataset's test split (docs/datasets.md)")

        self.state = RunState()
        self.method = build_method(cfg.method, cfg.train.label_smoothing)
        self.signal = ZOSignal(self.model, self.plan, cfg.zo.gain_every, cfg.seed)
        self._n_tasks = n
        self._log_file = None  # engine/logs.py RunLog: events.jsonl, TensorBoard, W&B; opened by the first log()

    def request_stop(self, exit_code: int = 130) -> None:
        """Stop at the next step boundary as on Ctrl-C (checkpoint, RunInterrupted)."""
        self._interrupt.requested, self._interrupt.exit_code = True, exit_code

    def _count_skipped(self, split: str, task: int, indices: list[int]) -> None:
        """Unreadable images, each counted once however often it is loaded (epochs, evaluations)."""
        seen = self.state.skipped_images
        seen.extend(k for k in (f"{split}:{task}:{i}" for i in indices) if k not in seen)

    # -- persistence ---------------------------------------------------------------------------
    def log(self, event: str, **fields: Any) -> None:
        """One event: a line of RUN_DIR/events.jsonl, mirrored to TensorBoard / W&B (engine/logs.py)."""
        if self._log_file is None:
            from mozo.engine.logs import RunLog

            log = self.cfg.log
            self._log_file = RunLog(self.out, self.dist.is_main, to_dict(self.cfg), tensorboard=log.tensorboard,
                                    wandb=log.wandb, wandb_project=log.wandb_project)
        self._log_file.write(event, fields, self.state.steps)  # against the run's global training steps

    def save(self, step: HybridStep | None) -> None:
        if step is not None:
            self.state.step = step.state_dict()  # mid-task; zo_step is the counter between tasks
        failed = None
        if self.dist.is_main:
            try:
                self.state.method, self.state.signal = self.method.state_dict(), self.signal.state_dict()
                save_checkpoint(self.out, self.model.units.state_dict(), {**self.state.to_checkpoint(), "rng": rng_state(), "config": to_dict(self.cfg)})
            except FloatingPointError as exc:  # never write units a resume could not continue from
                failed = str(exc)
        # Also the barrier: ranks go on once rank 0 has written the checkpoint, and all know whether it could.
        if self.dist.any(failed is not None, kind="checkpoint"):
            raise RunFailed(self._nonfinite_advice(failed or "the units hold NaN or inf on rank 0"))

    def _nonfinite_advice(self, what: str) -> str:
        """What happened, what is kept, and the command that continues with a smaller learning rate."""
        kept = find_checkpoint(self.out)
        # zo.lr_relative follows the FO learning rate, so lowering that lowers both
        zo_lr = f" zo.lr={self.cfg.zo.lr / 10:g}" if self.plan.has("zo") and self.cfg.zo.lr_relative is None else ""
        lrs = f"train.lr={self.cfg.train.lr / 10:g}" + zo_lr
        if self.cfg.train.lr_per_task is not None:  # fixed for a run: a resume cannot lower it
            lrs = "train.lr_per_task=<a tenth of each>" + zo_lr
            return (f"{what}. train.lr_per_task is part of the run's fixed configuration, so a resume cannot lower it; "
                    f"start again with smaller learning rates, e.g. `mozo run ... {lrs} --out {self.out} --overwrite`, "
                    f"or set train.skip_nonfinite=true")
        if kept is None:
            return (f"{what}. No checkpoint was written before it, so nothing can be resumed; start again with a lower "
                    f"learning rate, e.g. `mozo run ... {lrs} --out {self.out} --overwrite`, or set train.skip_nonfinite=true")
        return (f"{what}. The last good checkpoint is kept in {kept}; continue from it with a lower learning rate: "
                f"mozo run --resume {self.out} {lrs}")

    def restore(self) -> None:
        units, state = load_checkpoint(self.out)
        saved, now = _flat(state.pop("config")), _flat(to_dict(self.cfg))
        if _fixed_part(saved) != _fixed_part(now):
            raise ValueError(f"the configuration differs from the one the run in {self.out} started with; "
                             f"resume with the same preset and overrides (see config.json there); only "
                             f"{', '.join(RESUME_OVERRIDES)} may change on resume")
        changed = {k: v for k, v in now.items() if saved.get(k) != v}
        missing = self.model.units.load_state_dict({k: v.to(self.device) for k, v in units.items()})
        set_rng_state(state.pop("rng"))
        self.state = RunState.from_checkpoint(state)
        self.method.load_state_dict(self.state.method)
        self.signal.load_state_dict(self.state.signal)
        self.log("resumed", task=self.state.task, batch=self.state.batch, missing=str(missing), overrides=changed)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def text_features(self, classnames: list[str]) -> torch.Tensor:
        prompts = [self.cfg.data.template.format(c) for c in classnames]
        feats = []
        for i in range(0, len(prompts), 256):
            feats.append(self.model.encode_texts(self.backbone.tokenize(prompts[i:i + 256], self.device, self.cfg.data.prompt_padding)))
        return torch.cat(feats)

    def _eval_transform(self):
        return make_transform(False, self.backbone.image_size, self.backbone.mean, self.backbone.std)

    @torch.no_grad()
    def accuracy(self, task_index: int, classnames: list[str], label_offset: int = 0) -> tuple[float, int]:
        """Accuracy (%) on a task's test set against `classnames` (labels minus `label_offset` index them),
        sharded over ranks."""
        # Checked per test set, not per batch: ranks may hold different numbers of evaluation batches, and a
        # collective must be entered by all of them. The trained units are already checkpointed.
        if self.dist.any(self._interrupt.requested, kind="eval"):
            raise RunInterrupted(f"interrupted while evaluating; the trained units are checkpointed in {self.out / 'checkpoint'}; "
                                 f"continue (evaluation only) with: mozo run --resume {self.out}", self._interrupt.exit_code)
        images = self.tasks[task_index].test
        if self.cfg.eval_max_samples and len(images) > self.cfg.eval_max_samples:
            images = seeded_subset(images, self.cfg.eval_max_samples, self.cfg.seed, task_index)
        self.model.eval()
        text = self.text_features(classnames)
        ds = TransformedDataset(images, self._eval_transform(), seed=self.cfg.seed, skip_corrupt=self.cfg.data.skip_corrupt)
        loader = make_loader(ds, self.cfg.data.eval_batch_size, shuffle=False, **plan_workers(self.cfg.data.num_workers, self.device, ds, self.cfg.data.eval_batch_size).loader_kwargs(),
                             rank=self.dist.rank, world_size=self.dist.world_size, pad_last=False)
        correct = torch.zeros(2, dtype=torch.float64)
        for pixels, labels, skipped in tqdm(loader, desc=f"eval {self.tasks[task_index].name}", leave=False, disable=not self.progress):
            self._count_skipped("test", task_index, skipped)
            if len(labels) == 0:
                continue
            pred = self.model.logits(self.model.encode_images(pixels.to(self.device)), text).argmax(-1).cpu()
            correct += torch.tensor([(pred == labels - label_offset).sum().item(), len(labels)], dtype=torch.float64)
        correct = self.dist.reduce_sum(correct)
        return 100.0 * float(correct[0]) / max(1.0, float(correct[1])), int(correct[1])

    def evaluate_after(self, t: int) -> list[Optional[float]]:
        """Row t of the accuracy matrix (docs/experiments.md, metrics)."""
        sc, n = self.scenario, self._n_tasks
        if sc.protocol == "cil":
            names = sc.eval_classnames(t)
            future = self.cfg.data.eval_future
            return [self.accuracy(j, names)[0] if j <= t
                    else self.accuracy(j, self.tasks[j].classnames, self.tasks[j].label_offset)[0] if future else None
                    for j in range(n)]
        return [self.accuracy(j, sc.eval_classnames(j))[0] for j in range(n)]

    # -- training ------------------------------------------------------------------------------
    def make_step(self, t: int) -> HybridStep:
        step = HybridStep(self.model, self.plan, self.cfg.zo, fo_lr=self.task_lr(t), fo_weight_decay=self.cfg.train.weight_decay,
                          seed=mix_seed(self.cfg.seed, t), precision=self.cfg.train.precision, method=self.method,
                          reduce_scalars=self.dist.reduce_mean, reduce_grads=self.dist.reduce_grads, noise_rank=self.dist.rank,
                          gather_scalars=self.dist.gather, world_size=self.dist.world_size, accumulate=self.cfg.train.accumulate)
        # mid-task: the step's own state; at a task's start, a fresh optimizer and the run's seed counter
        step.load_state_dict(self.state.step or {"step_index": self.state.zo_step})
        return step

    def task_lr(self, t: int) -> float:
        """Task t's FO learning rate before the schedule: train.lr_per_task's entry, else train.lr."""
        return task_lr(self.cfg.train, t, self.tasks[t].name)

    def steps_for_task(self, t: int) -> int:
        """Training steps of task t: its batches times the epochs, capped by train.max_steps_per_task."""
        total = math.ceil(len(self.tasks[t].train) / self.cfg.train.batch_size) * self.cfg.train.epochs
        cap = self.cfg.train.max_steps_per_task
        return total if cap is None else min(total, cap)

    def train_task(self, t: int) -> None:
        cfg, task, interrupt = self.cfg, self.tasks[t], self._interrupt
        offset = task.label_offset
        label_map = {lab: lab - offset for lab in task.labels}
        train_tf = make_transform(True, self.backbone.image_size, self.backbone.mean, self.backbone.std)
        ds = TransformedDataset(task.train, train_tf, seed=mix_seed(cfg.seed, t), label_map=label_map, skip_corrupt=cfg.data.skip_corrupt)
        per_epoch = math.ceil(len(ds) / cfg.train.batch_size)
        total = self.steps_for_task(t)
        fo_lr = self.task_lr(t)
        text_inputs = self.backbone.tokenize([cfg.data.template.format(c) for c in task.classnames], self.device, cfg.data.prompt_padding)
        if self.state.step is None and self.state.epoch == 0 and self.state.batch == 0:  # a task's start, not a resume
            self.method.begin_task(t, self.model)
        step = self.make_step(t)
        heldout = self._heldout_batch(t, text_inputs) if cfg.zo.gain_every and self.plan.has("zo") else None
        skipped_before = self.state.skipped_nonfinite
        bar = tqdm(total=total, initial=self.state.epoch * per_epoch + self.state.batch, desc=f"task {t + 1}/{self._n_tasks} {task.name} [{cfg.plan}]", disable=not self.progress)
        while self.state.epoch < cfg.train.epochs:
            done = self.state.epoch * per_epoch + self.state.batch
            if done >= total:
                break
            loader = make_loader(ds, cfg.train.batch_size, shuffle=True, seed=mix_seed(cfg.seed, t), epoch=self.state.epoch,
                                 **plan_workers(cfg.data.num_workers, self.device, ds, cfg.train.batch_size).loader_kwargs(), start_batch=self.state.batch,
                                 rank=self.dist.rank, world_size=self.dist.world_size)
            for pixels, labels, skipped in loader:
                done = self.state.epoch * per_epoch + self.state.batch
                if done >= total:
                    break
                self._count_skipped("train", t, skipped)
                factor = lr_factor(done, total, cfg.train.warmup_iters, cfg.train.schedule)
                step.set_lr(fo_lr * factor, cfg.zo.learning_rate(fo_lr) * factor)
                profiled = done == min(1, total - 1)  # once per task, after the optimizer state exists, as mozo bench does
                if not profiled:
                    self.signal.before_step()
                start = time.perf_counter()
                try:
                    pixels, labels = pixels.to(self.device), labels.to(self.device)
                    if profiled:
                        stats = self._measured_step(t, step, pixels, labels, text_inputs)
                    else:
                        stats = step(pixels, labels, text_inputs)
                except NonFiniteLossError as exc:
                    if not cfg.train.skip_nonfinite:
                        self.log("nonfinite", task=t, batch=self.state.batch, message=str(exc))
                        bar.close()
                        raise RunFailed(self._nonfinite_advice(f"{exc} (task {t + 1}, step {done + 1})")) from None
                    self.state.skipped_nonfinite += 1
                    step.skip()
                    stats = None
                elapsed = time.perf_counter() - start
                self.state.batch += 1
                self.state.steps += 1
                if stats is not None and self.dist.check_sync:  # MOZO_CHECK_ZO_SYNC=1: replicas must stay bitwise equal
                    self.dist.check_synced(self.model.units.named_parameters(), f"task {t + 1} step {done + 1}")
                if stats is not None:
                    self.state.step_times.append(elapsed)
                    self.state.forward_passes += stats.forward_passes
                    self.state.backward_passes += stats.backward_passes
                    for m, v in stats.tower_forwards.items():
                        self.state.tower_forwards[m] += v
                    gain = self.signal.after_step(t, done + 1, heldout)
                    if gain is not None:
                        self.log("zo_gain", task=t, **gain)
                    self.log("step", task=t, step=done + 1, loss=stats.loss, lr=fo_lr * factor, time_s=elapsed,
                             zo_coefs=stats.zo.coefs if stats.zo else None)
                    bar.set_postfix(loss=f"{stats.loss:.3f}")
                bar.update(1)
                if cfg.train.checkpoint_every and self.state.steps % cfg.train.checkpoint_every == 0:
                    self.save(step)
                if self.on_step is not None:
                    self.on_step(self)
                if self.dist.any(interrupt.requested):  # a signal seen by any rank stops all at this step
                    self.save(step)
                    bar.close()
                    self.log("interrupted", task=t, batch=self.state.batch)
                    raise RunInterrupted(f"interrupted; checkpoint saved in {self.out / 'checkpoint'}; continue with: "
                                         f"mozo run --resume {self.out}", interrupt.exit_code)
            else:
                self.state.epoch += 1
                self.state.batch = 0
                continue
            break
        bar.close()
        self.state.zo_step = step.step_index
        self._check_skipped_fraction(t, self.state.skipped_nonfinite - skipped_before, total)
        self.method.end_task(t, self.model)

    def _heldout_batch(self, t: int, text_inputs: dict) -> tuple:
        """Task t's held-out batch for the ZO gain (engine/signal.py): a seeded choice of up to one training
        batch of its test images, evaluation transform; never trained on."""
        images = self.tasks[t].test
        ds = TransformedDataset(seeded_subset(images, self.cfg.train.batch_size, self.cfg.seed, t, 7), self._eval_transform(), seed=self.cfg.seed,
                                label_map={lab: lab - self.tasks[t].label_offset for lab in self.tasks[t].labels})
        items = [ds[i] for i in range(len(ds))]
        return (torch.stack([x for x, _ in items]).to(self.device), torch.tensor([y for _, y in items], device=self.device), text_inputs)

    def _measured_step(self, t: int, step: HybridStep, pixels, labels, text_inputs):
        """One training step with its live-tensor peak above the model's parameters recorded (the figure
        `mozo bench` reports; on a CPU the process's RSS cannot tell plans apart, docs/benchmarks.md)."""
        state = live_state_tensors(self.model, pixels, labels, text_inputs, step.fo_optimizer, step.rule.state_dict())
        stats, mem = measure_peak(lambda: step(pixels, labels, text_inputs), self.device, state)
        self.state.step_peak_bytes[str(t)] = mem.peak_bytes - storage_bytes(self.model.parameters())
        return stats

    def _check_skipped_fraction(self, t: int, skipped: int, steps: int) -> None:
        """train.skip_nonfinite tolerates a few bad batches, not a task that mostly did not train."""
        limit = self.cfg.train.max_nonfinite_fraction
        if skipped and steps and skipped / steps > limit:
            raise RunFailed(self._nonfinite_advice(
                f"{skipped} of task {t + 1}'s {steps} steps had a non-finite loss and were skipped, more than "
                f"train.max_nonfinite_fraction={limit:g}"))

    def run(self, resume: bool = False) -> dict:
        if resume:
            self.restore()
        if self.dist.is_main:  # on resume: with the overrides it accepted (RESUME_OVERRIDES)
            rundir.atomic_write(self.out / "config.json", json.dumps(to_dict(self.cfg), indent=1))
        t0 = time.perf_counter() - self.state.wall_time_s
        # comm counters live in this process: per-step volumes use the steps run here (not the resumed ones)
        self._steps_at_start, self._comm_at_start = self.state.steps, dict(self.dist.payload_bytes)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        overview = run_overview(self)
        if self.show_overview and self.dist.is_main:
            print(overview, flush=True)
        self.log("start", resume=resume, plan=self.plan.describe(), trainable=self.model.trainable_parameter_counts(), overview=overview,
                 data_workers=describe_workers(self.cfg.data.num_workers, self.device, {t.name: t.train for t in self.tasks},
                                               self.cfg.train.batch_size, self.backbone.image_size))
        with self._interrupt:
            while self.state.task < self._n_tasks:
                t = self.state.task
                if not self.state.trained:
                    self.train_task(t)
                    # Checkpoint the trained units before evaluating: a failure while evaluating loses no training,
                    # and a resume re-runs only the evaluation.
                    self.state.trained, self.state.epoch, self.state.batch, self.state.step = True, 0, 0, None
                    self.state.wall_time_s = time.perf_counter() - t0
                    self.save(None)
                row = self.evaluate_after(t)
                self.state.acc_matrix.append(row)
                self.log("eval", task=t, row=row)
                self.state.task, self.state.trained = t + 1, False
                self.state.wall_time_s = time.perf_counter() - t0
                self.save(None)
        self.state.wall_time_s = time.perf_counter() - t0
        results = self.results()
        if self.dist.is_main:
            rundir.atomic_write(self.out / "results.json", json.dumps(results, indent=1))
        self.log("done", summary=results["summary"])
        return results

    def results(self) -> dict:
        sc, s = self.scenario, self.state
        names = [t.name for t in self.tasks]
        sizes = [len(t.test) if not self.cfg.eval_max_samples else min(len(t.test), self.cfg.eval_max_samples) for t in self.tasks]
        summary = summarize(s.acc_matrix, sc.protocol, sizes)
        return {
            "protocol": sc.protocol, "scenario": sc.name, "tasks": names, "task_test_sizes": sizes,
            "acc_matrix": s.acc_matrix, "summary": summary, "config": to_dict(self.cfg),
            "plan": self.plan.describe(), "cost": self.cost(), "zo_signal": self.signal.summary(),
        }

    def cost(self) -> dict:
        s = self.state
        counts = self.model.trainable_parameter_counts()
        by_mode: dict[str, int] = {}
        for u in self.model.unit_list():
            key = f"{u.info.modality}.{self.plan.mode(u.info.modality, u.info.layer)}"
            by_mode[key] = by_mode.get(key, 0) + sum(p.numel() for p in u.parameters())
        if self.device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(self.device), "cuda_max_allocated"
        else:
            import resource
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"
        return {
            "trainable_params": {"total": counts["total"], "by_part": by_mode, "by_kind": counts},
            "peak_mem_bytes": int(peak), "peak_mem_kind": kind,
            # per task, one training step's live tensors above the model's parameters (as `mozo bench` measures)
            "step_peak_bytes": [s.step_peak_bytes.get(str(t)) for t in range(len(self.tasks))],
            "step_peak_kind": "cuda_max_allocated" if self.device.type == "cuda" else "cpu_live_tensors",
            "wall_time_s": s.wall_time_s, "step_time_s": statistics.median(s.step_times) if s.step_times else None,
            "steps": s.steps, "forward_passes": s.forward_passes, "backward_passes": s.backward_passes,
            "tower_forwards": s.tower_forwards, "skipped_nonfinite_steps": s.skipped_nonfinite,
            "skipped_images": len(s.skipped_images), "world_size": self.dist.world_size,
            **self._comm_cost(),
        }

    def _comm_cost(self) -> dict:
        """Training all-reduce volume per step (eval counted apart). `comm_payload_bytes_per_step` is what each rank
        contributes per step by kind whatever the world size (also on one process, where nothing is sent)."""
        start = getattr(self, "_comm_at_start", {})
        delta = {k: v - start.get(k, 0) for k, v in self.dist.payload_bytes.items()}
        steps = self.state.steps - getattr(self, "_steps_at_start", 0)
        per_step = {k: delta.get(k, 0) / steps if steps else 0.0 for k in TRAIN_KINDS}
        return {"comm_bytes_per_step": sum(per_step.values()) if self.dist.active else 0.0,
                "comm_payload_bytes_per_step": per_step, "comm_eval_bytes": delta.get("eval", 0),
                "comm_backend": self.dist.backend}


def seeded_subset(images, n: int, *key: int):
    """Up to n of `images`, a seeded choice (a function of `key` alone), in their original order."""
    pick = np.random.default_rng(mix_seed(*key) % 2**32).permutation(len(images))
    return images.subset(np.sort(pick[:n]))


def _device(spec: str) -> torch.device:
    from mozo.engine.distributed import resolve_device

    return resolve_device(spec)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def run_experiment(cfg: RunConfig, out_dir: str | Path, scenario: Scenario | None = None, data_root: str | Path | None = None,
                   resume: bool = False, progress: bool = True, dist: DistContext | None = None,
                   on_step: Optional[Callable[[Runner], None]] = None, overwrite: bool = False,
                   show_overview: bool = False) -> dict:
    """Run (or resume) one experiment and return its results.json content.

    The run directory is checked (and locked) before the data or the backbone is loaded. On resume the data
    root recorded in run.json is used unless `data_root` is given, and the data must match its fingerprint.
    """
    from mozo.engine.logs import check_available

    check_available(cfg.log.wandb)  # a missing optional logger is reported before anything is written
    out = Path(out_dir)
    is_main = dist is None or dist.is_main
    if is_main:
        rundir.prepare(out, resume, overwrite)
    info = rundir.read_run_info(out) if resume else {}
    if data_root is None and info.get("data_root"):
        data_root = info["data_root"]
    with rundir.RunLock(out) if is_main else contextlib.nullcontext():
        if scenario is None:
            from mozo.engine.scenarios import build_scenario

            scenario = build_scenario(cfg, data_root)
        fingerprint = rundir.data_fingerprint(scenario, Path(data_root) if data_root else None)
        if resume:
            rundir.check_fingerprint(out, info.get("data", []), fingerprint)
        elif is_main:
            rundir.write_run_info(out, Path(data_root) if data_root else None, fingerprint)
        runner = Runner(cfg, out, scenario, dist=dist, progress=progress, on_step=on_step, show_overview=show_overview)
        return runner.run(resume=resume)
