"""Checkpoints that survive crashes: trainable parameters (safetensors) plus everything needed to resume.

A checkpoint is a folder `checkpoint/` with `units.safetensors` and `state.pt` (optimizer states,
counters, RNG states, the accuracy matrix so far). It is written as `checkpoint.tmp/` and swapped in
with renames, so a crash at any moment leaves either the previous or the new checkpoint complete,
never a half-written one.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

NAME = "checkpoint"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, units: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write atomically: build checkpoint.tmp, then rename the old one away and the new one in."""
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / NAME, run_dir / f"{NAME}.tmp", run_dir / f"{NAME}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in units.items()}, str(tmp / "units.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "COMPLETE").write_text("ok")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (`checkpoint/`, or `checkpoint.old/` after a crash mid-swap)."""
    for name in (NAME, f"{NAME}.old"):
        path = Path(run_dir) / name
        if (path / "COMPLETE").exists():
            return path
    return None


def load_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = find_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint in {run_dir}; expected {Path(run_dir) / NAME}/ written by `mozo run` (cannot resume)")
    return load_file(str(path / "units.safetensors")), torch.load(path / "state.pt", weights_only=False)
