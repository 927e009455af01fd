"""Synthetic datasets in the real layouts, for timing the input pipeline (`mozo bench --data`), not for training.

    python scripts/synthetic_data.py cifar DIR [PER_CLASS]          # DIR/cifar-100-python/{train,test,meta}, random 32x32
    python scripts/synthetic_data.py jpegs DIR [CLASSES] [PER_CLASS] # DIR/{train,test}/class_NN/*.jpg, 500x375, ~60 KB

The JPEGs are smooth colour fields plus noise at quality 90, about the file size of a photo of that size.
"""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def cifar(root: Path, per_class: int = 100) -> None:
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", max(1, per_class // 5))):
        labels = [c for c in range(100) for _ in range(n)]
        data = rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8)
        with open(base / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{c:02d}" for c in range(100)], "coarse_label_names": ["x"] * 20}, f)


def jpegs(root: Path, classes: int = 8, per_class: int = 80, size: tuple[int, int] = (500, 375)) -> None:
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / float(w)
    for split, n in (("train", per_class), ("test", max(1, per_class // 6))):
        for c in range(classes):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                f = rng.uniform(2, 12, 3)
                base = np.stack([np.sin(f[k] * xx + rng.uniform(0, 6)) * np.cos(f[(k + 1) % 3] * yy) for k in range(3)], -1)
                img = (127 + 90 * base + rng.normal(0, 10, (h, w, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=90)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("cifar", "jpegs"):
        sys.exit(__doc__)
    kind, root, rest = sys.argv[1], Path(sys.argv[2]), [int(a) for a in sys.argv[3:]]
    (cifar if kind == "cifar" else jpegs)(root, *rest)
