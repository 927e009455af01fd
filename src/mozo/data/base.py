"""Shared pieces of every dataset reader: a labelled list of images, clear errors, image decoding.

Every reader returns a `LabelledImages`: a list of image sources (file paths or in-memory uint8 arrays)
with integer labels and the class names those labels index. Transforms are applied later by
`TransformedDataset`, so the same reader serves training and evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

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

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> "LabelledImages":
        idx = np.asarray(indices, dtype=np.int64)
        sources = self.sources[idx] if isinstance(self.sources, np.ndarray) else [self.sources[i] for i in idx]
        return LabelledImages(sources, self.labels[idx], self.classnames, self.name, dict(self.meta))


def load_image(source: ImageSource) -> Image.Image:
    """Decode one image to RGB, raising CorruptImageError (naming the file) when it cannot be read."""
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    try:
        with Image.open(source) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise CorruptImageError(source, "file not found") from exc
    except Exception as exc:  # PIL raises many types for truncated/corrupt data
        raise CorruptImageError(source, f"{type(exc).__name__}: {exc}") from exc
