"""Output contracts of every EVA-CLIP model class, checked against values recomputed in the test from the weights
(torch.nn.functional ops), for each vision family at toy width."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llava_evaclip import (
    EvaCLIPModel,
    EvaCLIPTextModel,
    EvaCLIPTextModelWithProjection,
    EvaCLIPVisionModel,
    EvaCLIPVisionModelWithProjection,
)
from llava_evaclip.modeling_evaclip import EvaCLIPRMSNorm

from conftest import FAMILY_FLAGS, features, tiny_config, tiny_text_config, tiny_vision_config

FAMILIES = sorted(FAMILY_FLAGS)
ATOL = 1e-5


def _randomize_norms(model: nn.Module) -> None:
    """LayerNorms start as the identity affine map; make them non-trivial so a skipped or misplaced norm shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, EvaCLIPRMSNorm)):
                module.weight.normal_(1.0, 0.3)
            if isinstance(module, nn.LayerNorm):
                module.bias.normal_(0.0, 0.3)


def _layer_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """The tower's final norm: LayerNorm, or RMSNorm (EVA-CLIP-8B / 18B) with torch's own kernel (torch >= 2.4; by
    its definition before)."""
    if isinstance(norm, EvaCLIPRMSNorm):
        if hasattr(F, "rms_norm"):
            return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
        return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def _vision_embeddings(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Conv patches (with bias), class token first, learned positions added: recomputed from the weights."""
    emb = tower.embeddings
    patches = F.conv2d(pixel_values, emb.patch_embedding.weight, emb.patch_embedding.bias, stride=emb.patch_size)
    patches = patches.flatten(2).transpose(1, 2)
    cls = emb.class_embedding.reshape(1, 1, -1).expand(pixel_values.shape[0], 1, -1)
    return torch.cat((cls, patches), dim=1) + emb.position_embedding.weight


def _text_inputs(config, eos_positions=(3, 6, 9), length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with the eos token (the largest id) at different positions, padding after it."""
    ids = torch.randint(1, config.eos_token_id - 1, (len(eos_positions), length))
    mask = torch.ones_like(ids)
    for row, eos in enumerate(eos_positions):
        ids[row, eos] = config.eos_token_id
        ids[row, eos + 1:] = config.pad_token_id
        mask[row, eos + 1:] = 0
    return ids, mask


def _assert_same(actual, expected) -> None:
    """Equal nested tuples of tensors (or None)."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _assert_same(a, e)
    else:
        assert torch.equal(actual, expected)


# --------------------------------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_model_outputs(family: str) -> None:
    config = tiny_vision_config(family)
    model = EvaCLIPVisionModel(config).eval()
    _randomize_norms(model)
    pixel_values = torch.randn(2, 3, config.image_size, config.image_size)
    seq = 1 + config.num_patches_per_side**2
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True, output_attentions=True)
        plain = model(pixel_values)

    assert out.last_hidden_state.shape == (2, seq, config.hidden_size)
    assert out.pooler_output.shape == (2, config.hidden_size)
    assert plain.hidden_states is None and plain.attentions is None

    # embeddings output + one entry per layer, each the output of that layer on the previous entry
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[0], _vision_embeddings(model.vision_model, pixel_values),
                               atol=1e-6, rtol=0)
    rotary = None
    if config.use_rope:
        rotary = model.vision_model.rotary_embedding(config.num_patches_per_side, config.num_patches_per_side,
                                                     torch.float32)
    with torch.no_grad():
        for index, layer in enumerate(model.vision_model.encoder.layers):
            expected = layer(out.hidden_states[index], None, rotary)[0]
            torch.testing.assert_close(out.hidden_states[index + 1], expected, atol=ATOL, rtol=0)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    torch.testing.assert_close(plain.last_hidden_state, out.last_hidden_state, atol=ATOL, rtol=0)

    # CLS pooling through the final LayerNorm; last_hidden_state stays before it
    expected_pooled = _layer_norm(out.last_hidden_state[:, 0], model.vision_model.post_layernorm)
    torch.testing.assert_close(out.pooler_output, expected_pooled, atol=1e-6, rtol=0)
    assert not torch.allclose(out.last_hidden_state[:, 0], out.pooler_output, atol=1e-3)

    # attention maps: one per layer, softmax rows
    assert len(out.attentions) == config.num_hidden_layers
    for weights in out.attentions:
        assert weights.shape == (2, config.num_attention_heads, seq, seq)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, config.num_attention_heads, seq), atol=1e-5, rtol=0)

    # return_dict=False: (last_hidden_state, pooler_output, hidden_states, attentions)
    with torch.no_grad():
        as_tuple = model(pixel_values, output_hidden_states=True, output_attentions=True, return_dict=False)
        short = model(pixel_values, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 4
    _assert_same(as_tuple, (out.last_hidden_state, out.pooler_output, out.hidden_states, out.attentions))
    assert isinstance(short, tuple) and len(short) == 2
    _assert_same(short, (plain.last_hidden_state, plain.pooler_output))


@pytest.mark.parametrize("family", ["eva02", "bige"])
def test_vision_model_with_projection_outputs(family: str) -> None:
    config = tiny_vision_config(family)
    model = EvaCLIPVisionModelWithProjection(config).eval()
    _randomize_norms(model)
    with torch.no_grad():
        model.visual_projection.bias.normal_()
    pixel_values = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True, output_attentions=True)
    assert out.image_embeds.shape == (2, config.projection_dim)
    assert out.last_hidden_state.shape == (2, 1 + config.num_patches_per_side**2, config.hidden_size)
    pooled = _layer_norm(out.last_hidden_state[:, 0], model.vision_model.post_layernorm)
    expected = F.linear(pooled, model.visual_projection.weight, model.visual_projection.bias)
    torch.testing.assert_close(out.image_embeds, expected, atol=1e-6, rtol=0)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert len(out.attentions) == config.num_hidden_layers

    with torch.no_grad():
        as_tuple = model(pixel_values, output_hidden_states=True, output_attentions=True, return_dict=False)
        plain = model(pixel_values)
        short = model(pixel_values, return_dict=False)
    _assert_same(as_tuple, (out.image_embeds, out.last_hidden_state, out.hidden_states, out.attentions))
    _assert_same(short, (plain.image_embeds, plain.last_hidden_state))


# --------------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------------


def test_text_model_outputs() -> None:
    config = tiny_text_config()
    model = EvaCLIPTextModel(config).eval()
    _randomize_norms(model)
    ids, mask = _text_inputs(config)
    batch, length = ids.shape
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)

    assert out.last_hidden_state.shape == (batch, length, config.hidden_size)
    assert out.pooler_output.shape == (batch, config.hidden_size)

    # embeddings output + every layer; last_hidden_state is the final LayerNorm of the last layer's output
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    embeddings = model.text_model.embeddings
    expected_embeddings = embeddings.token_embedding.weight[ids] + embeddings.position_embedding.weight[:length]
    torch.testing.assert_close(out.hidden_states[0], expected_embeddings, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        out.last_hidden_state, _layer_norm(out.hidden_states[-1], model.text_model.final_layer_norm), atol=1e-6, rtol=0
    )

    # EOS pooling at input_ids.argmax(-1), which is not the last position here
    eos = ids.argmax(-1)
    assert eos.tolist() == [3, 6, 9] and (eos != length - 1).sum() == 2
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(batch), eos], atol=0, rtol=0)

    # attention maps: causal, padded keys get no weight, rows sum to one
    assert len(out.attentions) == config.num_hidden_layers
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    for weights in out.attentions:
        assert weights.shape == (batch, config.num_attention_heads, length, length)
        assert weights[..., future].abs().max() == 0
        assert weights.masked_select((mask == 0)[:, None, None, :].expand_as(weights)).abs().max() == 0
        torch.testing.assert_close(weights.sum(-1), torch.ones(batch, config.num_attention_heads, length),
                                   atol=1e-5, rtol=0)

    with torch.no_grad():
        as_tuple = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True,
                         return_dict=False)
        short = model(ids, attention_mask=mask, return_dict=False)
    _assert_same(as_tuple, (out.last_hidden_state, out.pooler_output, out.hidden_states, out.attentions))
    assert len(short) == 2


def test_text_pooling_follows_argmax_not_the_eos_id() -> None:
    """A row without the eos id pools at its largest id, as OpenAI-CLIP and the InternVL port do."""
    config = tiny_text_config()
    model = EvaCLIPTextModel(config).eval()
    ids = torch.tensor([[5, 7, 96, 4, 3, 2]])
    with torch.no_grad():
        out = model(ids)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 2])


def test_text_model_with_projection_outputs() -> None:
    config = tiny_text_config()
    model = EvaCLIPTextModelWithProjection(config).eval()
    _randomize_norms(model)
    assert model.text_projection.bias is None
    ids, mask = _text_inputs(config)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert out.text_embeds.shape == (ids.shape[0], config.projection_dim)
    pooled = out.last_hidden_state[torch.arange(ids.shape[0]), ids.argmax(-1)]
    torch.testing.assert_close(out.text_embeds, F.linear(pooled, model.text_projection.weight), atol=1e-6, rtol=0)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert len(out.attentions) == config.num_hidden_layers
    with torch.no_grad():
        as_tuple = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True,
                         return_dict=False)
    _assert_same(as_tuple, (out.text_embeds, out.last_hidden_state, out.hidden_states, out.attentions))


# --------------------------------------------------------------------------------------------------------------------
# Full model
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_full_model_outputs(family: str) -> None:
    config = tiny_config(family)
    model = EvaCLIPModel(config).eval()
    _randomize_norms(model)
    vision, text = config.vision_config, config.text_config
    ids, mask = _text_inputs(text)  # 3 texts
    pixel_values = torch.randn(2, 3, vision.image_size, vision.image_size)  # 2 images
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, output_hidden_states=True,
                    output_attentions=True)

    assert out.logits_per_image.shape == (2, 3)
    assert out.logits_per_text.shape == (3, 2)
    assert torch.equal(out.logits_per_image, out.logits_per_text.t())
    assert out.image_embeds.shape == (2, config.projection_dim)
    assert out.text_embeds.shape == (3, config.projection_dim)
    assert out.loss is None

    # embeddings: projections of each tower's pooled output, L2-normalised; logits scaled by exp(logit_scale)
    vision_pooled = _layer_norm(out.vision_model_output.last_hidden_state[:, 0], model.vision_model.post_layernorm)
    image = F.linear(vision_pooled, model.visual_projection.weight, model.visual_projection.bias)
    text_last = out.text_model_output.last_hidden_state
    txt = F.linear(text_last[torch.arange(3), ids.argmax(-1)], model.text_projection.weight)
    image, txt = image / image.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out.image_embeds, image, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.text_embeds, txt, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits_per_text, model.logit_scale.exp() * txt @ image.t(), atol=1e-5, rtol=0)

    # each tower's own output, with hidden states and attentions
    assert out.vision_model_output.last_hidden_state.shape == (2, 1 + vision.num_patches_per_side**2,
                                                               vision.hidden_size)
    assert out.text_model_output.last_hidden_state.shape == (3, ids.shape[1], text.hidden_size)
    assert len(out.vision_model_output.hidden_states) == vision.num_hidden_layers + 1
    assert len(out.text_model_output.hidden_states) == text.num_hidden_layers + 1
    assert len(out.vision_model_output.attentions) == vision.num_hidden_layers
    assert len(out.text_model_output.attentions) == text.num_hidden_layers

    # get_*_features return the projected, not normalised, embeddings
    with torch.no_grad():
        image_features = features(model.get_image_features(pixel_values=pixel_values))
        text_features = features(model.get_text_features(input_ids=ids, attention_mask=mask))
    expected_image = F.linear(vision_pooled, model.visual_projection.weight, model.visual_projection.bias)
    torch.testing.assert_close(image_features, expected_image, atol=1e-5, rtol=0)
    expected_text = F.linear(text_last[torch.arange(3), ids.argmax(-1)], model.text_projection.weight)
    torch.testing.assert_close(text_features, expected_text, atol=1e-5, rtol=0)

    # return_dict=False: (logits_per_image, logits_per_text, text_embeds, image_embeds, text tuple, vision tuple),
    # with the loss first when asked for
    three_images = torch.randn(3, 3, vision.image_size, vision.image_size)
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask)
        as_tuple = model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, return_dict=False)
        square = model(input_ids=ids, pixel_values=three_images, attention_mask=mask, return_loss=True)
        square_tuple = model(input_ids=ids, pixel_values=three_images, attention_mask=mask, return_loss=True,
                             return_dict=False)
    assert len(as_tuple) == 6
    _assert_same(as_tuple[:4], (plain.logits_per_image, plain.logits_per_text, plain.text_embeds, plain.image_embeds))
    _assert_same(as_tuple[4], (plain.text_model_output.last_hidden_state, plain.text_model_output.pooler_output))
    _assert_same(as_tuple[5], (plain.vision_model_output.last_hidden_state, plain.vision_model_output.pooler_output))
    torch.testing.assert_close(plain.logits_per_image, out.logits_per_image, atol=ATOL, rtol=0)
    assert square.loss is not None and square.loss.ndim == 0
    assert len(square_tuple) == 7
    _assert_same(square_tuple[:5], (square.loss, square.logits_per_image, square.logits_per_text, square.text_embeds,
                                    square.image_embeds))
