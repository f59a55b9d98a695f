"""torch tools a user applies to a CLIP-style model give our model the numbers they give transformers' CLIP.

Each tool here rewrites, watches or differentiates what a module call runs: a swapped or monkeypatched activation or
linear, forward-mode AD under `torch.no_grad()`, weight tensor subclasses, `TorchFunctionMode` / `TorchDispatchMode`,
quantization, pruning and parametrizations, ONNX export with a dynamic batch, saliency gradients and whole-model
pickling. The eager inference paths (direct `out=` matmuls, oneDNN's fused linears, SiLU folded into the gate matmul)
must step aside for all of them. References are independent: transformers' CLIP holding an EVA01-style tower's weights
(`test_model_parity_hf_clip`), or, for EVA02's SwiGLU / RoPE blocks that CLIP lacks, our own module path on an fp64
copy (grad enabled, where no inference path runs).
"""

from __future__ import annotations

import contextlib
import copy
import io
import inspect
import types
import zlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CLIPVisionModel

from conftest import needs_cpu_fp16, needs_export_dims, randomize, tiny_vision_config
from llava_evaclip import EvaCLIPVisionModel
from llava_evaclip import modeling_evaclip
from test_model_parity_hf_clip import _clip_vision_config, _copy_vision

ATOL = 1e-5


def _ours(family: str = "eva02", **overrides) -> EvaCLIPVisionModel:
    return randomize(EvaCLIPVisionModel(tiny_vision_config(family, **overrides))).eval()


def _clip_like(ours: EvaCLIPVisionModel) -> CLIPVisionModel:
    """transformers' CLIPVisionModel holding an EVA01-style tower's weights, with eager attention (forward AD has no
    rule for torch's CPU fused attention)."""
    config = _clip_vision_config(ours.config)
    config._attn_implementation = "eager"  # before building: 4.40-4.51's CLIP picks its attention classes then
    clip = CLIPVisionModel(config).eval()
    _copy_vision(ours.vision_model, getattr(clip, "vision_model", clip))
    clip.config._attn_implementation = "eager"
    return clip.to(ours.dtype)


def _pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(1))


def _assert_same_as_clip(ours: EvaCLIPVisionModel, clip: nn.Module) -> None:
    """Ours and transformers' CLIP (the same weights and the same tool applied) give the same last hidden state."""
    pixel_values = _pixels()
    with torch.no_grad():
        expected = clip(pixel_values).last_hidden_state
        actual = ours(pixel_values).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def _module_path_fp64(model: nn.Module, pixel_values: torch.Tensor, edit=lambda model: None) -> torch.Tensor:
    """`last_hidden_state` of a copy with `edit` applied, then cast to fp64 (the order the tested model takes), run
    with grad enabled (module calls only)."""
    reference = copy.deepcopy(model)
    edit(reference)
    reference.double()
    with torch.enable_grad():
        return reference(pixel_values.double()).last_hidden_state.detach()


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [module for module in model.modules() if type(module) is nn.Linear]


def _coarse_quant(weight: torch.Tensor) -> torch.Tensor:
    """Per-row fake quantization to 7 levels: a drastic change of every product, far above bf16 rounding."""
    scale = weight.abs().amax(-1, keepdim=True) / 3
    return (weight / scale).round().clamp(-3, 3) * scale


# ----------------------------------------------------------------------------------------------------------------
# Modules a user swaps or patches
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_swapped_swiglu_activation_is_the_one_inference_runs(dtype) -> None:
    """transformers' MLPs call whatever module `activation_fn` holds; the SwiGLU inference path folded SiLU into the
    gate matmul from `config.hidden_act` and ignored a swapped ReLU (1.70 off in fp32)."""
    model = _ours("eva02")

    def relu(model: nn.Module) -> None:
        for layer in model.vision_model.encoder.layers:
            layer.mlp.activation_fn = nn.ReLU()

    pixel_values = _pixels()
    expected = _module_path_fp64(model, pixel_values, relu)
    relu(model)
    model.to(dtype)
    with torch.no_grad():
        actual = model(pixel_values.to(dtype)).last_hidden_state
    torch.testing.assert_close(actual.double(), expected, atol=ATOL if dtype == torch.float32 else 0.15, rtol=0)


def _halve_output(module: nn.Module) -> None:
    """A loralib-style instance patch: `module.forward` set on the instance, scaling the class forward's output."""
    module.forward = types.MethodType(lambda self, x: type(self).forward(self, x) * 0.5, module)


def _patch_layers(layers: nn.ModuleList, names: tuple[str, ...]) -> None:
    for layer in layers:
        for name in names:
            owner, attribute = name.split(".")
            _halve_output(getattr(getattr(layer, owner), attribute))


@pytest.mark.parametrize("names", [("self_attn.q_proj", "mlp.fc2"), ("mlp.fc1",)], ids=["q_proj+fc2", "fc1"])
def test_instance_forward_patches_on_linears_run_as_in_clip(names) -> None:
    """Patching `layer.forward` on an instance takes effect in transformers' CLIP; the inference paths read the
    weights of such layers directly and dropped the patch (1.27 off)."""
    ours = _ours("eva01")
    clip = _clip_like(ours)
    for tower in (ours.vision_model, getattr(clip, "vision_model", clip)):
        _patch_layers(tower.encoder.layers, names)
    _assert_same_as_clip(ours, clip)


@needs_cpu_fp16
def test_instance_forward_patches_in_the_swiglu_mlp_and_the_patch_conv(monkeypatch) -> None:
    """The same for EVA02's SwiGLU inputs and activation, and for the patch convolution on CPUs whose half-precision
    kernels are portable (where the convolution runs as an fp32 `F.conv2d`). Before: 1.76 off in fp32; the
    convolution's patch alone, 1.50 off in fp16."""
    monkeypatch.setattr(modeling_evaclip, "cpu_half_kernels", lambda dtype: "portable")
    model = _ours("eva02")

    def patch(model: nn.Module) -> None:
        for layer in model.vision_model.encoder.layers:
            _halve_output(layer.mlp.fc1_up)
            layer.mlp.activation_fn.forward = torch.relu
        _halve_output(model.vision_model.embeddings.patch_embedding)

    pixel_values = _pixels()
    expected = _module_path_fp64(model, pixel_values, patch)
    patch(model)
    with torch.no_grad():
        actual = model(pixel_values).last_hidden_state
        half = model.half()(pixel_values.half()).last_hidden_state
    torch.testing.assert_close(actual.double(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(half.double(), expected, atol=0.03, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Forward-mode AD
# ----------------------------------------------------------------------------------------------------------------


def _tangent(model: nn.Module, pixel_values: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """The JVP of `last_hidden_state` with `torch.autograd.forward_ad` under `torch.no_grad()` (forward AD needs no
    backward graph, so memory-saving JVPs run this way)."""
    with torch.no_grad(), fwAD.dual_level():
        output = model(fwAD.make_dual(pixel_values, direction)).last_hidden_state
        return fwAD.unpack_dual(output).tangent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_ad_under_no_grad_gives_clips_tangent(dtype) -> None:
    """The inference paths ran under `no_grad` with a dual input: their `out=` matmuls refused it (fp32), and in bf16
    with every projection biased oneDNN's fused linears silently dropped the tangent (1.45 off for a scale of 1.8)."""
    ours = _ours("eva01", k_bias=True, attn_implementation="eager").to(dtype)
    clip = _clip_like(ours)
    pixel_values = _pixels().to(dtype)
    direction = torch.randn(pixel_values.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    expected = _tangent(clip, pixel_values, direction)
    actual = _tangent(ours, pixel_values, direction)
    torch.testing.assert_close(actual, expected, atol=1e-4 if dtype == torch.float32 else 0.05, rtol=0)


def test_forward_ad_under_no_grad_in_swiglu_rope_blocks_equals_the_fp64_jvp() -> None:
    model = _ours("eva02", k_bias=True, attn_implementation="eager").bfloat16()
    pixel_values = _pixels().bfloat16()
    direction = torch.randn(pixel_values.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    reference = copy.deepcopy(model).double()
    _, expected = torch.func.jvp(
        lambda x: reference(x).last_hidden_state, (pixel_values.double(),), (direction.double(),)
    )
    actual = _tangent(model, pixel_values, direction)
    assert (actual.double() - expected).abs().max() < 0.05 * expected.abs().max()  # bf16 rounding; dropped: 0.97


# ----------------------------------------------------------------------------------------------------------------
# Weight subclasses and modes
# ----------------------------------------------------------------------------------------------------------------


class CoarseQuantWeight(nn.Parameter):
    """A weight whose `F.linear` uses fake-quantized values, as torchao-style weight subclasses intercept it."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            plain = [a.as_subclass(torch.Tensor) if isinstance(a, torch.Tensor) else a for a in args]
            plain[1] = _coarse_quant(plain[1])
            return F.linear(*plain, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)


def _quantize_weights(model: nn.Module) -> None:
    for layer in _linears(model):
        layer.weight = CoarseQuantWeight(layer.weight.detach(), requires_grad=False)


class CoarseQuantLinearMode(TorchFunctionMode):
    """A function mode giving every `F.linear` fake-quantized weights."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            args = (args[0], _coarse_quant(args[1]), *args[2:])
        return func(*args, **kwargs)


class CoarseQuantMatmulMode(TorchDispatchMode):
    """A dispatch mode giving the weight operand of every `aten.mm` / `aten.addmm` (what `F.linear` runs on CPU)
    fake-quantized values."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            args = (*args[:-1], _coarse_quant(args[-1].t()).t())
        return func(*args, **kwargs)


@pytest.mark.parametrize("tool", ["weight_subclass", "function_mode", "dispatch_mode"])
def test_weight_subclasses_and_modes_see_the_ops_they_see_in_clip(tool) -> None:
    """Before: the inference paths ran their own matmuls and the tool changed nothing (1.20 off)."""
    ours = _ours("eva01")
    clip = _clip_like(ours)
    pixel_values = _pixels()
    if tool == "weight_subclass":
        _quantize_weights(ours)
        _quantize_weights(clip)
    mode = {"function_mode": CoarseQuantLinearMode, "dispatch_mode": CoarseQuantMatmulMode}.get(tool)
    with torch.no_grad():
        with mode() if mode else contextlib.nullcontext():
            expected = clip(pixel_values).last_hidden_state
        with mode() if mode else contextlib.nullcontext():
            actual = ours(pixel_values).last_hidden_state
        plain = _ours("eva01")(pixel_values).last_hidden_state
    assert (expected - plain).abs().max() > 0.1  # the tool changes the output
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_a_weight_subclass_in_swiglu_rope_blocks_equals_the_fp64_module_path() -> None:
    """Before: 1.94 off."""
    model = _ours("eva02")
    pixel_values = _pixels()
    expected = _module_path_fp64(model, pixel_values, _quantize_weights)
    _quantize_weights(model)
    with torch.no_grad():
        actual = model(pixel_values).last_hidden_state
    torch.testing.assert_close(actual.double(), expected, atol=ATOL, rtol=0)


class ClippedActivations(torch.Tensor):
    """An input subclass whose `F.linear` clips its activations, as outlier-clipping simulators do (continuous, so
    fp32 and fp64 runs stay close)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            plain = [a.as_subclass(torch.Tensor) if isinstance(a, torch.Tensor) else a for a in args]
            plain[0] = plain[0].clamp(-0.5, 0.5)
            return F.linear(*plain, **kwargs).as_subclass(cls)
        return super().__torch_function__(func, types, args, kwargs)


@pytest.mark.parametrize("family", ["eva01", "eva02"])
def test_an_input_subclass_sees_the_linears_it_sees_in_the_fp64_module_path(family) -> None:
    """Before: the inference paths ran their own matmuls on the subclass's rows (4.29 off in EVA02, 1.26 in EVA01)."""
    model = _ours(family)
    pixel_values = _pixels()
    reference = copy.deepcopy(model).double()
    with torch.enable_grad():
        expected = reference(pixel_values.double().as_subclass(ClippedActivations)).last_hidden_state
    with torch.no_grad():
        actual = model(pixel_values.as_subclass(ClippedActivations)).last_hidden_state
    assert type(actual) is ClippedActivations
    torch.testing.assert_close(actual.as_subclass(torch.Tensor).double(), expected.detach().as_subclass(torch.Tensor),
                               atol=ATOL, rtol=0)


def _linear_takes_sparse_weights() -> bool:
    try:
        F.linear(torch.ones(1, 2, 2), torch.ones(2, 2).to_sparse(), torch.ones(2))
    except RuntimeError:  # torch 2.1: "addmm_sparse_dense: expected either 'mat1' to have sparse layout"
        return False
    return True


@pytest.mark.skipif(not _linear_takes_sparse_weights(),
                    reason="this torch's F.linear refuses a sparse weight with a bias (torch 2.1), in CLIP as in ours")
def test_sparse_weights_run_as_in_clip() -> None:
    """`layer.weight = nn.Parameter(w.to_sparse())` (torch's sparsity tutorials) runs in CLIP's `F.linear`; the
    inference paths' `addmm(out=)` refused it ("addmm_sparse_dense: expected either 'mat1' to have sparse layout")."""
    ours = _ours("eva01")
    clip = _clip_like(ours)
    for model in (ours, clip):
        for layer in _linears(model):
            weight = layer.weight.detach()
            weight = weight * (weight.abs() > weight.abs().median())  # half pruned
            layer.weight = nn.Parameter(weight.to_sparse(), requires_grad=False)
    _assert_same_as_clip(ours, clip)


def test_the_default_device_context_keeps_the_inference_paths(monkeypatch) -> None:
    """`with torch.device(...)` is a function mode too, but only sets factory defaults: the fast paths stay on."""
    model = _ours("eva02")
    calls = []
    original = modeling_evaclip.EvaCLIPMLP._inference_forward
    monkeypatch.setattr(modeling_evaclip.EvaCLIPMLP, "_inference_forward",
                        lambda self, x: calls.append(1) or original(self, x))
    with torch.no_grad(), torch.device("cpu"):
        model(_pixels())
    assert len(calls) == model.config.num_hidden_layers


# ----------------------------------------------------------------------------------------------------------------
# Tools that already worked: kept working
# ----------------------------------------------------------------------------------------------------------------


def _prune(model: nn.Module) -> None:
    for layer in _linears(model):
        torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.5)


def _weight_norm(model: nn.Module) -> None:
    for layer in _linears(model):
        torch.nn.utils.parametrizations.weight_norm(layer)


def _spectral_norm(model: nn.Module) -> None:
    """Each power iteration starts from a vector seeded by the layer's name in the encoder (CLIP declares its
    projections in another order)."""
    for name, layer in model.named_modules():
        if type(layer) is nn.Linear:
            torch.manual_seed(zlib.crc32(name.split("encoder.")[-1].encode()))
            torch.nn.utils.parametrizations.spectral_norm(layer)


def _quantize_dynamic(model: nn.Module) -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


@pytest.mark.parametrize("tool", [_prune, _weight_norm, _spectral_norm, _quantize_dynamic],
                         ids=["prune", "weight_norm", "spectral_norm", "quantize_dynamic"])
def test_pruning_parametrizations_and_dynamic_quantization_match_clip(tool) -> None:
    ours = _ours("eva01")
    clip = _clip_like(ours)
    ours, clip = (tool(model) or model for model in (ours, clip))
    _assert_same_as_clip(ours, clip)


@pytest.mark.parametrize("family", ["eva01", "eva02"])
def test_saliency_gradient_with_frozen_parameters_equals_the_fp64_gradient(family) -> None:
    """Gradient w.r.t. the pixels, parameters frozen, `enable_grad` inside `no_grad`."""
    model = _ours(family).requires_grad_(False)
    pixel_values = _pixels()
    reference = copy.deepcopy(model).double()
    wide = pixel_values.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(wide).pooler_output.sum(), wide)
    pixels = pixel_values.clone().requires_grad_(True)
    with torch.no_grad(), torch.enable_grad():
        (actual,) = torch.autograd.grad(model(pixels).pooler_output.sum(), pixels)
    torch.testing.assert_close(actual.double(), expected, atol=1e-6, rtol=0)


def test_whole_model_save_load_and_deepcopy_after_a_cached_forward() -> None:
    model = _ours("eva02")
    pixel_values = _pixels()
    expected = _module_path_fp64(model, pixel_values)
    with torch.no_grad():
        model(pixel_values)  # fills the rotary cache
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for copied in (loaded, copy.deepcopy(model)):
        with torch.no_grad():
            torch.testing.assert_close(copied(pixel_values).last_hidden_state.double(), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=needs_export_dims)],
                         ids=["torchscript_exporter", "dynamo_exporter"])
def test_onnx_export_with_a_dynamic_batch_runs_in_onnxruntime_as_the_fp64_module_path(dynamo, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model = _ours("eva02")

    class Tower(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            output = self.model(pixel_values)
            return output.last_hidden_state, output.pooler_output

    path = str(tmp_path / "tower.onnx")
    if dynamo:
        options = {"dynamo": True, "dynamic_shapes": {"pixel_values": {0: torch.export.Dim("batch", max=64)}}}
    else:
        options = {"input_names": ["pixel_values"], "dynamic_axes": {"pixel_values": {0: "batch"}}}
        if "dynamo" in inspect.signature(torch.onnx.export).parameters:  # torch 2.1's exporter is torchscript's only
            options["dynamo"] = False
    with torch.no_grad():
        torch.onnx.export(Tower(model).eval(), (_pixels(2),), path, **options)
    session = ort.InferenceSession(path)
    for batch in (1, 3):
        pixel_values = _pixels(batch)
        (last_hidden_state, _) = session.run(None, {session.get_inputs()[0].name: pixel_values.numpy()})
        expected = _module_path_fp64(model, pixel_values)
        torch.testing.assert_close(torch.from_numpy(last_hidden_state).double(), expected, atol=ATOL, rtol=0)
