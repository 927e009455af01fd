"""Readers for the 11 datasets of the multi-domain task-incremental protocol (MTCL / MTIL).

The protocol (ZSCL, MoE-Adapters4CL) trains CLIP on 11 image-classification datasets one after the
other and evaluates every dataset after every task. Each reader here takes the data root (the folder
`--data-root` points at, the same folder torchvision's `root=` / ZSCL's `--data-location` would get)
and returns `(train, test)` as `LabelledImages`: sorted image paths (decoded lazily by `load_image`),
or in-memory uint8 arrays for the datasets shipped as arrays (CIFAR-100, MNIST). Class names are the
ones CLIP's prompts use (ZSCL's lists where they differ from the folder names).

Three datasets have no official split (Caltech101, EuroSAT, SUN397) and three have an official
validation split (Aircraft, DTD, Flowers). `split_rule` decides both, see `SPLIT_RULES`; the layouts
and rules are described in docs/datasets.md (section "Multi-domain (MTCL) datasets").
"""
from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from mozo.data.base import DatasetLayoutError, LabelledImages, LabelRangeError, contained, read_text, utf8_name

SPLIT_RULES = ("stratified", "zscl")
"""How splits are made where the dataset leaves a choice.

- "stratified" (default): train = official train + val where a val split exists (Aircraft trainval,
  DTD train1+val1, Flowers trnid+valid); Caltech101 / EuroSAT / SUN397 are split 80/20 within every
  class with a numpy generator seeded with `SPLIT_SEED`, so each class keeps its share in the test set.
- "zscl": what the ZSCL / MoE-Adapters code does: train = the official train split only (no val), and
  Caltech101 / EuroSAT / SUN397 are split 80/20 over the whole dataset by the permutation
  `torch.randperm(n, generator=torch.Generator().manual_seed(42))` (torch's `random_split`), over the
  images in torchvision's order (identical to ZSCL for Caltech101 and EuroSAT; for SUN397 torchvision's
  order depends on the file system, so only the procedure and sizes match).
"""
SPLIT_SEED = 42
TRAIN_FRACTION = 0.8
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

Splits = tuple[LabelledImages, LabelledImages]
Reader = Callable[..., Splits]


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _find_dir(root: Path, candidates: Sequence[str], dataset: str, expected: str, contains: str = "") -> Path:
    """First of `candidates` (relative to root) that is a folder (holding `contains`, if given): the common
    download layouts (torchvision's, the original archives') differ only there."""
    for rel in candidates:
        if (root / rel).is_dir() and (not contains or (root / rel / contains).exists()):
            return root / rel
    others = ", ".join(str(root / rel) for rel in candidates[1:])
    also = f" (also looked for {others})" if others else ""
    raise DatasetLayoutError(root / candidates[0], expected + also, dataset)


def _require(path: Path, dataset: str, expected: str) -> Path:
    """Fail early, naming the file, instead of failing later inside a data loader worker."""
    if not path.exists():
        raise DatasetLayoutError(path, expected, dataset)
    return path


def _numbered_lines(path: Path, dataset: str, expected: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of the non-empty, non-comment lines of a split / class list file; the
    numbers let an error name the line it is about."""
    text = read_text(_require(path, dataset, expected), dataset, expected)
    return [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1)
            if ln.strip() and not ln.lstrip().startswith("#")]


def _read_lines(path: Path, dataset: str, expected: str) -> list[str]:
    """Non-empty, non-comment lines of a split / class list file."""
    return [ln for _, ln in _numbered_lines(path, dataset, expected)]


def _loadmat(path: Path, dataset: str, expected: str) -> dict:
    """scipy is imported here only: it comes with scikit-learn and only three datasets need it."""
    from scipy.io import loadmat

    return loadmat(str(_require(path, dataset, expected)), squeeze_me=True)


def _spaces(name: str) -> str:
    return name.replace("_", " ").strip()


def _image_files(folder: Path, dataset: str) -> list[Path]:
    """Sorted image files of one folder (not recursive, no stat per file: SUN397 has 100k images);
    hidden files such as macOS's ._foo.jpg are skipped, a name that is not UTF-8 is an error."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    for p in files:
        utf8_name(p, dataset)
    return sorted(files)


def _class_folders(folder: Path, dataset: str, exclude: Iterable[str] = ()) -> tuple[list[Path], list[int], list[str]]:
    """The "one sub-folder per class" layout: (sorted paths, labels, sorted folder names)."""
    skip = set(exclude)
    classes = sorted(utf8_name(d, dataset) for d in folder.iterdir()
                     if d.is_dir() and d.name not in skip and not d.name.startswith("."))
    if not classes:
        raise DatasetLayoutError(folder, "one sub-folder of images per class", dataset)
    sources: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        files = _image_files(folder / cls, dataset)
        sources += files
        labels += [label] * len(files)
    return sources, labels, classes


def _check_first(sources: Sequence, dataset: str, expected: str) -> None:
    """Stat one listed image: a wrong layout then fails at read time with the path, at the cost of one stat."""
    if len(sources) and not isinstance(sources[0], np.ndarray):
        _require(Path(sources[0]), dataset, expected)


def _make(dataset: str, split: str, sources: Sequence, labels: Sequence[int], classnames: list[str],
          where: Path, labels_from: Path | None = None, label_base: int = 0, **meta) -> LabelledImages:
    """Build the LabelledImages of one split; `where` (the dataset folder) is named if the split is empty.

    A label outside the class list is an error naming `labels_from` (the file the labels were read
    from, `where` if not given) and the label as written there (`label_base` 1 for 1-based files).
    """
    if len(labels) == 0:
        raise DatasetLayoutError(where, f"at least one {split} image", dataset)
    _check_first(sources, dataset, "the image files named by the dataset's lists / folders")
    try:
        return LabelledImages(sources, np.asarray(labels, dtype=np.int64), classnames, name=dataset,
                              meta={"dataset": dataset, "split": split, **meta})
    except LabelRangeError as exc:
        n = len(classnames)
        raise DatasetLayoutError(labels_from or where, f"{split} labels {label_base}..{n - 1 + label_base} for "
                                 f"the {n} classes; entry {exc.index} has label {exc.label + label_base} "
                                 f"({exc.count} out of range in all)", dataset) from None


def _lookup(index: dict[str, int], names: Iterable[str], listed_in: Path, dataset: str) -> list[int]:
    """Labels of class names read from a split file; an unknown name means the files do not belong together."""
    try:
        return [index[n] for n in names]
    except KeyError as exc:
        raise DatasetLayoutError(listed_in, f"only classes of the dataset's class list (unknown {exc})",
                                 dataset) from None


def _check_rule(split_rule: str) -> None:
    if split_rule not in SPLIT_RULES:
        raise ValueError(f"split_rule must be one of {SPLIT_RULES}, got {split_rule!r}")


def split_per_class(labels: np.ndarray, train_fraction: float = TRAIN_FRACTION,
                    seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: every class keeps `train_fraction` of its images (at least one on each
    side when it has two or more), so small classes are not left out of the test set by chance."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_train = len(idx) if len(idx) < 2 else min(max(int(round(train_fraction * len(idx))), 1), len(idx) - 1)
        train.append(idx[:n_train])
        test.append(idx[n_train:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def zscl_random_split(n: int, train_fraction: float = TRAIN_FRACTION,
                      seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The split ZSCL makes with `torch.utils.data.random_split(ds, [int(0.8 n), rest], Generator(42))`:
    the first int(0.8 n) entries of a seeded torch permutation are train (returned sorted)."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_train = int(train_fraction * n)
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def _split(full: LabelledImages, split_rule: str) -> Splits:
    """Train/test of a dataset without an official split, by `split_rule`."""
    _check_rule(split_rule)
    if split_rule == "zscl":
        train_idx, test_idx = zscl_random_split(len(full))
    else:
        train_idx, test_idx = split_per_class(full.labels)
    train, test = full.subset(train_idx), full.subset(test_idx)
    train.meta.update(split="train", split_rule=split_rule)
    test.meta.update(split="test", split_rule=split_rule)
    return train, test


def few_shot(images: LabelledImages, k: int, seed: int = 0) -> LabelledImages:
    """Keep k images per class (all of a class with fewer), drawn with a seeded generator and returned in
    the original order, so the same (k, seed) always gives the same subset. Also used to cap test sets."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(images.labels):
        idx = np.flatnonzero(images.labels == cls)
        keep.append(idx if len(idx) <= k else rng.choice(idx, size=k, replace=False))
    out = images.subset(np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64))
    out.meta["per_class"] = k
    return out


# --------------------------------------------------------------------------------------------------
# Readers (one per dataset, in Order I)
# --------------------------------------------------------------------------------------------------


def read_aircraft(root: Path, split_rule: str = "stratified") -> Splits:
    """FGVC-Aircraft at variant level (100 classes); train = trainval ("stratified") or train ("zscl")."""
    _check_rule(split_rule)
    key = "aircraft"
    data = _find_dir(Path(root), ["fgvc-aircraft-2013b/data"], key,
                     "fgvc-aircraft-2013b/data/ with images/, variants.txt and images_variant_*.txt")
    classes = _read_lines(data / "variants.txt", key, "one aircraft variant per line")
    index = {c: i for i, c in enumerate(classes)}

    def part(name: str, split: str) -> LabelledImages:
        listing = data / f"images_variant_{name}.txt"
        rows = []
        for n, ln in _numbered_lines(listing, key, "lines '<image id> <variant>'"):
            img, _, variant = ln.partition(" ")
            if not variant.strip():
                raise DatasetLayoutError(listing, f"lines '<image id> <variant>'; line {n} is {ln!r}", key)
            rows.append((img, variant.strip(), n))
        rows.sort()
        sources = [contained(data / "images", f"{img}.jpg", listing, key, n) for img, _, n in rows]
        labels = _lookup(index, (variant for _, variant, _ in rows), listing, key)
        return _make(key, split, sources, labels, classes, where=data, source_split=name)

    return part("trainval" if split_rule == "stratified" else "train", "train"), part("test", "test")


def read_caltech101(root: Path, split_rule: str = "stratified") -> Splits:
    """Caltech-101 without BACKGROUND_Google (101 classes, CLIP's class names); no official split."""
    key = "caltech101"
    folder = _find_dir(Path(root), ["caltech-101/101_ObjectCategories", "caltech101/101_ObjectCategories",
                                    "101_ObjectCategories"], key, "101_ObjectCategories/<class>/*.jpg")
    sources, labels, classes = _class_folders(folder, key, exclude=["BACKGROUND_Google"])
    names = [CALTECH101_NAMES.get(c, _spaces(c)) for c in classes]
    return _split(_make(key, "all", sources, labels, names, where=folder), split_rule)


def read_cifar100(root: Path) -> Splits:
    """CIFAR-100 python pickles: the same reader as the class-incremental protocols."""
    from mozo.data.readers import read_cifar100 as read

    return read(root)


def read_dtd(root: Path, split_rule: str = "stratified") -> Splits:
    """Describable Textures, partition 1; train = train1+val1 ("stratified") or train1 ("zscl")."""
    _check_rule(split_rule)
    key = "dtd"
    base = _find_dir(Path(root), ["dtd", "dtd/dtd"], key, "dtd/ with images/<class>/*.jpg and labels/",
                     contains="images")

    def lines(*names: str) -> list[tuple[str, Path]]:
        """Sorted (line, image path) of label files, each path checked to stay inside images/."""
        rows = []
        for name in names:
            listing = base / "labels" / f"{name}1.txt"
            rows += [(ln, contained(base / "images", ln, listing, key, n))
                     for n, ln in _numbered_lines(listing, key, "lines '<class>/<file>.jpg'")]
        return sorted(rows)

    train_lines = lines("train", "val") if split_rule == "stratified" else lines("train")
    test_lines = lines("test")
    classes = sorted({ln.split("/", 1)[0] for ln, _ in train_lines + test_lines})
    index = {c: i for i, c in enumerate(classes)}

    def part(rows: list[tuple[str, Path]], split: str) -> LabelledImages:
        return _make(key, split, [path for _, path in rows], [index[ln.split("/", 1)[0]] for ln, _ in rows],
                     [_spaces(c) for c in classes], where=base)

    return part(train_lines, "train"), part(test_lines, "test")


def read_eurosat(root: Path, split_rule: str = "stratified") -> Splits:
    """EuroSAT RGB (10 classes, CLIP's class names); no official split."""
    key = "eurosat"
    folder = _find_dir(Path(root), ["EuroSAT/2750", "eurosat/2750", "2750"], key, "2750/<class>/*.jpg")
    sources, labels, classes = _class_folders(folder, key)
    names = [EUROSAT_NAMES.get(c, re.sub(r"(\w)([A-Z])", r"\1 \2", c).lower()) for c in classes]
    return _split(_make(key, "all", sources, labels, names, where=folder), split_rule)


def read_flowers(root: Path, split_rule: str = "stratified") -> Splits:
    """Oxford Flowers-102; train = trnid+valid ("stratified") or trnid ("zscl"), test = tstid."""
    _check_rule(split_rule)
    key = "flowers"
    folder = _find_dir(Path(root), ["flowers-102"], key, "flowers-102/ with jpg/, imagelabels.mat and setid.mat")
    _require(folder / "jpg", key, "jpg/image_XXXXX.jpg")
    labels = np.atleast_1d(_loadmat(folder / "imagelabels.mat", key, "'labels' (1-based)")["labels"])
    labels = labels.astype(np.int64) - 1
    setid = _loadmat(folder / "setid.mat", key, "'trnid', 'valid', 'tstid' (1-based image ids)")
    n_classes = max(len(FLOWERS_NAMES), int(labels.max()) + 1)
    classes = [FLOWERS_NAMES[i] if i < len(FLOWERS_NAMES) else f"flower {i + 1}" for i in range(n_classes)]

    def part(ids_keys: Sequence[str], split: str) -> LabelledImages:
        ids = np.sort(np.concatenate([np.atleast_1d(setid[k]).astype(np.int64) for k in ids_keys]))
        if len(ids) and (ids[0] < 1 or ids[-1] > len(labels)):  # id 0 would silently take the last label
            bad = ids[0] if ids[0] < 1 else ids[-1]
            raise DatasetLayoutError(folder / "setid.mat", f"image ids 1..{len(labels)} (one per label of "
                                     f"imagelabels.mat) in {list(ids_keys)}; found {bad}", key)
        return _make(key, split, [folder / "jpg" / f"image_{i:05d}.jpg" for i in ids], labels[ids - 1], classes,
                     where=folder, labels_from=folder / "imagelabels.mat", label_base=1)

    train_keys = ("trnid", "valid") if split_rule == "stratified" else ("trnid",)
    return part(train_keys, "train"), part(("tstid",), "test")


def read_food(root: Path) -> Splits:
    """Food-101 with its official meta/train.txt and meta/test.txt."""
    key = "food"
    folder = _find_dir(Path(root), ["food-101"], key, "food-101/ with images/<class>/<id>.jpg and meta/")
    classes = _read_lines(folder / "meta" / "classes.txt", key, "one class folder name per line")
    index = {c: i for i, c in enumerate(classes)}

    def part(split: str) -> LabelledImages:
        listing = folder / "meta" / f"{split}.txt"
        rows = sorted((ln, n) for n, ln in _numbered_lines(listing, key, "lines '<class>/<id>'"))
        sources = [contained(folder / "images", f"{r}.jpg", listing, key, n) for r, n in rows]
        labels = _lookup(index, (r.split("/", 1)[0] for r, _ in rows), listing, key)
        return _make(key, split, sources, labels, [_spaces(c) for c in classes], where=folder)

    return part("train"), part("test")


def _read_idx(path: Path, dataset: str, ndim: int) -> np.ndarray:
    """Parse an MNIST idx file (optionally .gz): magic (2 zero bytes, dtype code, ndim), big-endian dims.

    The header must announce `ndim` dimensions and the file must hold exactly the bytes they multiply
    to: a truncated download is then named as such instead of failing inside numpy.
    """
    if not path.exists() and path.with_name(path.name + ".gz").exists():
        path = path.with_name(path.name + ".gz")
    try:
        with (gzip.open if path.suffix == ".gz" else open)(_require(path, dataset, "an idx file (or .gz)"), "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # a truncated or damaged .gz
        raise DatasetLayoutError(path, f"a complete idx file ({type(exc).__name__}: {exc})", dataset) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DatasetLayoutError(path, f"an idx file of unsigned bytes with {ndim} dimensions "
                                       f"(magic 0x0000080{ndim})", dataset)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetLayoutError(path, f"a {header}-byte idx header, got {len(raw)} bytes (truncated file?)", dataset)
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != size:
        raise DatasetLayoutError(path, f"{size} bytes for the header's shape {shape}, got {len(raw)} bytes "
                                       f"({'truncated file?' if len(raw) < size else 'trailing data'})", dataset)
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_mnist(root: Path) -> Splits:
    """MNIST from torchvision's raw idx files; images stay in memory as 28x28 uint8 arrays."""
    key = "mnist"
    raw = _find_dir(Path(root), ["MNIST/raw"], key, "MNIST/raw/ with the four idx files")

    def part(prefix: str, split: str) -> LabelledImages:
        images = _read_idx(raw / f"{prefix}-images-idx3-ubyte", key, ndim=3)
        labels_file = raw / f"{prefix}-labels-idx1-ubyte"
        labels = _read_idx(labels_file, key, ndim=1)
        if len(images) != len(labels):
            raise DatasetLayoutError(labels_file, f"one label per image of {prefix}-images-idx3-ubyte "
                                                  f"({len(images)}), got {len(labels)}", key)
        return _make(key, split, images, labels, [str(d) for d in range(10)], where=raw, labels_from=labels_file)

    return part("train", "train"), part("t10k", "test")


def read_oxfordpet(root: Path) -> Splits:
    """Oxford-IIIT Pet (37 breeds); names from the image ids, title-cased like torchvision (and so ZSCL)."""
    key = "oxfordpet"
    folder = _find_dir(Path(root), ["oxford-iiit-pet"], key, "oxford-iiit-pet/ with images/ and annotations/")
    _require(folder / "images", key, "images/<Breed_name>_<n>.jpg")

    expected = "lines '<image id> <class id> <species> <breed id>'"

    def rows(split: str) -> list[tuple[str, int, Path]]:
        """Sorted (image id, 0-based label, image path) of one annotation file."""
        listing = folder / "annotations" / f"{split}.txt"
        out = []
        for n, ln in _numbered_lines(listing, key, expected):
            fields = ln.split()
            if len(fields) < 2 or not fields[1].isdigit():
                raise DatasetLayoutError(listing, f"{expected}; line {n} is {ln!r}", key)
            image = contained(folder / "images", f"{fields[0]}.jpg", listing, key, n)
            out.append((fields[0], int(fields[1]) - 1, image))
        return sorted(out)

    train_rows, test_rows = rows("trainval"), rows("test")
    prefixes: dict[int, str] = {}
    for image_id, label, _ in train_rows + test_rows:
        prefixes.setdefault(label, image_id.rsplit("_", 1)[0])
    classes = [" ".join(w.title() for w in prefixes.get(i, f"pet_{i + 1}").split("_"))
               for i in range(max(prefixes) + 1)]

    def part(split_rows: list[tuple[str, int, Path]], split: str, listing: str) -> LabelledImages:
        return _make(key, split, [path for _, _, path in split_rows], [label for _, label, _ in split_rows],
                     classes, where=folder, labels_from=folder / "annotations" / listing, label_base=1)

    return part(train_rows, "train", "trainval.txt"), part(test_rows, "test", "test.txt")


def read_stanfordcars(root: Path) -> Splits:
    """Stanford Cars (196 classes) in torchvision's layout; class names from devkit/cars_meta.mat."""
    key = "stanfordcars"
    folder = _find_dir(Path(root), ["stanford_cars"], key,
                       "stanford_cars/ with cars_train/, cars_test/, devkit/ and cars_test_annos_withlabels.mat")
    classes = [str(c).strip() for c in np.atleast_1d(
        _loadmat(folder / "devkit" / "cars_meta.mat", key, "'class_names'")["class_names"]).tolist()]

    def part(annos: Path, images: str, split: str) -> LabelledImages:
        _require(folder / images, key, f"{images}/<fname>.jpg")
        records = np.atleast_1d(_loadmat(annos, key, "'annotations' with 'fname' and 'class' (1-based)")["annotations"])
        rows = sorted((str(r["fname"]), int(r["class"]) - 1) for r in records)
        sources = [contained(folder / images, f, annos, key) for f, _ in rows]
        return _make(key, split, sources, [c for _, c in rows], classes, where=folder, labels_from=annos,
                     label_base=1)

    return (part(folder / "devkit" / "cars_train_annos.mat", "cars_train", "train"),
            part(folder / "cars_test_annos_withlabels.mat", "cars_test", "test"))


def read_sun397(root: Path, split_rule: str = "stratified") -> Splits:
    """SUN397 (397 scene classes listed in ClassName.txt); no official 80/20 split (see SPLIT_RULES)."""
    key = "sun397"
    folder = _find_dir(Path(root), ["SUN397"], key, "SUN397/ with ClassName.txt and <letter>/<class>/*.jpg")
    listing = folder / "ClassName.txt"
    numbered = _numbered_lines(listing, key, "lines '/a/abbey'")
    class_paths = [cls for _, cls in numbered]
    sources: list[Path] = []
    labels: list[int] = []
    for label, (n, cls) in enumerate(numbered):
        class_dir = contained(folder, cls.strip("/"), listing, key, n)
        files = _image_files(_require(class_dir, key, f"the images of class {cls}"), key)
        sources += files
        labels += [label] * len(files)
    # "/a/apartment_building/outdoor" -> "apartment building outdoor": drop the letter level.
    names = [_spaces(" ".join(c.strip("/").split("/")[1:])) for c in class_paths]
    return _split(_make(key, "all", sources, labels, names, where=folder), split_rule)


# --------------------------------------------------------------------------------------------------
# The protocol: readers, orders, building the task list
# --------------------------------------------------------------------------------------------------

MTCL_READERS: dict[str, Reader] = {
    "aircraft": read_aircraft,
    "caltech101": read_caltech101,
    "cifar100": read_cifar100,
    "dtd": read_dtd,
    "eurosat": read_eurosat,
    "flowers": read_flowers,
    "food": read_food,
    "mnist": read_mnist,
    "oxfordpet": read_oxfordpet,
    "stanfordcars": read_stanfordcars,
    "sun397": read_sun397,
}
# Readers whose output depends on `split_rule` (the others have a single official train/test split).
_RULE_DEPENDENT = frozenset({"aircraft", "caltech101", "dtd", "eurosat", "flowers", "sun397"})

MTCL_DISPLAY_NAMES: dict[str, str] = {
    "aircraft": "Aircraft", "caltech101": "Caltech101", "cifar100": "CIFAR100", "dtd": "DTD",
    "eurosat": "EuroSAT", "flowers": "Flowers", "food": "Food", "mnist": "MNIST", "oxfordpet": "OxfordPet",
    "stanfordcars": "StanfordCars", "sun397": "SUN397",
}

MTCL_ORDERS: dict[str, list[str]] = {
    # ZSCL Order I (alphabetical) and Order II.
    "order1": ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist",
               "oxfordpet", "stanfordcars", "sun397"],
    "order2": ["stanfordcars", "food", "mnist", "oxfordpet", "flowers", "sun397", "aircraft", "caltech101",
               "dtd", "eurosat", "cifar100"],
}


def resolve_mtcl_key(name: str) -> str:
    """Accept a key ("oxfordpet") or a display name ("OxfordPet"), case-insensitively."""
    lookup = {k: k for k in MTCL_READERS} | {v.lower(): k for k, v in MTCL_DISPLAY_NAMES.items()}
    try:
        return lookup[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown MTCL dataset {name!r}; choose from {sorted(MTCL_READERS)}") from None


def read_mtcl(key: str, root: Path, split_rule: str = "stratified") -> Splits:
    """Read one dataset by key, passing `split_rule` to the readers it applies to."""
    _check_rule(split_rule)
    key = resolve_mtcl_key(key)
    reader = MTCL_READERS[key]
    return reader(Path(root), split_rule=split_rule) if key in _RULE_DEPENDENT else reader(Path(root))


def build_mtcl_datasets(root: Path | str, order: str = "order1", shots: int | None = None, seed: int = 0,
                        datasets: Sequence[str] | None = None, split_rule: str = "stratified",
                        max_test_per_class: int | None = None) -> list[tuple[str, LabelledImages, LabelledImages]]:
    """The MTCL task sequence as [(display name, train, test), ...].

    `datasets` replaces the order's list (keys or display names, in the given order); `shots` keeps that
    many training images per class (the 5-shot setting), drawn with `seed`; `max_test_per_class` caps each
    test set per class (seed 0, independent of `seed` so every run is evaluated on the same images).
    """
    if datasets is None:
        if order not in MTCL_ORDERS:
            raise ValueError(f"unknown MTCL order {order!r}; choose from {sorted(MTCL_ORDERS)}")
        keys = MTCL_ORDERS[order]
    else:
        keys = [resolve_mtcl_key(d) for d in datasets]
    tasks = []
    for key in keys:
        train, test = read_mtcl(key, Path(root), split_rule)
        if shots is not None:
            train = few_shot(train, shots, seed)
        if max_test_per_class is not None:
            test = few_shot(test, max_test_per_class, 0)
        tasks.append((MTCL_DISPLAY_NAMES[key], train, test))
    return tasks


# --------------------------------------------------------------------------------------------------
# Class names CLIP prompts use (CLIP's / ZSCL's lists) where the folder names are not readable
# --------------------------------------------------------------------------------------------------

CALTECH101_NAMES: dict[str, str] = {
    "Faces": "off-center face", "Faces_easy": "centered face", "Leopards": "leopard", "Motorbikes": "motorbike",
    "airplanes": "airplane", "car_side": "side of a car", "cougar_body": "body of a cougar cat",
    "cougar_face": "face of a cougar cat", "crocodile_head": "head of a crocodile",
    "flamingo_head": "head of a flamingo", "snoopy": "snoopy (cartoon beagle)", "yin_yang": "yin and yang symbol",
}

EUROSAT_NAMES: dict[str, str] = {
    "AnnualCrop": "annual crop land", "Forest": "forest", "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road", "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments", "River": "river", "SeaLake": "lake or sea",
}

# Oxford 102 flowers, index = label - 1 (CLIP's list, also used by ZSCL / MoE-Adapters).
FLOWERS_NAMES: list[str] = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot",
    "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily",
    "balloon flower", "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke",
    "sweet william", "carnation", "garden phlox", "love in the mist", "mexican aster", "alpine sea holly",
    "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip", "lenten rose", "barbeton daisy",
    "daffodil", "sword lily", "poinsettia", "bolero deep blue", "wallflower", "marigold", "buttercup",
    "oxeye daisy", "common dandelion", "petunia", "wild pansy", "primula", "sunflower", "pelargonium",
    "bishop of llandaff", "gaura", "geranium", "orange dahlia", "pink-yellow dahlia", "cautleya spicata",
    "japanese anemone", "black-eyed susan", "silverbush", "californian poppy", "osteospermum",
    "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen", "watercress",
    "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea", "camellia", "mallow",
    "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
]
