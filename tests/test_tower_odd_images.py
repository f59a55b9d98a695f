"""Odd images (1x1, 1xN / Nx1 strips, 3 pixels high, extreme aspect ratios) through LLaVA's own image paths with the
EVA-CLIP tower, against the same paths with a CLIP tower whose processor is OpenAI's preprocessor_config.json: LLaVA's
`process_images` ("pad" with `expand2square`, "anyres" with its grid pinpoints, the plain square path) must give the
same pixels, or fail with the same error (transformers 4.37 reads an image 1 pixel high as channels-first, on either
tower), and `prepare_inputs_labels_for_multimodal` ("spatial_unpad") as many image tokens; the tower's features on the
tiles are the vision model's hidden states. LLaVA-NeXT's paths (anyres_max_9, string pinpoints, video) run on
transformers 4.x only, in tests/test_llava_next.py."""

from __future__ import annotations

import json
import types
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("llava", reason="LLaVA's code (pip install --no-deps llava-torch) is needed for these tests")
pytestmark = pytest.mark.usefixtures("llava_registered")

from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from llava.mm_utils import process_images  # noqa: E402
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from llava_evaclip import (  # noqa: E402
    EvaCLIPVisionConfig,
    EvaCLIPVisionModel,
    EvaCLIPVisionTower,
)
from llava_evaclip.processing import EVA_CLIP_MEAN, EVA_CLIP_STD, build_image_processor  # noqa: E402

SIZE, PATCH = 336, 14  # a real tile size: LLaVA's anyres pinpoints are multiples of it
PINPOINTS = [[SIZE, SIZE], [SIZE, 2 * SIZE], [2 * SIZE, SIZE], [2 * SIZE, 2 * SIZE], [SIZE, 3 * SIZE], [3 * SIZE, SIZE]]
ODD_SIZES = [(1, 1), (3, 3), (1, 4000), (4000, 1), (1, 3), (3, 1), (3, 100), (100, 3), (7, 2000), (2000, 7)]  # (w, h)
# LLaVA's plain path resizes the shortest edge to 336: a 1x4000 strip becomes 336x1344000 there (seconds of resizing;
# `llava-evaclip features` is checked on it in tests/test_image_files.py), so that path takes the smaller ones only.
SQUARE_PATH_MAX_SIDE = 100
PATHS = {  # image_aspect_ratio -> mm_patch_merge_type
    "square": "flat",
    "pad": "flat",
    "anyres": "spatial_unpad",
}


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, str]:
    """2-layer EVA-CLIP (with the processor our converter saves) and CLIP towers at 336 / 14; the CLIP one with
    OpenAI's clip-vit-large-patch14-336 preprocessor_config.json as published (sizes as ints)."""
    root = tmp_path_factory.mktemp("odd_images")
    shapes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
                  patch_size=PATCH, projection_dim=16)
    torch.manual_seed(5)
    config = EvaCLIPVisionConfig(use_rope=True, rope_pt_grid_size=SIZE // PATCH, use_swiglu=True,
                                 use_sub_layernorm=True, **shapes)
    EvaCLIPVisionModel(config).save_pretrained(root / "eva")
    build_image_processor(config).save_pretrained(root / "eva")
    CLIPVisionModel(CLIPVisionConfig(**shapes)).save_pretrained(root / "clip")
    (root / "clip" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(EVA_CLIP_MEAN),
        "image_std": list(EVA_CLIP_STD), "resample": 3, "size": SIZE}))
    return {"eva": str(root / "eva"), "clip": str(root / "clip")}


def build(tower: str, aspect: str) -> LlavaLlamaForCausalLM:
    """A tiny LLaVA whose vision modules come from LLaVA's own initialize_vision_modules."""
    torch.manual_seed(0)
    model = LlavaLlamaForCausalLM(LlavaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=4, num_key_value_heads=4,
                                              max_position_embeddings=4096))
    model.get_model().initialize_vision_modules(types.SimpleNamespace(
        vision_tower=tower, mm_vision_select_layer=-2, mm_vision_select_feature="patch", pretrain_mm_mlp_adapter=None,
        mm_patch_merge_type=PATHS[aspect], mm_projector_type="linear"))
    model.config.image_aspect_ratio = aspect
    model.config.image_grid_pinpoints = PINPOINTS
    return model.eval()


def outcome(model: LlavaLlamaForCausalLM, picture: Image.Image) -> tuple[Any, ...]:
    """(pixels, image tokens) of LLaVA's preprocessing and input preparation, or the error either raised."""
    try:
        images = process_images([picture], model.get_vision_tower().image_processor, model.config)
    except Exception as error:  # noqa: BLE001 - the error itself is what is compared
        return "process_images", type(error).__name__, str(error)
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 6]])
    with torch.no_grad():
        mask = model.prepare_inputs_labels_for_multimodal(ids, None, torch.ones_like(ids, dtype=torch.bool), None,
                                                          ids.clone(), images, image_sizes=[picture.size])[2]
    return images, int(mask.sum()) - 2


@pytest.mark.parametrize("aspect", list(PATHS))
def test_odd_images_as_llava_with_clips_processor(towers, aspect):
    eva, clip = build(towers["eva"], aspect), build(towers["clip"], aspect)
    assert isinstance(eva.get_vision_tower(), EvaCLIPVisionTower)
    generator = np.random.default_rng(0)
    for width, height in ODD_SIZES:
        if aspect == "square" and max(width, height) > SQUARE_PATH_MAX_SIDE:
            continue
        picture = Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ours, reference = outcome(eva, picture), outcome(clip, picture)
        where = f"{aspect}, {width}x{height}"
        if isinstance(reference[0], str):
            assert ours == reference, where
            continue
        assert not isinstance(ours[0], str), f"{where}: {ours} where CLIP's path gives pixels"
        assert ours[0].shape == reference[0].shape and torch.equal(ours[0], reference[0]), where
        assert ours[1] == reference[1], where


def test_features_on_anyres_tiles_of_a_strip_are_the_hidden_states(towers):
    model = build(towers["eva"], "anyres")
    tower = model.get_vision_tower()
    reference = EvaCLIPVisionModel.from_pretrained(towers["eva"]).eval()
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (7, 2000, 3), dtype=np.uint8))
    tiles = process_images([picture], tower.image_processor, model.config)[0]
    assert tiles.shape[0] == 4  # the base image and the 3x1 grid
    with torch.no_grad():
        assert torch.equal(tower(tiles), reference(tiles, output_hidden_states=True).hidden_states[-2][:, 1:])
