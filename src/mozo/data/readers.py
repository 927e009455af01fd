"""Readers of the class-incremental datasets: CIFAR-100, TinyImageNet, ImageNet-R, and any ImageFolder tree.

Each reader takes the folder `--data-root` points to and returns `(train, test)` as `LabelledImages`
(paths, or in-memory arrays for CIFAR-100) with labels in the dataset's own class order; class orders
for the protocols are applied later by `scenario.class_incremental`. Readers only list files, they do
not decode images: a corrupt file is found when it is loaded (`CorruptImageError`), so one bad image
does not stop a run that skips corrupt images.

Every layout problem raises `DatasetLayoutError` naming the exact path that is missing or malformed and
what was expected there. The layouts are drawn in docs/datasets.md.
"""
from __future__ import annotations

import builtins
import codecs
import math
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mozo.seeds import mix_seed

from .base import DatasetLayoutError, LabelledImages, contained, read_text, utf8_name

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_WNID = re.compile(r"^n\d{8}$")

Split = tuple[LabelledImages, LabelledImages]


# ----------------------------------------------------------------------------------------------- helpers
def is_image_file(path: Path) -> bool:
    """True for a non-hidden file whose extension (any case) is a known image extension."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path, dataset: str) -> list[Path]:
    """Image files directly inside `folder`, sorted by name so every machine lists them in the same order;
    a name that is not UTF-8 is an error (see `utf8_name`)."""
    files = [p for p in folder.iterdir() if is_image_file(p)]
    for p in files:
        utf8_name(p, dataset)
    return sorted(files, key=lambda p: p.name)


def list_subdirs(folder: Path) -> list[Path]:
    """Non-hidden sub-folders of `folder`, sorted by name."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _require_dir(path: Path, expected: str, dataset: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(path, expected, dataset)
    return path


def _require_file(path: Path, expected: str, dataset: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(path, expected, dataset)
    return path


def _locate(root: Path | str, subdir: str, marker: str, expected: str, dataset: str) -> Path:
    """The dataset folder: `root/subdir`, or `root` itself when it already contains `marker`.

    Accepting both means `--data-root` may point at the parent folder (the usual case, several datasets
    side by side) or directly at the extracted dataset folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(root, f"an existing folder containing {subdir}/ ({expected})", dataset)
    if (root / subdir).is_dir():
        return root / subdir
    if (root / marker).exists():
        return root
    raise DatasetLayoutError(root / subdir, f"a folder {subdir}/ with {expected}", dataset)


def _folder_classname(folder_name: str) -> str:
    return folder_name.replace("_", " ")


# --------------------------------------------------------------------------------------------- CIFAR-100
CIFAR100 = "CIFAR-100"


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes with protocols 0-2, limited to that one use."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused to load _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, encoding)


def _cifar_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle needs: numpy's array/dtype reconstruction and builtin containers.

    The numpy helpers are taken from numpy's own reduce output, so whichever numpy is installed, and
    both module spellings (numpy.core in pickles from numpy 1 and Python 2, numpy._core from numpy 2)
    resolve to them without importing anything.
    """
    reconstruct = np.empty(0).__reduce__()[0]
    frombuffer = np.empty(1).__reduce_ex__(5)[0]  # protocol 5 pickles arrays with _frombuffer
    scalar = np.int64(0).__reduce__()[0]  # numpy scalars, e.g. labels stored as np.int64
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    for module in ("builtins", "__builtin__"):
        for name in ("list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray"):
            allowed[(module, name)] = getattr(builtins, name)
    return allowed


_CIFAR_GLOBALS = _cifar_globals()


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside `_CIFAR_GLOBALS`."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python format and nothing else.

    `find_class` is the only way a pickle reaches code (a `__reduce__` payload names `os.system` or
    `builtins.exec` there), so refusing every global outside the short list means nothing in the file
    is imported or run; the data itself (bytes, str, numbers, lists, dicts) uses native opcodes.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"refused to load {module}.{name}: CIFAR pickles hold only arrays, lists "
                                 f"and strings") from None


def _load_cifar_pickle(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Load one CIFAR python pickle (written by Python 2: latin1 decoding, keys may be bytes), with the
    restricted `_CifarUnpickler`: a pickle can run code, these files need not."""
    _require_file(path, "the CIFAR-100 python pickle of this name (from cifar-100-python.tar.gz)", CIFAR100)
    try:
        with open(path, "rb") as f:
            raw = _CifarUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as exc:
        raise DatasetLayoutError(path, f"a plain CIFAR-100 python pickle; {exc} (nothing from the file "
                                       f"was run)", CIFAR100) from None
    except Exception as exc:
        raise DatasetLayoutError(path, f"a readable CIFAR-100 python pickle ({type(exc).__name__}: {exc})",
                                 CIFAR100) from exc
    if not isinstance(raw, dict):
        raise DatasetLayoutError(path, "a pickled dict (CIFAR-100 python version)", CIFAR100)
    data = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    missing = [k for k in keys if k not in data]
    if missing:
        raise DatasetLayoutError(path, f"a CIFAR-100 pickle with keys {list(keys)} (missing {missing})", CIFAR100)
    return data


def _cifar_split(path: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _load_cifar_pickle(path, ("data", "fine_labels"))
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d["fine_labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetLayoutError(path, f"'data' of shape [N, 3072] and N fine_labels, got data {data.shape} "
                                       f"and {len(labels)} labels", CIFAR100)
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetLayoutError(path, f"fine_labels in 0..{n_classes - 1}", CIFAR100)
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # N x H x W x 3
    return images, labels


def read_cifar100(root: Path | str) -> Split:
    """CIFAR-100 from the python pickles `root/cifar-100-python/{train,test,meta}` (or `root` = that folder).

    Images stay in memory as 32x32x3 uint8 arrays (150 MB for both splits). Labels are the fine labels
    0..99 in the dataset's own order; class names are meta's `fine_label_names` with '_' -> ' '
    ("aquarium_fish" -> "aquarium fish") because CLIP reads them inside a prompt.
    """
    base = _locate(root, "cifar-100-python", "meta", "the pickles train, test and meta", CIFAR100)
    meta = _load_cifar_pickle(base / "meta", ("fine_label_names",))
    classnames = [(n.decode() if isinstance(n, bytes) else str(n)).replace("_", " ") for n in meta["fine_label_names"]]
    splits = []
    for split in ("train", "test"):
        images, labels = _cifar_split(base / split, len(classnames))
        meta = {"root": str(base), "split": split}
        splits.append(LabelledImages(images, labels, classnames, name="cifar100", meta=meta))
    return splits[0], splits[1]


# ------------------------------------------------------------------------------------------ TinyImageNet
TINYIMAGENET = "TinyImageNet"


def _read_words(path: Path, wnids: list[str]) -> dict[str, str]:
    """wnid -> first comma-separated name in words.txt ("n01443537\tgoldfish, Carassius auratus")."""
    _require_file(path, "words.txt: one line per wnid, '<wnid>\\t<name>, <synonym>, ...'", TINYIMAGENET)
    names: dict[str, str] = {}
    wanted = set(wnids)
    for line in read_text(path, TINYIMAGENET, "'<wnid>\\t<name>, <synonym>, ...' lines").splitlines():
        parts = line.split("\t", 1)
        if len(parts) == 2 and parts[0] in wanted:
            names[parts[0]] = parts[1].split(",")[0].strip()
    missing = [w for w in wnids if w not in names]
    if missing:
        raise DatasetLayoutError(path, f"a name for every wnid of wnids.txt (missing {missing[:5]}"
                                       f"{'...' if len(missing) > 5 else ''})", TINYIMAGENET)
    return names


def read_tinyimagenet(root: Path | str) -> Split:
    """TinyImageNet-200 from `root/tiny-imagenet-200/` (or `root` = that folder).

    Train: `train/<wnid>/images/*.JPEG`. Test: the labelled validation split, `val/images/*` with labels in
    `val/val_annotations.txt` (the official test split has no labels). Label = position of the wnid in
    sorted(wnids.txt), the indexing the shared class orders use; class name = first comma-separated entry
    of words.txt for the wnid.
    """
    base = _locate(root, "tiny-imagenet-200", "wnids.txt", "wnids.txt, words.txt, train/ and val/", TINYIMAGENET)
    wnids_file = _require_file(base / "wnids.txt", "wnids.txt: one wnid per line", TINYIMAGENET)
    wnids_text = read_text(wnids_file, TINYIMAGENET, "one wnid per line")
    wnids = sorted({line.strip() for line in wnids_text.splitlines() if line.strip()})
    if not wnids:
        raise DatasetLayoutError(wnids_file, "at least one wnid (one per line)", TINYIMAGENET)
    words = _read_words(base / "words.txt", wnids)
    classnames = [words[w] for w in wnids]
    index = {w: i for i, w in enumerate(wnids)}

    train_dir = _require_dir(base / "train", "a folder train/<wnid>/images/ per wnid", TINYIMAGENET)
    train_sources: list[Path] = []
    train_labels: list[int] = []
    for wnid in wnids:
        folder = _require_dir(train_dir / wnid / "images", f"the training images of class {wnid} (*.JPEG)",
                              TINYIMAGENET)
        files = list_images(folder, TINYIMAGENET)
        if not files:
            raise DatasetLayoutError(folder, f"at least one image file ({', '.join(sorted(IMAGE_EXTENSIONS))})",
                                     TINYIMAGENET)
        train_sources += files
        train_labels += [index[wnid]] * len(files)

    val_dir = _require_dir(base / "val", "val/images/ and val/val_annotations.txt", TINYIMAGENET)
    val_images = _require_dir(val_dir / "images", "the validation images (*.JPEG)", TINYIMAGENET)
    ann = _require_file(val_dir / "val_annotations.txt",
                        "one line per validation image: '<file>\\t<wnid>\\t<x>\\t<y>\\t<w>\\t<h>'", TINYIMAGENET)
    entries: list[tuple[str, int, Path]] = []
    ann_text = read_text(ann, TINYIMAGENET, "'<file>\\t<wnid>\\t<x>\\t<y>\\t<w>\\t<h>' lines")
    for lineno, line in enumerate(ann_text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2 or parts[1].strip() not in index:
            raise DatasetLayoutError(ann, f"'<file>\\t<wnid>...' with a wnid from wnids.txt; line {lineno} "
                                          f"is {line.strip()!r}", TINYIMAGENET)
        name = parts[0].strip()
        entries.append((name, index[parts[1].strip()], contained(val_images, name, ann, TINYIMAGENET, lineno)))
    entries.sort(key=lambda e: e[:2])
    test_sources = [path for _, _, path in entries]
    test_labels = [label for _, label, _ in entries]
    meta = {"root": str(base), "wnids": wnids}
    return (LabelledImages(train_sources, train_labels, classnames, "tinyimagenet", {**meta, "split": "train"}),
            LabelledImages(test_sources, test_labels, classnames, "tinyimagenet", {**meta, "split": "test"}))


# -------------------------------------------------------------------------------------------- ImageNet-R
IMAGENET_R = "ImageNet-R"

# Readable names of the 200 ImageNet-R classes (sorted wnids), the names CLIP evaluations of ImageNet-R use.
IMAGENET_R_CLASSNAMES: dict[str, str] = {
    "n01443537": "goldfish", "n01484850": "great white shark", "n01494475": "hammerhead",
    "n01498041": "stingray", "n01514859": "hen", "n01518878": "ostrich",
    "n01531178": "goldfinch", "n01534433": "junco", "n01614925": "bald eagle",
    "n01616318": "vulture", "n01630670": "newt", "n01632777": "axolotl",
    "n01644373": "tree frog", "n01677366": "iguana", "n01694178": "African chameleon",
    "n01748264": "cobra", "n01770393": "scorpion", "n01774750": "tarantula",
    "n01784675": "centipede", "n01806143": "peacock", "n01820546": "lorikeet",
    "n01833805": "hummingbird", "n01843383": "toucan", "n01847000": "duck",
    "n01855672": "goose", "n01860187": "black swan", "n01882714": "koala",
    "n01910747": "jellyfish", "n01944390": "snail", "n01983481": "lobster",
    "n01986214": "hermit crab", "n02007558": "flamingo", "n02009912": "american egret",
    "n02051845": "pelican", "n02056570": "king penguin", "n02066245": "grey whale",
    "n02071294": "killer whale", "n02077923": "sea lion", "n02085620": "chihuahua",
    "n02086240": "shih tzu", "n02088094": "afghan hound", "n02088238": "basset hound",
    "n02088364": "beagle", "n02088466": "bloodhound", "n02091032": "italian greyhound",
    "n02091134": "whippet", "n02092339": "weimaraner", "n02094433": "yorkshire terrier",
    "n02096585": "boston terrier", "n02097298": "scottish terrier", "n02098286": "west highland white terrier",
    "n02099601": "golden retriever", "n02099712": "labrador retriever", "n02102318": "cocker spaniels",
    "n02106030": "collie", "n02106166": "border collie", "n02106550": "rottweiler",
    "n02106662": "german shepherd dog", "n02108089": "boxer", "n02108915": "french bulldog",
    "n02109525": "saint bernard", "n02110185": "husky", "n02110341": "dalmatian",
    "n02110958": "pug", "n02112018": "pomeranian", "n02112137": "chow chow",
    "n02113023": "pembroke welsh corgi", "n02113624": "toy poodle", "n02113799": "standard poodle",
    "n02114367": "timber wolf", "n02117135": "hyena", "n02119022": "red fox",
    "n02123045": "tabby cat", "n02128385": "leopard", "n02128757": "snow leopard",
    "n02129165": "lion", "n02129604": "tiger", "n02130308": "cheetah",
    "n02134084": "polar bear", "n02138441": "meerkat", "n02165456": "ladybug",
    "n02190166": "fly", "n02206856": "bee", "n02219486": "ant",
    "n02226429": "grasshopper", "n02233338": "cockroach", "n02236044": "mantis",
    "n02268443": "dragonfly", "n02279972": "monarch butterfly", "n02317335": "starfish",
    "n02325366": "wood rabbit", "n02346627": "porcupine", "n02356798": "fox squirrel",
    "n02363005": "beaver", "n02364673": "guinea pig", "n02391049": "zebra",
    "n02395406": "pig", "n02398521": "hippopotamus", "n02410509": "bison",
    "n02423022": "gazelle", "n02437616": "llama", "n02445715": "skunk",
    "n02447366": "badger", "n02480495": "orangutan", "n02480855": "gorilla",
    "n02481823": "chimpanzee", "n02483362": "gibbon", "n02486410": "baboon",
    "n02510455": "panda", "n02526121": "eel", "n02607072": "clown fish",
    "n02655020": "puffer fish", "n02672831": "accordion", "n02701002": "ambulance",
    "n02749479": "assault rifle", "n02769748": "backpack", "n02793495": "barn",
    "n02797295": "wheelbarrow", "n02802426": "basketball", "n02808440": "bathtub",
    "n02814860": "lighthouse", "n02823750": "beer glass", "n02841315": "binoculars",
    "n02843684": "birdhouse", "n02883205": "bow tie", "n02906734": "broom",
    "n02909870": "bucket", "n02939185": "cauldron", "n02948072": "candle",
    "n02950826": "cannon", "n02951358": "canoe", "n02966193": "carousel",
    "n02980441": "castle", "n02992529": "mobile phone", "n03124170": "cowboy hat",
    "n03272010": "electric guitar", "n03345487": "fire engine", "n03372029": "flute",
    "n03424325": "gasmask", "n03452741": "grand piano", "n03467068": "guillotine",
    "n03481172": "hammer", "n03494278": "harmonica", "n03495258": "harp",
    "n03498962": "hatchet", "n03594945": "jeep", "n03602883": "joystick",
    "n03630383": "lab coat", "n03649909": "lawn mower", "n03676483": "lipstick",
    "n03710193": "mailbox", "n03773504": "missile", "n03775071": "mitten",
    "n03888257": "parachute", "n03930630": "pickup truck", "n03947888": "pirate ship",
    "n04086273": "revolver", "n04118538": "rugby ball", "n04133789": "sandal",
    "n04141076": "saxophone", "n04146614": "school bus", "n04147183": "schooner",
    "n04192698": "shield", "n04254680": "soccer ball", "n04266014": "space shuttle",
    "n04275548": "spider web", "n04310018": "steam locomotive", "n04325704": "scarf",
    "n04347754": "submarine", "n04389033": "tank", "n04409515": "tennis ball",
    "n04465501": "tractor", "n04487394": "trombone", "n04522168": "vase",
    "n04536866": "violin", "n04552348": "military aircraft", "n04591713": "wine bottle",
    "n07614500": "ice cream", "n07693725": "bagel", "n07695742": "pretzel",
    "n07697313": "cheeseburger", "n07697537": "hotdog", "n07714571": "cabbage",
    "n07714990": "broccoli", "n07718472": "cucumber", "n07720875": "bell pepper",
    "n07734744": "mushroom", "n07742313": "Granny Smith", "n07745940": "strawberry",
    "n07749582": "lemon", "n07753275": "pineapple", "n07753592": "banana",
    "n07768694": "pomegranate", "n07873807": "pizza", "n07880968": "burrito",
    "n07920052": "espresso", "n09472597": "volcano", "n09835506": "baseball player",
    "n10565667": "scuba diver", "n12267677": "acorn",
}


def split_test_count(n: int, test_fraction: float) -> int:
    """Test images of a class with n images: round(n * fraction) (halves up), at least 1 and at most n-1 when n >= 2."""
    if n < 2:
        return 0
    return min(n - 1, max(1, math.floor(n * test_fraction + 0.5)))


def stratified_split(files: list[Path], seed: int, salt: str, test_fraction: float) -> tuple[list[Path], list[Path]]:
    """Split one class's files into (train, test), reproducibly on any machine.

    Files are ranked by mix_seed(seed, salt, file name) (mozo/seeds.py); the first `split_test_count(n, fraction)` form
    the test set. Hash ranking, unlike a seeded shuffle, does not depend on a library's RNG stream and
    does not change when unrelated files are added. Both lists come back sorted by name.
    """
    ranked = sorted(files, key=lambda p: (mix_seed(seed, salt, p.name), p.name))
    n_test = split_test_count(len(files), test_fraction)
    test = sorted(ranked[:n_test], key=lambda p: p.name)
    train = sorted(ranked[n_test:], key=lambda p: p.name)
    return train, test


def _read_classnames_file(path: Path) -> dict[str, str]:
    """Optional `classnames.txt`: one '<wnid> <readable name>' per line (name may contain spaces)."""
    names: dict[str, str] = {}
    for lineno, line in enumerate(read_text(path, IMAGENET_R, "'<wnid> <class name>' lines").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(None, 1)
        if len(parts) != 2:
            raise DatasetLayoutError(path, f"'<wnid> <class name>' per line; line {lineno} is {line!r}", IMAGENET_R)
        names[parts[0]] = parts[1].strip()
    return names


def read_imagenet_r(root: Path | str, seed: int = 0, test_fraction: float = 0.2) -> Split:
    """ImageNet-R from `root/imagenet-r/<wnid>/*` (or `root` = that folder), split per class into train/test.

    ImageNet-R ships no train/test split. Each class is split separately (stratified): the
    `round(test_fraction * n)` files with the smallest mix_seed(seed, wnid, file name) are test, the
    rest train (see `stratified_split`); the split depends only on seed, fraction and file names.
    Labels = position of the wnid among the sorted wnid folders. Class names: `imagenet-r/classnames.txt`
    ('<wnid> <name>' lines) if present, else the built-in names of the 200 classes, else the folder name.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root_path = Path(root).expanduser()
    base = root_path / "imagenet-r"
    if not base.is_dir():
        if root_path.is_dir() and any(_WNID.match(p.name) for p in list_subdirs(root_path)):
            base = root_path
        elif not root_path.is_dir():
            raise DatasetLayoutError(root_path, "an existing folder containing imagenet-r/<wnid>/", IMAGENET_R)
        else:
            raise DatasetLayoutError(base, "a folder imagenet-r/ with one sub-folder of images per wnid "
                                           "(n01443537/, ...)", IMAGENET_R)
    class_dirs = list_subdirs(base)
    if not class_dirs:
        raise DatasetLayoutError(base, "one sub-folder of images per class (wnid)", IMAGENET_R)
    names_file = base / "classnames.txt"
    custom = _read_classnames_file(names_file) if names_file.is_file() else {}

    classnames: list[str] = []
    train_src: list[Path] = []
    train_lab: list[int] = []
    test_src: list[Path] = []
    test_lab: list[int] = []
    for label, folder in enumerate(class_dirs):
        wnid = utf8_name(folder, IMAGENET_R)
        classnames.append(custom.get(wnid) or IMAGENET_R_CLASSNAMES.get(wnid) or _folder_classname(wnid))
        files = list_images(folder, IMAGENET_R)
        if not files:
            raise DatasetLayoutError(folder, f"at least one image file ({', '.join(sorted(IMAGE_EXTENSIONS))})",
                                     IMAGENET_R)
        train, test = stratified_split(files, seed, wnid, test_fraction)
        train_src += train
        train_lab += [label] * len(train)
        test_src += test
        test_lab += [label] * len(test)
    meta = {"root": str(base), "wnids": [p.name for p in class_dirs], "split_seed": seed,
            "test_fraction": test_fraction}
    return (LabelledImages(train_src, train_lab, classnames, "imagenet-r", {**meta, "split": "train"}),
            LabelledImages(test_src, test_lab, classnames, "imagenet-r", {**meta, "split": "test"}))


# ------------------------------------------------------------------------------------------- ImageFolder
IMAGEFOLDER = "ImageFolder"


def _read_class_tree(folder: Path, index: dict[str, int]) -> tuple[list[Path], list[int]]:
    sources: list[Path] = []
    labels: list[int] = []
    for class_dir in list_subdirs(folder):
        if utf8_name(class_dir, IMAGEFOLDER) not in index:
            raise DatasetLayoutError(class_dir, f"a class folder that also exists under train/ "
                                                f"(train classes: {sorted(index)[:10]}...)", IMAGEFOLDER)
        files = list_images(class_dir, IMAGEFOLDER)
        sources += files
        labels += [index[class_dir.name]] * len(files)
    return sources, labels


def read_imagefolder(root: Path | str) -> Split:
    """Any dataset laid out as `root/train/<class>/*` and `root/test/<class>/*` (`val/` accepted for `test/`).

    Classes are the sorted folder names under train/; labels index that list; class names are the folder
    names with '_' -> ' '. A test class folder that does not exist under train/ is an error (its label
    would be undefined); a train class without test images is allowed.
    """
    root_path = Path(root).expanduser()
    _require_dir(root_path, "an existing folder with train/<class>/ and test/<class>/ (or val/<class>/)", IMAGEFOLDER)
    train_dir = _require_dir(root_path / "train", "a folder train/ with one sub-folder of images per class",
                             IMAGEFOLDER)
    test_dir = root_path / "test" if (root_path / "test").is_dir() else root_path / "val"
    if not test_dir.is_dir():
        raise DatasetLayoutError(root_path / "test", "a folder test/ (or val/) with one sub-folder of images per class",
                                 IMAGEFOLDER)
    class_dirs = list_subdirs(train_dir)
    if not class_dirs:
        raise DatasetLayoutError(train_dir, "one sub-folder of images per class", IMAGEFOLDER)
    for class_dir in class_dirs:
        utf8_name(class_dir, IMAGEFOLDER)
        if not list_images(class_dir, IMAGEFOLDER):
            raise DatasetLayoutError(class_dir, f"at least one image file ({', '.join(sorted(IMAGE_EXTENSIONS))})",
                                     IMAGEFOLDER)
    index = {p.name: i for i, p in enumerate(class_dirs)}
    classnames = [_folder_classname(p.name) for p in class_dirs]
    train_src, train_lab = _read_class_tree(train_dir, index)
    test_src, test_lab = _read_class_tree(test_dir, index)
    name = root_path.resolve().name
    meta = {"root": str(root_path), "folders": [p.name for p in class_dirs]}
    return (LabelledImages(train_src, train_lab, classnames, name, {**meta, "split": "train"}),
            LabelledImages(test_src, test_lab, classnames, name, {**meta, "split": "test", "folder": test_dir.name}))


# ------------------------------------------------------------------------------------------------ lookup
READERS: dict[str, Callable[..., Split]] = {
    "cifar100": read_cifar100,
    "tinyimagenet": read_tinyimagenet,
    "imagenet-r": read_imagenet_r,
    "imagefolder": read_imagefolder,
}


def read_dataset(name: str, root: Path | str, **kwargs: Any) -> Split:
    """`READERS[name](root, **kwargs)` with an error that lists the known names."""
    if name not in READERS:
        raise KeyError(f"unknown class-incremental dataset {name!r}; known: {sorted(READERS)}")
    return READERS[name](root, **kwargs)
