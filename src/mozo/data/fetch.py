"""Download, verify and extract the datasets of the catalog into the layout the readers expect.

Only the standard library (urllib) and tqdm: a dataset fetch should not need another dependency.
Downloads resume (a `.part` file and an HTTP Range request) because the archives are gigabytes and
connections drop. A checksum mismatch is refused and the file kept as `.bad` so it can be inspected;
nothing the user already had is deleted. Archives are treated as untrusted: every member is checked
before anything is written (no absolute paths, no `..`, no links leaving the target folder, no device
files), so a malicious or broken archive writes nothing at all.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

from tqdm import tqdm

from .catalog import DOWNLOADS, Archive, DatasetEntry

CHUNK = 1 << 20
RETRIES = 5


class FetchError(RuntimeError):
    """A download, checksum or extraction problem; the message says what happened and what to do."""


class ManualDownload(FetchError):
    """The dataset has no working direct URL; the message holds the manual steps."""


class UnsafeArchive(FetchError):
    """An archive member would be written outside the target folder (or is a device / link escaping it)."""


# ---------------------------------------------------------------------------------------------- checksums
def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, archive: Archive) -> str | None:
    """None when `path` matches the recorded checksum (or none is recorded), else the mismatch text."""
    for algorithm, expected in (("sha256", archive.sha256), ("md5", archive.md5)):
        if expected:
            got = file_digest(path, algorithm)
            return None if got == expected.lower() else f"{algorithm} {got}, expected {expected}"
    return None


def with_mirror(url: str, mirror: str | None) -> str:
    """`--mirror URL` replaces the base of every URL: mirror/<archive file name>."""
    return f"{mirror.rstrip('/')}/{url.rstrip('/').rsplit('/', 1)[-1]}" if mirror else url


# ---------------------------------------------------------------------------------------------- download
def download(url: str, dest: Path, archive: Archive, progress: bool = True, retries: int = RETRIES,
             timeout: float = 60.0) -> Path:
    """Download `url` to `dest` through `dest.part`, resuming the part file after a dropped connection.

    Each attempt asks for the missing bytes (`Range: bytes=N-`); a server that ignores Range (200) starts
    the file over. Then the checksum: a mismatch renames the part to `dest.bad` and raises FetchError.
    """
    part, bad = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".bad")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                if have and resp.status != 206:  # Range ignored: start over
                    have = 0
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as out, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, desc=dest.name,
                        disable=not progress, leave=False) as bar:
                    for block in iter(lambda: resp.read(CHUNK), b""):
                        out.write(block)
                        bar.update(len(block))
            size = part.stat().st_size
            if total is None or size >= total:
                break
            err: Exception = ConnectionError(f"connection closed after {size} of {total} bytes")
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing left to send: the part file is complete
                break
            raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}. Check the URL (or --mirror) and retry.") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # dropped: resume
            err = exc
        if attempt == retries:
            raise FetchError(f"{url}: download failed after {retries + 1} attempts ({err}); the partial file "
                             f"{part} is kept and the next fetch resumes it.")
        time.sleep(min(0.2 * 2 ** attempt, 5.0))
    mismatch = verify(part, archive)
    if mismatch:
        os.replace(part, bad)
        raise FetchError(f"{url}: checksum mismatch ({mismatch}). Refused: the file is kept as {bad} for "
                         f"inspection and nothing was extracted. Delete it and fetch again, or try --mirror.")
    os.replace(part, dest)
    return dest


# ---------------------------------------------------------------------------------------------- extract
def _safe_name(name: str, archive: Path) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise UnsafeArchive(f"{archive}: member {name!r} would be written outside the target folder "
                            f"(absolute path or '..'); refused, nothing was extracted.")
    return p


def _check_tar(tar: tarfile.TarFile, archive: Path) -> None:
    """Refuse the whole archive if any member is unsafe, before writing anything."""
    for m in tar.getmembers():
        p = _safe_name(m.name, archive)
        if m.issym() or m.islnk():
            target = PurePosixPath(m.linkname)
            resolved = (p.parent / target) if m.issym() else target
            if target.is_absolute() or ".." in PurePosixPath(os.path.normpath(str(resolved))).parts:
                raise UnsafeArchive(f"{archive}: link {m.name!r} -> {m.linkname!r} points outside the target "
                                    f"folder; refused, nothing was extracted.")
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchive(f"{archive}: member {m.name!r} is a device or fifo; refused, nothing was extracted.")


def extract(archive: Path, into: Path) -> None:
    """Extract a .tar[.gz|.bz2|.xz], .tgz or .zip into `into`, after checking every member (see module doc)."""
    if not archive.is_file():
        raise FetchError(f"{archive}: archive not found (a nested archive missing from its outer archive?)")
    into.mkdir(parents=True, exist_ok=True)
    try:
        _extract(archive, into)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise FetchError(f"{archive}: damaged archive ({type(exc).__name__}: {exc}); delete it and its .done "
                         f"marker, then fetch again.") from None


def _extract(archive: Path, into: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                _safe_name(name, archive)
            zf.extractall(into)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            _check_tar(tar, archive)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the standard library checks too
                tar.extractall(into, filter="data")
            else:
                tar.extractall(into)
    else:
        raise FetchError(f"{archive}: not a tar or zip archive; delete it and fetch again.")


# ---------------------------------------------------------------------------------------------- a dataset
def _done_marker(root: Path, archive: Archive) -> Path:
    return root / DOWNLOADS / f"{archive.filename}.done"


def fetch_dataset(entry: DatasetEntry, root: Path | str, mirror: str | None = None, progress: bool = True,
                  log: Callable[[str], None] = print, is_present: Callable[[], bool] | None = None) -> bool:
    """Download, verify and extract every archive of `entry` under `root`. Returns False when there was
    nothing to do (already fetched, or `is_present()` says the reader already accepts the folder).

    Archives are kept in root/.mozo-downloads/ (so `mozo data check --checksums` can verify them later);
    a `<archive>.done` marker there records a finished extraction, which makes a second fetch a no-op.
    """
    root = Path(root).expanduser()
    if entry.manual:
        steps = entry.manual.replace("DATA_ROOT", str(root))
        raise ManualDownload(f"{entry.name} cannot be downloaded automatically.\n{steps}")
    pending = [a for a in entry.archives if not _done_marker(root, a).exists()]
    if not pending:
        log(f"{entry.name}: already fetched into {root}, nothing to do")
        return False
    if is_present is not None and is_present():
        log(f"{entry.name}: already present in {root} (the reader accepts it), nothing to do")
        return False
    for archive in pending:
        dest = root / DOWNLOADS / archive.filename
        if dest.exists() and verify(dest, archive) is None:
            log(f"{entry.name}: {dest.name} already downloaded and verified")
        else:
            if dest.exists():  # a complete file that fails verification: keep it aside, never overwrite silently
                os.replace(dest, dest.with_name(dest.name + ".bad"))
            url = with_mirror(archive.url, mirror)
            log(f"{entry.name}: downloading {url}")
            download(url, dest, archive, progress=progress)
        target = root / archive.into
        if archive.extract:
            log(f"{entry.name}: extracting {dest.name} into {target}")
            extract(dest, target)
            for inner in archive.nested:
                inner_path = target / _safe_name(inner, dest)
                extract(inner_path, inner_path.parent)
                inner_path.unlink()
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dest, target / archive.filename)
        _done_marker(root, archive).write_text(f"{archive.url}\n")
    log(f"{entry.name}: done")
    return True
