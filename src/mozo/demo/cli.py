"""`mozo demo`: the whole system, offline, in a few minutes on 2 CPU cores.

The shipped tiny CLIP (`mozo-tiny`) learns the demo stream (handwritten digits from scikit-learn and
generated shapes, 4 class-incremental tasks, classes it never saw in pretraining) under several plans
side by side: no training (zero-shot), first-order, vision-ZO, language-ZO, a layer pattern and MoZO.
Each plan is a real `mozo run` (results.json, events.jsonl, checkpoints under runs/demo/<plan>); the
memory column comes from `mozo bench` on the same model, each plan in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

# (row name, overrides of the `demo` preset)
DEMO_PLANS = [
    ("zero-shot", ["train.max_steps_per_task=0"]),
    ("fo", ["plan=fo"]),
    ("vision-zo", ["plan=vision-zo"]),
    ("language-zo", ["plan=language-zo"]),
    ("vision:hop-even", ["plan=vision:hop-even"]),
    ("mozo", ["plan=dual:hop-odd", "zo.rule=mozo"]),
]
MiB = 2**20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="where the runs and the report go (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a shortened demo (3 steps per task, capped evaluation, no memory bench): for tests")
    p.add_argument("--no-bench", action="store_true", help="skip the per-plan memory measurement")
    p.add_argument("--seed", type=int, default=0)


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def demo_table(rows: list[dict]) -> str:
    head = ("| plan | Last | Avg | Transfer | BWT | Forgetting | step peak MiB (tensors) | time/step ms | FO params | ZO params |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        s = r["summary"]
        lines.append(f"| {r['name']} | {_fmt(s['last'])} | {_fmt(s['avg'])} | {_fmt(s['transfer'])} | {_fmt(s['bwt'])} | "
                     f"{_fmt(s['forgetting'])} | {_fmt(r.get('peak_mib'), 2)} | {_fmt(r.get('step_ms'), 0)} | "
                     f"{r['fo_params']:,} | {r['zo_params']:,} |")
    return "\n".join(lines)


def _bench_rows(plans: list[tuple[str, list[str]]], batch: int, classes: int) -> dict[str, dict]:
    """Peak live tensor bytes of one training step per plan (fresh process each), on the demo model."""
    from mozo.bench.cli import run_bench
    from mozo.bench.measure import BenchSpec

    plan_of = {name: next((o.split("=", 1)[1] for o in over if o.startswith("plan=")), "fo") for name, over in plans if name != "zero-shot"}
    spec = BenchSpec(backbone="mozo-tiny", peft="moe", batch=batch, classes=classes, steps=3, warmup=1, threads=1)
    rows, errors = run_bench(spec, sorted(set(plan_of.values())), log=lambda *_: None)
    if errors:
        raise RuntimeError("memory bench failed: " + "; ".join(errors))
    by_plan = {r["plan"]: r for r in rows}
    out = {name: by_plan[p] for name, p in plan_of.items()}
    out["zero-shot"] = by_plan["inference"]
    return out


def main(args: argparse.Namespace) -> int:
    from mozo.data.demo_stream import build_demo_scenario
    from mozo.engine.config import load_config
    from mozo.engine.loop import run_experiment
    from mozo.report import write_report

    import torch

    torch.set_num_threads(1)  # the tiny model gains nothing from intra-op threads, and loses a lot under load
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    scenario = build_demo_scenario(seed=args.seed)
    quick = ["train.max_steps_per_task=3", "eval_max_samples=60"] if args.quick else []
    print(f"mozo demo: shipped tiny CLIP, {len(scenario.tasks)} tasks "
          f"({', '.join(t.name for t in scenario.tasks)}), {len(DEMO_PLANS)} plans; output in {out}/", flush=True)
    rows, run_dirs = [], []
    try:
        for name, overrides in DEMO_PLANS:
            cfg = load_config("demo", quick + overrides + [f"seed={args.seed}"])
            run_dir = out / name.replace(":", "_")
            print(f"\n== {name} ==", flush=True)
            res = run_experiment(cfg, run_dir, scenario=scenario, progress=True, overwrite=True)  # the demo regenerates its runs
            by_part = res["cost"]["trainable_params"]["by_part"]
            zero = name == "zero-shot"
            rows.append({
                "name": name, "summary": res["summary"], "run_dir": str(run_dir),
                "fo_params": 0 if zero else sum(v for k, v in by_part.items() if k.endswith(".fo")),
                "zo_params": 0 if zero else sum(v for k, v in by_part.items() if k.endswith(".zo")),
                "step_ms": None if res["cost"]["step_time_s"] is None else 1000 * res["cost"]["step_time_s"],
            })
            run_dirs.append(run_dir)
        if not (args.quick or args.no_bench):
            print("\n== memory of one training step per plan (mozo bench, fresh process per plan) ==", flush=True)
            bench = _bench_rows(DEMO_PLANS, batch=load_config("demo").train.batch_size, classes=max(t.num_classes for t in scenario.tasks))
            for r in rows:
                r["peak_mib"] = bench[r["name"]]["peak_above_model_bytes"] / MiB
        paths = write_report(run_dirs, out / "report")
    except Exception as exc:  # the demo must say what failed and exit non-zero
        print(f"\nmozo demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    table = demo_table(rows)
    elapsed = time.perf_counter() - start
    machine = f"{platform.machine()}, {__import__('os').cpu_count()} cores, torch {__import__('torch').__version__}"
    (out / "demo_table.md").write_text(table + f"\n\n{elapsed:.0f} s on {machine}\n")
    (out / "demo_rows.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table)
    print(f"\nLast/Avg: accuracy (%) over all classes seen; Transfer: zero-shot accuracy on tasks before training them; "
          f"BWT < 0 and Forgetting > 0 measure forgetting. Step peak: live tensor bytes above the model's own "
          f"parameters during one training step (zero-shot row: inference).")
    print(f"report: {out / 'report'} ({len(paths)} files); finished in {elapsed:.0f} s on {machine}")
    return 0
