"""Data layer of the class-incremental protocols, on tiny fake datasets written in the real layouts."""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mozo.data.base import CorruptImageError, DatasetLayoutError, LabelledImages, load_image
from mozo.data.loader import GlobalBatchSampler, Skipped, TransformedDataset, collate_skipping, make_loader
from mozo.data.readers import (
    IMAGENET_R_CLASSNAMES,
    READERS,
    read_cifar100,
    read_imagefolder,
    read_imagenet_r,
    read_tinyimagenet,
    split_test_count,
)
from mozo.data.scenario import (
    CIL_PROTOCOLS,
    Scenario,
    Task,
    build_cil_scenario,
    cil_protocol,
    class_incremental,
    few_shot_indices,
    load_class_orders,
)
from mozo.data.transforms import CLIP_MEAN, CLIP_STD, make_transform, resize_shortest_side

CIFAR_ORDER_HEAD = [87, 0, 52, 58, 44, 91, 68, 97, 51, 15]


# ------------------------------------------------------------------------------------------ fake data
def _save_image(path: Path, value: int, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".png": "PNG", ".bmp": "BMP"}.get(path.suffix.lower(), "JPEG")
    Image.new("RGB", size, (value, value // 2, 255 - value)).save(path, format=fmt)
    return path


def make_cifar100(root: Path, n_train: int = 3, n_test: int = 2, bytes_keys: bool = False) -> Path:
    """cifar-100-python/{train,test,meta} with 100 classes; every pixel of a class-c image equals c."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    for split, per_class in (("train", n_train), ("test", n_test)):
        labels = [c for c in range(100) for _ in range(per_class)]
        data = np.repeat(np.asarray(labels, dtype=np.uint8)[:, None], 3072, axis=1)
        with open(base / split, "wb") as f:
            pickle.dump({key("data"): data, key("fine_labels"): labels, key("coarse_labels"): [0] * len(labels)}, f)
    names = [f"class_{c:02d}" for c in range(100)]
    names[1] = "aquarium_fish"
    with open(base / "meta", "wb") as f:
        pickle.dump({key("fine_label_names"): names, key("coarse_label_names"): ["x"] * 20}, f)
    return root


TINY_WNIDS = ["n03000003", "n01000001", "n04000004", "n02000002"]  # deliberately unsorted in wnids.txt


def make_tinyimagenet(root: Path, n_train: int = 3, n_val: int = 2) -> Path:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    words = ["n00000000\tentity"] + [f"{w}\tthing {w[-1]}, synonym, other" for w in TINY_WNIDS]
    (base / "words.txt").write_text("\n".join(words) + "\n")
    ann = []
    for k, wnid in enumerate(TINY_WNIDS):
        for j in range(n_train):
            _save_image(base / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", 40 * k)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for j in range(n_val):
            name = f"val_{k * n_val + j}.JPEG"
            _save_image(base / "val" / "images" / name, 40 * k)
            ann.append(f"{name}\t{wnid}\t0\t0\t10\t10")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return root


IMR_WNIDS = ["n01443537", "n01484850", "n12267677", "n99999999"]  # three real ImageNet-R classes + an unknown one


def make_imagenet_r(root: Path, per_class: int = 10) -> Path:
    for k, wnid in enumerate(IMR_WNIDS):
        for j in range(per_class):
            ext = [".jpg", ".JPG", ".png", ".jpeg"][j % 4]
            _save_image(root / "imagenet-r" / wnid / f"art_{j}{ext}", 50 * k)
        (root / "imagenet-r" / wnid / "notes.txt").write_text("not an image")
    return root


def make_imagefolder(root: Path, test_dir: str = "test") -> Path:
    for k, cls in enumerate(["red_panda", "cat", "dog"]):
        for j in range(4):
            _save_image(root / "train" / cls / f"{j}.png", 60 * k)
        if cls != "dog":
            _save_image(root / test_dir / cls / "t0.jpg", 60 * k)
    return root


# -------------------------------------------------------------------------------------------- readers
def test_cifar100_reader(tmp_path):
    make_cifar100(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-100-python"):
        train, test = read_cifar100(root)
        assert (len(train), len(test)) == (300, 200)
        assert len(train.classnames) == 100 and train.classnames[1] == "aquarium fish"
        assert train.labels.tolist()[:4] == [0, 0, 0, 1]
        img = load_image(train.sources[7])
        assert img.size == (32, 32) and np.asarray(img)[0, 0, 0] == train.labels[7]


def test_cifar100_reader_python2_bytes_keys(tmp_path):
    make_cifar100(tmp_path, bytes_keys=True)
    train, _ = read_cifar100(tmp_path)
    assert len(train) == 300 and train.classnames[1] == "aquarium fish"


def test_tinyimagenet_reader(tmp_path):
    make_tinyimagenet(tmp_path)
    train, test = read_tinyimagenet(tmp_path)
    wnids = sorted(TINY_WNIDS)
    assert (len(train), len(test)) == (12, 8)
    assert train.classnames == [f"thing {w[-1]}" for w in wnids]
    for src, label in zip(train.sources, train.labels):
        assert Path(src).name.startswith(wnids[label]) and Path(src).parent.parent.name == wnids[label]
    # val labels come from the annotations file: val_{2k}, val_{2k+1} belong to TINY_WNIDS[k]
    by_name = {Path(s).name: int(l) for s, l in zip(test.sources, test.labels)}
    assert by_name["val_0.JPEG"] == wnids.index(TINY_WNIDS[0])
    assert by_name["val_7.JPEG"] == wnids.index(TINY_WNIDS[3])
    assert read_tinyimagenet(tmp_path / "tiny-imagenet-200")[0].sources == train.sources


def test_imagenet_r_reader_split(tmp_path):
    make_imagenet_r(tmp_path)
    train, test = read_imagenet_r(tmp_path)
    assert (len(train), len(test)) == (32, 8)  # 10 images per class (4 extension cases), 8/2 split
    assert np.bincount(test.labels).tolist() == [2, 2, 2, 2]
    assert train.classnames == ["goldfish", "great white shark", "acorn", "n99999999"]
    assert not set(map(str, train.sources)) & set(map(str, test.sources))
    again_train, again_test = read_imagenet_r(tmp_path)
    assert list(map(str, again_test.sources)) == list(map(str, test.sources))
    other = read_imagenet_r(tmp_path, seed=1)[1]
    assert list(map(str, other.sources)) != list(map(str, test.sources))
    assert len(read_imagenet_r(tmp_path, test_fraction=0.5)[1]) == 20
    assert len(IMAGENET_R_CLASSNAMES) == 200
    (tmp_path / "imagenet-r" / "classnames.txt").write_text("n99999999 mystery creature\n")
    assert read_imagenet_r(tmp_path)[0].classnames[3] == "mystery creature"
    assert [split_test_count(n, 0.2) for n in (1, 2, 5, 7, 10)] == [0, 1, 1, 1, 2]


def test_imagefolder_reader(tmp_path):
    make_imagefolder(tmp_path, test_dir="val")
    train, test = read_imagefolder(tmp_path)
    assert train.classnames == ["cat", "dog", "red panda"]
    assert (len(train), len(test)) == (12, 2)
    assert sorted(test.labels.tolist()) == [0, 2]
    assert set(READERS) == {"cifar100", "tinyimagenet", "imagenet-r", "imagefolder"}


def _layout_error(fn, root, expected_path: Path) -> DatasetLayoutError:
    with pytest.raises(DatasetLayoutError) as info:
        fn(root)
    assert info.value.path == expected_path
    assert str(expected_path) in str(info.value) and "docs/datasets.md" in str(info.value)
    return info.value


def test_layout_errors_name_the_path(tmp_path):
    _layout_error(read_cifar100, tmp_path / "nowhere", tmp_path / "nowhere")
    _layout_error(read_cifar100, tmp_path, tmp_path / "cifar-100-python")
    _layout_error(read_tinyimagenet, tmp_path, tmp_path / "tiny-imagenet-200")
    _layout_error(read_imagenet_r, tmp_path, tmp_path / "imagenet-r")
    _layout_error(read_imagefolder, tmp_path, tmp_path / "train")

    cifar = make_cifar100(tmp_path / "c")
    (cifar / "cifar-100-python" / "meta").unlink()
    _layout_error(read_cifar100, cifar, cifar / "cifar-100-python" / "meta")
    (cifar / "cifar-100-python" / "meta").write_bytes(b"not a pickle")
    _layout_error(read_cifar100, cifar, cifar / "cifar-100-python" / "meta")

    tiny = make_tinyimagenet(tmp_path / "t")
    (tiny / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    _layout_error(read_tinyimagenet, tiny, tiny / "tiny-imagenet-200" / "val" / "val_annotations.txt")
    wrong = tiny / "tiny-imagenet-200" / "train" / TINY_WNIDS[0] / "images"
    for f in wrong.iterdir():
        f.rename(wrong.parent / f.name)  # images not inside images/: wrong layout
    wrong.rmdir()
    _layout_error(read_tinyimagenet, tiny, wrong)

    folder = make_imagefolder(tmp_path / "f")
    (folder / "test" / "bird").mkdir()
    _layout_error(read_imagefolder, folder, folder / "test" / "bird")
    for f in (folder / "train" / "cat").iterdir():
        f.unlink()
    _layout_error(read_imagefolder, folder, folder / "train" / "cat")


def test_corrupt_image_raises_or_is_skipped(tmp_path):
    make_imagefolder(tmp_path)
    bad = tmp_path / "train" / "cat" / "9_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    train, _ = read_imagefolder(tmp_path)
    with pytest.raises(CorruptImageError, match="9_broken.jpg"):
        load_image(bad)
    i_bad = [str(s) for s in train.sources].index(str(bad))
    strict = TransformedDataset(train, make_transform(False, 16))
    with pytest.raises(CorruptImageError, match="9_broken.jpg"):
        strict[i_bad]
    lenient = TransformedDataset(train, make_transform(False, 16), skip_corrupt=True)
    assert lenient[i_bad] == Skipped(i_bad)
    batches = list(make_loader(lenient, batch_size=4, shuffle=False))
    assert [i for _, _, skipped in batches for i in skipped] == [i_bad]
    assert sum(len(labels) for _, labels, _ in batches) == len(train) - 1
    images, labels, skipped = collate_skipping([Skipped(3), Skipped(5)])
    assert (len(labels), skipped) == (0, [3, 5])


# ------------------------------------------------------------------------------------------ scenarios
def test_cil_split_cifar100_shared_order(tmp_path):
    make_cifar100(tmp_path)
    train, test = read_cifar100(tmp_path)
    order = load_class_orders()["cifar100"]
    assert order[:10] == CIFAR_ORDER_HEAD and sorted(order) == list(range(100))
    sc = class_incremental(train, test, order, 10, 10, dataset_name="cifar100")
    assert sc.protocol == "cil" and len(sc) == 10 and sc.task_test_sizes == [20] * 10
    t0 = sc.tasks[0]
    assert sorted(set(t0.train.labels.tolist())) == list(range(10))
    assert t0.classnames == [train.classnames[c] for c in CIFAR_ORDER_HEAD]
    # the image of new label p is an image of original class order[p] (pixel value = original class)
    for src, label in zip(t0.train.sources, t0.train.labels):
        assert src[0, 0, 0] == order[label]
    assert sc.seen_classes(0) == 10 and sc.seen_classes(3) == 40 and sc.seen_classes(-1) == 100
    assert sc.task_classes(2) == range(20, 30) and sc.tasks[2].label_offset == 20
    assert sc.eval_classnames(after_task=2) == sc.classnames[:30] == sc.tasks[2].eval_classnames
    assert sum(len(t.train) for t in sc.tasks) == len(train)

    natural = class_incremental(train, test, None, 50, 10)
    assert len(natural) == 6 and natural.tasks[0].classnames == train.classnames[:50]


def test_cil_validation_errors(tmp_path):
    make_cifar100(tmp_path)
    train, test = read_cifar100(tmp_path)
    with pytest.raises(ValueError, match="cover exactly the 100 classes"):
        class_incremental(train, test, None, 10, 7)
    with pytest.raises(ValueError, match="cover exactly"):
        class_incremental(train, test, None, 120, 10)
    with pytest.raises(ValueError, match="not a permutation"):
        class_incremental(train, test, [0] * 100, 10, 10)
    with pytest.raises(ValueError, match="has 99 entries"):
        class_incremental(train, test, list(range(99)), 10, 10)


def test_few_shot_keeps_k_per_class(tmp_path):
    make_cifar100(tmp_path, n_train=5)
    train, test = read_cifar100(tmp_path)
    order = load_class_orders()["cifar100"]
    sc = class_incremental(train, test, order, 10, 10, few_shot=2, seed=3)
    for task in sc.tasks:
        assert np.bincount(task.train.labels - task.label_offset).tolist() == [2] * 10
        assert len(task.test) == 20
    again = class_incremental(train, test, order, 10, 10, few_shot=2, seed=3)
    assert again.tasks[4].train.labels.tolist() == sc.tasks[4].train.labels.tolist()
    labels = np.repeat(np.arange(5), 20)
    a, b = few_shot_indices(labels, 3, seed=0), few_shot_indices(labels, 3, seed=1)
    assert len(a) == 15 and not np.array_equal(a, b)
    with pytest.warns(UserWarning, match="fewer than"):
        assert len(few_shot_indices(labels, 25)) == 100


def test_protocols_and_build(tmp_path):
    expected_tasks = {"cifar100-10-10": 10, "cifar100-5-5": 20, "cifar100-2-2": 50, "tinyimagenet-100-5": 21,
                      "tinyimagenet-100-10": 11, "tinyimagenet-100-20": 6, "tinyimagenet-inc10": 20,
                      "tinyimagenet-inc20": 10, "imagenet-r-inc20": 10}
    assert set(CIL_PROTOCOLS) == set(expected_tasks)
    for name, n_tasks in expected_tasks.items():
        p = cil_protocol(name)
        assert 1 + (p["num_classes"] - p["initial_increment"]) // p["increment"] == n_tasks
    assert cil_protocol("imagenet-r-inc20")["order_key"] is None
    assert len(load_class_orders()["tinyimagenet"]) == 200
    with pytest.raises(KeyError, match="known"):
        cil_protocol("cifar10-1-1")
    make_cifar100(tmp_path)
    sc = build_cil_scenario("cifar100-5-5", tmp_path)
    assert len(sc) == 20 and sc.tasks[0].classnames[0] == "class 87" and sc.name == "cifar100-5-5"
    make_imagenet_r(tmp_path)
    with pytest.raises(ValueError, match="expects 200 classes"):
        build_cil_scenario("imagenet-r-inc20", tmp_path)


def test_scenario_is_generic_for_mtcl(tmp_path):
    make_imagefolder(tmp_path)
    train, test = read_imagefolder(tmp_path)
    sc = Scenario(protocol="mtcl", tasks=[Task(name="pets", train=train, test=test, classnames=train.classnames)])
    assert sc.tasks[0].label_offset == 0 and sc.task_classes(0) == range(3)
    assert sc.eval_classnames(after_task=0, task=0) == train.classnames
    with pytest.raises(ValueError):
        sc.seen_classes(0)
    with pytest.raises(ValueError):
        Scenario(protocol="other", tasks=sc.tasks)


# ----------------------------------------------------------------------------------------- transforms
def test_eval_transform_shape_and_normalisation():
    img = Image.new("RGB", (64, 40), (255, 128, 0))
    out = make_transform(train=False, size=32)(img, None)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4)
    assert resize_shortest_side(img, 20).size == (32, 20)
    custom = make_transform(False, 8, mean=(0, 0, 0), std=(1, 1, 1))(img, None)
    assert torch.allclose(custom[0], torch.ones(8, 8))
    # a non-square image: the center crop keeps the middle (left half black, right half white)
    half = Image.new("RGB", (40, 20))
    half.paste((255, 255, 255), (20, 0, 40, 20))
    plain = make_transform(False, 20, mean=(0, 0, 0), std=(1, 1, 1))(half)
    assert plain[0, 10, 2] < 0.1 and plain[0, 10, 17] > 0.9


def test_train_transform_seeded_randomness():
    rng_np = np.random.default_rng(0)
    img = Image.fromarray(rng_np.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    t = make_transform(train=True, size=24)
    a, b = t(img, random.Random(5)), t(img, random.Random(5))
    assert a.shape == (3, 24, 24) and torch.equal(a, b)
    assert not torch.equal(a, t(img, random.Random(6)))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(t(img, g1), t(img, g2))
    with pytest.raises(ValueError, match="explicit rng"):
        t(img)


# -------------------------------------------------------------------------------------------- loader
def _indexed_images(n: int) -> LabelledImages:
    """n tiny in-memory images whose label is their index (and pixel value = index)."""
    arrays = np.stack([np.full((8, 8, 3), i, dtype=np.uint8) for i in range(n)])
    return LabelledImages(arrays, np.arange(n), [f"c{i}" for i in range(n)], "indexed")


def test_per_sample_randomness_independent_of_order():
    images = LabelledImages(np.random.default_rng(1).integers(0, 255, (6, 20, 20, 3), dtype=np.uint8),
                            np.arange(6), [str(i) for i in range(6)])
    ds = TransformedDataset(images, make_transform(True, 12), seed=7)
    forward = [ds[i][0] for i in range(6)]
    backward = [ds[i][0] for i in reversed(range(6))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(forward, backward))
    ds.set_epoch(1)
    assert not all(torch.equal(x, ds[i][0]) for i, x in enumerate(forward))
    mapped = TransformedDataset(images, make_transform(False, 12), label_map={i: 10 + i for i in range(6)})
    assert mapped[3][1] == 13


def test_loader_order_seeded_and_resumable():
    ds = TransformedDataset(_indexed_images(23), make_transform(False, 8))
    state = torch.get_rng_state()
    full = [labels.tolist() for _, labels, _ in make_loader(ds, 5, shuffle=True, seed=3, epoch=2)]
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    assert sorted(sum(full, [])) == list(range(23)) and [len(b) for b in full] == [5, 5, 5, 5, 3]
    assert full == [labels.tolist() for _, labels, _ in make_loader(ds, 5, shuffle=True, seed=3, epoch=2)]
    assert full != [labels.tolist() for _, labels, _ in make_loader(ds, 5, shuffle=True, seed=3, epoch=3)]
    resumed = make_loader(ds, 5, shuffle=True, seed=3, epoch=2, start_batch=2)
    assert len(resumed) == 3 and [labels.tolist() for _, labels, _ in resumed] == full[2:]
    assert len(make_loader(ds, 5, shuffle=True, seed=3, epoch=2, drop_last=True)) == 4
    with_workers = make_loader(ds, 5, shuffle=True, seed=3, epoch=2, num_workers=2)
    batches = list(with_workers)
    assert [labels.tolist() for _, labels, _ in batches] == full
    plain = list(make_loader(ds, 5, shuffle=True, seed=3, epoch=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, plain))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_partition_global_batches(world_size):
    n, bs = 30, 8  # 3 full global batches and a last one of 6
    glob = list(GlobalBatchSampler(n, bs, shuffle=True, seed=1, epoch=0))
    per_rank = [list(GlobalBatchSampler(n, bs, True, 1, 0, rank=r, world_size=world_size)) for r in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1  # same number of steps on every rank
    for k, global_batch in enumerate(glob[:-1]):
        assert sum((per_rank[r][k] for r in range(world_size)), []) == global_batch
        assert per_rank[1][k] == global_batch[bs // world_size: 2 * bs // world_size]
    last = [per_rank[r][-1] for r in range(world_size)]
    assert len({len(s) for s in last}) == 1 and set(glob[-1]) <= set(sum(last, []))  # padded, even
    exact = [list(GlobalBatchSampler(n, bs, True, 1, 0, rank=r, world_size=world_size, pad_last=False))
             for r in range(world_size)]
    assert sorted(sum((sum(b, []) for b in exact), [])) == list(range(n))  # a partition: no duplicates
    for r in range(world_size):
        sampler = GlobalBatchSampler(n, bs, True, 1, 0, rank=r, world_size=world_size, pad_last=False)
        assert len(sampler) == len(exact[r])
    resumed = list(GlobalBatchSampler(n, bs, True, 1, 0, start_batch=1, rank=1, world_size=world_size))
    assert resumed == per_rank[1][1:]
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(n, 6, True, world_size=4)
