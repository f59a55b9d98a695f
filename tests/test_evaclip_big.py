"""EVA-CLIP-8B, 8B-448 and 18B against BAAI's code released with them (`eva_clip`, found through
`EVACLIP_18B_REFERENCE`): presets from BAAI's model-config JSONs, RMSNorm bit for bit, parameter counts of the full
sizes on the meta device, and converted toy models with each flag combination of the release.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_evaclip import (
    EvaCLIPConfig,
    EvaCLIPModel,
    EvaCLIPVisionConfig,
    EvaCLIPVisionModel,
    EvaCLIPVisionModelWithProjection,
)
from llava_evaclip.cli import main as cli_main
from llava_evaclip.convert import convert_checkpoint
from llava_evaclip.modeling_evaclip import EvaCLIPRMSNorm
from llava_evaclip.presets import config_from_baai

from conftest import BAAI_CONFIG_FILES, eva_clip_18b_dir
from test_convert import CONTEXT, EMBED_DIM, VOCAB_SIZE, Capture, assert_close, compare_vision, randomize_, sample_inputs

REPO_ROOT = str(Path(__file__).resolve().parents[1])

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


# --------------------------------------------------------------------------------------------------------------------
# Parameter counts of the full sizes, on the meta device
# --------------------------------------------------------------------------------------------------------------------


def baai_counts(eva_clip, name: str) -> tuple[int, int]:
    """(vision, text) parameter counts of BAAI's CustomCLIP built from its JSON with empty (meta) weights.
    accelerate's init_empty_weights rather than `torch.device("meta")`: BAAI's constructor calls `.item()`."""
    from accelerate import init_empty_weights

    model_cfg = baai_json(name)
    model_cfg["vision_cfg"]["xattn"] = model_cfg["text_cfg"]["xattn"] = False
    with init_empty_weights():
        model = eva_clip.model.CustomCLIP(**model_cfg)
    assert all(parameter.is_meta for parameter in model.parameters())
    vision = sum(parameter.numel() for parameter in model.visual.parameters())
    text = sum(parameter.numel() for parameter in model.text.parameters())
    assert vision + text + 1 == sum(parameter.numel() for parameter in model.parameters())  # + logit_scale
    return vision, text


def test_inspect_counts_equal_baai_without_allocating(eva_clip, capsys):
    """`inspect` prints BAAI's counts for the three presets; EVA-CLIP-18B (73 GB in fp32) runs in a fresh process
    whose peak RSS stays far below one layer-stack of its weights."""
    for name in BIG_PRESETS[:2]:
        assert cli_main(["inspect", name, "--json"]) == 0
        params = json.loads(capsys.readouterr().out)["parameters"]
        assert (params["vision_tower"], params["text_tower"]) == baai_counts(eva_clip, name), name
    wrapper = ("import resource, sys\nfrom llava_evaclip.cli import main\nstatus = main(sys.argv[1:])\n"
               "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(status)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", wrapper, "inspect", "EVA-CLIP-18B", "--json"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    params = info["parameters"]
    assert (params["vision_tower"], params["text_tower"]) == baai_counts(eva_clip, "EVA-CLIP-18B")
    assert params["vision_tower"] == 17_630_494_720  # BAAI's model card: 17.5B vision
    assert "rms-norm" in info["vision"]["blocks"] and "post-norm" in info["vision"]["blocks"]
    peak_kb = int(re.search(r"peak_rss_kb (\d+)", result.stderr).group(1))
    assert peak_kb * 1024 < 2 * 2**30, peak_kb


# --------------------------------------------------------------------------------------------------------------------
# Converted toy models with each flag combination, against BAAI's forward
# --------------------------------------------------------------------------------------------------------------------

TOY_TEXT_CFG = {"context_length": CONTEXT, "vocab_size": VOCAB_SIZE, "width": 32, "heads": 4, "layers": 2,
                "xattn": False, "fusedLN": False}
# Width 256 in 2 heads of 128, MLP ratio 5 (1280) with GELU, no q/k/v or head bias, RMSNorm: the releases' flags.
TOY_VISION_CFG = {"image_size": 28, "layers": 2, "width": 256, "head_width": 128, "mlp_ratio": 5, "patch_size": 14,
                  "eva_model_name": "eva-clip-toy", "drop_path_rate": 0, "qkv_bias": False, "xattn": False,
                  "postnorm": False, "fusedLN": False, "use_rms_norm": True}
TOYS = {
    # like EVA-CLIP-8B: a plain fp32 state dict, converted through the CLI
    "8B": {"vision": {}, "dtype": torch.float32, "keys": "plain"},
    # like EVA-CLIP-8B-448 (a bigger grid), saved by DistributedDataParallel: `module.`-prefixed keys
    "8B-448": {"vision": {"image_size": 42}, "dtype": torch.float32, "keys": "module."},
    # like EVA-CLIP-18B: post-norm blocks, released in fp16
    "18B": {"vision": {"postnorm": True}, "dtype": torch.float16, "keys": "plain"},
}


def toy_model_cfg(toy: str) -> dict:
    return {"embed_dim": EMBED_DIM, "vision_cfg": {**TOY_VISION_CFG, **TOYS[toy]["vision"]}, "text_cfg": TOY_TEXT_CFG}


def write_toy(eva_clip, tmp_path, toy: str) -> tuple[Path, Path, torch.nn.Module]:
    """BAAI's model with random weights, saved in the toy's release layout; returns the checkpoint, the BAAI JSON and
    BAAI's model re-loaded from that file by BAAI's own loader (fp16 weights upcast to fp32)."""
    spec = TOYS[toy]
    model = randomize_(eva_clip.model.CustomCLIP(**toy_model_cfg(toy)), seed=len(toy))
    state_dict = {key: value.to(spec["dtype"]) for key, value in model.state_dict().items()}
    if spec["keys"] == "module.":
        state_dict = {f"module.{key}": value for key, value in state_dict.items()}
    checkpoint, arch = tmp_path / f"EVA-CLIP-{toy}-toy.pt", tmp_path / f"EVA-CLIP-{toy}-toy.json"
    torch.save(state_dict, checkpoint)
    arch.write_text(json.dumps(toy_model_cfg(toy)))
    reference = eva_clip.model.CustomCLIP(**toy_model_cfg(toy))
    loaded = eva_clip.factory.load_state_dict(str(checkpoint))
    reference.load_state_dict({key: value.float() for key, value in loaded.items()}, strict=True)
    return checkpoint, arch, reference.eval()


def check_vision(model, reference, images: torch.Tensor, what: str) -> None:
    """Every hidden state and the pooled CLS against BAAI's tower (captured with hooks), and the image embedding."""
    capture = Capture(reference.visual.blocks, final_norm=reference.visual.norm)
    with torch.no_grad():
        expected = reference.encode_image(images)
    capture.remove()
    with torch.no_grad():
        output = model.vision_model(images, output_hidden_states=True)
        actual = model.visual_projection(output.pooler_output)
    compare_vision(output, capture, what)
    assert_close(actual, expected, f"{what} image embedding")


@pytest.mark.parametrize("toy", list(TOYS))
def test_converted_toy_matches_baai(eva_clip, tmp_path, toy):
    checkpoint, arch, reference = write_toy(eva_clip, tmp_path, toy)
    out = tmp_path / "converted"
    if toy == "8B":  # the command line
        assert cli_main(["convert", str(checkpoint), str(out), "--arch", str(arch)]) == 0
    else:
        convert_checkpoint(checkpoint, out, arch=str(arch))
    model = EvaCLIPModel.from_pretrained(out).eval()
    vision = model.config.vision_config
    assert vision.use_rms_norm and vision.post_layernorm is (toy == "18B") and model.visual_projection.bias is None
    images, ids = sample_inputs(toy_model_cfg(toy)["vision_cfg"]["image_size"])
    check_vision(model, reference, images, toy)
    text = Capture(reference.text.transformer.resblocks, sequence_first=True, final_norm=reference.text.ln_final)
    with torch.no_grad():
        image_normed, text_normed, scale = reference(images, ids)
        text.remove()
        text_features = reference.encode_text(ids)
        output = model(input_ids=ids, pixel_values=images, output_hidden_states=True)
        ours_text_features = model.get_text_features(input_ids=ids)
    for index, (actual, expected) in enumerate(zip(output.text_model_output.hidden_states, text.states, strict=True)):
        assert_close(actual, expected, f"{toy} text hidden_states[{index}]")
    assert_close(ours_text_features, text_features, f"{toy} text embedding")
    assert_close(output.image_embeds, image_normed, f"{toy} normalised image embeds")
    assert_close(output.text_embeds, text_normed, f"{toy} normalised text embeds")
    assert_close(output.logits_per_image, scale * image_normed @ text_normed.t(), f"{toy} logits")


def test_vision_only_toy_matches_baai(eva_clip, tmp_path):
    checkpoint, arch, reference = write_toy(eva_clip, tmp_path, "18B")
    out = tmp_path / "tower"
    assert cli_main(["convert", str(checkpoint), str(out), "--arch", str(arch), "--vision-only"]) == 0
    model = EvaCLIPVisionModelWithProjection.from_pretrained(out).eval()
    images, _ = sample_inputs(28)
    check_vision(model, reference, images, "vision-only 18B")
    tower = EvaCLIPVisionModel.from_pretrained(out).eval()  # the plain tower LLaVA loads
    with torch.no_grad():
        assert torch.equal(tower(images).pooler_output, model.vision_model(images).pooler_output)
