"""What only an accelerator can check: the model, the LLaVA tower and the feature CLI on a CUDA device.

The CPU suite never runs a CUDA kernel, and the library has CUDA-only branches: the eager inference paths (direct
`out=` matmuls, the row-aligned SwiGLU buffer) run on cuBLAS; RoPE takes the pair swap off the CPU (the complex
turn is CPU-only); sdpa in half precision takes the flash / memory-efficient kernels; inductor emits Triton code with
the custom op `llava_evaclip::aligned_gated_linear`; accelerate moves offloaded weights between CPU and the device;
CUDA autocast switches the inference paths off; the feature CLI pins DataLoader memory, normalises uint8 crops on the
device when that is exact there, and resolves `--device cuda` to cuda:LOCAL_RANK.

Every case is checked against an independent reference: the same weights on the CPU in fp32, an fp64 CPU truth with
transformers' CLIP (EVA01-style towers, the text tower) or timm's EVA-02 running on the same device in the same dtype
as the yardstick (`test_model_parity_hf_clip`, `test_fast_paths` establish those weight mappings), or the eager
(uncompiled, unexported, in-memory) model on the same device. fp32 comparisons run with TF32 off.

Without a GPU the module skips. `EVACLIP_ACCELERATOR_DRY_RUN=1` runs it on the CPU instead, to check the test code
itself; cases that only mean something on a GPU skip there with a reason.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.util
import math
import os
import re
import statistics
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import torch
from torch import nn

from conftest import FAMILY_FLAGS, randomize, tiny_config, tiny_vision_config
from llava_evaclip import EvaCLIPModel, EvaCLIPVisionModel, EvaCLIPVisionTower, modeling_evaclip
from llava_evaclip import _compat
from llava_evaclip import features as F
from llava_evaclip.cli import main as cli_main
from test_features import per_image_pixels, processor_cases, read, save_tower, write_image
from test_model_parity_hf_clip import (
    _clip_text_config,
    _clip_vision_config,
    _copy_text,
    _copy_vision,
    _inner,
    _text_inputs,
)

DRY_RUN = os.environ.get("EVACLIP_ACCELERATOR_DRY_RUN") == "1"
ON_GPU = torch.cuda.is_available()
if not (ON_GPU or DRY_RUN):  # one skip line in a CPU run's report, not one per case
    pytest.skip("needs a CUDA GPU (set EVACLIP_ACCELERATOR_DRY_RUN=1 to dry-run on CPU)", allow_module_level=True)
DEVICE = torch.device("cuda", 0) if ON_GPU else torch.device("cpu")
gpu_only = pytest.mark.skipif(DRY_RUN and not ON_GPU, reason="dry run on the CPU: this check only means something on a GPU")

# fp32 on the device against fp32 on the CPU, TF32 off: both sum the same products in another order (cuBLAS vs MKL
# blocking, another softmax kernel), ~1e-7 relative per op and ~1e-6 after a few layers on O(1) activations; 1e-5 is
# the suite's fp32 bound (test_integrations, test_fast_paths), and a dropped term or a wrong table is 1e-2 or more.
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}
# Half precision against the fp64 truth: our error at most 1.3x the reference implementation's in the same dtype on
# the same device (test_half_precision_accuracy's bound: above the 0.76-1.16 spread measured over families, dtypes
# and CPU paths, below the 1.5x of a systematic extra rounding).
HALF_BOUND = 1.3
# Half-precision features against fp32 ones (relative Frobenius error): a few roundings of bf16's 2^-8 through three
# tiny layers stay below 2e-2, the suite's bound for the same comparison (test_integrations, test_fast_paths); a
# wrong kernel or dtype mix-up is O(1).
HALF_FEATURE_BOUND = 2e-2
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SEEDS = (0, 1, 2)
FAMILIES = sorted(FAMILY_FLAGS)


@pytest.fixture(autouse=True)
def _strict_fp32() -> Iterator[None]:
    """TF32 off (cuBLAS and cuDNN would round fp32 matmul inputs to 10 bits: 1e-3 off), restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pixels(batch: int, size: int = 28, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _rel_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """Relative Frobenius error (on the CPU, in fp64); inf when `actual` is not finite."""
    actual, truth = actual.detach().cpu().double(), truth.detach().cpu().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - truth).norm() / truth.norm()).item()


def _assert_trees_close(actual: Any, expected: Any, **tolerance: float) -> None:
    """Every tensor of two model outputs, `actual` brought to the CPU."""
    flat_actual, flat_expected = (torch.utils._pytree.tree_flatten(output)[0] for output in (actual, expected))
    assert len(flat_actual) == len(flat_expected) > 0
    for index, (got, want) in enumerate(zip(flat_actual, flat_expected)):
        assert got.device.type == DEVICE.type, (index, got.device)
        torch.testing.assert_close(got.cpu(), want, **tolerance, msg=lambda m, index=index: f"output {index}: {m}")


def _on_device(values: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda v: v.to(DEVICE) if isinstance(v, torch.Tensor) else v, values)


def _on_cpu(values: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) else v, values)


def _saved_tower(path: Path, family: str, **overrides: Any) -> str:
    torch.manual_seed(0)
    randomize(EvaCLIPVisionModel(tiny_vision_config(family, **overrides))).save_pretrained(path)
    return str(path)


LLAVA_ARGS = types.SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch")


@contextlib.contextmanager
def _counting(name: str, calls: list[str], owner: Any = modeling_evaclip) -> Iterator[None]:
    """Records each call of `owner.name` in `calls` (and still runs it)."""
    original = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return original(*args, **kwargs)

    setattr(owner, name, counted)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _set_attention(model: nn.Module, attn: str) -> nn.Module:
    """Every tower's attention kernel (each attention module reads its own tower's config)."""
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        config._attn_implementation_internal = attn
    return model


def _sdpa_kernel(kernel: Optional[str]) -> contextlib.AbstractContextManager:
    """Forces torch's fused attention onto one kernel ("flash", "efficient"): any fallback then raises."""
    if kernel is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[kernel]])


# --------------------------------------------------------------------------------------------------------------------
# 1. Forward parity in fp32: the device against the CPU, each family, eager and sdpa
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_vision_model_on_device_equals_cpu_fp32(family: str, attn: str) -> None:
    """The same model object run on the CPU, then moved to the device (the RoPE cache held CPU tables: `_apply` must
    drop them), gives the CPU's hidden states, at the native grid and at another one (positions interpolated
    bicubically on the device, a RoPE table computed for that grid). On the device the eager inference path runs
    (direct matmuls into cuBLAS), and RoPE takes the pair swap, never the CPU-only complex turn."""
    torch.manual_seed(0)
    model = randomize(EvaCLIPVisionModel(tiny_vision_config(family, attn_implementation=attn))).eval()
    native, resized = _pixels(2), _pixels(1, 42, seed=2)
    with torch.no_grad():
        expected = model(native, output_hidden_states=True)
        expected_resized = model(resized, interpolate_pos_encoding=True)
    model.to(DEVICE)
    calls: list[str] = []
    with torch.no_grad(), _counting("_swap_rotary_", calls), _counting("_turn_pairs_", calls):
        inference_paths: list[str] = []
        with _counting("_inference_forward", inference_paths, modeling_evaclip.EvaCLIPMLP):
            got = model(native.to(DEVICE), output_hidden_states=True)
        got_resized = model(resized.to(DEVICE), interpolate_pos_encoding=True)
    _assert_trees_close(got, expected, **FP32_TOL)
    _assert_trees_close(got_resized, expected_resized, **FP32_TOL)
    assert len(inference_paths) == model.config.num_hidden_layers  # the fast path ran on this device
    if model.config.use_rope and ON_GPU:
        assert calls and set(calls) == {"_swap_rotary_"}, calls


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_model_on_device_equals_cpu_fp32(family: str, attn: str) -> None:
    """EvaCLIPModel with both towers (the text tower with a causal + padding mask, pooled at the first end token on
    the device): logits, embeddings and both towers' states as on the CPU."""
    torch.manual_seed(0)
    model = _set_attention(randomize(EvaCLIPModel(tiny_config(family))).eval(), attn)
    ids, mask = _text_inputs(model.config.text_config)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": _pixels(3)}
    with torch.no_grad():
        expected = model(**inputs)
        got = model.to(DEVICE)(**_on_device(inputs))
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        _assert_trees_close(getattr(got, name), getattr(expected, name), **FP32_TOL)
    for tower in ("text_model_output", "vision_model_output"):
        _assert_trees_close(getattr(got, tower).last_hidden_state, getattr(expected, tower).last_hidden_state,
                            **FP32_TOL)


# --------------------------------------------------------------------------------------------------------------------
# 1b. Half precision against an fp64 truth, next to transformers' CLIP / timm's EVA-02 on the same device and dtype
# --------------------------------------------------------------------------------------------------------------------


def _rounded(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy with every parameter rounded to `dtype` (kept in its own dtype): the truth's weights, so the weight
    rounding common to every half-precision run does not hide the computation's own error."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(dtype).to(parameter.dtype))
    return model


_BUILT: dict[tuple[str, int], EvaCLIPModel] = {}


def _perturbed_model(family: str, seed: int) -> EvaCLIPModel:
    """EvaCLIPModel (fp32, CPU) whose every parameter is moved by N(0, 0.1) as test_half_precision_accuracy does, so
    no term is negligible next to the rounding; SwiGLU at timm's width (int(32 * 4 * 2 / 3) = 85) for its twin."""
    if (family, seed) not in _BUILT:
        torch.manual_seed(seed)
        overrides = {"intermediate_size": 85} if family == "eva02" else {}
        model = randomize(EvaCLIPModel(tiny_config(family, **overrides))).eval()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name != "logit_scale":
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
        _BUILT[family, seed] = model
    return _BUILT[family, seed]


def _our_vision_states(vision: EvaCLIPVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """hidden_states[-2] through `select_hidden_states`, the LLaVA tower's call."""
    layers = vision.config.num_hidden_layers
    with torch.no_grad():
        return vision.vision_model.select_hidden_states(pixel_values, {layers - 1})[layers - 1]


def _clip_vision_states(ours: EvaCLIPVisionModel, pixel_values: torch.Tensor, attn: str) -> torch.Tensor:
    """transformers' CLIPVisionModel holding the EVA01-style weights (`_copy_vision`), on the input's device and
    dtype, with the same attention kernel."""
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel(_clip_vision_config(ours.config)).eval()
    _copy_vision(ours.vision_model, _inner(clip, "vision_model"))
    clip.config._attn_implementation = attn
    clip.to(pixel_values.device, pixel_values.dtype)
    with torch.no_grad():
        return clip(pixel_values, output_hidden_states=True).hidden_states[-2]


def _timm_vision_states(ours: EvaCLIPVisionModel, pixel_values: torch.Tensor, attn: str) -> torch.Tensor:
    """timm's EVA-02 holding our weights (`test_fast_paths._timm_twin`), on the input's device and dtype, with its
    fused (sdpa) or its own eager attention."""
    from test_fast_paths import _timm_twin

    reference = _timm_twin(ours).to(pixel_values.device, pixel_values.dtype)
    for block in reference.blocks:
        block.attn.fused_attn = attn == "sdpa"
    with torch.no_grad():
        x, rope = reference._pos_embed(reference.patch_embed(pixel_values))
        for block in reference.blocks[:-1]:
            x = block(x, rope=rope)
    return x


def _clip_has(attn: str) -> bool:
    from transformers import CLIPVisionModel

    return attn == "eager" or bool(getattr(CLIPVisionModel, "_supports_sdpa", False))


def _vision_reference(family: str, attn: str) -> tuple[str, Callable[..., torch.Tensor]]:
    """(name, run(ours, pixels)): an independent implementation in the same dtype on the device where one takes these
    weights; else our own tower on the CPU in that dtype, which test_half_precision_accuracy holds to 1.3x of BAAI's
    error on every CPU path."""
    if family == "eva01" and _clip_has(attn):
        return "transformers CLIP", lambda ours, pixels: _clip_vision_states(ours, pixels, attn)
    if family == "eva02":
        return "timm EVA-02", lambda ours, pixels: _timm_vision_states(ours, pixels, attn)
    return "ours on the CPU", lambda ours, pixels: _our_vision_states(copy.deepcopy(ours).cpu(), pixels.cpu())


def _check_ratio(pairs: list[tuple[float, float]], what: str) -> None:
    """Finite wherever the reference is, and the median error over seeds within `HALF_BOUND` of the reference's."""
    assert all(ours < float("inf") for reference, ours in pairs if reference < float("inf")), (what, pairs)
    reference = statistics.median(pair[0] for pair in pairs)
    ours = statistics.median(pair[1] for pair in pairs)
    assert 0 < ours <= HALF_BOUND * reference, (
        f"{what}: error vs fp64 {ours:.3g}, reference {reference:.3g} (x{ours / reference:.2f} > {HALF_BOUND}); "
        f"per seed (reference, ours) {pairs}"
    )


KERNELS = {"eager": ("eager", None), "sdpa_flash": ("sdpa", "flash"), "sdpa_efficient": ("sdpa", "efficient")}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_vision_on_device_is_as_close_to_fp64_as_the_reference(family: str, dtype_name: str,
                                                                               kernel: str) -> None:
    """LLaVA's `model.to(dtype)` tower on the device: hidden_states[-2] against the fp64 truth (our model on the CPU
    with the dtype-rounded weights and inputs), next to the reference implementation's error on the same device and
    dtype with the same attention kernel (flash / memory-efficient forced, so a silent fallback cannot pass)."""
    attn, forced = KERNELS[kernel]
    if forced is not None and not ON_GPU:
        pytest.skip("dry run on the CPU: CUDA's flash / memory-efficient attention kernels")
    dtype = DTYPES[dtype_name]
    name, reference_states = _vision_reference(family, attn)
    pairs = []
    for seed in SEEDS:
        model = _perturbed_model(family, seed)
        vision = EvaCLIPVisionModel(copy.deepcopy(model.config.vision_config)).eval()
        vision.vision_model.load_state_dict(model.vision_model.state_dict())
        _set_attention(vision, attn)
        pixels = _pixels(4, seed=seed).to(dtype)
        truth = _our_vision_states(_rounded(vision, dtype).double(), pixels.double())
        on_device = copy.deepcopy(vision).to(DEVICE, dtype)
        with _sdpa_kernel(forced):
            ours = _our_vision_states(on_device, pixels.to(DEVICE))
            if name != "ours on the CPU":  # the CPU has neither forced kernel: it runs its own below
                reference = reference_states(vision, pixels.to(DEVICE))
        if name == "ours on the CPU":
            reference = reference_states(on_device, pixels)
        assert ours.dtype == dtype and ours.device.type == DEVICE.type
        pairs.append((_rel_error(reference, truth), _rel_error(ours, truth)))
    _check_ratio(pairs, f"{family} {dtype_name} {kernel} vs {name}")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_half_precision_text_tower_on_device_is_as_close_to_fp64_as_clip(dtype_name: str, attn: str) -> None:
    """EvaCLIPModel's text tower (CLIP's own architecture) in half precision on the device, with its causal +
    padding mask: last hidden state against the fp64 truth, next to transformers' CLIPTextModel on the same weights,
    device, dtype and kernel."""
    if not _clip_has(attn):
        pytest.skip(f"this transformers' CLIP has no {attn} attention")
    from transformers import CLIPTextModel

    dtype = DTYPES[dtype_name]
    pairs = []
    for seed in SEEDS:
        text = _perturbed_model("eva02", seed).text_model
        ids, mask = _text_inputs(text.config)
        truth_model = _rounded(text, dtype).double()
        with torch.no_grad():
            truth = truth_model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours_model = _set_attention(copy.deepcopy(text), attn).to(DEVICE, dtype)
        clip = CLIPTextModel(_clip_text_config(text.config)).eval()
        _copy_text(text, _inner(clip, "text_model"))
        clip.config._attn_implementation = attn
        clip.to(DEVICE, dtype)
        inputs = _on_device({"input_ids": ids, "attention_mask": mask})
        with torch.no_grad():
            ours = ours_model(**inputs).last_hidden_state
            reference = clip(**inputs).last_hidden_state
        pairs.append((_rel_error(reference, truth), _rel_error(ours, truth)))
    _check_ratio(pairs, f"text {dtype_name} {attn} vs transformers CLIP")


# --------------------------------------------------------------------------------------------------------------------
# 3. torch.export on the device
# --------------------------------------------------------------------------------------------------------------------


def test_export_on_device_with_a_dynamic_batch_equals_eager() -> None:
    """torch.export under no_grad with a symbolic batch, traced on the device: the program runs another batch size
    on the device with the eager numbers (the CUDA inference paths and the aligned op stay out of the program)."""
    torch.manual_seed(0)
    model = randomize(EvaCLIPVisionModel(tiny_vision_config("eva02"))).eval().to(DEVICE)
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(model, (_pixels(2).to(DEVICE),), dynamic_shapes=({0: batch},))
        pixel_values = _pixels(5, seed=2).to(DEVICE)
        exported = program.module()(pixel_values)
        expected = model(pixel_values)
    _assert_trees_close((exported.last_hidden_state, exported.pooler_output),
                        (expected.last_hidden_state.cpu(), expected.pooler_output.cpu()), **FP32_TOL)


# --------------------------------------------------------------------------------------------------------------------
# 4. accelerate big-model inference: layers on the device, the CPU and disk
# --------------------------------------------------------------------------------------------------------------------


def _wide_model(tmp_path: Path) -> EvaCLIPVisionModel:
    """EVA-02 at width 512 (~9 MB a layer in fp32): large next to the few MB of cached, unused device memory that
    transformers adds to the device's budget, so the budgets below really split the model."""
    torch.manual_seed(0)
    config = tiny_vision_config("eva02", hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                num_hidden_layers=4, projection_dim=32)
    model = randomize(EvaCLIPVisionModel(config)).eval()
    model.save_pretrained(tmp_path / "model")
    return model


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _placements(device_map: dict) -> set[str]:
    """hf_device_map's values as "cuda", "cpu" or "disk" (a GPU appears as its index)."""
    return {"cuda" if isinstance(v, int) or str(v).startswith("cuda") else str(v) for v in device_map.values()}


def _release_cached_device_memory() -> None:
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


@gpu_only
def test_device_map_auto_across_the_device_and_cpu_equals_the_in_memory_model(tmp_path) -> None:
    """`device_map="auto"` with a device budget of about half the weights: the first layers on the GPU, the rest on
    the CPU (streamed to the GPU by accelerate's hooks, which the inference paths must step aside for); the output,
    on the GPU, equals the in-memory model's."""
    model = _wide_model(tmp_path)
    pixel_values = _pixels(2)
    with torch.no_grad():
        expected = model(pixel_values, output_hidden_states=True)
    _release_cached_device_memory()
    loaded = EvaCLIPVisionModel.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={0: _weight_bytes(model) // 2, "cpu": 8 * 2**30},
    ).eval()
    assert _placements(loaded.hf_device_map) == {"cuda", "cpu"}, loaded.hf_device_map
    with torch.no_grad():
        got = loaded(pixel_values.to(DEVICE), output_hidden_states=True)
    _assert_trees_close(got, expected, **FP32_TOL)


def test_device_map_auto_with_disk_offload_equals_the_in_memory_model(tmp_path) -> None:
    """Budgets of a third of the weights each for the GPU and the CPU, the rest on disk (dry run: half for the CPU,
    the rest on disk, as test_integrations); another grid too (a RoPE table computed where the buffers were left on
    the meta device)."""
    model = _wide_model(tmp_path)
    budget = _weight_bytes(model)
    max_memory = {0: budget // 3, "cpu": budget // 3} if ON_GPU else {"cpu": budget // 2}
    pixel_values, resized = _pixels(2), _pixels(1, 42, seed=2)
    with torch.no_grad():
        expected = model(pixel_values, output_hidden_states=True)
        expected_resized = model(resized, interpolate_pos_encoding=True)
    _release_cached_device_memory()
    loaded = EvaCLIPVisionModel.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory=max_memory, offload_folder=str(tmp_path / "offload"),
    ).eval()
    placements = _placements(loaded.hf_device_map)
    assert "disk" in placements and DEVICE.type in placements, loaded.hf_device_map
    with torch.no_grad():
        got = loaded(pixel_values.to(DEVICE), output_hidden_states=True)
        got_resized = loaded(resized.to(DEVICE), interpolate_pos_encoding=True)
    _assert_trees_close(got, expected, **FP32_TOL)
    _assert_trees_close(got_resized, expected_resized, **FP32_TOL)


# --------------------------------------------------------------------------------------------------------------------
# 5. The LLaVA tower on the device
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_llava_tower_on_device_in_half_precision(dtype_name: str, tmp_path) -> None:
    """LLaVA's sequence: build with delay_load, `load_model()`, `.to(device=, dtype=)`. Device, dtype and the dummy
    feature follow; features (layer -2, patch tokens) equal the plain fp32 CPU model's hidden_states[-2][:, 1:]
    within half-precision rounding, for images on the device in the tower's dtype (LLaVA's call) and for fp32 CPU
    images (moved and cast by the tower, returned in fp32)."""
    dtype = DTYPES[dtype_name]
    path = _saved_tower(tmp_path, "eva02")
    tower = EvaCLIPVisionTower(path, LLAVA_ARGS, delay_load=True)
    assert not tower.is_loaded
    tower.load_model()
    tower.to(device=DEVICE, dtype=dtype)
    assert tower.device.type == DEVICE.type and tower.dtype == dtype
    dummy = tower.dummy_feature
    assert dummy.device.type == DEVICE.type and dummy.dtype == dtype and tuple(dummy.shape) == (1, tower.hidden_size)
    images = _pixels(2)
    with torch.no_grad():
        expected = EvaCLIPVisionModel.from_pretrained(path).eval()(images, output_hidden_states=True)
        expected = expected.hidden_states[-2][:, 1:]
        features = tower(images.to(DEVICE, dtype))
        from_cpu = tower(images)
    assert features.dtype == dtype and features.device.type == DEVICE.type
    assert from_cpu.dtype == torch.float32 and from_cpu.device.type == DEVICE.type
    assert features.shape == expected.shape == (2, tower.num_patches, tower.hidden_size)
    for got in (features, from_cpu):
        assert 0 < _rel_error(got, expected) < HALF_FEATURE_BOUND


def test_llava_builders_load_model_with_a_device_map_puts_the_tower_on_the_device(tmp_path) -> None:
    """LLaVA's `load_pretrained_model` calls `vision_tower.load_model(device_map="auto")` (and skips `.to()` then):
    the whole tiny tower lands on the device (accelerate's placement through `zero.from_pretrained`), and its
    features equal the plain fp32 CPU model's."""
    path = _saved_tower(tmp_path, "eva02")
    tower = EvaCLIPVisionTower(path, LLAVA_ARGS, delay_load=True)
    _release_cached_device_memory()
    tower.load_model(device_map="auto")
    assert tower.device.type == DEVICE.type and tower.dtype == torch.float32
    assert not any(p.requires_grad for p in tower.parameters())  # frozen, as LLaVA's tower
    images = _pixels(2)
    with torch.no_grad():
        expected = EvaCLIPVisionModel.from_pretrained(path).eval()(images, output_hidden_states=True)
        features = tower(images.to(DEVICE))
    _assert_trees_close(features, expected.hidden_states[-2][:, 1:], **FP32_TOL)


def test_llava_tower_under_device_autocast_is_close_to_fp32(tmp_path) -> None:
    """fp32 weights under the device's bf16 autocast (`_autocast_enabled(device.type)`): the eager inference paths
    step aside (autocast applies to module calls only), features come back in fp32, within bf16 rounding of the
    fp32 features; without autocast the inference path runs."""
    tower = EvaCLIPVisionTower(_saved_tower(tmp_path, "eva02"), LLAVA_ARGS).to(DEVICE)
    images = _pixels(2).to(DEVICE)
    inference_paths: list[str] = []
    with torch.no_grad(), _counting("_inference_forward", inference_paths, modeling_evaclip.EvaCLIPMLP):
        expected = tower(images)
        assert inference_paths  # fp32 without autocast: the fast path
        inference_paths.clear()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            features = tower(images)
    assert inference_paths == []
    assert features.dtype == torch.float32
    assert 0 < _rel_error(features, expected) < HALF_FEATURE_BOUND


# --------------------------------------------------------------------------------------------------------------------
# 6. Training steps on the device
# --------------------------------------------------------------------------------------------------------------------


def _grads(model: nn.Module, pixel_values: torch.Tensor, autocast: bool = False) -> tuple[torch.Tensor, list, int]:
    """(loss, every parameter's gradient, how many tensors the forward saved for backward outside checkpoints)."""
    model.zero_grad(set_to_none=True)
    context = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    saved: list[int] = []
    with context, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        output = model(pixel_values)
        loss = output.pooler_output.float().square().sum() + output.last_hidden_state.float().square().mean()
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()], len(saved)


@pytest.mark.parametrize("family", ["eva02", "eva18b"])
def test_gradient_checkpointing_on_device_gives_the_same_gradients(family: str) -> None:
    """Checkpointing recomputes each block in backward on the device (sdpa's memory-efficient backward there):
    the gradients equal the plain run's, fp32 with TF32 off."""
    torch.manual_seed(0)
    model = randomize(EvaCLIPVisionModel(tiny_vision_config(family))).train().to(DEVICE)
    twin = copy.deepcopy(model)
    (getattr(twin, "activation_checkpointing_enable", None) or twin.gradient_checkpointing_enable)()
    pixel_values = _pixels(2).to(DEVICE)
    loss, grads, saved = _grads(model, pixel_values)
    twin_loss, twin_grads, twin_saved = _grads(twin, pixel_values)
    assert twin_saved < saved / 2, (twin_saved, saved)  # the blocks keep nothing for backward: really checkpointed
    torch.testing.assert_close(twin_loss, loss, **FP32_TOL)
    names = [name for name, _ in model.named_parameters()]
    for name, got, want in zip(names, twin_grads, grads):
        torch.testing.assert_close(got, want, **FP32_TOL, msg=lambda m, name=name: f"{name}: {m}")


# bf16 autocast rounds every matmul's inputs to 8 significant bits (2^-9 relative each); forward and backward through
# three layers stay within 2e-2 for the loss (as the features above) and 5e-2 for the gradients, which take one more
# chain of bf16 matmuls (dgrad and wgrad) on top of the forward's rounding; a dropped cast or an fp16 overflow is O(1).
AUTOCAST_GRAD_BOUND = 5e-2


def test_bf16_autocast_training_step_on_device_is_finite_and_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = randomize(EvaCLIPVisionModel(tiny_vision_config("eva02"))).train().to(DEVICE)
    pixel_values = _pixels(2).to(DEVICE)
    loss, grads, _ = _grads(model, pixel_values)
    half_loss, half_grads, _ = _grads(model, pixel_values, autocast=True)
    assert torch.isfinite(half_loss) and all(torch.isfinite(g).all() for g in half_grads)
    assert 0 < _rel_error(half_loss, loss) < HALF_FEATURE_BOUND
    flat, half_flat = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in half_grads])
    assert 0 < _rel_error(half_flat, flat) < AUTOCAST_GRAD_BOUND


# --------------------------------------------------------------------------------------------------------------------
# 7. The feature-extraction CLI and its data path on the device
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory) -> tuple[str, Path, dict[str, torch.Tensor]]:
    """A converted tiny tower, four images of several sizes, and their `--device cpu` fp32 features."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tower(root / "model", seed=1)
    images = root / "images"
    for index, size in enumerate(((40, 30), (28, 28), (64, 48), (31, 57))):
        write_image(images / f"{index}.png", size=size, seed=index)
    out = root / "cpu"
    assert cli_main(["features", str(images), "--model", model_dir, "--out", str(out), "--device", "cpu"]) == 0
    return model_dir, images, {path.name: read(path)[0] for path in sorted(out.glob("*.safetensors"))}


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
def test_features_cli_on_device_equals_the_cpu_run(cli_inputs, dtype_name: str, tmp_path, capsys) -> None:
    """`llava-evaclip features --device cuda --workers 1` (pinned DataLoader memory, uint8 crops normalised on the
    device where that is exact): each image's features equal the `--device cpu` fp32 run's, within 1e-5 in fp32 and
    half-precision rounding otherwise; the files record the dtype."""
    model_dir, images, expected = cli_inputs
    out = tmp_path / "out"
    args = ["features", str(images), "--model", model_dir, "--out", str(out), "--device", DEVICE.type,
            "--dtype", dtype_name, "--workers", "1", "--batch-size", "3"]
    assert cli_main(args) == 0, capsys.readouterr().err
    got = {path.name: read(path) for path in sorted(out.glob("*.safetensors"))}
    assert sorted(got) == sorted(expected) and len(got) == 4
    for name, (features, metadata) in got.items():
        assert metadata["dtype"] == dtype_name and features.dtype == getattr(torch, dtype_name)
        if dtype_name == "float32":
            torch.testing.assert_close(features, expected[name], **FP32_TOL)
        else:
            assert 0 < _rel_error(features, expected[name]) < HALF_FEATURE_BOUND, name


def test_batches_finished_on_the_device_are_the_processors_pixels(tmp_path) -> None:
    """`ImageDataset.finish(crops, device)`: the uint8 crops normalised on the device where `exact_on(device)` proved
    it bit-exact, else on the CPU and moved; either way the processor's own pixel values, bit for bit."""
    from llava_evaclip.processing import build_image_processor

    processor = build_image_processor(28)
    items = processor_cases(tmp_path, 28)
    dataset = F.ImageDataset(items, processor)
    assert dataset.normaliser is not None
    crops = torch.stack([dataset[index][1] for index in range(len(items))])
    finished = dataset.finish(crops.pin_memory() if ON_GPU else crops, DEVICE)
    assert finished.device.type == DEVICE.type and finished.dtype == torch.float32
    assert torch.equal(finished.cpu(), per_image_pixels(processor, items))
    assert str(DEVICE) in dataset.normaliser._exact  # decided for this device, not assumed from the CPU


def test_iter_features_on_device_with_workers_gives_the_bits_without_workers(cli_inputs) -> None:
    """`iter_features` with a decoding worker (pinned memory on CUDA) hands the tower the same batches as without:
    the same features, bit for bit, on the device."""
    model_dir, images, _ = cli_inputs
    tower = F.load_tower(model_dir, device=DEVICE)
    assert tower.device.type == DEVICE.type
    items, _ = F.find_images([str(images)])
    runs = [{result.item.key: result.features for result in F.iter_features(tower, items, batch_size=2,
                                                                            workers=workers)}
            for workers in (0, 1)]
    assert sorted(runs[0]) == sorted(runs[1]) and len(runs[0]) == 4
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


@pytest.fixture(scope="module")
def full_model_dir(tmp_path_factory) -> str:
    """A full model dir (both towers, CLIP tokenizer files), peaked probabilities (temperature 100), as test_cli's."""
    from llava_evaclip import EvaCLIPConfig
    from llava_evaclip.processing import build_image_processor
    from llava_evaclip.tokenization import write_tokenizer_files

    from conftest import tiny_text_config

    path = str(tmp_path_factory.mktemp("full"))
    torch.manual_seed(2)
    text = tiny_text_config(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    config = EvaCLIPConfig(text_config=text.to_dict(), vision_config=tiny_vision_config("eva02").to_dict(),
                           projection_dim=16, logit_scale_init_value=math.log(100.0))
    randomize(EvaCLIPModel(config)).save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    write_tokenizer_files(path, model_max_length=text.max_position_embeddings)
    return path


def _printed_numbers(text: str, pattern: str) -> list[float]:
    return [float(value) for value in re.findall(pattern, text)]


def test_similarity_and_visualize_cli_on_device_print_the_cpu_numbers(full_model_dir, cli_inputs, tmp_path,
                                                                       capsys) -> None:
    """`similarity` (both towers on the device) and `visualize` (the tower on the device, PCA on the CPU) with
    `--device cuda` print the `--device cpu` run's probabilities and explained variances, up to the last printed
    digit (fp32 on both: 1e-6 apart before rounding)."""
    _, images, _ = cli_inputs
    image = str(images / "0.png")
    printed = []
    for run, device in enumerate(("cpu", DEVICE.type)):
        args = ["similarity", "--model", full_model_dir, "--images", image, str(images / "2.png"),
                "--texts", "a red square", "random noise", "--device", device]
        assert cli_main(args) == 0
        table = capsys.readouterr().out
        out = str(tmp_path / f"{run}-{device}.png")
        assert cli_main(["visualize", image, "--model", full_model_dir, "--out", out, "--device", device]) == 0
        variances = capsys.readouterr().out
        assert os.path.getsize(out) > 0
        printed.append((_printed_numbers(table, r"\b[01]\.\d{4}\b"),
                        _printed_numbers(variances.split("PC1-3:")[-1], r"\d\.\d{3}")))
    (cpu_table, cpu_variances), (table, variances) = printed
    assert len(cpu_table) == 4 and len(cpu_variances) == 3
    torch.testing.assert_close(torch.tensor(table), torch.tensor(cpu_table), atol=1.01e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(variances), torch.tensor(cpu_variances), atol=1.01e-3, rtol=0)


def test_device_resolution_names_the_local_gpu() -> None:
    """`--device auto` / `cuda` become cuda:LOCAL_RANK on a GPU machine (the CPU without one; `cuda` then refuses),
    and an index past the last GPU is refused before loading."""
    from llava_evaclip.cli import CLIError
    from llava_evaclip.commands import _common

    context = F.DistributedContext(0, 1, 0)
    assert context.device("auto") == (torch.device("cuda", 0) if ON_GPU else torch.device("cpu"))
    assert _common.resolve_device("auto").type == DEVICE.type
    if ON_GPU:
        assert context.device("cuda") == torch.device("cuda", 0)
        assert _common.resolve_device("cuda:0") == torch.device("cuda", 0)
        with pytest.raises(CLIError, match="CUDA device"):
            _common.resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match="CUDA is not available"):
            context.device("cuda")


# --------------------------------------------------------------------------------------------------------------------
# 8. Other CUDA-only branches: flex / flash attention kernels, the launcher's synchronize patch
# --------------------------------------------------------------------------------------------------------------------


@gpu_only
@pytest.mark.skipif(_compat.ALL_ATTENTION_FUNCTIONS is None, reason="transformers without AttentionInterface (4.37)")
def test_flex_attention_on_device_equals_eager(fresh_dynamo) -> None:
    """flex_attention's Triton kernel on the text tower, whose causal + padding mask is the library's own `BlockMask`
    built on the device (`_flex_causal_mask`); fp32 against eager attention on the same device (the CPU kernel and
    the unmasked vision tower are covered by test_integrations). One tower only: each flex compile costs seconds."""
    from llava_evaclip.modeling_evaclip import EvaCLIPTextModel

    from conftest import tiny_text_config

    torch.manual_seed(0)  # width 64 over 4 heads: head_dim 16, the smallest Triton's dot takes unpadded
    text = randomize(EvaCLIPTextModel(tiny_text_config(hidden_size=64))).eval().to(DEVICE)
    ids, mask = _on_device(_text_inputs(text.config))
    with torch.no_grad():
        text.set_attn_implementation("eager")
        expected = text(ids, attention_mask=mask).last_hidden_state
        text.set_attn_implementation("flex_attention")
        got = text(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, **FP32_TOL)


@gpu_only
def test_flash_attention_2_on_device_is_as_close_to_fp64_as_sdpa() -> None:
    """The flash-attn package (where installed) on the vision tower in bf16: hidden_states[-2] within 1.3x of the
    error torch's own flash kernel (sdpa) makes against the fp64 truth."""
    pytest.importorskip("flash_attn", reason="the flash-attn package is not installed")
    assert _compat.is_flash_attn_available()
    pairs = []
    for seed in SEEDS:
        model = _perturbed_model("eva02", seed)
        vision = EvaCLIPVisionModel(copy.deepcopy(model.config.vision_config)).eval()
        vision.vision_model.load_state_dict(model.vision_model.state_dict())
        pixels = _pixels(4, seed=seed).bfloat16()
        truth = _our_vision_states(_rounded(vision, torch.bfloat16).double(), pixels.double())
        vision.to(DEVICE, torch.bfloat16)
        vision.config._attn_implementation_internal = "sdpa"
        with _sdpa_kernel("flash"):
            reference = _our_vision_states(vision, pixels.to(DEVICE))
        vision.config._attn_implementation_internal = "flash_attention_2"
        pairs.append((_rel_error(reference, truth), _rel_error(_our_vision_states(vision, pixels.to(DEVICE)), truth)))
    _check_ratio(pairs, "flash_attention_2 vs sdpa flash")


@gpu_only
def test_flash_attention_2_without_the_package_is_refused_with_a_reason() -> None:
    """Where CUDA is present but flash-attn is not, asking for it says which package is missing."""
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("the flash-attn package is installed")
    assert not _compat.is_flash_attn_available()
    config = tiny_vision_config("eva02")
    config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises((ValueError, ImportError), match="(?i)flash"):
        modeling_evaclip.resolve_attn_implementation(config)


@gpu_only
def test_zero_collectives_use_the_current_gpu_under_nccl(tmp_path) -> None:
    """`zero._communication_device()` (where ZeRO-3 loading stages tensors for NCCL collectives when DeepSpeed is
    not imported) is the current CUDA device in an NCCL group; a one-rank group here (no second GPU)."""
    import torch.distributed as dist

    from llava_evaclip import zero

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert zero._communication_device() == torch.device("cuda", torch.cuda.current_device())
        assert zero.all_gather_object({"rank": 0}) == [{"rank": 0}]
        tensor = torch.ones(3, device=zero._communication_device())
        dist.all_reduce(tensor)
        assert tensor.device.type == "cuda" and tensor.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


@gpu_only
def test_launcher_keeps_the_real_cuda_synchronize_on_a_gpu() -> None:
    """`patch_cuda_synchronize` makes `torch.cuda.synchronize` a no-op only without CUDA; on a GPU it stays torch's
    own, and synchronising really waits for queued work."""
    from llava_evaclip.launch import patch_cuda_synchronize

    original = torch.cuda.synchronize
    patch_cuda_synchronize()
    assert torch.cuda.synchronize is original and not getattr(original, "_evaclip_noop", False)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.ones(256, 256, device=DEVICE).matmul(torch.ones(256, 256, device=DEVICE))
    end.record()
    torch.cuda.synchronize()
    assert end.query()


# --------------------------------------------------------------------------------------------------------------------
# 2. torch.compile on the device (last: the slowest cases, so a time limit cuts nothing else)
# --------------------------------------------------------------------------------------------------------------------


def _compile_twice(module: nn.Module, call: Callable[..., Any], first: tuple, second: tuple) -> tuple[Any, Any]:
    """inductor, fullgraph, dynamic; the second call (another batch size) compiles nothing new (counted, and
    dynamo's `error_on_recompile`). Returns both results."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(module, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad():
        got_first = call(compiled, *first)
        frames = counter.frame_count
        with torch._dynamo.config.patch(error_on_recompile=True):
            got_second = call(compiled, *second)
    assert frames > 0 and counter.frame_count == frames, (frames, counter.frame_count)
    return got_first, got_second


def test_compiled_vision_model_eva02_on_device_equals_eager_without_recompiling(fresh_dynamo) -> None:
    """EVA-02 (RoPE, SwiGLU through the custom op inside inductor's Triton code, sub-LN), fp32, TF32 off."""
    torch.manual_seed(0)
    model = randomize(EvaCLIPVisionModel(tiny_vision_config("eva02", num_hidden_layers=2))).eval().to(DEVICE)

    def call(module: nn.Module, pixel_values: torch.Tensor) -> Any:
        return module(pixel_values, output_hidden_states=True)

    first, second = (_pixels(2).to(DEVICE),), (_pixels(3, seed=2).to(DEVICE),)
    got_first, got_second = _compile_twice(model, call, first, second)
    with torch.no_grad():
        for got, inputs in ((got_first, first), (got_second, second)):
            _assert_trees_close(got, _on_cpu(call(model, *inputs)), **FP32_TOL)


def test_compiled_llava_tower_eva01_on_device_equals_eager_without_recompiling(fresh_dynamo, tmp_path) -> None:
    """The LLaVA tower at EVA01 with layer scale (GELU MLP: no custom op), fp32, TF32 off."""
    tower = EvaCLIPVisionTower(_saved_tower(tmp_path, "eva01_layer_scale", num_hidden_layers=2), LLAVA_ARGS)
    tower.to(DEVICE)

    def call(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return module(images)

    first, second = (_pixels(2).to(DEVICE),), (_pixels(3, seed=2).to(DEVICE),)
    got_first, got_second = _compile_twice(tower, call, first, second)
    with torch.no_grad():
        for got, inputs in ((got_first, first), (got_second, second)):
            _assert_trees_close(got, call(tower, *inputs).cpu(), **FP32_TOL)


def test_compiled_bf16_llava_tower_eva02_on_device_is_close_to_eager_bf16(fresh_dynamo, tmp_path) -> None:
    """bf16 under inductor (which keeps bf16 pointwise chains in fp32 registers) against the eager bf16 tower on the
    device, both against the fp32 tower: within bf16 rounding of each other and of fp32."""
    path = _saved_tower(tmp_path, "eva02", num_hidden_layers=2)
    reference = EvaCLIPVisionTower(path, LLAVA_ARGS)
    tower = EvaCLIPVisionTower(path, LLAVA_ARGS).to(DEVICE, torch.bfloat16)
    images = _pixels(2).to(DEVICE, torch.bfloat16)
    compiled = torch.compile(tower, fullgraph=True)
    with torch.no_grad():
        got, eager = compiled(images), tower(images)
        expected = reference(images.float().cpu())
    assert got.dtype == torch.bfloat16 and got.device.type == DEVICE.type
    assert _rel_error(got, eager) < HALF_FEATURE_BOUND
    assert 0 < _rel_error(got, expected) < HALF_FEATURE_BOUND  # bf16 rounding happened, and no more than that
