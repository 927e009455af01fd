"""The demo's data: generated shapes whose names compose, scikit-learn's bundled handwritten digits,
and the class-incremental stream `mozo demo` trains on.

Everything here exists offline. Two image families, both rendered at 32x32 RGB on a dark, noisy
background:

- shapes: `SHAPES` x `COLOURS` x `SIZES`, drawn with PIL (4x supersampled, random position and a small
  rotation). Class name "<colour> <shape>" ("green star").
- digits: the 1797 8x8 images of `sklearn.datasets.load_digits`, upscaled and drawn in a colour of
  `COLOURS`. Class name "digit <word>" ("digit seven").

What the shipped tiny CLIP (`mozo pretrain-tiny`) never saw, so that the demo measures real transfer
and real learning:

- `HELD_OUT_COMBOS`: 16 of the 64 colour-shape pairs. Every colour and every shape word was seen,
  the pair was not: zero-shot on them is compositional transfer.
- `HELD_OUT_DIGITS` (5..9): neither their images nor their words were in any caption: zero-shot on
  them is near chance, they have to be learned.
- Of the held-in digits, only the images of the "pretrain" part of the seeded split (`digit_split`);
  the stream's train and test images come from the other parts.

`build_demo_scenario` makes the stream (protocol "cil"): 4 tasks (5, 8, 5, 8 classes), alternating the two
families so that training a later task causes measurable forgetting of the earlier one of its family.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from mozo.data.base import LabelledImages
from mozo.data.scenario import Scenario, Task

IMAGE_SIZE = 32

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "hexagon")
COLOURS = {
    "red": (220, 35, 35),
    "green": (35, 185, 45),
    "blue": (45, 80, 235),
    "yellow": (235, 220, 35),
    "purple": (150, 50, 210),
    "orange": (245, 140, 25),
    "white": (235, 235, 235),
    "cyan": (35, 215, 225),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Two held-out colours per shape and two held-out shapes per colour (a Latin-square pattern).
HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (COLOUR_NAMES[(3 * i + k) % 8], SHAPES[i]) for i in range(len(SHAPES)) for k in (1, 5)
)
HELD_OUT_DIGITS: tuple[int, ...] = (5, 6, 7, 8, 9)
HELD_IN_DIGITS: tuple[int, ...] = tuple(d for d in range(10) if d not in HELD_OUT_DIGITS)

ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for s in SHAPES for c in COLOUR_NAMES)
HELD_IN_COMBOS: tuple[tuple[str, str], ...] = tuple(c for c in ALL_COMBOS if c not in HELD_OUT_COMBOS)

# The held-out pairs form four 2x2 blocks (two shapes x two colours): circle/ring x green/orange,
# square/star x red/purple, triangle/diamond x yellow/cyan, cross/hexagon x blue/white. A task holding
# whole blocks can only be solved by reading both the colour and the shape.
_BLOCKS = [
    [(c, s) for s in shapes for c in COLOUR_NAMES if (c, s) in HELD_OUT_COMBOS]
    for shapes in (("circle", "ring"), ("triangle", "diamond"), ("square", "star"), ("cross", "hexagon"))
]

# The stream: digits 0-4 (seen in pretraining, new images), 8 new colour-shape pairs, digits 5-9
# (never seen: new words and images), 8 more new pairs.
DEMO_TASKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("digits 0-4", tuple(f"digit {DIGIT_WORDS[d]}" for d in HELD_IN_DIGITS)),
    ("new pairs A", tuple(f"{c} {s}" for c, s in _BLOCKS[0] + _BLOCKS[1])),
    ("digits 5-9", tuple(f"digit {DIGIT_WORDS[d]}" for d in HELD_OUT_DIGITS)),
    ("new pairs B", tuple(f"{c} {s}" for c, s in _BLOCKS[2] + _BLOCKS[3])),
)
DEMO_CLASSNAMES: tuple[str, ...] = tuple(name for _, names in DEMO_TASKS for name in names)

# Fractions of each digit class: pretraining (held-in digits only), stream train, stream test.
DIGIT_SPLIT = (0.5, 0.25, 0.25)
DIGIT_SPLIT_SEED = 1234  # fixed: the pretrain part must never move, whatever seed the demo uses


def shape_classname(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


def digit_classname(digit: int) -> str:
    return f"digit {DIGIT_WORDS[digit]}"


# ------------------------------------------------------------------------------------------- rendering
def _background(rng: np.random.Generator, n: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Dark, slightly tinted, noisy backgrounds: (n, size, size, 3) float32 in [0, 255]."""
    base = rng.uniform(0, 60, size=(n, 1, 1, 1)) + rng.uniform(-8, 8, size=(n, 1, 1, 3))
    noise = rng.normal(0, rng.uniform(2, 10, size=(n, 1, 1, 1)), size=(n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.float32)


def _jitter_colour(colour: str, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(COLOURS[colour], dtype=np.float32) + rng.uniform(-20, 20, size=3), 0, 255)


def _polygon(n: int, cx: float, cy: float, r: float, angle: float, inner: Optional[float] = None) -> list[tuple[float, float]]:
    """Regular n-gon (or a star with `inner` radius ratio) centred at (cx, cy)."""
    pts = []
    steps = 2 * n if inner else n
    for k in range(steps):
        rad = r * (inner if inner and k % 2 else 1.0)
        a = angle + 2 * math.pi * k / steps - math.pi / 2
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _shape_mask(shape: str, size: str, rng: np.random.Generator, out: int = IMAGE_SIZE, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage mask (out, out) float32 in [0, 1] of one shape."""
    s = out * ss
    frac = rng.uniform(0.17, 0.24) if size == "small" else rng.uniform(0.33, 0.42)
    r = frac * s
    margin = r * 1.05
    cx = rng.uniform(margin, s - margin)
    cy = rng.uniform(margin, s - margin)
    rot = math.radians(rng.uniform(-15, 15))
    img = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * 0.55
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif shape == "square":
        d.polygon(_polygon(4, cx, cy, r * 1.1, rot + math.pi / 4), fill=255)
    elif shape == "diamond":
        pts = _polygon(4, cx, cy, r * 1.1, rot)
        pts = [(cx + (x - cx) * 0.7, y) for x, y in pts]  # a rhombus, narrower than tall
        d.polygon(pts, fill=255)
    elif shape == "triangle":
        d.polygon(_polygon(3, cx, cy + r * 0.15, r * 1.1, rot), fill=255)
    elif shape == "hexagon":
        d.polygon(_polygon(6, cx, cy, r, rot + math.pi / 6), fill=255)
    elif shape == "star":
        d.polygon(_polygon(5, cx, cy, r * 1.1, rot, inner=0.42), fill=255)
    elif shape == "cross":
        w = r * 0.36
        for a in (rot, rot + math.pi / 2):
            ca, sa = math.cos(a), math.sin(a)
            corners = [(-r, -w), (r, -w), (r, w), (-r, w)]
            d.polygon([(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in corners], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(img.resize((out, out), Image.BOX), dtype=np.float32) / 255.0


def render_shapes(items: Sequence[tuple[str, str, str]], rng: np.random.Generator) -> np.ndarray:
    """Images (n, 32, 32, 3) uint8 of (colour, shape, size) triples."""
    n = len(items)
    out = _background(rng, n)
    for i, (colour, shape, size) in enumerate(items):
        mask = _shape_mask(shape, size, rng)[..., None]
        out[i] = out[i] * (1 - mask) + _jitter_colour(colour, rng) * mask
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as (1797, 32, 32) float32 stroke intensity in [0, 1], and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.asarray(data.images, dtype=np.float32) / 16.0
    big = np.stack([np.asarray(Image.fromarray(im).resize((24, 24), Image.BICUBIC)) for im in images])
    big = np.clip(big, 0, 1)
    canvas = np.zeros((len(big), IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    canvas[:, 4:28, 4:28] = big
    return canvas, np.asarray(data.target, dtype=np.int64)


def digit_split(seed: int = DIGIT_SPLIT_SEED) -> dict[str, np.ndarray]:
    """Indices into sklearn's digits: {"pretrain", "train", "test"} (a seeded per-class split).

    The "pretrain" part of the held-out digits is simply unused.
    """
    _, labels = _digits_raw()
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"pretrain": [], "train": [], "test": []}
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(labels == d))
        a = int(round(DIGIT_SPLIT[0] * len(idx)))
        b = a + int(round(DIGIT_SPLIT[1] * len(idx)))
        parts["pretrain"] += idx[:a].tolist()
        parts["train"] += idx[a:b].tolist()
        parts["test"] += idx[b:].tolist()
    return {k: np.asarray(sorted(v), dtype=np.int64) for k, v in parts.items()}


def render_digits(indices: np.ndarray, colours: Sequence[str], rng: np.random.Generator, shift: int = 0) -> np.ndarray:
    """Digits `indices` (into sklearn's digits) drawn in `colours`: (n, 32, 32, 3) uint8.

    `shift` > 0 also moves each digit by up to `shift` pixels (pretraining augmentation).
    """
    strokes, _ = _digits_raw()
    a = strokes[np.asarray(indices)]
    if shift:
        moved = np.empty_like(a)
        for i in range(len(a)):
            dy, dx = rng.integers(-shift, shift + 1, size=2)
            moved[i] = np.roll(a[i], (int(dy), int(dx)), axis=(0, 1))
        a = moved
    out = _background(rng, len(a))
    fg = np.stack([_jitter_colour(c, rng) for c in colours])[:, None, None, :]
    m = a[..., None]
    out = out * (1 - m) + fg * m
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- the stream
def _parse(classname: str) -> tuple[str, object]:
    words = classname.split()
    if words[0] == "digit":
        return "digit", DIGIT_WORDS.index(words[1])
    return "shape", (words[0], words[1])


def _class_images(classname: str, n: int, part: str, rng: np.random.Generator, seed: int) -> np.ndarray:
    kind, key = _parse(classname)
    if kind == "digit":
        split = digit_split()
        _, labels = _digits_raw()
        pool = split[part][labels[split[part]] == key]
        take = np.random.default_rng([seed, key, 0 if part == "train" else 1]).permutation(pool)[:n]
        return render_digits(take, [COLOUR_NAMES[i] for i in rng.integers(0, len(COLOUR_NAMES), len(take))], rng)
    colour, shape = key
    sizes = [SIZES[i % 2] for i in range(n)]
    return render_shapes([(colour, shape, s) for s in sizes], rng)


def build_demo_scenario(seed: int = 0, train_per_class: int = 45, test_per_class: int = 40,
                        num_tasks: Optional[int] = None) -> Scenario:
    """The demo's class-incremental stream: `DEMO_TASKS` (4 tasks, 26 classes) with seeded images.

    Digits come from the stream parts of the fixed digit split (about 45 train and 44 test images per
    digit exist; asking for more keeps all of them); shapes are rendered from a generator seeded by
    `seed`, separately for train and test. Labels are positions in `DEMO_CLASSNAMES`, so after task i
    the seen classes are labels 0..seen_classes(i)-1, as `class_incremental` would give.
    """
    if train_per_class <= 0 or test_per_class <= 0:
        raise ValueError("train_per_class and test_per_class must be positive")
    tasks_spec = DEMO_TASKS if num_tasks is None else DEMO_TASKS[:num_tasks]
    if not tasks_spec:
        raise ValueError("num_tasks must be at least 1")
    classnames = [name for _, names in tasks_spec for name in names]
    tasks = []
    offset = 0
    for t, (task_name, names) in enumerate(tasks_spec):
        parts = {}
        for part, n, salt in (("train", train_per_class, 0), ("test", test_per_class, 1)):
            rng = np.random.default_rng([seed, t, salt])
            images, labels = [], []
            for j, name in enumerate(names):
                arr = _class_images(name, n, part, rng, seed)
                images.append(arr)
                labels += [offset + j] * len(arr)
            parts[part] = LabelledImages(np.concatenate(images), np.asarray(labels), classnames,
                                         name=f"demo/{task_name}/{part}")
        tasks.append(Task(name=task_name, train=parts["train"], test=parts["test"], classnames=list(names),
                          label_offset=offset, eval_classnames=classnames[: offset + len(names)]))
        offset += len(names)
    meta = {"dataset": "demo", "seed": seed, "train_per_class": train_per_class, "test_per_class": test_per_class,
            "held_out_combos": [shape_classname(c, s) for c, s in HELD_OUT_COMBOS],
            "held_out_digits": list(HELD_OUT_DIGITS),
            "digit_split": {"seed": DIGIT_SPLIT_SEED, "fractions": list(DIGIT_SPLIT)}}
    return Scenario(protocol="cil", tasks=tasks, name="demo", classnames=classnames, meta=meta)
