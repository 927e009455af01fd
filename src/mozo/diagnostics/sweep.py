"""`mozo sweep`: a grid over MoZO's vision epsilon, language epsilon and ZO learning rate.

Every setting is one `run_experiment` of a preset (default `demo`: the shipped tiny CLIP on the demo
stream) with `zo.rule=mozo`, the given plan and `zo.eps_vision`, `zo.eps_language`, `zo.lr` set;
the table reports Last and Avg (mean and spread over seeds) per setting, best Avg first.
Finished settings are reused when their results.json has the same configuration (re-running a sweep
only runs what is missing).

Examples:
    mozo sweep --eps-vision 1e-4,5e-4,1e-3 --eps-language 5e-4,1e-3,2e-3 --lr 1e-4,3e-4 --plan dual:hop-odd
    mozo sweep --preset demo --plan dual-zo --seeds 0,1 --max-steps-per-task 8 --json sweep.json
    mozo sweep --set backbone=tiny --set protocol=cil --set data.dataset=imagefolder --set data.increment=2 --data-root DIR
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from mozo.diagnostics.cli import parse_floats, parse_ints


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "\n".join(__doc__.split("\n")[2:])
    p.add_argument("--preset", default="demo", help="preset name or YAML file (default demo: backbone mozo-tiny, protocol demo)")
    p.add_argument("--eps-vision", type=parse_floats, default=[1e-4, 5e-4, 1e-3])
    p.add_argument("--eps-language", type=parse_floats, default=[5e-4, 1e-3, 2e-3])
    p.add_argument("--lr", type=parse_floats, default=[1e-4, 3e-4, 1e-3], help="zo.lr values (the sign rule moves every parameter by lr per step)")
    p.add_argument("--plan", default="dual:hop-odd", help="plan of every run (default dual:hop-odd: both towers hold ZO units)")
    p.add_argument("--max-steps-per-task", type=int, default=None)
    p.add_argument("--seeds", type=_ints_or_zero, default=[0], help="comma-separated seeds; Last/Avg are averaged over them")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override for every run (repeatable)")
    p.add_argument("--with-fo", action="store_true", help="also run plan=fo once per seed, as an anchor")
    p.add_argument("--data-root", default=None, help="dataset folder for protocols that read from disk")
    p.add_argument("--out", default="runs/sweep", help="folder of the runs (one sub-folder per setting and seed)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the table as JSON (default OUT_DIR/sweep.json)")
    p.add_argument("--device", default=None, help="config device override (default: the preset's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--dry-run", action="store_true", help="print the settings and exit")


def _ints_or_zero(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return vals


def setting_name(ev: Optional[float], el: Optional[float], lr: Optional[float], seed: int, plan: str) -> str:
    if ev is None:
        return f"{plan.replace(':', '_')}_seed{seed}"
    return f"ev{ev:g}_el{el:g}_lr{lr:g}_seed{seed}"


def grid(eps_vision: Sequence[float], eps_language: Sequence[float], lrs: Sequence[float]) -> list[tuple[float, float, float]]:
    return list(itertools.product(eps_vision, eps_language, lrs))


def run_setting(preset: str, overrides: list[str], out: Path, data_root, scenario_cache: dict) -> dict:
    """One run (reused when out/results.json holds the same configuration)."""
    from mozo.engine.config import load_config, to_dict
    from mozo.engine.loop import run_experiment
    from mozo.engine.scenarios import build_scenario

    cfg = load_config(preset, overrides)
    done = out / "results.json"
    if done.exists():
        res = json.loads(done.read_text())
        if res.get("config") == to_dict(cfg):
            res["_reused"] = True
            return res
    key = json.dumps([to_dict(cfg)["data"], cfg.seed, str(data_root)], sort_keys=True)
    if key not in scenario_cache:
        scenario_cache[key] = build_scenario(cfg, data_root)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    return run_experiment(cfg, out, scenario=scenario_cache[key], data_root=data_root, progress=False)


def _agg(values: list[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0)


def sweep(preset: str, eps_vision, eps_language, lrs, plan: str, seeds: Sequence[int], extra: Sequence[str] = (),
          max_steps: Optional[int] = None, out_dir: str | Path = "runs/sweep", data_root=None, with_fo: bool = False,
          device: Optional[str] = None, log=print) -> dict:
    """Run the grid; return {'settings': [...rows, best Avg first...], 'anchors': [...], 'config': {...}}."""
    out_dir = Path(out_dir)
    common = [f"plan={plan}", "zo.rule=mozo", *extra]
    if max_steps is not None:
        common.append(f"max_steps_per_task={max_steps}")
    if device is not None:
        common.append(f"device={device}")
    cache: dict = {}
    rows, anchors = [], []
    t_start = time.perf_counter()
    settings = grid(eps_vision, eps_language, lrs)
    for i, (ev, el, lr) in enumerate(settings):
        per_seed, errors = [], []
        for seed in seeds:
            t0 = time.perf_counter()
            try:
                res = run_setting(preset, common + [f"zo.eps_vision={ev}", f"zo.eps_language={el}", f"zo.lr={lr}", f"seed={seed}"],
                                  out_dir / setting_name(ev, el, lr, seed, plan), data_root, cache)
            except (FloatingPointError, RuntimeError) as exc:  # e.g. a non-finite loss at a large lr: record, go on
                errors.append({"seed": seed, "error": f"{type(exc).__name__}: {exc}"})
                continue
            per_seed.append({"seed": seed, "last": res["summary"]["last"], "avg": res["summary"]["avg"],
                             "wall_s": time.perf_counter() - t0, "reused": bool(res.get("_reused"))})
        row = {"eps_vision": ev, "eps_language": el, "lr": lr, "last": None, "last_std": None, "avg": None,
               "avg_std": None, "seeds": per_seed, "failed": errors}
        if per_seed:
            row["last"], row["last_std"] = _agg([s["last"] for s in per_seed])
            row["avg"], row["avg_std"] = _agg([s["avg"] for s in per_seed])
        rows.append(row)
        summary = f"Last {row['last']:.2f} Avg {row['avg']:.2f}" if per_seed else "failed"
        log(f"[{i + 1}/{len(settings)}] eps_v={ev:g} eps_l={el:g} lr={lr:g}: {summary}"
            + (f" ({len(errors)} seed(s) failed: {errors[0]['error'][:80]})" if errors else "")
            + f" ({time.perf_counter() - t_start:.0f}s)")
    if with_fo:
        per_seed = []
        fo_common = [c for c in common if not c.startswith("plan=")] + ["plan=fo"]
        for seed in seeds:
            res = run_setting(preset, fo_common + [f"seed={seed}"], out_dir / setting_name(None, None, None, seed, "fo"), data_root, cache)
            per_seed.append({"seed": seed, "last": res["summary"]["last"], "avg": res["summary"]["avg"]})
        last, last_sd = _agg([s["last"] for s in per_seed])
        avg, avg_sd = _agg([s["avg"] for s in per_seed])
        anchors.append({"plan": "fo", "last": last, "last_std": last_sd, "avg": avg, "avg_std": avg_sd, "seeds": per_seed})
    rows.sort(key=lambda r: (r["avg"] is None, -(r["avg"] or 0.0), -(r["last"] or 0.0)))
    return {"preset": preset, "plan": plan, "rule": "mozo", "seeds": list(seeds), "overrides": common,
            "grid": {"eps_vision": list(eps_vision), "eps_language": list(eps_language), "lr": list(lrs)},
            "settings": rows, "anchors": anchors, "best": rows[0] if rows and rows[0]["avg"] is not None else None,
            "wall_time_s": time.perf_counter() - t_start}


def format_table(result: dict) -> str:
    lines = [f"MoZO sweep: preset {result['preset']}, plan {result['plan']}, seeds {result['seeds']} (best Avg first)",
             f"{'eps_vision':>11}{'eps_language':>14}{'zo.lr':>9}{'Last':>14}{'Avg':>14}"]
    for r in result["settings"]:
        head = f"{r['eps_vision']:>11g}{r['eps_language']:>14g}{r['lr']:>9g}"
        if r["avg"] is None:
            lines.append(head + "   failed: " + r["failed"][0]["error"][:60])
            continue
        lines.append(head + f"{r['last']:>8.2f} ±{r['last_std']:<4.2f}{r['avg']:>8.2f} ±{r['avg_std']:<4.2f}"
                     + (f"  ({len(r['failed'])} seed(s) failed)" if r["failed"] else ""))
    for a in result["anchors"]:
        lines.append(f"{'plan ' + a['plan']:>34}{a['last']:>8.2f} ±{a['last_std']:<4.2f}{a['avg']:>8.2f} ±{a['avg_std']:<4.2f}")
    return "\n".join(lines)


def main(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = grid(args.eps_vision, args.eps_language, args.lr)
    if args.dry_run:
        for ev, el, lr in settings:
            print(f"eps_vision={ev:g} eps_language={el:g} lr={lr:g} seeds={args.seeds}")
        return 0
    from mozo.engine.config import ConfigError

    try:
        result = sweep(args.preset, args.eps_vision, args.eps_language, args.lr, args.plan, args.seeds, args.set,
                       args.max_steps_per_task, args.out, args.data_root, args.with_fo, args.device,
                       log=lambda s: print(s, file=sys.stderr, flush=True))
    except ConfigError as exc:
        print(f"mozo sweep: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    path = Path(args.json) if args.json else Path(args.out) / "sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0
