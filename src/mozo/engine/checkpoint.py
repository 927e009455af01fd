"""Checkpoints that survive crashes and never run code: trainable parameters plus everything needed to resume.

A checkpoint is a folder `checkpoint/` with `units.safetensors` and `state.pt` (optimizer states,
counters, RNG states, the accuracy matrix so far). Checkpoints are files users share and download, so
`state.pt` holds only tensors, numbers, strings, lists and dicts and is read with
`torch.load(weights_only=True)`: a tampered file is refused, never executed.

Writes are atomic: a writer builds `checkpoint.tmp-<pid>/` (its own name, so two writers never delete
each other's files), renames the current checkpoint to `checkpoint.old/` and the new one in. A crash at
any moment leaves a complete checkpoint. `checkpoint.old/` is kept: when the newest checkpoint cannot be
read (a damaged disk, a truncated copy), `load_checkpoint` falls back to it and says so.
"""
from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

NAME = "checkpoint"
OLD = f"{NAME}.old"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the path and the cause."""


def rng_state() -> dict[str, Any]:
    """Every RNG's state in types `weights_only` loading accepts (numpy's key array as a tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _follow_umask(path: Path) -> None:
    """safetensors writes through a private temporary file (mode 600); give the file the mode every other
    file of the run gets, so other users and ranks under another uid on shared storage can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_checkpoint(run_dir: Path, units: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write atomically (see the module docstring). Non-finite units are refused: a checkpoint is always
    one a run can continue from."""
    run_dir = Path(run_dir)
    bad = [k for k, v in units.items() if not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"{len(bad)} unit tensor(s) hold NaN or inf (e.g. {bad[0]}); the checkpoint in "
                                 f"{run_dir / NAME} was not overwritten")
    final, tmp, old = run_dir / NAME, run_dir / f"{NAME}.tmp-{os.getpid()}", run_dir / OLD
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in units.items()}, str(tmp / "units.safetensors"))
        _follow_umask(tmp / "units.safetensors")
        torch.save(state, tmp / "state.pt")
        (tmp / "COMPLETE").write_text("ok")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
    except (OSError, SafetensorError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write the checkpoint in {run_dir}: {exc}. The previous checkpoint, if any, "
                              f"is kept; free disk space or fix the folder's permissions, then resume") from exc
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (`checkpoint/`, or `checkpoint.old/` after a crash mid-swap)."""
    found = candidates(run_dir)
    return found[0] if found else None


def candidates(run_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    return [Path(run_dir) / name for name in (NAME, OLD) if (Path(run_dir) / name / "COMPLETE").exists()]


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One checkpoint folder; any damage or foreign content is a CheckpointError naming the file."""
    try:
        units = load_file(str(path / "units.safetensors"))
    except (OSError, SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{path / 'units.safetensors'} is unreadable ({type(exc).__name__}: {exc})") from exc
    try:
        state = torch.load(path / "state.pt", weights_only=True)
    except Exception as exc:  # a damaged pickle raises anything from EOFError to IndexError
        if "Weights only load failed" in str(exc):  # weights_only refused a global: not plain data
            raise CheckpointError(f"{path / 'state.pt'} holds objects other than tensors and plain data and was not "
                                  f"loaded (a checkpoint written by mozo never does; do not trust this file)") from exc
        raise CheckpointError(f"{path / 'state.pt'} is unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / 'state.pt'} does not hold a mozo checkpoint state (a dict)")
    return units, state


def load_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The newest readable checkpoint; a damaged newest one falls back to the previous one, with a warning."""
    found = candidates(run_dir)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {run_dir}; expected {Path(run_dir) / NAME}/ written by `mozo run` (cannot resume)")
    errors = []
    for path in found:
        try:
            loaded = read_checkpoint(path)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if errors:
            warnings.warn(f"{errors[0]}; resuming from the previous checkpoint {path} instead", RuntimeWarning, stacklevel=2)
        return loaded
    raise CheckpointError("no readable checkpoint: " + "; ".join(errors))
