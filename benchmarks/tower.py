"""Speed and memory of the EVA-CLIP LLaVA tower next to what a user would otherwise pick, on one machine.

    python -m benchmarks.tower                       # CPU: fp32 + bf16, batch 1 and 8, JSON/markdown/PNG
    python -m benchmarks.tower --device cuda         # the same comparison on a GPU (bf16, sdpa / flash kernels)
    python -m benchmarks.tower --quick               # tiny shapes, two repetitions: checks the script end to end

Contenders (random weights; speed does not depend on the values):

* ``ours_eva02``: `EvaCLIPVisionTower` (LLaVA's features: layer -2, patch tokens) at the EVA02-CLIP-L-14-336 preset;
* ``ours_plain``: the same tower at a plain EVA ViT-L/14-336 shape (GELU MLP, no RoPE / SwiGLU / sub-LN, k bias);
* ``hf_clip``: transformers' `CLIPVisionModel` at that plain shape, sdpa, ``output_hidden_states=True`` and
  ``hidden_states[-2]`` (what LLaVA's `CLIPVisionTower` runs);
* ``timm_eva02``: timm's ``eva02_large_patch14_clip_336`` ``forward_features``;
* ``ours_eager``: our EVA-02 model forced to eager attention with all hidden states (the baseline; shares weights
  with ``ours_eva02``);
* with bf16, ``ours_eva02_autocast``: fp32 weights under ``torch.autocast`` instead of a bf16 cast;
* ``ours_eva02_kernels`` / ``ours_plain_kernels`` (ceiling references, ``--no-ceiling`` skips them): the towers'
  ``nn.Linear`` matmuls and attention alone, in torch's kernels (``torch.mm`` with the same weights and rows, and
  ``scaled_dot_product_attention``), nothing else. From their time the report derives each tower's ceiling: the
  fraction of the matmul peak no implementation built on torch's kernels can exceed at these shapes.

All contenders of one dtype are built once and timed round-robin, the order rotated every repetition, so background
load falls on all of them alike: the ratios from one run are the numbers to read, not absolute seconds. FLOPs are
counted analytically for the layers each contender actually runs, against a matmul peak measured in the same
rotation (`torch.mm` of large square matrices). Peak memory above the weights is measured per contender in a fresh
subprocess on CPU (peak RSS during one forward, minus RSS with the model and input in place) and with
`torch.cuda.max_memory_allocated` on GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

if TYPE_CHECKING:  # torch is imported where it is used, so `llava-evaclip --help` stays fast
    import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
SELECT_LAYER = -2
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
SHAPE_LABELS = {"eva02": "EVA02-CLIP-L-14-336", "plain": "plain EVA ViT-L/14-336"}

# Goals of issue 6 (ratios below 1 mean ours is faster / smaller).
GOAL_VS_TIMM = 0.85
GOAL_VS_HF_CLIP = 0.95
GOAL_VS_EAGER_SPEEDUP = 1.25
GOAL_PEAK_FRACTION = 0.95  # issue 13 (issue 6: 0.90)
GOAL_BF16_SPEEDUP = 1.8
GOAL_MEMORY_VS_HF_CLIP = 0.6
# Goals of issue 13.
GOAL_COMPILED_VS_TIMM = 0.9
GOAL_BF16_PEAK_FRACTION = 0.85


class BenchmarkError(Exception):
    """A usage error: reported as one line, exit status 2."""


# --------------------------------------------------------------------------------------------------------------------
# Shapes and FLOPs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Shapes:
    """The two architectures compared, as our config (FLOPs are counted from it) plus the peers' constructors."""

    eva02: Any
    plain: Any
    clip_kwargs: dict[str, Any]
    timm_kwargs: dict[str, Any]
    matmul_size: int

    def config(self, shape: str) -> Any:
        return self.eva02 if shape == "eva02" else self.plain


def build_shapes(quick: bool) -> Shapes:
    from llava_evaclip import EvaCLIPVisionConfig

    if quick:
        size = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14)
        eva02 = EvaCLIPVisionConfig.from_preset("EVA02-CLIP-L-14-336", intermediate_size=170, **size)
        plain = EvaCLIPVisionConfig(intermediate_size=256, hidden_act="gelu", k_bias=True, **size)
        timm_kwargs = dict(embed_dim=64, depth=3, num_heads=4, img_size=56)
        return Shapes(eva02, plain, dict(intermediate_size=256, **size), timm_kwargs, matmul_size=256)
    eva02 = EvaCLIPVisionConfig.from_preset("EVA02-CLIP-L-14-336")
    size = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)
    plain = EvaCLIPVisionConfig(intermediate_size=4096, hidden_act="gelu", k_bias=True, projection_dim=768, **size)
    return Shapes(eva02, plain, dict(intermediate_size=4096, **size), {}, matmul_size=4096)


def tokens_per_image(config: Any) -> int:
    return (config.image_size // config.patch_size) ** 2 + 1  # patches + CLS


def layer_flops(config: Any, layers: int, batch: int) -> float:
    """Multiply-adds x 2 of `layers` encoder layers: the `nn.Linear` matmuls (q, k, v, out, MLP) and attention."""
    tokens, width, inner = tokens_per_image(config), config.hidden_size, config.intermediate_size
    linears = 2 * tokens * (width * 4 * width + width * inner * (3 if config.use_swiglu else 2))
    attention = 4 * tokens * tokens * width  # q @ k^T and probs @ v over all heads
    return float(batch * layers * (linears + attention))


def tower_flops(config: Any, layers: int, batch: int) -> float:
    """Multiply-adds x 2 of the patch embedding and `layers` encoder layers (matmuls and attention only)."""
    embed = 2 * (tokens_per_image(config) - 1) * config.num_channels * config.patch_size**2 * config.hidden_size
    return float(batch * embed) + layer_flops(config, layers, batch)


# --------------------------------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    label: str
    shape: str  # "eva02", "plain", or "matmul"
    layers: int
    run: Callable[[torch.Tensor], Any]
    input_dtype: torch.dtype
    ours: bool = False
    peers: tuple[str, ...] = ()
    note: str = ""
    model: Any = None
    compiled: bool = False  # run once per new input shape before timing; that call's wall time is the compile time
    kernels_only: bool = False  # FLOPs are the encoder layers' alone (`layer_flops`), no patch embedding


def _seed() -> None:
    import torch

    torch.manual_seed(0)


def _our_model(config: Any, dtype: torch.dtype, device: torch.device) -> Any:
    from llava_evaclip import EvaCLIPVisionModel

    _seed()
    model = EvaCLIPVisionModel(copy.deepcopy(config))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _tower(model: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """LLaVA's view of the model: `EvaCLIPVisionTower` (layer -2, patch tokens) around an in-memory model."""
    try:
        from llava_evaclip.tower import EvaCLIPVisionTower
    except ImportError:
        index = model.config.num_hidden_layers + 1 + SELECT_LAYER

        def run(pixel_values: torch.Tensor) -> torch.Tensor:
            return model.vision_model.select_hidden_states(pixel_values, [index])[index][:, 1:]

        return run, "select_hidden_states (llava_evaclip.tower not available)"
    args = SimpleNamespace(mm_vision_select_layer=SELECT_LAYER, mm_vision_select_feature="patch")
    with tempfile.TemporaryDirectory(prefix="evaclip-bench-") as config_dir:
        model.config.save_pretrained(config_dir)
        tower = EvaCLIPVisionTower(config_dir, args, delay_load=True)
    tower.vision_tower = model
    tower.is_loaded = True
    return tower, "EvaCLIPVisionTower"


def _all_states_run(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values, output_hidden_states=True).hidden_states[SELECT_LAYER][:, 1:]

    return run


def _shared_copy(model: Any) -> Any:
    """A second module tree over the same parameters and buffers, with its own config (to switch attention)."""
    memo = {id(tensor): tensor for tensor in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _timm_eva02(shapes: Shapes, dtype: torch.dtype, device: torch.device) -> Any:
    import timm

    _seed()
    model = timm.create_model("eva02_large_patch14_clip_336", pretrained=False, **shapes.timm_kwargs)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_contender(
    name: str, shapes: Shapes, dtype: torch.dtype, device: torch.device, built: dict[str, Contender]
) -> Contender:
    """One contender in `dtype` on `device`; `built` lets the eager baseline share the tower's weights."""
    import torch

    eva02, plain = shapes.eva02, shapes.plain
    full, tower_layers = eva02.num_hidden_layers, eva02.num_hidden_layers + 1 + SELECT_LAYER
    if name in ("ours_eva02", "ours_plain"):
        shape = "eva02" if name == "ours_eva02" else "plain"
        model = _our_model(shapes.config(shape), dtype, device)
        run, note = _tower(model)
        peers = ("timm_eva02", "ours_eager") if shape == "eva02" else ("hf_clip",)
        label = f"ours: EvaCLIPVisionTower, {SHAPE_LABELS[shape]}"
        return Contender(name, label, shape, tower_layers, run, dtype, True, peers, note, model)
    if name == "ours_eva02_autocast":
        model = _our_model(eva02, torch.float32, device)
        tower, note = _tower(model)

        def run(pixel_values: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type=device.type, dtype=dtype):
                return tower(pixel_values)

        label = f"ours: tower, fp32 weights + autocast {_dtype_name(dtype)}"
        return Contender(name, label, "eva02", tower_layers, run, torch.float32, True,
                         ("ours_eva02", "timm_eva02"), note, model)
    if name == "ours_eager":
        source = built.get("ours_eva02")
        model = _shared_copy(source.model) if source is not None else _our_model(eva02, dtype, device)
        model.config._attn_implementation_internal = "eager"
        label = "ours, eager attention, all hidden states (baseline)"
        return Contender(name, label, "eva02", full, _all_states_run(model), dtype, note="shares ours_eva02's weights",
                         model=model)
    if name == "ours_eva02_flash":
        source = built.get("ours_eva02")
        model = _shared_copy(source.model) if source is not None else _our_model(eva02, dtype, device)
        model.config._attn_implementation_internal = "flash_attention_2"
        tower, note = _tower(model)
        label = "ours: tower, flash-attn 2 kernel"
        return Contender(name, label, "eva02", tower_layers, tower, dtype, True, ("ours_eva02", "timm_eva02"),
                         "shares ours_eva02's weights", model)
    if name == "ours_eva02_full":
        source = built.get("ours_eva02")
        model = source.model if source is not None else _our_model(eva02, dtype, device)
        label = "ours, sdpa, every layer and every hidden state (ablation)"
        return Contender(name, label, "eva02", full, _all_states_run(model), dtype, True, ("ours_eva02",),
                         "shares ours_eva02's weights", model)
    if name in ABLATIONS:
        source = built.get("ours_eva02")
        model = source.model if source is not None else _our_model(eva02, dtype, device)
        tower, _ = _tower(model)
        target, attribute, replacement, label = ABLATIONS[name]()

        def run(pixel_values: torch.Tensor) -> torch.Tensor:
            with _patched(target, attribute, replacement):
                return tower(pixel_values)

        return Contender(name, label, "eva02", tower_layers, run, dtype, True, ("ours_eva02",),
                         "shares ours_eva02's weights", model)
    if name in ("ours_eva02_compiled", "ours_eva02_compiled_module_mlp"):
        source = built.get("ours_eva02")
        model = _shared_copy(source.model) if source is not None else _our_model(eva02, dtype, device)
        tower, note = _tower(model)
        compiled = torch.compile(tower, fullgraph=True)
        note = "shares ours_eva02's weights; inductor"
        if name == "ours_eva02_compiled":
            label = "ours: EvaCLIPVisionTower under torch.compile(fullgraph=True)"
            return Contender(name, label, "eva02", tower_layers, compiled, dtype, True,
                             ("timm_eva02_compiled", "ours_eva02"), note, model, compiled=True)
        from llava_evaclip import modeling_evaclip

        def run(pixel_values: torch.Tensor) -> torch.Tensor:
            with _patched(modeling_evaclip, "COMPILED_ALIGNED_SWIGLU", False):  # dynamo guards on it: own graphs
                return compiled(pixel_values)

        label = "ours: tower under torch.compile, SwiGLU's matmuls left to inductor (ablation)"
        return Contender(name, label, "eva02", tower_layers, run, dtype, True, ("ours_eva02_compiled",), note, model,
                         compiled=True)
    if name in CEILING_CONTENDERS:
        return _kernels_contender(name, shapes, dtype, device, built)
    if name == "timm_eva02_compiled":
        source = built.get("timm_eva02")
        model = source.model if source is not None else _timm_eva02(shapes, dtype, device)
        label = "timm eva02_large_patch14_clip_336 forward_features under torch.compile"
        return Contender(name, label, "eva02", len(model.blocks), torch.compile(model.forward_features), dtype,
                         note="shares timm_eva02's weights; inductor", model=model, compiled=True)
    if name == "hf_clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(**shapes.clip_kwargs)
        _seed()
        try:
            model = CLIPVisionModel._from_config(config, attn_implementation="sdpa")
        except ValueError:  # transformers 4.37's CLIP has no sdpa
            model = CLIPVisionModel._from_config(config, attn_implementation="eager")
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        attention = model.config._attn_implementation
        label = f"transformers CLIPVisionModel ({attention}, output_hidden_states=True), {SHAPE_LABELS['plain']}"
        return Contender(name, label, "plain", plain.num_hidden_layers, _all_states_run(model), dtype,
                         note=f"attn_implementation={attention}, hidden_act={config.hidden_act}", model=model)
    if name == "timm_eva02":
        import timm

        model = _timm_eva02(shapes, dtype, device)

        def run(pixel_values: torch.Tensor) -> torch.Tensor:
            return model.forward_features(pixel_values)

        label = "timm eva02_large_patch14_clip_336 forward_features"
        return Contender(name, label, "eva02", len(model.blocks), run, dtype, note=f"timm {timm.__version__}",
                         model=model)
    raise BenchmarkError(f"unknown contender {name!r}; known: {', '.join(ALL_CONTENDERS)}")


def _kernels_contender(
    name: str, shapes: Shapes, dtype: torch.dtype, device: torch.device, built: dict[str, Contender]
) -> Contender:
    """The matmuls and attention of the layers the tower runs, alone: its `nn.Linear` weights multiplied by as many
    rows with `torch.mm` (the peak reference's op, without the bias every implementation also adds) into
    preallocated outputs, and one `scaled_dot_product_attention` per layer on preallocated q, k, v; no norms,
    activations, RoPE, residuals or copies. Its time bounds what any implementation on torch's kernels can reach at
    these shapes (`ceiling_fraction`)."""
    import torch
    import torch.nn.functional as F

    tower_name = name[: -len("_kernels")]
    source = built.get(tower_name) or build_contender(tower_name, shapes, dtype, device, {})
    config = shapes.config(source.shape)
    layers = source.model.vision_model.encoder.layers[: source.layers]
    linears = [module for layer in layers for module in layer.modules() if isinstance(module, torch.nn.Linear)]
    buffers: dict[tuple[int, int], torch.Tensor] = {}

    def buffer(rows: int, width: int) -> torch.Tensor:
        if (rows, width) not in buffers:
            buffers[(rows, width)] = torch.randn(rows, width, device=device).to(dtype)
        return buffers[(rows, width)]

    per_layer = len(linears) // len(layers)
    heads, tokens = config.num_attention_heads, tokens_per_image(config)

    def run(pixel_values: torch.Tensor) -> torch.Tensor:
        batch = pixel_values.shape[0]
        rows = batch * tokens
        qkv = buffer(3 * batch * heads, tokens * config.hidden_size // heads).view(3, batch, heads, tokens, -1)
        for start in range(0, len(linears), per_layer):
            for linear in linears[start : start + per_layer]:
                out = buffer(rows, linear.out_features)
                torch.mm(buffer(rows, linear.in_features), linear.weight.t(), out=out)
            F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return out

    label = f"{tower_name}'s nn.Linear matmuls (torch.mm) and sdpa alone (ceiling reference)"
    return Contender(name, label, source.shape, source.layers, run, dtype, note=f"shares {tower_name}'s weights",
                     model=source.model, kernels_only=True)


@contextlib.contextmanager
def _patched(target: Any, attribute: str, value: Any) -> Iterator[None]:
    original = getattr(target, attribute)
    setattr(target, attribute, value)
    try:
        yield
    finally:
        setattr(target, attribute, original)


def _module_mlp() -> tuple[Any, str, Any, str]:
    from llava_evaclip.modeling_evaclip import EvaCLIPMLP

    label = "ours: tower, MLP as module calls: unaligned 2730-wide SwiGLU outputs, whole batch at once (ablation)"
    return EvaCLIPMLP, "_use_inference_path", lambda self, hidden_states: False, label


def _mlp_whole_batch() -> tuple[Any, str, Any, str]:
    from llava_evaclip import modeling_evaclip

    label = "ours: tower, MLP over the whole batch instead of cache-sized token blocks (ablation)"
    return modeling_evaclip, "INFERENCE_MLP_BLOCK_BYTES", 1 << 62, label


def _each_heads(rotate: Callable[..., torch.Tensor]) -> Callable[..., tuple[torch.Tensor, ...]]:
    """A one-tensor rotation in `apply_rotary_`'s form (q and k together)."""
    return lambda heads, cos, sin: tuple(rotate(x, cos, sin) for x in heads)


def _five_pass_rotary() -> tuple[Any, str, Any, str]:  # against the in-place complex turn
    from llava_evaclip import modeling_evaclip

    def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + modeling_evaclip.rotate_pairs(x) * sin

    # eager inference rotates with `apply_rotary_`; compiled and training paths take `apply_rotary`
    label = "ours: tower, RoPE as x*cos + rotate(x)*sin (ablation)"
    return modeling_evaclip, "apply_rotary_", _each_heads(apply_rotary), label


def _pair_swap_rotary() -> tuple[Any, str, Any, str]:  # against turning channel pairs as complex numbers
    from llava_evaclip import modeling_evaclip

    label = "ours: tower, RoPE in place as the three-pass pair swap instead of one complex multiply (ablation)"
    return modeling_evaclip, "apply_rotary_", _each_heads(modeling_evaclip._swap_rotary_), label


def _out_of_place_rotary() -> tuple[Any, str, Any, str]:
    from llava_evaclip import modeling_evaclip

    label = "ours: tower, RoPE into new batch-sized tensors instead of in place per image (ablation)"
    return modeling_evaclip, "apply_rotary_", _each_heads(modeling_evaclip.apply_rotary), label


def _whole_gemms() -> tuple[Any, str, Any, str]:
    from llava_evaclip import modeling_evaclip

    label = "ours: tower, inference matmuls of 513-1023 rows whole instead of split after 512 rows (ablation)"
    return modeling_evaclip, "CPU_HALF_GEMM_ROWS", 1 << 62, label


def _addmm_bias() -> tuple[Any, str, Any, str]:
    from llava_evaclip import modeling_evaclip

    label = ("ours: tower, whole bf16 matmuls as addmm (bias copied into the output first) instead of oneDNN's "
             "fused bias (ablation)")
    return modeling_evaclip, "CPU_BF16_FUSED_BIAS", False, label


def _unfused_swiglu() -> tuple[Any, str, Any, str]:
    from llava_evaclip import modeling_evaclip

    label = ("ours: tower, bf16 SwiGLU's SiLU and gating as separate passes instead of in the matmuls' epilogues "
             "(ablation)")
    return modeling_evaclip, "CPU_BF16_FUSED_SWIGLU", False, label


def _strided_fp32_attention() -> tuple[Any, str, Any, str]:
    from llava_evaclip import modeling_evaclip

    label = ("ours: tower, fp32 CPU attention on the projections' transposed q/k/v views instead of contiguous heads "
             "(ablation; a no-op in bf16)")
    return modeling_evaclip, "CPU_FP32_CONTIGUOUS_ATTENTION", False, label


def _avx512_paths_on_amx() -> tuple[Any, str, Any, str]:
    from llava_evaclip import modeling_evaclip

    label = ("ours: tower, the AVX-512 CPU paths (row splits, MLP token blocks) also on an AMX CPU "
             "(ablation; a no-op without AMX)")
    real = modeling_evaclip.cpu_half_kernels
    return modeling_evaclip, "cpu_half_kernels", lambda dtype: "avx512" if real(dtype) == "amx" else real(dtype), label


def _half_matmuls_in_portable_kernels() -> tuple[Any, str, Any, str]:
    from llava_evaclip import modeling_evaclip

    label = ("ours: tower, half-precision matmuls in torch's portable kernels instead of fp32 on a CPU oneDNN has no "
             "kernels for (ablation; a no-op elsewhere)")
    return modeling_evaclip, "CPU_HALF_MATMULS_IN_FP32", False, label


# Speed-ups switched off one at a time in the ablation contenders: name -> (object, attribute, replacement, label).
ABLATIONS: dict[str, Callable[[], tuple[Any, str, Any, str]]] = {
    "ours_eva02_module_mlp": _module_mlp,
    "ours_eva02_mlp_whole_batch": _mlp_whole_batch,
    "ours_eva02_rope_5pass": _five_pass_rotary,
    "ours_eva02_rope_pair_swap": _pair_swap_rotary,
    "ours_eva02_rope_out_of_place": _out_of_place_rotary,
    "ours_eva02_whole_gemms_bf16": _whole_gemms,
    "ours_eva02_addmm_bias_bf16": _addmm_bias,
    "ours_eva02_unfused_swiglu_bf16": _unfused_swiglu,
    "ours_eva02_strided_attention_fp32": _strided_fp32_attention,
    "ours_eva02_avx512_paths_bf16": _avx512_paths_on_amx,
    "ours_eva02_half_matmuls_native_bf16": _half_matmuls_in_portable_kernels,
}
BASE_CONTENDERS = ("ours_eva02", "ours_plain", "hf_clip", "timm_eva02", "ours_eager")
COMPILED_CONTENDERS = ("ours_eva02_compiled", "timm_eva02_compiled", "ours_eva02_compiled_module_mlp")
CEILING_CONTENDERS = ("ours_eva02_kernels", "ours_plain_kernels")
OPTIONAL_CONTENDERS = ("ours_eva02_autocast", "ours_eva02_flash", "ours_eva02_full", *ABLATIONS,
                       *COMPILED_CONTENDERS, *CEILING_CONTENDERS)
ALL_CONTENDERS = BASE_CONTENDERS + OPTIONAL_CONTENDERS


def contenders_for(dtype: torch.dtype, args: argparse.Namespace) -> list[str]:
    import torch

    names = list(args.contenders or BASE_CONTENDERS)
    if dtype != torch.float32 and args.autocast and "ours_eva02" in names:
        names.append("ours_eva02_autocast")
    if args.ablations and "ours_eva02" in names:
        cpu_bf16 = args.device == "cpu" and dtype == torch.bfloat16
        names += ["ours_eva02_full", *(name for name in ABLATIONS if cpu_bf16 or "bf16" not in name)]
    if args.compile and "ours_eva02" in names:
        names += ["timm_eva02_compiled", "ours_eva02_compiled"]
        if args.ablations:
            names.append("ours_eva02_compiled_module_mlp")
    if args.ceiling:
        names += [f"{name}_kernels" for name in ("ours_eva02", "ours_plain") if name in names]
    if args.device == "cuda" and dtype != torch.float32 and "ours_eva02" in names:
        from llava_evaclip._compat import is_flash_attn_available

        if is_flash_attn_available():
            names.append("ours_eva02_flash")
    return list(dict.fromkeys(names))


def matmul_contender(size: int, dtype: torch.dtype, device: torch.device) -> Contender:
    import torch

    _seed()
    a = torch.randn(size, size, device=device).to(dtype)
    weight = torch.randn(size, size, device=device).to(dtype)

    # a @ weight.T: the layout every nn.Linear multiplies in (F.linear). oneDNN, MKL and cuBLAS take the transposed
    # operand as a GEMM flag; torch's portable half-precision kernels (CPUs without oneDNN kernels for the dtype) run
    # the row-major layout ~30x slower than this one (0.27 vs 8.2 GFLOP/s in bf16 at 2048, AMD Zen 3).
    def run(_: torch.Tensor) -> torch.Tensor:
        return torch.mm(a, weight.t())

    return Contender("matmul", f"torch.mm {size}x{size} @ weight.T (peak reference)", "matmul", 0, run, dtype)


def contender_flops(contender: Contender, shapes: Shapes, batch: int) -> float:
    if contender.shape == "matmul":
        return 2.0 * shapes.matmul_size**3
    if contender.kernels_only:
        return layer_flops(shapes.config(contender.shape), contender.layers, batch)
    return tower_flops(shapes.config(contender.shape), contender.layers, batch)


def weight_bytes(model: Any) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pixel_values(shapes: Shapes, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    import torch

    size = shapes.eva02.image_size
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=generator).to(device=device, dtype=dtype)


TIMERS = {"wall": time.perf_counter, "process": time.process_time}


def compile_for(
    contenders: Sequence[Contender], inputs: dict[torch.dtype, torch.Tensor], device: torch.device,
    progress: Callable[[str], None],
) -> dict[str, float]:
    """Run each compiled contender once on these inputs (compiling for their shape) before any timing; returns the
    wall seconds of that call per contender (compile plus one run)."""
    import torch

    seconds = {}
    with torch.inference_mode():
        for contender in contenders:
            if contender.compiled:
                start = time.perf_counter()
                contender.run(inputs[contender.input_dtype])
                _sync(device)
                seconds[contender.name] = time.perf_counter() - start
                progress(f"  compiled {contender.name} in {seconds[contender.name]:.1f} s")
    return seconds


def time_round_robin(
    contenders: Sequence[Contender], inputs: dict[torch.dtype, torch.Tensor], reps: int, warmup: int,
    device: torch.device, progress: Callable[[str], None], timer: str = "wall",
) -> dict[str, list[float]]:
    """Seconds per call of each contender; every repetition runs each once, in an order rotated by one each time.

    `timer="process"` counts this process's CPU time instead of wall time: with one thread it ignores the time other
    programs hold the core, which makes ratios on a shared machine much steadier."""
    import torch

    clock = TIMERS[timer]
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    with torch.inference_mode():
        for _ in range(warmup):
            for contender in contenders:
                contender.run(inputs[contender.input_dtype])
        _sync(device)
        for rep in range(reps):
            shift = rep % len(contenders)
            for contender in list(contenders[shift:]) + list(contenders[:shift]):
                gc.collect()
                _sync(device)
                start = clock()
                output = contender.run(inputs[contender.input_dtype])
                _sync(device)
                times[contender.name].append(clock() - start)
                del output
            progress(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    return times


def summarize(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median_s": statistics.median(ordered), "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1,
            "min_s": ordered[0], "max_s": ordered[-1]}


# --------------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------------


def _read_status_kib(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory above the weights of one forward of one contender, in this process.

    CPU: RSS after building the model and input (plus a warm-up at batch 1 so one-time library buffers are not
    counted) is the floor; the kernel's peak RSS counter is reset (`/proc/self/clear_refs`) and read back after
    the forward. Meant to run in a fresh process (`--memory-child`) so that no other model's freed memory is reused.
    CUDA: `torch.cuda.max_memory_allocated` above the allocation before the forward."""
    import torch

    shapes = build_shapes(spec["quick"])
    device = torch.device(spec["device"])
    dtype = torch_dtype(spec["dtype"])
    contender = build_contender(spec["contender"], shapes, dtype, device, {})
    batch = spec["batch"]
    with torch.inference_mode():
        contender.run(pixel_values(shapes, 1, contender.input_dtype, device))  # one-time buffers, kernels, caches
        inputs = pixel_values(shapes, batch, contender.input_dtype, device)
        result = {"contender": spec["contender"], "dtype": spec["dtype"], "batch": batch,
                  "weights_mib": weight_bytes(contender.model) / 2**20}
        if device.type == "cuda":
            _sync(device)
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            output = contender.run(inputs)
            _sync(device)
            result["peak_above_weights_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            result["method"] = "torch.cuda.max_memory_allocated - memory_allocated before the forward"
        else:
            _release_free_memory()
            floor_kib = _read_status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")  # reset VmHWM (peak RSS) to the current RSS
            output = contender.run(inputs)
            peak_kib = _read_status_kib("VmHWM")
            result["peak_above_weights_mib"] = (peak_kib - floor_kib) / 1024
            result["rss_floor_mib"] = floor_kib / 1024
            result["method"] = "peak RSS (VmHWM, reset via /proc/self/clear_refs) - RSS before, fresh process"
        result["output_mib"] = output.numel() * output.element_size() / 2**20
    return result


def memory_in_subprocess(spec: dict[str, Any], threads: Optional[int], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # big blocks straight from/to the OS: RSS tracks live tensors
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "benchmarks.tower", "--memory-child", json.dumps(spec)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "error": f"memory child failed (status {completed.returncode}): {tail}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, DTYPES[name])


def _dtype_name(dtype: "torch.dtype") -> str:
    return next(name for name in DTYPES if torch_dtype(name) == dtype)


def machine_info(device: torch.device) -> dict[str, Any]:
    import torch

    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    with contextlib.suppress(ImportError):
        from llava_evaclip.modeling_evaclip import cpu_has_amx, cpu_half_kernels

        info["cpu_amx"] = cpu_has_amx()
        info["cpu_bf16_kernels"] = cpu_half_kernels(torch.bfloat16)  # which CPU half-precision paths the tower takes
    with contextlib.suppress(ImportError):
        import timm

        info["timm"] = timm.__version__
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    with contextlib.suppress(OSError, ValueError):
        info["load_average"] = os.getloadavg()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def setting_key(dtype_name: str, batch: int) -> str:
    return f"{dtype_name}/b{batch}"


def compute_ratios(results: dict[str, dict[str, Any]], times: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Ours over each peer: the ratio of medians and the median of per-repetition ratios (same rotation)."""
    ratios = []
    for name, entry in results.items():
        for peer in entry.get("peers", ()):
            if peer not in results:
                continue
            paired = [a / b for a, b in zip(times[name], times[peer])]
            ratios.append({"ours": name, "peer": peer, "ratio": entry["median_s"] / results[peer]["median_s"],
                           "paired_ratio": statistics.median(paired)})
    return ratios


def add_ceilings(results: dict[str, dict[str, Any]], peak: float) -> None:
    """`ceiling_fraction` of each tower timed beside its `_kernels` contender: the fraction of the matmul peak the
    tower would reach if its matmuls and attention took the time measured for them alone in torch's kernels, its
    patch embedding ran at the peak, and everything else (norms, activations, RoPE, residuals, bias, copies) took
    no time. No implementation on torch's kernels gets above it: a peak-fraction goal above it is out of reach."""
    for name, entry in results.items():
        kernels = results.get(f"{name}_kernels")
        if kernels is None or entry["shape"] == "matmul":
            continue
        seconds = kernels["median_s"] + (entry["gflop"] - kernels["gflop"]) / peak
        entry["ceiling_fraction"] = entry["gflop"] / seconds / peak


def memory_versus_hf_clip(entry: dict[str, Any], memory: Sequence[dict[str, Any]]) -> Optional[float]:
    """A memory entry's peak above the weights over transformers CLIP's at the same dtype and batch; None where CLIP
    was not measured or grew by nothing (a tiny --quick model can stay within pages already held: no ratio then,
    rather than a division by zero after the whole run)."""
    if "peak_above_weights_mib" not in entry:
        return None
    peer = next((m for m in memory if m.get("contender") == "hf_clip" and m["dtype"] == entry["dtype"]
                 and m["batch"] == entry["batch"] and "peak_above_weights_mib" in m), None)
    if peer is None or peer["peak_above_weights_mib"] <= 0:
        return None
    return entry["peak_above_weights_mib"] / peer["peak_above_weights_mib"]


def evaluate_goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of issue 6 per setting where it can be measured, with `met` true/false."""
    goals = []
    settings = report["settings"]

    def add(goal: str, setting: str, value: float, target: float, better: str,
            ceiling: Optional[float] = None) -> None:
        met = value <= target if better == "lower" else value >= target
        goals.append({"goal": goal, "setting": setting, "value": value, "target": target, "met": bool(met)})
        if ceiling is not None:
            goals[-1]["ceiling"] = ceiling

    for key, setting in settings.items():
        by = {(r["ours"], r["peer"]): r["ratio"] for r in setting["ratios"]}
        if ("ours_eva02", "timm_eva02") in by:
            add("EVA02-L tower time / timm EVA-02", key, by[("ours_eva02", "timm_eva02")], GOAL_VS_TIMM, "lower")
        if ("ours_plain", "hf_clip") in by:
            add("plain L tower time / transformers CLIP", key, by[("ours_plain", "hf_clip")], GOAL_VS_HF_CLIP, "lower")
        if ("ours_eva02", "ours_eager") in by:
            add("speed-up over the eager path", key, 1.0 / by[("ours_eva02", "ours_eager")], GOAL_VS_EAGER_SPEEDUP,
                "higher")
        if ("ours_eva02_compiled", "timm_eva02_compiled") in by:
            add("compiled EVA02-L tower time / compiled timm EVA-02", key,
                by[("ours_eva02_compiled", "timm_eva02_compiled")], GOAL_COMPILED_VS_TIMM, "lower")
        if setting["dtype"] == "bf16":
            entry = setting["results"].get("ours_eva02")
            if entry and entry.get("fraction_of_peak") is not None:
                add("ours_eva02 bf16 GFLOP/s / bf16 matmul peak", key, entry["fraction_of_peak"],
                    GOAL_BF16_PEAK_FRACTION, "higher", entry.get("ceiling_fraction"))
        if setting["dtype"] == "fp32":
            for name in ("ours_eva02", "ours_plain"):
                entry = setting["results"].get(name)
                if entry and entry.get("fraction_of_peak") is not None:
                    add(f"{name} fp32 GFLOP/s / matmul peak", key, entry["fraction_of_peak"], GOAL_PEAK_FRACTION,
                        "higher", entry.get("ceiling_fraction"))
    for key, setting in settings.items():
        if setting["dtype"] == "fp32":
            continue
        fp32 = settings.get(setting_key("fp32", setting["batch"]))
        for name in ("ours_eva02", "ours_eva02_autocast"):
            if fp32 and name in setting["results"] and "ours_eva02" in fp32["results"]:
                speedup = fp32["results"]["ours_eva02"]["median_s"] / setting["results"][name]["median_s"]
                add(f"{name} {setting['dtype']} speed-up over fp32 (separate rotations)", key, speedup,
                    GOAL_BF16_SPEEDUP, "higher")
    for entry in report.get("memory", []):
        ratio = memory_versus_hf_clip(entry, report["memory"]) if entry.get("contender") == "ours_plain" else None
        if ratio is not None:
            add("peak memory above weights / transformers CLIP", setting_key(entry["dtype"], entry["batch"]), ratio,
                GOAL_MEMORY_VS_HF_CLIP, "lower")
    return goals


def render_markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    where = machine.get("gpu") or f"{machine.get('cpu', 'unknown CPU')}, {machine['cpu_count']} cores"
    kernels = ", AMX" if machine.get("cpu_amx") else ""
    if machine.get("cpu_bf16_kernels") and not machine.get("gpu"):
        kernels += f"; CPU bf16 matmuls: {machine['cpu_bf16_kernels']} kernels"
    lines = [
        f"# EVA-CLIP tower benchmark ({report['device']})",
        "",
        f"Machine: {where} ({machine.get('cpu_capability', '')}{kernels}); "
        f"torch {machine['torch']} "
        f"({machine['torch_threads']} threads), transformers "
        f"{machine['transformers']}, timm {machine.get('timm', 'n/a')}. Load average at start: "
        f"{', '.join(f'{x:.1f}' for x in machine.get('load_average', ()))}.",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Random weights, {report['image_size']}x{report['image_size']} inputs. Times are medians over repetitions "
        "that run every contender once in a rotating order; ratio = ours / peer (below 1: ours is faster).",
        "",
    ]
    peaks = report["matmul_peak_gflops"]
    if peaks:
        lines += ["Matmul peak (torch.mm, median GFLOP/s in the same rotation): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()), ""]
    for key, setting in report["settings"].items():
        clock = "wall clock" if setting.get("timer", "wall") == "wall" else "process CPU time"
        lines += [f"## {setting['dtype']}, batch {setting['batch']} ({setting['reps']} repetitions, {clock})", "",
                  "| contender | layers run | median s | IQR s | ms / image | GFLOP/s | of matmul peak | compile s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, entry in setting["results"].items():
            if name == "matmul":
                continue
            fraction = entry.get("fraction_of_peak")
            compiled = f"{entry['compile_s']:.0f}" if "compile_s" in entry else ""
            lines.append(
                f"| `{name}`: {entry['label']} | {entry['layers']} | {entry['median_s']:.3f} | {entry['iqr_s']:.3f} "
                f"| {1000 * entry['median_s'] / setting['batch']:.0f} | {entry['gflops']:.0f} | "
                f"{'' if fraction is None else f'{100 * fraction:.0f}%'} | {compiled} |"
            )
        if setting["ratios"]:
            lines += ["", "| ours | peer | ratio of medians | median of paired ratios |", "|---|---|---:|---:|"]
            for ratio in setting["ratios"]:
                lines.append(f"| `{ratio['ours']}` | `{ratio['peer']}` | {ratio['ratio']:.3f} | "
                             f"{ratio['paired_ratio']:.3f} |")
        lines.append("")
    memory = [m for m in report.get("memory", []) if "peak_above_weights_mib" in m]
    if memory or report.get("memory"):
        lines += ["## Peak memory above the weights", "",
                  "| contender | dtype | batch | weights MiB | peak above weights MiB | vs transformers CLIP |",
                  "|---|---|---:|---:|---:|---:|"]
        for entry in report.get("memory", []):
            if "peak_above_weights_mib" not in entry:
                lines.append(f"| `{entry['contender']}` | {entry['dtype']} | {entry['batch']} | | "
                             f"{entry.get('error', 'n/a')} | |")
                continue
            ratio = memory_versus_hf_clip(entry, memory)
            versus = "" if ratio is None else f"{ratio:.2f}"
            lines.append(f"| `{entry['contender']}` | {entry['dtype']} | {entry['batch']} | "
                         f"{entry['weights_mib']:.0f} | {entry['peak_above_weights_mib']:.0f} | {versus} |")
        lines += ["", f"Method: {memory[0]['method'] if memory else 'n/a'}.", ""]
    if report["goals"]:
        lines += ["## Goals (issues 6 and 13)", "", "| goal | setting | measured | target | met | ceiling |",
                  "|---|---|---:|---:|---|---:|"]
        for goal in report["goals"]:
            ceiling = f"{goal['ceiling']:.3f}" if "ceiling" in goal else ""
            lines.append(f"| {goal['goal']} | {goal['setting']} | {goal['value']:.3f} | {goal['target']} | "
                         f"{'yes' if goal['met'] else 'no'} | {ceiling} |")
        lines += ["", "Ceiling: the fraction of the peak the tower would reach if its matmuls and attention took the "
                  "time measured for them alone in torch's kernels (`*_kernels`: same weights and rows, no bias), "
                  "the patch embedding ran at the peak and everything else were free; no implementation on torch's "
                  "kernels gets above it.", ""]
    return "\n".join(lines)


def render_chart(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report["settings"]
    names = [n for n in dict.fromkeys(n for s in settings.values() for n in s["results"]) if n != "matmul"]
    memory = [m for m in report.get("memory", []) if "peak_above_weights_mib" in m]
    figure, axes = plt.subplots(1, 2 if memory else 1, figsize=(13 if memory else 8, 4.8), squeeze=False)
    axis = axes[0][0]
    width = 0.8 / max(len(names), 1)
    keys = list(settings)
    for index, name in enumerate(names):
        values = [1000 * settings[k]["results"][name]["median_s"] / settings[k]["batch"]
                  if name in settings[k]["results"] else 0.0 for k in keys]
        positions = [k + (index - (len(names) - 1) / 2) * width for k in range(len(keys))]
        axis.bar(positions, values, width, label=name)
    axis.set_xticks(range(len(keys)))
    axis.set_xticklabels(keys)
    timers = {setting.get("timer", "wall") for setting in settings.values()}
    axis.set_ylabel("CPU ms per image (median)" if timers == {"process"} else "ms per image (median)")
    axis.set_title(f"Feature extraction time ({report['device']}; lower is better)")
    axis.legend(fontsize=8)
    if memory:
        axis = axes[0][1]
        groups = list(dict.fromkeys(setting_key(m["dtype"], m["batch"]) for m in memory))
        mem_names = list(dict.fromkeys(m["contender"] for m in memory))
        width = 0.8 / max(len(mem_names), 1)
        for index, name in enumerate(mem_names):
            values = [next((m["peak_above_weights_mib"] for m in memory
                            if m["contender"] == name and setting_key(m["dtype"], m["batch"]) == g), 0.0)
                      for g in groups]
            positions = [k + (index - (len(mem_names) - 1) / 2) * width for k in range(len(groups))]
            axis.bar(positions, values, width, label=name)
        axis.set_xticks(range(len(groups)))
        axis.set_xticklabels(groups)
        axis.set_ylabel("MiB above the weights")
        axis.set_title("Peak memory of one forward (lower is better)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)


def _write_text(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        # the recorded command line keeps a non-UTF-8 argument (a file name) as surrogates: write those escaped
        with open(path, "w", encoding="utf-8", errors="backslashreplace") as handle:
            handle.write(text)

    return write


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _dtype_list(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",")]
    unknown = [v for v in values if v not in DTYPES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {unknown or text!r}; expected a comma-separated subset "
                                         f"of {', '.join(DTYPES)}")
    return values


def _contender_list(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",")]
    unknown = [v for v in values if v not in ALL_CONTENDERS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown contender(s) {unknown}; choose from {', '.join(ALL_CONTENDERS)}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default) or cuda: the same comparison on a GPU, bf16 by default")
    parser.add_argument("--batch-sizes", type=_int_list, default=None, metavar="N[,N]",
                        help="batch sizes (default: 1,8; --quick: 1,2)")
    parser.add_argument("--dtypes", type=_dtype_list, default=None, metavar="fp32,bf16",
                        help="dtypes the models are cast to (default: fp32,bf16 on cpu, bf16 on cuda)")
    parser.add_argument("--reps", type=_int_list, default=None, metavar="N[,N]",
                        help="timed repetitions per setting, one number or one per batch size (default: cpu 5 at "
                             "batch 1-2 and 3 above, cuda 20; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, metavar="N",
                        help="untimed rounds before timing the first batch size of each dtype (later batch sizes "
                             "run in the warmed-up process; default: 1, cuda 3)")
    parser.add_argument("--timer", choices=sorted(TIMERS), default="wall",
                        help="wall clock (default) or this process's CPU time; use process with --threads 1 on a "
                             "shared machine (CPU time of several threads also counts their waiting)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--contenders", type=_contender_list, default=None, metavar="NAME[,NAME]",
                        help=f"subset to run (default: {','.join(BASE_CONTENDERS)})")
    parser.add_argument("--no-autocast", dest="autocast", action="store_false",
                        help="skip the fp32-weights + autocast contender in low-precision settings")
    parser.add_argument("--ablations", action="store_true",
                        help="also time ours with each speed-up switched off: every layer and hidden state "
                             "(no early stop), the MLP as module calls, the MLP without token blocks, RoPE in five "
                             "passes, fp32 attention on strided heads, and (CPU bf16) whole matmuls, addmm's bias, "
                             "unfused SwiGLU, the AVX-512 paths on AMX and torch's portable kernels")
    parser.add_argument("--compile", action="store_true",
                        help="also time our tower and timm's EVA-02 under torch.compile (inductor), reporting the "
                             "compile time of each (slow: minutes on CPU); with --ablations also our compiled tower "
                             "with SwiGLU's matmuls left to inductor")
    parser.add_argument("--memory-batch-sizes", type=_int_list, default=None, metavar="N[,N]",
                        help="batch sizes of the memory measurement (default: the largest batch size)")
    parser.add_argument("--memory-dtypes", type=_dtype_list, default=None, metavar="fp32[,bf16]",
                        help="dtypes of the memory measurement (default: the first of --dtypes on cpu, all on cuda)")
    parser.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                        help="skip timing the towers' matmuls and attention alone (the ceiling reported beside the "
                             "peak-fraction goals)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory measurement")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and two repetitions: checks the script end to end (numbers meaningless)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help=f"where tower_<device>[_quick].{{json,md,png}} go (default: {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--name", default=None, help="basename of the result files (default: tower_<device>[_quick])")
    parser.add_argument("--no-chart", dest="chart", action="store_false", help="skip the PNG chart")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    from llava_evaclip.cli import OneLineErrorParser

    parser = OneLineErrorParser(prog="python -m benchmarks.tower", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def _resolve_defaults(args: argparse.Namespace) -> None:
    import torch

    cuda = args.device == "cuda"
    if args.batch_sizes is None:
        args.batch_sizes = [1, 2] if args.quick else [1, 8]
    if args.dtypes is None:
        args.dtypes = ["bf16"] if cuda else ["fp32", "bf16"]
    if args.warmup is None:
        args.warmup = 3 if cuda else 1
    for option, values in (("--batch-sizes", args.batch_sizes), ("--dtypes", args.dtypes),
                           ("--contenders", args.contenders or ()),
                           ("--memory-batch-sizes", args.memory_batch_sizes or ()),
                           ("--memory-dtypes", args.memory_dtypes or ())):
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        if repeated:  # a repeated setting would silently replace the first one's results under the same key
            raise BenchmarkError(f"{option} lists {', '.join(repeated)} more than once")
    if args.name is not None and (not args.name or os.sep in args.name or args.name in (".", "..")):
        raise BenchmarkError(f"--name {args.name!r} must be a plain file name (the folder is --output-dir)")
    if args.reps is not None and len(args.reps) not in (1, len(args.batch_sizes)):
        raise BenchmarkError(f"--reps takes one number or one per batch size ({len(args.batch_sizes)}), "
                             f"got {len(args.reps)}")
    if args.warmup < 0:
        raise BenchmarkError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.threads is not None and not 1 <= args.threads <= (os.cpu_count() or 1):
        # past the cores, OpenMP's thread creation can fail and abort the process (libgomp), after the models load
        raise BenchmarkError(f"--threads must be 1 to {os.cpu_count() or 1} (this machine's cores), got {args.threads}")
    if args.memory_batch_sizes is None:
        args.memory_batch_sizes = [max(args.batch_sizes)]
    if args.memory_dtypes is None:
        args.memory_dtypes = list(args.dtypes) if cuda else args.dtypes[:1]
    if cuda and args.timer != "wall":
        raise BenchmarkError("--timer process measures CPU time; GPU runs need --timer wall")
    if cuda and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda needs a CUDA GPU and a CUDA build of torch; none is available here")


def _reps_for(args: argparse.Namespace, batch: int) -> int:
    if args.reps is not None:
        return args.reps[0] if len(args.reps) == 1 else args.reps[args.batch_sizes.index(batch)]
    if args.quick:
        return 2
    if args.device == "cuda":
        return 20
    return 5 if batch <= 2 else 3


def _output_paths(args: argparse.Namespace) -> dict[str, str]:
    name = args.name or f"tower_{args.device}{'_quick' if args.quick else ''}"
    directory = args.output_dir or DEFAULT_OUTPUT_DIR
    paths = {"json": os.path.join(directory, name + ".json"), "md": os.path.join(directory, name + ".md")}
    if args.chart:
        paths["png"] = os.path.join(directory, name + ".png")
    return paths


def run_benchmark(args: argparse.Namespace, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Time every contender per (dtype, batch), measure memory, and write JSON, markdown and PNG; returns the report."""
    import torch

    _resolve_defaults(args)
    paths = _output_paths(args)
    existing = [p for p in paths.values() if os.path.lexists(p)]
    if existing and not args.overwrite:
        raise BenchmarkError(f"{existing[0]} already exists; pass --overwrite to replace it (or --output-dir/--name)")
    from llava_evaclip.commands._common import unwritable_folder

    directory = os.path.dirname(next(iter(paths.values())))
    problem = unwritable_folder(directory)  # found before minutes of timing, not when the results are written
    if problem is not None:
        raise BenchmarkError(f"--output-dir {directory}: {problem}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = build_shapes(args.quick)
    report: dict[str, Any] = {
        "device": args.device,
        "command": getattr(args, "command_line", None) or "python -m benchmarks.tower " + " ".join(sys.argv[1:]),
        "machine": machine_info(device),
        "quick": args.quick,
        "select_layer": SELECT_LAYER,
        "image_size": shapes.eva02.image_size,
        "shapes": {"eva02": shapes.eva02.to_dict(), "plain": shapes.plain.to_dict()},
        "matmul_size": shapes.matmul_size,
        "matmul_peak_gflops": {},
        "contenders": {},
        "settings": {},
        "memory": [],
    }
    started = time.time()
    from llava_evaclip.commands._common import atomic_write

    written = False

    def save_json(partial: bool) -> None:
        """The JSON so far: rewritten after each setting, so a run stopped at a time limit (a lent GPU's) or by a
        crash keeps what it timed; `"partial": true` until the run ends. Only the first write honours --overwrite:
        later ones replace this run's own file."""
        nonlocal written
        text = json.dumps({**report, "partial": partial}, indent=1) + "\n"
        atomic_write(paths["json"], _write_text(text), replace=written or args.overwrite)
        written = True

    for dtype_name in args.dtypes:
        dtype = torch_dtype(dtype_name)
        built: dict[str, Contender] = {}
        for name in contenders_for(dtype, args):
            progress(f"[{dtype_name}] building {name}")
            built[name] = build_contender(name, shapes, dtype, device, built)
        built["matmul"] = matmul_contender(shapes.matmul_size, dtype, device)
        for name, contender in built.items():
            report["contenders"][name] = {"label": contender.label, "shape": contender.shape, "note": contender.note}
        contenders = list(built.values())
        peak_samples: list[float] = []
        for position, batch in enumerate(args.batch_sizes):
            reps = _reps_for(args, batch)
            warmup = args.warmup if position == 0 else 0
            progress(f"[{dtype_name}] batch {batch}: {reps} repetitions of {len(contenders)} contenders")
            inputs = {d: pixel_values(shapes, batch, d, device) for d in {c.input_dtype for c in contenders}}
            compile_s = compile_for(contenders, inputs, device, progress)
            times = time_round_robin(contenders, inputs, reps, warmup, device, progress, args.timer)
            results: dict[str, dict[str, Any]] = {}
            for contender in contenders:
                flops = contender_flops(contender, shapes, batch)
                stats = summarize(times[contender.name])
                results[contender.name] = {
                    "label": contender.label, "shape": contender.shape, "layers": contender.layers,
                    "peers": list(contender.peers), "times_s": times[contender.name], **stats,
                    "gflop": flops / 1e9, "gflops": flops / 1e9 / stats["median_s"],
                }
                if contender.name in compile_s:
                    results[contender.name]["compile_s"] = compile_s[contender.name]
            peak = results["matmul"]["gflops"]
            peak_samples.append(peak)
            for entry in results.values():
                entry["fraction_of_peak"] = entry["gflops"] / peak if entry["shape"] != "matmul" else None
            add_ceilings(results, peak)
            report["settings"][setting_key(dtype_name, batch)] = {
                "dtype": dtype_name, "batch": batch, "reps": reps, "warmup": warmup, "timer": args.timer,
                "results": results,
                "ratios": compute_ratios(results, times),
            }
            save_json(partial=True)
        report["matmul_peak_gflops"][dtype_name] = statistics.median(peak_samples)
        del built, contenders
        _release_free_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.memory:
        timeout = 600.0 if not args.quick else 120.0
        for dtype_name in args.memory_dtypes:
            for batch in args.memory_batch_sizes:
                for name in contenders_for(torch_dtype(dtype_name), args):
                    if name in COMPILED_CONTENDERS or name in CEILING_CONTENDERS:
                        continue
                    spec = {"contender": name, "dtype": dtype_name, "batch": batch, "device": args.device,
                            "quick": args.quick}
                    progress(f"[memory] {name} {dtype_name} batch {batch}")
                    try:
                        entry = memory_in_subprocess(spec, args.threads, timeout)
                    except subprocess.TimeoutExpired:
                        entry = {**spec, "error": f"memory child timed out after {timeout:.0f} s"}
                    report["memory"].append(entry)
                    if "error" in entry:
                        progress(f"  {entry['error']}")
                    else:
                        progress(f"  {entry['peak_above_weights_mib']:.0f} MiB above {entry['weights_mib']:.0f} MiB")
    report["wall_s"] = time.time() - started
    report["goals"] = evaluate_goals(report)
    save_json(partial=False)
    atomic_write(paths["md"], _write_text(render_markdown(report)), replace=args.overwrite)
    if "png" in paths:
        atomic_write(paths["png"], lambda path: render_chart(report, path), replace=args.overwrite)
    report["paths"] = paths
    return report


def print_summary(report: dict[str, Any]) -> None:
    for goal in report["goals"]:
        ceiling = f"; ceiling {goal['ceiling']:.3f}" if "ceiling" in goal else ""
        print(f"{'MET ' if goal['met'] else 'MISS'} {goal['goal']} [{goal['setting']}]: {goal['value']:.3f} "
              f"(target {goal['target']}{ceiling})")
    print("wrote " + ", ".join(report["paths"].values()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m benchmarks.tower`: errors, Ctrl-C and SIGTERM end it with one line, as `llava-evaclip bench`."""
    from llava_evaclip_cli import import_cli

    cli = import_cli()

    def body() -> int:
        import torch

        args = build_parser().parse_args(argv)
        if args.memory_child is not None:
            if args.threads:
                torch.set_num_threads(args.threads)
            print(json.dumps(measure_memory(json.loads(args.memory_child))), flush=True)
            return 0
        try:
            report = run_benchmark(args)
        except BenchmarkError as error:
            raise cli.CLIError(str(error)) from None
        print_summary(report)
        return 0

    return cli.run_command(lambda: "benchmarks.tower", body)


if __name__ == "__main__":
    sys.exit(main())
