"""Continual-learning methods as plug-ins (base.py says what a method may change). Registering one:
one module with a `Method` subclass and a line in `METHODS`, or `register_method(cls)` from user code."""
from __future__ import annotations

from mozo.methods.base import Method, MethodConfig, Prepared
from mozo.methods.baseline import Baseline
from mozo.methods.zscl import ZSCL

METHODS: dict[str, type[Method]] = {m.name: m for m in (Baseline, ZSCL)}


def register_method(cls: type[Method]) -> type[Method]:
    """Make `cls` available as `method.name=<cls.name>` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method.name {name!r}; registered methods: {', '.join(METHODS)}") from None


def build_method(config: MethodConfig, label_smoothing: float = 0.0) -> Method:
    return get_method(config.name)(config, label_smoothing)


__all__ = ["METHODS", "Method", "MethodConfig", "Prepared", "build_method", "get_method", "register_method"]
