"""LLaVA's S2 multi-scale option on the EVA-CLIP tower, against a plain tile-by-tile computation of S2's recipe."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from llava_evaclip import EvaCLIPModel, EvaCLIPVisionTower
from llava_evaclip.processing import build_image_processor

BASE, GRID, WIDTH, NUM_LAYERS = 28, 4, 32, 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(3)
    config = tiny_config("eva02")
    model = EvaCLIPModel(config).eval()
    path = tmp_path_factory.mktemp("evaclip_s2")
    model.save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    return str(path), model


def s2_args(scales: str, **fields) -> types.SimpleNamespace:
    fields.setdefault("mm_vision_select_layer", -2)
    return types.SimpleNamespace(s2=True, s2_scales=scales, **fields)


def reference_s2(
    model, images: torch.Tensor, scales: list[int], layers: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """S2 spelled out: per scale, bicubic resize (to whole tiles), run every BASE x BASE tile on its own, paste its
    patch grid in place, average-pool the stitched grid down to GRID x GRID, and concatenate the scales on channels.
    Returns (CLS averaged over tiles [B, C*S], patches [B, GRID*GRID, C*S])."""
    batch = images.shape[0]
    channels = WIDTH * len(layers)
    grids, cls_tokens = [], []
    for scale in scales:
        splits = math.ceil(scale / BASE)
        resized = F.interpolate(images, size=(scale, scale), mode="bicubic")
        resized = F.interpolate(resized, size=(splits * BASE,) * 2, mode="bicubic")
        stitched = torch.zeros(batch, channels, splits * GRID, splits * GRID)
        cls_sum = torch.zeros(batch, channels)
        for row in range(splits):
            for col in range(splits):
                tile = resized[:, :, row * BASE : (row + 1) * BASE, col * BASE : (col + 1) * BASE]
                with torch.no_grad():
                    states = model.vision_model(tile, output_hidden_states=True).hidden_states
                tokens = torch.cat([states[k] for k in layers], dim=-1)
                cls_sum += tokens[:, 0]
                patch_grid = tokens[:, 1:].reshape(batch, GRID, GRID, channels).permute(0, 3, 1, 2)
                stitched[:, :, row * GRID : (row + 1) * GRID, col * GRID : (col + 1) * GRID] = patch_grid
        if scale % BASE == 0:
            pooled = F.avg_pool2d(stitched, kernel_size=splits)
        else:  # the tiles covered more than the image: first back to the image's own grid, then to the base grid
            kept = math.ceil(scale / (splits * BASE) * splits * GRID)
            pooled = F.adaptive_avg_pool2d(F.adaptive_avg_pool2d(stitched, kept), GRID)
        grids.append(pooled)
        cls_tokens.append(cls_sum / splits**2)
    return torch.cat(cls_tokens, dim=-1), torch.cat(grids, dim=1).flatten(2).transpose(1, 2)


@pytest.mark.parametrize(
    "scales, select_layer, layers",
    [("28,56,84", -2, [2]), ("56,28", "-1,1", [3, 1]), ("28,42", 0, [0])],
)
def test_s2_matches_tile_by_tile_reference(model_dir, scales, select_layer, layers):
    path, model = model_dir
    tower = EvaCLIPVisionTower(path, s2_args(scales, mm_vision_select_layer=select_layer))
    sizes = sorted(int(s) for s in scales.split(","))
    images = torch.randn(2, 3, sizes[-1], sizes[-1])
    features = tower(images)
    _, expected = reference_s2(model, images, sizes, layers)
    assert features.shape == (2, GRID * GRID, WIDTH * len(layers) * len(sizes)) == expected.shape
    assert tower.hidden_size == features.shape[-1]
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)


def test_s2_cls_is_the_mean_over_tiles(model_dir):
    path, model = model_dir
    tower = EvaCLIPVisionTower(path, s2_args("28,56", mm_vision_select_feature="cls_patch"))
    images = torch.randn(2, 3, 56, 56)
    features = tower(images)
    cls_token, patches = reference_s2(model, images, [28, 56], [2])
    assert features.shape == (2, 1 + GRID * GRID, 2 * WIDTH)
    torch.testing.assert_close(features[:, 0], cls_token, rtol=0, atol=1e-5)
    torch.testing.assert_close(features[:, 1:], patches, rtol=0, atol=1e-5)
    only_cls = EvaCLIPVisionTower(path, s2_args("28,56", mm_vision_select_feature="cls"))(images)
    torch.testing.assert_close(only_cls[:, 0], cls_token, rtol=0, atol=1e-5)


def test_s2_processor_counts_and_dtype(model_dir):
    path, _ = model_dir
    tower = EvaCLIPVisionTower(path, s2_args("28,56,84"))
    processor = tower.image_processor
    assert processor.size["shortest_edge"] == 84
    assert processor.crop_size["height"] == processor.crop_size["width"] == 84
    assert tower.num_patches_per_side == GRID and tower.num_patches == GRID * GRID
    assert tower.hidden_size == 3 * WIDTH and tower.dummy_feature.shape == (1, 3 * WIDTH)
    from PIL import Image

    pixel_values = processor(Image.new("RGB", (120, 90), (10, 200, 30)), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 84, 84)
    features = tower(pixel_values.to(torch.bfloat16))
    assert features.dtype == torch.bfloat16 and features.shape == (1, GRID * GRID, 3 * WIDTH)
    as_list = tower([pixel_values[0]])
    assert len(as_list) == 1 and as_list[0].shape == (1, GRID * GRID, 3 * WIDTH)
    # The processor saved in the dir is left as it was.
    plain = EvaCLIPVisionTower(path, types.SimpleNamespace(mm_vision_select_layer=-2))
    assert plain.image_processor.crop_size["height"] == 28


def test_s2_delay_load_and_frozen(model_dir):
    path, _ = model_dir
    tower = EvaCLIPVisionTower(path, s2_args("28,56"), delay_load=True)
    assert not tower.is_loaded and tower.hidden_size == 2 * WIDTH and tower.num_patches == GRID * GRID
    tower.load_model()
    assert tower.image_processor.crop_size["height"] == 56
    assert not tower(torch.randn(1, 3, 56, 56)).requires_grad


def test_s2_bad_input(model_dir):
    path, _ = model_dir
    with pytest.raises(ValueError, match="must start at the tower's image size 28"):
        EvaCLIPVisionTower(path, s2_args("336,672,1008"), delay_load=True)
    for scales in ("abc", "28,,56", "0,28", "28,28", ""):
        with pytest.raises(ValueError, match="s2_scales"):
            EvaCLIPVisionTower(path, s2_args(scales), delay_load=True)
    tower = EvaCLIPVisionTower(path, s2_args("28,56"))
    with pytest.raises(ValueError, match="56x56"):
        tower(torch.randn(1, 3, 28, 28))
