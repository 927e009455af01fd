"""Backbone loading through the user-facing code path, its failure messages, and the tower forwards."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from mozo.backbone.clip import builtin_tokenizer_dir, load_backbone, synthetic_config
from mozo.backbone.tokenizer import load_tokenizer
from conftest import PROMPTS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory):
    """A tiny random CLIPModel written by save_pretrained: `full` (with tokenizer) and `weights_only`."""
    from transformers import CLIPModel

    tok = load_tokenizer(builtin_tokenizer_dir())
    torch.manual_seed(7)
    model = CLIPModel(synthetic_config("tiny", len(tok), tok.eos_token_id, tok.bos_token_id)).eval()
    root = tmp_path_factory.mktemp("clip")
    model.save_pretrained(root / "full")
    tok.save_pretrained(root / "full")
    model.save_pretrained(root / "weights_only")
    return model, tok, root


def test_load_save_pretrained_folder_gives_identical_features(saved_clip):
    ref, tok, root = saved_clip
    bb = load_backbone(str(root / "full"))
    # Frozen and in eval mode, as documented.
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert not bb.model.training
    assert bb.image_size == 32 and bb.context_length == 32
    assert len(bb.tokenizer) == len(tok)
    ids = bb.tokenize(PROMPTS)
    assert torch.equal(ids["input_ids"], tok(PROMPTS, padding="max_length", max_length=32, return_tensors="pt")["input_ids"])
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got_i = bb.model.get_image_features(pixel_values=pixels).pooler_output
        want_i = ref.get_image_features(pixel_values=pixels).pooler_output
        got_t = bb.model.get_text_features(**ids).pooler_output
        want_t = ref.get_text_features(**ids).pooler_output
    assert torch.equal(got_i, want_i)
    assert torch.equal(got_t, want_t)
    assert torch.equal(bb.model.visual_projection.weight, ref.visual_projection.weight)


def test_folder_without_config_names_the_folder(tmp_path):
    folder = tmp_path / "empty_model"
    folder.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_backbone(str(folder))
    assert str(folder) in str(err.value)
    assert "config.json" in str(err.value)


def test_folder_without_tokenizer_fails_on_vocabulary_size(saved_clip):
    _, tok, root = saved_clip
    with pytest.raises(RuntimeError) as err:
        load_backbone(str(root / "weights_only"))
    msg = str(err.value)
    assert "tokenizer" in msg
    # The vocabulary-size check fired (transformers hands back a stub instead of raising).
    assert f"the model's text embedding has {len(tok)}" in msg
    assert str(root / "weights_only") in msg


def test_hub_id_offline_local_only_is_a_clear_error():
    from huggingface_hub import try_to_load_from_cache

    hub_id = "openai/clip-vit-base-patch16"
    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        pytest.skip(f"{hub_id} is in the local Hugging Face cache")
    with pytest.raises(RuntimeError) as err:
        load_backbone(hub_id, local_only=True)
    assert hub_id in str(err.value)


@pytest.mark.parametrize("kind", ["moe", "adapter", "lora"])
def test_tower_forward_equals_transformers_with_fresh_units(make_model, kind):
    model = make_model(kind=kind)
    clip = model.clip
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = model.backbone.tokenize(PROMPTS + ["a bad photo of the big dark blue square with stripes"])
    for mode in (False, True):  # fresh units add exactly 0, with and without dropout / router noise
        model.train(mode)
        with torch.no_grad():
            img = model.encode_images(pixels)
            txt = model.encode_texts(text)
            ref_img = F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
            ref_txt = F.normalize(clip.get_text_features(**text).pooler_output, dim=-1)
        torch.testing.assert_close(img, ref_img, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(txt, ref_txt, rtol=1e-5, atol=1e-6)
    # Sanity: the comparison is sensitive: a non-zero unit changes the features.
    from conftest import randomize_units

    randomize_units(model, std=0.1)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model.encode_images(pixels), ref_img, atol=1e-4)
        assert not torch.allclose(model.encode_texts(text), ref_txt, atol=1e-4)


def test_encode_from_prefix_cache_equals_full_forward(make_model):
    from conftest import randomize_units

    model = make_model(kind="moe")
    randomize_units(model)
    model.eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    text = model.backbone.tokenize(PROMPTS)
    with torch.no_grad():
        for modality, inputs in (("vision", {"pixel_values": pixels}), ("language", text)):
            full, _ = model.encode(modality, inputs)
            for layer in range(model.num_layers(modality)):  # up to the top layer, which runs on pooled rows only
                feats, cached = model.encode(modality, inputs, capture_at=layer)
                assert cached.layer == layer
                resumed, _ = model.encode(modality, start=cached)
                assert torch.equal(full, feats)
                torch.testing.assert_close(resumed, full, rtol=0, atol=1e-6)


def test_prompts_padded_to_the_longest_give_the_same_features(make_model):
    from conftest import randomize_units

    model = make_model(kind="moe")
    randomize_units(model, std=0.1)
    model.eval()
    prompts = PROMPTS + ["a bad photo of the big dark blue square with stripes"]
    full = model.backbone.tokenize(prompts)
    short = model.backbone.tokenize(prompts, padding="longest")
    assert full["input_ids"].shape[1] == model.backbone.context_length
    assert short["input_ids"].shape[1] == int(full["attention_mask"].sum(1).max()) < full["input_ids"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_texts(short), model.encode_texts(full), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="prompt padding 'shortest'"):
        model.backbone.tokenize(prompts, padding="shortest")
    side = model.backbone.tokenizer.padding_side
    try:  # a tokenizer saved with left padding still pads on the right here (CLIP's positions need it)
        model.backbone.tokenizer.padding_side = "left"
        for padding, want in (("max_length", full), ("longest", short)):
            got = model.backbone.tokenize(prompts, padding=padding)
            assert all(torch.equal(got[k], want[k]) for k in want)
    finally:
        model.backbone.tokenizer.padding_side = side


def test_run_config_rejects_an_unknown_prompt_padding():
    from mozo.engine.config import ConfigError, load_config

    assert load_config("demo", ["data.prompt_padding=longest"]).data.prompt_padding == "longest"
    with pytest.raises(ConfigError, match="data.prompt_padding must be one of max_length, longest"):
        load_config("demo", ["data.prompt_padding=short"])
