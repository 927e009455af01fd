"""MTCL readers on tiny fake datasets written in the real (torchvision / ZSCL) layouts."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from mozo.data.base import DatasetLayoutError, load_image
from mozo.data.mtcl import (
    MTCL_DISPLAY_NAMES,
    MTCL_ORDERS,
    MTCL_READERS,
    build_mtcl_datasets,
    few_shot,
    read_aircraft,
    read_caltech101,
    read_cifar100,
    read_dtd,
    read_eurosat,
    read_flowers,
    read_food,
    read_mnist,
    read_oxfordpet,
    read_stanfordcars,
    read_sun397,
    split_per_class,
    zscl_random_split,
)


def _jpg(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value % 256, dtype=np.uint8)).save(path)
    return path


def _lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _class_counts(images) -> list[int]:
    return np.bincount(images.labels, minlength=len(images.classnames)).tolist()


# ---------------------------------------------------------------- fake datasets, one writer each


def make_aircraft(root: Path) -> None:
    data = root / "fgvc-aircraft-2013b" / "data"
    _lines(data / "variants.txt", ["707-320", "A300B4", "F/A-18"])
    splits = {"train": [], "val": [], "test": []}
    for v, variant in enumerate(["707-320", "A300B4", "F/A-18"]):
        for i in range(5):
            img = f"{v}{i:06d}"
            _jpg(data / "images" / f"{img}.jpg", i)
            splits["train" if i < 2 else "val" if i < 3 else "test"].append(f"{img} {variant}")
    for name, rows in splits.items():
        _lines(data / f"images_variant_{name}.txt", rows)
    _lines(data / "images_variant_trainval.txt", splits["train"] + splits["val"])


def make_caltech101(root: Path) -> None:
    for cls, n in [("BACKGROUND_Google", 3), ("Faces_easy", 5), ("car_side", 10), ("yin_yang", 4)]:
        for i in range(n):
            _jpg(root / "caltech-101" / "101_ObjectCategories" / cls / f"image_{i + 1:04d}.jpg", i)


def make_cifar100(root: Path) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["apple", "aquarium_fish", "bed"], "coarse_label_names": ["x"]}, f)
    for split, n in [("train", 6), ("test", 3)]:
        labels = [i % 3 for i in range(n)]
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * n}, f)


def make_dtd(root: Path) -> None:
    base = root / "dtd"
    rows = {"train": [], "val": [], "test": []}
    for cls in ["banded", "zigzagged"]:
        for i in range(6):
            name = f"{cls}/{cls}_{i:04d}.jpg"
            _jpg(base / "images" / name, i)
            rows[["train", "train", "val", "test", "test", "test"][i]].append(name)
    for split, r in rows.items():
        _lines(base / "labels" / f"{split}1.txt", r)
        _lines(base / "labels" / f"{split}2.txt", r[:1])  # other partitions exist and must be ignored


def make_eurosat(root: Path) -> None:
    for cls, n in [("AnnualCrop", 10), ("HerbaceousVegetation", 5), ("SeaLake", 5)]:
        for i in range(n):
            _jpg(root / "EuroSAT" / "2750" / cls / f"{cls}_{i + 1}.jpg", i)


def make_flowers(root: Path) -> None:
    folder = root / "flowers-102"
    labels = np.array([1, 1, 1, 1, 2, 2, 2, 2, 102, 102, 102, 102], dtype=np.uint8)  # 1-based classes
    for i in range(len(labels)):
        _jpg(folder / "jpg" / f"image_{i + 1:05d}.jpg", i)
    savemat(folder / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(folder / "setid.mat", {"trnid": np.array([[1, 5, 9]], dtype=np.uint16),
                                   "valid": np.array([[2, 6, 10]], dtype=np.uint16),
                                   "tstid": np.array([[3, 4, 7, 8, 11, 12]], dtype=np.uint16)})


def make_food(root: Path) -> None:
    folder = root / "food-101"
    classes = ["apple_pie", "baby_back_ribs"]
    _lines(folder / "meta" / "classes.txt", classes)
    rows = {"train": [], "test": []}
    for cls in classes:
        for i in range(5):
            _jpg(folder / "images" / cls / f"{100 + i}.jpg", i)
            rows["train" if i < 3 else "test"].append(f"{cls}/{100 + i}")
    for split, r in rows.items():
        _lines(folder / "meta" / f"{split}.txt", r)


def _idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_mnist(root: Path) -> None:
    raw = root / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    _idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (6, 28, 28)), gz=False)
    _idx(raw / "train-labels-idx1-ubyte", np.array([0, 1, 2, 0, 1, 9]), gz=False)
    _idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28)), gz=True)  # .gz accepted too
    _idx(raw / "t10k-labels-idx1-ubyte", np.array([3, 4, 5]), gz=True)


def make_oxfordpet(root: Path) -> None:
    folder = root / "oxford-iiit-pet"
    rows = {"trainval": [], "test": []}
    for cls_id, (breed, species) in enumerate([("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 1)], start=1):
        for i in range(4):
            _jpg(folder / "images" / f"{breed}_{i + 1}.jpg", i)
            rows["trainval" if i < 2 else "test"].append(f"{breed}_{i + 1} {cls_id} {species} 1")
    for split, r in rows.items():
        _lines(folder / "annotations" / f"{split}.txt", r)


def _annotations(fnames: list[str], classes: list[int]) -> np.ndarray:
    records = np.zeros(len(fnames), dtype=[("bbox_x1", "O"), ("class", "O"), ("fname", "O")])
    for i, (f, c) in enumerate(zip(fnames, classes)):
        records[i] = (np.uint8(1), np.uint8(c), f)
    return records


def make_stanfordcars(root: Path) -> None:
    folder = root / "stanford_cars"
    (folder / "devkit").mkdir(parents=True)
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"], dtype=object)
    savemat(folder / "devkit" / "cars_meta.mat", {"class_names": names[None, :]})
    train = [f"{i + 1:05d}.jpg" for i in range(6)]
    test = [f"{i + 1:05d}.jpg" for i in range(3)]
    for f in train:
        _jpg(folder / "cars_train" / f)
    for f in test:
        _jpg(folder / "cars_test" / f)
    savemat(folder / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(train, [1, 2, 3, 1, 2, 3])})
    savemat(folder / "cars_test_annos_withlabels.mat", {"annotations": _annotations(test, [3, 2, 1])})


def make_sun397(root: Path) -> None:
    folder = root / "SUN397"
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/beach"]
    _lines(folder / "ClassName.txt", classes)
    for c, cls in enumerate(classes):
        for i in range(5):
            _jpg(folder / cls.strip("/") / f"sun_{c}{i:04d}.jpg", i)


MAKERS = {
    "aircraft": make_aircraft, "caltech101": make_caltech101, "cifar100": make_cifar100, "dtd": make_dtd,
    "eurosat": make_eurosat, "flowers": make_flowers, "food": make_food, "mnist": make_mnist,
    "oxfordpet": make_oxfordpet, "stanfordcars": make_stanfordcars, "sun397": make_sun397,
}


# ---------------------------------------------------------------- one test per reader


def test_aircraft(tmp_path):
    make_aircraft(tmp_path)
    train, test = read_aircraft(tmp_path)
    assert train.classnames == ["707-320", "A300B4", "F/A-18"]
    assert _class_counts(train) == [3, 3, 3] and _class_counts(test) == [2, 2, 2]  # train = trainval
    assert all(Path(s).exists() for s in list(train.sources) + list(test.sources))
    zscl_train, _ = read_aircraft(tmp_path, split_rule="zscl")
    assert _class_counts(zscl_train) == [2, 2, 2]  # train only


def test_caltech101_drops_background_and_splits_per_class(tmp_path):
    make_caltech101(tmp_path)
    train, test = read_caltech101(tmp_path)
    assert train.classnames == ["centered face", "side of a car", "yin and yang symbol"]
    assert _class_counts(train) == [4, 8, 3] and _class_counts(test) == [1, 2, 1]
    assert not set(map(str, train.sources)) & set(map(str, test.sources))
    assert list(train.sources) == sorted(train.sources)
    again, _ = read_caltech101(tmp_path)
    assert list(again.sources) == list(train.sources)  # deterministic
    zscl_train, zscl_test = read_caltech101(tmp_path, split_rule="zscl")
    assert (len(zscl_train), len(zscl_test)) == (15, 4)  # int(0.8 * 19) over the whole dataset


def test_caltech101_directly_under_root(tmp_path):
    for cls in ["ant", "crocodile_head"]:
        for i in range(3):
            _jpg(tmp_path / "101_ObjectCategories" / cls / f"image_{i + 1:04d}.jpg")
    train, test = read_caltech101(tmp_path)
    assert train.classnames == ["ant", "head of a crocodile"] and len(train) + len(test) == 6


def test_cifar100_in_memory(tmp_path):
    make_cifar100(tmp_path)
    train, test = read_cifar100(tmp_path)
    assert train.classnames == ["apple", "aquarium fish", "bed"]
    assert len(train) == 6 and len(test) == 3 and train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert train.sources.shape == (6, 32, 32, 3) and train.sources.dtype == np.uint8
    raw = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes())["data"][0]
    assert np.array_equal(train.sources[0][:, :, 0].ravel(), raw[:1024])  # channel-major rows decoded right
    assert load_image(train.sources[0]).size == (32, 32)


def test_dtd(tmp_path):
    make_dtd(tmp_path)
    train, test = read_dtd(tmp_path)
    assert train.classnames == ["banded", "zigzagged"]
    assert _class_counts(train) == [3, 3] and _class_counts(test) == [3, 3]  # train1 + val1
    assert _class_counts(read_dtd(tmp_path, split_rule="zscl")[0]) == [2, 2]


def test_dtd_torchvision_nested_layout(tmp_path):
    make_dtd(tmp_path / "dtd")  # torchvision extracts to <root>/dtd/dtd
    train, _ = read_dtd(tmp_path)
    assert len(train) == 6 and Path(train.sources[0]).exists()


def test_eurosat_readable_names(tmp_path):
    make_eurosat(tmp_path)
    train, test = read_eurosat(tmp_path)
    assert train.classnames == ["annual crop land", "brushland or shrubland", "lake or sea"]
    assert _class_counts(train) == [8, 4, 4] and _class_counts(test) == [2, 1, 1]


def test_flowers(tmp_path):
    make_flowers(tmp_path)
    train, test = read_flowers(tmp_path)
    assert len(train.classnames) == 102
    assert train.classnames[0] == "pink primrose" and train.classnames[101] == "blackberry lily"
    assert [Path(s).name for s in train.sources] == [f"image_{i:05d}.jpg" for i in (1, 2, 5, 6, 9, 10)]
    assert train.labels.tolist() == [0, 0, 1, 1, 101, 101]
    assert len(test) == 6 and test.labels.tolist() == [0, 0, 1, 1, 101, 101]
    assert len(read_flowers(tmp_path, split_rule="zscl")[0]) == 3  # trnid only


def test_food(tmp_path):
    make_food(tmp_path)
    train, test = read_food(tmp_path)
    assert train.classnames == ["apple pie", "baby back ribs"]
    assert _class_counts(train) == [3, 3] and _class_counts(test) == [2, 2]
    assert Path(test.sources[0]).name == "103.jpg"


def test_mnist_plain_and_gz(tmp_path):
    make_mnist(tmp_path)
    train, test = read_mnist(tmp_path)
    assert train.classnames == [str(d) for d in range(10)]
    assert train.labels.tolist() == [0, 1, 2, 0, 1, 9] and test.labels.tolist() == [3, 4, 5]
    assert train.sources.shape == (6, 28, 28) and test.sources.shape == (3, 28, 28)
    assert load_image(test.sources[0]).mode == "RGB"


def test_oxfordpet(tmp_path):
    make_oxfordpet(tmp_path)
    train, test = read_oxfordpet(tmp_path)
    assert train.classnames == ["Abyssinian", "American Bulldog", "Bengal"]
    assert _class_counts(train) == [2, 2, 2] and _class_counts(test) == [2, 2, 2]
    assert all(Path(s).exists() for s in train.sources)


def test_stanfordcars(tmp_path):
    make_stanfordcars(tmp_path)
    train, test = read_stanfordcars(tmp_path)
    assert train.classnames == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    assert train.labels.tolist() == [0, 1, 2, 0, 1, 2] and test.labels.tolist() == [2, 1, 0]
    assert Path(test.sources[0]).parent.name == "cars_test"


def test_sun397(tmp_path):
    make_sun397(tmp_path)
    train, test = read_sun397(tmp_path)
    assert train.classnames == ["abbey", "apartment building outdoor", "beach"]
    assert _class_counts(train) == [4, 4, 4] and _class_counts(test) == [1, 1, 1]


# ---------------------------------------------------------------- errors, splits, few-shot, building


@pytest.mark.parametrize("key", sorted(MTCL_READERS))
def test_missing_dataset_names_the_path(tmp_path, key):
    with pytest.raises(DatasetLayoutError) as info:
        MTCL_READERS[key](tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and key in message.lower().replace("-", "")


@pytest.mark.parametrize("key, missing", [
    ("aircraft", "fgvc-aircraft-2013b/data/images_variant_test.txt"),
    ("flowers", "flowers-102/setid.mat"),
    ("food", "food-101/meta/test.txt"),
    ("mnist", "MNIST/raw/t10k-labels-idx1-ubyte.gz"),
    ("stanfordcars", "stanford_cars/cars_test_annos_withlabels.mat"),
    ("sun397", "SUN397/b/beach"),
    ("oxfordpet", "oxford-iiit-pet/images/Abyssinian_3.jpg"),  # first listed test image
])
def test_missing_file_inside_dataset_is_named(tmp_path, key, missing):
    MAKERS[key](tmp_path)
    target = tmp_path / missing
    if target.is_dir():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(DatasetLayoutError) as info:
        MTCL_READERS[key](tmp_path)
    assert str(target.with_suffix("") if key == "mnist" else target) in str(info.value)


def test_splits_partition_and_are_deterministic():
    labels = np.repeat(np.arange(4), [2, 5, 10, 31])
    train, test = split_per_class(labels)
    assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == len(labels)
    assert np.bincount(labels[test]).tolist() == [1, 1, 2, 6]
    assert np.array_equal(split_per_class(labels)[0], train)
    ztrain, ztest = zscl_random_split(48)
    assert len(ztrain) == 38 and np.array_equal(np.sort(np.concatenate([ztrain, ztest])), np.arange(48))
    assert np.array_equal(zscl_random_split(48)[0], ztrain)
    import torch

    same, _ = torch.utils.data.random_split(range(48), [38, 10], generator=torch.Generator().manual_seed(42))
    assert sorted(same.indices) == ztrain.tolist()  # exactly ZSCL's split_dataset


def test_few_shot_keeps_k_per_class_deterministically(tmp_path):
    make_eurosat(tmp_path)
    train, _ = read_eurosat(tmp_path)
    shot = few_shot(train, 2, seed=3)
    assert _class_counts(shot) == [2, 2, 2]
    assert list(few_shot(train, 2, seed=3).sources) == list(shot.sources)
    assert set(map(str, shot.sources)) <= set(map(str, train.sources))
    assert _class_counts(few_shot(train, 5, seed=0)) == [5, 4, 4]  # classes with fewer keep all
    draws = {tuple(map(str, few_shot(train, 2, seed=s).sources)) for s in range(6)}
    assert len(draws) > 1  # the seed matters


def test_build_mtcl_datasets_in_order(tmp_path):
    for key in ("mnist", "dtd", "food"):
        MAKERS[key](tmp_path)
    tasks = build_mtcl_datasets(tmp_path, datasets=["mnist", "DTD", "food"], shots=1, seed=0)
    assert [name for name, _, _ in tasks] == ["MNIST", "DTD", "Food"]
    assert [len(tr) for _, tr, _ in tasks] == [4, 2, 2]  # one per class present
    assert [len(te) for _, _, te in tasks] == [3, 6, 4]
    capped = build_mtcl_datasets(tmp_path, datasets=["dtd"], max_test_per_class=1)
    assert len(capped[0][2]) == 2


def test_orders_cover_all_datasets():
    assert MTCL_ORDERS["order1"] == sorted(MTCL_READERS) == sorted(MTCL_DISPLAY_NAMES)
    assert sorted(MTCL_ORDERS["order2"]) == MTCL_ORDERS["order1"]
    assert [MTCL_DISPLAY_NAMES[k] for k in MTCL_ORDERS["order2"]][:3] == ["StanfordCars", "Food", "MNIST"]
    with pytest.raises(ValueError):
        build_mtcl_datasets(Path("."), order="order3")
