"""Differential fuzzing of the numbers against BAAI's own code, on a fixed sample of random toy configs.

Each seed draws a BAAI vision config across the flag space (RoPE on / off with `pt_hw_seq_len` != the grid, with and
without `intp_freq`; SwiGLU, sub-LN, post-norm, layer scale, q/v biases; patch and image sizes, head counts, odd
token counts) and a text config, builds it in BAAI's code (`consisid_eva_clip`; EVA-CLIP-8B / 18B's RMSNorm flags in
BAAI's `eva_clip` of that release), converts it and compares in fp32, relative to the reference's magnitude (at least
1): every hidden state (BAAI's block outputs, hooked), `hidden_states[-2]` and `select_hidden_states` (what LLaVA
reads), the features, the normalised embeddings and the logits, under no_grad, inference_mode and enable_grad. The
reference runs in fp64 (BAAI's fp32 forward is within 1e-6 of it on these seeds).
`interpolate_pos_encoding=True` at another grid is checked against BAAI's model built at that size with BAAI's own
`resize_evaclip_pos_embed`. The RoPE tables after a dtype round trip (`model.half().float()`) against BAAI's fp32
tables. BAAI config keys that once converted silently to other numbers must be refused or match.
These seeds are a fixed sample of a much larger off-line sweep of the same generator.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
from pathlib import Path

import pytest
import torch

consisid_model = pytest.importorskip("consisid_eva_clip.model", reason="BAAI's reference code (consisid-eva-clip)")
consisid_utils = pytest.importorskip("consisid_eva_clip.utils", reason="BAAI's reference code (consisid-eva-clip)")


from llava_evaclip import EvaCLIPModel  # noqa: E402
from llava_evaclip.convert import ConversionError, convert_checkpoint  # noqa: E402

REL_TOL = 2e-5
VOCAB = 120
MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "enable_grad": torch.enable_grad}


def _rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} vs reference {tuple(expected.shape)}"
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = _rel_error(actual, expected)
    assert error <= REL_TOL, f"{what}: max abs diff {error:.3g} x max(1, |reference|) > {REL_TOL}"


def _sample_config(rng: random.Random, big: bool) -> dict:
    rope = rng.random() < 0.6
    width = rng.choice([32, 48, 64])
    head_width = rng.choice([h for h in (4, 8, 12, 16, 32) if width % h == 0 and (not rope or h % 4 == 0)])
    patch = rng.choice([2, 3, 4, 5, 7])
    grid = rng.randint(1, 6)
    intp = rng.random() < 0.6
    swiglu = rng.random() < 0.5
    vision = {"eva_model_name": "eva-clip-fuzz", "drop_path_rate": 0.0, "xattn": False, "fusedLN": False,
              "image_size": patch * grid, "patch_size": patch, "layers": rng.randint(1, 3), "width": width,
              "head_width": head_width, "mlp_ratio": rng.choice([2.6667, 4.0, 4.3637, 1.5]),
              # consisid's EVA head always has a bias (the converter refuses it without q/v biases); 8B / 18B's code
              # ties it to qkv_bias
              "qkv_bias": not big or rng.random() < 0.3, "postnorm": rng.random() < 0.3, "rope": rope,
              # BAAI's table has pt_hw_seq_len^2 rows without intp_freq: only the grid's size works there
              "pt_hw_seq_len": rng.randint(1, 9) if intp else grid, "intp_freq": intp, "naiveswiglu": swiglu,
              # BAAI's plain (GELU) Mlp builds its sub-LN with nn.LayerNorm's eps: `test_known_silent_configs`
              "subln": swiglu and rng.random() < 0.6}
    if big:
        vision["use_rms_norm"] = rng.random() < 0.7
    layer_scale = rng.choice([None, None, 0.1])
    if layer_scale is not None:
        vision["ls_init_value"] = layer_scale
    text_width = rng.choice([32, 48])
    text = {"context_length": rng.choice([5, 8, 13]), "vocab_size": VOCAB, "width": text_width,
            "heads": rng.choice([1, 2, 4]), "layers": rng.randint(1, 2), "xattn": False, "fusedLN": False}
    if rng.random() < 0.3:
        text["ls_init_value"] = 0.1
    return {"embed_dim": rng.choice([8, 16]), "vision_cfg": vision, "text_cfg": text}


def _build_reference(model_module, cfg: dict, layout_clip: bool, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model_class = model_module.CLIP if layout_clip else model_module.CustomCLIP
    reference = model_class(**copy.deepcopy(cfg)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return reference


def _convert(tmp_path: Path, reference: torch.nn.Module, cfg: dict) -> Path:
    checkpoint, arch, out = tmp_path / "baai.pt", tmp_path / "arch.json", tmp_path / "converted"
    torch.save(reference.state_dict(), checkpoint)
    arch.write_text(json.dumps(cfg))
    convert_checkpoint(checkpoint, out, arch=str(arch))
    return out


def _inputs(cfg: dict, rng: random.Random, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    batch, size, context = rng.randint(1, 3), cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    images = torch.randn(batch, 3, size, size, generator=generator)
    ids = torch.zeros(batch, context, dtype=torch.long)  # open_clip-style: zero padding after the end token
    for row in range(batch):
        length = rng.randint(2, context)
        ids[row, : length - 1] = torch.randint(1, VOCAB - 1, (length - 1,), generator=generator)
        ids[row, length - 1] = VOCAB - 1
    return images, ids


def _reference_outputs(reference: torch.nn.Module, images: torch.Tensor, ids: torch.Tensor, layout_clip: bool):
    """BAAI's model in fp64: every vision / text block input and output (hooked), features, embeds and logits."""
    reference = copy.deepcopy(reference).double()
    text_tower = reference if layout_clip else reference.text
    vision_states: list[torch.Tensor] = []
    text_states: list[torch.Tensor] = []
    blocks, resblocks = reference.visual.blocks, text_tower.transformer.resblocks
    handles = [blocks[0].register_forward_pre_hook(lambda module, args: vision_states.append(args[0])),
               resblocks[0].register_forward_pre_hook(lambda module, args: text_states.append(args[0].permute(1, 0, 2)))]
    handles += [block.register_forward_hook(lambda module, args, out: vision_states.append(out)) for block in blocks]
    handles += [block.register_forward_hook(lambda module, args, out: text_states.append(out.permute(1, 0, 2)))
                for block in resblocks]
    try:
        with torch.no_grad():
            image_normed, text_normed, scale = reference(images.double(), ids)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        image_features, text_features = reference.encode_image(images.double()), reference.encode_text(ids)
    return {"vision": vision_states, "text": text_states, "image_features": image_features,
            "text_features": text_features, "image_embeds": image_normed, "text_embeds": text_normed,
            "logits_per_image": scale * image_normed @ text_normed.t()}


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _check_model(model: EvaCLIPModel, expected: dict, images: torch.Tensor, ids: torch.Tensor, what: str) -> None:
    layers = model.config.vision_config.num_hidden_layers
    for mode, context in MODES.items():
        with context():
            output = model(input_ids=ids, pixel_values=images, output_hidden_states=True)
            image_features = _features(model.get_image_features(pixel_values=images))
            text_features = _features(model.get_text_features(input_ids=ids))
            selected = model.vision_model.select_hidden_states(images, [layers - 1])
        label = f"{what} [{mode}]"
        vision_hidden = output.vision_model_output.hidden_states
        assert len(vision_hidden) == len(expected["vision"]) == layers + 1
        for index, (actual, reference) in enumerate(zip(vision_hidden, expected["vision"])):
            _assert_close(actual, reference, f"{label} vision hidden_states[{index}]")
        _assert_close(selected[layers - 1], expected["vision"][-2], f"{label} select_hidden_states (LLaVA's -2)")
        text_hidden = output.text_model_output.hidden_states
        assert len(text_hidden) == len(expected["text"])
        for index, (actual, reference) in enumerate(zip(text_hidden, expected["text"])):
            _assert_close(actual, reference, f"{label} text hidden_states[{index}]")
        for name in ("image_embeds", "text_embeds", "logits_per_image"):
            _assert_close(getattr(output, name), expected[name], f"{label} {name}")
        _assert_close(image_features, expected["image_features"], f"{label} image features")
        _assert_close(text_features, expected["text_features"], f"{label} text features")


@pytest.mark.parametrize("seed", range(8))
def test_random_baai_config_converts_to_the_same_numbers(tmp_path, seed):
    rng = random.Random(seed)
    cfg = _sample_config(rng, big=False)
    layout_clip = rng.random() < 0.5
    reference = _build_reference(consisid_model, cfg, layout_clip, seed)
    model = EvaCLIPModel.from_pretrained(_convert(tmp_path, reference, cfg)).eval()
    images, ids = _inputs(cfg, rng, seed)
    _check_model(model, _reference_outputs(reference, images, ids, layout_clip), images, ids, f"seed {seed} {cfg}")


@pytest.mark.parametrize("seed", range(100, 105))
def test_random_8b_18b_style_config_converts_to_the_same_numbers(tmp_path, eva_clip, seed):
    """RMSNorm and bias-free q/v/head (BAAI's 8B / 18B code ties the head's bias to qkv_bias) across the flags."""
    rng = random.Random(seed)
    cfg = _sample_config(rng, big=True)
    reference = _build_reference(eva_clip.model, cfg, False, seed)
    model = EvaCLIPModel.from_pretrained(_convert(tmp_path, reference, cfg)).eval()
    images, ids = _inputs(cfg, rng, seed)
    _check_model(model, _reference_outputs(reference, images, ids, False), images, ids, f"seed {seed} {cfg}")


@pytest.mark.parametrize("seed", range(200, 205))
def test_interpolated_positions_equal_baai_resized_to_the_new_grid(tmp_path, seed):
    """`interpolate_pos_encoding=True` at another grid against BAAI's model built at that image size (its RoPE
    table for that grid: `pt_hw_seq_len` kept with `intp_freq`, the grid itself without) with the position
    embedding resized by BAAI's `resize_evaclip_pos_embed`."""
    rng = random.Random(seed)
    cfg = _sample_config(rng, big=False)
    vision = cfg["vision_cfg"]
    patch, grid = vision["patch_size"], vision["image_size"] // vision["patch_size"]
    new_grid = rng.choice([size for size in range(1, 6) if size != grid])
    reference = _build_reference(consisid_model, cfg, False, seed)
    model = EvaCLIPModel.from_pretrained(_convert(tmp_path, reference, cfg)).eval()

    resized_cfg = copy.deepcopy(cfg)
    resized_cfg["vision_cfg"]["image_size"] = patch * new_grid
    if not vision["intp_freq"]:
        resized_cfg["vision_cfg"]["pt_hw_seq_len"] = new_grid
    resized = consisid_model.CustomCLIP(**copy.deepcopy(resized_cfg)).eval()
    state_dict = {key: value.clone() for key, value in reference.state_dict().items() if "freqs_" not in key}
    with contextlib.redirect_stdout(io.StringIO()):
        consisid_utils.resize_evaclip_pos_embed(state_dict, resized)
    missing, unexpected = resized.load_state_dict(state_dict, strict=False)
    assert not unexpected and all("freqs_" in key for key in missing)

    images = torch.randn(2, 3, patch * new_grid, patch * new_grid, generator=torch.Generator().manual_seed(seed))
    resized = resized.double()
    states: list[torch.Tensor] = []
    handles = [resized.visual.blocks[0].register_forward_pre_hook(lambda module, args: states.append(args[0]))]
    handles += [block.register_forward_hook(lambda module, args, out: states.append(out))
                for block in resized.visual.blocks]
    with torch.no_grad():
        expected = resized.encode_image(images.double())
    for handle in handles:
        handle.remove()
    for mode, context in MODES.items():
        with context():
            output = model.vision_model(images, interpolate_pos_encoding=True, output_hidden_states=True)
            features = _features(model.get_image_features(pixel_values=images, interpolate_pos_encoding=True))
        for index, (actual, reference_state) in enumerate(zip(output.hidden_states, states)):
            _assert_close(actual, reference_state, f"seed {seed} grid {grid}->{new_grid} [{mode}] hidden_states[{index}]")
        _assert_close(features, expected, f"seed {seed} grid {grid}->{new_grid} [{mode}] image features")


@pytest.mark.parametrize("dtypes", [("half", "float"), ("bfloat16", "float")])
def test_rope_tables_after_a_half_precision_round_trip_are_baais_fp32_tables(tmp_path, dtypes):
    """`model.half().float()` rounds the weights, not the RoPE tables, which are computed from the config: the
    result equals BAAI's model holding the same rounded weights with its fp32 tables (before the fix the tables kept
    the half-precision rounding: 5e-4 off in fp32)."""
    cfg = {"embed_dim": 16, "text_cfg": {"context_length": 8, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 1,
                                         "xattn": False, "fusedLN": False},
           "vision_cfg": {"eva_model_name": "eva-clip-fuzz", "drop_path_rate": 0.0, "xattn": False, "fusedLN": False,
                          "image_size": 28, "patch_size": 7, "layers": 2, "width": 32, "head_width": 8,
                          "mlp_ratio": 2.6667, "rope": True, "pt_hw_seq_len": 3, "intp_freq": True,
                          "naiveswiglu": True, "subln": True}}
    reference = _build_reference(consisid_model, cfg, False, seed=11)
    model = EvaCLIPModel.from_pretrained(_convert(tmp_path, reference, cfg)).eval()
    for dtype in dtypes:
        model = getattr(model, dtype)()
    rounded = copy.deepcopy(reference)
    for dtype in dtypes:  # the weights go through the same casts; BAAI's RoPE tables stay as built (fp32)
        with torch.no_grad():
            for parameter in rounded.parameters():
                parameter.copy_(getattr(parameter, dtype)())
    rotary = model.vision_model.rotary_embedding
    assert rotary.cos.dtype == torch.float32
    for ours, baai in ((rotary.cos, reference.visual.rope.freqs_cos), (rotary.sin, reference.visual.rope.freqs_sin)):
        error = (ours[1:] - baai).abs().max().item()  # row 0: our identity row for CLS
        assert error <= 1e-6, f"RoPE table {error:.3g} off BAAI's fp32 table after {'.'.join(dtypes)}()"
    images, ids = _inputs(cfg, random.Random(0), seed=0)
    expected = _reference_outputs(rounded, images, ids, False)
    with torch.no_grad():
        hidden = model.vision_model(images, output_hidden_states=True).hidden_states
    for index, (actual, reference_state) in enumerate(zip(hidden, expected["vision"])):
        _assert_close(actual, reference_state, f"{'.'.join(dtypes)} round trip: hidden_states[{index}]")


# BAAI config keys that no release uses and that once converted silently to other numbers: conversion must refuse
# them or match BAAI.
SILENT_CONFIGS = {  # name: (changes, top level?, the key a refusal names, or None where conversion must match)
    # BAAI's Block builds its plain (GELU) Mlp without its norm_layer: the sub-LN is nn.LayerNorm(eps=1e-5), not 1e-6
    "subln_without_swiglu": ({"vision_cfg": {"subln": True}}, False, "subln"),
    # BAAI's TextTransformer then attends bidirectionally; ours is always causal (text embeds 0.2 apart)
    "text_attn_mask_false": ({"text_cfg": {"attn_mask": False}}, False, "attn_mask"),
    # CLIP(quick_gelu=True): QuickGELU in the text tower only (ours kept GELU: text embeds 5e-3 apart)
    "quick_gelu": ({"quick_gelu": True}, True, None),
}


@pytest.mark.parametrize("name", list(SILENT_CONFIGS))
def test_known_silent_configs_refuse_or_match(tmp_path, name):
    changes, top_level, refused_key = SILENT_CONFIGS[name]
    cfg = {"embed_dim": 16, "text_cfg": {"context_length": 8, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 2,
                                         "xattn": False, "fusedLN": False},
           "vision_cfg": {"eva_model_name": "eva-clip-fuzz", "drop_path_rate": 0.0, "xattn": False, "fusedLN": False,
                          "image_size": 16, "patch_size": 4, "layers": 2, "width": 32, "head_width": 8}}
    extra = {}
    for section, values in changes.items():
        if top_level:
            extra[section] = values
        else:
            cfg[section].update(values)
    torch.manual_seed(0)
    reference = consisid_model.CustomCLIP(**copy.deepcopy(cfg), **extra).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    if refused_key is not None:
        with pytest.raises((ConversionError, ValueError), match=refused_key):
            _convert(tmp_path, reference, {**cfg, **extra})
        return
    out = _convert(tmp_path, reference, {**cfg, **extra})
    model = EvaCLIPModel.from_pretrained(out).eval()
    images, ids = _inputs(cfg, random.Random(0), seed=0)
    expected = _reference_outputs(reference, images, ids, False)
    with torch.no_grad():
        output = model(input_ids=ids, pixel_values=images)
    _assert_close(output.image_embeds, expected["image_embeds"], f"{name}: image embeds")
    _assert_close(output.text_embeds, expected["text_embeds"], f"{name}: text embeds")
