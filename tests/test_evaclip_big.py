"""EVA-CLIP-8B, 8B-448 and 18B against BAAI's code released with them (`eva_clip`, found through
`EVACLIP_18B_REFERENCE`): presets from BAAI's model-config JSONs, RMSNorm bit for bit, parameter counts of the full
sizes on the meta device, and converted toy models with each flag combination of the release.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from llava_evaclip import (
    EvaCLIPConfig,
    EvaCLIPModel,
    EvaCLIPVisionConfig,
    EvaCLIPVisionModel,
    EvaCLIPVisionModelWithProjection,
    EvaCLIPVisionTower,
)
from llava_evaclip.cli import main as cli_main
from llava_evaclip.convert import convert_checkpoint
from llava_evaclip import modeling_evaclip
from llava_evaclip.modeling_evaclip import EvaCLIPRMSNorm
from llava_evaclip.configuration_evaclip import config_from_baai
from llava_evaclip.processing import build_image_processor

from conftest import BAAI_CONFIG_FILES, eva_clip_18b_dir, features
from test_convert import CONTEXT, EMBED_DIM, VOCAB_SIZE, Capture, assert_close, compare_vision, randomize_, sample_inputs

BIG_PRESETS = ("EVA-CLIP-8B", "EVA-CLIP-8B-448", "EVA-CLIP-18B")


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


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key + ":"))


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark of this process (VmHWM) and return the current RSS."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    return _proc_status_bytes("VmRSS")


# --------------------------------------------------------------------------------------------------------------------
# Parameter counts of the full sizes, on the meta device
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
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
    """`inspect` prints BAAI's counts for the three presets, and EVA-CLIP-18B (73 GB in fp32, 37 GB in bf16) is
    inspected with the process's peak RSS growing by far less than one of its layers would take."""
    for name in BIG_PRESETS:
        before = _reset_peak_rss()
        assert cli_main(["inspect", name, "--json"]) == 0
        growth = _proc_status_bytes("VmHWM") - before
        info = json.loads(capsys.readouterr().out)
        params = info["parameters"]
        assert (params["vision_tower"], params["text_tower"]) == baai_counts(eva_clip, name), name
        assert growth < 256 * 2**20, (name, growth)  # one EVA-CLIP-18B block is 1.5 GB in fp32
    assert params["vision_tower"] == 17_630_494_720  # EVA-CLIP-18B: BAAI's "17.5B" vision tower
    assert "rms-norm" in info["vision"]["blocks"] and "post-norm" in info["vision"]["blocks"]


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


@pytest.fixture(scope="module")
def toys(eva_clip, tmp_path_factory):
    """`toys(name)`: `write_toy` once per toy for the whole module."""
    written: dict[str, tuple[Path, Path, torch.nn.Module]] = {}

    def get(toy: str) -> tuple[Path, Path, torch.nn.Module]:
        if toy not in written:
            written[toy] = write_toy(eva_clip, tmp_path_factory.mktemp(f"toy{toy}"), toy)
        return written[toy]

    return get


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
def test_converted_toy_matches_baai(toys, tmp_path, toy):
    checkpoint, arch, reference = toys(toy)
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
        ours_text_features = features(model.get_text_features(input_ids=ids))
    for index, (actual, expected) in enumerate(zip(output.text_model_output.hidden_states, text.states, strict=True)):
        assert_close(actual, expected, f"{toy} text hidden_states[{index}]")
    assert_close(ours_text_features, text_features, f"{toy} text embedding")
    assert_close(output.image_embeds, image_normed, f"{toy} normalised image embeds")
    assert_close(output.text_embeds, text_normed, f"{toy} normalised text embeds")
    assert_close(output.logits_per_image, scale * image_normed @ text_normed.t(), f"{toy} logits")


def test_vision_only_toy_matches_baai(toys, tmp_path):
    checkpoint, arch, reference = toys("18B")
    out = tmp_path / "tower"
    assert cli_main(["convert", str(checkpoint), str(out), "--arch", str(arch), "--vision-only"]) == 0
    model = EvaCLIPVisionModelWithProjection.from_pretrained(out).eval()
    images, _ = sample_inputs(28)
    check_vision(model, reference, images, "vision-only 18B")
    tower = EvaCLIPVisionModel.from_pretrained(out).eval()  # the plain tower LLaVA loads
    with torch.no_grad():
        assert torch.equal(tower(images).pooler_output, model.vision_model(images).pooler_output)


# --------------------------------------------------------------------------------------------------------------------
# Loading with bounded memory: EVA-CLIP-8B's real width (4096, heads of 128, MLP 20480) at 2 layers, in bf16
# --------------------------------------------------------------------------------------------------------------------

DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> Path:
    """A 2-layer EVA-CLIP-8B tower (56 px: 16 patches) with random bf16 weights, written without ever building it
    in memory: the module tree on the meta device gives the names and shapes."""
    config = EvaCLIPVisionConfig.from_preset("EVA-CLIP-8B", num_hidden_layers=2, image_size=56)
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in EvaCLIPVisionModel(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("eva8b_wide")
    state = {}
    for key, shape in shapes.items():  # random rows, each repeated 4 times: sampling 470M values costs ~10 s here
        rows = torch.randn((-(-shape[0] // 4), *shape[1:]), generator=generator, dtype=torch.bfloat16)
        state[key] = rows.repeat(4, *[1] * (len(shape) - 1))[: shape[0]].mul_(0.02).add_(1.0 if "norm" in key else 0)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config.torch_dtype = "bfloat16"
    config.save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide_model(wide_dir):
    """Loaded in bf16 with low_cpu_mem_usage; the peak RSS growth of the load is recorded on the model."""
    before = _reset_peak_rss()
    model = EvaCLIPVisionModel.from_pretrained(wide_dir, low_cpu_mem_usage=True, **{DTYPE_KWARG: torch.bfloat16})
    model.load_peak_growth = _proc_status_bytes("VmHWM") - before
    return model.eval()


def test_bf16_low_cpu_mem_usage_load_at_real_width(wide_dir, wide_model):
    """All weights arrive in bf16, equal to the file, and loading never holds more than the bf16 weights once
    (an fp32 materialisation would need twice their size)."""
    bf16_bytes = sum(parameter.numel() * 2 for parameter in wide_model.parameters())
    assert sum(parameter.numel() for parameter in wide_model.parameters()) > 470_000_000
    assert {parameter.dtype for parameter in wide_model.parameters()} == {torch.bfloat16}
    assert wide_model.load_peak_growth < bf16_bytes, (wide_model.load_peak_growth, bf16_bytes)
    layer = wide_model.vision_model.encoder.layers[0]
    assert isinstance(layer.layer_norm1, EvaCLIPRMSNorm) and layer.self_attn.q_proj.bias is None
    assert (layer.self_attn.num_heads, layer.self_attn.head_dim, layer.mlp.fc1.out_features) == (32, 128, 20480)
    with safe_open(str(wide_dir / "model.safetensors"), framework="pt") as handle:
        state = dict(wide_model.named_parameters())
        for key in handle.keys():
            assert torch.equal(state[key], handle.get_tensor(key)), key
    with torch.no_grad():
        output = wide_model(torch.randn(1, 3, 56, 56, dtype=torch.bfloat16), output_hidden_states=True)
    assert output.pooler_output.shape == (1, 4096) and output.pooler_output.dtype == torch.bfloat16
    assert all(torch.isfinite(state).all() for state in output.hidden_states)


def test_device_map_auto_with_disk_offload_at_real_width(wide_dir, wide_model, tmp_path, monkeypatch):
    """CPU memory for one layer (which accelerate keeps free for moving offloaded weights in): the encoder goes to
    disk, and the offloaded model computes exactly what the in-memory one does. (Offloaded layers run as module
    calls, in torch's bf16 kernels, so the bitwise comparison runs the in-memory model's modules as calls too: its
    inference paths (fp32 matmuls where torch's bf16 kernels are portable, `CPU_HALF_MATMULS_IN_FP32`; fused matmuls
    elsewhere, which on torch 2.5's oneDNN sum in another order than `F.linear`) are within bf16 rounding of them,
    checked last.)"""
    monkeypatch.setattr(modeling_evaclip, "CPU_HALF_MATMULS_IN_FP32", False)
    layer_bytes = sum(p.numel() * 2 for p in wide_model.vision_model.encoder.layers[0].parameters())
    offloaded = EvaCLIPVisionModel.from_pretrained(
        wide_dir, device_map="auto", max_memory={"cpu": layer_bytes + 64 * 2**20}, offload_folder=str(tmp_path),
        **{DTYPE_KWARG: torch.bfloat16},
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values()) and "cpu" in set(offloaded.hf_device_map.values())
    pixel_values = torch.randn(2, 3, 56, 56, dtype=torch.bfloat16)
    hooks = [module.register_forward_hook(lambda *args: None) for module in wide_model.modules()]  # module calls
    try:
        with torch.no_grad():
            expected = wide_model(pixel_values, output_hidden_states=True)
            actual = offloaded(pixel_values, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    for index, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states, strict=True)):
        assert torch.equal(a, e), index
    assert torch.equal(actual.pooler_output, expected.pooler_output)
    monkeypatch.undo()
    with torch.no_grad():
        in_memory = wide_model(pixel_values).pooler_output
    error = ((in_memory.float() - actual.pooler_output.float()).norm() / actual.pooler_output.float().norm()).item()
    assert error < 2**-7, error  # bf16 rounding (2**-8 per product), whichever kernels run the in-memory matmuls


def test_llava_tower_delay_loads_real_width_in_the_checkpoint_dtype(wide_dir, wide_model):
    """LLaVA's contract: config only until load_model(); then the bf16 weights stay bf16 (no fp32 copy on 4.x)."""
    args = SimpleNamespace(mm_vision_select_layer="-2,-1", mm_vision_select_feature="cls_patch")
    tower = EvaCLIPVisionTower(str(wide_dir), args, delay_load=True)
    assert not tower.is_loaded and tower.hidden_size == 2 * 4096  # two layers on channels
    tower.load_model()
    assert tower.dtype == torch.bfloat16
    pixel_values = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        states = wide_model(pixel_values.to(torch.bfloat16), output_hidden_states=True).hidden_states
        features = tower(pixel_values)
    assert torch.equal(features, torch.cat([states[-2], states[-1]], dim=-1).float())


@pytest.mark.parametrize("name", BIG_PRESETS)
def test_full_size_on_the_meta_device(eva_clip, name):
    """The full towers build on the meta device with BAAI's parameter count, and accelerate plans them in bf16 at two
    bytes per parameter, spilling to disk past the memory it is given."""
    from accelerate.utils import compute_module_sizes, infer_auto_device_map

    config = EvaCLIPVisionConfig.from_preset(name)
    with torch.device("meta"):
        model = EvaCLIPVisionModelWithProjection(config)
    numel = sum(parameter.numel() for parameter in model.parameters())
    assert numel == baai_counts(eva_clip, name)[0]
    assert compute_module_sizes(model, dtype=torch.bfloat16)[""] == 2 * numel
    device_map = infer_auto_device_map(model, max_memory={"cpu": 8 * 2**30}, dtype=torch.bfloat16,
                                       no_split_module_classes=model._no_split_modules)
    assert set(device_map.values()) == {"cpu", "disk"}


# --------------------------------------------------------------------------------------------------------------------
# LLaVA: a converted EVA-CLIP-18B-like toy, like any other EVA-CLIP dir
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_18b_dir(toys, tmp_path_factory) -> tuple[str, torch.nn.Module]:
    checkpoint, arch, reference = toys("18B")
    out = tmp_path_factory.mktemp("toy18b_hf") / "EVA-CLIP-18B-toy"
    convert_checkpoint(checkpoint, out, arch=str(arch))
    return str(out), reference


def baai_hidden_states(reference, images: torch.Tensor) -> list[torch.Tensor]:
    capture = Capture(reference.visual.blocks)
    with torch.no_grad():
        reference.encode_image(images)
    capture.remove()
    return capture.states


@pytest.mark.parametrize("select_layer, select_feature, s2", [("-2", "patch", False), ("-1,-3", "cls_patch", False),
                                                             ("0", "cls", False), ("-2", "patch", True)])
def test_llava_builds_the_tower_for_a_converted_18b_dir(toy_18b_dir, select_layer, select_feature, s2):
    """Through the real LLaVA package's `build_vision_tower` (hooked), with delay_load: the selected BAAI hidden
    states (and, with S2, LLaVA's multi-scale features of them)."""
    builder = pytest.importorskip("llava.model.multimodal_encoder.builder",
                                  reason="LLaVA's code (pip install --no-deps llava-torch)")
    from llava_evaclip import register_with_llava, unregister_from_llava

    path, reference = toy_18b_dir
    args = SimpleNamespace(mm_vision_tower=path, mm_vision_select_layer=select_layer,
                           mm_vision_select_feature=select_feature, s2=s2, s2_scales="28,56")
    register_with_llava()
    try:
        tower = builder.build_vision_tower(args, delay_load=True)
    finally:
        unregister_from_llava()
    assert isinstance(tower, EvaCLIPVisionTower) and not tower.is_loaded
    tower.load_model()
    images = sample_inputs(56 if s2 else 28)[0]
    with torch.no_grad():
        features = tower(images)
    layers = [int(index) for index in select_layer.split(",")]
    if s2:  # the 56 px scale is 4 tiles of 28 px, whose patch grids are stitched and area-pooled back to 2 x 2
        tiles = torch.cat([images[..., i : i + 28, j : j + 28] for i in (0, 28) for j in (0, 28)])
        small = baai_hidden_states(reference, torch.nn.functional.interpolate(images, size=28, mode="bicubic"))
        states = baai_hidden_states(reference, tiles)
        grid = states[layers[0]][:, 1:].reshape(4, len(images), 2, 2, -1)
        stitched = torch.cat([torch.cat([grid[0], grid[1]], dim=2), torch.cat([grid[2], grid[3]], dim=2)], dim=1)
        pooled = torch.nn.functional.avg_pool2d(stitched.permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)
        expected = torch.cat([small[layers[0]][:, 1:], pooled], dim=-1)
    else:
        states = baai_hidden_states(reference, images)
        selected = torch.cat([states[index] for index in layers], dim=-1)
        expected = {"patch": selected[:, 1:], "cls_patch": selected, "cls": selected[:, :1]}[select_feature]
    assert_close(features, expected, f"tower {select_layer} {select_feature} s2={s2}")


def test_transformers_llava_uses_a_converted_18b_dir(toy_18b_dir):
    """transformers' LlavaForConditionalGeneration built on the dir: the projector's input is BAAI's layer -2."""
    from test_hf_llava import IMAGE_TOKEN_ID, ProjectorInput, get_vision_tower, image_prompt, tiny_llama_config

    from llava_evaclip.hf import build_llava

    path, reference = toy_18b_dir
    model = build_llava(path, tiny_llama_config(), image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                        vision_feature_select_strategy="default").eval()
    assert get_vision_tower(model).config.use_rms_norm
    images = sample_inputs(28)[0]
    with ProjectorInput(model) as projector_input, torch.no_grad():
        output = model(**image_prompt(2, 4), pixel_values=images)
    assert torch.isfinite(output.loss)
    (captured,) = projector_input.captured
    assert_close(captured, baai_hidden_states(reference, images)[-2][:, 1:], "LLaVA projector input")
