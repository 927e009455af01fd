"""The run directory: checked before anything expensive, locked while a run writes it, never silently replaced.

- `prepare` probes that `--out` can be written (it is not a file, not under a file, not read-only)
  and refuses a folder that already holds a run unless the caller resumes it or asks to overwrite it,
  all before the backbone or any dataset is loaded.
- `RunLock` is a lock file (`.lock`, holding host and pid) taken for the whole run: a second process
  writing the same directory is refused with the holder's pid; a lock left by a process that no longer
  exists on this host is stale and taken over.
- `run.json` records what a resume needs besides the configuration: the data root and a fingerprint
  of the data (class names, sample counts, a digest of the file list and labels per task), checked on
  resume so a run never continues on different data by accident.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Optional

RUN_FILES = ("config.json", "results.json", "events.jsonl", "run.json", "checkpoint", "checkpoint.old", "tb", "wandb", "eval")
LOCK = ".lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message names the path and the fix."""


def holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in RUN_FILES)


def prepare(out: Path, resume: bool, overwrite: bool = False) -> None:
    """Check `out` before any expensive work; with `overwrite`, remove the previous run's files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder; choose another --out")
    if resume:
        if not (out / "config.json").is_file():
            raise RunDirError(f"{out} is not a mozo run directory (no config.json); give the --out folder of the run to resume")
    elif holds_run(out):
        if not overwrite:
            raise RunDirError(f"{out} already holds a run; continue it with `mozo run --resume {out}`, "
                              f"choose a fresh --out, or pass --overwrite to replace it")
        with RunLock(out):  # never delete a directory another process is writing
            for name in RUN_FILES:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"cannot write the run directory {out}: {exc.strerror or exc}; choose a writable --out") from exc


def atomic_write(path: Path, text: str) -> None:
    """Write via a per-writer temporary name, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunDirError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory for one process (see the module docstring)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.held = False

    def __enter__(self) -> "RunLock":
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                    return self  # re-entrant within one process (overwrite, then run)
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise RunDirError(f"{self.path.parent} is in use by another mozo process (pid {holder.get('pid')} on "
                                  f"{holder.get('host')}); wait for it to finish or choose another --out. If that process "
                                  f"no longer exists, delete {self.path}")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunDirError(f"cannot take the lock {self.path}; delete it if no mozo process uses {self.path.parent}")

    def _holder(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# ------------------------------------------------------------------------------------------ run.json
def data_fingerprint(scenario: Any, data_root: Optional[Path]) -> list[dict]:
    """Per task: name, class names, sample counts and a digest of file list and labels (paths relative to
    the data root, so a dataset moved to another root keeps its fingerprint; in-memory images count by
    shape, not pixels, so fingerprinting never reads the data)."""
    root = str(Path(data_root).resolve()) if data_root else None

    def digest(images: Any) -> str:
        h = hashlib.sha256()
        sources = images.sources
        if hasattr(sources, "shape"):
            h.update(repr(tuple(sources.shape)).encode())
        else:
            for s in sources:
                text = str(s)
                if root and text.startswith(root):
                    text = text[len(root):]
                h.update(text.encode("utf-8", "surrogateescape") + b"\0")
        h.update(images.labels.tobytes())
        return h.hexdigest()[:16]

    return [{"task": t.name, "classnames": list(t.classnames), "train": len(t.train), "test": len(t.test),
             "digest": digest(t.train) + digest(t.test)} for t in scenario.tasks]


def write_run_info(out: Path, data_root: Optional[Path], fingerprint: list[dict]) -> None:
    atomic_write(out / "run.json", json.dumps({"data_root": str(Path(data_root).resolve()) if data_root else None,
                                                "data": fingerprint}, indent=1))


def read_run_info(out: Path) -> dict:
    """run.json of a run (empty for runs written before mozo recorded it)."""
    path = Path(out) / "run.json"
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path} is unreadable ({exc}); restore it or give --data-root again") from exc
    return info if isinstance(info, dict) else {}


def check_fingerprint(out: Path, saved: list[dict], now: list[dict]) -> None:
    """Refuse to resume on data that differs from the data the run started with, naming the difference."""
    if not saved or saved == now:
        return
    if len(saved) != len(now):
        raise RunDirError(f"the data has {len(now)} tasks but the run in {out} started with {len(saved)}; resume with the same --data-root")
    for a, b in zip(saved, now):
        for key in ("task", "classnames", "train", "test", "digest"):
            if a.get(key) != b.get(key):
                what = {"digest": "file list or labels", "train": "training sample count", "test": "test sample count"}.get(key, key)
                raise RunDirError(f"task {a.get('task')!r}: the {what} differs from the data the run in {out} started with "
                                  f"({str(a.get(key))[:60]} then, {str(b.get(key))[:60]} now); resume with the same "
                                  f"--data-root and dataset files, or start a new run")
