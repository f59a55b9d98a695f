"""Behaviour of the EVA-CLIP models: attention kernels, gradient checkpointing, the contrastive loss, save/load and
Auto classes, loading a tower from a full checkpoint, batch independence, other resolutions (with EVA-02's RoPE
checked against BAAI's rotary table) and the bias flags."""

from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel

from llava_evaclip import (
    EvaCLIPModel,
    EvaCLIPTextConfig,
    EvaCLIPTextModel,
    EvaCLIPTextModelWithProjection,
    EvaCLIPVisionConfig,
    EvaCLIPVisionModel,
    EvaCLIPVisionModelWithProjection,
)
from llava_evaclip.modeling_evaclip import apply_rotary

from conftest import FAMILY_FLAGS, features, tiny_config, tiny_text_config, tiny_vision_config
from conftest import randomize as _randomize

FAMILIES = sorted(FAMILY_FLAGS)
ATOL = 1e-5


def _pixels(config: EvaCLIPVisionConfig, batch: int = 2, size: int | None = None) -> torch.Tensor:
    size = size or config.image_size
    return torch.randn(batch, config.num_channels, size, size)


def _text_inputs(config: EvaCLIPTextConfig, lengths=(4, 7, 10), width: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentences of the given lengths (eos last), right-padded to `width`, with their attention mask."""
    ids = torch.full((len(lengths), width), config.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, config.eos_token_id - 1, (length,))
        ids[row, length - 1] = config.eos_token_id
        mask[row, :length] = 1
    return ids, mask


class _SdpaCounter:
    """Wraps torch.nn.functional.scaled_dot_product_attention, counting calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = F.scaled_dot_product_attention

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)


def _reload(model: nn.Module, directory, cls=None, **kwargs) -> nn.Module:
    model.save_pretrained(directory)
    return (cls or type(model)).from_pretrained(directory, **kwargs).eval()


# --------------------------------------------------------------------------------------------------------------------
# Attention kernels
# --------------------------------------------------------------------------------------------------------------------


def test_default_attention_is_sdpa_in_both_towers(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = _SdpaCounter(monkeypatch)
    config = tiny_config("eva02")
    model = EvaCLIPModel(config).eval()
    ids, mask = _text_inputs(config.text_config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=_pixels(config.vision_config, 3))
    assert counter.calls == config.vision_config.num_hidden_layers + config.text_config.num_hidden_layers


@pytest.mark.parametrize("family", ["eva01", "eva02"], ids=["no_rope", "rope"])
def test_vision_sdpa_matches_eager(family: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = EvaCLIPVisionModel(tiny_vision_config(family))
    _randomize(model)
    model.save_pretrained(tmp_path)
    eager = EvaCLIPVisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = EvaCLIPVisionModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    pixel_values = _pixels(model.config)
    counter = _SdpaCounter(monkeypatch)
    with torch.no_grad():
        expected = eager(pixel_values)
        assert counter.calls == 0, "the eager model must not call sdpa"
        actual = sdpa(pixel_values)
        assert counter.calls == model.config.num_hidden_layers
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=ATOL, rtol=0)


def test_text_sdpa_matches_eager_with_padding_mask(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = EvaCLIPTextModel(tiny_text_config())
    _randomize(model)
    model.save_pretrained(tmp_path)
    eager = EvaCLIPTextModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = EvaCLIPTextModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids, mask = _text_inputs(model.config)
    mask[2, 3] = 0  # a hole inside a sentence, so the mask matters beyond what causality already hides
    counter = _SdpaCounter(monkeypatch)
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask)
        assert counter.calls == 0
        actual = sdpa(ids, attention_mask=mask)
        assert counter.calls == model.config.num_hidden_layers
        unmasked = sdpa(ids)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=ATOL, rtol=0)
    assert not torch.allclose(unmasked.pooler_output[2], actual.pooler_output[2], atol=1e-3), "mask had no effect"


def test_full_model_attn_implementation_reaches_both_towers(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config("eva02")
    model = EvaCLIPModel(config)
    model.save_pretrained(tmp_path)
    eager = EvaCLIPModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = EvaCLIPModel.from_pretrained(tmp_path).eval()
    ids, mask = _text_inputs(config.text_config)
    pixel_values = _pixels(config.vision_config, 3)
    counter = _SdpaCounter(monkeypatch)
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)
        assert counter.calls == 0
        actual = sdpa(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)
        assert counter.calls == config.vision_config.num_hidden_layers + config.text_config.num_hidden_layers
    torch.testing.assert_close(actual.logits_per_image, expected.logits_per_image, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["eva01", "eva02"])
def test_output_attentions_with_sdpa_default(family: str) -> None:
    config = tiny_vision_config(family)
    model = EvaCLIPVisionModel(config).eval()
    pixel_values = _pixels(config)
    with torch.no_grad():
        with_attn = model(pixel_values, output_attentions=True)
        plain = model(pixel_values)
    assert plain.attentions is None
    assert len(with_attn.attentions) == config.num_hidden_layers
    torch.testing.assert_close(with_attn.last_hidden_state, plain.last_hidden_state, atol=ATOL, rtol=0)
    # the returned maps are the ones used: recompute the first layer's softmax(q k^T / sqrt(d)) from its weights
    attn = model.vision_model.encoder.layers[0].self_attn
    with torch.no_grad():
        hidden = model.vision_model.embeddings(pixel_values)
        hidden = model.vision_model.encoder.layers[0].layer_norm1(hidden) if not config.post_layernorm else hidden
        heads = lambda x: x.unflatten(-1, (config.num_attention_heads, -1)).transpose(1, 2)  # noqa: E731
        q, k = heads(attn.q_proj(hidden)), heads(attn.k_proj(hidden))
        if config.use_rope:
            grid = config.num_patches_per_side
            cos, sin = model.vision_model.rotary_embedding(grid, grid, torch.float32)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(config.head_dim), dim=-1)
    torch.testing.assert_close(with_attn.attentions[0], expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing and loss
# --------------------------------------------------------------------------------------------------------------------


def _layer_call_counter(model: nn.Module) -> list[int]:
    calls = [0]
    for module in model.modules():
        if module.__class__.__name__ == "EvaCLIPEncoderLayer":  # its MLP runs inside the layer's (re)computation
            module.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("family", ["eva02", "bige"])
def test_gradient_checkpointing_gives_same_gradients(family: str) -> None:
    config = tiny_config(family)
    reference = EvaCLIPModel(config).train()
    _randomize(reference)
    checkpointed = copy.deepcopy(reference)
    checkpointed.gradient_checkpointing_enable()
    ids, mask = _text_inputs(config.text_config)
    pixel_values = _pixels(config.vision_config, 3)
    num_layers = config.vision_config.num_hidden_layers + config.text_config.num_hidden_layers

    grads = []
    for model in (reference, checkpointed):
        calls = _layer_call_counter(model)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, return_loss=True,
                    output_hidden_states=True)
        # the loss plus a term on every hidden state, so every parameter gets a gradient
        objective = out.loss + sum(h.square().mean() for h in out.vision_model_output.hidden_states)
        objective.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
        # checkpointing re-runs each layer's forward during backward
        expected_calls = num_layers * (2 if model is checkpointed else 1)
        assert calls[0] == expected_calls, (calls[0], expected_calls)

    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad is not None and grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0, msg=name)


def test_gradient_checkpointing_behind_frozen_patch_embeddings() -> None:
    """Partial unfreezing: the layers still get their gradients when the encoder input needs none (reentrant
    checkpointing, transformers 4.x's default, would silently leave them at None)."""
    config = tiny_vision_config("eva02")
    reference = EvaCLIPVisionModel(config).train()
    reference.vision_model.embeddings.requires_grad_(False)
    checkpointed = copy.deepcopy(reference)
    checkpointed.gradient_checkpointing_enable()
    pixel_values = _pixels(config)
    grads = []
    for model in (reference, checkpointed):
        model(pixel_values).pooler_output.square().sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        assert grads[1][name] is not None, f"{name} got no gradient under checkpointing"
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0)


def test_reentrant_checkpoint_function_set_from_outside_keeps_gradients() -> None:
    """LLaVA on transformers 4.x enables checkpointing on the whole model, which hands our encoder a reentrant
    `partial(torch.utils.checkpoint.checkpoint)`; an unfrozen tower behind a frozen input must still get gradients."""
    config = tiny_vision_config("eva02")
    reference = EvaCLIPVisionModel(config).train()
    reference.vision_model.embeddings.requires_grad_(False)
    checkpointed = copy.deepcopy(reference)
    encoder = checkpointed.vision_model.encoder
    encoder.gradient_checkpointing = True
    encoder._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint)
    pixel_values = _pixels(config)
    grads = []
    for model in (reference, checkpointed):
        model(pixel_values).pooler_output.square().sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        assert grads[1][name] is not None, f"{name} got no gradient under an outside reentrant checkpoint function"
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0)


def test_loss_is_symmetric_cross_entropy() -> None:
    config = tiny_config("eva02")
    model = EvaCLIPModel(config).eval()
    _randomize(model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    ids, mask = _text_inputs(config.text_config)
    pixel_values = _pixels(config.vision_config, 3)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, return_loss=True)
        image = F.normalize(features(model.get_image_features(pixel_values=pixel_values)), dim=-1)
        text = F.normalize(features(model.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)
    logits_per_text = 30.0 * text @ image.t()
    labels = torch.arange(3)
    text_to_image = F.cross_entropy(logits_per_text, labels)
    image_to_text = F.cross_entropy(logits_per_text.t(), labels)
    assert abs(text_to_image - image_to_text) > 1e-3, "degenerate case: both directions give the same loss"
    torch.testing.assert_close(out.loss, (text_to_image + image_to_text) / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits_per_text, logits_per_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.text_embeds, text, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.image_embeds, image, atol=1e-6, rtol=0)
    assert model(input_ids=ids, pixel_values=pixel_values).loss is None


# --------------------------------------------------------------------------------------------------------------------
# Save / load and Auto classes
# --------------------------------------------------------------------------------------------------------------------


def _assert_state_dicts_equal(actual: nn.Module, expected: nn.Module) -> None:
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert actual_state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(actual_state[key], value), key


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_is_bit_exact(family: str, tmp_path) -> None:
    config = tiny_config(family)
    model = EvaCLIPModel(config).eval()
    _randomize(model)
    loaded = _reload(model, tmp_path)
    _assert_state_dicts_equal(loaded, model)
    ids, mask = _text_inputs(config.text_config)
    pixel_values = _pixels(config.vision_config, 3)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, output_hidden_states=True)
        actual = loaded(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, output_hidden_states=True)
    for name in ("logits_per_image", "text_embeds", "image_embeds"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name
    for a, e in zip(actual.vision_model_output.hidden_states, expected.vision_model_output.hidden_states):
        assert torch.equal(a, e)


@pytest.mark.parametrize("cls", [EvaCLIPVisionModelWithProjection, EvaCLIPTextModelWithProjection])
def test_save_load_with_projection_is_bit_exact(cls, tmp_path) -> None:
    vision = cls is EvaCLIPVisionModelWithProjection
    model = cls(tiny_vision_config("eva02") if vision else tiny_text_config()).eval()
    _randomize(model)
    loaded = _reload(model, tmp_path)
    _assert_state_dicts_equal(loaded, model)
    inputs = _pixels(model.config) if vision else _text_inputs(model.config)[0]
    with torch.no_grad():
        name = "image_embeds" if vision else "text_embeds"
        assert torch.equal(getattr(loaded(inputs), name), getattr(model(inputs), name))


@pytest.mark.parametrize(
    "cls, make_config, model_type",
    [
        (EvaCLIPModel, lambda: tiny_config("bige"), "evaclip"),
        (EvaCLIPVisionModel, lambda: tiny_vision_config("eva02"), "evaclip_vision_model"),
        (EvaCLIPTextModel, tiny_text_config, "evaclip_text_model"),
    ],
)
def test_auto_classes_round_trip(cls, make_config, model_type: str, tmp_path) -> None:
    model = cls(make_config()).eval()
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == model_type
    assert "auto_map" not in written  # nothing for trust_remote_code to run

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is type(model.config)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is cls
    _assert_state_dicts_equal(loaded, model)
    assert type(AutoModel.from_config(make_config())) is cls


def test_vision_tower_loads_from_full_checkpoint(tmp_path) -> None:
    """What LLaVA does: EvaCLIPVisionModel.from_pretrained on a full EvaCLIPModel directory."""
    config = tiny_config("eva02")
    full = EvaCLIPModel(config).eval()
    _randomize(full)
    full.save_pretrained(tmp_path)

    vision_config = EvaCLIPVisionConfig.from_pretrained(tmp_path)
    assert type(vision_config) is EvaCLIPVisionConfig
    text_config = EvaCLIPTextConfig.from_pretrained(tmp_path)
    assert type(text_config) is EvaCLIPTextConfig
    for loaded, original in ((vision_config, config.vision_config), (text_config, config.text_config)):
        skip = {"transformers_version", "_name_or_path", "architectures", "_attn_implementation_autoset", "dtype",
                "torch_dtype"}
        expected = {k: v for k, v in original.to_dict().items() if k not in skip}
        actual = {k: v for k, v in loaded.to_dict().items() if k not in skip}
        assert actual == expected

    vision, info = EvaCLIPVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    full_state = full.state_dict()
    for key, value in vision.state_dict().items():
        assert torch.equal(value, full_state[key]), key
    pixel_values = _pixels(config.vision_config)
    with torch.no_grad():
        expected = full.vision_model(pixel_values, output_hidden_states=True)
        actual = vision.eval()(pixel_values, output_hidden_states=True)
        assert torch.equal(actual.pooler_output, expected.pooler_output)
        assert all(torch.equal(a, e) for a, e in zip(actual.hidden_states, expected.hidden_states))

        projected = EvaCLIPVisionModelWithProjection.from_pretrained(tmp_path).eval()
        assert torch.equal(projected(pixel_values).image_embeds, features(full.get_image_features(pixel_values=pixel_values)))
        ids, mask = _text_inputs(config.text_config)
        text = EvaCLIPTextModelWithProjection.from_pretrained(tmp_path).eval()
        assert torch.equal(text(ids, attention_mask=mask).text_embeds,
                           features(full.get_text_features(input_ids=ids, attention_mask=mask)))


# --------------------------------------------------------------------------------------------------------------------
# Batch independence
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["eva02", "bige"])
def test_vision_batch_independence(family: str) -> None:
    config = tiny_vision_config(family)
    model = EvaCLIPVisionModel(config).eval()
    pixel_values = _pixels(config, 3)
    with torch.no_grad():
        batched = model(pixel_values)
        for row in range(3):
            alone = model(pixel_values[row:row + 1])
            torch.testing.assert_close(alone.last_hidden_state[0], batched.last_hidden_state[row], atol=ATOL, rtol=0)
            torch.testing.assert_close(alone.pooler_output[0], batched.pooler_output[row], atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["eva01", "eva02", "eva8b"])
def test_forwards_from_several_threads_equal_sequential_ones(family: str, dtype: torch.dtype) -> None:
    """LLaVA's model worker serves requests from threads on one model: concurrent inference forwards (other batch
    sizes and resolutions, the RoPE table cache filled by whichever thread comes first) must give each thread exactly
    its sequential result, not another thread's buffers."""
    import threading

    config = tiny_vision_config(family)
    model = EvaCLIPVisionModel(config).eval().to(dtype)
    side = config.image_size
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, side), (2, side), (2, side), (1, side), (2, side + config.patch_size)]  # equal shapes too
    inputs = [torch.randn(batch, 3, height, side, generator=generator).to(dtype) for batch, height in shapes]
    with torch.no_grad():
        expected = [model(pixels, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2]
                    for pixels in inputs]
    for rotary in (module for module in model.modules() if hasattr(module, "reset_cache")):
        rotary.reset_cache()
    mismatches: list = []
    start = threading.Barrier(len(inputs))

    def serve(index: int) -> None:
        start.wait()
        try:
            with torch.no_grad():
                for _ in range(5):
                    out = model(inputs[index], output_hidden_states=True,
                                interpolate_pos_encoding=True).hidden_states[-2]
                    if not torch.equal(out, expected[index]):
                        mismatches.append((index, (out.float() - expected[index].float()).abs().max().item()))
        except Exception as error:  # a thread's exception would otherwise only be printed
            mismatches.append((index, repr(error)))

    threads = [threading.Thread(target=serve, args=(index,)) for index in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not mismatches


def test_text_batch_independence_with_padding() -> None:
    """Each sentence alone, unpadded, equals its row in a right-padded batch."""
    config = tiny_text_config()
    model = EvaCLIPTextModel(config).eval()
    _randomize(model)
    lengths = (4, 7, 10)
    ids, mask = _text_inputs(config, lengths)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for row, length in enumerate(lengths):
            alone = model(ids[row:row + 1, :length])
            torch.testing.assert_close(alone.last_hidden_state[0], batched.last_hidden_state[row, :length],
                                       atol=ATOL, rtol=0)
            torch.testing.assert_close(alone.pooler_output[0], batched.pooler_output[row], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Other resolutions and EVA-02 RoPE
# --------------------------------------------------------------------------------------------------------------------


def _baai_rope(head_dim: int, grid: int):
    """BAAI's own table: VisionRotaryEmbeddingFast(dim=head_dim/2, pt_seq_len=16, ft_seq_len=grid), as EVA-02 builds
    it for its patch grid."""
    rope_module = pytest.importorskip("consisid_eva_clip.rope")
    return rope_module.VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=16, ft_seq_len=grid)


@pytest.mark.parametrize("size", [35, 42])
def test_interpolate_pos_encoding_other_resolution(size: int) -> None:
    from timm.layers import resample_abs_pos_embed

    config = tiny_vision_config("eva02")
    assert config.rope_pt_grid_size == 16
    model = EvaCLIPVisionModel(config).eval()
    grid = size // config.patch_size
    seen = {}
    model.vision_model.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(rotary=kwargs.get("rotary")), with_kwargs=True
    )
    pixel_values = _pixels(config, 2, size)
    with torch.no_grad():
        out = model(pixel_values, interpolate_pos_encoding=True, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 1 + grid * grid, config.hidden_size)

    # the rotary table used at this grid is BAAI's for that grid; the CLS row is the identity
    cos, sin = seen["rotary"]
    baai = _baai_rope(config.head_dim, grid)
    assert cos.shape == (1 + grid * grid, config.head_dim)
    torch.testing.assert_close(cos[1:], baai.freqs_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[1:], baai.freqs_sin, atol=1e-6, rtol=0)
    assert torch.equal(cos[0], torch.ones(config.head_dim)) and torch.equal(sin[0], torch.zeros(config.head_dim))
    # and rotating with it is BAAI's rotation of the patch tokens
    q = torch.randn(2, config.num_attention_heads, 1 + grid * grid, config.head_dim)
    rotated = apply_rotary(q, cos, sin)
    torch.testing.assert_close(rotated[:, :, 1:], baai(q[:, :, 1:]), atol=1e-6, rtol=0)
    assert torch.equal(rotated[:, :, :1], q[:, :, :1])

    # positions: bicubic resample of the patch grid (timm's resampler), the class position unchanged
    emb = model.vision_model.embeddings
    positions = resample_abs_pos_embed(emb.position_embedding.weight[None], new_size=(grid, grid),
                                       old_size=(config.num_patches_per_side,) * 2, num_prefix_tokens=1,
                                       interpolation="bicubic", antialias=False)
    patches = F.conv2d(pixel_values, emb.patch_embedding.weight, emb.patch_embedding.bias, stride=config.patch_size)
    cls = emb.class_embedding.reshape(1, 1, -1).expand(2, 1, -1)
    expected = torch.cat((cls, patches.flatten(2).transpose(1, 2)), dim=1) + positions
    torch.testing.assert_close(out.hidden_states[0], expected, atol=1e-5, rtol=0)


def test_native_rope_table_matches_baai_and_interpolation_is_a_no_op_at_native_size() -> None:
    config = tiny_vision_config("eva02")
    model = EvaCLIPVisionModel(config).eval()
    grid = config.num_patches_per_side
    cos, sin = model.vision_model.rotary_embedding(grid, grid, torch.float32)
    baai = _baai_rope(config.head_dim, grid)
    torch.testing.assert_close(cos[1:], baai.freqs_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[1:], baai.freqs_sin, atol=1e-6, rtol=0)
    pixel_values = _pixels(config)
    with torch.no_grad():
        assert torch.equal(model(pixel_values, interpolate_pos_encoding=True).last_hidden_state,
                           model(pixel_values).last_hidden_state)


# --------------------------------------------------------------------------------------------------------------------
# Bias flags
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_bias_flags_create_only_the_biases_asked_for(tower: str) -> None:
    make = (lambda **flags: tiny_vision_config("eva01", **flags)) if tower == "vision" else tiny_text_config
    model_cls = EvaCLIPVisionModel if tower == "vision" else EvaCLIPTextModel
    eva = model_cls(make(k_bias=False))
    names = {name for name, _ in eva.named_parameters()}
    assert not any(name.endswith("k_proj.bias") for name in names)
    assert not any(key.endswith("k_proj.bias") for key in eva.state_dict())
    assert sum(name.endswith("q_proj.bias") for name in names) == eva.config.num_hidden_layers
    assert sum(name.endswith("v_proj.bias") for name in names) == eva.config.num_hidden_layers

    with_k = model_cls(make(k_bias=True, q_bias=False))
    names = {name for name, _ in with_k.named_parameters()}
    assert sum(name.endswith("k_proj.bias") for name in names) == with_k.config.num_hidden_layers
    assert not any(name.endswith("q_proj.bias") for name in names)


def test_eva_vision_default_has_no_k_bias() -> None:
    """EVA checkpoints carry no k bias, so the vision default must not create one."""
    assert EvaCLIPVisionConfig().k_bias is False
    model = EvaCLIPVisionModel(tiny_vision_config("eva01"))
    assert model.vision_model.encoder.layers[0].self_attn.k_proj.bias is None
