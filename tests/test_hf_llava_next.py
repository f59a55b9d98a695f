"""transformers' LLaVA-NeXT with an EVA-CLIP tower at a real tile size (336 / 14), against independent references:
the processor `build_llava_processor(next=True)` gives must be the one llava-hf ships for LLaVA-1.6 (same tiles, same
image token counts), and `build_llava(next=True)` must lay out the features of a LlavaNext built on a CLIP vision config
of the same shapes."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from test_hf_llava import needs_tile_padding, tiny_llama_config, tiny_tokenizer
from llava_evaclip import EvaCLIPVisionConfig
from llava_evaclip.hf import build_llava, build_llava_processor, is_llava_next_available

pytestmark = pytest.mark.skipif(not is_llava_next_available(), reason="LLaVA-NeXT arrived in transformers 4.39")

SIZE, PATCH = 336, 14
SHAPES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
              patch_size=PATCH, projection_dim=16)
# llava-hf/llava-v1.6-*-hf's preprocessor_config.json (OpenAI CLIP's mean / std, bicubic, 336 tiles).
LLAVA_HF_PREPROCESSOR = dict(
    size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, do_center_crop=True, resample=3,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711], do_pad=True,
    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
)
PICTURES = [(300, 1000), (1000, 300), (480, 640), (40, 50)]  # (height, width): every pinpoint shape and a tiny one


def pictures():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in PICTURES]


def _packed_feature_counts(model, inputs):
    """transformers 4.x without an inner LlavaNextModel (seen on 4.43.4-4.47.1: the top model packs the tiles itself;
    4.47's `get_image_features` returns the unpacked tiles): the number of features the model inserts per image, as
    its `pack_image_features` reports them during a forward, and the logits of that forward."""
    counts = []
    original = model.pack_image_features

    def recording(*args, **kwargs):
        packed = original(*args, **kwargs)
        counts.append([int(n) for n in packed[1]])
        return packed

    model.pack_image_features = recording
    try:
        logits = model(**inputs).logits
    finally:
        del model.pack_image_features
    (found,) = counts
    return found, logits


@needs_tile_padding
def test_llava_next_processor_is_llava_hfs_and_the_model_lays_out_as_with_clip():
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    ours = build_llava_processor(EvaCLIPVisionConfig(**SHAPES), tiny_tokenizer(), next=True)
    options = dict(patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    accepted = inspect.signature(LlavaNextProcessor.__init__).parameters  # < 4.45 processors take none of them
    options = {key: value for key, value in options.items() if key in accepted}
    stock = LlavaNextProcessor(image_processor=LlavaNextImageProcessor(**LLAVA_HF_PREPROCESSOR),
                               tokenizer=ours.tokenizer, **options)
    texts = ["<image> a cat"] * len(PICTURES)
    ours_inputs = ours(text=texts, images=pictures(), return_tensors="pt", padding=True)
    stock_inputs = stock(text=texts, images=pictures(), return_tensors="pt", padding=True)
    assert torch.equal(ours_inputs["pixel_values"], stock_inputs["pixel_values"])
    assert torch.equal(ours_inputs["image_sizes"], stock_inputs["image_sizes"])
    assert torch.equal(ours_inputs["input_ids"], stock_inputs["input_ids"])

    text_config = tiny_llama_config(vocab_size=len(ours.tokenizer))
    model = build_llava(EvaCLIPVisionConfig(**SHAPES), text_config, tokenizer=ours.tokenizer, next=True).eval()
    torch.manual_seed(0)
    clip = LlavaNextForConditionalGeneration(LlavaNextConfig(
        vision_config=CLIPVisionConfig(**SHAPES), text_config=text_config, vision_feature_layer=-2,
        image_token_index=model.config.image_token_index,
        image_grid_pinpoints=LLAVA_HF_PREPROCESSOR["image_grid_pinpoints"])).eval()
    assert model.config.image_grid_pinpoints == clip.config.image_grid_pinpoints
    if not hasattr(clip, "model"):  # no inner LlavaNextModel (4.4x): the top model packs the tiles in its forward
        with torch.no_grad():
            ours_counts, logits = _packed_feature_counts(model, ours_inputs)
            clip_counts, _ = _packed_feature_counts(clip, stock_inputs)
        assert ours_counts == clip_counts
        if "patch_size" in accepted:  # processors that expand it
            image_token = model.config.image_token_index
            assert [int(n) for n in (ours_inputs["input_ids"] == image_token).sum(dim=1)] == ours_counts
            assert logits.shape[:2] == ours_inputs["input_ids"].shape
        else:  # < 4.45: the model puts each image's features in place of its one token
            assert logits.shape[:2] == (len(PICTURES), ours_inputs["input_ids"].shape[1] - 1 + max(ours_counts))
        assert torch.isfinite(logits).all()
        return
    with torch.no_grad():
        ours_features = model.get_image_features(ours_inputs["pixel_values"], ours_inputs["image_sizes"],
                                                 vision_feature_layer=-2, vision_feature_select_strategy="default")
        clip_features = clip.get_image_features(stock_inputs["pixel_values"], stock_inputs["image_sizes"],
                                                vision_feature_layer=-2, vision_feature_select_strategy="default")
        ours_features = getattr(ours_features, "pooler_output", ours_features)
        clip_features = getattr(clip_features, "pooler_output", clip_features)
        assert [tuple(f.shape) for f in ours_features] == [tuple(f.shape) for f in clip_features]
        if "patch_size" in inspect.signature(LlavaNextProcessor.__init__).parameters:  # processors that expand it
            image_token = model.config.image_token_index
            assert [int(n) for n in (ours_inputs["input_ids"] == image_token).sum(dim=1)] == [
                f.shape[0] for f in ours_features]
        logits = model(**ours_inputs).logits
    assert logits.shape[:2] == ours_inputs["input_ids"].shape and torch.isfinite(logits).all()


def test_llava_next_processor_refuses_the_full_strategy_as_the_model_does():
    """transformers' LlavaNext cannot run 'full' on a tower with a CLS token (shown with CLIP's), and build_llava
    refuses it with next=True: the processor must not take it either (it would count a CLS token per tile)."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    shapes = dict(SHAPES, image_size=56)
    pinpoints = [[56, 112], [112, 56], [112, 112]]
    processor = build_llava_processor(EvaCLIPVisionConfig(**shapes), tiny_tokenizer(), next=True,
                                      image_grid_pinpoints=pinpoints)
    reference = LlavaNextForConditionalGeneration(LlavaNextConfig(
        vision_config=CLIPVisionConfig(**shapes), text_config=tiny_llama_config(vocab_size=len(processor.tokenizer)),
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="full",
        image_grid_pinpoints=pinpoints)).eval()
    inputs = processor(text=["<image> a cat"], images=pictures()[:1], return_tensors="pt")
    with pytest.raises((RuntimeError, ValueError)), torch.no_grad():
        if hasattr(reference, "model"):  # 5.x: the inner LlavaNextModel's get_image_features packs the tiles
            reference.get_image_features(inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=-2,
                                         vision_feature_select_strategy="full")
        else:  # 4.4x: the forward packs the tiles (4.47's get_image_features returns them unpacked)
            reference(**inputs)
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default' with next=True"):
        build_llava_processor(EvaCLIPVisionConfig(**shapes), tiny_tokenizer(), next=True,
                              vision_feature_select_strategy="full")
