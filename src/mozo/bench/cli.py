"""`mozo bench`: peak memory, saved activations and step time of plans side by side.

Each plan runs in a fresh process (forked from a server that only imported the modules, or a new
interpreter running `python -m mozo.bench.measure`), after warm-up, so no plan inherits another's
allocator state. A forward-only `inference` row (both towers under `no_grad`) is always added: the
floor that zeroth-order plans approach. The table gives every figure as a ratio to the `fo` row when
`fo` is among the plans. How memory is measured: mozo/bench/memory.py and docs/benchmarks.md.

`mozo bench --data PRESET [key=value ...] --data-root DIR` times the input pipeline instead: images/s of the
preset's first training set per loader worker count (mozo/bench/data_rate.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from mozo.backbone.clip import PROMPT_PADDINGS
from mozo.bench.measure import INFERENCE, BenchSpec
from mozo.peft.registry import kind_names
from mozo.zo.rules import RULES

DEFAULT_PLANS = "fo,dual-zo,vision-zo,language-zo"
ISOLATIONS = ("forkserver", "subprocess")
PRELOAD = ["mozo.bench.measure", "transformers.models.clip.modeling_clip"]
MiB = 2**20
SYNTHETIC_DEPTH = {"tiny": 4, "vit-b-16": 12}  # layers per tower of the built-in geometries
RANDOM_INIT_NOTE = ("random initialisation is fine here: memory and speed depend on shapes and plans, "
                    "not on weight values")


def split_plans(text: str) -> list[str]:
    """Split a comma-separated plan list, keeping explicit layer lists (`vision:1,5,9`) whole."""
    plans: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if piece.isdigit() and plans and plans[-1][-1].isdigit():
            plans[-1] += "," + piece
        else:
            plans.append(piece)
    return plans


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="vit-b-16", help="tiny | vit-b-16 (ViT-B/16 geometry, random init) | hub id | save_pretrained folder (default vit-b-16)")
    parser.add_argument("--peft", default="moe", choices=kind_names(), help="PEFT units on every layer of both towers (default moe)")
    parser.add_argument("--towers", default="vision,language", help="towers that get PEFT units (default vision,language)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 4; with --data the preset's train.batch_size)")
    parser.add_argument("--classes", type=int, default=10, help="class prompts encoded per step (default 10)")
    parser.add_argument("--prompt-padding", default="longest", choices=PROMPT_PADDINGS,
                        help="cut prompts at the longest one, as `mozo run` does (default), or pad them to the 77-token context "
                        "as the reference code and the paper's memory table do (same features either way)")
    parser.add_argument("--plans", default=DEFAULT_PLANS, help=f"comma-separated plans (grammar of `mozo run`; default {DEFAULT_PLANS}); an `inference` row is always added")
    parser.add_argument("--json", dest="json_out", metavar="OUT", help="write the rows (a JSON list) here")
    parser.add_argument("--plot", metavar="PNG", help="also draw a bar chart of memory per plan")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per plan; the median is reported (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (default 1)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per measuring process (default: torch's choice; use 1 on a shared machine)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="fp32 or bf16 autocast (default fp32)")
    parser.add_argument("--rule", default="sgd", choices=list(RULES), help="ZO update rule (default sgd)")
    parser.add_argument("--q", type=int, default=1, help="ZO directions per step (default 1)")
    parser.add_argument("--two-sided", action="store_true", help="two-sided ZO estimate")
    parser.add_argument("--fo-at-perturbed", action="store_true", help="two-sided, q=1: FO gradient taken at theta+eps z (one forward fewer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isolation", default="forkserver", choices=ISOLATIONS,
                        help="how each plan gets a fresh process: forkserver (forked from a process that only imported the modules; default) "
                        "or subprocess (a new interpreter per plan)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per plan process (default 1800)")
    data = parser.add_argument_group("input pipeline (--data): images/s of reading + the training transform per loader worker count")
    data.add_argument("--data", metavar="PRESET", help="time the first task's training set of this preset (or YAML) as `mozo run` loads it, "
                      "instead of the plans; `demo` needs no data root")
    data.add_argument("overrides", nargs="*", help="with --data: key=value overrides of the preset, e.g. data.dataset=imagefolder")
    data.add_argument("--data-root", help="with --data: the folder holding the datasets (docs/datasets.md)")
    data.add_argument("--workers", help="with --data: comma-separated worker counts (default 0, 1, 2, 4, ... up to the cores, and auto's)")
    data.add_argument("--images", type=int, default=512, help="with --data: images timed per worker count (default 512, at most the task's)")
    data.add_argument("--image-size", type=int, help="with --data: the transform's output size (default: the preset's backbone's)")
    data.add_argument("--step", action="store_true", help="with --data: also measure the preset's training step (its plan, backbone "
                      "geometry and batch) in a fresh process, to set the images/s it consumes beside the loader's")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_FORKSERVER = None


def _forkserver():
    """A forkserver that imported torch, transformers and mozo once: each plan's process forks from
    it, fresh (no tensor ever allocated, no thread pool started) without paying the imports again."""
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _FORKSERVER = ctx
    return _FORKSERVER


def _relay(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("USDT:") and line.strip())


def run_plan(spec: BenchSpec, plan: str, timeout: Optional[float] = None, isolation: str = "forkserver") -> dict[str, Any]:
    """Measure `plan` in a fresh process; raise RuntimeError with its stderr on failure.

    `forkserver`: a process forked from a server that only imported the modules (fast, POSIX);
    `subprocess`: a new interpreter, `python -m mozo.bench.measure` (pays the imports each time).
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"unknown isolation {isolation!r}; choose one of {ISOLATIONS}")
    with tempfile.TemporaryDirectory(prefix="mozo-bench-") as tmp:
        out, err = Path(tmp) / "row.json", Path(tmp) / "stderr.txt"
        if isolation == "subprocess":
            cmd = [sys.executable, "-m", "mozo.bench.measure", "--spec", json.dumps(asdict(spec)), "--plan", plan, "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
            code, stderr = proc.returncode, proc.stderr
        else:
            from mozo.bench.measure import run_child

            p = _forkserver().Process(target=run_child, args=(asdict(spec), plan, str(out), str(err)))
            p.start()
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join()
                raise RuntimeError(f"plan {plan!r} timed out after {timeout} s")
            code, stderr = p.exitcode, (err.read_text(errors="replace") if err.exists() else "")
        if code != 0 or not out.exists():
            raise RuntimeError(f"plan {plan!r} failed (exit {code}):\n{_relay(stderr)[-3000:]}")
        row = json.loads(out.read_text())
        if _relay(stderr):
            row["stderr"] = _relay(stderr)[-2000:]
        return row


def run_bench(spec: BenchSpec, plans: Sequence[str], timeout: Optional[float] = None, log=print,
              isolation: str = "forkserver") -> tuple[list[dict], list[str]]:
    """Rows for `plans` then the `inference` row; also the errors of plans that failed."""
    rows, errors = [], []
    todo = [p for p in plans if p != INFERENCE] + [INFERENCE]
    for i, plan in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {plan} ...")
        try:
            row = run_plan(spec, plan, timeout, isolation)
        except (RuntimeError, subprocess.TimeoutExpired) as err:  # one failed plan does not stop the others
            errors.append(str(err))
            log(f"  error: {err}")
            continue
        log(f"  peak {row['peak_mem_bytes'] / MiB:.1f} MiB (above model {row['peak_above_model_bytes'] / MiB:.1f}), "
            f"saved {row['saved_activation_bytes'] / MiB:.1f} MiB, step {row['step_time_s']:.3f} s")
        rows.append(row)
    return rows, errors


def _ratio(value: Optional[float], ref: Optional[float]) -> str:
    if value is None or not ref:
        return "-"
    return f"{value / ref:.3f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table; ratios are to the `fo` row (`-` when there is none)."""
    fo = next((r for r in rows if r["plan"] == "fo"), None)

    def ref(key: str) -> Optional[float]:
        return fo[key] if fo else None

    head = ("| plan | peak MiB (incl. model) | x fo | peak above model MiB | x fo | saved for backward MiB | x fo "
            "| step s (median) | x fo | step CPU s | x fo | fwd | bwd | FO params | ZO params |")
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in rows:
        tp = r["trainable_params"]
        lines.append(
            f"| {r['plan']} | {r['peak_mem_bytes'] / MiB:.1f} | {_ratio(r['peak_mem_bytes'], ref('peak_mem_bytes'))} "
            f"| {r['peak_above_model_bytes'] / MiB:.1f} | {_ratio(r['peak_above_model_bytes'], ref('peak_above_model_bytes'))} "
            f"| {r['saved_activation_bytes'] / MiB:.1f} | {_ratio(r['saved_activation_bytes'], ref('saved_activation_bytes'))} "
            f"| {r['step_time_s']:.3f} | {_ratio(r['step_time_s'], ref('step_time_s'))} "
            f"| {r['step_cpu_time_s']:.3f} | {_ratio(r['step_cpu_time_s'], ref('step_cpu_time_s'))} "
            f"| {r['forward_passes']} | {r['backward_passes']} | {tp['fo']:,} | {tp['zo']:,} |"
        )
    return "\n".join(lines)


def describe(spec: BenchSpec, rows: list[dict]) -> str:
    first = rows[0] if rows else {}
    model_mib = first.get("model_param_bytes", 0) / MiB
    return (f"backbone {spec.backbone}, peft {spec.peft} on {'+'.join(spec.towers)}, batch {spec.batch}, {spec.classes} class prompts "
            f"({'padded to the longest' if spec.prompt_padding == 'longest' else 'padded to the context length'}), "
            f"device {spec.device}, {first.get('threads', '?')} thread(s), torch {first.get('torch', '?')}, "
            f"ZO rule {spec.zo_rule} q={spec.q} {'two' if spec.two_sided else 'one'}-sided"
            f"{' (FO gradient at theta+eps z)' if spec.fo_at_perturbed else ''}, "
            f"{spec.warmup} warm-up + {spec.steps} timed steps per plan; model parameters {model_mib:.1f} MiB\n"
            f"memory: {first.get('memory_method', '?')}\n{RANDOM_INIT_NOTE}")


def data_main(args: argparse.Namespace) -> int:
    """`mozo bench --data PRESET`: the input pipeline's images/s (mozo/bench/data_rate.py)."""
    from mozo.bench.data_rate import format_report, run_data_bench, step_rate
    from mozo.engine.config import ConfigError, load_config

    try:
        counts = [int(c) for c in args.workers.split(",") if c.strip()] if args.workers else None
    except ValueError:
        counts = [-1]
    if counts is not None and (not counts or min(counts) < 0):
        print(f"mozo bench: error: --workers takes comma-separated integers >= 0, got {args.workers!r}", file=sys.stderr)
        return 2
    if args.images < 1 or (args.batch is not None and args.batch < 1) or (args.image_size is not None and args.image_size < 1):
        print("mozo bench: error: --images, --batch and --image-size must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.data, args.overrides)
    except ConfigError as exc:
        print(f"mozo bench: error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        result = run_data_bench(cfg, args.data_root, args.batch, args.images, counts, args.device, args.image_size, log)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:  # the readers' layout errors, corrupt images
        print(f"mozo bench: error: {exc}", file=sys.stderr)
        return 1
    step = None
    if args.step:
        log(f"training step: {cfg.plan} ...")
        try:
            step = step_rate(cfg, result["batch"], result["classes"], result["device"], args.threads, args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"mozo bench: error: the training step failed: {exc}", file=sys.stderr)
            return 1
        result["step"] = step
    print(format_report(result, step))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2))
        print(f"\nresult written to {args.json_out}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.data:
        return data_main(args)
    if args.overrides:
        print(f"mozo bench: error: key=value overrides ({' '.join(args.overrides)}) apply only with --data PRESET", file=sys.stderr)
        return 2
    args.batch = 4 if args.batch is None else args.batch
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.classes < 1:
        print("mozo bench: error: --steps, --batch and --classes must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    plans = split_plans(args.plans)
    depth = SYNTHETIC_DEPTH.get(args.backbone)
    if depth is not None:  # catch a malformed plan here rather than in a child process's traceback
        from mozo.zo.plan import PlanError, parse_plan

        for plan in plans:
            if plan != INFERENCE:
                try:
                    parse_plan(plan, {m: depth for m in ("vision", "language")})
                except PlanError as err:
                    print(f"mozo bench: error: {err}", file=sys.stderr)
                    return 2
    towers = tuple(t.strip() for t in args.towers.split(",") if t.strip())
    if not towers or set(towers) - {"vision", "language"}:
        print(f"mozo bench: error: --towers takes vision, language or both, got {args.towers!r}", file=sys.stderr)
        return 2
    spec = BenchSpec(backbone=args.backbone, peft=args.peft, towers=towers, batch=args.batch, classes=args.classes, prompt_padding=args.prompt_padding, steps=args.steps,
                     warmup=args.warmup, device=args.device or _default_device(), seed=args.seed, precision=args.precision,
                     zo_rule=args.rule, q=args.q, two_sided=args.two_sided,
                     fo_at_perturbed=args.fo_at_perturbed, threads=args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows, errors = run_bench(spec, plans, args.timeout, log, args.isolation)
    if rows:
        print(describe(spec, rows))
        print()
        print(format_table(rows))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
        print(f"\nrows written to {args.json_out}")
    if args.plot and rows:
        from mozo.bench.plot import plot_memory

        print(f"chart written to {plot_memory(rows, args.plot, title=f'{spec.backbone} {spec.peft}, batch {spec.batch}, {spec.classes} classes, {spec.device}')}")
    if errors:
        print(f"mozo bench: {len(errors)} plan(s) failed", file=sys.stderr)
        return 1
    return 0
