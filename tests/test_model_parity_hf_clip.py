"""Numerical parity with transformers' own CLIP wherever the two architectures coincide.

EVA-CLIP's text tower *is* OpenAI-CLIP's text tower, and an EVA01-style vision block is CLIP's pre-norm block with
GELU and an optional k bias. Weights are copied across by module name and the outputs must agree to 1e-5 in fp32.
The vision towers differ in two places only, each handled explicitly below: CLIP has a `pre_layrnorm` (EVA does not)
and CLIP's patch convolution has no bias (EVA's has one).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import transformers
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from llava_evaclip import (
    EvaCLIPConfig,
    EvaCLIPForImageClassification,
    EvaCLIPModel,
    EvaCLIPTextModel,
    EvaCLIPVisionModel,
)

from conftest import tiny_config, tiny_text_config, tiny_vision_config

ATOL = 1e-5


def _inner(model: nn.Module, name: str) -> nn.Module:
    """transformers 4.x wraps each CLIP tower in `.text_model` / `.vision_model`; 5.x flattened them."""
    return getattr(model, name) if hasattr(model, name) else model


def _clip_text_config(config) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        projection_dim=config.projection_dim, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, max_position_embeddings=config.max_position_embeddings,
        hidden_act="gelu", layer_norm_eps=config.layer_norm_eps, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
    )


def _clip_vision_config(config) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        projection_dim=config.projection_dim, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, image_size=config.image_size, patch_size=config.patch_size,
        num_channels=config.num_channels, hidden_act="gelu", layer_norm_eps=config.layer_norm_eps,
    )


def _randomize(model: nn.Module) -> None:
    """Non-trivial LayerNorm affine parameters and biases, so a swapped or skipped parameter shows up."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
            elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)


def _copy_text(ours: nn.Module, clip_text: nn.Module) -> None:
    """Same module names on both sides; only CLIP's non-persistent position_ids buffer is not ours."""
    result = clip_text.load_state_dict(ours.state_dict(), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(key.endswith("position_ids") for key in result.missing_keys), result.missing_keys


def _copy_vision(ours: nn.Module, clip_vision: nn.Module) -> None:
    """Copy an EVA01-style vision tower into CLIP's. Our patch-conv bias is added to every patch token before the
    positions, so it folds exactly into CLIP's patch position rows; a missing k bias is CLIP's k bias set to zero;
    CLIP's pre_layrnorm (which EVA lacks) becomes the identity."""
    state = dict(ours.state_dict())
    patch_bias = state.pop("embeddings.patch_embedding.bias")
    positions = state["embeddings.position_embedding.weight"].clone()
    positions[1:] += patch_bias
    state["embeddings.position_embedding.weight"] = positions
    for index in range(ours.config.num_hidden_layers):
        key = f"encoder.layers.{index}.self_attn.k_proj.bias"
        if key not in state:
            state[key] = torch.zeros(ours.config.hidden_size)
    clip_vision.pre_layrnorm = nn.Identity()
    result = clip_vision.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(key.endswith("position_ids") for key in result.missing_keys), result.missing_keys


def _text_inputs(config, batch: int = 3, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids below eos, one eos (the largest id, so `argmax` and CLIP 5.x's first-eos rule agree) per row at
    different positions, padding after it; the mask also hides one token inside the first sentence."""
    ids = torch.randint(1, config.eos_token_id - 1, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, eos in enumerate((4, 8, length - 1)[:batch]):
        ids[row, eos] = config.eos_token_id
        ids[row, eos + 1:] = config.pad_token_id
        mask[row, eos + 1:] = 0
    mask[0, 2] = 0
    assert torch.equal(ids.argmax(-1), (ids == config.eos_token_id).int().argmax(-1))
    return ids, mask


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "padding_mask"])
def test_text_tower_matches_clip_text_model(with_mask: bool) -> None:
    config = tiny_text_config()
    ours = EvaCLIPTextModel(config).eval()
    _randomize(ours)
    clip = CLIPTextModel(_clip_text_config(config)).eval()
    _copy_text(ours.text_model, _inner(clip, "text_model"))
    ids, mask = _text_inputs(config)
    mask = mask if with_mask else None
    with torch.no_grad():
        expected = clip(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        actual = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=ATOL, rtol=0)
    assert len(actual.hidden_states) == len(expected.hidden_states) == config.num_hidden_layers + 1
    for ours_state, clip_state in zip(actual.hidden_states[:-1], expected.hidden_states[:-1]):
        torch.testing.assert_close(ours_state, clip_state, atol=ATOL, rtol=0)


def _clip_layer(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """One CLIPEncoderLayer without a mask: 4.x takes (x, mask, causal_mask) and returns a tuple, 5.x (x, mask)."""
    if "causal_attention_mask" in inspect.signature(layer.forward).parameters:
        out = layer(hidden_states, None, None)
    else:
        out = layer(hidden_states, None)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("k_bias", [False, True], ids=["eva_no_k_bias", "k_bias"])
def test_vision_encoder_layers_match_clip(k_bias: bool) -> None:
    config = tiny_vision_config("eva01", k_bias=k_bias)
    ours = EvaCLIPVisionModel(config).eval()
    _randomize(ours)
    clip = CLIPVisionModel(_clip_vision_config(config)).eval()
    clip_tower = _inner(clip, "vision_model")
    _copy_vision(ours.vision_model, clip_tower)
    inputs_embeds = torch.randn(2, 1 + config.num_patches_per_side**2, config.hidden_size)
    with torch.no_grad():
        # every layer on identical inputs
        for our_layer, clip_layer in zip(ours.vision_model.encoder.layers, clip_tower.encoder.layers):
            torch.testing.assert_close(
                our_layer(inputs_embeds)[0], _clip_layer(clip_layer, inputs_embeds), atol=ATOL, rtol=0
            )
        # the whole stack
        expected = clip_tower.encoder(inputs_embeds=inputs_embeds).last_hidden_state
        actual = ours.vision_model.encoder(inputs_embeds).last_hidden_state
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
        # CLS pooling through the final LayerNorm
        torch.testing.assert_close(
            ours.vision_model.post_layernorm(actual[:, 0]), clip_tower.post_layernorm(expected[:, 0]), atol=ATOL, rtol=0
        )


def test_vision_embeddings_and_full_tower_match_clip() -> None:
    """Embeddings (with the patch bias folded into CLIP's positions) and the whole tower, pre_layrnorm aside."""
    config = tiny_vision_config("eva01")
    ours = EvaCLIPVisionModel(config).eval()
    _randomize(ours)
    assert ours.vision_model.embeddings.patch_embedding.bias.abs().sum() > 0
    clip = CLIPVisionModel(_clip_vision_config(config)).eval()
    clip_tower = _inner(clip, "vision_model")
    _copy_vision(ours.vision_model, clip_tower)
    pixel_values = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.vision_model.embeddings(pixel_values), clip_tower.embeddings(pixel_values), atol=ATOL, rtol=0
        )
        expected = clip(pixel_values=pixel_values, output_hidden_states=True)
        actual = ours(pixel_values=pixel_values, output_hidden_states=True)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=ATOL, rtol=0)
    assert len(actual.hidden_states) == len(expected.hidden_states) == config.num_hidden_layers + 1
    for ours_state, clip_state in zip(actual.hidden_states, expected.hidden_states):
        torch.testing.assert_close(ours_state, clip_state, atol=ATOL, rtol=0)


def clip_model_like(ours: EvaCLIPModel) -> CLIPModel:
    """transformers' CLIPModel holding an EVA01-style EvaCLIPModel's weights (CLIP's visual projection has no bias)."""
    config = ours.config
    clip = CLIPModel(CLIPConfig(text_config=_clip_text_config(config.text_config).to_dict(),
                                vision_config=_clip_vision_config(config.vision_config).to_dict(),
                                projection_dim=config.projection_dim))
    _copy_text(ours.text_model, _inner(clip.text_model, "text_model"))
    _copy_vision(ours.vision_model, _inner(clip.vision_model, "vision_model"))
    with torch.no_grad():
        clip.text_projection.weight.copy_(ours.text_projection.weight)
        clip.visual_projection.weight.copy_(ours.visual_projection.weight)
        clip.logit_scale.copy_(ours.logit_scale)
    return clip


def test_full_model_matches_clip_model() -> None:
    """Text features, image features, logits and loss of EvaCLIPModel vs CLIPModel. CLIP's visual projection has no
    bias, so ours is zeroed; everything else is copied as is."""
    config = tiny_config("eva01")
    ours = EvaCLIPModel(config).eval()
    _randomize(ours)
    with torch.no_grad():
        ours.visual_projection.bias.zero_()
        ours.logit_scale.fill_(math.log(20.0))
    clip = clip_model_like(ours).eval()

    ids, mask = _text_inputs(config.text_config)
    pixel_values = torch.randn(3, 3, config.vision_config.image_size, config.vision_config.image_size)
    with torch.no_grad():
        expected = clip(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, return_loss=True)
        actual = ours(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, return_loss=True)
    for name in ("text_embeds", "image_embeds", "logits_per_image", "logits_per_text"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), atol=ATOL, rtol=0)
    torch.testing.assert_close(actual.loss, expected.loss, atol=ATOL, rtol=0)


CLIPForImageClassification = getattr(transformers, "CLIPForImageClassification", None)


@pytest.mark.skipif(CLIPForImageClassification is None, reason="CLIPForImageClassification is new in transformers 4.41")
@pytest.mark.parametrize("num_labels, label_kind", [(3, "single_label"), (1, "regression"), (4, "multi_label"),
                                                    (0, None)])
def test_image_classification_matches_clip(num_labels: int, label_kind) -> None:
    """Logits, loss (each problem type transformers infers from the labels) and hidden states of
    EvaCLIPForImageClassification vs CLIPForImageClassification on the same EVA01-style tower and classifier."""
    base = tiny_config("eva01")
    ours_config = EvaCLIPConfig(text_config=base.text_config.to_dict(), vision_config=base.vision_config.to_dict(),
                                projection_dim=base.projection_dim, num_labels=num_labels)
    ours = EvaCLIPForImageClassification(ours_config).eval()
    _randomize(ours)
    clip_config = CLIPConfig(
        text_config=_clip_text_config(base.text_config).to_dict(),
        vision_config=_clip_vision_config(base.vision_config).to_dict(),
        projection_dim=base.projection_dim, num_labels=num_labels,
    )
    try:
        clip = CLIPForImageClassification(clip_config).eval()
    except AttributeError as error:  # 4.43.4-4.47.1 seen: CLIP inits `classifier.weight`; nn.Identity lacks it
        if num_labels != 0 or "weight" not in str(error):
            raise
        pytest.skip(f"transformers {transformers.__version__}'s CLIPForImageClassification cannot be built with "
                    f"num_labels=0 ({error}); no reference")
    _copy_vision(ours.vision_model, _inner(clip.vision_model, "vision_model"))
    clip.classifier.load_state_dict(ours.classifier.state_dict())

    pixel_values = torch.randn(3, 3, base.vision_config.image_size, base.vision_config.image_size)
    labels = {"single_label": torch.tensor([0, 2, 1]), "regression": torch.randn(3),
              "multi_label": torch.randint(0, 2, (3, max(num_labels, 1))).float(), None: None}[label_kind]
    with torch.no_grad():
        expected = clip(pixel_values=pixel_values, labels=labels, output_hidden_states=True)
        actual = ours(pixel_values=pixel_values, labels=labels, output_hidden_states=True)
    assert actual.logits.shape == expected.logits.shape == (3, num_labels or base.vision_config.hidden_size)
    torch.testing.assert_close(actual.logits, expected.logits, atol=ATOL, rtol=0)
    for ours_state, clip_state in zip(actual.hidden_states, expected.hidden_states):
        torch.testing.assert_close(ours_state, clip_state, atol=ATOL, rtol=0)
    if labels is None:
        assert actual.loss is None and expected.loss is None
    else:
        torch.testing.assert_close(actual.loss, expected.loss, atol=ATOL, rtol=0)
        assert ours.config.problem_type == clip.config.problem_type
