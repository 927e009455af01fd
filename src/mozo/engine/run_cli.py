"""`mozo run CONFIG [key=value ...] --data-root DIR --out DIR` and `mozo run --resume RUN_DIR`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="preset name (e.g. cifar100-10-10, mtcl-order1, demo) or a YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. plan=vision:hop-even peft=lora zo.rule=mozo")
    p.add_argument("--data-root", help="folder holding the datasets in their standard layouts (docs/datasets.md)")
    p.add_argument("--out", help="run directory (default runs/<preset>-<plan>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the presets and the valid config keys")


def main(args: argparse.Namespace) -> int:
    from mozo.engine.config import ConfigError, from_dict, load_config, preset_names, valid_keys
    from mozo.engine.distributed import init_distributed, shutdown
    from mozo.engine.loop import RunInterrupted, run_experiment
    from mozo.metrics.cli import format_summary

    if args.list:
        print("presets:", ", ".join(preset_names()))
        print("keys:", ", ".join(valid_keys()))
        return 0
    try:
        if args.resume:
            run_dir = Path(args.resume)
            if not (run_dir / "config.json").exists():
                raise ConfigError(f"{run_dir} is not a mozo run directory (no config.json); give the --out folder of the run to resume")
            cfg = from_dict(json.loads((run_dir / "config.json").read_text()))
            out = run_dir
            data_root = args.data_root  # datasets are not part of the run directory: pass --data-root again
        else:
            if not args.config:
                raise ConfigError("give a preset or YAML file (mozo run --list shows the presets), or --resume RUN_DIR")
            cfg = load_config(args.config, args.overrides)
            out = Path(args.out or f"runs/{cfg.name}-{cfg.plan.replace(':', '_').replace('+', '_')}")
            data_root = args.data_root
    except (ConfigError, ValueError) as exc:
        print(f"mozo run: {exc}", file=sys.stderr)
        return 2
    try:
        dist = init_distributed(cfg.distributed_backend, cfg.device)
    except (ValueError, RuntimeError) as exc:
        print(f"mozo run: {exc}", file=sys.stderr)
        return 2
    try:
        results = run_experiment(cfg, out, data_root=data_root, resume=bool(args.resume), progress=not args.no_progress, dist=dist)
    except RunInterrupted as exc:
        print(f"\nmozo run: {exc}", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"mozo run: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    if dist.is_main:
        print(f"\nresults: {out / 'results.json'}")
        print(format_summary(results, results["summary"]))
    return 0
