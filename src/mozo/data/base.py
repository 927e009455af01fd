"""Shared pieces of every dataset reader: a labelled list of images, clear errors, image decoding.

Every reader returns a `LabelledImages`: a list of image sources (file paths or in-memory uint8 arrays)
with integer labels and the class names those labels index. Transforms are applied later by
`TransformedDataset`, so the same reader serves training and evaluation.

Readers treat the dataset files as data, never as instructions: text is decoded strictly (`read_text`),
paths read from list files must stay inside the dataset folder (`contained`), file and folder names
must be UTF-8 (`utf8_name`), and labels must index the class list (`LabelledImages`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

DATASETS_DOC = "docs/datasets.md"

ImageSource = Union[str, Path, np.ndarray]


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder is missing or does not have the expected layout."""

    def __init__(self, path: Path | str, expected: str, dataset: str):
        self.path = Path(path)
        super().__init__(
            f"{dataset}: {self.path} is missing or malformed; expected {expected}. "
            f"The expected layouts are described in {DATASETS_DOC} (section '{dataset}'). "
            f"Fix --data-root or place the dataset there."
        )


class CorruptImageError(RuntimeError):
    """An image file cannot be decoded."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        super().__init__(
            f"cannot read image {self.path}: {reason}. Replace or delete the file, "
            f"or run with data.skip_corrupt=true to skip unreadable images (they are counted in results.json)."
        )


class LabelRangeError(ValueError):
    """Labels that do not index the class list.

    Unchecked, an out-of-range test label silently scores 0 (no logit can match it) and a training label
    fails deep inside the loss or a label map; checked here, the error names the dataset and the label.
    """

    def __init__(self, dataset: str, label: int, index: int, count: int, n_classes: int):
        self.label, self.index, self.count, self.n_classes = label, index, count, n_classes
        self.detail = (f"label {label} of image {index} is outside 0..{n_classes - 1}, the {n_classes} class "
                       f"names ({count} label{'s' if count > 1 else ''} out of range in all)")
        super().__init__(f"{dataset or 'dataset'}: {self.detail}; the labels and the class list do not belong "
                         f"together")


@dataclass
class LabelledImages:
    """Images (paths or HxWxC uint8 arrays) with labels indexing `classnames`."""

    sources: Sequence[ImageSource]
    labels: np.ndarray
    classnames: list[str]
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.sources) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.sources)} images but {len(self.labels)} labels")
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= len(self.classnames)))
        if len(bad):
            raise LabelRangeError(self.name, int(self.labels[bad[0]]), int(bad[0]), len(bad), len(self.classnames))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> "LabelledImages":
        idx = np.asarray(indices, dtype=np.int64)
        sources = self.sources[idx] if isinstance(self.sources, np.ndarray) else [self.sources[i] for i in idx]
        return LabelledImages(sources, self.labels[idx], self.classnames, self.name, dict(self.meta))


# ------------------------------------------------------------------------------ reading dataset files
def read_text(path: Path, dataset: str, expected: str) -> str:
    """The UTF-8 text of a list / annotation file; undecodable bytes are an error naming the file and line.

    Decoding with errors="replace" would turn them into U+FFFD inside class names and paths (silently
    wrong prompts, files not found later); a raw UnicodeDecodeError names neither file nor line.
    """
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        bad = raw[exc.start:exc.end]
        raise DatasetLayoutError(path, f"{expected}, as UTF-8 text; line {line} has the bytes {bad!r} "
                                       f"(byte {exc.start}) that are not UTF-8", dataset) from None


def contained(base: Path, relative: str, listed_in: Path, dataset: str, line: Optional[int] = None) -> Path:
    """`base / relative` for a path read from a list file, refusing one that would leave `base`.

    A list file is data: an absolute path or a '..' in it must not make a run open (or, with a cache,
    copy) a file outside the dataset folder. The check is on the path as written, so datasets whose
    folders are symlinks elsewhere (common on clusters) still work.
    """
    rel = PurePath(relative)
    if not relative or "\0" in relative or rel.is_absolute() or relative.startswith(("/", "\\")) or ".." in rel.parts:
        where = f"line {line} names" if line is not None else "it names"
        raise DatasetLayoutError(listed_in, f"paths relative to {base} that stay inside it; {where} "
                                            f"{relative!r} (absolute paths and '..' are refused)", dataset)
    return base / relative


def utf8_name(path: Path, dataset: str) -> str:
    """`path.name`, refusing a name whose bytes are not UTF-8 (Linux hands them over as surrogates).

    Such a name cannot be hashed for the split, written to results.json or turned into a CLIP prompt,
    and would fail far from here; the error shows the bytes so the file can be renamed.
    """
    name = path.name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise DatasetLayoutError(path.parent, f"file and folder names in UTF-8; {os.fsencode(name)!r} is not "
                                              f"(rename it, e.g. with convmv -f latin1 -t utf8)", dataset) from None
    return name


# ------------------------------------------------------------------------------------ decoding images
def to_uint8(arr: np.ndarray) -> np.ndarray:
    """An in-memory image as uint8: uint16 data is scaled (>> 8, 65535 -> 255), anything else is clipped
    to 0..255 before the cast, so a value of 256 cannot wrap around to black."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        return (arr >> 8).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """`img.convert("RGB")`, first scaling high-bit-depth images to 8 bits (PIL's convert does not scale:
    a mid-grey 16-bit pixel comes out white).

    - "I;16" (16-bit PNG / TIFF greyscale) and "I" (32-bit integers; what Pillow decodes 16-bit data into
      for some formats): taken as 16-bit data, clipped to 0..65535, then >> 8 (32768 -> 128).
    - "F" (32-bit float): 0..1 when its maximum is <= 1 (scaled by 255), else 0..255; clipped, rounded,
      NaN -> 0. A float image that is really 0..255 but darker than 1 everywhere would be brightened;
      such an image is black either way.
    """
    if img.mode == "I" or img.mode.startswith("I;16"):
        arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
        img = Image.fromarray(to_uint8(arr))
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return img.convert("RGB")  # a copy even when already RGB: the caller may close the file behind `img`


def load_image(source: ImageSource) -> Image.Image:
    """Decode one image to RGB, raising CorruptImageError (naming the file) when it cannot be read."""
    if isinstance(source, np.ndarray):
        arr = to_uint8(source)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        return Image.fromarray(arr).convert("RGB")
    try:
        with Image.open(source) as img:
            img.load()
            return to_rgb(img)
    except FileNotFoundError as exc:
        raise CorruptImageError(source, "file not found") from exc
    except Exception as exc:  # PIL raises many types for truncated/corrupt data
        raise CorruptImageError(source, f"{type(exc).__name__}: {exc}") from exc
