"""`mozo pretrain-tiny`: pretrain the shipped tiny CLIP (src/mozo/assets/tiny-clip) on offline data.

The model is a transformers `CLIPModel` (4+4 layers, width 96, 32 px images in 8 px patches, about
0.7M parameters, 2.8 MB), so every PEFT unit and plan of mozo applies to it unchanged. It is trained
from scratch, all weights, with AdamW on the symmetric contrastive CLIP loss over captioned images
(`mozo.data.demo_stream` draws them):

- generated shapes: "a photo of a small red circle", "a bad photo of a red circle.", "a star",
  "a blue shape", ...;
- printed digits, ink on paper: "a photo of a digit three.", "number three", "a green digit
  three", ...

A batch often holds several images that one caption describes ("a star" fits every star), so the
targets of the contrastive loss are soft: every image a caption describes is a positive of that
caption, and every caption that describes an image is a positive of that image (with unique captions
this is exactly CLIP's loss).

Never seen in pretraining: 14 colour-shape pairs (their words are seen, the pairs are not), the
hexagon (neither images nor word), and handwriting (the demo stream's digits are scikit-learn's
handwritten ones). `zero_shot_report` measures zero-shot accuracy on each group with the prompt
"a bad photo of a {}." through mozo's own tower forwards (the path the engine evaluates with); the
shipped `made_by.json` records it and tests/test_pretrained_tiny.py checks the shipped weights
against it.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mozo.data import demo_stream as S

TEMPLATE = "a bad photo of a {}."  # the engine's prompt (DataConfig.template)
TEMPLATES = ("a photo of a {}.", "a bad photo of a {}.", "a {}.", "{}", "a picture of a {}.",
             "an image of a {}.", "a good photo of a {}.", "a drawing of a {}.")
EXTRA_WORDS = ("a an the of photo picture image bad good drawing shape digit number printed handwritten").split()
CONTEXT_LENGTH = 16
EVAL_SEED = 2024
SHAPE_EVAL_PER_COMBO = 16
PRINTED_EVAL_PER_DIGIT = 40
ATTRS = ("kind", "shape", "colour", "size", "digit")  # columns of the attribute / constraint arrays
ANY = -1


def default_out() -> Path:
    from mozo.backbone.clip import ASSETS

    return ASSETS / "tiny-clip"


def vocabulary() -> list[str]:
    """Every word of every caption and class name (the tokenizer holds each as one token)."""
    from mozo.backbone.clip import BASE_WORDS

    words = (set(BASE_WORDS) | set(EXTRA_WORDS) | set(S.SHAPES) | set(S.COLOUR_NAMES) | set(S.INK_NAMES) | set(S.SIZES)
             | set(S.DIGIT_WORDS))
    return sorted(words)


def model_config(vocab_size: int, eos_token_id: int, bos_token_id: int, width: int = 128, layers: int = 4,
                 patch: int = 8):
    """The tiny CLIP's geometry: `layers` per tower, `width` wide (MLP 2x), 32 px images, `patch` px patches."""
    from transformers import CLIPConfig

    heads = max(1, width // 32)
    text = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
                max_position_embeddings=CONTEXT_LENGTH, vocab_size=vocab_size, eos_token_id=eos_token_id,
                bos_token_id=bos_token_id, pad_token_id=eos_token_id)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=S.IMAGE_SIZE, patch_size=patch)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)


# ------------------------------------------------------------------------------------------- captions
def _shape_captions(colour: int, shape: int, size: int, rng: np.random.Generator) -> tuple[str, list[int]]:
    c, s, z = S.COLOUR_NAMES[colour], S.SHAPES[shape], S.SIZES[size]
    r = rng.random()
    if r < 0.40:
        desc, cons = f"{c} {s}", [0, shape, colour, ANY, ANY]
    elif r < 0.65:
        desc, cons = f"{z} {c} {s}", [0, shape, colour, size, ANY]
    elif r < 0.77:
        desc, cons = s, [0, shape, ANY, ANY, ANY]
    elif r < 0.85:
        desc, cons = f"{z} {s}", [0, shape, ANY, size, ANY]
    elif r < 0.95:
        desc, cons = f"{c} shape", [0, ANY, colour, ANY, ANY]
    else:
        desc, cons = f"{z} {c} shape", [0, ANY, colour, size, ANY]
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(desc), cons


def _digit_captions(digit: int, ink: int, rng: np.random.Generator) -> tuple[str, list[int]]:
    w, c = S.DIGIT_WORDS[digit], S.INK_NAMES[ink]
    colour = ink
    r = rng.random()
    if r < 0.45:
        desc, cons = f"digit {w}", [1, ANY, ANY, ANY, digit]
    elif r < 0.65:
        desc, cons = f"{c} digit {w}", [1, ANY, colour, ANY, digit]
    elif r < 0.80:
        desc, cons = f"number {w}", [1, ANY, ANY, ANY, digit]
    elif r < 0.90:
        desc, cons = f"printed digit {w}", [1, ANY, ANY, ANY, digit]
    else:
        desc, cons = f"{c} number {w}", [1, ANY, colour, ANY, digit]
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(desc), cons


class Captioner:
    """Tokenizes captions once each (the caption set is finite) and stacks them into batches."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            enc = self.tok(missing, padding="max_length", truncation=True, max_length=CONTEXT_LENGTH, return_tensors="pt")
            for i, c in enumerate(missing):
                self.cache[c] = (enc["input_ids"][i], enc["attention_mask"][i])
        ids, mask = zip(*(self.cache[c] for c in captions))
        return {"input_ids": torch.stack(ids), "attention_mask": torch.stack(mask)}


# ------------------------------------------------------------------------------------------- data
class PretrainData:
    """Seeded batches of (images, captions, image attributes, caption constraints).

    Shapes come from a pre-rendered pool of held-in pairs (both sizes; random horizontal flips);
    printed digits from a pool of typeset glyphs, recoloured and shifted on the fly. No handwritten
    digit is ever used.
    """

    def __init__(self, seed: int, shapes_per_combo: int = 240, printed_per_digit: int = 400, progress: bool = True):
        self.rng = np.random.default_rng([seed, 1])
        combos = [(S.COLOUR_NAMES.index(c), S.SHAPES.index(s)) for c, s in S.HELD_IN_COMBOS]
        items, attrs = [], []
        for ci, si in combos:
            for k in range(shapes_per_combo):
                z = k % 2
                items.append((S.COLOUR_NAMES[ci], S.SHAPES[si], S.SIZES[z]))
                attrs.append([0, si, ci, z, ANY])
        t0 = time.time()
        self.shape_images = S.render_shapes(items, np.random.default_rng([seed, 2]))
        self.shape_attrs = np.asarray(attrs, dtype=np.int64)
        glyph_rng = np.random.default_rng([seed, 3])
        self.digit_labels = np.repeat(np.arange(10), printed_per_digit)
        self.digit_strokes = S.upscale8(np.stack([S.printed8(int(d), glyph_rng) for d in self.digit_labels]))
        if progress:
            print(f"rendered {len(items)} shapes of {len(combos)} held-in pairs and {len(self.digit_labels)} printed "
                  f"digits in {time.time() - t0:.1f}s", flush=True)

    def batch(self, n_shapes: int, n_digits: int):
        rng = self.rng
        si = rng.integers(0, len(self.shape_images), n_shapes)
        shapes = self.shape_images[si].copy()
        flip = rng.random(n_shapes) < 0.5
        shapes[flip] = shapes[flip][:, :, ::-1]
        s_attr = self.shape_attrs[si]
        di = rng.integers(0, len(self.digit_labels), n_digits)
        colours = rng.integers(0, len(S.INK_NAMES), n_digits)  # the "colour" column of digits holds the ink
        digits = S.ink(self.digit_strokes[di], [S.INK_NAMES[c] for c in colours], rng, shift=2)
        d_attr = np.stack([np.ones(n_digits, dtype=np.int64), np.full(n_digits, ANY), colours,
                           np.full(n_digits, ANY), self.digit_labels[di]], axis=1)
        caps, cons = [], []
        for a in s_attr:
            c, k = _shape_captions(int(a[2]), int(a[1]), int(a[3]), rng)
            caps.append(c)
            cons.append(k)
        for a in d_attr:
            c, k = _digit_captions(int(a[4]), int(a[2]), rng)
            caps.append(c)
            cons.append(k)
        images = np.concatenate([shapes, digits])
        return images, caps, np.concatenate([s_attr, d_attr]), np.asarray(cons, dtype=np.int64)


def to_pixels(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (n, 32, 32, 3) -> normalised float (n, 3, 32, 32): the eval transform at native size."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------- model
def encode(model, modality: str, inputs: dict) -> torch.Tensor:
    """Normalised features through mozo's tower forward (the one the engine uses), no units."""
    from mozo.backbone.towers import Tower

    tower = Tower(model, modality)
    x = tower.embed(inputs)
    return tower.head(tower.run(x, tower.num_layers, {}))


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, attrs: np.ndarray,
                     cons: np.ndarray) -> torch.Tensor:
    """Symmetric CLIP loss with soft targets: caption i and image j are a positive pair when every
    attribute caption i names equals image j's."""
    a = torch.from_numpy(attrs)
    c = torch.from_numpy(cons)
    match = ((c[:, None, :] == ANY) | (c[:, None, :] == a[None, :, :])).all(-1).float()  # (caption, image)
    logits = scale * img @ txt.t()  # (image, caption)
    t_img = match.t() / match.t().sum(1, keepdim=True)
    t_txt = match / match.sum(1, keepdim=True)
    loss_i = -(t_img * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(t_txt * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


# ------------------------------------------------------------------------------------------- evaluation
def _eval_sets() -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Fixed evaluation images: {group: (images, labels into the class list, class list)}.

    Shape groups compete against all 56 pairs of the seen shapes (generalised zero-shot: a held-out
    pair must beat the seen pairs that share its colour or shape), except the held-out shape, whose
    images compete against all 64 pairs.
    """
    rng = np.random.default_rng(EVAL_SEED)
    items, combos = [], []
    for c, s in S.ALL_COMBOS:
        for j in range(SHAPE_EVAL_PER_COMBO):
            items.append((c, s, S.SIZES[j % 2]))
            combos.append((c, s))
    shape_images = S.render_shapes(items, rng)
    groups: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}

    def group(name: str, keep: Sequence[tuple[str, str]], classes: Sequence[tuple[str, str]]) -> None:
        idx = [i for i, c in enumerate(combos) if c in keep]
        labels = np.asarray([list(classes).index(combos[i]) for i in idx])
        groups[name] = (shape_images[idx], labels, [S.shape_classname(c, s) for c, s in classes])

    group("shapes_held_in", S.HELD_IN_COMBOS, S.SEEN_WORD_COMBOS)
    group("shapes_held_out", S.HELD_OUT_COMBOS, S.SEEN_WORD_COMBOS)
    group("shapes_held_out_among_held_out", S.HELD_OUT_COMBOS, S.HELD_OUT_COMBOS)
    group("new_shapes", [c for c in S.ALL_COMBOS if c[1] in S.HELD_OUT_SHAPES], S.ALL_COMBOS)

    digit_names = [S.digit_classname(d) for d in range(10)]
    printed = np.repeat(np.arange(10), PRINTED_EVAL_PER_DIGIT)
    inks = rng.integers(0, len(S.INK_NAMES), len(printed))
    groups["printed_digits"] = (S.render_printed_digits(printed, [S.INK_NAMES[c] for c in inks], rng), printed, digit_names)
    _, dlabels = S.digits_raw()
    test = S.digit_split()["test"]
    inks = rng.integers(0, len(S.INK_NAMES), len(test))
    groups["handwritten_digits"] = (S.render_digits(test, [S.INK_NAMES[c] for c in inks], rng), dlabels[test], digit_names)
    return groups


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, mean, std, images: np.ndarray, labels: np.ndarray,
                       classnames: Sequence[str], template: str = TEMPLATE, batch: int = 512) -> float:
    """Top-1 accuracy (%) of `images` against prompts `template.format(name)` (mozo's tower forwards)."""
    model.eval()
    enc = tokenizer([template.format(c) for c in classnames], padding="max_length", truncation=True,
                    max_length=min(model.config.text_config.max_position_embeddings, 77), return_tensors="pt")
    txt = encode(model, "language", {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    correct = 0
    for i in range(0, len(images), batch):
        img = encode(model, "vision", {"pixel_values": to_pixels(images[i:i + batch], mean, std)})
        correct += int(((img @ txt.t()).argmax(1).numpy() == labels[i:i + batch]).sum())
    return 100.0 * correct / len(images)


def zero_shot_report(model, tokenizer, mean, std, demo: bool = True) -> dict:
    """Zero-shot accuracy (%) per group, with its chance level and size (what made_by.json records)."""
    out = {}
    for group, (images, labels, names) in _eval_sets().items():
        acc = zero_shot_accuracy(model, tokenizer, mean, std, images, labels, names)
        out[group] = {"accuracy": round(acc, 2), "chance": round(100.0 / len(names), 2), "classes": len(names),
                      "images": int(len(images))}
    if demo:
        sc = S.build_demo_scenario(seed=0)
        images = np.concatenate([t.test.sources for t in sc.tasks])
        labels = np.concatenate([t.test.labels for t in sc.tasks])
        acc = zero_shot_accuracy(model, tokenizer, mean, std, images, labels, sc.classnames)
        out["demo_stream_all_classes"] = {"accuracy": round(acc, 2), "chance": round(100.0 / len(sc.classnames), 2),
                                          "classes": len(sc.classnames), "images": int(len(images))}
        for t in sc.tasks:
            acc = zero_shot_accuracy(model, tokenizer, mean, std, np.asarray(t.test.sources), t.test.labels, sc.classnames)
            out[f"demo_task:{t.name}"] = {"accuracy": round(acc, 2), "chance": round(100.0 / len(sc.classnames), 2),
                                          "classes": len(sc.classnames), "images": len(t.test)}
    return out


# ------------------------------------------------------------------------------------------- training
def pretrain(out: Path, steps: int = 1500, seed: int = 0, batch_size: int = 128, digit_fraction: float = 0.3,
             lr: float = 2e-3, weight_decay: float = 0.1, warmup: int = 100, width: int = 96, layers: int = 4,
             patch: int = 8, threads: int = 1, log_every: int = 100, command: Optional[str] = None) -> dict:
    """Train the tiny CLIP and write it to `out` (weights, tokenizer, preprocessor_config, made_by.json)."""
    from transformers import CLIPModel

    from mozo.backbone.clip import CLIP_MEAN, CLIP_STD
    from mozo.backbone.tokenizer import load_tokenizer, write_word_tokenizer

    torch.set_num_threads(threads)
    t_start = time.time()
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write_word_tokenizer(vocabulary(), tmp, model_max_length=CONTEXT_LENGTH)
    tok = load_tokenizer(tmp)
    torch.manual_seed(seed)
    cfg = model_config(len(tok), tok.eos_token_id, tok.bos_token_id, width, layers, patch)
    model = CLIPModel(cfg)
    model.train()
    mean, std = CLIP_MEAN, CLIP_STD
    captioner = Captioner(tok)
    data = PretrainData(seed)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    n_digits = int(round(batch_size * digit_fraction))
    n_shapes = batch_size - n_digits
    t_train = time.time()
    running = None
    for step in range(steps):
        images, caps, attrs, cons = data.batch(n_shapes, n_digits)
        img = encode(model, "vision", {"pixel_values": to_pixels(images, mean, std)})
        txt = encode(model, "language", captioner(caps))
        loss = contrastive_loss(img, txt, model.logit_scale.exp(), attrs, cons)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if log_every and ((step + 1) % log_every == 0 or step == 0):
            el = time.time() - t_train
            print(f"step {step + 1}/{steps}  loss {running:.3f}  scale {model.logit_scale.exp().item():.1f}  "
                  f"{el:.0f}s elapsed, ~{el / (step + 1) * (steps - step - 1):.0f}s left", flush=True)
    train_time = time.time() - t_train
    model.eval()
    model.requires_grad_(False)
    report = zero_shot_report(model, tok, mean, std)

    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": S.IMAGE_SIZE},
        "do_center_crop": True, "crop_size": {"height": S.IMAGE_SIZE, "width": S.IMAGE_SIZE}, "do_normalize": True,
        "image_mean": list(mean), "image_std": list(std), "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255}, indent=1))
    import transformers

    made_by = {
        "command": command or f"mozo pretrain-tiny --steps {steps} --seed {seed}",
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.98],
                      "schedule": f"linear warm-up {warmup} steps, cosine to 0", "grad_clip": 1.0},
        "loss": "symmetric contrastive CLIP loss with soft multi-positive targets (a caption's positives are all "
                "images it describes)",
        "model": {"class": "transformers.CLIPModel", "width": width, "layers_per_tower": layers,
                  "image_size": S.IMAGE_SIZE, "patch_size": patch, "context_length": CONTEXT_LENGTH,
                  "vocab_size": len(tok), "parameters": sum(p.numel() for p in model.parameters())},
        "data": {
            "shapes": {"shapes": list(S.SHAPES), "colours": list(S.COLOUR_NAMES), "sizes": list(S.SIZES),
                       "pool_images": int(len(data.shape_images)), "held_in_pairs": len(S.HELD_IN_COMBOS),
                       "held_out_pairs": [S.shape_classname(c, s) for c, s in S.HELD_OUT_COMBOS],
                       "held_out_shapes": list(S.HELD_OUT_SHAPES)},
            "digits": {"printed": "0-9 typeset with PIL's built-in font, reduced to 8x8 like sklearn's digits",
                       "pool_images": int(len(data.digit_labels)),
                       "handwritten": "none (sklearn's handwritten digits are the demo stream's held-out domain)"},
            "digit_fraction_of_batch": digit_fraction,
            "caption_templates": list(TEMPLATES),
        },
        "zero_shot": {"prompt": TEMPLATE, "eval_seed": EVAL_SEED,
                      "computed_by": "mozo.demo.pretrain.zero_shot_report", "accuracy_percent": report},
        "train_seconds": round(train_time, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores",
        "load_average_at_start": load_at_start,
    }
    (tmp / "made_by.json").write_text(json.dumps(made_by, indent=1))
    for f in tmp.iterdir():  # save_pretrained may create files readable by their owner only
        f.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return made_by


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--out", default=None, help="output folder (default: the packaged src/mozo/assets/tiny-clip)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and data (default 0)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the matrices are tiny, a second thread adds more "
                             "synchronisation than work, and is many times slower when the cores are shared)")


def main(args) -> int:
    out = Path(args.out) if args.out else default_out()
    cmd = "mozo pretrain-tiny " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["pretrain-tiny"] else None
    made_by = pretrain(out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                       threads=args.threads, command=cmd)
    print(f"\nwrote {out} in {made_by['total_seconds']:.0f}s; zero-shot accuracy (%), prompt {TEMPLATE!r}:")
    for group, r in made_by["zero_shot"]["accuracy_percent"].items():
        print(f"  {group:36s} {r['accuracy']:6.2f}  (chance {r['chance']:.2f}, {r['classes']} classes, {r['images']} images)")
    return 0
