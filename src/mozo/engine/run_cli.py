"""`mozo run CONFIG [key=value ...] --data-root DIR --out DIR` and `mozo run --resume RUN_DIR [key=value ...]`.

Exit codes: 0 done, 1 the run failed (data, checkpoint, non-finite training), 2 bad input (nothing was
loaded), 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint (resume with --resume).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="preset name (e.g. cifar100-10-10, mtcl-order1, demo) or a YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. plan=vision:hop-even peft=lora zo.rule=mozo")
    p.add_argument("--data-root", help="folder holding the datasets in their standard layouts (docs/datasets.md); "
                                       "on --resume, the run's recorded data root is the default")
    p.add_argument("--out", help="run directory (default runs/<preset>-<plan>-seed<N>-<digest of the config>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint; "
                                                       "key=value may change only the keys docs/experiments.md lists")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the presets and the valid config keys")


def default_out(cfg) -> Path:
    """A default run directory that tells runs apart: two configurations never share one."""
    from mozo.engine.config import to_dict

    digest = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    plan = cfg.plan.replace(":", "_").replace("+", "_").replace(",", "_")
    return Path("runs") / f"{cfg.name}-{plan}-seed{cfg.seed}-{digest}"


def resume_config(run_dir: Path, overrides: list[str]):
    """The run's config.json with the overrides a resume accepts applied (any other key is refused)."""
    from mozo.engine.config import ConfigError, apply, from_dict, to_dict, ALIASES
    from mozo.engine.loop import RESUME_OVERRIDES

    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
        cfg = from_dict(saved)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise ConfigError(f"{path} is not a valid mozo configuration ({exc}); restore it from the run's "
                          f"checkpoint or start a new run") from exc
    for item in overrides:
        key, sep, value = item.partition("=")
        key = ALIASES.get(key.strip(), key.strip())
        if not sep or key not in RESUME_OVERRIDES:
            raise ConfigError(f"a resumed run keeps its configuration; {item!r} cannot change on resume. Keys that may: "
                              f"{', '.join(RESUME_OVERRIDES)}. Start a new run (--out) to change anything else")
        apply(cfg, {key: value})
    return from_dict(to_dict(cfg))


def main(args: argparse.Namespace) -> int:
    from mozo.engine.checkpoint import CheckpointError
    from mozo.engine.config import ConfigError, load_config, preset_names, valid_keys
    from mozo.engine.distributed import init_distributed, shutdown
    from mozo.engine.logs import check_available
    from mozo.engine.loop import RunFailed, RunInterrupted, run_experiment
    from mozo.engine.rundir import RunDirError, prepare
    from mozo.metrics.cli import format_summary

    if args.list:
        print("presets:", ", ".join(preset_names()))
        print("keys:", ", ".join(valid_keys()))
        return 0
    try:
        if args.resume:
            out = Path(args.resume)
            if args.out and Path(args.out).resolve() != out.resolve():
                raise ConfigError(f"--resume continues the run in {out} where it is; --out {args.out} cannot move it "
                                  f"(copy the folder and resume the copy)")
            if args.overwrite:
                raise ConfigError("--overwrite and --resume contradict each other: resume keeps the run, overwrite replaces it")
            prepare(out, resume=True)
            overrides = ([args.config] if args.config else []) + list(args.overrides)
            cfg = resume_config(out, overrides)
            check_available(cfg.log.wandb)
        else:
            if not args.config:
                raise ConfigError("give a preset or YAML file (mozo run --list shows the presets), or --resume RUN_DIR")
            cfg = load_config(args.config, args.overrides)
            check_available(cfg.log.wandb)  # log.wandb=true without wandb: said before anything loads
            out = Path(args.out) if args.out else default_out(cfg)
            if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 owns the run directory
                prepare(out, resume=False, overwrite=args.overwrite)
    except (ConfigError, ValueError, RunDirError) as exc:
        print(f"mozo run: {exc}", file=sys.stderr)
        return 2
    try:
        dist = init_distributed(cfg.distributed_backend, cfg.device, cfg.distributed_timeout_s)
    except (ValueError, RuntimeError) as exc:
        print(f"mozo run: {exc}", file=sys.stderr)
        return 2
    try:
        results = run_experiment(cfg, out, data_root=args.data_root, resume=bool(args.resume), progress=not args.no_progress,
                                 dist=dist, show_overview=True)
    except RunInterrupted as exc:
        print(f"\nmozo run: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # a second signal: stopped at once, the last checkpoint stands
        print(f"\nmozo run: {exc or 'stopped'}; the last checkpoint in {out} stands: mozo run --resume {out}", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RunFailed, CheckpointError, RunDirError) as exc:
        print(f"mozo run: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"mozo run: {_explain_runtime(exc, cfg)}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    if dist.is_main:
        print(f"\nresults: {out / 'results.json'}")
        print(format_summary(results, results["summary"]))
        skipped = results["cost"].get("skipped_nonfinite_steps", 0)
        if skipped:
            print(f"warning: {skipped} of {results['cost']['steps']} steps were skipped for a non-finite loss "
                  f"(train.skip_nonfinite)", file=sys.stderr)
    return 0


def _explain_runtime(exc: RuntimeError, cfg) -> str:
    """A collective that timed out names the setting that bounds it."""
    text = str(exc)
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"{text.splitlines()[0]}: a rank did not reach a collective within distributed_timeout_s="
                f"{cfg.distributed_timeout_s:g} s (a stalled or dead rank, or a very slow step). The last checkpoint "
                f"stands; raise distributed_timeout_s if steps are legitimately that slow, then resume")
    return text
