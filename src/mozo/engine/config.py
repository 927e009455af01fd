"""The run configuration: typed dataclasses, YAML presets, and `key=value` overrides.

A preset is a YAML file of nested sections (`train:`, `zo:`, `peft:`, `data:`) plus top-level keys.
Overrides use dotted keys (`zo.rule=mozo`, `train.lr=5e-4`) or the short aliases every preset
accepts (`batch_size`, `peft`, `max_steps_per_task`, ...). An unknown key is an error that names it
and the nearest valid keys: a typo must never be silently ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_type_hints

import yaml

from mozo.backbone.clip import DEFAULT_BACKBONE, PROMPT_PADDINGS
from mozo.data.loader import NUM_WORKERS_CHOICES
from mozo.data.mtcl import MTCL_ORDERS, resolve_mtcl_key
from mozo.data.readers import READERS
from mozo.data.scenario import CIL_PROTOCOLS, load_class_orders
from mozo.engine.distributed import BACKENDS
from mozo.methods import MethodConfig, get_method
from mozo.peft.registry import PeftConfig, unknown_peft_key
from mozo.zo.config import ZOConfig, check_range
from mozo.zo.plan import parse_clauses

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class DataConfig:
    protocol: str = "cifar100-10-10"  # a CIL protocol preset, mtcl-order1/2[-5shot], cil (custom split), or demo
    template: str = "a bad photo of a {}."
    # longest: prompts cut at the longest one (the same features: the text tower is causal, docs/benchmarks.md
    # optimisation 6); max_length: padded to the 77-token context, as the reference code does.
    prompt_padding: str = "longest"
    few_shot: Optional[int] = None  # k training images per class
    num_workers: Any = "auto"  # auto (mozo.data.loader.resolve_num_workers) | an integer >= 0 of loader worker processes
    skip_corrupt: bool = False  # skip (and count) unreadable images instead of stopping
    eval_batch_size: int = 256
    eval_future: bool = False  # cil: also score not-yet-trained tasks zero-shot on their own classes (Transfer)
    datasets: Optional[list[str]] = None  # mtcl: restrict/override the dataset sequence
    dataset: Optional[str] = None  # protocol=cil: reader name (cifar100, tinyimagenet, imagenet-r, imagefolder)
    order: Optional[str] = None  # protocol=cil: class order key of class_orders.yaml (None: dataset order)
    initial_increment: Optional[int] = None  # protocol=cil: classes in the first task (None: increment)
    increment: Optional[int] = None  # protocol=cil: classes per task


@dataclass
class TrainConfig:
    """The MoE-Adapters first-order recipe by default: AdamW 1e-3, no weight decay, cosine with 30
    warm-up iterations, one epoch per task, cross-entropy over the current task's classes."""

    batch_size: int = 128
    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_iters: int = 30
    schedule: str = "cosine"  # cosine | constant
    max_steps_per_task: Optional[int] = None
    checkpoint_every: int = 0  # steps; 0 = only after every task
    skip_nonfinite: bool = False  # skip a step whose loss is NaN/inf (counted) instead of stopping
    max_nonfinite_fraction: float = 0.1  # with skip_nonfinite: stop when more of a task's steps than this were skipped
    precision: str = "fp32"  # fp32 | bf16 (autocast; PEFT units and ZO arithmetic stay fp32)
    accumulate: int = 1  # micro-batches per step: FO gradients and ZO loss differences summed over them, one update
    label_smoothing: float = 0.0  # of the cross-entropy (the MTCL reference uses 0.2)
    # The FO learning rate of each task instead of `lr`: null (lr for every task), a list with one lr per task, or
    # under the mtcl protocols a mapping {dataset: lr} (datasets it does not name use lr). Fixed for a run (not
    # a resume override); the warm-up and schedule apply to it as to lr. See task_lr().
    lr_per_task: Any = None


@dataclass
class LogConfig:
    """Where a run's events go besides RUN_DIR/events.jsonl (engine/logs.py)."""

    tensorboard: bool = True  # mirror losses and accuracies to RUN_DIR/tb when tensorboard is installed
    wandb: bool = False  # also to Weights & Biases (pip install wandb; WANDB_MODE=offline works without an account)
    wandb_project: Optional[str] = None  # None: $WANDB_PROJECT, else "mozo"


@dataclass
class RunConfig:
    name: str = "run"
    backbone: str = DEFAULT_BACKBONE
    plan: str = "fo"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_tasks: Optional[int] = None  # run only the first N tasks
    eval_max_samples: Optional[int] = None  # cap test samples per task (seeded choice)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    log: LogConfig = field(default_factory=LogConfig)
    method: MethodConfig = field(default_factory=MethodConfig)  # the continual-learning method (mozo/methods/)
    distributed_backend: str = "auto"  # auto | nccl | gloo
    distributed_timeout_s: float = 600.0  # a collective waiting longer for a stalled rank fails with a clear error


ALIASES = {
    "batch_size": "train.batch_size",
    "max_steps_per_task": "train.max_steps_per_task",
    "epochs": "train.epochs",
    "lr": "train.lr",
    "peft": "peft.kind",
    "protocol": "data.protocol",
    "few_shot": "data.few_shot",
    "precision": "train.precision",
}


class ConfigError(ValueError):
    pass


def valid_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += valid_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


# Keys an earlier mozo wrote (in a run's config.json, too), with what replaced them.
RENAMED = {"zo.per_tower": "zo.granularity=tower", "zo.per_unit": "zo.granularity=unit"}


def _unknown(key: str) -> ConfigError:
    if key in RENAMED:
        return ConfigError(f"config key {key!r} was replaced by {RENAMED[key]} (joint, tower or unit: what one loss difference covers)")
    if key.startswith("peft."):  # nearest keys and the valid keys of its section; old flat keys: the new one
        return ConfigError(unknown_peft_key(key))
    candidates = valid_keys() + list(ALIASES)
    near = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    return ConfigError(f"unknown config key {key!r}.{hint} Valid keys: {', '.join(sorted(candidates))}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """YAML-parse strings from the command line and check the basic type."""
    if isinstance(value, str) and hint is not str:
        value = yaml.safe_load(value)
    text = str(hint)
    if value is None:
        if "Optional" in text or "None" in text or hint is Any:  # Any: the key's own check decides
            return None
        raise ConfigError(f"config key {key!r} cannot be null")
    if hint is bool or text == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects true/false, got {value!r}")
    elif hint is int or "int" in text and "float" not in text and "list" not in text:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} expects an integer, got {value!r}")
    elif hint is float or "float" in text:
        if isinstance(value, str):  # YAML 1.1 reads "5e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} expects a number, got {value!r}")
        value = float(value)
    elif "tuple" in text or "list" in text:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        if "int" in text:  # `peft.layers=1,3` from the command line: ints, not "1" and "3"
            value = [yaml.safe_load(v) if isinstance(v, str) else v for v in value]
        value = tuple(value) if "tuple" in text else list(value)
    elif hint is str or text == "typing.Optional[str]":
        value = str(value)
    return value


def _set(obj: Any, dotted: str, value: Any, full: str) -> None:
    if not isinstance(dotted, str):
        raise ConfigError(f"config keys must be strings, got {full!r} ({type(dotted).__name__})")
    head, _, rest = dotted.partition(".")
    names = {f.name for f in dataclasses.fields(obj)}
    if head not in names:
        raise _unknown(full)
    hint = get_type_hints(type(obj))[head]
    if rest:
        child = getattr(obj, head)
        if not dataclasses.is_dataclass(child):
            raise _unknown(full)
        _set(child, rest, value, full)
    elif dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {full!r} is a section; give a mapping or set {full}.<key>")
        for k, v in value.items():
            _set(getattr(obj, head), k, v, f"{full}.{k}")
    else:
        setattr(obj, head, _coerce(value, hint, full))


def apply(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    for key, value in values.items():
        target = ALIASES.get(key, key)
        if key in ALIASES and isinstance(value, dict):  # `peft: {kind: moe, moe: {rank: 64}}` in YAML
            target = target.split(".")[0]
        _set(cfg, target, value, key)
    return cfg


# Numeric keys of the run, train and data sections: check_range arguments (zo.* and peft.* check themselves).
RANGES: dict[str, dict] = {
    "seed": dict(low=0, integer=True),
    "num_tasks": dict(low=1, integer=True, optional=True),  # upper bound: _task_count
    "eval_max_samples": dict(low=1, integer=True, optional=True),  # null: every test sample
    "distributed_timeout_s": dict(low=0, open_low=True),
    "train.batch_size": dict(low=1, integer=True),
    "train.epochs": dict(low=1, integer=True),
    "train.lr": dict(low=0),
    "train.weight_decay": dict(low=0),
    "train.warmup_iters": dict(low=0, integer=True),
    "train.max_steps_per_task": dict(low=0, integer=True, optional=True),  # 0: no training (the demo's zero-shot row)
    "train.checkpoint_every": dict(low=0, integer=True),
    "train.max_nonfinite_fraction": dict(low=0, high=1),
    "train.label_smoothing": dict(low=0, high=1, open_high=True),
    "train.accumulate": dict(low=1, integer=True),
    "method.distill_weight": dict(low=0),
    "method.temperature": dict(low=0, open_low=True),
    "data.few_shot": dict(low=1, integer=True, optional=True),
    "data.eval_batch_size": dict(low=1, integer=True),
    "data.initial_increment": dict(low=1, integer=True, optional=True),
    "data.increment": dict(low=1, integer=True, optional=True),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "train.precision": ("fp32", "bf16"),
    "train.schedule": ("cosine", "constant"),
    "data.prompt_padding": PROMPT_PADDINGS,
    "data.num_workers": NUM_WORKERS_CHOICES,  # "auto" or any integer >= 0
    "distributed_backend": BACKENDS,
}
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
CIL_ONLY = ("dataset", "order", "initial_increment", "increment")  # data keys only protocol=cil reads


def _get(cfg: RunConfig, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _mtcl_presets() -> dict:
    from mozo.engine.scenarios import MTCL_PRESETS  # scenarios imports this module

    return MTCL_PRESETS


def _task_count(d: DataConfig) -> Optional[int]:
    """The scenario's number of tasks when the configuration alone tells (None: protocol=cil, known from the data)."""
    if d.protocol == "demo":
        from mozo.data.demo_stream import DEMO_TASKS

        return len(DEMO_TASKS)
    if d.protocol in CIL_PROTOCOLS:
        spec = CIL_PROTOCOLS[d.protocol]
        return 1 + (spec["num_classes"] - spec["initial_increment"]) // spec["increment"]
    if d.protocol in _mtcl_presets():
        return len(d.datasets) if d.datasets is not None else len(MTCL_ORDERS[_mtcl_presets()[d.protocol][0]])
    return None


def _check_data(d: DataConfig) -> None:
    protocols = [*CIL_PROTOCOLS, *_mtcl_presets(), "cil", "demo"]
    if d.protocol not in protocols:
        raise ConfigError(f"data.protocol must be one of {', '.join(protocols)}, got {d.protocol!r}")
    try:
        fields = [f[1:] for f in string.Formatter().parse(d.template) if f[1] is not None]
    except ValueError:  # unbalanced braces
        fields = None
    if fields != [("", "", None)]:
        raise ConfigError(f"data.template must contain exactly one {{}} placeholder for the class name "
                          f"(write other braces as {{{{ and }}}}), got {d.template!r}")
    if d.protocol != "cil":
        for key in CIL_ONLY:
            if getattr(d, key) is not None:
                raise ConfigError(f"data.{key} is only read under protocol=cil (data.protocol is {d.protocol!r}: "
                                  f"it would be ignored); remove it, got {getattr(d, key)!r}")
    elif d.dataset not in READERS:
        raise ConfigError(f"protocol=cil needs data.dataset, one of {', '.join(sorted(READERS))}, got {d.dataset!r}")
    if d.protocol == "demo" and d.few_shot is not None:
        raise ConfigError(f"data.few_shot is ignored by the demo stream (it has its own image counts); remove it, got {d.few_shot!r}")
    if d.order is not None:
        orders = load_class_orders()
        if d.order not in orders:
            raise ConfigError(f"data.order must be null (the dataset's own order) or a key of class_orders.yaml "
                              f"({', '.join(orders)}), got {d.order!r}")
    if d.datasets is not None:
        if d.protocol not in _mtcl_presets():
            raise ConfigError(f"data.datasets is only read under the mtcl protocols (data.protocol is {d.protocol!r}: "
                              f"it would be ignored), got {d.datasets!r}")
        if not d.datasets:
            raise ConfigError("data.datasets must be null (the protocol's order) or a non-empty list of MTCL datasets, got []")
        for name in d.datasets:
            try:
                resolve_mtcl_key(str(name))
            except ValueError as exc:
                raise ConfigError(f"data.datasets: {exc}") from None


def _revalidate(cfg: RunConfig) -> RunConfig:
    """Check every value after all are set, before anything loads: the sections' own checks (their
    __post_init__), the run's ranges and choices, the data keys and the plan grammar. Raises ConfigError
    naming the key, the value and what is allowed."""
    try:
        cfg.zo = ZOConfig(**dataclasses.asdict(cfg.zo))
        cfg.peft = PeftConfig(**dataclasses.asdict(cfg.peft))
        for key, limits in RANGES.items():
            check_range(key, _get(cfg, key), **limits)
        parse_clauses(cfg.plan, cfg.peft.towers)  # layers beyond the model's depth: checked once it is loaded
        get_method(cfg.method.name)  # an unknown name lists the registered methods
        from mozo.engine.step import check_accumulate

        check_accumulate(cfg.train.accumulate, cfg.zo)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    for key, choices in CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {_get(cfg, key)!r}")
    if not DEVICE.fullmatch(cfg.device):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}")
    _check_data(cfg.data)
    tasks = _task_count(cfg.data)
    if cfg.num_tasks is not None and tasks is not None and cfg.num_tasks > tasks:
        raise ConfigError(f"num_tasks={cfg.num_tasks} but scenario {cfg.data.protocol!r} has {tasks} tasks: "
                          f"num_tasks must be an integer in [1, {tasks}] or null")
    check_lr_per_task(cfg, tasks)
    return cfg


def _mtcl_sequence(d: DataConfig) -> list[str]:
    """The dataset keys of an mtcl protocol's run, in order."""
    if d.datasets is not None:
        return [resolve_mtcl_key(str(n)) for n in d.datasets]
    return list(MTCL_ORDERS[_mtcl_presets()[d.protocol][0]])


def check_lr_per_task(cfg: RunConfig, tasks: Optional[int]) -> None:
    """train.lr_per_task against the scenario (`tasks`: its number of tasks, None when only the data tells, as
    under protocol=cil; the runner checks again then). Normalises the value in place (numbers to float, dataset
    names to their keys); ConfigError names the key, the value and what is allowed."""
    key, per = "train.lr_per_task", cfg.train.lr_per_task
    if per is None:
        return

    def number(name: str, value: Any) -> float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        try:
            check_range(name, value, low=0)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return float(value)

    if isinstance(per, dict):
        if cfg.data.protocol not in _mtcl_presets():
            raise ConfigError(f"{key} as a mapping {{dataset: lr}} is only read under the mtcl protocols (data.protocol "
                              f"is {cfg.data.protocol!r}); give a list with one learning rate per task, got {per!r}")
        sequence, out = _mtcl_sequence(cfg.data), {}
        for name, value in per.items():
            try:
                dataset = resolve_mtcl_key(str(name))
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None
            if dataset not in sequence:
                raise ConfigError(f"{key} names {name!r}, which is not a task of this run (its datasets: "
                                  f"{', '.join(sequence)}); remove it, got {per!r}")
            out[dataset] = number(f"{key}.{name}", value)
        cfg.train.lr_per_task = out
        return
    if not isinstance(per, (list, tuple)) or not per:
        raise ConfigError(f"{key} must be null, a non-empty list with one learning rate per task, or under the mtcl "
                          f"protocols a mapping {{dataset: lr}}, got {per!r}")
    cfg.train.lr_per_task = [number(f"{key} entries", v) for v in per]
    counts = [n for n in (tasks, cfg.num_tasks) if n is not None]
    if counts and len(per) not in counts:
        want = " or ".join(dict.fromkeys(map(str, counts)))
        raise ConfigError(f"{key} has {len(per)} learning rate(s) but the run has {want} tasks "
                          f"(scenario {cfg.data.protocol!r}{f', num_tasks={cfg.num_tasks}' if cfg.num_tasks else ''}): "
                          f"give one per task, got {cfg.train.lr_per_task!r}")


def task_lr(train: TrainConfig, index: int, name: str) -> float:
    """The FO learning rate of task `index` (named `name`): its train.lr_per_task entry, else train.lr."""
    per = train.lr_per_task
    if per is None:
        return train.lr
    if isinstance(per, dict):
        return per.get(resolve_mtcl_key(name), train.lr)
    return per[index]


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if p.stem != "class_orders")


def _read_yaml(path: Path) -> dict:
    """The mapping a YAML config file holds; ConfigError (with the line where YAML gives one) otherwise."""
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at line {line}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"must hold a mapping of config keys, got a {type(data).__name__}")
    return data


def load_config(source: str | Path, overrides: list[str] | dict | None = None) -> RunConfig:
    """A preset name (see `preset_names()`), or a YAML file, then `key=value` overrides."""
    path = Path(source)
    if not path.suffix and (PRESET_DIR / f"{source}.yaml").exists():
        path = PRESET_DIR / f"{source}.yaml"
    if not path.exists():
        raise ConfigError(f"no preset or YAML file {str(source)!r}; presets: {', '.join(preset_names())}")
    cfg = RunConfig(name=path.stem)
    try:
        apply(cfg, _read_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if isinstance(overrides, dict):
        apply(cfg, overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
            key, value = item.split("=", 1)
            apply(cfg, {key.strip(): value})
    return _revalidate(cfg)


def to_dict(cfg: RunConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def from_dict(data: dict) -> RunConfig:
    """The configuration a run saved (`to_dict`), checked as a preset is; ConfigError names the wrong key."""
    if not isinstance(data, dict):
        raise ConfigError(f"a configuration must be a mapping of config keys, got a {type(data).__name__}")
    return _revalidate(apply(RunConfig(), data))
