"""Dataset files are data, never instructions, and a bad file gives a message naming it (issue 13).

Each test writes a tiny fake dataset in tmp_path with one defect: a pickle that would run code, a list
file naming a path outside the dataset, a 16-bit image, a label outside the class list, a name or text
that is not UTF-8, a truncated idx file.
"""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mozo.data.base import DatasetLayoutError, LabelledImages, LabelRangeError, load_image
from mozo.data.mtcl import read_eurosat, read_food, read_mnist, read_oxfordpet, read_sun397
from mozo.data.readers import read_cifar100, read_imagefolder, read_imagenet_r, read_tinyimagenet
from mozo.data.transforms import make_transform


def _img(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (value, value, value)).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _message_is_printable(exc: BaseException) -> str:
    """The message, checked to be valid UTF-8 (a surrogate in it would break logging it to a file)."""
    message = str(exc)
    message.encode("utf-8")
    return message


# ------------------------------------------------------------------------------- CIFAR pickles
def _cifar(root: Path, protocol: int, meta: dict | None = None, bytes_keys: bool = False) -> Path:
    """cifar-100-python/ with 3 classes, 2 images each; pixel value = class."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    for split in ("train", "test"):
        labels = [0, 0, 1, 1, 2, 2]
        data = np.repeat(np.asarray(labels, dtype=np.uint8)[:, None], 3072, axis=1)
        blob = {key("data"): data, key("fine_labels"): labels, key("filenames"): [b"a.png"] * 6}
        (base / split).write_bytes(pickle.dumps(blob, protocol=protocol))
    meta = meta if meta is not None else {key("fine_label_names"): ["apple", "aquarium_fish", "bed"]}
    (base / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return base


class _Exec:
    """A pickle payload: unpickling calls exec, which would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


class _System:
    """A pickle payload: unpickling calls os.system, which would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("payload", [_Exec, _System])
def test_cifar_pickle_payload_is_refused_and_never_runs(tmp_path, payload):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(payload(proof)))  # plain pickle would run it: the payload is real
    assert proof.exists()
    marker = tmp_path / "marker"
    _cifar(tmp_path / "data", pickle.DEFAULT_PROTOCOL, meta={"fine_label_names": [payload(marker)]})
    with pytest.raises(DatasetLayoutError) as info:
        read_cifar100(tmp_path / "data")
    assert not marker.exists()
    message = str(info.value)
    assert str(tmp_path / "data" / "cifar-100-python" / "meta") in message
    assert "refused to load" in message and ("exec" in message or "system" in message)
    assert "arrays, lists and strings" in message


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar_genuine_pickles_still_load(tmp_path, protocol, bytes_keys):
    _cifar(tmp_path, protocol, bytes_keys=bytes_keys)
    train, test = read_cifar100(tmp_path)
    assert train.classnames == ["apple", "aquarium fish", "bed"]
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and len(test) == 6
    assert train.sources.shape == (6, 32, 32, 3) and train.sources.dtype == np.uint8
    assert int(train.sources[4].max()) == 2


def test_cifar_pickle_with_numpy1_module_names_loads(tmp_path):
    """Pickles from numpy 1 / Python 2 (the real files) name numpy.core.multiarray, not numpy._core."""
    base = _cifar(tmp_path, 2)
    for split in ("train", "test"):
        raw = (base / split).read_bytes()
        (base / split).write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
        assert b"numpy.core.multiarray" in (base / split).read_bytes()
    train, _ = read_cifar100(tmp_path)
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and int(train.sources[2].max()) == 1


# ------------------------------------------------------------------- paths from list files
def _tinyimagenet(root: Path, annotation: str) -> Path:
    base = root / "tiny-imagenet-200"
    _write(base / "wnids.txt", "n01000001\n")
    _write(base / "words.txt", "n01000001\tthing, other\n")
    _img(base / "train" / "n01000001" / "images" / "n01000001_0.JPEG")
    _img(base / "val" / "images" / "val_0.JPEG")
    _write(base / "val" / "val_annotations.txt", f"val_0.JPEG\tn01000001\t0\t0\t5\t5\n{annotation}\n")
    return base


@pytest.mark.parametrize("bad", ["../../../secret.JPEG", "/etc/passwd", "images/../../x.JPEG"])
def test_tinyimagenet_annotation_path_must_stay_inside(tmp_path, bad):
    _write(tmp_path / "secret.JPEG", b"not read")
    base = _tinyimagenet(tmp_path, f"{bad}\tn01000001\t0\t0\t5\t5")
    with pytest.raises(DatasetLayoutError) as info:
        read_tinyimagenet(tmp_path)
    message = str(info.value)
    assert str(base / "val" / "val_annotations.txt") in message and "line 2" in message and repr(bad) in message


def test_tinyimagenet_plain_annotation_names_still_work(tmp_path):
    base = _tinyimagenet(tmp_path, "")
    _, test = read_tinyimagenet(tmp_path)
    assert test.sources == [base / "val" / "images" / "val_0.JPEG"]


def _food(root: Path, extra_train_line: str = "") -> Path:
    folder = root / "food-101"
    _write(folder / "meta" / "classes.txt", "apple_pie\n")
    for i in range(3):
        _img(folder / "images" / "apple_pie" / f"{i}.jpg")
    _write(folder / "meta" / "train.txt", f"apple_pie/0\napple_pie/1\n{extra_train_line}\n")
    _write(folder / "meta" / "test.txt", "apple_pie/2\n")
    return folder


@pytest.mark.parametrize("bad", ["apple_pie/../../../../etc/passwd", "/etc/passwd"])
def test_food_list_path_must_stay_inside(tmp_path, bad):
    folder = _food(tmp_path, bad)
    with pytest.raises(DatasetLayoutError) as info:
        read_food(tmp_path)
    message = str(info.value)
    assert str(folder / "meta" / "train.txt") in message and "line 3" in message and repr(f"{bad}.jpg") in message


def test_sun397_class_path_must_stay_inside(tmp_path):
    folder = tmp_path / "SUN397"
    _write(folder / "ClassName.txt", "/a/abbey\n/../../outside\n")
    _img(folder / "a" / "abbey" / "sun_0.jpg")
    (tmp_path / "outside").mkdir()
    _img(tmp_path / "outside" / "stolen.jpg")
    with pytest.raises(DatasetLayoutError, match=r"ClassName\.txt.*line 2 names '\.\./\.\./outside'"):
        read_sun397(tmp_path)


# ------------------------------------------------------------------------------ 16-bit images
def test_16bit_png_mid_grey_loads_as_mid_grey(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 5), 32768, dtype=np.uint16)).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really decoded as a 16-bit image
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (5, 4)
    assert np.abs(np.asarray(img).astype(int) - 128).max() <= 1
    Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16)).save(tmp_path / "white16.png")
    assert np.asarray(load_image(tmp_path / "white16.png")).min() == 255


def test_int_and_float_modes_scaled(tmp_path):
    Image.fromarray(np.full((3, 3), 32768, dtype=np.int32), mode="I").save(tmp_path / "i32.tif")
    Image.fromarray(np.full((3, 3), 0.5, dtype=np.float32), mode="F").save(tmp_path / "f01.tif")
    Image.fromarray(np.full((3, 3), 200.0, dtype=np.float32), mode="F").save(tmp_path / "f255.tif")
    assert np.asarray(load_image(tmp_path / "i32.tif")).max() == 128
    assert np.asarray(load_image(tmp_path / "f01.tif")).max() == 128
    assert np.asarray(load_image(tmp_path / "f255.tif")).max() == 200


def test_in_memory_uint16_array_scaled_and_uint8_unchanged():
    assert np.asarray(load_image(np.full((4, 4, 3), 32768, dtype=np.uint16))).max() == 128
    assert np.asarray(load_image(np.full((4, 4), 65535, dtype=np.uint16))).min() == 255
    arr = np.random.default_rng(0).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(arr)), arr)
    assert np.asarray(load_image(np.full((2, 2, 3), 300, dtype=np.int64))).min() == 255  # clipped, no wrap to 44


def test_transform_scales_a_16bit_image_given_directly():
    grey16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    grey8 = Image.new("RGB", (8, 8), (128, 128, 128))
    t = make_transform(train=False, size=8)
    assert np.allclose(t(grey16).numpy(), t(grey8).numpy(), atol=0.02)


# ---------------------------------------------------------------------------- label ranges
def test_labelled_images_refuses_labels_outside_classnames():
    arrays = np.zeros((3, 2, 2, 3), dtype=np.uint8)
    with pytest.raises(LabelRangeError, match=r"mine: label 3 of image 2 is outside 0\.\.2"):
        LabelledImages(arrays, [0, 1, 3], ["a", "b", "c"], name="mine")
    with pytest.raises(LabelRangeError, match="label -1"):
        LabelledImages(arrays, [-1, 0, 0], ["a", "b", "c"], name="mine")
    assert len(LabelledImages(arrays, [0, 1, 2], ["a", "b", "c"]).subset([2])) == 1


def _idx(path: Path, array: np.ndarray) -> bytes:
    payload = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload += array.astype(np.uint8).tobytes()
    _write(path, payload)
    return payload


def _mnist(root: Path, test_labels=(3, 4, 5)) -> Path:
    raw = root / "MNIST" / "raw"
    _idx(raw / "train-images-idx3-ubyte", np.zeros((3, 28, 28)))
    _idx(raw / "train-labels-idx1-ubyte", np.array([0, 1, 2]))
    _idx(raw / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28)))
    _idx(raw / "t10k-labels-idx1-ubyte", np.array(test_labels))
    return raw


def test_mnist_test_label_outside_classes_is_named(tmp_path):
    raw = _mnist(tmp_path, test_labels=(3, 12, 5))
    with pytest.raises(DatasetLayoutError) as info:
        read_mnist(tmp_path)
    message = str(info.value)
    assert str(raw / "t10k-labels-idx1-ubyte") in message and "label 12" in message and "0..9" in message


def test_oxfordpet_class_id_zero_is_named(tmp_path):
    folder = tmp_path / "oxford-iiit-pet"
    _img(folder / "images" / "Abyssinian_1.jpg")
    _img(folder / "images" / "Abyssinian_2.jpg")
    _write(folder / "annotations" / "trainval.txt", "Abyssinian_1 1 1 1\nAbyssinian_2 0 1 1\n")
    _write(folder / "annotations" / "test.txt", "Abyssinian_1 1 1 1\n")
    with pytest.raises(DatasetLayoutError, match=r"trainval\.txt.*train labels 1\.\.1 .*has label 0"):
        read_oxfordpet(tmp_path)


# ------------------------------------------------------------------------- names and text
def _bytes_dir(parent: Path, name: bytes) -> Path:
    path = os.path.join(os.fsencode(parent), name)
    os.makedirs(path)
    return Path(os.fsdecode(path))


def test_imagefolder_class_folder_not_utf8(tmp_path):
    _img(tmp_path / "train" / "cat" / "0.png")
    _img(_bytes_dir(tmp_path / "train", b"caf\xe9") / "0.png")
    _img(tmp_path / "test" / "cat" / "1.png")
    with pytest.raises(DatasetLayoutError) as info:
        read_imagefolder(tmp_path)
    message = _message_is_printable(info.value)
    assert str(tmp_path / "train") in message and repr(b"caf\xe9") in message


def test_image_file_name_not_utf8(tmp_path):
    folder = tmp_path / "imagenet-r" / "n01443537"
    _img(folder / "ok.jpg")
    _img(Path(os.fsdecode(os.path.join(os.fsencode(folder), b"bad\xff.jpg"))))
    with pytest.raises(DatasetLayoutError) as info:
        read_imagenet_r(tmp_path)
    message = _message_is_printable(info.value)
    assert str(folder) in message and repr(b"bad\xff.jpg") in message


def test_mtcl_class_folder_not_utf8(tmp_path):
    base = tmp_path / "EuroSAT" / "2750"
    _img(base / "Forest" / "Forest_1.jpg")
    _img(_bytes_dir(base, b"Sea\xffLake") / "x_1.jpg")
    with pytest.raises(DatasetLayoutError) as info:
        read_eurosat(tmp_path)
    assert repr(b"Sea\xffLake") in _message_is_printable(info.value)


def test_tinyimagenet_words_not_utf8(tmp_path):
    base = _tinyimagenet(tmp_path, "")
    _write(base / "words.txt", b"n00000000\tentity\nn01000001\tth\xffing, other\n")
    with pytest.raises(DatasetLayoutError) as info:
        read_tinyimagenet(tmp_path)
    message = str(info.value)
    assert str(base / "words.txt") in message and "line 2" in message and "not UTF-8" in message


def test_mtcl_list_file_not_utf8_is_an_error_not_a_replacement_char(tmp_path):
    folder = _food(tmp_path)
    _write(folder / "meta" / "classes.txt", b"apple_pie\nb\xe9ef\n")
    with pytest.raises(DatasetLayoutError, match=r"classes\.txt.*line 2 has the bytes b'\\xe9'"):
        read_food(tmp_path)


# --------------------------------------------------------------------------------- idx files
def test_mnist_valid_files_load(tmp_path):
    _mnist(tmp_path)
    train, test = read_mnist(tmp_path)
    assert train.labels.tolist() == [0, 1, 2] and test.sources.shape == (3, 28, 28)


@pytest.mark.parametrize("cut", [6, 20, 100])
def test_mnist_truncated_idx_named(tmp_path, cut):
    raw = _mnist(tmp_path)
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:cut])
    with pytest.raises(DatasetLayoutError) as info:
        read_mnist(tmp_path)
    message = str(info.value)
    assert str(images) in message and "truncated" in message


def test_mnist_truncated_gz_and_count_mismatch_named(tmp_path):
    raw = _mnist(tmp_path)
    labels = raw / "train-labels-idx1-ubyte"
    gz = raw / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(labels.read_bytes())[:-6])
    labels.unlink()
    with pytest.raises(DatasetLayoutError, match=r"train-labels-idx1-ubyte\.gz.*complete idx file"):
        read_mnist(tmp_path)
    gz.unlink()
    _idx(labels, np.array([0, 1]))
    with pytest.raises(DatasetLayoutError, match=r"train-labels-idx1-ubyte.*one label per image .*\(3\), got 2"):
        read_mnist(tmp_path)
