"""The demo's data: generated shapes whose names compose, printed digits, scikit-learn's bundled
handwritten digits, and the class-incremental stream `mozo demo` trains on.

Everything here exists offline. Three image families, all 32x32 RGB uint8:

- shapes: `SHAPES` x `COLOURS` x `SIZES`, coloured objects on a dark, noisy background, drawn with PIL
  (4x supersampled, random position and a small rotation), filled or as line drawings (outlines).
  Class name "<colour> <shape>" ("green star").
- printed digits: 0-9 typeset with PIL's built-in font (random size, stroke, slant, rotation), then
  reduced to 8x8 and 17 grey levels exactly like scikit-learn's digits were; ink (`INKS`) on paper.
- handwritten digits: the 1797 8x8 images of `sklearn.datasets.load_digits` (real handwriting),
  upscaled the same way; ink on paper. Class name "digit <word>" ("digit seven").

What the shipped tiny CLIP (`mozo pretrain-tiny`) never saw, so that the demo measures real transfer
and real learning:

- `HELD_OUT_COMBOS`: 14 colour-shape pairs of the seen shapes. Every colour and shape word was seen,
  the pair was not: zero-shot on them is compositional transfer.
- `HELD_OUT_SHAPES` (hexagon, heart, moon, arrow): neither their images nor their words were in any
  caption; a prompt naming one is a known colour word plus an untrained token.
- handwriting: pretraining saw only printed digits; every handwritten digit of the stream is a new
  domain for a known word (zero-shot is transfer from print to handwriting).
- line drawings: pretraining saw filled shapes only.

`build_demo_scenario` makes the stream (protocol "cil"): 4 tasks (10, 8, 8, 8 classes, see
`DEMO_TASKS`): handwritten digits, new colour-shape pairs, and line drawings (a style pretraining never
showed) in two tasks. Zero-shot solves the new pairs and part of the rest; first-order training has
the rest to learn, and later tasks make earlier ones measurably forgotten.

The held-out shapes (new words) are deliberately not in the stream: a prompt with an untrained token
is a random point, and class-incremental training (cross-entropy over the current task's classes
only) then pulls their images towards unrelated old prompts. `made_by.json` still reports them
("new_shapes": zero-shot at chance) to show where zero-shot stops.
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

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "hexagon", "heart", "moon", "arrow")
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
# Digits are ink on paper (dark strokes on a light background), shapes are coloured objects on a dark
# background: the two families never look alike.
INKS = {"black": (25, 25, 30), "blue": (30, 45, 150), "red": (160, 25, 25), "green": (25, 110, 35),
        "purple": (90, 30, 130)}
INK_NAMES = tuple(INKS)
SIZES = ("small", "large")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Never in pretraining, neither image nor word.
HELD_OUT_SHAPES: tuple[str, ...] = ("hexagon", "heart", "moon", "arrow")
SEEN_SHAPES: tuple[str, ...] = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
# Of the seen shapes, two held-out colours per shape and at most two held-out shapes per colour (a
# Latin-square pattern): these pairs' words were seen, the pairs were not.
HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (COLOUR_NAMES[(3 * i + k) % 8], SHAPES[i]) for i in range(len(SHAPES)) if SHAPES[i] in SEEN_SHAPES for k in (1, 5)
)

ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for s in SHAPES for c in COLOUR_NAMES)
SEEN_WORD_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c, s in ALL_COMBOS if s in SEEN_SHAPES)
HELD_IN_COMBOS: tuple[tuple[str, str], ...] = tuple(c for c in SEEN_WORD_COMBOS if c not in HELD_OUT_COMBOS)

# The held-out pairs form 2x2 blocks (two shapes x two colours): circle/ring x green/orange,
# triangle/diamond x yellow/cyan, square/star x red/purple (and cross x blue/white). A task holding
# whole blocks can only be solved by reading both the colour and the shape.
_BLOCKS = [
    [(c, s) for s in shapes for c in COLOUR_NAMES if (c, s) in HELD_OUT_COMBOS]
    for shapes in (("circle", "ring"), ("triangle", "diamond"), ("square", "star"))
]

# The stream (name, class names, style of its images):
# 1. handwritten digits 0-9: a new domain for known words (pretraining saw printed digits only);
# 2. eight new colour-shape pairs, filled as in pretraining: compositional zero-shot, little to learn;
# 3-4. line drawings (outlines, a style pretraining never showed) of four shapes in two colours each;
#      task 4 repeats task 3's shapes in other colours, so what task 3 learns transfers forward.
LINE_SHAPES = ("square", "star", "triangle", "diamond")
DEMO_TASKS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("handwritten digits", tuple(f"digit {w}" for w in DIGIT_WORDS), "handwritten"),
    ("new pairs", tuple(f"{c} {s}" for c, s in _BLOCKS[0] + _BLOCKS[1]), "filled"),
    ("line drawings A", tuple(f"{c} {s}" for s in LINE_SHAPES for c in ("red", "blue")), "line"),
    ("line drawings B", tuple(f"{c} {s}" for s in LINE_SHAPES for c in ("purple", "white")), "line"),
)
DEMO_CLASSNAMES: tuple[str, ...] = tuple(name for _, names, _ in DEMO_TASKS for name in names)

# The handwritten digits are split once, per class, into the stream's train and test halves.
DIGIT_SPLIT_SEED = 1234


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


def _shape_mask(shape: str, size: str, rng: np.random.Generator, out: int = IMAGE_SIZE, ss: int = 4,
                line: bool = False) -> np.ndarray:
    """Anti-aliased coverage mask (out, out) float32 in [0, 1] of one shape (`line`: its outline only)."""
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
    elif shape == "heart":
        lobe = r * 0.52
        top = cy - r * 0.28
        d.ellipse([cx - 2 * lobe + r * 0.05, top - lobe, cx + r * 0.05, top + lobe], fill=255)
        d.ellipse([cx - r * 0.05, top - lobe, cx + 2 * lobe - r * 0.05, top + lobe], fill=255)
        d.polygon([(cx - r * 0.98, top + lobe * 0.25), (cx + r * 0.98, top + lobe * 0.25), (cx, cy + r * 0.95)], fill=255)
    elif shape == "moon":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        off = r * 0.55
        ca, sa = math.cos(rot), math.sin(rot)
        d.ellipse([cx + off * ca - r * 0.85, cy + off * sa - r * 0.85, cx + off * ca + r * 0.85, cy + off * sa + r * 0.85], fill=0)
    elif shape == "arrow":
        shaft, head = r * 0.22, r * 0.55
        pts = [(-r, -shaft), (r * 0.15, -shaft), (r * 0.15, -head), (r, 0), (r * 0.15, head), (r * 0.15, shaft), (-r, shaft)]
        ca, sa = math.cos(rot), math.sin(rot)
        d.polygon([(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts], fill=255)
    elif shape == "cross":
        w = r * 0.36
        for a in (rot, rot + math.pi / 2):
            ca, sa = math.cos(a), math.sin(a)
            corners = [(-r, -w), (r, -w), (r, w), (-r, w)]
            d.polygon([(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in corners], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if line:  # keep a band about 1.5 output pixels wide inside the border: the mask minus its erosion
        a = np.asarray(img)
        k = 2 * int(1.5 * ss) + 1
        padded = np.pad(a, k // 2, mode="edge")
        win = np.lib.stride_tricks.sliding_window_view
        eroded = win(win(padded, k, axis=0).min(-1), k, axis=1).min(-1)  # square min filter, separably
        img = Image.fromarray(a - eroded)
    return np.asarray(img.resize((out, out), Image.BOX), dtype=np.float32) / 255.0


STYLES = ("filled", "line")


def render_shapes(items: Sequence[tuple[str, str, str]], rng: np.random.Generator, style: str = "filled") -> np.ndarray:
    """Images (n, 32, 32, 3) uint8 of (colour, shape, size) triples. `style`: "filled" (pretraining's),
    or "line" (outlines only: line drawings, a style pretraining never showed)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    n = len(items)
    out = _background(rng, n)
    for i, (colour, shape, size) in enumerate(items):
        mask = _shape_mask(shape, size, rng, line=style == "line")[..., None]
        out[i] = out[i] * (1 - mask) + _jitter_colour(colour, rng) * mask
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def upscale8(images: np.ndarray) -> np.ndarray:
    """(n, 8, 8) stroke intensity in [0, 1] -> (n, 32, 32): bicubic to 24x24, centred on a 32x32 canvas."""
    big = np.stack([np.asarray(Image.fromarray(im.astype(np.float32)).resize((24, 24), Image.BICUBIC)) for im in images])
    canvas = np.zeros((len(images), IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    canvas[:, 4:28, 4:28] = np.clip(big, 0, 1)
    return canvas


def _paper(rng: np.random.Generator, n: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Light, slightly tinted, noisy paper: (n, size, size, 3) float32 in [0, 255]."""
    base = rng.uniform(190, 245, size=(n, 1, 1, 1)) + rng.uniform(-8, 8, size=(n, 1, 1, 3))
    noise = rng.normal(0, rng.uniform(2, 8, size=(n, 1, 1, 1)), size=(n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.float32)


def ink(strokes: np.ndarray, inks: Sequence[str], rng: np.random.Generator, shift: int = 0) -> np.ndarray:
    """(n, 32, 32) stroke intensities -> (n, 32, 32, 3) uint8: `inks` (names of `INKS`) on paper.

    `shift` > 0 also moves each digit by up to `shift` pixels (pretraining augmentation).
    """
    a = strokes
    if shift:
        moved = np.empty_like(a)
        for i in range(len(a)):
            dy, dx = rng.integers(-shift, shift + 1, size=2)
            moved[i] = np.roll(a[i], (int(dy), int(dx)), axis=(0, 1))
        a = moved
    out = _paper(rng, len(a))
    fg = np.stack([np.clip(np.asarray(INKS[c], dtype=np.float32) + rng.uniform(-15, 15, size=3), 0, 255) for c in inks])
    m = a[..., None]
    out = out * (1 - m) + fg[:, None, None, :] * m
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's handwritten digits as (1797, 32, 32) float32 stroke intensity in [0, 1], and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return upscale8(np.asarray(data.images, dtype=np.float32) / 16.0), np.asarray(data.target, dtype=np.int64)


def digit_split(seed: int = DIGIT_SPLIT_SEED) -> dict[str, np.ndarray]:
    """Indices into sklearn's digits: {"train", "test"}, half of every class each (seeded, fixed)."""
    _, labels = digits_raw()
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "test": []}
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(labels == d))
        half = len(idx) // 2
        parts["train"] += idx[:half].tolist()
        parts["test"] += idx[half:].tolist()
    return {k: np.asarray(sorted(v), dtype=np.int64) for k, v in parts.items()}


def render_digits(indices: np.ndarray, inks: Sequence[str], rng: np.random.Generator, shift: int = 0) -> np.ndarray:
    """Handwritten digits `indices` (into sklearn's digits) in `inks` on paper: (n, 32, 32, 3) uint8."""
    strokes, _ = digits_raw()
    return ink(strokes[np.asarray(indices)], inks, rng, shift)


@lru_cache(maxsize=None)
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # the embedded scalable font (needs FreeType)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: the small bitmap font, scaled below
        return ImageFont.load_default()


def printed8(digit: int, rng: np.random.Generator) -> np.ndarray:
    """One typeset digit reduced like scikit-learn's: (8, 8) intensities in 17 levels, in [0, 1]."""
    s = 64
    img = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(img)
    font = _font(int(rng.integers(40, 58)))
    stroke = int(rng.integers(0, 4))
    box = d.textbbox((0, 0), str(digit), font=font, stroke_width=stroke)
    x = (s - (box[2] - box[0])) / 2 - box[0]
    y = (s - (box[3] - box[1])) / 2 - box[1]
    d.text((x, y), str(digit), fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    shear, aspect = rng.uniform(-0.3, 0.3), rng.uniform(0.75, 1.15)
    img = img.transform((s, s), Image.AFFINE, (1 / aspect, shear, -shear * s / 2 + (1 - 1 / aspect) * s / 2, 0, 1, 0),
                        resample=Image.BILINEAR)
    img = img.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255.0
    ys, xs = np.nonzero(a > 0.2)
    if len(ys) == 0:
        return np.zeros((8, 8), dtype=np.float32)
    a = a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    # like NIST's preprocessing: the glyph's box fills a 32x32 bitmap, 4x4 blocks are counted
    h, w = a.shape
    scale = 28 / max(h, w)
    th, tw = max(1, round(h * scale)), min(32, max(1, round(w * scale * rng.uniform(1.0, 1.3))))
    a = np.asarray(Image.fromarray(a).resize((tw, th), Image.BILINEAR))
    canvas = np.zeros((32, 32), dtype=np.float32)
    oy, ox = (32 - th) // 2, (32 - tw) // 2
    canvas[oy:oy + th, ox:ox + tw] = a
    return np.round(np.clip(canvas.reshape(8, 4, 8, 4).mean((1, 3)), 0, 1) * 16) / 16


def render_printed_digits(digits: Sequence[int], inks: Sequence[str], rng: np.random.Generator,
                          shift: int = 0) -> np.ndarray:
    """Typeset digits in `inks` on paper, in the style of the handwritten ones: (n, 32, 32, 3) uint8."""
    small = np.stack([printed8(int(d), rng) for d in digits]) if len(digits) else np.zeros((0, 8, 8), np.float32)
    return ink(upscale8(small), inks, rng, shift)


# ------------------------------------------------------------------------------------------- the stream
def _parse(classname: str) -> tuple[str, object]:
    words = classname.split()
    if words[0] == "digit":
        return "digit", DIGIT_WORDS.index(words[1])
    return "shape", (words[0], words[1])


def _class_images(classname: str, n: int, part: str, rng: np.random.Generator, seed: int,
                  style: str = "filled") -> np.ndarray:
    kind, key = _parse(classname)
    if kind == "digit":
        split = digit_split()
        _, labels = digits_raw()
        pool = split[part][labels[split[part]] == key]
        take = np.random.default_rng([seed, key, 0 if part == "train" else 1]).permutation(pool)[:n]
        return render_digits(take, [INK_NAMES[i] for i in rng.integers(0, len(INK_NAMES), len(take))], rng)
    colour, shape = key
    sizes = [SIZES[i % 2] for i in range(n)]
    return render_shapes([(colour, shape, s) for s in sizes], rng, style)


def build_demo_scenario(seed: int = 0, train_per_class: int = 60, test_per_class: int = 40,
                        num_tasks: Optional[int] = None) -> Scenario:
    """The demo's class-incremental stream: `DEMO_TASKS` (4 tasks, 34 classes) with seeded images.

    Digits are scikit-learn's handwritten ones from the fixed train / test halves (about 90 images per
    digit in each; asking for more keeps all of them); shapes are rendered from a generator seeded by
    `seed`, separately for train and test. Labels are positions in `DEMO_CLASSNAMES`, so after task i
    the seen classes are labels 0..seen_classes(i)-1, as `class_incremental` would give.
    """
    if train_per_class <= 0 or test_per_class <= 0:
        raise ValueError("train_per_class and test_per_class must be positive")
    tasks_spec = DEMO_TASKS if num_tasks is None else DEMO_TASKS[:num_tasks]
    if not tasks_spec:
        raise ValueError("num_tasks must be at least 1")
    classnames = [name for _, names, _ in tasks_spec for name in names]
    tasks = []
    offset = 0
    for t, (task_name, names, style) in enumerate(tasks_spec):
        parts = {}
        for part, n, salt in (("train", train_per_class, 0), ("test", test_per_class, 1)):
            rng = np.random.default_rng([seed, t, salt])
            images, labels = [], []
            for j, name in enumerate(names):
                arr = _class_images(name, n, part, rng, seed, style)
                images.append(arr)
                labels += [offset + j] * len(arr)
            parts[part] = LabelledImages(np.concatenate(images), np.asarray(labels), classnames,
                                         name=f"demo/{task_name}/{part}", meta={"style": style})
        tasks.append(Task(name=task_name, train=parts["train"], test=parts["test"], classnames=list(names),
                          label_offset=offset, eval_classnames=classnames[: offset + len(names)]))
        offset += len(names)
    meta = {"dataset": "demo", "seed": seed, "train_per_class": train_per_class, "test_per_class": test_per_class,
            "held_out_combos": [shape_classname(c, s) for c, s in HELD_OUT_COMBOS],
            "held_out_shapes": list(HELD_OUT_SHAPES),
            "digits": "scikit-learn handwritten digits (pretraining saw printed digits only)",
            "digit_split_seed": DIGIT_SPLIT_SEED}
    return Scenario(protocol="cil", tasks=tasks, name="demo", classnames=classnames, meta=meta)
