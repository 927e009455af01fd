"""`mozo data list | check | fetch`: what each dataset is, whether a data root holds it, and getting it.

`check` decides with the real readers (readers.read_dataset, mtcl.read_mtcl), so there is one set of
layout rules and a check that passes means a run will find the data. Exit codes: 0 all good, 1 a
dataset is missing / broken / must be fetched by hand, 2 bad command-line input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .catalog import CATALOG, DOWNLOADS, PRESETS, DatasetEntry, checksum_text, resolve

ACTIONS = ("list", "check", "fetch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="list the catalog, check a data root, or fetch datasets")
    parser.add_argument("datasets", nargs="*", metavar="DATASET|PRESET",
                        help=f"dataset keys or names, or a preset ({', '.join(PRESETS)}); default: all "
                             f"(check, list) — fetch needs at least one")
    parser.add_argument("--data-root", type=Path, help="folder holding the datasets side by side (check, fetch)")
    parser.add_argument("--checksums", action="store_true",
                        help=f"check: also verify the archives kept in DATA_ROOT/{DOWNLOADS}/")
    parser.add_argument("--mirror", help="fetch: download every archive from MIRROR/<archive file name> instead")
    parser.add_argument("--no-progress", action="store_true", help="fetch: no progress bars")


def check_entry(entry: DatasetEntry, root: Path) -> tuple[str | None, str]:
    """(problem or None, summary) from reading the dataset with its real reader."""
    from . import mtcl, readers

    kind, key = entry.reader
    try:
        train, test = readers.read_dataset(key, root) if kind == "cil" else mtcl.read_mtcl(key, root)
    except Exception as exc:  # any reader failure is a finding to report, not a crash of the checker
        text = str(exc) if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: {exc}"
        how = (f"mozo data fetch {entry.key} --data-root {root}" if not entry.manual
               else f"mozo data fetch {entry.key} (prints the manual steps)")
        return f"{text}\n    To download it: {how}", "missing or malformed"
    return None, f"{len(train)} train / {len(test)} test images, {len(train.classnames)} classes"


def checksum_problems(entry: DatasetEntry, root: Path) -> tuple[list[str], int]:
    """Mismatches of the archives kept under root/.mozo-downloads/, and how many were verified."""
    from .fetch import verify

    problems, n = [], 0
    for archive in entry.archives:
        path = root / DOWNLOADS / archive.filename
        if path.is_file():
            n += 1
            mismatch = verify(path, archive)
            if mismatch:
                problems.append(f"{path}: checksum mismatch ({mismatch}); delete it and its "
                                f"{archive.filename}.done marker, then fetch again")
    return problems, n


def _list(entries: list[DatasetEntry]) -> int:
    for e in entries:
        print(f"{e.name} ({e.key}) — presets: {', '.join(e.presets)}; about {e.size}")
        if e.homepage:
            print(f"  homepage: {e.homepage}")
        print(f"  licence:  {e.licence}")
        print("  expects:  " + "\n            ".join(e.expected))
        for a in e.archives:
            print(f"  source:   {a.url}\n            {checksum_text(a)}")
        if e.manual:
            print("  source:   manual download (mozo data fetch prints the steps); sha256: None (not recorded)")
        print()
    return 0


def _check(entries: list[DatasetEntry], root: Path, checksums: bool) -> int:
    rows, details = [], []
    for e in entries:
        problem, summary = check_entry(e, root)
        problems = [problem] if problem else []
        if checksums:
            bad, n = checksum_problems(e, root)
            problems += bad
            summary += f"; {n} kept archive(s) checked" if n else f"; no archives kept in {DOWNLOADS}/"
        rows.append((e.name, "FAIL" if problems else "OK", summary if not problems else problems[0].split("\n")[0]))
        details += [f"{e.name}: {p}" for p in problems]
    width = max(len(r[0]) for r in rows)
    print(f"{'dataset':<{width}}  status  details")
    for name, status, text in rows:
        print(f"{name:<{width}}  {status:<6}  {text[:150]}")
    if details:
        print("\nProblems and fixes:")
        for d in details:
            print(f"- {d}")
    return 1 if details else 0


def _fetch(entries: list[DatasetEntry], root: Path, mirror: str | None, progress: bool) -> int:
    from .fetch import FetchError, ManualDownload, fetch_dataset

    status = 0
    for e in entries:
        try:
            fetch_dataset(e, root, mirror=mirror, progress=progress,
                          is_present=lambda e=e: check_entry(e, root)[0] is None)
        except ManualDownload as exc:
            print(f"{exc}\nNothing was downloaded. Then run: mozo data check {e.key} --data-root {root}", file=sys.stderr)
            status = 1
        except FetchError as exc:
            print(f"{e.name}: {exc}", file=sys.stderr)
            status = 1
    return status


def main(args: argparse.Namespace) -> int:
    try:
        entries = resolve(args.datasets)
    except KeyError as exc:
        print(f"mozo data: {exc.args[0]}", file=sys.stderr)
        return 2
    if args.action == "list":
        return _list(entries)
    if args.data_root is None:
        print(f"mozo data {args.action}: --data-root DIR is required (the folder holding the datasets)", file=sys.stderr)
        return 2
    root = args.data_root.expanduser()
    if args.action == "check":
        return _check(entries, root, args.checksums)
    if not args.datasets:
        print(f"mozo data fetch: name the datasets to fetch (known: {', '.join(CATALOG)}; presets: "
              f"{', '.join(PRESETS)})", file=sys.stderr)
        return 2
    return _fetch(entries, root, args.mirror, not args.no_progress)
