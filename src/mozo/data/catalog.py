"""Where every dataset mozo reads comes from: URLs, licence, expected layout, size and checksums.

This is data, one `DatasetEntry` per dataset, read by `mozo data list/check/fetch` (mozo.data.data_cli).
The layout rules themselves live only in the readers (readers.py, mtcl.py); `expected` here is a short
description for humans, and `mozo data check` calls the real reader to decide.

Checksums: a value is written only where it is published (the dataset page or torchvision's pinned
value, which the authors' files have matched for years). Where none is published it is None and
`mozo data list` says "not recorded": an invented checksum would refuse a good download or, worse,
look like a guarantee. Only md5 is published for most of these archives; it is used to detect
corrupt or truncated downloads, not as a security measure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DOWNLOADS = ".mozo-downloads"  # folder under --data-root where fetched archives are kept


@dataclass(frozen=True)
class Archive:
    """One file to download. `into` is the folder (relative to --data-root) it is extracted into;
    `extract=False` copies it there as is (MNIST's .gz idx files, which the reader reads directly);
    `nested` names archives found inside it (relative to `into`) to extract in place and then delete."""

    url: str
    into: str = ""
    sha256: str | None = None
    md5: str | None = None
    extract: bool = True
    nested: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset: `reader` is ("cil", key of readers.READERS) or ("mtcl", key of mtcl.MTCL_READERS).
    `manual` is set for datasets without a working direct URL: the steps to follow instead."""

    key: str
    name: str
    presets: tuple[str, ...]
    reader: tuple[str, str]
    licence: str
    expected: tuple[str, ...]
    size: str
    archives: tuple[Archive, ...] = ()
    manual: str | None = None
    homepage: str = ""
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())


PRESETS = {"cil": "class-incremental protocols (CIFAR-100, TinyImageNet, ImageNet-R)",
           "mtcl": "multi-domain task-incremental protocol, 11 datasets (mtcl-order1, mtcl-order2, 5-shot)"}

_VGG = "https://www.robots.ox.ac.uk/~vgg/data"
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist"

CATALOG: dict[str, DatasetEntry] = {e.key: e for e in [
    DatasetEntry(
        "cifar100", "CIFAR-100", ("cil", "mtcl"), ("cil", "cifar100"),
        "no licence stated; free for research (Krizhevsky, 2009, please cite)",
        ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"), "161 MB",
        (Archive("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 md5="eb9058c3a382ffc7106e4002c42a8d85"),),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html", aliases=("cifar-100", "CIFAR100")),
    DatasetEntry(
        "tinyimagenet", "TinyImageNet", ("cil",), ("cil", "tinyimagenet"),
        "ImageNet terms of access: non-commercial research and education only",
        ("tiny-imagenet-200/wnids.txt", "tiny-imagenet-200/words.txt", "tiny-imagenet-200/train/<wnid>/images/",
         "tiny-imagenet-200/val/images/", "tiny-imagenet-200/val/val_annotations.txt"), "237 MB",
        (Archive("http://cs231n.stanford.edu/tiny-imagenet-200.zip"),),
        homepage="https://www.kaggle.com/c/tiny-imagenet", aliases=("tiny-imagenet", "tiny-imagenet-200")),
    DatasetEntry(
        "imagenet-r", "ImageNet-R", ("cil",), ("cil", "imagenet-r"),
        "MIT licence (code); images collected from the web, research use (Hendrycks et al., 2021)",
        ("imagenet-r/<wnid>/*.jpg (200 folders)",), "2.1 GB",
        (Archive("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"),),
        homepage="https://github.com/hendrycks/imagenet-r", aliases=("imagenetr",)),
    DatasetEntry(
        "aircraft", "Aircraft", ("mtcl",), ("mtcl", "aircraft"),
        "non-commercial research only (FGVC-Aircraft terms)",
        ("fgvc-aircraft-2013b/data/images/", "fgvc-aircraft-2013b/data/variants.txt",
         "fgvc-aircraft-2013b/data/images_variant_{train,trainval,test}.txt"), "2.8 GB",
        (Archive(f"{_VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"),),
        homepage=f"{_VGG}/fgvc-aircraft/", aliases=("fgvc-aircraft",)),
    DatasetEntry(
        "caltech101", "Caltech101", ("mtcl",), ("mtcl", "caltech101"),
        "CC BY 4.0 (CaltechDATA)",
        ("caltech-101/101_ObjectCategories/<class>/*.jpg",), "132 MB",
        manual=("The archive moved to CaltechDATA (https://data.caltech.edu/records/mzrjq-6wc02), which has no "
                "stable direct link. Download caltech-101.zip there, then:\n"
                "  cd DATA_ROOT && unzip caltech-101.zip && tar -xzf caltech-101/101_ObjectCategories.tar.gz "
                "-C caltech-101\n"
                "  (torchvision's copy, Google Drive id 137RyRjvTBkBiIfeYBNZBtViDHQ6_Ewsp, has md5 "
                "b224c7392d521a49829488ab0f1120d9 for 101_ObjectCategories.tar.gz; extract it into "
                "DATA_ROOT/caltech-101/)"),
        homepage="https://data.caltech.edu/records/mzrjq-6wc02"),
    DatasetEntry(
        "dtd", "DTD", ("mtcl",), ("mtcl", "dtd"),
        "research use (Describable Textures Dataset terms)",
        ("dtd/images/<class>/*.jpg", "dtd/labels/{train,val,test}1.txt"), "625 MB",
        (Archive(f"{_VGG}/dtd/download/dtd-r1.0.1.tar.gz", md5="fff73e5086ae6bdbea199a49dfb8a4c1"),),
        homepage=f"{_VGG}/dtd/"),
    DatasetEntry(
        "eurosat", "EuroSAT", ("mtcl",), ("mtcl", "eurosat"),
        "MIT licence",
        ("eurosat/2750/<class>/*.jpg",), "94 MB",
        (Archive("https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                 "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip", into="eurosat",
                 md5="c8fa014336c82ac7804f0398fcb19387"),),
        homepage="https://github.com/phelber/EuroSAT"),
    DatasetEntry(
        "flowers", "Flowers", ("mtcl",), ("mtcl", "flowers"),
        "no licence stated; research use (Nilsback & Zisserman, 2008)",
        ("flowers-102/jpg/image_XXXXX.jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"), "330 MB",
        (Archive(f"{_VGG}/flowers/102/102flowers.tgz", into="flowers-102", md5="52808999861908f626f3c1f4e79d11fa"),
         Archive(f"{_VGG}/flowers/102/imagelabels.mat", into="flowers-102", extract=False,
                 md5="e0620be6f572b9609742df49c70aed4d"),
         Archive(f"{_VGG}/flowers/102/setid.mat", into="flowers-102", extract=False,
                 md5="a5357ecc9cb78c4bef273ce3793fc85c")),
        homepage=f"{_VGG}/flowers/102/", aliases=("flowers102", "flowers-102")),
    DatasetEntry(
        "food", "Food", ("mtcl",), ("mtcl", "food"),
        "research use; images from foodspotting.com, subject to their terms",
        ("food-101/images/<class>/<id>.jpg", "food-101/meta/{classes,train,test}.txt"), "5.0 GB",
        (Archive("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", md5="85eeb15f3717b99a5da872d97d918f87"),),
        homepage="https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/", aliases=("food101", "food-101")),
    DatasetEntry(
        "mnist", "MNIST", ("mtcl",), ("mtcl", "mnist"),
        "CC BY-SA 3.0",
        ("MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",), "12 MB",
        tuple(Archive(f"{_MNIST}/{name}", into="MNIST/raw", extract=False, md5=md5) for name, md5 in [
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")]),
        homepage="http://yann.lecun.com/exdb/mnist/"),
    DatasetEntry(
        "oxfordpet", "OxfordPet", ("mtcl",), ("mtcl", "oxfordpet"),
        "CC BY-SA 4.0",
        ("oxford-iiit-pet/images/*.jpg", "oxford-iiit-pet/annotations/{trainval,test}.txt"), "800 MB",
        (Archive(f"{_VGG}/pets/data/images.tar.gz", into="oxford-iiit-pet", md5="5c4f3ee8e5d25df40f4fd59a7f44e54c"),
         Archive(f"{_VGG}/pets/data/annotations.tar.gz", into="oxford-iiit-pet",
                 md5="95a8c909bbe2e81eed6a22bccdf3f68f")),
        homepage=f"{_VGG}/pets/", aliases=("oxford-iiit-pet", "pets")),
    DatasetEntry(
        "stanfordcars", "StanfordCars", ("mtcl",), ("mtcl", "stanfordcars"),
        "non-commercial research only (ImageNet-style terms)",
        ("stanford_cars/cars_train/", "stanford_cars/cars_test/", "stanford_cars/devkit/cars_meta.mat",
         "stanford_cars/devkit/cars_train_annos.mat", "stanford_cars/cars_test_annos_withlabels.mat"), "1.9 GB",
        manual=("The original site (ai.stanford.edu/~jkrause/cars) no longer serves the files. Get a copy of "
                "cars_train.tgz, cars_test.tgz, car_devkit.tgz and cars_test_annos_withlabels.mat (e.g. from a "
                "Kaggle mirror of Stanford Cars, or your institution's copy), then:\n"
                "  mkdir -p DATA_ROOT/stanford_cars && cd DATA_ROOT/stanford_cars && tar -xzf cars_train.tgz "
                "&& tar -xzf cars_test.tgz && tar -xzf car_devkit.tgz\n"
                "  and put cars_test_annos_withlabels.mat in DATA_ROOT/stanford_cars/"),
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html", aliases=("stanford-cars", "cars")),
    DatasetEntry(
        "sun397", "SUN397", ("mtcl",), ("mtcl", "sun397"),
        "research use (SUN database terms)",
        ("SUN397/ClassName.txt", "SUN397/<letter>/<class>/*.jpg"), "37 GB",
        manual=("The Princeton server (http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz, md5 "
                "8ca2778205c41d23104230ba66911c7a as pinned by torchvision) is slow and often unreachable, "
                "so mozo does not fetch it. Download it yourself (37 GB), then:\n"
                "  cd DATA_ROOT && tar -xzf SUN397.tar.gz   # gives DATA_ROOT/SUN397/ClassName.txt, a/abbey/, ..."),
        homepage="https://vision.princeton.edu/projects/2010/SUN/"),
]}


def checksum_text(archive: Archive) -> str:
    """How `mozo data list` shows an archive's checksum: the recorded value, or that none is recorded."""
    if archive.sha256:
        return f"sha256: {archive.sha256}"
    if archive.md5:
        return f"sha256: None (not recorded); md5: {archive.md5} (published, verified)"
    return "sha256: None (not recorded; the download is not verified)"


def resolve(names: list[str]) -> list[DatasetEntry]:
    """Catalog entries for dataset keys, display names, aliases or preset names (case-insensitive), in order
    and without repeats; an empty list means every dataset. Raises KeyError listing the known names."""
    lookup: dict[str, list[DatasetEntry]] = {p: [e for e in CATALOG.values() if p in e.presets] for p in PRESETS}
    for e in CATALOG.values():
        for n in (e.key, e.name, *e.aliases):
            lookup[n.lower()] = [e]
    out: list[DatasetEntry] = []
    for name in names or list(CATALOG):
        if name.lower() not in lookup:
            raise KeyError(f"unknown dataset or preset {name!r}; known datasets: {', '.join(CATALOG)}; "
                           f"presets: {', '.join(PRESETS)}")
        out += [e for e in lookup[name.lower()] if e not in out]
    return out
