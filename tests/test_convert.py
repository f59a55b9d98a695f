"""Checkpoint conversion against the original implementations.

Every family of BAAI's releases is built at toy size in BAAI's own code (`consisid_eva_clip`, CPU: xattn and fusedLN
off) with random non-trivial weights, saved in a release layout, converted through the CLI, and compared on every
hidden state (captured with forward hooks: BAAI's code has no hidden-state API), the pooled outputs, the image/text
features and the logits. The same for timm's EVA towers, open_clip's EVA models and InternVL-port dirs. Then the
failure modes: unsafe pickles, missing / unexpected keys, shape mismatches, existing and half-written outputs.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

consisid_model = pytest.importorskip("consisid_eva_clip.model", reason="BAAI's reference code (consisid-eva-clip)")
timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoTokenizer, CLIPImageProcessor  # noqa: E402

from conftest import features  # noqa: E402

from llava_evaclip import (  # noqa: E402
    EvaCLIPModel,
    EvaCLIPVisionModel,
    EvaCLIPVisionModelWithProjection,
)
from llava_evaclip.cli import main as cli_main  # noqa: E402
from llava_evaclip.convert import ConversionError, convert_checkpoint  # noqa: E402
from llava_evaclip.processing import EVA_CLIP_MEAN, EVA_CLIP_STD  # noqa: E402

VOCAB_SIZE = 49408  # CLIP's, so the converted dirs carry the tokenizer
CONTEXT = 16
EMBED_DIM = 16
REL_TOL = 2e-5
REPO_ROOT = Path(__file__).resolve().parents[1]

TEXT_CFG = {"context_length": CONTEXT, "vocab_size": VOCAB_SIZE, "width": 32, "heads": 4, "layers": 2,
            "xattn": False, "fusedLN": False}
BAAI_VISION_DEFAULTS = {"eva_model_name": "eva-clip-test", "drop_path_rate": 0.0, "xattn": False, "fusedLN": False}
EVA02_FLAGS = {"head_width": 16, "mlp_ratio": 2.6667, "rope": True, "intp_freq": True, "naiveswiglu": True,
               "subln": True}

# Each release family at toy size, in the layout / wrapping its test saves it in. The EVA02 grids mirror the
# releases against pt_hw_seq_len: B-16 (grid 14 < 16), L-14 (16 = 16), L-14-336 (24 > 16).
FAMILIES = {
    "EVA01-CLIP-B-16": {
        "vision": {"image_size": 28, "layers": 2, "width": 32, "head_width": 8, "patch_size": 7, "ls_init_value": 0.1},
        "layout": "CLIP", "wrap": None, "suffix": ".pt",
    },
    "EVA01-CLIP-g-14": {
        "vision": {"image_size": 28, "layers": 2, "width": 48, "head_width": 12, "mlp_ratio": 4.3637, "patch_size": 7},
        "layout": "CustomCLIP", "wrap": "state_dict+module", "suffix": ".pt",
    },
    "EVA02-CLIP-B-16": {
        "vision": {"image_size": 21, "layers": 2, "width": 48, "patch_size": 7, "pt_hw_seq_len": 4, **EVA02_FLAGS},
        "layout": "CustomCLIP", "wrap": "module", "suffix": ".bin",
    },
    "EVA02-CLIP-L-14": {
        "vision": {"image_size": 28, "layers": 2, "width": 48, "patch_size": 7, "pt_hw_seq_len": 4, **EVA02_FLAGS},
        "layout": "CustomCLIP", "wrap": None, "suffix": ".pt",
    },
    "EVA02-CLIP-L-14-336": {
        "vision": {"image_size": 42, "layers": 2, "width": 48, "patch_size": 7, "pt_hw_seq_len": 4, **EVA02_FLAGS},
        "layout": "CLIP", "wrap": None, "suffix": ".pt",
    },
    "EVA02-CLIP-bigE-14": {
        "vision": {"image_size": 28, "layers": 2, "width": 32, "head_width": 8, "mlp_ratio": 8.571428571428571,
                   "patch_size": 7, "postnorm": True},
        "layout": "CustomCLIP", "wrap": None, "suffix": ".pt",
    },
}


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """fp32 parity: max abs diff <= 2e-5 relative to the reference's magnitude (at least 1)."""
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs reference {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= REL_TOL * scale, f"{what}: max abs diff {error:.3g} > {REL_TOL} x {scale:.3g}"


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights everywhere: zero biases, unit norms and constant layer scales would hide mapping errors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


def baai_config(family: str) -> dict:
    return {"embed_dim": EMBED_DIM, "vision_cfg": {**BAAI_VISION_DEFAULTS, **FAMILIES[family]["vision"]},
            "text_cfg": dict(TEXT_CFG)}


def build_baai(family: str, seed: int = 0) -> torch.nn.Module:
    model_class = consisid_model.CLIP if FAMILIES[family]["layout"] == "CLIP" else consisid_model.CustomCLIP
    return randomize_(model_class(**copy.deepcopy(baai_config(family))), seed)


def wrap_state_dict(state_dict: dict, wrap: str | None) -> object:
    if wrap == "module":
        return {"module": state_dict}
    if wrap == "state_dict+module":  # a DDP training checkpoint: prefixed keys inside {"state_dict": ...}
        return {"epoch": 3, "state_dict": {f"module.{key}": value for key, value in state_dict.items()}}
    return state_dict


def write_baai(tmp_path: Path, family: str, model: torch.nn.Module) -> tuple[Path, Path]:
    spec = FAMILIES[family]
    checkpoint = tmp_path / f"{family}{spec['suffix']}"
    torch.save(wrap_state_dict(model.state_dict(), spec["wrap"]), checkpoint)
    arch = tmp_path / f"{family}.json"
    arch.write_text(json.dumps(baai_config(family)))
    return checkpoint, arch


def sample_inputs(image_size: int, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    ids = torch.zeros(batch, CONTEXT, dtype=torch.long)  # open_clip-style: zero padding after the end token
    for row, length in enumerate((CONTEXT - 5, CONTEXT)):
        ids[row, 0] = VOCAB_SIZE - 2
        ids[row, 1 : length - 1] = torch.randint(1, VOCAB_SIZE - 2, (length - 2,), generator=generator)
        ids[row, length - 1] = VOCAB_SIZE - 1
    return images, ids


class Capture:
    """Forward hooks on a reference tower: the blocks' input (embeddings) and every block's output."""

    def __init__(self, blocks, sequence_first: bool = False, final_norm: torch.nn.Module | None = None) -> None:
        self.states: list[torch.Tensor] = []
        self.final: torch.Tensor | None = None
        fix = (lambda x: x.permute(1, 0, 2)) if sequence_first else (lambda x: x)
        self.handles = [blocks[0].register_forward_pre_hook(lambda module, args: self.states.append(fix(args[0])))]
        for block in blocks:
            self.handles.append(block.register_forward_hook(lambda module, args, out: self.states.append(fix(out))))
        if final_norm is not None:
            self.handles.append(final_norm.register_forward_hook(lambda module, args, out: setattr(self, "final", out)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def compare_vision(ours_output, capture: Capture, what: str) -> None:
    hidden = ours_output.hidden_states
    assert len(hidden) == len(capture.states), f"{what}: {len(hidden)} hidden states vs {len(capture.states)}"
    for index, (actual, expected) in enumerate(zip(hidden, capture.states)):
        assert_close(actual, expected, f"{what} hidden_states[{index}]")
    assert_close(ours_output.pooler_output, capture.final[:, 0], f"{what} pooled (CLS after the final norm)")


def check_against_baai(family: str, reference: torch.nn.Module, out_dir: Path) -> EvaCLIPModel:
    """Every hidden state, pooled outputs, features and logits of the converted model vs BAAI's."""
    layout = FAMILIES[family]["layout"]
    image_size = FAMILIES[family]["vision"]["image_size"]
    images, ids = sample_inputs(image_size)
    text_tower = reference if layout == "CLIP" else reference.text
    vision = Capture(reference.visual.blocks, final_norm=reference.visual.norm)
    text = Capture(text_tower.transformer.resblocks, sequence_first=True, final_norm=text_tower.ln_final)
    with torch.no_grad():
        image_normed, text_normed, scale = reference(images, ids)
    vision.remove()
    text.remove()
    with torch.no_grad():
        image_features, text_features = reference.encode_image(images), reference.encode_text(ids)
    logits_per_image = scale * image_normed @ text_normed.t()

    model = EvaCLIPModel.from_pretrained(out_dir).eval()
    with torch.no_grad():
        output = model(input_ids=ids, pixel_values=images, output_hidden_states=True)
        ours_image_features = features(model.get_image_features(pixel_values=images))
        ours_text_features = features(model.get_text_features(input_ids=ids))
    compare_vision(output.vision_model_output, vision, f"{family} vision")
    text_output = output.text_model_output
    assert len(text_output.hidden_states) == len(text.states)
    for index, (actual, expected) in enumerate(zip(text_output.hidden_states, text.states)):
        assert_close(actual, expected, f"{family} text hidden_states[{index}]")
    assert_close(text_output.last_hidden_state, text.final, f"{family} text last_hidden_state (after ln_final)")
    assert_close(text_output.pooler_output, text.final[torch.arange(len(ids)), ids.argmax(-1)], f"{family} text pooled")
    assert_close(ours_image_features, image_features, f"{family} image features")
    assert_close(ours_text_features, text_features, f"{family} text features")
    assert_close(output.image_embeds, image_normed, f"{family} normalised image embeds")
    assert_close(output.text_embeds, text_normed, f"{family} normalised text embeds")
    assert_close(output.logits_per_image, logits_per_image, f"{family} logits_per_image")
    assert_close(output.logits_per_text, logits_per_image.t(), f"{family} logits_per_text")
    return model


def convert_cli(*args: str) -> None:
    assert cli_main(["convert", *map(str, args)]) == 0


# ----------------------------------------------------------------------------------------------------------------------
# BAAI release checkpoints
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_baai_family_matches_reference(tmp_path, family):
    reference = build_baai(family)
    checkpoint, arch = write_baai(tmp_path, family, reference)
    out = tmp_path / "converted"
    convert_cli(checkpoint, out, "--arch", arch)
    assert json.loads((out / "config.json").read_text())["model_type"] == "evaclip"
    check_against_baai(family, reference, out)


def test_baai_xattn_text_tower_has_the_same_keys():
    """BAAI's EVA02-CLIP-B-16 config builds its text tower with xattn=True (xformers, no CPU kernel); the tests run
    xattn=False. The two layouts store the same tensors under the same names, so the conversion is the same."""
    config = baai_config("EVA02-CLIP-B-16")
    with_xattn = copy.deepcopy(config)
    with_xattn["text_cfg"]["xattn"] = True
    shapes = {key: value.shape for key, value in consisid_model.CustomCLIP(**with_xattn).state_dict().items()}
    assert shapes == {key: value.shape for key, value in consisid_model.CustomCLIP(**config).state_dict().items()}


def test_cli_subprocess_and_written_files(tmp_path):
    """`python -m llava_evaclip convert` end to end; the dir is complete (processor, tokenizer) and self-consistent."""
    family = "EVA02-CLIP-L-14"
    reference = build_baai(family, seed=5)
    checkpoint, arch = write_baai(tmp_path, family, reference)
    out = tmp_path / "hf"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [os.environ.get("PYTHONPATH"), str(REPO_ROOT)]))}
    result = subprocess.run([sys.executable, "-m", "llava_evaclip", "convert", str(checkpoint), str(out), "--arch",
                             str(arch)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "converted baai checkpoint" in result.stdout
    names = {path.name for path in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= names
    assert not [name for name in os.listdir(tmp_path) if "converting" in name]
    model = check_against_baai(family, reference, out)

    processor = CLIPImageProcessor.from_pretrained(out)
    image_size = FAMILIES[family]["vision"]["image_size"]
    assert processor.crop_size == {"height": image_size, "width": image_size}
    assert processor.size == {"shortest_edge": image_size}
    assert processor.resample == 3  # bicubic
    assert tuple(processor.image_mean) == pytest.approx(EVA_CLIP_MEAN)
    assert tuple(processor.image_std) == pytest.approx(EVA_CLIP_STD)

    # The written tokenizer reproduces open_clip's ids up to the end token, and its (EOS) padding leaves the text
    # features of BAAI's model unchanged (causal tower, pooled at the first end token).
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id == model.config.text_config.pad_token_id
    captions = ["a photo of a cat", "an EVA-02 diagram, 2 panels"]
    reference_ids = open_clip.tokenize(captions, context_length=CONTEXT)
    ids = tokenizer(captions, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt").input_ids
    for row in range(len(captions)):
        end = int(reference_ids[row].argmax())
        assert ids[row, : end + 1].tolist() == reference_ids[row, : end + 1].tolist()
    with torch.no_grad():
        assert_close(features(model.get_text_features(input_ids=ids)), reference.encode_text(reference_ids), "tokenized text")


def test_round_trip_is_bit_exact(tmp_path):
    family = "EVA02-CLIP-B-16"
    checkpoint, arch = write_baai(tmp_path, family, build_baai(family, seed=3))
    out = tmp_path / "converted"
    convert_checkpoint(checkpoint, out, arch=str(arch))
    converted = load_file(out / "model.safetensors")
    model = EvaCLIPModel.from_pretrained(out)
    model.save_pretrained(tmp_path / "resaved")
    reloaded = EvaCLIPModel.from_pretrained(tmp_path / "resaved")
    state = reloaded.state_dict()
    assert set(state) == set(converted)
    for key, tensor in converted.items():
        assert torch.equal(state[key], tensor), key
    assert reloaded.config.to_dict()["vision_config"] == model.config.to_dict()["vision_config"]

    # Sharded output (max_shard_size), and a converted dir as SRC (no --arch: its config.json is used).
    sharded = tmp_path / "sharded"
    convert_checkpoint(checkpoint, sharded, arch=str(arch), max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("model-*.safetensors"))) > 1
    convert_cli(sharded, tmp_path / "reconverted")
    reconverted = load_file(tmp_path / "reconverted" / "model.safetensors")
    assert set(reconverted) == set(converted)
    for key, tensor in converted.items():
        assert torch.equal(reconverted[key], tensor), key


def test_source_weights_are_copied_exactly_and_dtype(tmp_path):
    """Each converted tensor is the source tensor (split / reshaped / transposed), cast only when asked."""
    family = "EVA01-CLIP-g-14"
    reference = build_baai(family, seed=4)
    checkpoint, arch = write_baai(tmp_path, family, reference)
    convert_checkpoint(checkpoint, tmp_path / "bf16", arch=str(arch), dtype="bfloat16")
    converted = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {tensor.dtype for tensor in converted.values()} == {torch.bfloat16}
    source = reference.state_dict()
    qkv = source["visual.blocks.1.attn.qkv.weight"].to(torch.bfloat16)
    width = qkv.shape[1]
    for index, part in enumerate("qkv"):
        assert torch.equal(converted[f"vision_model.encoder.layers.1.self_attn.{part}_proj.weight"],
                           qkv[index * width : (index + 1) * width])
    assert torch.equal(converted["vision_model.encoder.layers.0.self_attn.q_proj.bias"],
                       source["visual.blocks.0.attn.q_bias"].to(torch.bfloat16))
    assert "vision_model.encoder.layers.0.self_attn.k_proj.bias" not in converted  # EVA has no k bias
    assert torch.equal(converted["text_projection.weight"], source["text.text_projection"].t().to(torch.bfloat16))
    assert torch.equal(converted["logit_scale"], source["logit_scale"].to(torch.bfloat16))
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"


def test_vision_only(tmp_path):
    """--vision-only keeps the tower and its image projection; EvaCLIPVisionModel (LLaVA's loader) reads it too."""
    family = "EVA02-CLIP-L-14-336"
    reference = build_baai(family, seed=6)
    checkpoint, arch = write_baai(tmp_path, family, reference)
    out = tmp_path / "vision"
    convert_cli(checkpoint, out, "--arch", arch, "--vision-only")
    assert json.loads((out / "config.json").read_text())["model_type"] == "evaclip_vision_model"
    assert not (out / "tokenizer.json").exists()
    images, _ = sample_inputs(FAMILIES[family]["vision"]["image_size"])
    capture = Capture(reference.visual.blocks, final_norm=reference.visual.norm)
    with torch.no_grad():
        features = reference.encode_image(images)
    capture.remove()
    tower = EvaCLIPVisionModel.from_pretrained(out).eval()
    with torch.no_grad():
        compare_vision(tower(pixel_values=images, output_hidden_states=True), capture, "vision-only")
        projected = EvaCLIPVisionModelWithProjection.from_pretrained(out).eval()(pixel_values=images).image_embeds
    assert_close(projected, features, "vision-only image features")

    # A visual-only BAAI state dict needs --vision-only to be said explicitly.
    visual_only = tmp_path / "visual_only.pt"
    torch.save({k: v for k, v in reference.state_dict().items() if k.startswith("visual.")}, visual_only)
    with pytest.raises(ConversionError, match="--vision-only"):
        convert_checkpoint(visual_only, tmp_path / "refused", arch=str(arch))
    convert_checkpoint(visual_only, tmp_path / "accepted", arch=str(arch), vision_only=True)


# ----------------------------------------------------------------------------------------------------------------------
# timm, open_clip and InternVL-port sources
# ----------------------------------------------------------------------------------------------------------------------

TIMM_TOWERS = {
    # timm model -> (toy kwargs, the BAAI vision_cfg describing the same tower)
    "eva02_base_patch16_clip_224": (
        {"embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 28, "patch_size": 7},
        {"image_size": 28, "layers": 2, "width": 48, "patch_size": 7, "pt_hw_seq_len": 16, **EVA02_FLAGS},
    ),
    "eva02_large_patch14_clip_336": (
        {"embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 42, "patch_size": 7, "ref_feat_shape": (4, 4)},
        {"image_size": 42, "layers": 2, "width": 48, "patch_size": 7, "pt_hw_seq_len": 4, **EVA02_FLAGS},
    ),
    "eva02_enormous_patch14_clip_224": (
        {"embed_dim": 32, "depth": 2, "num_heads": 4, "img_size": 28, "patch_size": 7, "mlp_ratio": 8.571428571428571},
        {"image_size": 28, "layers": 2, "width": 32, "head_width": 8, "patch_size": 7, "mlp_ratio": 8.571428571428571,
         "postnorm": True},
    ),
    "eva_giant_patch14_clip_224": (
        {"embed_dim": 48, "depth": 2, "num_heads": 4, "img_size": 28, "patch_size": 7, "mlp_ratio": 4.3637},
        {"image_size": 28, "layers": 2, "width": 48, "head_width": 12, "patch_size": 7, "mlp_ratio": 4.3637},
    ),
}


def timm_arch(tmp_path: Path, vision_cfg: dict) -> Path:
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps({"embed_dim": EMBED_DIM, "vision_cfg": vision_cfg, "text_cfg": TEXT_CFG}))
    return arch


@pytest.mark.parametrize("name", list(TIMM_TOWERS))
def test_timm_tower_matches_timm(tmp_path, name):
    kwargs, vision_cfg = TIMM_TOWERS[name]
    reference = randomize_(timm.create_model(name, pretrained=False, num_classes=EMBED_DIM, **kwargs), seed=7)
    if name.startswith("eva02_enormous"):
        checkpoint = tmp_path / "model.safetensors"  # timm's hub format
        save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, checkpoint)
    else:
        checkpoint = tmp_path / "timm.pth"
        torch.save(reference.state_dict(), checkpoint)
    out = tmp_path / "converted"
    convert_cli(checkpoint, out, "--arch", timm_arch(tmp_path, vision_cfg))  # timm: a vision tower, no flag needed

    images, _ = sample_inputs(vision_cfg["image_size"])
    capture = Capture(reference.blocks, final_norm=reference.norm)
    with torch.no_grad():
        features = reference(images)
    capture.remove()
    model = EvaCLIPVisionModelWithProjection.from_pretrained(out).eval()
    with torch.no_grad():
        output = model(pixel_values=images, output_hidden_states=True)
        compare_vision(EvaCLIPVisionModel.from_pretrained(out).eval()(pixel_values=images, output_hidden_states=True),
                       capture, name)
    assert_close(output.image_embeds, features, f"{name} image features (timm head)")


def test_open_clip_eva_model_matches_open_clip(tmp_path, monkeypatch):
    """open_clip's EVA02-B-16 layout (timm trunk under visual.trunk, CustomTextCLIP text) at toy size."""
    kwargs, vision_cfg = TIMM_TOWERS["eva02_base_patch16_clip_224"]
    create_model = timm.create_model

    def toy_trunk(name, **options):
        assert name == "eva02_base_patch16_clip_224"
        return create_model(name, **{**options, **kwargs})

    monkeypatch.setattr(timm, "create_model", toy_trunk)  # open_clip builds its trunk through timm.create_model
    text_cfg = {key: value for key, value in TEXT_CFG.items() if key not in ("xattn", "fusedLN")}
    reference = open_clip.CustomTextCLIP(
        EMBED_DIM, vision_cfg={"image_size": 28, "timm_model_name": "eva02_base_patch16_clip_224",
                               "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
        text_cfg=text_cfg)
    monkeypatch.undo()
    randomize_(reference, seed=8)
    checkpoint = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(reference.state_dict(), checkpoint)
    out = tmp_path / "converted"
    convert_cli(checkpoint, out, "--arch", timm_arch(tmp_path, vision_cfg))

    images, ids = sample_inputs(28)
    vision = Capture(reference.visual.trunk.blocks, final_norm=reference.visual.trunk.norm)
    text = Capture(reference.text.transformer.resblocks, final_norm=reference.text.ln_final,
                   sequence_first=not getattr(reference.text.transformer, "batch_first", False))
    with torch.no_grad():
        image_normed, text_normed, scale = reference(images, ids)
    vision.remove()
    text.remove()
    with torch.no_grad():
        image_features, text_features = reference.encode_image(images), reference.encode_text(ids)
    model = EvaCLIPModel.from_pretrained(out).eval()
    with torch.no_grad():
        output = model(input_ids=ids, pixel_values=images, output_hidden_states=True)
        ours_image = features(model.get_image_features(pixel_values=images))
        ours_text = features(model.get_text_features(input_ids=ids))
    compare_vision(output.vision_model_output, vision, "open_clip vision")
    for index, (actual, expected) in enumerate(zip(output.text_model_output.hidden_states, text.states)):
        assert_close(actual, expected, f"open_clip text hidden_states[{index}]")
    assert_close(output.text_model_output.last_hidden_state, text.final, "open_clip text after ln_final")
    assert_close(ours_image, image_features, "open_clip image features")
    assert_close(ours_text, text_features, "open_clip text features")
    assert_close(output.logits_per_image, scale * image_normed @ text_normed.t(), "open_clip logits")


def internvl_config(family: str, model: EvaCLIPModel) -> dict:
    """A config.json as InternVL's port writes it: model_type "clip", its q/k/v bias and post_layernorm fields,
    plus the generic transformers fields of its era that our configs do not define."""
    vision, text = model.config.vision_config, model.config.text_config
    generic = {"_name_or_path": "", "add_cross_attention": False, "chunk_size_feed_forward": 0, "dropout": 0.0,
               "torch_dtype": None, "transformers_version": "4.31.0"}
    return {
        "architectures": ["EvaCLIPModel"], "model_type": "clip", "projection_dim": EMBED_DIM,
        "logit_scale_init_value": 2.6592, "initializer_factor": 1.0, "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "vision_config": {**generic, "model_type": "clip_vision_model", "hidden_size": vision.hidden_size,
                          "intermediate_size": vision.intermediate_size, "projection_dim": EMBED_DIM,
                          "num_hidden_layers": vision.num_hidden_layers,
                          "num_attention_heads": vision.num_attention_heads, "image_size": vision.image_size,
                          "patch_size": vision.patch_size, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
                          "q_bias": True, "k_bias": False, "v_bias": True,
                          "post_layernorm": FAMILIES[family]["vision"].get("postnorm", False)},
        "text_config": {**generic, "model_type": "clip_text_model", "vocab_size": VOCAB_SIZE,
                        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
                        "projection_dim": EMBED_DIM, "num_hidden_layers": text.num_hidden_layers,
                        "num_attention_heads": text.num_attention_heads, "max_position_embeddings": CONTEXT,
                        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "q_bias": True, "k_bias": True,
                        "v_bias": True, "post_layernorm": False, "bos_token_id": 49406, "eos_token_id": 49407,
                        "pad_token_id": 1},
    }


def test_internvl_port_dir_is_rewritten(tmp_path):
    """An InternVL-port dir of a bigE-style model (post-norm) converts without --arch and matches BAAI's model."""
    family = "EVA02-CLIP-bigE-14"
    reference = build_baai(family, seed=9)
    checkpoint, arch = write_baai(tmp_path, family, reference)
    convert_checkpoint(checkpoint, tmp_path / "ours", arch=str(arch))
    ours = EvaCLIPModel.from_pretrained(tmp_path / "ours")
    port = tmp_path / "internvl"
    port.mkdir()
    (port / "config.json").write_text(json.dumps(internvl_config(family, ours)))
    state_dict = dict(ours.state_dict())  # the port's key names are ours, plus the position_ids buffers it saved
    state_dict["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    state_dict["text_model.embeddings.position_ids"] = torch.arange(CONTEXT)[None]
    torch.save(state_dict, port / "pytorch_model.bin")

    out = tmp_path / "rewritten"
    convert_cli(port, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "evaclip"
    assert config["vision_config"]["model_type"] == "evaclip_vision_model"
    assert config["vision_config"]["post_layernorm"] is True
    assert "dropout" not in config["vision_config"]  # the port's fields that mean nothing to our model are dropped
    check_against_baai(family, reference, out)


# ----------------------------------------------------------------------------------------------------------------------
# Failure modes
# ----------------------------------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this creates a marker file: proof that a checkpoint ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_crafted_pickle_is_not_executed(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"visual.cls_token": torch.zeros(1, 1, 8), "payload": _RunsCode(marker)}, evil)
    with pytest.raises(ConversionError, match="weights_only=True"):
        convert_checkpoint(evil, tmp_path / "out", arch="EVA02-CLIP-B-16")
    assert cli_main(["convert", str(evil), str(tmp_path / "out"), "--arch", "EVA02-CLIP-B-16"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "weights_only=True" in message and "posix.system" in message
    legacy = tmp_path / "legacy.pkl"  # a plain pickle (no torch zip container)
    legacy.write_bytes(__import__("pickle").dumps({"payload": _RunsCode(marker)}))
    with pytest.raises(ConversionError, match="weights_only=True"):
        convert_checkpoint(legacy, tmp_path / "out", arch="EVA02-CLIP-B-16")
    assert not marker.exists(), "unpickling the checkpoint executed code"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("payload, refused", [
    (np.float64(0.5), "numpy"),  # a training checkpoint's metric saved as a numpy scalar
    (_RunsCode(Path("never")), "posix.system"),
])
def test_refused_checkpoint_is_one_line_naming_what_was_refused_without_advice_to_drop_the_guard(
        payload, refused, tmp_path, capsys):
    """torch's refusal of a global wraps what was refused in advice to rerun with weights_only=False (torch 2.6 on:
    in the same paragraph, with terminal escapes); the message was that advice, over several lines."""
    checkpoint = tmp_path / "trained.pt"
    torch.save({"visual.cls_token": torch.zeros(1, 1, 8), "best_metric": payload}, checkpoint)
    assert cli_main(["convert", str(checkpoint), str(tmp_path / "out"), "--arch", "EVA02-CLIP-B-16"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "weights_only=True" in message and refused in message, message
    for advice in ("set to `False`", "will likely succeed", "\x1b", "trust the source", "add_safe_globals"):
        assert advice not in message, message
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def eva02_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("eva02")
    family = "EVA02-CLIP-B-16"
    checkpoint, arch = write_baai(directory, family, build_baai(family, seed=11))
    return torch.load(checkpoint, weights_only=True)["module"], arch


def _save(tmp_path: Path, state_dict: dict) -> Path:
    path = tmp_path / "edited.pt"
    torch.save(state_dict, path)
    return path


def test_missing_keys_are_listed(tmp_path, eva02_checkpoint):
    state_dict, arch = eva02_checkpoint
    edited = {k: v for k, v in state_dict.items() if k not in ("visual.blocks.1.mlp.w2.weight", "text.ln_final.bias")}
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(_save(tmp_path, edited), tmp_path / "out", arch=str(arch))
    message = str(error.value)
    assert "missing" in message
    assert "vision_model.encoder.layers.1.mlp.fc1_up.weight" in message
    assert "text_model.final_layer_norm.bias" in message
    assert not (tmp_path / "out").exists()


def test_unexpected_keys_are_listed(tmp_path, eva02_checkpoint):
    state_dict, arch = eva02_checkpoint
    edited = {**state_dict, "visual.fc_norm.weight": torch.ones(48),
              "visual.blocks.0.attn.relative_position_bias_table": torch.zeros(10, 3)}
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(_save(tmp_path, edited), tmp_path / "out", arch=str(arch))
    assert "visual.fc_norm.weight" in str(error.value)
    assert "visual.blocks.0.attn.relative_position_bias_table" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_key_and_shapes(tmp_path, eva02_checkpoint):
    state_dict, arch = eva02_checkpoint
    edited = {**state_dict, "visual.head.weight": torch.zeros(EMBED_DIM + 1, 48)}
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(_save(tmp_path, edited), tmp_path / "out", arch=str(arch))
    message = str(error.value)
    assert "image projection dim 17 (from visual.head.weight [17, 48]) vs 16" in message
    assert "text projection dim" not in message
    # The wrong architecture: an EVA01 preset for this EVA02 checkpoint.
    with pytest.raises(ConversionError, match="rotary position tables") as error:
        convert_checkpoint(_save(tmp_path, state_dict), tmp_path / "out", arch="EVA01-CLIP-B-16")
    assert "SwiGLU MLP yes" in str(error.value)


def test_rope_table_must_match_arch(tmp_path, eva02_checkpoint):
    state_dict, arch = eva02_checkpoint
    wrong = json.loads(Path(arch).read_text())
    wrong["vision_cfg"]["pt_hw_seq_len"] = 8  # same shapes, other rotary frequencies
    wrong_arch = tmp_path / "wrong.json"
    wrong_arch.write_text(json.dumps(wrong))
    with pytest.raises(ConversionError, match="pt_hw_seq_len"):
        convert_checkpoint(_save(tmp_path, state_dict), tmp_path / "out", arch=str(wrong_arch))


def test_cli_user_errors_exit_2(tmp_path, capsys, eva02_checkpoint):
    state_dict, arch = eva02_checkpoint
    checkpoint = _save(tmp_path, state_dict)
    cases = [
        ([str(tmp_path / "nope.pt"), str(tmp_path / "o")], "does not exist"),
        ([str(checkpoint), str(tmp_path / "o")], "--arch is required"),
        ([str(checkpoint), str(tmp_path / "o"), "--arch", "EVA03-CLIP-Z"], "neither a preset"),
    ]
    for argv, expected in cases:
        assert cli_main(["convert", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and err.count("\n") == 0, err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tmp_path, eva02_checkpoint):
    state_dict, arch = eva02_checkpoint
    checkpoint = _save(tmp_path, state_dict)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ConversionError, match="--overwrite"):
        convert_checkpoint(checkpoint, out, arch=str(arch))
    with pytest.raises(ConversionError, match="not a previous convert output"):
        convert_checkpoint(checkpoint, out, arch=str(arch), overwrite=True)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    out.rmdir()
    convert_checkpoint(checkpoint, out, arch=str(arch))
    convert_checkpoint(checkpoint, out, arch=str(arch), overwrite=True)  # a previous output is replaced
    assert (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["edited.pt", "out"]


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch, eva02_checkpoint, existing):
    """Saving fails midway (after the weights are written): no OUT (or the old OUT untouched), no temp dir."""
    import llava_evaclip.convert as convert_module

    state_dict, arch = eva02_checkpoint
    checkpoint = _save(tmp_path, state_dict)
    out = tmp_path / "out"
    if existing:
        convert_checkpoint(checkpoint, out, arch=str(arch))
        (out / "config.json").write_text((out / "config.json").read_text() + "\n")  # marks the previous one
    before = {path.name: path.read_bytes() for path in out.iterdir()} if existing else None

    def fail_midway(config, directory):
        assert (Path(directory) / "model.safetensors").exists()  # the weights are already there
        (Path(directory) / "tokenizer.json").write_text("{")
        raise KeyboardInterrupt("interrupted while writing the tokenizer")

    monkeypatch.setattr(convert_module, "write_processor", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(checkpoint, out, arch=str(arch), overwrite=existing)
    if existing:
        assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    else:
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["edited.pt"] + (["out"] if existing else []))


def test_dtype_choice_is_validated():
    with pytest.raises(ConversionError, match="float32"):
        convert_checkpoint("unused.pt", "unused_out", arch="EVA02-CLIP-B-16", dtype="int8")
