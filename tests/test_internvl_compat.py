"""Checkpoint directories written by InternVL's EVA-CLIP port (internvl_chat_llava/llava/model/multimodal_encoder/
eva_clip) load unchanged into our classes and give the source model's outputs.

The port's format, as its modeling and configuration code write it: config.json with model_type "clip" and sub-configs
of model_type "clip_text_model" / "clip_vision_model" carrying q_bias / k_bias / v_bias / post_layernorm, and a state
dict keyed `vision_model.*`, `text_model.*`, `visual_projection.*` (with bias), `text_projection.weight` (no bias) and
`logit_scale`. The directory here is written by hand in that format: the key list is spelt out from the port's module
tree (not taken from our model), the tensors come from a model built in the test, saved with safetensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, CLIPConfig, CLIPModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from llava_evaclip import (
    EvaCLIPConfig,
    EvaCLIPModel,
    EvaCLIPTextModelWithProjection,
    EvaCLIPVisionConfig,
    EvaCLIPVisionModel,
    EvaCLIPVisionModelWithProjection,
)
from llava_evaclip.convert import convert_checkpoint

from conftest import tiny_config

# Generic fields transformers 4.3x wrote into every sub-config of a saved CLIP-style config (a subset).
_LEGACY_FIELDS = {"add_cross_attention": False, "architectures": None, "chunk_size_feed_forward": 0, "dropout": 0.0,
                  "is_encoder_decoder": False, "return_dict": True, "torchscript": False}


def _port_config(config: EvaCLIPConfig) -> dict:
    """config.json as the InternVL port writes it."""
    vision, text = config.vision_config, config.text_config
    tower_fields = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
                    "hidden_act", "layer_norm_eps", "attention_dropout", "initializer_range", "initializer_factor",
                    "q_bias", "k_bias", "v_bias", "post_layernorm")
    vision_config = {field: getattr(vision, field) for field in tower_fields}
    vision_config.update(model_type="clip_vision_model", image_size=vision.image_size, patch_size=vision.patch_size,
                         num_channels=vision.num_channels, **_LEGACY_FIELDS)
    text_config = {field: getattr(text, field) for field in tower_fields}
    text_config.update(model_type="clip_text_model", vocab_size=text.vocab_size,
                       max_position_embeddings=text.max_position_embeddings, pad_token_id=text.pad_token_id,
                       bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, **_LEGACY_FIELDS)
    return {
        "architectures": ["EvaCLIPModel"],
        "model_type": "clip",
        "initializer_factor": 1.0,
        "logit_scale_init_value": config.logit_scale_init_value,
        "projection_dim": config.projection_dim,
        "text_config": text_config,
        "vision_config": vision_config,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
    }


def _port_keys(config: EvaCLIPConfig) -> set[str]:
    """The port's persistent parameters: its module tree, written out (position_ids buffers are not persistent)."""

    def tower(prefix: str, tower_config, embeddings: list[str], final_norm: str) -> list[str]:
        keys = [f"{prefix}.embeddings.{name}" for name in embeddings]
        for index in range(tower_config.num_hidden_layers):
            layer = f"{prefix}.encoder.layers.{index}"
            for proj, has_bias in (("q_proj", tower_config.q_bias), ("k_proj", tower_config.k_bias),
                                   ("v_proj", tower_config.v_bias), ("out_proj", True)):
                keys.append(f"{layer}.self_attn.{proj}.weight")
                if has_bias:
                    keys.append(f"{layer}.self_attn.{proj}.bias")
            for module in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
                keys += [f"{layer}.{module}.weight", f"{layer}.{module}.bias"]
        keys += [f"{prefix}.{final_norm}.weight", f"{prefix}.{final_norm}.bias"]
        return keys

    vision = tower("vision_model", config.vision_config,
                   ["class_embedding", "patch_embedding.weight", "patch_embedding.bias", "position_embedding.weight"],
                   "post_layernorm")
    text = tower("text_model", config.text_config, ["token_embedding.weight", "position_embedding.weight"],
                 "final_layer_norm")
    return set(vision + text + ["visual_projection.weight", "visual_projection.bias", "text_projection.weight",
                                "logit_scale"])


def _write_port_checkpoint(directory, config: EvaCLIPConfig) -> EvaCLIPModel:
    """A source model (random weights, non-trivial norms and biases) written in the port's format."""
    source = EvaCLIPModel(config).eval()
    with torch.no_grad():
        for name, param in source.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "post_layernorm" in name:
                param.normal_(0.0, 0.2)
    state = {key: value.contiguous() for key, value in source.state_dict().items()}
    expected_keys = _port_keys(config)
    assert set(state) == expected_keys, (set(state) ^ expected_keys)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(_port_config(config), indent=2))
    return source


def _inputs(config: EvaCLIPConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    text = config.text_config
    ids = torch.randint(2, text.eos_token_id - 1, (2, 8))
    ids[0, 4], ids[1, 7] = text.eos_token_id, text.eos_token_id
    ids[0, 5:] = text.pad_token_id
    mask = (torch.arange(8) <= torch.tensor([[4], [7]])).long()
    size = config.vision_config.image_size
    return ids, mask, torch.randn(2, 3, size, size)


def _assert_same_outputs(loaded: EvaCLIPModel, source: EvaCLIPModel, config: EvaCLIPConfig) -> None:
    ids, mask, pixel_values = _inputs(config)
    with torch.no_grad():
        expected = source(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, return_loss=True)
        actual = loaded(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, return_loss=True)
    for name in ("logits_per_image", "text_embeds", "image_embeds", "loss"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name


# EVA01-style towers (pre-norm) and EVA02-CLIP-bigE-style (post-norm): the two kinds the port can express.
@pytest.mark.parametrize("family", ["eva01", "bige"])
def test_full_model_loads_internvl_checkpoint(family: str, tmp_path) -> None:
    config = tiny_config(family)
    source = _write_port_checkpoint(tmp_path, config)

    loaded, info = EvaCLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert isinstance(loaded.config, EvaCLIPConfig)
    assert loaded.config.vision_config.k_bias is False and loaded.config.text_config.k_bias is True
    assert loaded.config.vision_config.post_layernorm is (family == "bige")
    assert loaded.vision_model.encoder.layers[0].self_attn.k_proj.bias is None

    source_state = source.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, source_state[key]), key

    _assert_same_outputs(loaded, source, config)


def test_vision_tower_loads_internvl_checkpoint(tmp_path) -> None:
    """LLaVA's path: only the vision tower, out of the port's full directory."""
    config = tiny_config("bige")
    source = _write_port_checkpoint(tmp_path, config)

    vision_config = EvaCLIPVisionConfig.from_pretrained(tmp_path)
    assert vision_config.post_layernorm is True and vision_config.k_bias is False
    assert vision_config.hidden_size == config.vision_config.hidden_size

    vision, info = EvaCLIPVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    vision.eval()
    assert not info["missing_keys"], info["missing_keys"]
    _, _, pixel_values = _inputs(config)
    with torch.no_grad():
        expected = source.vision_model(pixel_values, output_hidden_states=True)
        actual = vision(pixel_values, output_hidden_states=True)
    assert torch.equal(actual.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(actual.pooler_output, expected.pooler_output)
    assert torch.equal(actual.hidden_states[-2], expected.hidden_states[-2])  # the layer LLaVA feeds its projector


def test_internvl_checkpoint_resaves_as_native_evaclip(tmp_path) -> None:
    """Loading a port directory and saving it again gives our own model types, which AutoModel then resolves."""
    config = tiny_config("eva01")
    port_dir, native_dir = tmp_path / "port", tmp_path / "native"
    port_dir.mkdir()
    source = _write_port_checkpoint(port_dir, config)
    EvaCLIPModel.from_pretrained(port_dir).save_pretrained(native_dir)
    written = json.loads((native_dir / "config.json").read_text())
    assert written["model_type"] == "evaclip"
    assert written["vision_config"]["model_type"] == "evaclip_vision_model"
    assert written["text_config"]["model_type"] == "evaclip_text_model"
    native = AutoModel.from_pretrained(native_dir).eval()
    assert type(native) is EvaCLIPModel
    ids, mask, pixel_values = _inputs(config)
    with torch.no_grad():
        assert torch.equal(native(input_ids=ids, attention_mask=mask, pixel_values=pixel_values).logits_per_image,
                           source(input_ids=ids, attention_mask=mask, pixel_values=pixel_values).logits_per_image)


def _clip_written_config(config: EvaCLIPConfig) -> dict:
    """The port's config.json as its CLIPConfig-derived classes write it, here written by transformers' CLIPConfig
    itself: the towers' fields are given without `projection_dim`, so each sub-config keeps CLIP's default (512)
    while the two-tower model projects to `config.projection_dim`."""
    port = _port_config(config)
    towers = {key: {k: v for k, v in port[key].items() if k not in ("model_type", "projection_dim")}
              for key in ("text_config", "vision_config")}
    clip_config = CLIPConfig(**towers, projection_dim=config.projection_dim,
                             logit_scale_init_value=config.logit_scale_init_value)
    clip_config.architectures = ["EvaCLIPModel"]
    return clip_config.to_dict()


@pytest.mark.parametrize("family", ["eva01", "bige"])
def test_internvl_checkpoint_with_towers_own_projection_dim(family: str, tmp_path) -> None:
    """Issue 13 item 7: the top-level projection_dim governs the two-tower model, as in CLIPConfig; the sub-configs'
    own (different) values are kept for their `*WithProjection` models and do not make the directory unloadable."""
    config = tiny_config(family)
    source = _write_port_checkpoint(tmp_path, config)
    written = _clip_written_config(config)
    assert written["model_type"] == "clip" and written["vision_config"]["model_type"] == "clip_vision_model"
    assert written["projection_dim"] == config.projection_dim
    assert written["vision_config"]["projection_dim"] == written["text_config"]["projection_dim"] == 512
    (tmp_path / "config.json").write_text(json.dumps(written, indent=2))

    loaded, info = EvaCLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert loaded.config.projection_dim == config.projection_dim
    assert loaded.config.vision_config.projection_dim == loaded.config.text_config.projection_dim == 512
    _assert_same_outputs(loaded, source, config)

    # The LLaVA path (vision tower only, no projection) reads the same directory.
    vision = EvaCLIPVisionModel.from_pretrained(tmp_path).eval()
    _, _, pixel_values = _inputs(config)
    with torch.no_grad():
        assert torch.equal(vision(pixel_values).pooler_output, source.vision_model(pixel_values).pooler_output)


def test_projection_dim_governs_what_it_governs_in_clip() -> None:
    """Same configuration dicts into transformers' CLIP classes and ours: the same projection widths everywhere."""
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "vocab_size": 99, "max_position_embeddings": 16, "projection_dim": 24}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 28, "patch_size": 7, "projection_dim": 20}
    clip_config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ours_config = EvaCLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    pairs = (
        (CLIPModel(clip_config), EvaCLIPModel(ours_config)),
        (CLIPVisionModelWithProjection(clip_config.vision_config),
         EvaCLIPVisionModelWithProjection(ours_config.vision_config)),
        (CLIPTextModelWithProjection(clip_config.text_config), EvaCLIPTextModelWithProjection(ours_config.text_config)),
    )
    for clip, ours in pairs:
        for name in ("visual_projection", "text_projection"):
            if hasattr(clip, name):
                assert getattr(ours, name).weight.shape == getattr(clip, name).weight.shape, (type(ours), name)
    assert pairs[0][1].visual_projection.out_features == 16
    assert pairs[1][1].visual_projection.out_features == 20
    assert pairs[2][1].text_projection.out_features == 24
    restored = EvaCLIPConfig.from_dict(ours_config.to_dict())  # what save_pretrained / from_pretrained round-trip
    assert (restored.projection_dim, restored.vision_config.projection_dim,
            restored.text_config.projection_dim) == (16, 20, 24)


def test_legacy_sub_config_dicts_are_read_as_clip_reads_them() -> None:
    """`text_config_dict` / `vision_config_dict` (configs saved before transformers 4.27, and ports copied from them)
    override the sub-configs in CLIPConfig; they used to be ignored here, silently giving default towers."""
    legacy = {"text_config_dict": {"hidden_size": 48, "num_attention_heads": 4, "projection_dim": 24},
              "vision_config_dict": {"image_size": 28, "patch_size": 7, "num_hidden_layers": 3}}
    text = {"hidden_size": 32, "num_attention_heads": 4, "vocab_size": 99}
    clip_config = CLIPConfig(text_config=text, projection_dim=16, **legacy)
    ours = EvaCLIPConfig(text_config=text, projection_dim=16, **legacy)
    for tower in ("text_config", "vision_config"):
        for field in ("hidden_size", "num_attention_heads", "projection_dim", "vocab_size", "image_size",
                      "patch_size", "num_hidden_layers"):
            clip_tower = getattr(clip_config, tower)
            if hasattr(clip_tower, field):
                assert getattr(getattr(ours, tower), field) == getattr(clip_tower, field), (tower, field)
    assert ours.text_config.hidden_size == 48 and ours.vision_config.image_size == 28
    assert "text_config_dict" not in ours.to_dict() and "vision_config_dict" not in ours.to_dict()


def test_internvl_checkpoint_with_towers_own_projection_dim_converts_vision_only(tmp_path) -> None:
    """`convert --vision-only` of such a directory keeps the two-tower model's image projection, at its width."""
    port, out = tmp_path / "port", tmp_path / "vision"
    port.mkdir()
    config = tiny_config("eva01")
    source = _write_port_checkpoint(port, config)
    (port / "config.json").write_text(json.dumps(_clip_written_config(config)))
    convert_checkpoint(port, out, vision_only=True)
    vision = EvaCLIPVisionModelWithProjection.from_pretrained(out).eval()
    assert vision.config.projection_dim == config.projection_dim
    _, _, pixel_values = _inputs(config)
    with torch.no_grad():
        expected = source.visual_projection(source.vision_model(pixel_values).pooler_output)
        assert torch.equal(vision(pixel_values).image_embeds, expected)
