"""`mozo data list/check/fetch` against a loopback HTTP server: resume, checksums, safe extraction, readers."""
from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mozo.cli import main as mozo_main
from mozo.data import catalog
from mozo.data.catalog import CATALOG, DOWNLOADS, Archive, DatasetEntry, resolve
from mozo.data.fetch import FetchError, UnsafeArchive, extract, fetch_dataset, with_mirror
from mozo.data.mtcl import MTCL_DISPLAY_NAMES, MTCL_READERS
from mozo.data.readers import read_cifar100, read_imagefolder


# ------------------------------------------------------------------------------------------ fake data
def make_cifar100(root: Path) -> Path:
    """cifar-100-python/{train,test,meta}, one image per class and split (pixel value = class)."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    labels = list(range(100))
    data = np.repeat(np.arange(100, dtype=np.uint8)[:, None], 3072, axis=1)
    for split in ("train", "test"):
        (base / split).write_bytes(pickle.dumps({"data": data, "fine_labels": labels}))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"class_{c}" for c in labels]}))
    return root


def make_imagefolder(root: Path) -> Path:
    for k, cls in enumerate(["cat", "dog"]):
        for split in ("train", "test"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4), (80 * k, 0, 0)).save(root / split / cls / "0.png")
    return root


def tar_gz(folder: Path, arcname: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname or folder.name)
    return buf.getvalue()


def zip_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(folder.parent).as_posix())
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------ loopback server
class Server:
    """Serves `files` on 127.0.0.1 with Range support; `cut[name] = n` sends only n bytes (of a full
    Content-Length) on the first request for name, then drops the connection."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.requests.append((name, rng))
                if name not in outer.files:
                    self.send_error(404)
                    return
                data = outer.files[name]
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if name in outer.cut:
                    body = body[:outer.cut.pop(name)]
                    self.close_connection = True
                self.wfile.write(body)
                self.wfile.flush()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"{self.url}/{name}"


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def entry_for(*archives: Archive, key: str = "cifar100", reader=("cil", "cifar100")) -> DatasetEntry:
    return DatasetEntry(key, "Test", ("cil",), reader, "test", ("x",), "1 KB", archives)


quiet = dict(progress=False, log=lambda msg: None)


# ------------------------------------------------------------------------------------------ fetch
def test_fetch_resumes_verifies_extracts_and_is_idempotent(tmp_path, server):
    data = tar_gz(make_cifar100(tmp_path / "src") / "cifar-100-python")
    url = server.add("cifar-100-python.tar.gz", data)
    server.cut["cifar-100-python.tar.gz"] = len(data) // 3
    root = tmp_path / "root"
    entry = entry_for(Archive(url, sha256=sha256(data)))

    assert fetch_dataset(entry, root, **quiet) is True
    assert server.requests == [("cifar-100-python.tar.gz", None),
                               ("cifar-100-python.tar.gz", f"bytes={len(data) // 3}-")]  # resumed
    assert (root / DOWNLOADS / "cifar-100-python.tar.gz").read_bytes() == data
    train, test = read_cifar100(root)  # the real reader accepts the extracted tree
    assert (len(train), len(test), len(train.classnames)) == (100, 100, 100)

    messages = []
    assert fetch_dataset(entry, root, progress=False, log=messages.append) is False
    assert "nothing to do" in messages[0] and len(server.requests) == 2  # no second download


def test_fetch_resumes_a_part_file_left_by_an_earlier_run(tmp_path, server):
    data = tar_gz(make_cifar100(tmp_path / "src") / "cifar-100-python")
    url = server.add("c.tar.gz", data)
    root = tmp_path / "root"
    (root / DOWNLOADS).mkdir(parents=True)
    (root / DOWNLOADS / "c.tar.gz.part").write_bytes(data[:1000])
    fetch_dataset(entry_for(Archive(url, md5=hashlib.md5(data).hexdigest())), root, **quiet)
    assert server.requests == [("c.tar.gz", "bytes=1000-")]
    read_cifar100(root)


def test_zip_and_nested_archive(tmp_path, server):
    make_imagefolder(tmp_path / "src" / "pets")
    inner = tmp_path / "wrap" / "bundle"
    inner.mkdir(parents=True)
    (inner / "pets.tar.gz").write_bytes(tar_gz(tmp_path / "src" / "pets"))
    outer = zip_of(inner)  # bundle/pets.tar.gz inside a zip
    url = server.add("bundle.zip", outer)
    root = tmp_path / "root"
    entry = entry_for(Archive(url, into="data", sha256=sha256(outer), nested=("bundle/pets.tar.gz",)))
    fetch_dataset(entry, root, **quiet)
    assert not (root / "data" / "bundle" / "pets.tar.gz").exists()  # the inner archive is removed
    train, test = read_imagefolder(root / "data" / "bundle" / "pets")
    assert train.classnames == ["cat", "dog"] and len(test) == 2


def test_plain_zip_and_mirror(tmp_path, server):
    make_imagefolder(tmp_path / "src" / "flat")
    data = zip_of(tmp_path / "src" / "flat")
    server.add("flat.zip", data)
    entry = entry_for(Archive("http://unreachable.invalid/some/path/flat.zip", sha256=sha256(data)))
    assert with_mirror(entry.archives[0].url, server.url + "/") == f"{server.url}/flat.zip"
    fetch_dataset(entry, tmp_path / "root", mirror=server.url, **quiet)
    assert len(read_imagefolder(tmp_path / "root" / "flat")[0]) == 2


def test_checksum_mismatch_is_refused(tmp_path, server):
    data = tar_gz(make_cifar100(tmp_path / "src") / "cifar-100-python")
    url = server.add("cifar-100-python.tar.gz", data)
    root = tmp_path / "root"
    root.mkdir()
    (root / "mine.txt").write_text("user data")
    with pytest.raises(FetchError, match="checksum mismatch.*Refused"):
        fetch_dataset(entry_for(Archive(url, sha256="0" * 64)), root, **quiet)
    downloads = root / DOWNLOADS
    assert (downloads / "cifar-100-python.tar.gz.bad").read_bytes() == data
    assert not (downloads / "cifar-100-python.tar.gz").exists()
    assert not (downloads / "cifar-100-python.tar.gz.part").exists()
    assert not (root / "cifar-100-python").exists()  # nothing extracted
    assert (root / "mine.txt").read_text() == "user data"


def _tar_with(member: tarfile.TarInfo, payload: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"y"))
        member.size = len(payload) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return buf.getvalue()


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize("member", [tarfile.TarInfo("../evil.txt"), tarfile.TarInfo("/tmp/mozo-evil.txt"),
                                    tarfile.TarInfo("a/../../evil.txt"), _symlink("link", "../../etc/passwd"),
                                    _symlink("link", "/etc/passwd")], ids=lambda m: f"{m.name}->{m.linkname}")
def test_unsafe_tar_members_are_refused(tmp_path, member):
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(_tar_with(member))
    with pytest.raises(UnsafeArchive, match="refused, nothing was extracted"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "fine.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_unsafe_zip_member_is_refused_and_inside_symlink_allowed(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil.txt", "x")
    with pytest.raises(UnsafeArchive):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()
    good = tmp_path / "good.tar.gz"
    good.write_bytes(_tar_with(_symlink("dir/link", "../fine.txt")))
    extract(good, tmp_path / "ok")
    assert (tmp_path / "ok" / "dir" / "link").read_text() == "y"


def test_http_error_and_damaged_archive_are_clear(tmp_path, server):
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_dataset(entry_for(Archive(f"{server.url}/missing.tar.gz")), tmp_path, **quiet)
    url = server.add("broken.tar.gz", tar_gz(make_cifar100(tmp_path / "src") / "cifar-100-python")[:-200])
    with pytest.raises(FetchError, match="damaged archive"):
        fetch_dataset(entry_for(Archive(url)), tmp_path / "root", **quiet)


# ------------------------------------------------------------------------------------------ catalog and CLI
def test_catalog_covers_every_reader():
    mtcl = {e.reader[1] for e in CATALOG.values() if e.reader[0] == "mtcl"} | {"cifar100"}
    assert mtcl == set(MTCL_READERS)
    assert {"cifar100", "tinyimagenet", "imagenet-r"} <= {e.reader[1] for e in CATALOG.values() if e.reader[0] == "cil"}
    assert len(resolve(["mtcl"])) == 11 and [e.key for e in resolve(["OxfordPet", "oxfordpet"])] == ["oxfordpet"]
    for e in CATALOG.values():
        assert e.manual or e.archives
        for a in e.archives:
            assert a.sha256 is None or len(a.sha256) == 64
            assert a.md5 is None or len(a.md5) == 32


def test_cli_list_names_every_dataset(capsys):
    assert mozo_main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in ["CIFAR-100", "TinyImageNet", "ImageNet-R", *MTCL_DISPLAY_NAMES.values()]:
        assert name in out or name == "CIFAR100"
    assert "eb9058c3a382ffc7106e4002c42a8d85" in out and "not recorded" in out


def test_cli_check_good_broken_and_checksums(tmp_path, capsys):
    root = make_cifar100(tmp_path / "root")
    assert mozo_main(["data", "check", "cifar100", "--data-root", str(root)]) == 0
    assert "OK" in capsys.readouterr().out
    (root / DOWNLOADS).mkdir()
    (root / DOWNLOADS / "cifar-100-python.tar.gz").write_bytes(b"not the archive")
    assert mozo_main(["data", "check", "cifar100", "--data-root", str(root), "--checksums"]) == 1
    assert "checksum mismatch" in capsys.readouterr().out
    (root / "cifar-100-python" / "meta").unlink()
    assert mozo_main(["data", "check", "cifar100", "dtd", "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "meta" in out and "mozo data fetch cifar100" in out and "DTD" in out


def test_cli_fetch_with_mirror_then_nothing_to_do(tmp_path, server, monkeypatch, capsys):
    data = tar_gz(make_cifar100(tmp_path / "src") / "cifar-100-python")
    server.add("cifar-100-python.tar.gz", data)
    fake = entry_for(Archive("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", sha256=sha256(data)))
    monkeypatch.setitem(catalog.CATALOG, "cifar100", fake)
    args = ["data", "fetch", "cifar100", "--data-root", str(tmp_path / "root"), "--mirror", server.url, "--no-progress"]
    assert mozo_main(args) == 0
    assert mozo_main(["data", "check", "cifar100", "--data-root", str(tmp_path / "root")]) == 0
    capsys.readouterr()
    assert mozo_main(args) == 0
    assert "nothing to do" in capsys.readouterr().out and len(server.requests) == 1


def test_cli_fetch_manual_dataset_prints_steps(tmp_path, capsys):
    assert mozo_main(["data", "fetch", "stanfordcars", "--data-root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "cannot be downloaded automatically" in err and str(tmp_path / "stanford_cars") in err
    assert not (tmp_path / DOWNLOADS).exists()


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert mozo_main(["data", "check", "nosuchset", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset" in err and "sun397" in err and "cifar100" in err
    assert mozo_main(["data", "check", "cifar100"]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert mozo_main(["data", "fetch", "--data-root", str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as exc:
        mozo_main(["data", "frobnicate"])
    assert exc.value.code == 2
