"""Bad configurations and bad inputs get a ValueError that names what is wrong and what is expected, never a bare
shape error from deep inside the model."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPVisionConfig

from llava_evaclip import (
    EvaCLIPConfig,
    EvaCLIPModel,
    EvaCLIPTextConfig,
    EvaCLIPTextModel,
    EvaCLIPVisionConfig,
    EvaCLIPVisionModel,
    EvaCLIPVisionModelWithProjection,
)

from conftest import tiny_config, tiny_text_config, tiny_vision_config

# --------------------------------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------------------------------

VISION_CASES = [
    # overrides, pattern naming the field and what would be right
    (dict(hidden_size=30, num_attention_heads=4), r"hidden_size \(30\) must be divisible by num_attention_heads \(4\)"),
    (dict(image_size=28, patch_size=32), r"patch_size \(32\) must not exceed image_size \(28\)"),
    (dict(image_size=30, patch_size=7), r"image_size \(30\) must be a multiple of patch_size \(7\), e\.g\. 28"),
    (dict(hidden_act="not_an_activation"), r"hidden_act 'not_an_activation' is unknown; expected one of .*gelu"),
    (dict(num_hidden_layers=0), r"num_hidden_layers must be a positive integer, got 0"),
    (dict(num_channels=0), r"num_channels must be a positive integer, got 0"),
    (dict(layer_norm_eps=-1.0), r"layer_norm_eps must be a positive number"),
    (dict(attention_dropout=1.5), r"attention_dropout must be in \[0, 1\)"),
    (dict(layer_scale_init_value=-0.1), r"layer_scale_init_value must be None \(no layer scale\) or positive"),
    (dict(hidden_size=24, num_attention_heads=4, use_rope=True), r"head dim divisible by 4 .* set use_rope=False"),
]


@pytest.mark.parametrize("overrides, pattern", VISION_CASES, ids=[case[1][:30] for case in VISION_CASES])
def test_vision_config_validation(overrides: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        tiny_vision_config("eva02" if overrides.get("use_rope") else "eva01", **overrides)


TEXT_CASES = [
    (dict(hidden_size=30), r"EvaCLIPTextConfig\.hidden_size \(30\) must be divisible by num_attention_heads"),
    (dict(max_position_embeddings=0), r"EvaCLIPTextConfig\.max_position_embeddings must be a positive integer"),
    (dict(vocab_size=-3), r"EvaCLIPTextConfig\.vocab_size must be a positive integer"),
    (dict(hidden_act="relu6x"), r"EvaCLIPTextConfig\.hidden_act 'relu6x' is unknown; expected one of"),
]


@pytest.mark.parametrize("overrides, pattern", TEXT_CASES, ids=[case[1][:30] for case in TEXT_CASES])
def test_text_config_validation(overrides: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        tiny_text_config(**overrides)


def test_config_validation_also_guards_from_dict() -> None:
    """A bad config.json is caught at load time, not at the first forward."""
    fields = tiny_vision_config("eva01").to_dict()
    fields["patch_size"] = 5
    with pytest.raises(ValueError, match=r"image_size \(28\) must be a multiple of patch_size \(5\)"):
        EvaCLIPVisionConfig.from_dict(fields)


# --------------------------------------------------------------------------------------------------------------------
# Mismatched sub-configs
# --------------------------------------------------------------------------------------------------------------------


def test_text_config_dict_as_vision_config() -> None:
    with pytest.raises(ValueError, match=r"vision_config holds a text tower config .*evaclip_text_model"):
        EvaCLIPConfig(text_config=tiny_text_config().to_dict(), vision_config=tiny_text_config().to_dict(),
                      projection_dim=16)


def test_vision_config_dict_as_text_config() -> None:
    with pytest.raises(ValueError, match=r"text_config holds a vision tower config .*evaclip_vision_model"):
        EvaCLIPConfig(text_config=tiny_vision_config().to_dict(), vision_config=tiny_vision_config().to_dict(),
                      projection_dim=16)


def test_text_config_object_as_vision_config() -> None:
    with pytest.raises(ValueError, match=r"vision_config must be an EvaCLIPVisionConfig .*got EvaCLIPTextConfig"):
        EvaCLIPConfig(text_config=tiny_text_config(), vision_config=tiny_text_config(), projection_dim=16)


def test_clip_vision_config_object_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"vision_config must be an EvaCLIPVisionConfig .*got CLIPVisionConfig"):
        EvaCLIPConfig(text_config=tiny_text_config(), vision_config=CLIPVisionConfig(), projection_dim=16)
    with pytest.raises(ValueError, match=r"text_config must be an EvaCLIPTextConfig .*got CLIPTextConfig"):
        EvaCLIPConfig(text_config=CLIPTextConfig(), vision_config=tiny_vision_config(), projection_dim=16)


def test_model_with_a_clip_vision_config_is_rejected() -> None:
    config = tiny_config("eva01")
    config.vision_config = CLIPVisionConfig()
    with pytest.raises(ValueError, match=r"config\.vision_config must be an EvaCLIPVisionConfig, got CLIPVisionConfig"):
        EvaCLIPModel(config)
    config = tiny_config("eva01")
    config.text_config = CLIPTextConfig()
    with pytest.raises(ValueError, match=r"config\.text_config must be an EvaCLIPTextConfig, got CLIPTextConfig"):
        EvaCLIPModel(config)


def test_tower_config_from_dict_rejects_the_other_tower() -> None:
    with pytest.raises(ValueError, match=r"Expected a vision tower config.*evaclip_text_model"):
        EvaCLIPVisionConfig.from_dict(tiny_text_config().to_dict())
    with pytest.raises(ValueError, match=r"Expected a text tower config.*clip_vision_model"):
        EvaCLIPTextConfig.from_dict({**tiny_vision_config().to_dict(), "model_type": "clip_vision_model"})


# --------------------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_model() -> EvaCLIPVisionModel:
    return EvaCLIPVisionModel(tiny_vision_config("eva02")).eval()


def test_pixel_values_none(vision_model: EvaCLIPVisionModel) -> None:
    with pytest.raises(ValueError, match=r"pixel_values is required.*\[batch, channels, height, width\]"):
        vision_model(None)


@pytest.mark.parametrize("shape", [(3, 28, 28), (1, 1, 3, 28, 28)])
def test_pixel_values_wrong_rank(vision_model: EvaCLIPVisionModel, shape) -> None:
    with pytest.raises(ValueError, match=r"pixel_values must have 4 dimensions \[batch, 3, 28, 28\], got shape"):
        vision_model(torch.randn(*shape))


def test_pixel_values_wrong_channels(vision_model: EvaCLIPVisionModel) -> None:
    with pytest.raises(ValueError, match=r"pixel_values has 1 channels; this model expects 3"):
        vision_model(torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize("size", [(35, 35), (28, 35), (224, 224)])
def test_pixel_values_wrong_size(vision_model: EvaCLIPVisionModel, size) -> None:
    pattern = rf"Input image size {size[0]}x{size[1]} does not match the model's 28x28.*interpolate_pos_encoding=True"
    with pytest.raises(ValueError, match=pattern):
        vision_model(torch.randn(1, 3, *size))


def test_interpolate_needs_a_multiple_of_the_patch_size(vision_model: EvaCLIPVisionModel) -> None:
    pattern = r"interpolate_pos_encoding=True .*multiple of the patch size \(7\); got 30x30"
    with pytest.raises(ValueError, match=pattern):
        vision_model(torch.randn(1, 3, 30, 30), interpolate_pos_encoding=True)


def test_bad_pixels_through_the_other_vision_entry_points() -> None:
    config = tiny_config("bige")
    model = EvaCLIPModel(config).eval()
    ids = torch.tensor([[5, 6, config.text_config.eos_token_id]])
    with pytest.raises(ValueError, match=r"pixel_values is required"):
        model(input_ids=ids, pixel_values=None)
    with pytest.raises(ValueError, match=r"does not match the model's 28x28"):
        model.get_image_features(pixel_values=torch.randn(1, 3, 14, 14))
    with pytest.raises(ValueError, match=r"pixel_values has 4 channels"):
        EvaCLIPVisionModelWithProjection(config.vision_config)(torch.randn(1, 4, 28, 28))


@pytest.fixture(scope="module")
def text_model() -> EvaCLIPTextModel:
    return EvaCLIPTextModel(tiny_text_config()).eval()


def test_input_ids_longer_than_max_positions(text_model: EvaCLIPTextModel) -> None:
    ids = torch.randint(1, 90, (2, 17))
    with pytest.raises(ValueError, match=r"input_ids has 17 tokens but the text tower has 16 positions "
                                         r"\(max_position_embeddings\); truncate to at most 16 tokens"):
        text_model(ids)
    text_model(ids[:, :16])  # the limit itself is fine


def test_input_ids_missing_or_wrong_rank(text_model: EvaCLIPTextModel) -> None:
    with pytest.raises(ValueError, match=r"input_ids is required"):
        text_model(None)
    with pytest.raises(ValueError, match=r"input_ids must have shape \[batch, seq_len\], got \(5,\)"):
        text_model(torch.randint(1, 90, (5,)))


def test_attention_mask_shape_mismatch(text_model: EvaCLIPTextModel) -> None:
    ids = torch.randint(1, 90, (2, 6))
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 5\) must equal input_ids shape \(2, 6\)"):
        text_model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
