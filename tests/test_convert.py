"""OpenAI `clip` / open_clip checkpoint files loaded through `load_backbone(PATH)` (backbone/convert.py).

No `clip` or `open_clip` package is installed: the tests write a known tiny CLIPModel's weights in
their formats themselves (OpenAI names via `to_openai`; a TorchScript archive; open_clip's
``{"state_dict": {"module." + name}}`` wrapping) and check that mozo's loader gives back the same features.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from mozo.backbone.clip import builtin_tokenizer_dir, load_backbone
from mozo.backbone.convert import REQUIRED, infer_config, read_checkpoint, to_hf, to_openai
from mozo.backbone.tokenizer import load_tokenizer
from conftest import PROMPTS

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


def _tiny_hf(act: str, seed: int = 3):
    """A random CLIPModel with OpenAI's conventions (head width 64, eos = last id), non-trivial norms."""
    from transformers import CLIPConfig, CLIPModel

    tok = load_tokenizer(builtin_tokenizer_dir())
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, hidden_act=act)
    cfg = CLIPConfig(text_config=dict(common, vocab_size=len(tok), max_position_embeddings=16, eos_token_id=tok.eos_token_id,
                                      bos_token_id=tok.bos_token_id, pad_token_id=tok.eos_token_id),
                     vision_config=dict(common, image_size=32, patch_size=8), projection_dim=48)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # LayerNorms init to (1, 0): perturb so a swapped weight/bias would show
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, tok


def _openai_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in to_openai(model.state_dict()).items()}


class _Holder(nn.Module):
    """Parameters under dotted OpenAI names, so `torch.jit.script(...).state_dict()` has the `clip` keys."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        for key, value in state.items():
            *path, leaf = key.split(".")
            mod = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, nn.Module())
                mod = getattr(mod, part)
            if value.is_floating_point():
                mod.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
            else:
                mod.register_buffer(leaf, value.clone())

    def forward(self) -> torch.Tensor:
        return self.logit_scale


def _features(model, tok, context: int):
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    enc = tok(PROMPTS, padding="max_length", max_length=context, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
    return img, txt


def _openai_forward(sd: dict[str, torch.Tensor], pixels: torch.Tensor, ids: torch.Tensor, heads: int, quick_gelu: bool = True):
    """OpenAI's own CLIP maths (clip/model.py: VisionTransformer, Transformer, encode_text) on OpenAI-named
    weights: an independent check of the renaming, the q/k/v split and the projection transposes."""
    import torch.nn.functional as F

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])

    def blocks(x, prefix, mask):  # x: (L, N, D) as in OpenAI's code
        i = 0
        while f"{prefix}.{i}.ln_1.weight" in sd:
            b = f"{prefix}.{i}."
            h = ln(x, b + "ln_1")
            x = x + F.multi_head_attention_forward(
                h, h, h, x.shape[-1], heads, sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"], None, None, False, 0.0,
                sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"], training=False, need_weights=False, attn_mask=mask)[0]
            h = F.linear(ln(x, b + "ln_2"), sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])
            h = h * torch.sigmoid(1.702 * h) if quick_gelu else F.gelu(h)
            x = x + F.linear(h, sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
            i += 1
        return x

    patch = sd["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch).flatten(2).permute(0, 2, 1)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + sd["visual.positional_embedding"]
    x = blocks(ln(x, "visual.ln_pre").permute(1, 0, 2), "visual.transformer.resblocks", None).permute(1, 0, 2)
    img = ln(x[:, 0, :], "visual.ln_post") @ sd["visual.proj"]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    t = ln(blocks(t.permute(1, 0, 2), "transformer.resblocks", causal).permute(1, 0, 2), "ln_final")
    txt = t[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]
    return img, txt


def test_converted_model_matches_openai_maths(quick):
    model, tok = quick
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = tok(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = _openai_forward(to_openai(model.state_dict()), pixels, ids, heads=2)
    for g, w in zip(_features(model, tok, 16), want):
        assert (g - w).abs().max() <= TOL


def _with_tokenizer(folder):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(builtin_tokenizer_dir() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def quick():
    return _tiny_hf("quick_gelu")


def test_mapping_round_trips_both_directions(quick):
    model, _ = quick
    hf = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    openai = to_openai(hf)
    back = to_hf(openai)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    again = to_openai(back)
    assert set(again) == set(openai) and all(torch.equal(again[k], openai[k]) for k in openai)
    # OpenAI's layout: fused q/k/v rows, projections stored (width, embed).
    assert openai["visual.transformer.resblocks.1.attn.in_proj_weight"].shape == (384, 128)
    assert openai["visual.proj"].shape == (128, 48) and openai["text_projection"].shape == (128, 48)
    cfg = infer_config(openai)
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.vision_config.num_attention_heads) == (32, 8, 2)
    assert (cfg.text_config.max_position_embeddings, cfg.text_config.vocab_size, cfg.projection_dim) == (16, len(quick[1]), 48)
    assert cfg.text_config.hidden_act == "quick_gelu"


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "safetensors"])
def test_openai_checkpoint_loads_with_identical_features(quick, fmt, tmp_path):
    model, tok = quick
    state = _openai_state(model)
    state["input_resolution"] = torch.tensor(32)  # the `clip` archives carry these scalars; they must be skipped
    state["context_length"] = torch.tensor(16)
    path = _with_tokenizer(tmp_path) / {"state_dict": "ViT-T-8.pt", "torchscript": "ViT-T-8-jit.pt", "safetensors": "w.safetensors"}[fmt]
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(_Holder(state)), str(path))
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save(state, path)
    assert read_checkpoint(path)[1] == ("torchscript" if fmt == "torchscript" else "openai")
    bb = load_backbone(str(path))
    assert bb.model.config.vision_config.hidden_act == "quick_gelu"
    assert not any(p.requires_grad for p in bb.model.parameters()) and not bb.model.training
    assert bb.image_size == 32 and bb.context_length == 16
    got, want = _features(bb.model, bb.tokenizer, 16), _features(model, tok, 16)
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= TOL
    # Through mozo's own tokenize + towers, too.
    assert torch.equal(bb.tokenize(PROMPTS)["input_ids"], tok(PROMPTS, padding="max_length", max_length=16, return_tensors="pt")["input_ids"])


def test_open_clip_wrapped_checkpoint_uses_gelu(tmp_path):
    model, tok = _tiny_hf("gelu", seed=5)
    wrapped = {"epoch": 3, "name": "tiny", "state_dict": {"module." + k: v for k, v in _openai_state(model).items()}}
    path = _with_tokenizer(tmp_path) / "epoch_3.pt"
    torch.save(wrapped, path)
    bb = load_backbone(str(path))
    assert bb.model.config.text_config.hidden_act == "gelu"  # open_clip wrapper -> GELU by default
    for g, w in zip(_features(bb.model, tok, 16), _features(model, tok, 16)):
        assert (g - w).abs().max() <= TOL


def test_open_clip_config_and_filename_pick_the_activation(quick, tmp_path):
    from mozo.backbone.convert import guess_quick_gelu

    assert guess_quick_gelu(tmp_path / "open_clip_pytorch_model.bin", "openai") is False
    assert guess_quick_gelu(tmp_path / "ViT-B-16-quickgelu-laion.pt", "open_clip") is True
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    assert guess_quick_gelu(tmp_path / "open_clip_pytorch_model.bin", "open_clip") is True


def test_bad_checkpoints_name_the_file_and_what_is_missing(quick, tmp_path):
    model, _ = quick
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="garbage.pt"):
        load_backbone(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_backbone(str(tmp_path / "nope.pt"))
    state = _openai_state(model)
    del state["visual.proj"], state["ln_final.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial\.pt.*missing visual\.proj, ln_final\.weight|partial\.pt.*missing ln_final\.weight, visual\.proj"):
        load_backbone(str(tmp_path / "partial.pt"))
    state = _openai_state(model)
    state["visual.attn_pool.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="extra.pt.*visual.attn_pool.weight"):
        load_backbone(str(tmp_path / "extra.pt"))
    assert set(REQUIRED) <= set(_openai_state(model))


def test_missing_tokenizer_says_where_to_get_it(quick, tmp_path):
    model, _ = quick
    torch.save(_openai_state(model), tmp_path / "ViT-T-8.pt")  # no vocab.json next to it; vocab != 49408
    with pytest.raises(FileNotFoundError, match="vocab.json.*merges.txt.*openai/clip-vit-base-patch16"):
        load_backbone(str(tmp_path / "ViT-T-8.pt"))


# -- MoE-Adapters4CL adapter import (mozo/peft/import_moe_adapters.py) ----------------------------

def _reference_adapters(layers: int = 4, width: int = 64, experts: int = 3, rank: int = 8, tasks: int = 2, seed: int = 0):
    """Adapter tensors in the reference's naming, every one random (routers too, so routing is exercised)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for tower in ("visual.transformer.resblocks", "transformer.resblocks"):
        for i in range(layers):
            b = f"{tower}.{i}."
            out[b + "mean"], out[b + "std"] = torch.tensor([0.0]), torch.tensor([1.0])
            for e in range(experts):
                out[f"{b}adaptmlp_list.{e}.down_proj.weight"] = torch.randn(rank, width, generator=g) * 0.1
                out[f"{b}adaptmlp_list.{e}.down_proj.bias"] = torch.randn(rank, generator=g) * 0.1
                out[f"{b}adaptmlp_list.{e}.up_proj.weight"] = torch.randn(width, rank, generator=g) * 0.1
                out[f"{b}adaptmlp_list.{e}.up_proj.bias"] = torch.randn(width, generator=g) * 0.1
            for t in range(tasks):
                out[f"{b}router_list.{t}"] = torch.randn(width, experts, generator=g)
                out[f"{b}w_noise_list.{t}"] = torch.randn(width, experts, generator=g)
    return out


def _reference_moe(sd: dict, block: str, task: int, x: torch.Tensor, top_k: int, experts: int) -> torch.Tensor:
    """The reference ResidualAttentionBlock's adapter output in eval (clean top-k gates, scale 0.1)."""
    logits = x[:, 0, :] @ sd[f"{block}.router_list.{task}"]
    top, idx = logits.topk(top_k, dim=1)
    gates = torch.zeros_like(logits).scatter(1, idx, top.softmax(1))
    y = torch.zeros_like(x)
    for e in range(experts):
        a = f"{block}.adaptmlp_list.{e}."
        h = torch.relu(x @ sd[a + "down_proj.weight"].t() + sd[a + "down_proj.bias"])
        y = y + gates[:, e, None, None] * ((h @ sd[a + "up_proj.weight"].t() + sd[a + "up_proj.bias"]) * 0.1)
    return y


def test_moe_adapters_import_matches_reference_routing(make_model, tmp_path):
    from mozo.peft.import_moe_adapters import load_moe_adapters

    ref = _reference_adapters()
    path = tmp_path / "ImageNet.pth"  # the reference's utils.torch_save wrapping, from a DataParallel model
    torch.save({"state_dict": {"module." + k: v for k, v in ref.items()}}, path)
    model = make_model(kind="moe", num_experts=3, top_k=2, rank=8).eval()
    load_moe_adapters(model, str(path), task=1)
    unit = model.unit("language", 3)
    assert torch.equal(unit.w_gate, ref["transformer.resblocks.2.router_list.1"])
    assert torch.equal(unit.experts[2].up.weight, ref["transformer.resblocks.2.adaptmlp_list.2.up_proj.weight"])
    x = torch.randn(5, 7, 64, generator=torch.Generator().manual_seed(2))
    for modality, block in (("vision", "visual.transformer.resblocks.0"), ("language", "transformer.resblocks.3")):
        layer = int(block.rsplit(".", 1)[1]) + 1
        with torch.no_grad():
            got = model.unit(modality, layer)(x)
        want = _reference_moe(ref, block, 1, x, top_k=2, experts=3)
        assert (got - want).abs().max() <= 1e-6


def test_moe_adapters_import_refuses_mismatches(make_model):
    from mozo.peft.import_moe_adapters import load_moe_adapters

    ref = _reference_adapters()
    with pytest.raises(ValueError, match="num_experts"):
        load_moe_adapters(make_model(kind="moe", num_experts=2, rank=8), ref)
    with pytest.raises(ValueError, match="peft.moe.scale"):
        load_moe_adapters(make_model(kind="moe", num_experts=3, rank=8, scale=0.2), ref)
    with pytest.raises(ValueError, match="kind='moe'"):
        load_moe_adapters(make_model(kind="lora"), ref)
    with pytest.raises(ValueError, match="task 5 out of range"):
        load_moe_adapters(make_model(kind="moe", num_experts=3, rank=8), ref, task=5)
    with pytest.raises(ValueError, match="no MoE-Adapters tensors"):
        load_moe_adapters(make_model(kind="moe"), {"logit_scale": torch.tensor(1.0)})


def test_backbone_loader_skips_moe_adapters_tensors(quick, tmp_path):
    model, tok = quick
    state = _openai_state(model)
    state.update({k: v for k, v in _reference_adapters(layers=2, width=128).items()})
    path = _with_tokenizer(tmp_path) / "ViT-T-8-moe.pt"
    torch.save({"state_dict": state}, path)
    with pytest.warns(UserWarning, match="MoE-Adapters4CL tensors"):
        bb = load_backbone(str(path))
    assert bb.model.config.text_config.hidden_act == "quick_gelu"  # the reference code runs OpenAI's CLIP
    for g, w in zip(_features(bb.model, tok, 16), _features(model, tok, 16)):
        assert (g - w).abs().max() <= TOL


def test_converted_backbone_runs_through_mozo_towers(quick, tmp_path):
    """MozoCLIP runs the towers itself: with fresh (zero-output) MoE units it must give the original features."""
    import torch.nn.functional as F
    from mozo.peft.inject import MozoCLIP, PeftConfig

    model, tok = quick
    torch.save(_openai_state(model), _with_tokenizer(tmp_path) / "ViT-T-8.pt")
    bb = load_backbone(str(tmp_path / "ViT-T-8.pt"))
    mz = MozoCLIP(bb, PeftConfig.of("moe", rank=8)).eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = mz.encode_images(pixels), mz.encode_texts(bb.tokenize(PROMPTS, padding="longest"))
    for g, w in zip(got, _features(model, tok, 16)):
        assert (g - F.normalize(w, dim=-1)).abs().max() <= TOL


def test_real_size_vocabulary_without_tokenizer_files_fails_offline_with_a_hint(tmp_path, monkeypatch):
    import mozo.backbone.convert as convert

    monkeypatch.setattr(convert, "REAL_TOKENIZER", "mozo-test/no-such-tokenizer")  # never in any cache
    with pytest.raises(FileNotFoundError, match=r"vocab\.json and merges\.txt from https://huggingface\.co/"):
        convert.checkpoint_tokenizer(tmp_path / "ViT-B-16.pt", 49408, local_only=True)
    with pytest.raises(FileNotFoundError, match="no vocab.json"):
        convert.checkpoint_tokenizer(tmp_path / "ViT-B-16.pt", 49408, tokenizer_dir=tmp_path)
    # A tokenizer folder given explicitly is used.
    assert len(convert.checkpoint_tokenizer(tmp_path / "x.pt", 10**6, tokenizer_dir=builtin_tokenizer_dir())) > 100


@pytest.mark.slow
def test_vit_b16_geometry_fp16_torchscript_round_trip(tmp_path):
    """The shape of the real `clip` ViT-B-16.pt: a TorchScript archive of fp16 weights, 224 px, 12+12 layers."""
    model = load_backbone("vit-b-16").model
    half = {k: v.half() for k, v in to_openai(model.state_dict()).items()}
    half["input_resolution"], half["context_length"], half["vocab_size"] = torch.tensor(224), torch.tensor(77), torch.tensor(0)
    path = _with_tokenizer(tmp_path) / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(_Holder(half)), str(path))
    del half
    bb = load_backbone(str(path))
    v, t = bb.model.config.vision_config, bb.model.config.text_config
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (224, 16, 768, 12, 12, 3072)
    assert (t.max_position_embeddings, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, bb.model.config.projection_dim) == (77, 512, 12, 8, 512)
    assert bb.image_size == 224 and bb.context_length == 77 and v.hidden_act == t.hidden_act == "quick_gelu"
    got = bb.model.state_dict()
    for k, w in model.state_dict().items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], w.half().float()), k
