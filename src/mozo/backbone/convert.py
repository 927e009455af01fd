"""Load OpenAI CLIP and open_clip ViT checkpoints as a transformers `CLIPModel`.

The reference code (and many published CL results) start from the `clip` package's `ViT-B-16.pt` or
an open_clip checkpoint, not from a Hugging Face folder. mozo runs its towers on a transformers
`CLIPModel` only, so such a file is converted on load: the `CLIPConfig` is read off the tensor shapes
and each OpenAI-named tensor is renamed (the fused attention `in_proj` is split into q, k, v; the two
projections are transposed). `to_openai` is the exact inverse; it is what lets the tests write a
checkpoint in OpenAI naming from a known model and check the round trip.

Accepted files (`.pt`, `.pth`, `.bin`, `.safetensors`):
- a TorchScript archive (`clip` package downloads are `torch.jit.save`d models);
- a plain state dict in OpenAI naming (`clip.load(..., jit=False)` weights, open_clip hub `.bin`);
- an open_clip training checkpoint: ``{"state_dict": {"module." + name: tensor}, ...}``.

Activation: OpenAI CLIP uses QuickGELU, open_clip's own models (e.g. LAION ViT-B-16) plain GELU, and
the shapes cannot tell the two apart. `quick_gelu=None` decides from, in order: an
`open_clip_config.json` next to the file (its `model_cfg.quick_gelu`), the file name ("quickgelu" or
"openai" -> QuickGELU; "open_clip", "laion", "datacomp" -> GELU), and the format (a TorchScript
archive or a bare state dict -> OpenAI -> QuickGELU; an open_clip `state_dict` wrapper -> GELU, unless
it also holds MoE-Adapters4CL tensors: that code trains on the `clip` package's model -> QuickGELU).
"""
from __future__ import annotations

import json
import math
import re
import warnings
import zipfile
from pathlib import Path

import torch

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# Scalars the `clip` package keeps in its TorchScript state dict, and buffers some versions save:
# none is a weight, all are implied by the shapes.
IGNORED = ("input_resolution", "context_length", "vocab_size", "attn_mask", "position_ids")
# The MoE-Adapters4CL reference saves its adapters inside the CLIP state dict (mozo/peft/import_moe_adapters.py).
_MOE_ADAPTERS = re.compile(r"resblocks\.\d+\.(adaptmlp_list|router_list|w_noise_list)\.|resblocks\.\d+\.(mean|std)$")
REAL_TOKENIZER = "openai/clip-vit-base-patch16"  # its vocab.json/merges.txt serve every OpenAI/open_clip ViT
_TOWERS = (("visual.transformer.resblocks", "vision_model.encoder.layers"), ("transformer.resblocks", "text_model.encoder.layers"))
_RENAMES = {  # whole-tensor renames outside the blocks; the projections are transposed separately
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers spells it 'layrnorm'
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = {  # inside one residual block, OpenAI -> transformers (in_proj handled apart)
    "attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
REQUIRED = tuple(_RENAMES) + tuple(_TRANSPOSED)


def is_checkpoint_file(spec: str) -> bool:
    """True when `spec` names a single weights file (the dispatch of `load_backbone`)."""
    return Path(spec).suffix.lower() in CHECKPOINT_SUFFIXES and not Path(spec).expanduser().is_dir()


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The OpenAI-named float32 state dict in `path`, and its format: "torchscript", "openai" or "open_clip"."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {path} does not exist")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            raw, fmt = load_file(str(path)), "openai"
        elif _is_torchscript(path):
            raw, fmt = torch.jit.load(str(path), map_location="cpu").state_dict(), "torchscript"
        else:
            raw, fmt = torch.load(str(path), map_location="cpu", weights_only=True), "openai"
    except Exception as exc:
        raise RuntimeError(f"cannot read CLIP checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):  # open_clip training checkpoint
        raw, fmt = raw["state_dict"], "open_clip"
    if not isinstance(raw, dict):
        raise ValueError(f"CLIP checkpoint {path} holds a {type(raw).__name__}, not a state dict")
    if raw and all(k.startswith("module.") for k in raw):  # saved from DistributedDataParallel
        raw, fmt = {k[len("module."):]: v for k, v in raw.items()}, "open_clip"
    adapters = [k for k in raw if _MOE_ADAPTERS.search(k)]
    if adapters:
        warnings.warn(f"{path}: {len(adapters)} MoE-Adapters4CL tensors are not backbone weights and are ignored here; "
                      "load them with mozo.peft.import_moe_adapters.load_moe_adapters", stacklevel=2)
        fmt = "openai"  # the reference code fine-tunes the `clip` package's model: QuickGELU despite the wrapper
    state = {k: v.float() if v.is_floating_point() else v for k, v in raw.items()
             if torch.is_tensor(v) and k.rsplit(".", 1)[-1] not in IGNORED and not _MOE_ADAPTERS.search(k)}
    return state, fmt


def _is_torchscript(path: Path) -> bool:
    """A `torch.jit.save` archive is a zip holding code/ and constants.pkl; `torch.save` zips hold neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def infer_config(state: dict[str, torch.Tensor], quick_gelu: bool = True, source: str = "checkpoint",
                 heads: tuple[int | None, int | None] = (None, None)):
    """The `CLIPConfig` of an OpenAI-named ViT CLIP state dict, read off its shapes.

    The shapes do not store the head count: `heads` (vision, text) gives it, else width // 64 as in
    OpenAI's `build_model` (head width 64; true of every OpenAI model and open_clip's B and L, not of
    open_clip's ViT-H/g vision towers, whose open_clip_config.json `load_checkpoint_model` reads).
    """
    from transformers import CLIPConfig

    missing = [k for k in REQUIRED if k not in state]
    if missing:
        resnet = " (this looks like a ResNet CLIP, which mozo does not support)" if "visual.layer1.0.conv1.weight" in state else ""
        raise ValueError(f"{source} is not an OpenAI/open_clip ViT CLIP state dict{resnet}: missing {', '.join(missing)}")
    act = "quick_gelu" if quick_gelu else "gelu"

    def tower(prefix: str, width: int, n_heads: int | None) -> dict:
        layers = _count_blocks(state, prefix)
        if layers == 0:
            raise ValueError(f"{source} has no {prefix}.0.* blocks")
        return dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=n_heads or max(width // 64, 1),
                    intermediate_size=state[f"{prefix}.0.mlp.c_fc.weight"].shape[0], hidden_act=act)

    conv = state["visual.conv1.weight"]  # (width, 3, patch, patch)
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    vision = tower("visual.transformer.resblocks", conv.shape[0], heads[0])
    vision.update(patch_size=conv.shape[-1], image_size=grid * conv.shape[-1], num_channels=conv.shape[1])
    text = tower("transformer.resblocks", state["ln_final.weight"].shape[0], heads[1])
    vocab = state["token_embedding.weight"].shape[0]
    # OpenAI's text tower pools at the argmax id: the end-of-text token, the last of the vocabulary.
    text.update(vocab_size=vocab, max_position_embeddings=state["positional_embedding"].shape[0],
                eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=vocab - 1)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=state["text_projection"].shape[1])


def _count_blocks(state: dict, prefix: str) -> int:
    return len({k[len(prefix) + 1:].split(".", 1)[0] for k in state if k.startswith(prefix + ".")})


def to_hf(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """OpenAI/open_clip names -> transformers `CLIPModel` names. Unknown keys are an error: a
    silently dropped tensor would give a model that loads but computes something else."""
    out, used = {}, set()
    for old, new in _RENAMES.items():
        out[new] = state[old]
        used.add(old)
    for old, new in _TRANSPOSED.items():
        out[new] = state[old].t().contiguous()  # OpenAI: x @ proj, (width, embed); nn.Linear: (embed, width)
        used.add(old)
    for src, dst in _TOWERS:
        for i in range(_count_blocks(state, src)):
            a, b = f"{src}.{i}.", f"{dst}.{i}."
            for part in ("weight", "bias"):
                q, k, v = state[f"{a}attn.in_proj_{part}"].chunk(3, dim=0)  # rows stacked q, k, v
                out[f"{b}self_attn.q_proj.{part}"], out[f"{b}self_attn.k_proj.{part}"], out[f"{b}self_attn.v_proj.{part}"] = q, k, v
                used.add(f"{a}attn.in_proj_{part}")
                for o, n in _BLOCK.items():
                    out[f"{b}{n}.{part}"] = state[f"{a}{o}.{part}"]
                    used.add(f"{a}{o}.{part}")
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"{source} has tensors mozo's OpenAI->transformers mapping does not know: "
                         f"{', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
    return out


def to_openai(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `CLIPModel` names -> OpenAI names (the inverse of `to_hf`; buffers dropped)."""
    out = {old: hf_state[new] for old, new in _RENAMES.items()}
    out.update({old: hf_state[new].t().contiguous() for old, new in _TRANSPOSED.items()})
    for src, dst in _TOWERS:
        for i in range(_count_blocks(hf_state, dst)):
            a, b = f"{src}.{i}.", f"{dst}.{i}."
            for part in ("weight", "bias"):
                out[f"{a}attn.in_proj_{part}"] = torch.cat([hf_state[f"{b}self_attn.{p}_proj.{part}"] for p in "qkv"])
                for o, n in _BLOCK.items():
                    out[f"{a}{o}.{part}"] = hf_state[f"{b}{n}.{part}"]
    return out


def _open_clip_cfg(path: Path) -> dict | None:
    """`model_cfg` of the open_clip_config.json that open_clip's hub repos keep next to the weights."""
    cfg = path.parent / "open_clip_config.json"
    return json.loads(cfg.read_text()).get("model_cfg", {}) if cfg.exists() else None


def _open_clip_heads(path: Path, state: dict) -> tuple[int | None, int | None]:
    """(vision, text) head counts from open_clip_config.json (vision: width // head_width), else (None, None)."""
    cfg = _open_clip_cfg(path)
    if cfg is None:
        return None, None
    width = state["visual.conv1.weight"].shape[0] if "visual.conv1.weight" in state else 0
    return width // cfg.get("vision_cfg", {}).get("head_width", 64) or None, cfg.get("text_cfg", {}).get("heads")


def guess_quick_gelu(path: Path, fmt: str) -> bool:
    """QuickGELU or GELU for a checkpoint whose shapes cannot say (see the module docstring)."""
    cfg = _open_clip_cfg(path)
    if cfg is not None:
        return bool(cfg.get("quick_gelu", False))
    name = path.name.lower()
    if "quickgelu" in name or "openai" in name:
        return True
    if any(hint in name for hint in ("open_clip", "laion", "datacomp")):
        return False
    return fmt != "open_clip"


def load_checkpoint_model(path: str | Path, quick_gelu: bool | None = None):
    """A transformers `CLIPModel` holding the weights of an OpenAI/open_clip checkpoint file, in float32."""
    from transformers import CLIPModel

    path = Path(path).expanduser()
    state, fmt = read_checkpoint(path)
    if quick_gelu is None:
        quick_gelu = guess_quick_gelu(path, fmt)
    config = infer_config(state, quick_gelu, source=f"CLIP checkpoint {path}", heads=_open_clip_heads(path, state))
    with torch.device("meta"):  # no random init of weights that are overwritten right away
        model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(to_hf(state, source=f"CLIP checkpoint {path}"), strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:  # cannot happen for a state dict infer_config accepted; guard the mapping itself
        raise RuntimeError(f"converting {path}: missing {missing}, unexpected {unexpected}")
    for emb in (model.vision_model.embeddings, model.text_model.embeddings):  # non-persistent buffers stay on meta
        emb.position_ids = torch.arange(emb.position_embedding.num_embeddings).expand((1, -1))
    return model.eval()


def checkpoint_tokenizer(path: str | Path, vocab_size: int, tokenizer_dir: str | Path | None = None, local_only: bool = False):
    """The BPE tokenizer of a checkpoint: `tokenizer_dir`, else vocab.json + merges.txt next to the file,
    else (49408-token CLIP vocabularies only) openai/clip-vit-base-patch16's from the hub or its cache."""
    from mozo.backbone.tokenizer import load_tokenizer

    path = Path(path).expanduser()
    folder = Path(tokenizer_dir).expanduser() if tokenizer_dir else path.parent
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return load_tokenizer(folder, expected_vocab=vocab_size)
    hint = (f"a checkpoint file carries no tokenizer: download vocab.json and merges.txt from "
            f"https://huggingface.co/{REAL_TOKENIZER}/tree/main (the one BPE of every OpenAI and open_clip ViT) "
            f"and put them in {folder}, or pass tokenizer_dir= to mozo.backbone.convert.load_checkpoint_parts")
    if tokenizer_dir is not None or vocab_size != 49408:
        raise FileNotFoundError(f"no vocab.json + merges.txt in {folder} for CLIP checkpoint {path}; {hint}")
    try:
        return load_tokenizer(REAL_TOKENIZER, expected_vocab=vocab_size, local_only=local_only)
    except RuntimeError as exc:
        raise FileNotFoundError(f"no tokenizer for CLIP checkpoint {path} ({exc}); {hint}") from exc


def load_checkpoint_parts(path: str | Path, quick_gelu: bool | None = None, tokenizer_dir: str | Path | None = None,
                          local_only: bool = False):
    """(model, tokenizer) of a checkpoint file, with the text tower pooling at the tokenizer's own EOS id."""
    model = load_checkpoint_model(path, quick_gelu)
    tok = checkpoint_tokenizer(path, model.config.text_config.vocab_size, tokenizer_dir, local_only)
    cfg = model.config.text_config
    cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.bos_token_id, tok.pad_token_id
    model.text_model.eos_token_id = tok.eos_token_id  # read at pooling; copied from the config at init
    return model, tok
