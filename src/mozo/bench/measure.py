"""Measure one plan (or the forward-only `inference` floor) in this process: one row of `mozo bench`.

`mozo bench` runs every plan through `python -m mozo.bench.measure --spec JSON --plan P --out FILE`
in a fresh interpreter, so that no plan inherits another's allocator state, autograd caches or
lazily created optimizer state. In the process:

1. build the backbone (random init is fine for memory and speed: both depend on shapes, not values),
   the PEFT units, random images, labels and the class prompts, and the `HybridStep` of the plan;
2. warm up (`warmup` steps: lazy optimizer state, first-call kernels, allocator growth);
3. time `steps` steps and keep the median;
4. one more step under the memory tracker (peak live bytes above the state before the step);
5. one more step under saved-tensor hooks (bytes autograd keeps for backward).

The `inference` row is the floor ZO approaches: both towers forward once under `no_grad` in eval
mode, then the logits and the loss.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from mozo.backbone.clip import BASE_WORDS
from mozo.backbone.towers import MODALITIES
from mozo.bench.memory import SavedTensorCounter, live_state_tensors, measure_peak, storage_bytes

INFERENCE = "inference"
PROMPT = "a bad photo of a {}."


@dataclass
class BenchSpec:
    """Everything that defines a bench run except the plan (shared by all rows of one table)."""

    backbone: str = "tiny"
    peft: str = "moe"  # a registered unit kind (mozo.peft.registry.kind_names()), at its section's defaults
    towers: tuple = ("vision", "language")  # towers that get PEFT units
    batch: int = 4
    classes: int = 10
    prompt_padding: str = "longest"  # longest (what `mozo run` does by default) | max_length (77 tokens, the reference's)
    steps: int = 3
    warmup: int = 1
    device: str = "cpu"
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    zo_rule: str = "sgd"
    q: int = 1
    two_sided: bool = False
    fo_at_perturbed: bool = False
    threads: Optional[int] = None  # torch intra-op threads; None = torch's default
    peft_settings: dict = field(default_factory=dict)  # keys of the kind's section, e.g. {"rank": 16} (the demo's units)
    extra: dict = field(default_factory=dict)


def class_prompts(n: int) -> list[str]:
    """`n` distinct prompts (at the default padding every prompt has the context length, so their words do not change the cost)."""
    words = list(BASE_WORDS)
    names = [words[i % len(words)] + ("" if i < len(words) else f" {i // len(words)}") for i in range(n)]
    return [PROMPT.format(w) for w in names]


def plan_parts(plan, model) -> dict[str, int]:
    """Unit parameters per mode (fo / zo / frozen) and per modality.mode, plus the total."""
    counts = {"fo": 0, "zo": 0, "frozen": 0}
    for m in MODALITIES:
        for mode in ("fo", "zo", "frozen"):
            counts[f"{m}.{mode}"] = 0
    for u in model.unit_list():
        mode = plan.mode(u.info.modality, u.info.layer) if plan is not None else "frozen"
        n = sum(p.numel() for p in u.parameters())
        counts[mode] += n
        counts[f"{u.info.modality}.{mode}"] += n
    counts["total"] = counts["fo"] + counts["zo"] + counts["frozen"]
    return counts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_plan(spec: BenchSpec, plan_text: str) -> dict[str, Any]:
    """Build everything for `plan_text` (a plan of mozo/zo/plan.py, or `inference`) and measure it."""
    import mozo

    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    t0 = time.perf_counter()
    backbone = mozo.load_backbone(spec.backbone, device=device, seed=spec.seed)
    model = mozo.MozoCLIP(backbone, mozo.PeftConfig.of(spec.peft, towers=tuple(spec.towers), **spec.peft_settings))
    build_s = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(spec.seed)
    size = backbone.image_size
    pixels = torch.randn(spec.batch, 3, size, size, generator=gen).to(device)
    labels = (torch.arange(spec.batch) % spec.classes).to(device)
    text = backbone.tokenize(class_prompts(spec.classes), device=device, padding=spec.prompt_padding)

    step = None
    if plan_text == INFERENCE:
        plan = None
        model.eval()
        loss_fn = torch.nn.functional.cross_entropy

        @torch.no_grad()
        def run() -> Any:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16"):
                img = model.encode_images(pixels)
                txt = model.encode_texts(text)
                return loss_fn(model.logits(img, txt).float(), labels)

        passes = (1, 0)
        tower_forwards = {m: 1 for m in MODALITIES}
        layer_forwards = {m: model.num_layers(m) for m in MODALITIES}
    else:
        # A plan may carry ZO options after '@', as in `mozo study`: `vision-zo@zo.steps_per_batch=4@zo.parts=w_gate`.
        base, *options = plan_text.split("@")
        zo_options = {"rule": spec.zo_rule, "q": spec.q, "two_sided": spec.two_sided, "fo_at_perturbed": spec.fo_at_perturbed}
        for option in options:
            key, _, value = option.partition("=")
            if not key.startswith("zo.") or not value:
                raise ValueError(f"plan option {option!r}: expected zo.KEY=VALUE after '@'")
            parsed = yaml.safe_load(value) if key[3:] != "parts" else value
            if isinstance(parsed, str) and key[3:] != "parts":  # YAML 1.1 reads 1e-3 as a string
                try:
                    parsed = float(parsed)
                except ValueError:
                    pass
            zo_options[key[3:]] = parsed
        step = mozo.HybridStep(model, base, mozo.ZOConfig(**zo_options), seed=spec.seed, precision=spec.precision)
        plan = step.plan

        def run() -> Any:
            return step(pixels, labels, text)

    for _ in range(spec.warmup):
        out = run()
    times, cpu_times = [], []
    for _ in range(spec.steps):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = run()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)

    state = live_state_tensors(model, pixels, labels, text,
                               step.fo_optimizer if step else None, step.rule.state_dict() if step else None)
    out, mem = measure_peak(run, device, state)
    params = list(model.parameters())
    with SavedTensorCounter(exclude=params) as saved:
        out = run()
    if step is not None:
        passes = (out.forward_passes, out.backward_passes)
        tower_forwards, layer_forwards = out.tower_forwards, out.layer_forwards

    model_param_bytes = storage_bytes(params)
    return {
        "plan": plan_text,
        "peak_mem_bytes": mem.peak_bytes,
        "peak_above_model_bytes": mem.peak_bytes - model_param_bytes,
        "peak_above_start_bytes": mem.peak_delta_bytes,
        "state_bytes": mem.state_bytes,
        "saved_activation_bytes": saved.bytes,
        "saved_tensors": saved.tensors,
        "step_time_s": statistics.median(times) if times else None,
        "step_times_s": times,
        "step_cpu_time_s": statistics.median(cpu_times) if cpu_times else None,
        "forward_passes": passes[0],
        "backward_passes": passes[1],
        "tower_forwards": tower_forwards,
        "layer_forwards": layer_forwards,
        "trainable_params": plan_parts(plan, model),
        "model_param_bytes": model_param_bytes,
        "memory_method": mem.method,
        "memory_events": mem.events,
        "plan_modes": plan.describe() if plan is not None else "forward only, no_grad, eval mode",
        "build_s": build_s,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "spec": asdict(spec),
    }


def run_child(spec: dict, plan: str, out: str, err: Optional[str] = None) -> None:
    """Entry of a measuring process: measure `plan`, write the row to `out` as JSON.

    With `err`, the process's stderr (file descriptor 2, which also receives the profiler's C++
    start/stop lines) goes to that file; the parent relays what matters.
    """
    if err is not None:
        fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stderr.flush()
        os.dup2(fd, 2)
        os.close(fd)
    row = measure_plan(BenchSpec(**spec), plan)
    Path(out).write_text(json.dumps(row, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mozo.bench.measure", description="measure one plan (one row of mozo bench)")
    parser.add_argument("--spec", required=True, help="BenchSpec as JSON")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True, help="write the row here as JSON")
    args = parser.parse_args(argv)
    run_child(json.loads(args.spec), args.plan, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
