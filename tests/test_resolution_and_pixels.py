"""Other resolutions against independent references: `interpolate_pos_encoding=True` at non-square grids against
timm's EVA-02 with `dynamic_img_size=True` (converted weights), the RoPE tables of BAAI's EVA-02 presets against
BAAI's `VisionRotaryEmbeddingFast` at their own grid and timm's `RotaryEmbeddingCat` at other (non-square) grids, a
clear error for sizes that are not a multiple of the patch size, and the PIL resize path against BAAI's eval transform
on high-contrast line art (where transformers 5's torchvision resize is far from it)."""

from __future__ import annotations

import contextlib
import functools
import io
import json

import pytest
import torch

from llava_evaclip import EvaCLIPVisionConfig, EvaCLIPVisionModel
from llava_evaclip.cli import main as cli_main
from llava_evaclip.modeling_evaclip import EvaCLIPRotaryEmbedding, apply_rotary

# timm's EVA02-L-14-336 layout at toy size: grid 6 on a reference (pretraining) grid of 4, as the release runs grid
# 24 on BAAI's pt_hw_seq_len 16; and the BAAI vision_cfg that describes the same tower for the converter.
TIMM_NAME = "eva02_large_patch14_clip_336"
TIMM_KWARGS = {"embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 42, "patch_size": 7, "ref_feat_shape": (4, 4)}
ARCH = {
    "embed_dim": 16,
    "vision_cfg": {"eva_model_name": "eva-clip-res", "drop_path_rate": 0.0, "xattn": False, "fusedLN": False,
                   "image_size": 42, "layers": 2, "width": 48, "patch_size": 7, "pt_hw_seq_len": 4, "head_width": 16,
                   "mlp_ratio": 2.6667, "rope": True, "intp_freq": True, "naiveswiglu": True, "subln": True},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 4, "layers": 1, "xattn": False,
                 "fusedLN": False},
}


@pytest.fixture(scope="module")
def timm_pair(tmp_path_factory):
    """(timm's tower with dynamic_img_size=True, ours converted from the same weights)."""
    timm = pytest.importorskip("timm")
    root = tmp_path_factory.mktemp("timm_dynamic")
    generator = torch.Generator().manual_seed(11)
    reference = timm.create_model(TIMM_NAME, pretrained=False, num_classes=16, dynamic_img_size=True, **TIMM_KWARGS)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    torch.save(reference.state_dict(), root / "timm.pth")
    (root / "arch.json").write_text(json.dumps(ARCH))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli_main(["convert", str(root / "timm.pth"), str(root / "out"), "--arch", str(root / "arch.json")]) == 0
    return reference.eval(), EvaCLIPVisionModel.from_pretrained(root / "out").eval()


@pytest.mark.parametrize("size", [(42, 63), (63, 42), (35, 84), (21, 14), (56, 56)])
def test_interpolated_grids_equal_timms_dynamic_img_size(timm_pair, monkeypatch, size):
    """Non-square, larger and smaller grids: the rows take the height's RoPE frequencies and the columns the width's
    (timm's `ref_feat_shape` scheme), positions resampled bicubically. timm antialiases a downsampled position table
    by default where BAAI and transformers do not (documented); that switch is turned off here."""
    import timm.models.eva
    from timm.layers import resample_abs_pos_embed

    reference, model = timm_pair
    monkeypatch.setattr(timm.models.eva, "resample_abs_pos_embed",
                        functools.partial(resample_abs_pos_embed, antialias=False))
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    with torch.no_grad():
        expected = reference.forward_features(images)  # after timm's final norm: CLS and patch tokens
        output = model(images, interpolate_pos_encoding=True)
        actual = model.vision_model.post_layernorm(output.last_hidden_state)
    grid = (size[0] // 7) * (size[1] // 7)
    assert actual.shape == expected.shape == (2, 1 + grid, 48)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(output.pooler_output, expected[:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["EVA02-CLIP-B-16", "EVA02-CLIP-L-14", "EVA02-CLIP-L-14-336"])
def test_eva02_preset_rope_tables_are_baais_and_timms(preset):
    """At the preset's own grid (14 / 16 / 24 on BAAI's pt_hw_seq_len 16) the table is BAAI's; at other grids,
    square or not (336 -> 448, 336 -> 672, 336 x 504, a 5 x 70 strip), rotating with it is timm's rotation."""
    pytest.importorskip("timm")
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, apply_rot_embed_cat

    config = EvaCLIPVisionConfig.from_preset(preset)
    assert config.rope_pt_grid_size == 16 and config.rope_interpolate_freq
    rope = EvaCLIPRotaryEmbedding(config)
    grid = config.num_patches_per_side
    with contextlib.redirect_stdout(io.StringIO()):
        baai_rope = pytest.importorskip("consisid_eva_clip.rope")
    baai = baai_rope.VisionRotaryEmbeddingFast(dim=config.head_dim // 2, pt_seq_len=16, ft_seq_len=grid)
    torch.testing.assert_close(rope.cos[1:], baai.freqs_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(rope.sin[1:], baai.freqs_sin, atol=1e-6, rtol=0)

    timm_rope = RotaryEmbeddingCat(config.head_dim, in_pixels=False, feat_shape=None, ref_feat_shape=(16, 16))
    for shape in ((grid, grid), (32, 32), (48, 48), (24, 36), (36, 24), (5, 70)):
        cos, sin = rope(*shape, torch.float64)
        x = torch.randn(1, 2, shape[0] * shape[1], config.head_dim, dtype=torch.float64)
        expected = apply_rot_embed_cat(x, timm_rope.get_embed(shape=list(shape)).double())
        torch.testing.assert_close(apply_rotary(x, cos[1:], sin[1:]), expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("size", [(28, 30), (30, 28), (28, 5), (5, 28)])
def test_non_square_sizes_off_the_patch_grid_are_a_clear_error(size):
    """One side a multiple of the patch size and the other not (or under one patch): a ValueError naming the size,
    not a shape error from the position table."""
    config = EvaCLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=28, patch_size=7, use_rope=True, rope_pt_grid_size=4, use_swiglu=True,
                                 use_sub_layernorm=True)
    model = EvaCLIPVisionModel(config).eval()
    with pytest.raises(ValueError, match=rf"multiple of the patch size \(7\); got {size[0]}x{size[1]}"):
        model(torch.randn(1, 3, *size), interpolate_pos_encoding=True)


def _line_art(height: int, width: int):
    """Black lines on white: sharp edges whose bicubic overshoot is clipped to 8 bits between the two 1-D passes."""
    import numpy as np
    from PIL import Image

    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    pixels[:, ::3] = 0
    pixels[::4, :] = 0
    return Image.fromarray(pixels)


@pytest.mark.parametrize("size", [(756, 343), (343, 756), (227, 1000)])
def test_the_pil_resize_path_is_baais_pixels_on_line_art(size):
    """The processor the converter writes, run with PIL (transformers 4.37, or transformers 5's
    `CLIPImageProcessorPil`, as the README recommends for BAAI's values), equals BAAI's eval transform bit for bit on
    high-contrast content, where transformers 5's torchvision resize is up to ~30 grey levels away."""
    import transformers

    from llava_evaclip.processing import build_image_processor

    with contextlib.redirect_stdout(io.StringIO()):
        transform = pytest.importorskip("consisid_eva_clip.transform")
    processor = build_image_processor(336)
    if hasattr(transformers, "CLIPImageProcessorPil"):
        processor = transformers.CLIPImageProcessorPil(**processor.to_dict())
    image = _line_art(*size)
    expected = transform.image_transform(336, is_train=False)(image)
    actual = processor(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
