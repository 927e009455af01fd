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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_type_hints

import yaml

from mozo.backbone.clip import DEFAULT_BACKBONE, PROMPT_PADDINGS
from mozo.peft.inject import PeftConfig
from mozo.zo.config import ZOConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class DataConfig:
    protocol: str = "cifar100-10-10"  # a CIL protocol preset, mtcl-order1/2[-5shot], cil (custom split), or demo
    template: str = "a bad photo of a {}."
    # longest: prompts cut at the longest one (the same features: the text tower is causal, docs/benchmarks.md
    # optimisation 6); max_length: padded to the 77-token context, as the reference code does.
    prompt_padding: str = "longest"
    few_shot: Optional[int] = None  # k training images per class
    num_workers: int = 0
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


def _unknown(key: str) -> ConfigError:
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
        if "Optional" in text or "None" in text:
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
        value = tuple(value) if "tuple" in text else list(value)
    elif hint is str:
        value = str(value)
    return value


def _set(obj: Any, dotted: str, value: Any, full: str) -> None:
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
        if key in ALIASES and isinstance(value, dict):  # `peft: {kind: moe, rank: 64}` in YAML
            target = target.split(".")[0]
        _set(cfg, target, value, key)
    return cfg


def _revalidate(cfg: RunConfig) -> RunConfig:
    """Re-run the sections' own checks (their __post_init__) after all values are set."""
    try:
        cfg.zo = ZOConfig(**dataclasses.asdict(cfg.zo))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if cfg.train.precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision must be fp32 or bf16, got {cfg.train.precision!r}")
    if cfg.train.schedule not in ("cosine", "constant"):
        raise ConfigError(f"train.schedule must be cosine or constant, got {cfg.train.schedule!r}")
    if cfg.data.prompt_padding not in PROMPT_PADDINGS:
        raise ConfigError(f"data.prompt_padding must be one of {', '.join(PROMPT_PADDINGS)}, got {cfg.data.prompt_padding!r}")
    if cfg.train.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.train.batch_size}")
    return cfg


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if p.stem != "class_orders")


def load_config(source: str | Path, overrides: list[str] | dict | None = None) -> RunConfig:
    """A preset name (see `preset_names()`), or a YAML file, then `key=value` overrides."""
    path = Path(source)
    if not path.suffix and (PRESET_DIR / f"{source}.yaml").exists():
        path = PRESET_DIR / f"{source}.yaml"
    if not path.exists():
        raise ConfigError(f"no preset or YAML file {str(source)!r}; presets: {', '.join(preset_names())}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    cfg = apply(RunConfig(name=path.stem), data)
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
    return _revalidate(apply(RunConfig(), data))
