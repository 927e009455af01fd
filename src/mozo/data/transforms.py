"""CLIP image preprocessing without torchvision.

torchvision is deliberately not a dependency (README, installation: on machines without a GPU wheel index
it drags in a multi-GB CUDA stack), so the few transforms CLIP needs are written here on PIL + numpy and
follow torchvision's arithmetic (same resize sizes, same crop boxes, same RandomResizedCrop sampling) so
that accuracies stay comparable with the reference code.

- Evaluation: resize the shortest side to `size` (bicubic), center crop `size` x `size`, scale to [0, 1],
  normalise with the CLIP mean/std.
- Training (MoE-Adapters4CL reference): RandomResizedCrop(size, scale=(0.9, 1.0), ratio=(3/4, 4/3)),
  bicubic, then the same normalisation.

The randomness of the training transform comes only from the `rng` passed with each image (a
`random.Random` or a `torch.Generator`), never from global RNG state: `TransformedDataset` seeds it per
sample, so augmentations do not depend on worker processes, loading order or other code touching the
global seeds.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .base import to_rgb

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

Rng = Union[random.Random, torch.Generator]
Transform = Callable[..., torch.Tensor]


def _uniform(rng: Rng, low: float, high: float) -> float:
    """One uniform draw in [low, high) from either kind of explicit generator."""
    if isinstance(rng, torch.Generator):
        return low + (high - low) * torch.rand((), generator=rng, dtype=torch.float64).item()
    return rng.uniform(low, high)


def _randint(rng: Rng, low: int, high: int) -> int:
    """One integer in [low, high] (inclusive, like random.randint)."""
    if isinstance(rng, torch.Generator):
        return int(torch.randint(low, high + 1, (), generator=rng).item())
    return rng.randint(low, high)


def resize_shortest_side(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shorter side equals `size`, keeping the aspect ratio (torchvision Resize(int))."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Crop the central `size` x `size` square (torchvision CenterCrop rounding; pads with black if smaller)."""
    w, h = img.size
    if w < size or h < size:
        padded = Image.new(img.mode, (max(w, size), max(h, size)))
        padded.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = padded, padded.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    width: int,
    height: int,
    rng: Rng,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Sample a crop (top, left, height, width) exactly as torchvision's RandomResizedCrop.get_params.

    Ten tries at an area fraction in `scale` and a log-uniform aspect ratio in `ratio`; if none fits,
    fall back to the largest central crop whose ratio is within `ratio`.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _uniform(rng, scale[0], scale[1])
        aspect = math.exp(_uniform(rng, log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(rng, 0, height - h)
            left = _randint(rng, 0, width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_normalized_tensor(
    img: Image.Image, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """PIL image -> float32 tensor [3, H, W]: RGB (`to_rgb`, which scales 16-bit images to 8 bits), scaled
    to [0, 1], then (x - mean) / std per channel."""
    arr = np.asarray(to_rgb(img), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t


@dataclass(frozen=True)
class ClipTransform:
    """Picklable `(pil_image, rng) -> tensor [3, size, size]` (picklable so DataLoader workers can use it).

    `train=False`: resize shortest side + center crop; `rng` is ignored.
    `train=True`: RandomResizedCrop(size, scale, ratio) driven by `rng` only; `rng` is required so that an
    augmentation can never silently come from global random state.
    """

    train: bool
    size: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, img: Image.Image, rng: Optional[Rng] = None) -> torch.Tensor:
        img = to_rgb(img) if img.mode != "RGB" else img  # to_rgb: 16-bit images scaled, not saturated
        if self.train:
            if rng is None:
                raise ValueError(
                    "the training transform needs an explicit rng (random.Random or torch.Generator); "
                    "TransformedDataset passes one seeded per sample"
                )
            top, left, h, w = random_resized_crop_box(img.size[0], img.size[1], rng, self.scale, self.ratio)
            img = img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
        else:
            img = center_crop(resize_shortest_side(img, self.size), self.size)
        return to_normalized_tensor(img, self.mean, self.std)


def make_transform(
    train: bool,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> ClipTransform:
    """The CLIP train or eval transform: a callable `(pil_image, rng) -> float tensor [3, size, size]`."""
    if size <= 0:
        raise ValueError(f"transform size must be positive, got {size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean} std={std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {std}")
    return ClipTransform(train=train, size=int(size), mean=tuple(float(m) for m in mean),
                         std=tuple(float(s) for s in std))
