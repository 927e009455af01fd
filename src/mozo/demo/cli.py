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
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="seeds per plan (seed, seed+1, ...): the table shows means and "
                   "each hybrid plan's paired difference against its frozen control with a 95%% CI (default 1)")


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def demo_table(rows: list[dict]) -> str:
    head = ("| plan | Last | Avg | Transfer | BWT | Forgetting | ZO vs frozen, Last | step peak MiB (tensors) | time/step ms | FO params | ZO params |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        s = r["summary"]
        lines.append(f"| {r['name']} | {_fmt(s['last'])} | {_fmt(s['avg'])} | {_fmt(s['transfer'])} | {_fmt(s['bwt'])} | "
                     f"{_fmt(s['forgetting'])} | {r.get('zo_effect', '')} | {_fmt(r.get('peak_mib'), 2)} | {_fmt(r.get('step_ms'), 0)} | "
                     f"{r['fo_params']:,} | {r['zo_params']:,} |")
    return "\n".join(lines)


def _bench_rows(plans: list[tuple[str, list[str]]], batch: int, classes: int) -> dict[str, dict]:
    """Peak live tensor bytes of one training step per plan (fresh process each), on the demo model."""
    from mozo.bench.cli import run_bench
    from mozo.bench.measure import BenchSpec

    plan_of = {name: next((o.split("=", 1)[1] for o in over if o.startswith("plan=")), "fo") for name, over in plans if name != "zero-shot"}
    import dataclasses

    from mozo.engine.config import load_config

    peft = load_config("demo").peft  # the demo's own units (their rank), not the bench's defaults
    spec = BenchSpec(backbone="mozo-tiny", peft=peft.kind, batch=batch, classes=classes, steps=3, warmup=1, threads=1,
                     peft_settings=dataclasses.asdict(peft.section()))
    rows, errors = run_bench(spec, sorted(set(plan_of.values())), log=lambda *_: None)
    if errors:
        raise RuntimeError("memory bench failed: " + "; ".join(errors))
    by_plan = {r["plan"]: r for r in rows}
    out = {name: by_plan[p] for name, p in plan_of.items()}
    out["zero-shot"] = by_plan["inference"]
    return out


def _demo_run(name: str, overrides: list[str], seed: int, out: Path, scenario, per_seed: bool) -> dict:
    """One `mozo run` of the demo preset (regenerated on every demo): its summary, parameters and step time."""
    from mozo.engine.config import load_config
    from mozo.engine.loop import run_experiment

    cfg = load_config("demo", overrides + [f"seed={seed}"])
    run_dir = out / (name.replace(":", "_").replace(" (ZO frozen)", "-zo-frozen") + (f"-seed{seed}" if per_seed else ""))
    print(f"\n== {name}, seed {seed} ==", flush=True)
    res = run_experiment(cfg, run_dir, scenario=scenario, progress=True, overwrite=True)
    by_part = res["cost"]["trainable_params"]["by_part"]
    zero = cfg.train.max_steps_per_task == 0
    return {"summary": res["summary"], "run_dir": str(run_dir),
            "fo_params": 0 if zero else sum(v for k, v in by_part.items() if k.endswith(".fo")),
            "zo_params": 0 if zero else sum(v for k, v in by_part.items() if k.endswith(".zo")),
            "step_ms": None if res["cost"]["step_time_s"] is None else 1000 * res["cost"]["step_time_s"]}


def _mean_row(name: str, runs: list[dict]) -> dict:
    """A table row: each metric's mean over the seeds' runs."""
    import statistics

    summary = {k: statistics.fmean(r["summary"][k] for r in runs) if all(r["summary"].get(k) is not None for r in runs) else None
               for k in ("last", "avg", "transfer", "bwt", "forgetting")}
    steps = [r["step_ms"] for r in runs if r["step_ms"] is not None]
    return {"name": name, "summary": summary, "run_dir": runs[0]["run_dir"], "seeds": len(runs),
            "fo_params": runs[0]["fo_params"], "zo_params": runs[0]["zo_params"],
            "step_ms": statistics.median(steps) if steps else None}


def _effect(plan: list[float], frozen: list[float]) -> str:
    """Paired Last difference against the frozen control: one seed its value, several the mean, 95% CI and verdict."""
    from mozo.study.stats import paired_difference

    d = paired_difference(plan, frozen)
    if d["ci"] is None:
        return f"{d['mean']:+.1f} (1 seed)"
    return f"{d['mean']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}] {d['verdict']}"


def main(args: argparse.Namespace) -> int:
    from mozo.data.demo_stream import build_demo_scenario
    from mozo.engine.config import load_config
    from mozo.report import write_report
    from mozo.study.cli import control_overrides

    import torch

    torch.set_num_threads(1)  # the tiny model gains nothing from intra-op threads, and loses a lot under load
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    scenario = build_demo_scenario(seed=args.seed)
    quick = ["train.max_steps_per_task=3", "eval_max_samples=60"] if args.quick else []
    print(f"mozo demo: shipped tiny CLIP, {len(scenario.tasks)} tasks "
          f"({', '.join(t.name for t in scenario.tasks)}), {len(DEMO_PLANS)} plans; output in {out}/", flush=True)
    seeds = list(range(args.seed, args.seed + max(1, args.seeds)))
    rows, run_dirs = [], []
    try:
        for name, overrides in DEMO_PLANS:
            runs = [_demo_run(name, quick + overrides, seed, out, scenario, len(seeds) > 1) for seed in seeds]
            row = _mean_row(name, runs)
            if row["zo_params"]:  # a hybrid plan: the same runs with its ZO units frozen, paired by seed
                control = control_overrides("demo", quick + overrides, "frozen")
                frozen = [_demo_run(f"{name} (ZO frozen)", quick + overrides + control, seed, out, scenario, len(seeds) > 1) for seed in seeds]
                rows_frozen = _mean_row(f"{name} (ZO frozen)", frozen)
                row["zo_effect"] = _effect([r["summary"]["last"] for r in runs], [r["summary"]["last"] for r in frozen])
                rows += [row, rows_frozen]
                run_dirs += [Path(r["run_dir"]) for r in runs + frozen]
            else:
                rows.append(row)
                run_dirs += [Path(r["run_dir"]) for r in runs]
        if not (args.quick or args.no_bench):
            print("\n== memory of one training step per plan (mozo bench, fresh process per plan) ==", flush=True)
            bench = _bench_rows(DEMO_PLANS, batch=load_config("demo").train.batch_size, classes=max(t.num_classes for t in scenario.tasks))
            for r in rows:  # the frozen controls' rows: not benched (fewer trainable units than their plan)
                r["peak_mib"] = bench[r["name"]]["peak_above_model_bytes"] / MiB if r["name"] in bench else None
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
          f"parameters during one training step (zero-shot row: inference). ZO vs frozen: the plan's Last minus the "
          f"same runs with its ZO units frozen (paired by seed; --seeds N for a 95% CI): what the ZO updates contribute.")
    print(f"report: {out / 'report'} ({len(paths)} files); finished in {elapsed:.0f} s on {machine}")
    return 0
