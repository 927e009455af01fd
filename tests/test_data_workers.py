"""`data.num_workers=auto` and `mozo bench --data`: what auto resolves to, invalid settings, loaders with
workers giving the batches of a loader without them, and the input-pipeline bench on the demo stream and on
a folder of JPEGs. No backbone is loaded."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mozo.data.loader as loader_mod
from mozo.cli import main as mozo_main
from mozo.data.base import LabelledImages
from mozo.data.loader import (MAX_AUTO_WORKERS, TransformedDataset, describe_workers, holds_arrays, make_loader,
                              plan_workers, resolve_num_workers, workers_summary)
from mozo.data.transforms import make_transform
from mozo.engine.config import ConfigError, load_config

CUDA = torch.device("cuda")  # only its type is read: no GPU needed


def write_jpegs(root: Path, classes: int = 2, per_class: int = 6, size: tuple[int, int] = (40, 30)) -> Path:
    """An imagefolder layout (train/<class>/*.jpg, test/<class>/*.jpg) of small JPEGs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"{i}.jpg", quality=85)
    return root


def file_images(root: Path) -> LabelledImages:
    files = sorted((root / "train").rglob("*.jpg"))
    return LabelledImages(files, np.arange(len(files)) % 2, ["a", "b"], name="jpegs")


def array_images(n: int = 12) -> LabelledImages:
    arr = np.random.default_rng(0).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)
    return LabelledImages(arr, np.arange(n) % 3, ["a", "b", "c"], name="arrays")


@pytest.fixture
def cores(monkeypatch):
    """Pretend this process may run on `n` cores."""
    def set_cores(n: int) -> None:
        monkeypatch.setattr(loader_mod, "available_cores", lambda: n)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return set_cores


# ----------------------------------------------------------------------------------------- auto
def test_default_is_auto_and_integers_stay_allowed():
    assert load_config("demo").data.num_workers == "auto"
    assert load_config("demo", ["data.num_workers=2"]).data.num_workers == 2
    assert load_config("demo", ["data.num_workers=0"]).data.num_workers == 0
    assert resolve_num_workers(3, "cpu") == 3 and resolve_num_workers(0, CUDA) == 0  # used as given


def test_auto_is_zero_on_cpu_and_for_small_in_memory_arrays(tmp_path, cores):
    cores(16)
    files = file_images(write_jpegs(tmp_path))
    assert not holds_arrays(files) and holds_arrays(array_images())
    assert resolve_num_workers("auto", "cpu", files) == 0
    assert resolve_num_workers("auto", torch.device("mps"), files) == 0
    demo_like = TransformedDataset(array_images(), make_transform(True, 32))  # the demo stream: 32 px arrays
    assert resolve_num_workers("auto", CUDA, demo_like) == 0
    assert resolve_num_workers("auto", CUDA, array_images()) == 0  # arrays, output size unknown
    assert resolve_num_workers("auto", CUDA, array_images(), image_size=64) == 0
    plan = plan_workers("auto", "cpu", files)
    assert (plan.num_workers, plan.pin_memory, plan.persistent_workers) == (0, False, False)
    assert "cpu run" in plan.reason and "in-memory arrays" in plan_workers("auto", CUDA, demo_like).reason


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_auto_on_cuda_for_files_uses_the_cores_and_pins(tmp_path, cores, monkeypatch):
    monkeypatch.setattr(loader_mod, "shared_memory_bytes", lambda: 2**40)
    files = file_images(write_jpegs(tmp_path))
    for n, expected in ((64, MAX_AUTO_WORKERS), (17, 16), (16, 15), (4, 3), (2, 1), (1, 0)):
        cores(n)
        assert resolve_num_workers("auto", CUDA, files) == expected, n
    cores(16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 training processes share the 16 cores
    assert resolve_num_workers("auto", "cuda:0", files) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    # CIFAR-like arrays resized to 224 px: the transform is the cost, workers pay on a GPU
    assert resolve_num_workers("auto", CUDA, TransformedDataset(array_images(), make_transform(True, 224))) == 15
    plan = plan_workers("auto", CUDA, files)
    assert (plan.num_workers, plan.pin_memory, plan.persistent_workers) == (15, True, True)
    ds = TransformedDataset(files, make_transform(True, 8))
    loader = make_loader(ds, 4, shuffle=True, **plan.loader_kwargs())  # built, not iterated: no GPU here
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (15, True, True)
    assert plan_workers(2, CUDA, files).pin_memory and not plan_workers(2, "cpu", files).pin_memory


def test_auto_fits_the_workers_into_shared_memory(tmp_path, cores, monkeypatch):
    """Docker's default /dev/shm (64 MiB) holds no 128-image batch at 224 px: 0 workers, not a bus error."""
    cores(16)
    files = file_images(write_jpegs(tmp_path))
    batch_bytes = 128 * 3 * 224 * 224 * 4
    monkeypatch.setattr(loader_mod, "shared_memory_bytes", lambda: 64 * 2**20)
    plan = plan_workers("auto", CUDA, files, batch_size=128, image_size=224)
    assert plan.num_workers == 0 and "/dev/shm has 64 MiB free" in plan.reason
    monkeypatch.setattr(loader_mod, "shared_memory_bytes", lambda: 7 * batch_bytes)
    assert resolve_num_workers("auto", CUDA, files, 128, 224) == 3  # 3 workers x 2 batches + the one in use
    assert resolve_num_workers(8, CUDA, files, 128, 224) == 8  # an explicit count is the user's
    monkeypatch.setattr(loader_mod, "shared_memory_bytes", lambda: None)  # unknown (no /dev/shm): not limited
    assert resolve_num_workers("auto", CUDA, files, 128, 224) == 15


def test_the_resolved_count_is_described(tmp_path, cores, monkeypatch):
    cores(16)
    monkeypatch.setattr(loader_mod, "shared_memory_bytes", lambda: 2**40)
    files = file_images(write_jpegs(tmp_path))
    record = describe_workers("auto", CUDA, {"jpegs": files, "mnist": array_images()}, batch_size=8, image_size=32)
    assert record["per_dataset"] == {"jpegs": 15, "mnist": 0} and record["pin_memory"]
    assert record["setting"] == "auto" and record["cores"] == 16
    line = workers_summary(record)
    assert line.startswith("auto -> per task 15, 0 workers, pinned") and "in-memory arrays" in line
    json.dumps(record)  # goes into the start event
    assert workers_summary(describe_workers(0, "cpu", {"t": files})).startswith("0 -> 0 worker(s)")


@pytest.mark.parametrize("value,shown", [("many", "'many'"), ("-1", "-1"), ("1.5", "1.5"), ("true", "True")])
def test_invalid_settings_name_the_allowed_values(value, shown):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [f"data.num_workers={value}"])
    assert str(err.value) == f"data.num_workers must be one of auto, an integer >= 0, got {shown}"
    with pytest.raises(ValueError, match="must be one of auto, an integer >= 0"):
        resolve_num_workers(-1, "cpu")


# ---------------------------------------------------------------------------------- determinism
def test_two_persistent_workers_give_the_batches_of_none(tmp_path):
    """Same order, same crops, with 2 workers (persistent, as auto sets them on CUDA) and without; also
    for a resumed epoch (start_batch) and the next epoch, each on its own loader as the engine builds them."""
    ds = TransformedDataset(file_images(write_jpegs(tmp_path)), make_transform(True, 16), seed=5)

    def batches(workers: int, **kw) -> list:
        return list(make_loader(ds, 5, shuffle=True, seed=3, num_workers=workers, persistent_workers=workers > 0, **kw))

    for kw in ({"epoch": 0}, {"epoch": 0, "start_batch": 1}, {"epoch": 1}):
        plain, parallel = batches(0, **kw), batches(2, **kw)
        assert len(plain) == len(parallel) > 0
        for (x0, y0, s0), (x2, y2, s2) in zip(plain, parallel):
            assert torch.equal(x0, x2) and torch.equal(y0, y2) and s0 == s2
    assert not torch.equal(batches(0, epoch=0)[0][0], batches(0, epoch=1)[0][0])


# ------------------------------------------------------------------------------ mozo bench --data
def test_bench_data_demo_prints_images_per_second(tmp_path, capsys, monkeypatch):
    import mozo.data.demo_stream as stream

    full = stream.build_demo_scenario  # only the first task is timed; its images do not depend on the others
    monkeypatch.setattr(stream, "build_demo_scenario", lambda seed=0: full(seed=seed, num_tasks=1))
    out = tmp_path / "rate.json"
    code = mozo_main(["bench", "--data", "demo", "--images", "64", "--workers", "0,1", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "images/s" in text and "data.num_workers=auto -> 0 here" in text and "| 0 (auto here)" in text
    result = json.loads(out.read_text())
    assert [r["workers"] for r in result["rows"]] == [0, 1] and result["in_memory_arrays"]
    assert result["image_size"] == 32 and result["batch"] == load_config("demo").train.batch_size
    assert all(r["images"] >= 64 and r["images_per_s"] > 0 for r in result["rows"])


def test_bench_data_on_a_jpeg_folder(tmp_path, capsys):
    root = write_jpegs(tmp_path / "jpegs", per_class=8, size=(50, 38))
    args = ["bench", "--data", "cifar100-10-10", "protocol=cil", "data.dataset=imagefolder", "--data-root", str(root),
            "--images", "8", "--workers", "0", "--batch", "4", "--image-size", "24", "--json", str(tmp_path / "r.json")]
    assert mozo_main(args) == 0
    text = capsys.readouterr().out
    assert "(image files)" in text and "with a CUDA device on this machine" in text
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["train_images"] == 16 and not result["in_memory_arrays"] and result["rows"][0]["images"] == 8


def test_bench_data_errors_are_clear(tmp_path, capsys):
    base = ["bench", "--data", "cifar100-10-10", "protocol=cil", "data.dataset=imagefolder"]
    assert mozo_main(base + ["--data-root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "ImageFolder:" in err and "docs/datasets.md" in err and "Traceback" not in err
    assert mozo_main(["bench", "--data", "cifar100-10-10"]) == 1
    assert "pass --data-root DIR" in capsys.readouterr().err
    assert mozo_main(["bench", "--data", "demo", "data.num_workers=many"]) == 2
    assert "data.num_workers must be one of auto" in capsys.readouterr().err
    assert mozo_main(["bench", "--data", "demo", "--workers", "0,-1"]) == 2
    assert mozo_main(["bench", "--backbone", "tiny", "protocol=cil"]) == 2  # overrides only with --data
