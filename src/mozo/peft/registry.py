"""The registry of PEFT unit kinds and `PeftConfig`, the `peft.*` section of a run.

A kind is a `PeftUnit` subclass (implementing `from_config` and `has_noise`) plus a small config
dataclass: its section `peft.<kind>.*`. `PeftConfig` holds the keys every kind shares (`kind`,
`towers`, `layers`) and one section per registered kind::

    peft: {kind: moe, towers: [vision, language], moe: {rank: 64, num_experts: 2}, lora: {rank: 8}}

Adding a kind: one module (unit class + config dataclass) and one `register_kind` line at the end of
this file; the new section, its keys and its checks then appear in the run configuration by
themselves. Code outside mozo may call `register_kind` too (the kind then exists in that process).
Every unknown key is an error naming it and the valid keys of its section.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Optional

from mozo.backbone.towers import MODALITIES
from mozo.peft.adapter import Adapter, AdapterConfig
from mozo.peft.lora import LoRA, LoRAConfig
from mozo.peft.moe import MoEAdapter, MoEConfig
from mozo.peft.units import PeftUnit
from mozo.zo.config import check_range

SHARED = ("kind", "towers", "layers")  # the keys of `peft.*` outside the kinds' sections


@dataclass(frozen=True)
class UnitKind:
    name: str
    unit: type  # a PeftUnit subclass
    config: type  # a dataclass: the section peft.<name>.*


_KINDS: dict[str, UnitKind] = {}


def kind_names() -> tuple[str, ...]:
    """The registered kinds, in registration order."""
    return tuple(_KINDS)


def get_kind(name: str) -> UnitKind:
    if name not in _KINDS:
        raise ValueError(f"unknown peft kind {name!r}: peft.kind must be one of {', '.join(_KINDS)}")
    return _KINDS[name]


def register_kind(name: str, unit: type, config: type) -> UnitKind:
    """Register a unit kind: `unit` a PeftUnit subclass, `config` the dataclass of its section
    `peft.<name>.*` (every field with a default; an optional `validate(prefix)` raising ValueError and
    `summary()` for the run overview)."""
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_") or name in SHARED:
        raise ValueError(f"a peft kind needs a plain identifier as its name, other than {', '.join(SHARED)}; got {name!r}")
    if name in _KINDS:
        raise ValueError(f"peft kind {name!r} is already registered ({_KINDS[name].unit.__name__})")
    if not (isinstance(unit, type) and issubclass(unit, PeftUnit)):
        raise TypeError(f"peft kind {name!r}: the unit must be a PeftUnit subclass, got {unit!r}")
    for method in ("from_config", "has_noise"):
        if inspect.getattr_static(unit, method) is inspect.getattr_static(PeftUnit, method):
            raise TypeError(f"peft kind {name!r}: {unit.__name__} must implement {method}()")
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise TypeError(f"peft kind {name!r}: the config must be a dataclass, got {config!r}")
    try:
        config()
    except TypeError as exc:
        raise TypeError(f"peft kind {name!r}: every field of {config.__name__} needs a default ({exc})") from None
    kind = UnitKind(name, unit, config)
    _KINDS[name] = kind
    PeftConfig._add_section(name, config)
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind (and its section from PeftConfig): for tests and plugins that registered one."""
    get_kind(name)
    del _KINDS[name]
    PeftConfig._remove_section(name)


# -- keys and the errors that list them ------------------------------------------------------------

def section_keys(kind: str) -> list[str]:
    return [f.name for f in dataclasses.fields(get_kind(kind).config)]


def peft_keys() -> list[str]:
    """Every key under `peft.`: the shared ones, then `<kind>.<field>` for every registered kind."""
    return [*SHARED, *(f"{k}.{f}" for k in _KINDS for f in section_keys(k))]


def _moved(name: str) -> list[str]:
    """Where a flat key of the old single PeftConfig now lives: `rank` -> peft.moe.rank, peft.adapter.rank;
    `lora_rank` -> peft.lora.rank; `num_experts` -> peft.moe.num_experts."""
    found = []
    for kind in _KINDS:
        fields = section_keys(kind)
        if name in fields:
            found.append(f"peft.{kind}.{name}")
        elif name.startswith(kind + "_") and name[len(kind) + 1:] in fields:
            found.append(f"peft.{kind}.{name[len(kind) + 1:]}")
    return found


def unknown_peft_key(key: str) -> str:
    """The message for a `peft.*` key no section has (`key` in full, e.g. 'peft.moe.rnak'): the nearest
    keys and the valid keys of the section it points into; for a flat key of the old PeftConfig
    (`peft.rank`, `peft.lora_rank`) the key that replaced it."""
    parts = key.split(".")[1:] if key.startswith("peft.") else key.split(".")
    head = parts[0] if parts else ""
    if head in _KINDS and len(parts) > 1:
        fields = section_keys(head)
        if parts[1] in fields:
            return f"config key 'peft.{head}.{parts[1]}' takes a value, not sub-keys (got {key!r})"
        near = difflib.get_close_matches(parts[1], fields, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(f'peft.{head}.{n}' for n in near)}?" if near else ""
        return f"unknown config key {key!r}.{hint} Valid keys of peft.{head}: {', '.join(fields)}"
    if head in SHARED or head in _KINDS:
        return f"config key 'peft.{head}' takes {'a value' if head in SHARED else 'a mapping'}, not {key!r}"
    valid = f"Valid keys of peft: {', '.join(peft_keys())}"
    moved = _moved(head)
    if moved:
        return (f"unknown config key {key!r}: unit settings live in one section per kind now; "
                f"use {' or '.join(moved)}. {valid}")
    if head == "extra":
        return f"unknown config key {key!r}: peft.extra was removed, every unit setting is a key of its kind's section. {valid}"
    near = difflib.get_close_matches(".".join(parts), peft_keys(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join('peft.' + n for n in near)}?" if near else ""
    return f"unknown config key {key!r}.{hint} {valid}"


def _section(kind: UnitKind, value: Any) -> Any:
    """A kind's section from None (its defaults), an instance, or a mapping of its keys."""
    if value is None:
        return kind.config()
    if isinstance(value, kind.config):
        return value
    if isinstance(value, dict):
        for key in value:
            if key not in section_keys(kind.name):
                raise ValueError(unknown_peft_key(f"peft.{kind.name}.{key}"))
        return kind.config(**value)
    raise ValueError(f"peft.{kind.name} must be a {kind.config.__name__} or a mapping of its keys, got {value!r}")


# -- PeftConfig ------------------------------------------------------------------------------------

@dataclass(init=False, eq=False, repr=False)
class PeftConfig:
    """Which units, where, and their sizes. Defaults: the class-incremental MoE-Adapters setting.

    The dataclass fields are `kind`, `towers`, `layers` and one section per registered kind
    (`moe: MoEConfig`, `lora: LoRAConfig`, `adapter: AdapterConfig`, ...), added by `register_kind`.
    `PeftConfig.of("lora", rank=4)` fills the chosen kind's section from keyword arguments.
    """

    kind: str = "moe"  # a registered kind: moe | lora | adapter
    towers: tuple[str, ...] = MODALITIES
    layers: Optional[list[int]] = None  # 1-based layers that get a unit; None = every layer

    def __init__(self, kind: str = "moe", towers: tuple[str, ...] = MODALITIES, layers: Optional[list[int]] = None,
                 **sections: Any):
        self.kind, self.towers, self.layers = kind, towers, layers
        unknown = [k for k in sections if k not in _KINDS]
        if unknown:
            raise ValueError(unknown_peft_key(f"peft.{unknown[0]}"))
        for name, spec in _KINDS.items():
            setattr(self, name, _section(spec, sections.get(name)))
        self.validate()

    @classmethod
    def of(cls, kind: str = "moe", *, towers: tuple[str, ...] = MODALITIES, layers: Optional[list[int]] = None,
           **settings: Any) -> "PeftConfig":
        """`kind` with `settings` (keys of its section) and every other section at its defaults."""
        spec = get_kind(kind)
        return cls(kind, towers, layers, **{kind: _section(spec, settings)})

    def section(self, kind: Optional[str] = None) -> Any:
        """The config section of `kind` (default: the configured kind)."""
        return getattr(self, get_kind(kind or self.kind).name)

    def validate(self) -> None:
        """Every value checked before a backbone loads (layers beyond a tower's depth: MozoCLIP)."""
        get_kind(self.kind)
        towers = tuple(self.towers)
        if not towers or not set(towers) <= set(MODALITIES) or len(set(towers)) < len(towers):
            raise ValueError(f"peft.towers must be one or both of {', '.join(MODALITIES)}, got {','.join(map(str, towers))!r}")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("peft.layers must be null (every layer) or a non-empty list of layers >= 1, got []")
            for layer in self.layers:
                check_range("peft.layers entries", layer, 1, integer=True)
        for name, spec in _KINDS.items():
            value = getattr(self, name, None)
            if not isinstance(value, spec.config):
                raise ValueError(f"peft.{name} must be a {spec.config.__name__}, got {value!r}")
            if hasattr(value, "validate"):
                value.validate(f"peft.{name}")

    def _values(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name, None)) for f in dataclasses.fields(self)]

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # mutable, like any dataclass with eq

    def __repr__(self) -> str:
        return f"PeftConfig({', '.join(f'{k}={v!r}' for k, v in self._values())})"

    @classmethod
    def _add_section(cls, name: str, config: type) -> None:
        # A field made by dataclasses itself (public API only), then added to this class's fields:
        # dataclasses.fields / asdict / replace and typing.get_type_hints all read these dicts.
        tmp = dataclasses.make_dataclass("_Section", [(name, config, dataclasses.field(default_factory=config))])
        cls.__dataclass_fields__[name] = tmp.__dataclass_fields__[name]
        cls.__annotations__[name] = config

    @classmethod
    def _remove_section(cls, name: str) -> None:
        cls.__dataclass_fields__.pop(name, None)
        cls.__annotations__.pop(name, None)


# -- the built-in kinds: one line each -------------------------------------------------------------

register_kind("moe", MoEAdapter, MoEConfig)
register_kind("lora", LoRA, LoRAConfig)
register_kind("adapter", Adapter, AdapterConfig)
