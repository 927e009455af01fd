"""`mozo eval`: evaluation only, of trained units or of the zero-shot backbone, on any protocol's test sets.

    mozo eval RUN_DIR|CHECKPOINT [PRESET] [key=value ...] [--data-root DIR] [--out DIR] [--seen|--all]
    mozo eval --zero-shot PRESET [key=value ...] [--data-root DIR] [--out DIR] [--seen|--all]

RUN_DIR is a folder written by `mozo run` (its newest complete checkpoint is evaluated); CHECKPOINT a
checkpoint folder or its `units.safetensors`. The units fix the model: backbone and peft come from the
run's configuration (config.json, else the checkpoint's own copy) and cannot be overridden. Without
PRESET the run's protocol and data settings are used; with PRESET its protocol and data section replace
them (the units evaluated on another protocol's test sets); key=value then changes any other key
(e.g. `eval_max_samples=null` for every test image, `num_tasks`, `device`, `data.eval_batch_size`).
A bare units file without a configuration needs the PRESET (and overrides) it was trained with.

`--zero-shot PRESET` evaluates the backbone with the units as a run initialises them (zero up
projections: the backbone's own zero-shot accuracy), so its matrix is that of `mozo run PRESET
train.max_steps_per_task=0` and its summary is the zero-shot row the published tables start from.

--seen (default): after each task t, the accuracy on tasks 0..t with the classifier `mozo run` uses
  after task t (cil: every class seen so far; mtcl: the task's own classes), the same code as `mozo
  run` (Runner.evaluate_after). Every row uses the same units; with trained units only the row of the
  task the checkpoint was trained through is a row `mozo run` measured (earlier rows of a run used
  earlier units).
--all: one row, each task's test set against all classes of the evaluated tasks at once.

Writes OUT/results.json (default RUN_DIR/eval/<protocol>-<mode>, or runs/zero-shot-<preset>-seed<N>-
<digest>-<mode>) with the keys of mozo run's results.json and `evaluation` saying what was evaluated.
Exit codes: 0 done, 1 evaluation failed (data, device), 2 bad input (missing folder, no checkpoint,
units that do not fit the configuration, an override of the model), 130 interrupted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

MODEL_KEYS = ("backbone", "peft")  # what the units were trained in; flattened keys equal to or under these


class EvalError(ValueError):
    """Bad input for mozo eval (exit 2); the message names the path or key and the fix."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", help="a run directory, a checkpoint folder or units.safetensors; with --zero-shot a preset or YAML file")
    p.add_argument("rest", nargs="*", metavar="[PRESET] key=value",
                   help="the protocol to evaluate on (default: the run's) and key=value overrides (not backbone or peft.*)")
    p.add_argument("--zero-shot", action="store_true", help="evaluate the backbone itself (the units untrained) under SOURCE, a preset")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--seen", dest="mode", action="store_const", const="seen",
                      help="after each task, the seen-class accuracy as mozo run computes it (default)")
    mode.add_argument("--all", dest="mode", action="store_const", const="all", help="one row: every task against all classes at once")
    p.set_defaults(mode="seen")
    p.add_argument("--data-root", help="folder holding the datasets (default: the run's recorded data root)")
    p.add_argument("--out", help="folder for results.json (default RUN_DIR/eval/<protocol>-<mode>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------------ the source
def _flat(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _is_model_key(key: str) -> bool:
    return any(key == m or key.startswith(m + ".") for m in MODEL_KEYS)


def locate(source: Path) -> dict[str, Optional[Path]]:
    """{'run_dir', 'checkpoint', 'units'} of a run directory, a checkpoint folder or a units file."""
    from mozo.engine.checkpoint import NAME, find_checkpoint

    if not source.exists():
        raise EvalError(f"{source} does not exist; give a run directory written by `mozo run`, its checkpoint folder "
                        f"or a units.safetensors (or --zero-shot PRESET)")
    if source.is_file():
        if source.suffix != ".safetensors":
            raise EvalError(f"{source} is not a units file (.safetensors); give a run directory, a checkpoint folder "
                            f"or its units.safetensors")
        folder = source.parent
        ckpt = folder if source.name == "units.safetensors" and (folder / "state.pt").is_file() else None
        run_dir = folder.parent if (folder.parent / "config.json").is_file() else None
        return {"run_dir": run_dir, "checkpoint": ckpt, "units": source}
    if (source / "units.safetensors").is_file():
        run_dir = source.parent if (source.parent / "config.json").is_file() else None
        ckpt = source if (source / "state.pt").is_file() else None
        return {"run_dir": run_dir, "checkpoint": ckpt, "units": source / "units.safetensors"}
    if (source / "config.json").is_file():
        ckpt = find_checkpoint(source)
        if ckpt is None:
            raise EvalError(f"{source} holds no complete checkpoint ({source / NAME}/ with COMPLETE): the run stopped "
                            f"before its first task's units were saved; resume it (mozo run --resume {source}) or "
                            f"evaluate the backbone with --zero-shot")
        return {"run_dir": source, "checkpoint": None, "units": None}  # load_checkpoint picks (and falls back)
    raise EvalError(f"{source} is neither a run directory (no config.json) nor a checkpoint folder (no units.safetensors)")


def load_units(where: dict[str, Optional[Path]]) -> tuple[dict, Optional[dict], Path]:
    """(units, checkpoint state or None, the checkpoint path); safetensors and weights_only loading only."""
    from mozo.engine.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, read_checkpoint

    if where["units"] is None:  # a run directory: its newest readable checkpoint
        units, state = load_checkpoint(where["run_dir"])
        return units, state, find_checkpoint(where["run_dir"])
    if where["checkpoint"] is not None:
        units, state = read_checkpoint(where["checkpoint"])
        return units, state, where["checkpoint"]
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(where["units"])), None, where["units"]
    except (OSError, SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{where['units']} is unreadable ({type(exc).__name__}: {exc})") from exc


def trained_through(state: Optional[dict]) -> Optional[dict]:
    """How far the checkpointed units were trained: tasks completed, and whether one was cut mid-way."""
    if not state:
        return None
    task, trained = int(state.get("task", 0)), bool(state.get("trained", False))
    partial = not trained and (state.get("step") is not None or state.get("batch", 0) or state.get("epoch", 0))
    return {"tasks": task + (1 if trained else 0), "partial_task": bool(partial), "steps": state.get("steps")}


# ------------------------------------------------------------------------------------------ the config
def _overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EvalError(f"{item!r} is not key=value (a PRESET goes first, once)")
        out[key.strip()] = value
    return out


def eval_config(saved: Optional[dict], preset: Optional[str], overrides: list[str]):
    """The configuration to evaluate under: the model part of the run's, the protocol of PRESET (else the
    run's), then the overrides. Refuses an override of the model the units were trained in."""
    from mozo.engine.config import ALIASES, apply, from_dict, load_config, to_dict

    values = _overrides(overrides)
    if saved is None:
        if preset is None:
            raise EvalError("these units come without a configuration (no config.json, no state.pt); give the preset "
                            "and the overrides they were trained with, e.g. mozo eval UNITS demo peft.kind=lora")
        return load_config(preset, values), None
    cfg = from_dict(saved)
    trained = _flat(to_dict(cfg))
    notes = None
    if preset is not None:
        target = load_config(preset, values)  # the overrides may complete the preset (protocol=cil data.dataset=...)
        cfg.data, cfg.num_tasks, cfg.eval_max_samples = target.data, target.num_tasks, target.eval_max_samples
        other = {k: v for k, v in _flat(to_dict(target)).items() if _is_model_key(k) and trained.get(k) != v}
        if other:
            notes = (f"the units fix the model: backbone={cfg.backbone} and the run's peft are used, not the preset's "
                     f"({', '.join(f'{k}={v}' for k, v in list(other.items())[:4])}{', ...' if len(other) > 4 else ''})")
    apply(cfg, values)
    cfg = from_dict(to_dict(cfg))  # validated as a preset is
    now = _flat(to_dict(cfg))
    changed = sorted(k for k in set(now) | set(trained) if _is_model_key(k) and trained.get(k) != now.get(k))
    if changed:
        was = ", ".join(f"{k}={trained.get(k)}" for k in changed[:4])
        asked = [k for k in values if _is_model_key(ALIASES.get(k, k))]
        raise EvalError(f"the units were trained with {was}; backbone and peft cannot change in mozo eval (the units "
                        f"would not fit): drop {', '.join(asked) or ', '.join(changed[:4])}")
    return cfg, notes


def check_units_fit(runner, units: dict, path: Path) -> None:
    """The units must be exactly the ones the configuration's model holds (names and shapes)."""
    expected = {k: tuple(v.shape) for k, v in runner.model.units.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in units.items()}
    if expected == got:
        return
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    shapes = [f"{k} {got[k]} vs {expected[k]}" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
    parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + ([f"unexpected {', '.join(extra[:3])}"] if extra else []) \
        + ([f"shape {', '.join(shapes[:3])}"] if shapes else [])
    raise EvalError(f"the units in {path} do not fit the model of this configuration (backbone {runner.cfg.backbone}, "
                    f"peft {runner.cfg.peft.kind}): {'; '.join(parts)}; give the preset and overrides they were trained with")


# ------------------------------------------------------------------------------------------ evaluating
def evaluate(runner, mode: str) -> list[list[Optional[float]]]:
    """The rows: `evaluate_after(t)` for every task (seen), or one row against all classes (all)."""
    sc, tasks = runner.scenario, runner.tasks
    if mode == "all":
        if sc.protocol == "cil":
            names = sc.eval_classnames(len(tasks) - 1)  # the test labels index the class order directly
            return [[runner.accuracy(j, names)[0] for j in range(len(tasks))]]
        names, starts = [], []
        for task in tasks:  # mtcl: the datasets' classes side by side; task j's labels move by its start
            starts.append(len(names))
            names += list(task.classnames)
        return [[runner.accuracy(j, names, -starts[j])[0] for j in range(len(tasks))]]
    if sc.protocol == "mtcl":  # task identity is known: a row does not depend on t, so it is computed once
        row = runner.evaluate_after(len(tasks) - 1)
        return [list(row) for _ in tasks]
    return [runner.evaluate_after(t) for t in range(len(tasks))]


def default_out(cfg, where: Optional[dict], mode: str) -> Path:
    from mozo.engine.config import to_dict

    if where is not None:
        base = where["run_dir"] or (where["checkpoint"] or where["units"]).parent
        return base / "eval" / f"{cfg.data.protocol}-{mode}"
    digest = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / f"zero-shot-{cfg.name}-seed{cfg.seed}-{digest}-{mode}"


def check_out(out: Path) -> None:
    from mozo.engine.checkpoint import candidates

    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file, not a folder; choose another --out")
    if (out / "config.json").exists() or candidates(out):
        raise EvalError(f"--out {out} holds a training run; mozo eval never writes into one: choose another --out "
                        f"(the default is RUN_DIR/eval/<protocol>-<mode>)")


def main(args: argparse.Namespace) -> int:
    from mozo.engine.checkpoint import CheckpointError
    from mozo.engine.config import ConfigError
    from mozo.engine.rundir import RunDirError, atomic_write, data_fingerprint, read_run_info

    # -- everything that can be checked before a backbone or a dataset loads (exit 2)
    try:
        if not args.source:
            raise EvalError("give a run directory, a checkpoint, or --zero-shot PRESET")
        if args.zero_shot:
            from mozo.engine.config import load_config

            preset, where, units, state, ckpt, notes = None, None, None, None, None, None
            if Path(args.source).is_dir():
                raise EvalError(f"--zero-shot takes a preset or YAML file, not a folder; to evaluate the units in "
                                f"{args.source}, drop --zero-shot")
            cfg = load_config(args.source, _overrides(args.rest))
        else:
            preset = args.rest[0] if args.rest and "=" not in args.rest[0] else None
            overrides = args.rest[1:] if preset else args.rest
            where = locate(Path(args.source))
            units, state, ckpt = load_units(where)
            saved = None
            if where["run_dir"] is not None:
                path = where["run_dir"] / "config.json"
                try:
                    saved = json.loads(path.read_text())
                except (OSError, UnicodeDecodeError, ValueError) as exc:
                    raise EvalError(f"{path} is unreadable ({exc})") from exc
            elif state is not None and isinstance(state.get("config"), dict):
                saved = state["config"]
            cfg, notes = eval_config(saved, preset, overrides)
        cfg.log.tensorboard = cfg.log.wandb = False  # an evaluation logs nothing but its results.json
        data_root = args.data_root
        info = read_run_info(where["run_dir"]) if where is not None and where["run_dir"] is not None else {}
        if data_root is None:
            data_root = info.get("data_root")
        out = Path(args.out) if args.out else default_out(cfg, where, args.mode)
        check_out(out)
    except (EvalError, ConfigError, RunDirError, CheckpointError, FileNotFoundError) as exc:
        print(f"mozo eval: {exc}", file=sys.stderr)
        return 2
    if notes:
        print(f"mozo eval: note: {notes}", file=sys.stderr)

    # -- the model and the data
    from mozo.engine.distributed import init_distributed, shutdown
    from mozo.engine.loop import Runner, RunInterrupted
    from mozo.engine.scenarios import build_scenario

    try:
        dist = init_distributed(cfg.distributed_backend, cfg.device, cfg.distributed_timeout_s)
    except (ValueError, RuntimeError) as exc:
        print(f"mozo eval: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        scenario = build_scenario(cfg, data_root)
        runner = Runner(cfg, out, scenario, dist=dist, progress=not args.no_progress)
        if units is not None:
            check_units_fit(runner, units, ckpt)
            runner.model.units.load_state_dict({k: v.to(runner.device) for k, v in units.items()})
        rows = evaluate(runner, args.mode)
    except EvalError as exc:
        print(f"mozo eval: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, RunInterrupted):
        print("\nmozo eval: interrupted; nothing written", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RuntimeError, CheckpointError) as exc:
        print(f"mozo eval: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown()

    # -- results.json: mozo run's keys (Runner.results), what was evaluated, and how
    runner.state.acc_matrix = rows
    runner.state.wall_time_s = time.perf_counter() - start
    results = runner.results()
    sizes = results["task_test_sizes"]
    if args.mode == "all":
        row = results.pop("acc_matrix")[0]
        results["acc_all_classes"] = row
        results["summary"] = {"accuracy": sum(s * a for s, a in zip(sizes, row)) / sum(sizes),  # over every test image
                              "mean_task_accuracy": sum(row) / len(row)}
    through = trained_through(state)
    evaluation: dict[str, Any] = {
        "only": True, "kind": "zero-shot" if args.zero_shot else "units", "mode": args.mode,
        "source": str(args.source), "checkpoint": str(ckpt) if ckpt else None,
        "units_trained_through": through, "preset": args.source if args.zero_shot else preset,
        "data_root": str(Path(data_root).resolve()) if data_root else None,
    }
    if info.get("data") and preset is None:  # the run's own protocol: on the data it was trained on?
        evaluation["same_data_as_run"] = info["data"] == data_fingerprint(scenario, Path(data_root) if data_root else None)
    if not args.zero_shot and args.mode == "seen":
        evaluation["note"] = ("every row uses these units; only the row of the last task they were trained through "
                              "is one mozo run measured (its earlier rows used earlier units)")
    results = {"evaluation": evaluation, **results}
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "results.json", json.dumps(results, indent=1))
        except (OSError, RunDirError) as exc:
            print(f"mozo eval: cannot write {out / 'results.json'}: {exc}", file=sys.stderr)
            return 1
        _print(results, out, args.mode)
        if evaluation.get("same_data_as_run") is False:
            print("warning: the test data differs from the data the run was trained and evaluated on (run.json)", file=sys.stderr)
    return 0


def _print(results: dict, out: Path, mode: str) -> None:
    from mozo.metrics.cli import format_summary

    ev = results["evaluation"]
    what = "zero-shot backbone" if ev["kind"] == "zero-shot" else f"units of {ev['checkpoint']}"
    print(f"\nevaluated {what} on {results['scenario']} ({mode}); results: {out / 'results.json'}")
    if mode == "seen":
        print(format_summary(results, results["summary"]))
        return
    print(f"accuracy over all test images {results['summary']['accuracy']:.2f}, mean over tasks "
          f"{results['summary']['mean_task_accuracy']:.2f}")
    for name, acc in zip(results["tasks"], results["acc_all_classes"]):
        print(f"  {name[:40]:<40}{acc:>8.2f}")
