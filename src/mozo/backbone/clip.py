"""Load a CLIP backbone: a hub id, a local `save_pretrained` folder, `tiny`, or `vit-b-16` geometry.

Every backbone comes back as a `Backbone`: the frozen `CLIPModel`, its tokenizer, and the image
preprocessing numbers (size, mean, std), so the rest of mozo never asks where the model came from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mozo.backbone.convert import is_checkpoint_file, load_checkpoint_parts
from mozo.backbone.tokenizer import load_tokenizer, write_word_tokenizer
from mozo.backbone.towers import Tower

DEFAULT_BACKBONE = "openai/clip-vit-base-patch16"  # the paper's ViT-B/16
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASSETS = Path(__file__).resolve().parent.parent / "assets"
SYNTHETIC = ("tiny", "vit-b-16")
# The small CLIP mozo pretrains itself and ships (`mozo pretrain-tiny`; its made_by.json says how).
SHIPPED_TINY = ASSETS / "tiny-clip"
SHIPPED = {"mozo-tiny": SHIPPED_TINY}

# Words of the built-in tokenizer used by random-init backbones; unknown words fall back to bytes.
BASE_WORDS = (
    "a an the of in on with and or photo picture image bad good small large big tiny dark bright "
    "zero one two three four five six seven eight nine digit number handwritten drawing sketch "
    "red green blue yellow purple orange white black gray pink cyan brown "
    "circle square triangle cross ring star diamond bar stripe stripes dots dot plain shape"
).split()


PROMPT_PADDINGS = ("max_length", "longest")


@dataclass
class Backbone:
    """A frozen CLIPModel with what it needs to read images and prompts."""

    model: nn.Module
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    context_length: int

    def tower(self, modality: str) -> Tower:
        return Tower(self.model, modality)

    def tokenize(self, prompts: list[str], device: torch.device | str = "cpu", padding: str = "max_length") -> dict[str, torch.Tensor]:
        """Token ids and padding mask, (len(prompts), T).

        padding="max_length": every prompt padded to the context length (77 for CLIP), as the reference
        code's `clip.tokenize` does. padding="longest": cut at the longest prompt. The text tower is
        causal and pools at EOS (the MoE router reads the first token), so no feature depends on the
        padding after EOS: the features are the same, for several times less text-tower work and memory
        with short class prompts (docs/benchmarks.md, optimisation 6).
        """
        if padding not in PROMPT_PADDINGS:
            raise ValueError(f"prompt padding {padding!r}: expected one of {PROMPT_PADDINGS}")
        # Always on the right, whatever the tokenizer's default: CLIP's positions start at the first token and
        # pooling reads the first EOS, so left padding would change every feature.
        enc = self.tokenizer(prompts, padding="max_length", padding_side="right", truncation=True,
                             max_length=self.context_length, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if padding == "longest":
            length = int(mask.sum(1).max())
            ids, mask = ids[:, :length], mask[:, :length]
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def builtin_tokenizer_dir() -> Path:
    """The word-level tokenizer of random-init backbones, written on first use next to the assets."""
    path = ASSETS / "base-tokenizer"
    if not (path / "vocab.json").exists():
        write_word_tokenizer(BASE_WORDS, path, model_max_length=77)
    return path


def synthetic_config(name: str, vocab_size: int, eos_token_id: int, bos_token_id: int):
    """`tiny`: 4 layers per tower, width 64, 32 px images (builds in milliseconds).
    `vit-b-16`: the geometry of openai/clip-vit-base-patch16 (12+12 layers, 768/512 wide, 224 px)."""
    from transformers import CLIPConfig

    if name == "tiny":
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=32)
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=8)
        proj = 64
    elif name == "vit-b-16":
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16)
        proj = 512
    else:
        raise ValueError(f"unknown synthetic backbone {name!r}; expected one of {SYNTHETIC}")
    text.update(vocab_size=vocab_size, eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=eos_token_id)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)


def load_backbone(spec: str = DEFAULT_BACKBONE, device: str | torch.device = "cpu", seed: int = 0, local_only: bool = False) -> Backbone:
    """Load `spec`: `tiny`, `vit-b-16` (random init), `mozo-tiny` (the shipped pretrained tiny CLIP),
    a local folder from `save_pretrained`, a hub id, or an OpenAI `clip` / open_clip ViT checkpoint
    file (.pt/.pth/.bin/.safetensors, with vocab.json + merges.txt next to it; see backbone/convert.py).

    The model is returned frozen (`requires_grad=False` everywhere) and in eval mode; PEFT units are
    the only trainable parameters mozo ever creates.
    """
    from transformers import CLIPModel

    if spec in SYNTHETIC:
        tok = load_tokenizer(builtin_tokenizer_dir())
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            model = CLIPModel(synthetic_config(spec, len(tok), tok.eos_token_id, tok.bos_token_id))
        size, mean, std = model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD
    elif is_checkpoint_file(spec):  # an OpenAI `clip` / open_clip weights file, converted on load (convert.py)
        model, tok = load_checkpoint_parts(spec, local_only=local_only)
        size, mean, std = model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD
    else:
        if spec in SHIPPED and not (SHIPPED[spec] / "config.json").exists():
            raise FileNotFoundError(f"the shipped backbone {spec!r} is missing from {SHIPPED[spec]}; "
                                    "reinstall mozo or recreate it with `mozo pretrain-tiny`")
        path = Path(SHIPPED.get(spec, spec)).expanduser()
        spec_src = str(path) if spec in SHIPPED else spec
        looks_local = path.exists() or spec_src.startswith((".", "/", "~"))
        if looks_local and not (path / "config.json").exists():
            raise FileNotFoundError(
                f"backbone folder {path} has no config.json; expected a folder written by "
                "CLIPModel.save_pretrained plus the tokenizer's save_pretrained (config.json, model.safetensors, "
                "tokenizer.json or vocab.json + merges.txt), "
                f"or a hub id such as {DEFAULT_BACKBONE}, or 'tiny'."
            )
        try:
            model = CLIPModel.from_pretrained(str(path) if looks_local else spec_src, local_files_only=local_only)
        except Exception as exc:
            raise RuntimeError(
                f"cannot load CLIP weights from {spec!r}: {type(exc).__name__}: {exc}. Offline, give a local "
                "folder written by save_pretrained, or pre-download the hub id on a machine with network access."
            ) from exc
        tok = load_tokenizer(str(path) if looks_local else spec_src, expected_vocab=model.config.text_config.vocab_size, local_only=local_only)
        size, mean, std = _preprocessing(path if looks_local else None, model)
    model.requires_grad_(False)
    model.eval()
    context = min(model.config.text_config.max_position_embeddings, 77)
    return Backbone(model.to(device), tok, size, tuple(mean), tuple(std), spec, context)


def _preprocessing(folder: Path | None, model) -> tuple[int, tuple, tuple]:
    """Image size, mean and std from preprocessor_config.json when present, else CLIP's defaults."""
    size = model.config.vision_config.image_size
    if folder is not None and (folder / "preprocessor_config.json").exists():
        cfg = json.loads((folder / "preprocessor_config.json").read_text())
        return size, tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
    return size, CLIP_MEAN, CLIP_STD
