"""`mozo bench --data PRESET`: images per second the input pipeline delivers, per number of loader workers.

What is timed is what `mozo run` does before every step: the preset's first task's training set, built by
`build_scenario` with the same readers, wrapped in the same `TransformedDataset` (seed, label map, training
transform at the backbone's image size) and loaded by `make_loader` (seeded order, batches of
`train.batch_size`, `collate_skipping`). Nothing is sent to a device and no model is loaded unless `--step`
asks for the training step's own rate.

For every worker count: a fresh loader, `--images` images taken from it; reported are the overall rate
(start-up included: forking the workers, the first batch), the steady rate (after the first batch) and
the steady rate per worker. The count `data.num_workers=auto` picks here and on a CUDA device of this
machine is measured too (`mozo.data.loader.resolve_num_workers`).

A training step consumes batch / step_s images per second: compare with `mozo bench --backbone ...
--batch B --plans PLAN` (step s, median) or pass `--step`. docs/benchmarks.md, section Input pipeline.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mozo.backbone.clip import DEFAULT_BACKBONE, SHIPPED, SYNTHETIC
from mozo.data.loader import (TransformedDataset, available_cores, holds_arrays, make_loader, plan_workers,
                              resolve_num_workers)
from mozo.data.transforms import CLIP_MEAN, CLIP_STD, make_transform

SYNTHETIC_SIZE = {"tiny": 32, "vit-b-16": 224}  # vision image_size of backbone.clip.synthetic_config
KNOWN_SIZE = {DEFAULT_BACKBONE: 224, "openai/clip-vit-base-patch32": 224, "openai/clip-vit-large-patch14": 224}
STEP_BACKBONE = {DEFAULT_BACKBONE: "vit-b-16"}  # --step: the same geometry, random init (nothing downloaded)


def preprocessing(backbone: str) -> tuple[int, tuple, tuple, str]:
    """(image size, mean, std, where they come from) of `backbone`'s transform, without loading its weights."""
    if backbone in SYNTHETIC:
        return SYNTHETIC_SIZE[backbone], CLIP_MEAN, CLIP_STD, "synthetic geometry"
    folder = Path(SHIPPED.get(backbone, backbone)).expanduser()
    if (folder / "config.json").is_file():
        cfg = json.loads((folder / "config.json").read_text())
        size = int(cfg.get("vision_config", {}).get("image_size", 224))
        mean, std = CLIP_MEAN, CLIP_STD
        if (folder / "preprocessor_config.json").is_file():
            pre = json.loads((folder / "preprocessor_config.json").read_text())
            mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
        return size, mean, std, f"{folder / 'config.json'}"
    if backbone in KNOWN_SIZE:
        return KNOWN_SIZE[backbone], CLIP_MEAN, CLIP_STD, "known hub geometry"
    try:  # a hub id already in the local cache
        from transformers import CLIPConfig

        size = int(CLIPConfig.from_pretrained(backbone, local_files_only=True).vision_config.image_size)
        return size, CLIP_MEAN, CLIP_STD, "cached hub config"
    except Exception:  # noqa: BLE001 - not cached, a checkpoint file, ...: say what is assumed
        return 224, CLIP_MEAN, CLIP_STD, "assumed (pass --image-size)"


def training_set(cfg, data_root: Optional[str], image_size: Optional[int] = None) -> tuple[TransformedDataset, dict]:
    """The first task's training set exactly as `Runner.train_task` wraps it, and a description.

    Raises what the readers raise (DatasetLayoutError naming the expected path, ValueError for a missing
    --data-root) before anything is timed."""
    from mozo.engine.scenarios import build_scenario
    from mozo.seeds import mix_seed

    size, mean, std, source = preprocessing(cfg.backbone)
    if image_size:
        size, source = int(image_size), "--image-size"
    scenario = build_scenario(cfg, data_root)
    task = scenario.tasks[0]
    label_map = {lab: lab - task.label_offset for lab in task.labels}
    ds = TransformedDataset(task.train, make_transform(True, size, mean, std), seed=mix_seed(cfg.seed, 0),
                            label_map=label_map, skip_corrupt=cfg.data.skip_corrupt)
    info = {"preset": cfg.name, "scenario": scenario.name, "task": task.name, "classes": len(task.classnames), "train_images": len(ds),
            "image_size": size, "image_size_from": source, "in_memory_arrays": holds_arrays(ds)}
    return ds, info


def measure_rate(ds: TransformedDataset, batch_size: int, workers: int, images: int, seed: int = 0,
                 device: str = "cpu") -> dict[str, Any]:
    """Time one fresh loader with `workers` workers over its first `images` images (whole batches).

    `start_s`: from building the loader to the first batch (worker start-up included); `steady`: the
    batches after the first. The loader options (pinning) are those `mozo run` uses on `device`."""
    plan = plan_workers(workers, device, ds)
    t0 = time.perf_counter()
    loader = make_loader(ds, batch_size, shuffle=True, seed=seed, epoch=0, **plan.loader_kwargs())
    got, first_at, first_n = 0, None, 0
    for pixels, labels, _ in loader:
        got += len(labels)
        if first_at is None:
            first_at, first_n = time.perf_counter(), got
        if got >= images:
            break
    end = time.perf_counter()
    del loader  # workers shut down here, outside the timed span
    steady_n, steady_s = got - first_n, end - (first_at or end)
    steady = steady_n / steady_s if steady_n and steady_s > 0 else None
    return {"workers": workers, "images": got, "seconds": end - t0, "start_s": (first_at or end) - t0,
            "images_per_s": got / (end - t0) if end > t0 else None, "steady_images_per_s": steady,
            "steady_per_worker": steady / workers if steady and workers else None, "pin_memory": plan.pin_memory}


def default_counts(cores: int, extra: Sequence[int] = ()) -> list[int]:
    """0, 1, 2, 4, 8, ... up to the cores, plus `extra` (the counts `auto` picks)."""
    counts, n = {0, 1}, 2
    while n <= cores:
        counts.add(n)
        n *= 2
    counts.add(cores)
    return sorted(counts | set(extra))


def step_rate(cfg, batch_size: int, classes: int, device: str, threads: Optional[int], timeout: float = 1800.0) -> dict:
    """The preset's training step, measured as `mozo bench` measures a plan (fresh process, median of 2
    steps after 1 warm-up), on its backbone's geometry; images/s = batch / step s."""
    from mozo.bench.cli import run_plan
    from mozo.bench.measure import BenchSpec

    backbone = STEP_BACKBONE.get(cfg.backbone, cfg.backbone)
    spec = BenchSpec(backbone=backbone, peft=cfg.peft.kind, towers=tuple(cfg.peft.towers), batch=batch_size,
                     classes=classes, prompt_padding=cfg.data.prompt_padding, steps=2, warmup=1, device=device,
                     seed=cfg.seed, precision=cfg.train.precision, threads=threads)
    row = run_plan(spec, cfg.plan, timeout)
    return {"backbone": backbone, "plan": cfg.plan, "batch": batch_size, "step_time_s": row["step_time_s"],
            "images_per_s": batch_size / row["step_time_s"] if row["step_time_s"] else None, "device": device}


def run_data_bench(cfg, data_root: Optional[str], batch_size: Optional[int] = None, images: int = 512,
                   counts: Optional[Sequence[int]] = None, device: Optional[str] = None,
                   image_size: Optional[int] = None, log=print) -> dict[str, Any]:
    """Build the preset's first training set and time it at each worker count; returns everything reported."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ds, info = training_set(cfg, data_root, image_size)
    batch = batch_size or cfg.train.batch_size
    cores = available_cores()
    auto_here = resolve_num_workers("auto", device, ds, batch)
    auto_cuda = resolve_num_workers("auto", "cuda", ds, batch)
    counts = sorted(set(counts)) if counts else default_counts(cores, (auto_here, auto_cuda))
    images = max(1, min(images, len(ds)))
    ds[0]  # warm-up in this process: first decode, lazy imports; workers fork after it
    rows = []
    for n in counts:
        log(f"  {n} worker(s) ...")
        rows.append(measure_rate(ds, batch, n, images, seed=cfg.seed, device=device))
    return {**info, "backbone": cfg.backbone, "plan": cfg.plan, "batch": batch, "images_timed": images, "device": device, "cores": cores,
            "torch_threads": torch.get_num_threads(), "auto": {"here": auto_here, "cuda": auto_cuda},
            "auto_reason": {"here": plan_workers("auto", device, ds, batch).reason, "cuda": plan_workers("auto", "cuda", ds, batch).reason},
            "rows": rows}


def _fmt(x: Optional[float], spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def format_report(result: dict[str, Any], step: Optional[dict] = None) -> str:
    """The text `mozo bench --data` prints: what was timed, what auto picks, a table, the step's demand."""
    r = result
    kind = "in-memory arrays" if r["in_memory_arrays"] else "image files"
    lines = [
        f"input pipeline: preset {r['preset']} ({r['scenario']}), task {r['task']!r}: {r['train_images']} training images "
        f"({kind}), training transform at {r['image_size']} px ({r['image_size_from']}), batch {r['batch']}, "
        f"{r['images_timed']} images per count",
        f"cores {r['cores']} (sched_getaffinity), torch threads in this process {r['torch_threads']} (workers use 1 each), "
        f"device {r['device']}",
        f"data.num_workers=auto -> {r['auto']['here']} here ({r['auto_reason']['here']})",
        f"data.num_workers=auto -> {r['auto']['cuda']} with a CUDA device on this machine ({r['auto_reason']['cuda']})",
        "",
        "| workers | images/s (incl. start-up) | start-up + first batch s | steady images/s | steady per worker |",
        "|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        mark = " (auto here)" if row["workers"] == r["auto"]["here"] else ""
        mark += " (auto on cuda)" if row["workers"] == r["auto"]["cuda"] and r["device"] != "cuda" else ""
        lines.append(f"| {row['workers']}{mark} | {_fmt(row['images_per_s'])} | {_fmt(row['start_s'], '.2f')} "
                     f"| {_fmt(row['steady_images_per_s'])} | {_fmt(row['steady_per_worker'])} |")
    lines.append("")
    if step is not None:
        lines.append(f"training step: {step['plan']} on {step['backbone']} ({step['device']}), batch {step['batch']}: "
                     f"{step['step_time_s']:.3f} s -> consumes {_fmt(step['images_per_s'])} images/s")
    else:
        backbone = STEP_BACKBONE.get(r.get("backbone", ""), r.get("backbone", "BACKBONE"))
        lines.append(f"a training step consumes batch / step_s images/s: `mozo bench --backbone {backbone} --batch {r['batch']} "
                     f"--plans {r.get('plan', 'PLAN')}` prints step s (median); or add --step here")
    return "\n".join(lines)

