"""Bad configurations and bad inputs get a ValueError that names what is wrong and what is expected, never a bare
shape error from deep inside the model."""

from __future__ import annotations

import inspect
import re

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
    (dict(num_hidden_layers=0), r"num_hidden_layers must be an integer in \[1, 1024\], got 0"),
    (dict(num_channels=0), r"num_channels must be an integer in \[1, 64\], got 0"),
    (dict(layer_norm_eps=-1.0), r"layer_norm_eps must be a number in \(0, 1.0\)"),
    (dict(attention_dropout=1.5), r"attention_dropout must be a probability in \[0, 1\)"),
    (dict(layer_scale_init_value=-0.1), r"layer_scale_init_value must be None or a finite number > 0"),
    (dict(hidden_size=24, num_attention_heads=4, use_rope=True), r"head dim divisible by 4 .* set use_rope=False"),
]


@pytest.mark.parametrize("overrides, pattern", VISION_CASES, ids=[case[1][:30] for case in VISION_CASES])
def test_vision_config_validation(overrides: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        tiny_vision_config("eva02" if overrides.get("use_rope") else "eva01", **overrides)


TEXT_CASES = [
    (dict(hidden_size=30), r"EvaCLIPTextConfig\.hidden_size \(30\) must be divisible by num_attention_heads"),
    (dict(max_position_embeddings=0), r"EvaCLIPTextConfig\.max_position_embeddings must be an integer in \[1, 65536\], got 0"),
    (dict(vocab_size=-3), r"EvaCLIPTextConfig\.vocab_size must be an integer in \[1, 16777216\], got -3"),
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


# Hostile values for every kind of field: wrong type (strings, floats, bools where integers belong), out of range,
# non-finite, absurd sizes. Each is refused at construction with the field's name and what it accepts.
HOSTILE_VISION = [
    ("rope_theta", 0, r"rope_theta must be a finite number > 0, got 0"),
    ("rope_theta", -10000.0, r"rope_theta must be a finite number > 0, got -10000\.0 \(float\)"),
    ("rope_theta", "10000", r"rope_theta must be a finite number > 0, got '10000' \(str\)"),
    ("rope_theta", float("nan"), r"rope_theta must be a finite number > 0, got nan"),
    ("rope_theta", float("inf"), r"rope_theta must be a finite number > 0, got inf"),
    ("rope_theta", 10**400, r"rope_theta must be a finite number > 0, got 1000"),
    ("num_hidden_layers", 1e9, r"num_hidden_layers must be an integer in \[1, 1024\], got 1000000000\.0 \(float\)"),
    ("num_hidden_layers", 10**9, r"num_hidden_layers must be an integer in \[1, 1024\], got 1000000000"),
    ("num_hidden_layers", True, r"num_hidden_layers must be an integer in \[1, 1024\], got True \(bool\)"),
    ("num_hidden_layers", "3", r"num_hidden_layers must be an integer in \[1, 1024\], got '3' \(str\)"),
    ("hidden_size", 32.0, r"hidden_size must be an integer in \[1, 65536\], got 32\.0 \(float\)"),
    ("hidden_size", 2**20, r"hidden_size must be an integer in \[1, 65536\]"),
    ("intermediate_size", -64, r"intermediate_size must be an integer in \[1, 262144\], got -64"),
    ("num_attention_heads", None, r"num_attention_heads must be an integer in \[1, 65536\], got None"),
    ("projection_dim", 0, r"projection_dim must be an integer in \[1, 65536\], got 0"),
    ("image_size", 10**6, r"image_size must be an integer in \[1, 16384\]"),
    ("patch_size", 0, r"patch_size must be an integer in \[1, 16384\], got 0"),
    ("num_channels", 1000, r"num_channels must be an integer in \[1, 64\], got 1000"),
    ("attention_dropout", "0.1", r"attention_dropout must be a probability in \[0, 1\), got '0\.1' \(str\)"),
    ("attention_dropout", 1.0, r"attention_dropout must be a probability in \[0, 1\), got 1\.0"),
    ("attention_dropout", -0.1, r"attention_dropout must be a probability in \[0, 1\), got -0\.1"),
    ("attention_dropout", float("nan"), r"attention_dropout must be a probability in \[0, 1\), got nan"),
    ("layer_norm_eps", 0, r"layer_norm_eps must be a number in \(0, 1\.0\), got 0"),
    ("layer_norm_eps", "1e-6", r"layer_norm_eps must be a number in \(0, 1\.0\), got '1e-6' \(str\)"),
    ("initializer_range", 0.0, r"initializer_range must be a number in \(0, 10\.0\], got 0\.0"),
    ("initializer_range", 1e300, r"initializer_range must be a number in \(0, 10\.0\], got 1e\+300"),
    ("initializer_range", -0.02, r"initializer_range must be a number in \(0, 10\.0\], got -0\.02"),
    ("initializer_factor", 0, r"initializer_factor must be a number in \(0, 1000\.0\], got 0"),
    ("layer_scale_init_value", "0.1", r"layer_scale_init_value must be None or a finite number > 0, got '0\.1'"),
    ("q_bias", "false", r"q_bias must be a boolean \(true / false\), got 'false' \(str\)"),
    ("k_bias", 1, r"k_bias must be a boolean \(true / false\), got 1"),
    ("use_rope", "yes", r"use_rope must be a boolean \(true / false\), got 'yes'"),
    ("use_swiglu", None, r"use_swiglu must be a boolean \(true / false\), got None"),
    ("rope_interpolate_freq", 0, r"rope_interpolate_freq must be a boolean"),
    ("use_sub_layernorm", "true", r"use_sub_layernorm must be a boolean"),
    ("rope_pt_grid_size", 16.0, r"rope_pt_grid_size must be an integer in \[1, 1024\], got 16\.0 \(float\)"),
    ("hidden_act", ["gelu"], r"hidden_act must be the name of an activation, got \['gelu'\]"),
]


@pytest.mark.parametrize("field, value, pattern", HOSTILE_VISION, ids=[f"{f}={v!r}" for f, v, _ in HOSTILE_VISION])
def test_hostile_vision_config_values(field: str, value, pattern: str) -> None:
    with pytest.raises(ValueError, match=r"EvaCLIPVisionConfig\." + pattern):
        tiny_vision_config("eva02", **{field: value})
    # the same through a config.json, the way a hostile file arrives
    with pytest.raises(ValueError, match=pattern):
        EvaCLIPVisionConfig.from_dict({**tiny_vision_config("eva02").to_dict(), field: value})


def test_from_pretrained_overrides_are_checked(tmp_path) -> None:
    """transformers sets `from_pretrained(dir, field=value)` overrides after construction; they are checked too."""
    tiny_vision_config("eva02").save_pretrained(tmp_path / "vision")
    with pytest.raises(ValueError, match=r"EvaCLIPVisionConfig\.rope_theta must be a finite number > 0, got -1"):
        EvaCLIPVisionConfig.from_pretrained(tmp_path / "vision", rope_theta=-1)
    with pytest.raises(ValueError, match=r"EvaCLIPVisionConfig\.use_rope must be a boolean"):
        EvaCLIPVisionModel.from_pretrained(tmp_path / "vision", use_rope="no")
    tiny_config("eva01").save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match=r"EvaCLIPConfig\.logit_scale_init_value must be a number in \[-10, 10\]"):
        EvaCLIPConfig.from_pretrained(tmp_path / "full", logit_scale_init_value=float("inf"))
    config, unused = EvaCLIPVisionConfig.from_pretrained(tmp_path / "vision", rope_theta=500.0, foo=1,
                                                         return_unused_kwargs=True)
    assert config.rope_theta == 500.0 and unused == {"foo": 1}


def test_patch_grid_bound() -> None:
    with pytest.raises(ValueError, match=r"image_size / patch_size \(2048 patches per side\) must be at most 1024"):
        tiny_vision_config("eva01", image_size=2048, patch_size=1)


HOSTILE_TEXT = [
    ("vocab_size", 1e9, r"vocab_size must be an integer in \[1, 16777216\], got 1000000000\.0 \(float\)"),
    ("max_position_embeddings", 10**7, r"max_position_embeddings must be an integer in \[1, 65536\]"),
    ("eos_token_id", -1, r"eos_token_id must be None or an integer in \[0, 16777216\], got -1"),
    ("bos_token_id", "49406", r"bos_token_id must be None or an integer in \[0, 16777216\], got '49406' \(str\)"),
    ("num_hidden_layers", 2.0, r"num_hidden_layers must be an integer in \[1, 1024\], got 2\.0 \(float\)"),
    ("attention_dropout", "0", r"attention_dropout must be a probability in \[0, 1\), got '0' \(str\)"),
    ("v_bias", "True", r"v_bias must be a boolean"),
]


@pytest.mark.parametrize("field, value, pattern", HOSTILE_TEXT, ids=[f"{f}={v!r}" for f, v, _ in HOSTILE_TEXT])
def test_hostile_text_config_values(field: str, value, pattern: str) -> None:
    with pytest.raises(ValueError, match=r"EvaCLIPTextConfig\." + pattern):
        tiny_text_config(**{field: value})


@pytest.mark.parametrize("field, value, pattern", [
    ("projection_dim", "16", r"EvaCLIPConfig\.projection_dim must be an integer in \[1, 65536\], got '16' \(str\)"),
    ("logit_scale_init_value", float("nan"), r"EvaCLIPConfig\.logit_scale_init_value must be a number in \[-10, 10\]"),
    ("logit_scale_init_value", 1000.0, r"EvaCLIPConfig\.logit_scale_init_value must be a number in \[-10, 10\]"),
    ("initializer_factor", -1.0, r"EvaCLIPConfig\.initializer_factor must be a number in \(0, 1000\.0\], got -1\.0"),
])
def test_hostile_model_config_values(field: str, value, pattern: str) -> None:
    fields = {"text_config": tiny_text_config().to_dict(), "vision_config": tiny_vision_config().to_dict(),
              "projection_dim": 16, field: value}
    with pytest.raises(ValueError, match=pattern):
        EvaCLIPConfig(**fields)


def test_hostile_sub_config_inside_a_full_config() -> None:
    with pytest.raises(ValueError, match=r"EvaCLIPVisionConfig\.rope_theta must be a finite number > 0, got -1"):
        EvaCLIPConfig(text_config=tiny_text_config().to_dict(),
                      vision_config={**tiny_vision_config().to_dict(), "rope_theta": -1}, projection_dim=16)


@pytest.mark.parametrize("config_class", [EvaCLIPVisionConfig, EvaCLIPTextConfig])
def test_every_config_argument_is_validated(config_class) -> None:
    """Each constructor argument has a type/range rule: a new field without one fails here."""
    from llava_evaclip import configuration_evaclip as module

    table = {EvaCLIPVisionConfig: module._VISION_FIELDS, EvaCLIPTextConfig: module._TEXT_FIELDS}[config_class]
    arguments = [name for name in inspect.signature(config_class.__init__).parameters if name not in ("self", "kwargs")]
    assert sorted(set(arguments) - set(table)) == []


def test_standard_and_port_kwargs_still_pass() -> None:
    """Generic PretrainedConfig kwargs (as transformers and the InternVL port write them) are not our fields."""
    extra = dict(torch_dtype="float16", architectures=["EvaCLIPVisionModel"], output_hidden_states=True,
                 dropout=0.0, return_dict=True, chunk_size_feed_forward=0, post_layernorm=None)
    config = tiny_vision_config("eva02", **extra)
    assert config.post_layernorm is False and config.output_hidden_states is True
    assert EvaCLIPVisionConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    for name in EvaCLIPConfig.list_presets():  # every released architecture passes, with room to spare
        EvaCLIPConfig.from_dict(EvaCLIPConfig.from_preset(name).to_dict())


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_image_batch_is_refused(vision_model: EvaCLIPVisionModel, dtype) -> None:
    """Zero images: transformers' CLIP fails deep in a reshape, and our bf16 attention divided by zero."""
    with pytest.raises(ValueError, match=r"pixel_values holds no images \(batch size 0\); pass at least one image"):
        with torch.no_grad():
            vision_model.to(dtype)(torch.randn(0, 3, 28, 28, dtype=dtype))
    vision_model.float()


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


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_input_ids_are_refused(text_model: EvaCLIPTextModel, shape) -> None:
    with pytest.raises(ValueError, match=rf"input_ids holds no tokens \(shape {re.escape(str(shape))}\)"):
        text_model(torch.zeros(*shape, dtype=torch.long))


def test_attention_mask_shape_mismatch(text_model: EvaCLIPTextModel) -> None:
    ids = torch.randint(1, 90, (2, 6))
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 5\) must equal input_ids shape \(2, 6\)"):
        text_model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_pixels_are_refused(vision_model: EvaCLIPVisionModel, dtype) -> None:
    """uint8 pixels would be cast, not normalised: refused rather than silently wrong features."""
    pixels = torch.randint(0, 2 if dtype == torch.bool else 256, (1, 3, 28, 28)).to(dtype)
    with pytest.raises(ValueError, match=rf"pixel_values must be floating point .*got dtype {dtype}.*image_processor"):
        vision_model(pixels)
    model = EvaCLIPModel(tiny_config("eva01")).eval()
    with pytest.raises(ValueError, match=r"pixel_values must be floating point"):
        model(input_ids=torch.randint(1, 90, (1, 5)), pixel_values=pixels)
    with pytest.raises(ValueError, match=r"pixel_values must be floating point"):
        model.get_image_features(pixels)
    with pytest.raises(ValueError, match=r"pixel_values must be floating point"):
        EvaCLIPVisionModelWithProjection(tiny_vision_config("eva01"))(pixels)


@pytest.mark.parametrize("ids, pattern", [
    (torch.rand(2, 5) * 90, r"input_ids must be an integer tensor of token ids .*got dtype torch\.float32"),
    (torch.ones(2, 5, dtype=torch.bool), r"input_ids must be an integer tensor .*got dtype torch\.bool"),
    ([[1, 2, 3]], r"input_ids must be an integer tensor .*got list"),
    (torch.tensor([[1, 99, 3]]), r"input_ids holds ids in \[1, 99\]; this text tower's vocabulary is \[0, 98\]"),
    (torch.tensor([[1, -1, 3]]), r"input_ids holds ids in \[-1, 3\]; .*vocab_size 99"),
])
def test_bad_input_ids(text_model: EvaCLIPTextModel, ids, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        text_model(ids)
    text_model(torch.tensor([[0, 98]]))  # both ends of the vocabulary are fine


def test_return_loss_needs_as_many_texts_as_images() -> None:
    model = EvaCLIPModel(tiny_config("eva01")).eval()
    ids, pixels = torch.randint(1, 90, (3, 5)), torch.randn(2, 3, 28, 28)
    with pytest.raises(ValueError, match=r"return_loss=True needs matching image-text pairs: got 2 images and 3 texts"):
        model(input_ids=ids, pixel_values=pixels, return_loss=True)
    assert model(input_ids=ids, pixel_values=pixels).logits_per_image.shape == (2, 3)  # scoring needs no pairs
    assert model(input_ids=ids[:2], pixel_values=pixels, return_loss=True).loss.isfinite()


# --------------------------------------------------------------------------------------------------------------------
# Plain CLIP checkpoints, derived config fields, a model built from another class's config
# --------------------------------------------------------------------------------------------------------------------


def _tiny_clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=28, patch_size=7),
        projection_dim=16,
    )


def test_plain_clip_checkpoints_are_refused(tmp_path) -> None:
    """transformers' own CLIP dirs share the port's model types and weight names, so they would load by name into the
    EVA-CLIP tower (QuickGELU, pre-LayerNorm and k bias lost) and give wrong features; they are refused instead."""
    from transformers import CLIPModel, CLIPTextModel, CLIPVisionModel

    clip_config = _tiny_clip_config()
    dirs = {"full": tmp_path / "full", "vision": tmp_path / "vision", "text": tmp_path / "text"}
    CLIPModel(clip_config).save_pretrained(dirs["full"])
    CLIPVisionModel(clip_config.vision_config).save_pretrained(dirs["vision"])
    CLIPTextModel(clip_config.text_config).save_pretrained(dirs["text"])
    cases = [(EvaCLIPVisionModel, "full", "CLIPVisionModel"), (EvaCLIPVisionModel, "vision", "CLIPVisionModel"),
             (EvaCLIPModel, "full", "CLIP"), (EvaCLIPTextModel, "full", "CLIPTextModel"),
             (EvaCLIPTextModel, "text", "CLIPTextModel"), (EvaCLIPVisionConfig, "full", "CLIPVisionModel"),
             (EvaCLIPConfig, "full", "CLIP")]
    for model_class, kind, loader in cases:
        with pytest.raises(ValueError, match=rf"plain CLIP config .*not EVA-CLIP.*transformers' {loader}"):
            model_class.from_pretrained(dirs[kind])
    # the port's configs (the same model types, with its EVA fields) still load
    port_vision = {**clip_config.vision_config.to_dict(), "q_bias": True, "k_bias": False, "v_bias": True,
                   "post_layernorm": False, "hidden_act": "gelu"}
    assert EvaCLIPVisionConfig.from_dict(port_vision).k_bias is False
    with pytest.raises(ValueError, match=r"plain CLIP config"):
        EvaCLIPVisionConfig.from_dict(clip_config.vision_config.to_dict())


@pytest.mark.parametrize("config_class, make", [
    (EvaCLIPVisionConfig, lambda **kw: tiny_vision_config("eva02", **kw)),
    (EvaCLIPTextConfig, lambda **kw: tiny_text_config(**kw)),
])
def test_derived_fields_in_a_config_dict(config_class, make) -> None:
    """`head_dim` / `num_patches_per_side` are properties: a dict that carries them (consistent) loads; inconsistent
    ones get a ValueError, not transformers' AttributeError on the property."""
    config = make()
    derived = {"head_dim": config.head_dim}
    if config_class is EvaCLIPVisionConfig:
        derived["num_patches_per_side"] = config.num_patches_per_side
    loaded = config_class.from_dict({**config.to_dict(), **derived})
    assert loaded.to_dict() == config.to_dict()
    assert make(**derived).to_dict() == config.to_dict()
    full = EvaCLIPConfig(text_config={**tiny_text_config().to_dict(), "head_dim": 8},
                         vision_config={**tiny_vision_config().to_dict(), "head_dim": 8}, projection_dim=16)
    assert full.vision_config.head_dim == full.text_config.head_dim == 8
    for name, value in derived.items():
        with pytest.raises(ValueError, match=rf"{config_class.__name__}\.{name} is derived .*\(here {value}\), "
                                             rf"got {value + 1}"):
            config_class.from_dict({**config.to_dict(), name: value + 1})
        with pytest.raises(ValueError, match=rf"{name} is derived"):
            config_class.from_dict(config.to_dict(), **{name: value + 1})


def test_a_model_takes_only_its_own_config_class() -> None:
    from llava_evaclip import EvaCLIPForImageClassification, EvaCLIPTextModelWithProjection

    full, vision, text = tiny_config("eva01"), tiny_vision_config("eva01"), tiny_text_config()
    cases = [
        (EvaCLIPVisionModel, full, r"EvaCLIPVisionModel takes an EvaCLIPVisionConfig, got EvaCLIPConfig "
                                   r"\(pass config\.vision_config\)"),
        (EvaCLIPVisionModelWithProjection, text, r"takes an EvaCLIPVisionConfig, got EvaCLIPTextConfig\."),
        (EvaCLIPTextModel, full, r"takes an EvaCLIPTextConfig, got EvaCLIPConfig \(pass config\.text_config\)"),
        (EvaCLIPTextModelWithProjection, vision, r"takes an EvaCLIPTextConfig, got EvaCLIPVisionConfig\."),
        (EvaCLIPModel, vision, r"EvaCLIPModel takes an EvaCLIPConfig, got EvaCLIPVisionConfig \(wrap"),
        (EvaCLIPForImageClassification, vision, r"takes an EvaCLIPConfig, got EvaCLIPVisionConfig \(wrap"),
        (EvaCLIPForImageClassification, text, r"takes an EvaCLIPConfig, got EvaCLIPTextConfig \(wrap"),
    ]
    for model_class, config, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            model_class(config)


# --------------------------------------------------------------------------------------------------------------------
# Text inputs: dtypes, position ids, padding side
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_narrow_integer_input_ids_are_refused(text_model: EvaCLIPTextModel, dtype) -> None:
    ids = torch.randint(1, 90, (2, 5))
    with pytest.raises(ValueError, match=rf"input_ids must be int64 \(or int32\) token ids, got dtype {dtype}"):
        text_model(ids.to(dtype))
    with torch.no_grad():  # int32, which nn.Embedding takes, gives the int64 result
        torch.testing.assert_close(text_model(ids.int()).pooler_output, text_model(ids).pooler_output, rtol=0, atol=0)


def test_bad_position_ids(text_model: EvaCLIPTextModel) -> None:
    ids = torch.randint(1, 90, (2, 5))
    cases = [
        (torch.arange(5)[None] + 12, r"position_ids holds positions in \[12, 16\]; .*\[0, 15\]"),
        (torch.arange(6)[None], r"position_ids must be an integer \(int64\) tensor of shape \[1 or batch, seq_len\] "
                                r"= \[1 or 2, 5\], got torch\.int64 \(1, 6\)"),
        (torch.arange(5).repeat(3, 1), r"got torch\.int64 \(3, 5\)"),
        (torch.arange(5.0)[None], r"got torch\.float32"),
        ([[0, 1, 2, 3, 4]], r"got list"),
    ]
    for position_ids, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            text_model(ids, position_ids=position_ids)
    with torch.no_grad():  # the default positions, given explicitly in each accepted shape, change nothing
        default = text_model(ids).pooler_output
        for position_ids in (torch.arange(5), torch.arange(5)[None], torch.arange(5).repeat(2, 1)):
            torch.testing.assert_close(text_model(ids, position_ids=position_ids).pooler_output, default,
                                       rtol=0, atol=0)


def test_left_padding_is_refused(text_model: EvaCLIPTextModel) -> None:
    """The tower pools at the first end token and reads absolute positions, as open_clip's: a left-padded batch would
    pool a padding token (transformers' CLIP does the same silently); it is refused, right padding changes nothing."""
    from llava_evaclip.tokenization import build_tokenizer

    tokenizer = build_tokenizer()
    texts = ["a photo of a dog", "a cat"]
    model = EvaCLIPTextModel(tiny_text_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=77,
                                              bos_token_id=49406, eos_token_id=49407)).eval()
    with torch.no_grad():
        alone = model(**tokenizer(texts[1:], return_tensors="pt")).pooler_output
        right = model(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
        torch.testing.assert_close(right[1:], alone, rtol=1e-5, atol=1e-6)
        tokenizer.padding_side = "left"
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with pytest.raises(ValueError, match=r"attention_mask masks the start of a text or its first end token "
                                             r"\(left padding\?\).*padding_side = 'right'"):
            model(**batch)
        tokenizer.padding_side = "right"
        right = tokenizer(texts, padding=True, return_tensors="pt")
        masked_end = right.attention_mask.clone()
        masked_end[1, int(right.input_ids[1].argmax())] = 0  # the end token pooling reads, masked
        with pytest.raises(ValueError, match=r"left padding"):
            model(input_ids=right.input_ids, attention_mask=masked_end)
        # a hole inside a text is a mask a user may mean (transformers' CLIP takes it): accepted
        right.attention_mask[0, 2] = 0
        model(**right)
        with pytest.raises(ValueError, match=r"left padding"):
            EvaCLIPModel(EvaCLIPConfig(text_config=model.config.to_dict(),
                                       vision_config=tiny_vision_config("eva01").to_dict(),
                                       projection_dim=16)).get_text_features(**batch)
