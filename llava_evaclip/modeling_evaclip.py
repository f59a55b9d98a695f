"""PyTorch EVA-CLIP: one block class whose EVA features (RoPE, SwiGLU, sub-LN, layer scale, post-norm) are flags."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any, Callable, Collection, Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.utils import ModelOutput, logging

from . import _compat
from ._compat import (
    ALL_ATTENTION_FUNCTIONS,
    FEATURES_RETURN_MODEL_OUTPUT,
    HAS_ACTIVATION_CHECKPOINTING,
    SUB_CONFIGS_TAKE_ATTN_IMPLEMENTATION,
    TORCHSCRIPT_RETURNS_TUPLES,
    GradientCheckpointingLayer,
    forward_ad_active,
    init,
    is_compiling,
    is_flash_attn_available,
    is_partitioned,
    is_tracing,
    overriding_modes_active,
    transformers_zero3_context,
)
from .configuration_evaclip import EvaCLIPConfig, EvaCLIPTextConfig, EvaCLIPVisionConfig

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class EvaCLIPVisionModelOutput(ModelOutput):
    """Vision tower output with the projected image embeddings."""

    image_embeds: Optional[torch.FloatTensor] = None
    last_hidden_state: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None


@dataclass
class EvaCLIPTextModelOutput(ModelOutput):
    """Text tower output with the projected text embeddings."""

    text_embeds: Optional[torch.FloatTensor] = None
    last_hidden_state: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None


@dataclass
class EvaCLIPOutput(ModelOutput):
    """Contrastive output: similarity logits both ways, normalised embeddings, and each tower's own output."""

    loss: Optional[torch.FloatTensor] = None
    logits_per_image: Optional[torch.FloatTensor] = None
    logits_per_text: Optional[torch.FloatTensor] = None
    text_embeds: Optional[torch.FloatTensor] = None
    image_embeds: Optional[torch.FloatTensor] = None
    text_model_output: Optional[BaseModelOutputWithPooling] = None
    vision_model_output: Optional[BaseModelOutputWithPooling] = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else getattr(self, k).to_tuple()
            for k in self.keys()
        )


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the diagonal; `shape[0]`, not `len()`, which torch.export turns into a constant batch."""
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def clip_loss(similarity: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the text-image similarity matrix (pairs on the diagonal)."""
    return (contrastive_loss(similarity) + contrastive_loss(similarity.t())) / 2.0


# --------------------------------------------------------------------------------------------------------------------
# Rotary embedding (EVA-02)
# --------------------------------------------------------------------------------------------------------------------


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """EVA's `rotate_half`: channels are interleaved pairs (x0, x1) -> (-x1, x0)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def _swap_pairs(x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sin table with `rotate_pairs`' sign folded in, so that `rotate_pairs(x) * sin == swap(x) * signed_sin`."""
    return torch.stack((-sin[..., 0::2], sin[..., 1::2]), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_pairs(x) * sin` for EVA's tables, whose channel pairs share one angle: each pair is swapped
    and the sign of `rotate_pairs` folded into the small per-position sin table, so eager makes three passes over x
    instead of five, and the real arithmetic traces into one fused kernel under torch.compile / torch.export."""
    return torch.addcmul(x * cos, _swap_pairs(x), _signed_sin(sin))


def _pair_turns(cos: torch.Tensor, sin: torch.Tensor) -> Optional[torch.Tensor]:
    """The tables as one fp32 complex number per channel pair ([N, D / 2], `cos + i sin`), or None where the two
    channels of a pair do not share one angle (EVA's tables always do; others take the pair swap)."""
    cos_even, sin_even = cos[..., 0::2], sin[..., 0::2]
    if cos.dim() != 2 or not (torch.equal(cos_even, cos[..., 1::2]) and torch.equal(sin_even, sin[..., 1::2])):
        return None
    return torch.complex(cos_even.float(), sin_even.float())


def _complex_pairs(rows: torch.Tensor) -> Optional[torch.Tensor]:
    """`rows` ([..., D], fp32) as complex channel pairs without a copy, or None where its layout has no such view."""
    pairs = rows.unflatten(-1, (-1, 2))
    aligned = rows.storage_offset() % 2 == 0 and all(stride % 2 == 0 for stride in pairs.stride()[:-2])
    return torch.view_as_complex(pairs) if rows.stride(-1) == 1 and aligned else None


def apply_rotary_(
    heads: Sequence[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """`apply_rotary` written over each of `heads` (q and k, [B, H, N, D] seen from the inference path's own
    [B, N, H * D] projection buffers; tables [N, D]), returned in order. On CPU each channel pair is turned as one
    complex number by its pair's angle: one pass (an fp32 complex multiply) where the pair swap takes three, ~5x faster
    in fp32; half precision goes through one reused fp32 image buffer and is rounded once (the swap rounds twice),
    ~1.5x faster. fp32 gives `apply_rotary`'s values up to the order of one multiply-add (tested). The tables are
    checked and turned once for all of `heads`. Other devices (the check that a table's pairs share one angle would
    wait on a GPU; meta tensors have no values), tables whose pairs do not share one angle, and layouts without a
    complex view take the pair swap."""
    turns = _pair_turns(cos, sin) if all(x.device.type == "cpu" for x in heads) else None
    return tuple(_swap_rotary_(x, cos, sin) if turns is None else _turn_pairs_(x, turns, cos, sin) for x in heads)


def _turn_pairs_(x: torch.Tensor, turns: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary_`'s complex turn of one CPU tensor by `_pair_turns(cos, sin)`; the pair swap where it cannot."""
    rows = x.transpose(1, 2)  # [B, N, H, D]: the buffers' memory order
    if x.dtype == torch.float32:
        pairs = _complex_pairs(rows)
        if pairs is not None:
            pairs.mul_(turns[:, None, :])  # in place: no new batch-sized tensor
            return x
    elif x.dtype in (torch.bfloat16, torch.float16):
        wide = rows.new_empty(rows.shape[1:], dtype=torch.float32)  # one image, reused: fresh pages cost ~2x at batch 8
        pairs = _complex_pairs(wide)
        for image in rows.unbind(0):
            wide.copy_(image)
            pairs.mul_(turns[:, None, :])
            image.copy_(wide)
        return x
    return _swap_rotary_(x, cos, sin)


def _swap_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` written over `x` one image at a time with the pair swap (bit for bit `apply_rotary`)."""
    signed_sin = _signed_sin(sin)
    for image in x.unbind(0):
        swapped = _swap_pairs(image)
        image.mul_(cos).addcmul_(swapped, signed_sin)
    return x


class EvaCLIPRotaryEmbedding(nn.Module):
    """EVA-02's 2D rotary table over the patch grid, computed from the config alone (never from parameter shapes,
    which are empty under DeepSpeed ZeRO-3). The first head_dim/2 channels rotate with the row, the rest with the
    column. A leading identity row (cos 1, sin 0) leaves the CLS token untouched, so attention applies one table to
    the whole sequence instead of splitting and re-concatenating CLS in every layer."""

    def __init__(self, config: EvaCLIPVisionConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.pt_grid_size = config.rope_pt_grid_size
        self.interpolate_freq = config.rope_interpolate_freq
        self.theta = config.rope_theta
        self.grid_size = config.num_patches_per_side
        cos, sin = self.compute_table(self.grid_size, self.grid_size)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._cache: dict[tuple[int, int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _axis_freqs(self, length: int) -> torch.Tensor:
        """Always in fp32: transformers 4.x's `from_pretrained(torch_dtype=bf16)` builds the model under that
        default dtype, where `arange(n) / n` would round the positions to bf16 (angles off by ~0.02 at grid 24)."""
        quarter = self.head_dim // 2
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, quarter, 2, dtype=torch.float32)[: quarter // 2] / quarter))
        positions = torch.arange(length, dtype=torch.float32)
        if self.interpolate_freq:
            positions = positions / length * self.pt_grid_size
        freqs = torch.einsum("i,f->if", positions, inv_freq)
        return freqs.repeat_interleave(2, dim=-1)  # [length, head_dim / 2], pairs share a frequency

    def compute_table(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape [1 + height * width, head_dim]; row 0 is the identity for CLS."""
        rows = self._axis_freqs(height)[:, None, :].expand(height, width, -1)
        cols = self._axis_freqs(width)[None, :, :].expand(height, width, -1)
        freqs = torch.cat((rows, cols), dim=-1).reshape(height * width, self.head_dim)
        cos = torch.cat((torch.ones(1, self.head_dim, dtype=torch.float32), freqs.cos()), dim=0)
        sin = torch.cat((torch.zeros(1, self.head_dim, dtype=torch.float32), freqs.sin()), dim=0)
        return cos, sin

    def _table(
        self, height: int, width: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (height, width) == (self.grid_size, self.grid_size) and self.cos.device.type != "meta":
            cos, sin = self.cos, self.sin
        else:  # another grid, or buffers left on the meta device by a big-model (offloaded) load
            cos, sin = self.compute_table(height, width)
        return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)

    def forward(
        self, height: int, width: int, dtype: torch.dtype, device: Optional[torch.device] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The table for a grid on `device` (default: the buffers'), cached per (grid, device, dtype) in eager mode;
        a traced graph computes it in the graph instead of reading a Python-side cache."""
        device = self.cos.device if device is None else torch.device(device)
        if is_tracing():
            return self._table(height, width, dtype, device)
        key = (height, width, device, dtype)
        cached = self._cache.get(key)
        if cached is None:
            # Normal tensors even under torch.inference_mode(): a cached inference tensor would break every later
            # training step at this grid ("Inference tensors cannot be saved for backward").
            with torch.inference_mode(False):
                cached = self._cache[key] = self._table(height, width, dtype, device)
        return cached

    def reset_cache(self) -> None:
        self._cache.clear()

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "EvaCLIPRotaryEmbedding":
        """Device / dtype moves invalidate cached copies. A move off the meta device (`to_empty()`, after building
        on meta for FSDP-style init) leaves uninitialised memory, which no checkpoint fills (the tables are not
        saved): the tables are recomputed from the config there. So are they after a dtype change: the cast alone
        would keep a half-precision round trip's rounding (`model.half().float()` ran fp32 with tables 1e-3 off)."""
        self._cache.clear()
        was_meta, old_dtype = self.cos.device.type == "meta", self.cos.dtype
        result = super()._apply(fn, *args, **kwargs)
        if self.cos.device.type != "meta" and (was_meta or self.cos.dtype != old_dtype):
            cos, sin = self.compute_table(self.grid_size, self.grid_size)
            with torch.no_grad():
                self.cos.copy_(cos)
                self.sin.copy_(sin)
        return result


# --------------------------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------------------------


class EvaCLIPVisionEmbeddings(nn.Module):
    """Conv2d patch embedding (with bias), a learnable class token and learned absolute positions."""

    def __init__(self, config: EvaCLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=True
        )
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)

    def positions(self, device: torch.device) -> torch.Tensor:
        """The position table [num_positions, C], read by calling the embedding module: accelerate's offload hooks
        and DeepSpeed ZeRO-3 make a module's weights available only while that module runs."""
        return self.position_embedding(torch.arange(self.num_positions, device=device))

    def interpolate_pos_encoding(self, height: int, width: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Bicubic resize of the patch positions to a (height x width) grid, in at least fp32 (fp64 stays fp64, as in
        BAAI's resize: `.float()` rounded an fp64 model's positions to fp32); CLS keeps its position."""
        positions = self.positions(self.class_embedding.device if device is None else device)
        side = self.image_size // self.patch_size
        if (height, width) == (side, side):
            return positions.unsqueeze(0)
        class_pos, patch_pos = positions[:1], positions[1:]
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos = patch_pos.to(torch.promote_types(patch_pos.dtype, torch.float32))
        patch_pos = F.interpolate(patch_pos, size=(height, width), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(positions.dtype).permute(0, 2, 3, 1).reshape(height * width, -1)
        return torch.cat((class_pos, patch_pos), dim=0).unsqueeze(0)

    def _embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The patch convolution; in eager inference on CPUs with only portable half-precision kernels
        (`_half_matmul_in_fp32`) as an fp32 convolution rounded once (torch runs the half-precision one as a slow
        im2col there: 0.38 s against 0.014 s at EVA02-L-336's shape on a Zen 3); hooks, offload and ZeRO-3 keep the
        module call (`plain_inference_linears`)."""
        conv = self.patch_embedding
        # Tracing is ruled out first: the kernel probe behind `_half_matmul_in_fp32` is not traceable by dynamo.
        # `plain_inference_linears` first: it checks that `conv` is a plain nn.Conv2d (a PEFT LoRA wrapper has no
        # `padding_mode`).
        direct = not is_tracing() and plain_inference_linears(pixel_values, (conv,)) and conv.padding_mode == "zeros"
        if direct and _half_matmul_in_fp32(pixel_values):
            wide = F.conv2d(
                pixel_values.float(), conv.weight.float(), None if conv.bias is None else conv.bias.float(),
                conv.stride, conv.padding, conv.dilation, conv.groups,
            )
            return wide.to(pixel_values.dtype)
        return conv(pixel_values)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        target_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self._embed_patches(pixel_values.to(dtype=target_dtype))
        grid_h, grid_w = patch_embeds.shape[-2:]
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding.to(target_dtype).expand(patch_embeds.shape[0], 1, -1)
        embeddings = torch.cat((class_embeds, patch_embeds), dim=1)
        if interpolate_pos_encoding:
            return embeddings + self.interpolate_pos_encoding(grid_h, grid_w, embeddings.device)
        return embeddings + self.positions(embeddings.device).unsqueeze(0)


class EvaCLIPTextEmbeddings(nn.Module):
    """Token plus learned position embeddings."""

    def __init__(self, config: EvaCLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
    ) -> torch.Tensor:
        seq_length = input_ids.shape[-1] if input_ids is not None else inputs_embeds.shape[-2]
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        if position_ids is None:  # a module call, not a weight slice: offload hooks and ZeRO-3 gather on calls
            position_ids = torch.arange(seq_length, device=inputs_embeds.device).unsqueeze(0)
        position_embeds = self.position_embedding(position_ids)
        return inputs_embeds + position_embeds


# --------------------------------------------------------------------------------------------------------------------
# Inference matmuls: direct `out=` writes in row blocks, for eager no-grad runs on plain layers
# --------------------------------------------------------------------------------------------------------------------


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type: CUDA's is the unnamed one, others have their own
        if device_type == "cuda":
            return torch.is_autocast_enabled()
        probe = getattr(torch, f"is_autocast_{device_type}_enabled", None)  # cpu, xpu, ipu, xla
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # a device type without autocast (meta): nothing is autocast there
        return False


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids), on which oneDNN runs half-precision matmuls.
    The CPU half-precision paths marked "AVX-512 CPUs only" below were measured where bf16 runs on AVX-512 (AMD Zen 4)
    and step aside on AMX, where whole matmuls and the MLP over the whole batch are faster
    (`cpu_half_kernels`; ablation `ours_eva02_avx512_paths_bf16` in benchmarks/tower.py)."""
    probe = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def _cpu_half(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype in (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def cpu_half_kernels(dtype: torch.dtype) -> str:
    """Which kernels run this CPU's matmuls in half-precision `dtype`, which decides the CPU inference paths:
    "amx" (oneDNN on AMX tiles: whole matmuls, the MLP over the whole batch), "avx512"
    (oneDNN on AVX-512: the paths marked "AVX-512 CPUs only" below, measured on AMD Zen 4), or "portable" (no oneDNN
    kernels for `dtype`, e.g. bf16 on AVX2-only CPUs: torch's portable kernels, which the inference paths replace by
    fp32 matmuls, `_half_matmul_in_fp32`)."""
    native = cpu_has_onednn_bf16() if dtype == torch.bfloat16 else cpu_has_onednn_fp16()
    if not native:
        return "portable"
    return "amx" if cpu_has_amx() else "avx512"


def _avx512_half(tensor: torch.Tensor) -> bool:
    """A half-precision CPU tensor whose matmuls run on oneDNN's AVX-512 kernels: where the "AVX-512 CPUs only" paths
    run."""
    return _cpu_half(tensor) and cpu_half_kernels(tensor.dtype) == "avx512"


# On CPUs oneDNN has no kernels for in a half-precision dtype (bf16 on AVX2-only CPUs such as AMD Zen 3; fp16 without
# AVX512-FP16 or AMX-FP16), torch runs half-precision matmuls in its portable kernels: measured on a Zen 3, 6.6x (bf16)
# and 5.3x (fp16) the time of MKL's fp32 GEMM on the same operands. There the inference paths compute them in fp32 and
# round once into the half-precision output: the same products summed in fp32 as torch's kernel sums them (in
# another order), as close to fp64 (tested). False keeps torch's kernels (ablation `ours_eva02_half_matmuls_native_bf16`
# in benchmarks/tower.py).
CPU_HALF_MATMULS_IN_FP32 = True


def _half_matmul_in_fp32(rows: torch.Tensor) -> bool:
    """Whether the inference matmuls over half-precision CPU `rows` run in fp32 (`CPU_HALF_MATMULS_IN_FP32`)."""
    return CPU_HALF_MATMULS_IN_FP32 and _cpu_half(rows) and cpu_half_kernels(rows.dtype) == "portable"


# Hidden activations per block of tokens in the MLP's inference path: small enough to stay in the CPU's cache (fp32,
# and half precision on AVX-512 CPUs only; elsewhere the MLP of a half-precision batch runs whole).
INFERENCE_MLP_BLOCK_BYTES = 16 * 2**20

# Where the inference paths split a half-precision matmul on AVX-512 CPUs only. There oneDNN's bf16 GEMM runs 8-14%
# slower on 577 or 578 rows (ViT-L/14-336's patches + CLS at batch 1) than as 512 + 65 rows, so a matmul of fewer than
# twice this many rows is split after it; larger ones run whole (in 512-row blocks, batch 8's 4616 rows ran ~4% slower
# in the tower). fp32 (MKL), AMX CPUs (where the split costs ~13%) and GPUs always run whole (ablation
# `ours_eva02_whole_gemms_bf16` in benchmarks/tower.py).
CPU_HALF_GEMM_ROWS = 512


def _gemm_row_blocks(rows: torch.Tensor) -> list[slice]:
    """The row blocks the inference matmuls over [N, C] `rows` run as (see `CPU_HALF_GEMM_ROWS`). Each output row
    depends on its input row alone, and the AVX-512 kernels sum over the inner dimension in the same order whatever the
    row count, so the blocks give one matmul's bits (tested)."""
    count, step = rows.shape[0], max(1, CPU_HALF_GEMM_ROWS)
    if not (_avx512_half(rows) and count < 2 * step):
        step = max(1, count)
    return [slice(start, start + step) for start in range(0, count, step)]


def _aligned_row_stride(columns: int, dtype: torch.dtype) -> int:
    """`columns` rounded up so that each row of a [N, columns] buffer starts on a 64-byte boundary (a cache line):
    the CPU GEMM writes its output rows in place, and misaligned rows (EVA02-L's 2730 columns) cost MKL's fp32 GEMM
    ~30% on AMD CPUs (benchmarks/tower.py); the inputs it packs itself, so their alignment does not matter."""
    align = max(1, 64 // dtype.itemsize)
    return -(-columns // align) * align


def _gemm_into(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """`rows @ weight.T (+ bias)` as one GEMM writing `out` in place (no new tensor)."""
    if bias is None:
        torch.mm(rows, weight.t(), out=out)
    else:
        torch.addmm(bias, rows, weight.t(), out=out)


def _addmm_into(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """`F.linear(rows, weight, bias)` written into `out` (a [N, out_features] view with unit column stride), in
    `_gemm_row_blocks`, or where `_half_matmul_in_fp32` holds as one fp32 matmul (into a row-aligned fp32 buffer)
    rounded once into `out`."""
    if _half_matmul_in_fp32(rows):
        count, columns = rows.shape[0], weight.shape[0]
        wide = rows.new_empty(count, _aligned_row_stride(columns, torch.float32), dtype=torch.float32)[:, :columns]
        _gemm_into(rows.float(), weight.float(), None if bias is None else bias.float(), wide)
        out.copy_(wide)
        return
    for block in _gemm_row_blocks(rows):
        _gemm_into(rows[block], weight, bias, out[block])


def _linear_into(rows: torch.Tensor, layer: nn.Linear, out: torch.Tensor) -> None:
    """`layer(rows)` written into `out` (a [N, out_features] view with unit column stride)."""
    _addmm_into(rows, layer.weight, layer.bias, out)


# CPU bf16 matmuls whose output is a new tensor go through oneDNN's linear with the bias added in the GEMM's epilogue
# (the op inductor's CPU backend calls): `addmm` first copies the broadcast bias into the output and reads it back, an
# extra pass that costs ~5% of the matmul (same bits, tested). Split matmuls (`CPU_HALF_GEMM_ROWS`) are concatenated,
# which costs less than that pass. False, or a torch built without oneDNN, keeps `addmm` (ablation
# `ours_eva02_addmm_bias_bf16` in benchmarks/tower.py).
CPU_BF16_FUSED_BIAS = True


def _onednn_probe(name: str) -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    probe = getattr(torch.ops.mkldnn, name, None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def cpu_has_onednn_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 BW/VL/DQ, AVX-512 BF16 or AMX; torch's own check, the one
    inductor's CPU backend asks). Without them (AVX2-only CPUs such as AMD Zen 3) oneDNN refuses bf16 linears
    ("could not create a primitive descriptor") and torch's bf16 matmuls run its portable kernels."""
    return _onednn_probe("_is_mkldnn_bf16_supported")


@functools.lru_cache(maxsize=None)
def cpu_has_onednn_fp16() -> bool:
    """Whether oneDNN has fp16 kernels for this CPU (AVX512-FP16 or AMX-FP16; torch's own check)."""
    return _onednn_probe("_is_mkldnn_fp16_supported")


def _onednn_linear_applies(rows: torch.Tensor, *parameters: Optional[torch.Tensor]) -> bool:
    """Whether oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`) takes [N, C] `rows` with these weights and
    biases (None for none): CPU bf16 on a CPU oneDNN has bf16 kernels for, a non-empty batch, contiguous tensors of
    one dtype (it refuses strided ones)."""
    return (
        rows.device.type == "cpu"
        and rows.dtype == torch.bfloat16
        and rows.shape[0] > 0
        and rows.is_contiguous()
        and all(p is None or (p.dtype == rows.dtype and p.is_contiguous()) for p in parameters)
        and torch.backends.mkldnn.is_available()
        and cpu_has_onednn_bf16()
    )


def _fused_bias_linear(
    rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Optional[torch.Tensor]:
    """`F.linear(rows, weight, bias)` for [N, C] rows through oneDNN's fused-bias linear (in `_gemm_row_blocks`) on
    CPU in bf16; None where it does not apply (`_onednn_linear_applies`, or no bias)."""
    if not (CPU_BF16_FUSED_BIAS and bias is not None and _onednn_linear_applies(rows, weight, bias)):
        return None
    blocks = [
        torch.ops.mkldnn._linear_pointwise(rows[block], weight, bias, "none", [], "") for block in _gemm_row_blocks(rows)
    ]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _linear_rows(hidden_states: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`layer(hidden_states)` into a new tensor, for the inference paths: `_fused_bias_linear`, else `_addmm_into`
    (row blocks)."""
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    out = _fused_bias_linear(rows, layer.weight, layer.bias)
    if out is None:
        out = rows.new_empty(rows.shape[0], layer.out_features)
        _linear_into(rows, layer, out)
    return out.view(*hidden_states.shape[:-1], layer.out_features)


# torch's global module hooks (`register_module_forward_hook`), dicts mutated in place, so these stay current.
_GLOBAL_FORWARD_HOOKS = getattr(torch.nn.modules.module, "_global_forward_hooks", {})
_GLOBAL_FORWARD_PRE_HOOKS = getattr(torch.nn.modules.module, "_global_forward_pre_hooks", {})


def _has_hooks(module: Optional[nn.Module]) -> bool:
    """Whether `module` has forward hooks of torch or accelerate (`_hf_hook`), its own or global ones
    (`register_module_forward_hook`, as torch's ModuleTracker and activation recorders use), or a `forward` set on the
    instance (accelerate's hooks do that too, as do users' monkeypatches and loralib-style injections): only a module
    call with its usual input runs them. Dict look-ups only: it runs for every MLP and attention of every forward."""
    return isinstance(module, nn.Module) and bool(
        module._forward_hooks or module._forward_pre_hooks or "_hf_hook" in module.__dict__
        or "forward" in module.__dict__ or _GLOBAL_FORWARD_HOOKS or _GLOBAL_FORWARD_PRE_HOOKS
    )


def _eager_inference(inputs: torch.Tensor) -> bool:
    """Whether eager inference kernels may replace module calls on `inputs`: a plain tensor (a subclass defines its
    own `F.linear` or attention, which only the module calls run), no autograd records (grad mode off and no
    forward-AD level: `out=` writes carry no tangent and oneDNN's fused linears silently drop it), no autocast, and,
    outside torch.compile (which traces modes itself), no mode that watches or rewrites the module calls' ops
    (`overriding_modes_active`)."""
    return type(inputs) is torch.Tensor and not (
        torch.is_grad_enabled()
        or forward_ad_active()
        or _autocast_enabled(inputs.device.type)
        or (not is_compiling() and overriding_modes_active())
    )


# The parameter types the inference paths read as plain tensors: a subclass (torchao-style quantized weights, a
# `__torch_function__` wrapper, DTensor) defines its own `F.linear` / conv, which only a module call runs.
_PLAIN_PARAMETER_TYPES = (nn.Parameter, torch.Tensor, type(None))


def _plain_layer(layer: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    """A plain `nn.Linear` (or the patch embedding's `nn.Conv2d`) without hooks of torch or accelerate (whose offload
    fills weights only for a called module), adapters or quantized layers, whose weight and bias are plain tensors
    (`_PLAIN_PARAMETER_TYPES`), the weight dense (a sparse one, as torch's pruning tutorials make, has no `out=`
    matmul) in `dtype` on `device`, and not partitioned by ZeRO-3 (only a called module's weights are gathered). Each
    parameter is read once: a module attribute read goes through `nn.Module.__getattr__`."""
    if type(layer) not in (nn.Linear, nn.Conv2d) or _has_hooks(layer):
        return False
    weight, bias = layer.weight, layer.bias
    return (
        type(weight) in _PLAIN_PARAMETER_TYPES
        and type(bias) in _PLAIN_PARAMETER_TYPES
        and weight.layout == torch.strided
        and weight.dtype == dtype
        and weight.device == device
        and not is_partitioned(weight)
    )


def plain_inference_linears(hidden_states: torch.Tensor, layers: Sequence[Optional[nn.Module]]) -> bool:
    """Whether `layers` may run as direct matmuls (`out=` writes, row blocks) instead of module calls: eager inference
    (`_eager_inference`) on plain layers (`_plain_layer`; None entries are absent layers)."""
    if not _eager_inference(hidden_states):
        return False
    dtype, device = hidden_states.dtype, hidden_states.device
    return all(layer is None or _plain_layer(layer, dtype, device) for layer in layers)


# --------------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------------


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention on [B, H, N, D] (transformers' attention-function signature); returns the output as
    [B, N, H, D] and the softmax weights. The softmax runs in at least fp32: an fp32 one rounded fp64 models (gradcheck,
    and forward-mode AD, which runs this kernel) to fp32's precision (3.6e-7 off the fp64 sdpa output)."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.promote_types(weights.dtype, torch.float32)).to(query.dtype)
    probs = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value).transpose(1, 2), weights


# fp32 CPU inference hands torch's fused attention q, k and v as contiguous [B, H, N, D] copies instead of the
# projections' transposed views: its CPU kernel reads strided heads ~1.3x slower (16.0 against 20.7 ms at
# EVA02-L's batch-1 shape on an Intel AMX machine), far more than the three copies cost (0.6 ms each); the tower
# ran 2.2% (EVA02-L) and 3.3% (plain shape) faster, paired. bf16 gained nothing there, so it keeps the views.
# False keeps the views (ablation `ours_eva02_strided_attention_fp32` in benchmarks/tower.py).
CPU_FP32_CONTIGUOUS_ATTENTION = True


def _contiguous_heads(query: torch.Tensor) -> bool:
    """fp32 CPU inference in eager mode (`CPU_FP32_CONTIGUOUS_ATTENTION`); training and traced graphs keep the
    views, whose layout autograd and the compilers handle themselves."""
    return (
        CPU_FP32_CONTIGUOUS_ATTENTION
        and query.device.type == "cpu"
        and query.dtype == torch.float32
        and not is_tracing()
        and not torch.is_grad_enabled()
    )


def sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """torch's fused attention (through transformers' `AttentionInterface` where it exists) on every device and
    dtype; fp32 CPU inference passes contiguous heads (`CPU_FP32_CONTIGUOUS_ATTENTION`). A per-head-matmul bf16
    kernel for AVX-512 CPUs was removed: it rounded the scores to bf16 before the softmax (2x to 30x the fused
    kernel's error vs fp64, tests/test_half_precision_accuracy.py), and with fp32 scores its speed-up was gone."""
    if _contiguous_heads(query):
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    if attention_mask is not None and attention_mask.dtype != query.dtype and attention_mask.is_floating_point():
        # Under autocast the text tower's additive mask is fp32 and q half precision, which the CPU kernel of torch 2.1
        # (LLaVA's pin) refuses; cast as the mask built in half precision is (its minimum, not -inf).
        attention_mask = attention_mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
    if ALL_ATTENTION_FUNCTIONS is not None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
        )
    # torch's own default when the scale is 1/sqrt(head_dim), as every EVA-CLIP's is (the same fp32 number): torch 2.1's
    # ONNX exporter fails on an explicit float `scale`.
    scale = None if scaling == query.shape[-1] ** -0.5 else scaling
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scale)
    return out.transpose(1, 2), None


def flash_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """flash-attn 2 for unmasked attention (the vision tower) on transformers 4.x; masked calls fall back to sdpa."""
    if attention_mask is not None or query.dtype not in (torch.float16, torch.bfloat16):
        return sdpa_attention(module, query, key, value, attention_mask, scaling, dropout)
    from flash_attn import flash_attn_func

    out = flash_attn_func(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=dropout, softmax_scale=scaling
    )
    return out, None


# The package's own kernels, called as `fn(module, query, key, value, attention_mask, scaling=, dropout=)` on
# [B, H, N, D] and returning ([B, N, H, D], weights or None). Where transformers has `AttentionInterface`, every other
# name (flash_attention_2/3, flex_attention, a function registered with `AttentionInterface.register`) comes from it,
# and `sdpa` goes through it too.
ATTENTION_FUNCTIONS: dict[str, Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]]] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
}
if ALL_ATTENTION_FUNCTIONS is None:
    ATTENTION_FUNCTIONS["flash_attention_2"] = flash_attention


def _known_attn_implementations() -> list[str]:
    if ALL_ATTENTION_FUNCTIONS is None:
        return list(ATTENTION_FUNCTIONS)
    # 4.48-4.49 keep a plain dict (no `AttentionInterface`, no `valid_keys`); users add kernels to it by key.
    valid_keys = getattr(ALL_ATTENTION_FUNCTIONS, "valid_keys", ALL_ATTENTION_FUNCTIONS.keys)
    return list(dict.fromkeys([*ATTENTION_FUNCTIONS, *valid_keys()]))


def attention_function(implementation: str) -> Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The kernel registered under a name: the package's own first, then transformers' `AttentionInterface`."""
    if implementation in ATTENTION_FUNCTIONS:
        return ATTENTION_FUNCTIONS[implementation]
    return ALL_ATTENTION_FUNCTIONS[implementation]


def resolve_attn_implementation(config: Any) -> str:
    """The attention kernel a config asks for; unset means sdpa (4.x reports unset as "eager")."""
    requested = getattr(config, "_attn_implementation_internal", None)
    if isinstance(requested, dict):  # transformers 5 may key it per sub-config
        requested = requested.get("") or next(iter(requested.values()), None)
    if requested is None:
        return "sdpa"
    # Membership, not the registry's key list: this runs in every attention call, and torch 2.8's dynamo cannot trace
    # `list()` over `AttentionInterface.keys()` (torch.compile(fullgraph=True) failed there on transformers 4.56).
    registered = requested in ATTENTION_FUNCTIONS or (
        ALL_ATTENTION_FUNCTIONS is not None and requested in ALL_ATTENTION_FUNCTIONS
    )
    if not registered:
        known = tuple(_known_attn_implementations())
        raise ValueError(f"attn_implementation {requested!r} is not supported; choose one of {known}.")
    if requested == "flash_attention_2" and not is_flash_attn_available():
        raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA device; "
                         "use 'sdpa' otherwise.")
    return requested


def attention_kernel(config: Any, output_attentions: bool) -> str:
    """The kernel one forward runs: eager where attention weights are asked for, and under forward-mode AD
    (`torch.func.jvp` / `jacfwd` / `hessian`, `torch.autograd.forward_ad`), which has rules for eager's matmuls and
    softmax but none for the fused kernels (torch's CPU flash kernel, CUDA flash / efficient, flash-attn): those failed
    with NotImplementedError where BAAI's attention runs. Otherwise `resolve_attn_implementation`."""
    if output_attentions or forward_ad_active():
        return "eager"
    return resolve_attn_implementation(config)


# transformers 4.x builds the model to load under accelerate's `init_empty_weights` (always from 4.5x, with
# `low_cpu_mem_usage=True` before), which swaps `nn.Module.register_parameter` class-wide: two threads loading at once
# restored each other's swap, and every module built afterwards in the process had meta parameters.
_LOADING = threading.RLock()


class EvaCLIPRMSNorm(nn.Module):
    """EVA-CLIP-8B / 18B's RMSNorm, as BAAI computes it: `weight * x * rsqrt(mean(x^2) + eps)` with the statistics
    in fp32, the product cast to the weight's dtype when that is half precision; weight only, no bias."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# transformers 4.x's Trainer and LLaVA's trainer keep weight decay off the norm types listed here (LLaMA registers its
# RMSNorm the same way); the gains are named `layer_norm1` / `layer_norm2`, which no name pattern catches.
ALL_LAYERNORM_LAYERS.append(EvaCLIPRMSNorm)


def build_norm(config: EvaCLIPVisionConfig | EvaCLIPTextConfig, size: int) -> nn.Module:
    """The tower's norm layer: LayerNorm, or RMSNorm when `config.use_rms_norm` (EVA-CLIP-8B / 18B)."""
    if getattr(config, "use_rms_norm", False):
        return EvaCLIPRMSNorm(size, eps=config.layer_norm_eps)
    return nn.LayerNorm(size, eps=config.layer_norm_eps)


class EvaCLIPAttention(nn.Module):
    """Multi-head self-attention of both towers: independent q/k/v bias flags (no k bias parameter is created when
    the checkpoint has none), optional 2D RoPE, an optional sub-LayerNorm before the output projection, and the kernel
    chosen by `config._attn_implementation` (eager is used whenever attention weights are requested). Masks are
    explicit (the text tower's causal mask included), so `is_causal` is False for every kernel."""

    is_causal = False

    def __init__(self, config: EvaCLIPVisionConfig | EvaCLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=config.q_bias)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=config.k_bias)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=config.v_bias)
        if getattr(config, "use_sub_layernorm", False):
            self.inner_attn_ln = build_norm(config, self.embed_dim)
        else:
            self.inner_attn_ln = None
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=True)

    @staticmethod
    def _linear(layer: nn.Linear, hidden_states: torch.Tensor, direct: bool) -> torch.Tensor:
        """`layer(hidden_states)`, as the inference path's direct (split) matmuls when `direct`."""
        return _linear_rows(hidden_states, layer) if direct else layer(hidden_states)

    def _project(
        self, hidden_states: torch.Tensor, direct: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [B, H, N, D]."""
        batch, length, _ = hidden_states.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        return tuple(
            self._linear(layer, hidden_states, direct).view(shape).transpose(1, 2)
            for layer in (self.q_proj, self.k_proj, self.v_proj)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch, length, _ = hidden_states.shape
        # Eager inference on plain layers (the MLP's conditions): the four projections as direct matmuls; decided once.
        direct = not is_tracing() and plain_inference_linears(
            hidden_states, (self.q_proj, self.k_proj, self.v_proj, self.out_proj)
        )
        query, key, value = self._project(hidden_states, direct)
        if rotary is not None:
            cos, sin = rotary
            if direct and cos.dtype == sin.dtype == value.dtype:  # fresh q and k buffers of its own: rotated in place
                query, key = apply_rotary_((query, key), cos, sin)
            else:
                query = apply_rotary(query, cos, sin).type_as(value)
                key = apply_rotary(key, cos, sin).type_as(value)
        implementation = attention_kernel(self.config, output_attentions)
        if attention_mask is not None and implementation.startswith("flash_attention"):
            implementation = "sdpa"  # flash kernels take padding masks only; the text tower's mask is causal + padding
        dropout = self.dropout if self.training else 0.0
        attn_output, attn_weights = attention_function(implementation)(
            self, query, key, value, attention_mask, scaling=self.scale, dropout=dropout
        )
        attn_output = attn_output.reshape(batch, length, self.embed_dim)
        if self.inner_attn_ln is not None:
            attn_output = self.inner_attn_ln(attn_output)
        return self._linear(self.out_proj, attn_output, direct), attn_weights


class EvaCLIPTextAttention(EvaCLIPAttention):
    """The text tower's attention: the same implementation, named for the text tower."""


# --------------------------------------------------------------------------------------------------------------------
# MLP and block
# --------------------------------------------------------------------------------------------------------------------


# Under torch.compile (inference, no export) SwiGLU's two input matmuls run as the opaque op
# `llava_evaclip::aligned_gated_linear`, so inductor's graph keeps the row-aligned buffer of the eager path; False
# leaves them to inductor (module calls), for ablations.
COMPILED_ALIGNED_SWIGLU = True


def _aligned_gate_up(
    rows: torch.Tensor, gate_weight: torch.Tensor, gate_bias: Optional[torch.Tensor], up_weight: torch.Tensor,
    up_bias: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up projections of [N, C] rows, both matmuls writing into one buffer whose rows start on 64-byte
    boundaries. EVA02-L's 2730-wide outputs otherwise leave every row misaligned, which costs the fp32 CPU GEMM
    ~30% (benchmarks/tower.py); the weights are used in place, no fused copy is made. Where `_fused_bias_linear`
    applies (CPU bf16, whose GEMM does not mind unaligned rows) each projection is its own tensor instead."""
    if gate_bias is not None and up_bias is not None:
        gate = _fused_bias_linear(rows, gate_weight, gate_bias)
        if gate is not None:
            return gate, _fused_bias_linear(rows, up_weight, up_bias)
    inner = gate_weight.shape[0]
    row_stride = _aligned_row_stride(inner, rows.dtype)
    buffer = rows.new_empty(rows.shape[0], 2 * row_stride)
    gate, up = buffer[:, :inner], buffer[:, row_stride : row_stride + inner]
    _addmm_into(rows, gate_weight, gate_bias, gate)
    _addmm_into(rows, up_weight, up_bias, up)
    return gate, up


# CPU bf16 SwiGLU runs its SiLU and its gating multiply in the epilogues of the two input matmuls (oneDNN's "swish"
# and binary "mul" post-ops), block by block (`_gemm_row_blocks`): two passes over the hidden activations fewer,
# ~12% off the MLP's input half at EVA02-L's batch-1 shape. The gate is rounded to bf16 once (after the SiLU) instead
# of twice, so the result is not the module calls' bits but at least as close to an fp64 reference (tested). False
# keeps the separate passes (ablation `ours_eva02_unfused_swiglu_bf16` in benchmarks/tower.py).
CPU_BF16_FUSED_SWIGLU = True


def _fused_swiglu(
    rows: torch.Tensor, gate_weight: torch.Tensor, gate_bias: Optional[torch.Tensor], up_weight: torch.Tensor,
    up_bias: Optional[torch.Tensor],
) -> Optional[torch.Tensor]:
    """`silu(rows @ gate_weight.T + gate_bias) * (rows @ up_weight.T + up_bias)` for [N, C] rows with the SiLU and
    the multiply in oneDNN's epilogues; None where `_onednn_linear_applies` does not hold."""
    if not (CPU_BF16_FUSED_SWIGLU and _onednn_linear_applies(rows, gate_weight, gate_bias, up_weight, up_bias)):
        return None
    linear = torch.ops.mkldnn._linear_pointwise
    blocks = []
    for block in _gemm_row_blocks(rows):
        gate = linear(rows[block], gate_weight, gate_bias, "swish", [], "")
        blocks.append(linear.binary(rows[block], gate, up_weight, up_bias, "mul"))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _aligned_gated_linear(
    x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: Optional[torch.Tensor], up_weight: torch.Tensor,
    up_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """`silu(x @ gate_weight.T + gate_bias) * (x @ up_weight.T + up_bias)` over the last dimension of `x`, through
    the row-aligned buffer of `_aligned_gate_up` (or `_fused_swiglu` where it applies)."""
    rows = x.reshape(-1, x.shape[-1])
    hidden = _fused_swiglu(rows, gate_weight, gate_bias, up_weight, up_bias)
    if hidden is None:
        gate, up = _aligned_gate_up(rows, gate_weight, gate_bias, up_weight, up_bias)
        hidden = F.silu(gate).mul_(up)
    return hidden.view(*x.shape[:-1], gate_weight.shape[0])


def _aligned_gated_linear_fake(
    x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: Optional[torch.Tensor], up_weight: torch.Tensor,
    up_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """The output's shape and dtype for fake / meta tensors (torch.compile traces with them)."""
    return x.new_empty(*x.shape[:-1], gate_weight.shape[0])


def _aligned_gated_linear_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _aligned_gated_linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
    """Recomputes the two projections (nothing but the inputs is kept) and differentiates `silu(gate) * up`."""
    x, gate_weight, gate_bias, up_weight, up_bias = ctx.saved_tensors
    gate, up = F.linear(x, gate_weight, gate_bias), F.linear(x, up_weight, up_bias)
    sigmoid = torch.sigmoid(gate)
    grad_up = grad * gate * sigmoid
    grad_gate = grad * up * sigmoid * (1 + gate * (1 - sigmoid))
    needs = ctx.needs_input_grad
    grad_x = grad_gate @ gate_weight + grad_up @ up_weight if needs[0] else None
    rows = x.reshape(-1, x.shape[-1])
    grad_gate_rows, grad_up_rows = grad_gate.reshape(-1, grad_gate.shape[-1]), grad_up.reshape(-1, grad_up.shape[-1])
    return (
        grad_x,
        grad_gate_rows.t() @ rows if needs[1] else None,
        grad_gate_rows.sum(0) if needs[2] else None,
        grad_up_rows.t() @ rows if needs[3] else None,
        grad_up_rows.sum(0) if needs[4] else None,
    )


if hasattr(torch.library, "custom_op"):  # torch >= 2.4; before it compiled SwiGLU stays with inductor
    aligned_gated_linear = torch.library.custom_op(
        "llava_evaclip::aligned_gated_linear",
        _aligned_gated_linear,
        mutates_args=(),
        schema="(Tensor x, Tensor gate_weight, Tensor? gate_bias, Tensor up_weight, Tensor? up_bias) -> Tensor",
    )
    aligned_gated_linear.register_fake(_aligned_gated_linear_fake)
    aligned_gated_linear.register_autograd(
        _aligned_gated_linear_backward, setup_context=_aligned_gated_linear_setup_context
    )
else:  # pragma: no cover - torch < 2.4
    aligned_gated_linear = None


# The activation modules that are SiLU (what `ACT2FN` builds for "silu" and "swish" on each transformers line), which
# the inference paths fold into the gate matmul: any other module a user puts in `activation_fn` is called as is.
_SILU_TYPES = (nn.SiLU, type(ACT2FN["silu"]), type(ACT2FN["swish"]))


_TORCH_IS_EXPORTING = getattr(torch.compiler, "is_exporting", None)


def _is_exporting() -> bool:
    """torch.export, or a torch that cannot tell (no `torch.compiler.is_exporting`: 2.4 and 2.5, where the op went into
    exported programs): the aligned op is then left to eager and compiled code of newer torch. (The dynamo of torch
    2.6-2.11, at least, folds `is_exporting()` to True under any compile, so compiled code there keeps the module
    calls.)"""
    return _TORCH_IS_EXPORTING is None or bool(_TORCH_IS_EXPORTING())


class EvaCLIPMLP(nn.Module):
    """`fc2(act(fc1(x)))`, or SwiGLU `fc2(silu(fc1(x)) * fc1_up(x))`; an optional LayerNorm (`ffn_ln`) on the hidden."""

    def __init__(self, config: EvaCLIPVisionConfig | EvaCLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc1_up = (
            nn.Linear(config.hidden_size, config.intermediate_size) if getattr(config, "use_swiglu", False) else None
        )
        self.ffn_ln = (
            build_norm(config, config.intermediate_size)
            if getattr(config, "use_sub_layernorm", False)
            else None
        )
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def _use_inference_path(self, hidden_states: torch.Tensor) -> bool:
        """Whether `_inference_forward` may replace the module calls: eager inference only (it writes with `out=`,
        which autograd, torch.compile and torch.export do not take), under `plain_inference_linears`."""
        return not is_tracing() and self._plain_inference(hidden_states)

    def _silu_gated(self) -> bool:
        """SwiGLU whose activation module is SiLU, which the inference paths fold into the gate matmul: read from
        `activation_fn` itself, not the config, since users swap it (activation studies, ReLU-fication) as they can in
        transformers' models, whose MLPs call whatever module it holds."""
        return self.fc1_up is not None and type(self.activation_fn) in _SILU_TYPES

    def _use_compiled_aligned_swiglu(self, hidden_states: torch.Tensor) -> bool:
        """Whether SwiGLU's input matmuls run as `aligned_gated_linear` (an op inductor calls as is): under
        torch.compile only, never while exporting (exported programs stay aten-only), with the conditions of the
        eager path (no grad, no autocast, plain layers)."""
        return (
            COMPILED_ALIGNED_SWIGLU
            and aligned_gated_linear is not None
            and self._silu_gated()
            and is_compiling()
            and not _is_exporting()
            and not torch.jit.is_tracing()
            and self._plain_inference(hidden_states)
        )

    def _plain_inference(self, hidden_states: torch.Tensor) -> bool:
        """`plain_inference_linears`, and no hooks on the activation or `ffn_ln`: the inference paths call `ffn_ln`
        on [tokens, C] row blocks and fold SiLU into the matmuls, so such hooks would see other shapes or not run."""
        return plain_inference_linears(hidden_states, (self.fc1, self.fc1_up, self.fc2)) and not any(
            _has_hooks(module) for module in (self.activation_fn, self.ffn_ln)
        )

    def _aligned_swiglu(self, rows: torch.Tensor) -> torch.Tensor:
        """`act(fc1(x)) * fc1_up(x)` for [N, C] rows: `_aligned_gated_linear` for SiLU (fused where it applies), else
        through `_aligned_gate_up`'s row-aligned buffer."""
        if self._silu_gated():
            return _aligned_gated_linear(rows, self.fc1.weight, self.fc1.bias, self.fc1_up.weight, self.fc1_up.bias)
        gate, up = _aligned_gate_up(rows, self.fc1.weight, self.fc1.bias, self.fc1_up.weight, self.fc1_up.bias)
        return self.activation_fn(gate).mul_(up)

    def _hidden(self, hidden_states: torch.Tensor, direct: bool = False) -> torch.Tensor:
        """The activation (SwiGLU-gated or not) and the optional sub-LayerNorm; `direct` takes the inference path's
        direct matmuls (`_aligned_swiglu`, `_linear_rows`) for [N, C] rows."""
        if self.fc1_up is None:
            hidden = self.activation_fn(_linear_rows(hidden_states, self.fc1) if direct else self.fc1(hidden_states))
        elif direct:
            hidden = self._aligned_swiglu(hidden_states)
        else:
            hidden = self.activation_fn(self.fc1(hidden_states)) * self.fc1_up(hidden_states)
        return self.ffn_ln(hidden) if self.ffn_ln is not None else hidden

    def _inference_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The MLP over blocks of tokens whose hidden activations fit in cache (`INFERENCE_MLP_BLOCK_BYTES`), so the
        activation, gating and sub-LayerNorm passes of a batch do not each stream the whole hidden through memory."""
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        hidden_bytes = self.fc1.out_features * rows.element_size() * (2 if self.fc1_up is not None else 1)
        step = max(1, INFERENCE_MLP_BLOCK_BYTES // hidden_bytes)
        if _cpu_half(rows) and not _avx512_half(rows):
            step = rows.shape[0]  # whole: blocks cost ~10% at batch 8 on AMX; in fp32 each would widen the weights
        if step >= rows.shape[0]:  # one block: fc2 into a new tensor, with the fused bias where it applies
            out = _linear_rows(self._hidden(rows, direct=True), self.fc2)
            return out.view(*hidden_states.shape[:-1], self.fc2.out_features)
        out = rows.new_empty(rows.shape[0], self.fc2.out_features)
        for start in range(0, rows.shape[0], step):
            hidden = self._hidden(rows[start : start + step], direct=True)
            _linear_into(hidden, self.fc2, out[start : start + step])
        return out.view(*hidden_states.shape[:-1], self.fc2.out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._use_inference_path(hidden_states):
            return self._inference_forward(hidden_states)
        if self._use_compiled_aligned_swiglu(hidden_states):
            hidden = aligned_gated_linear(
                hidden_states, self.fc1.weight, self.fc1.bias, self.fc1_up.weight, self.fc1_up.bias
            )
            return self.fc2(self.ffn_ln(hidden) if self.ffn_ln is not None else hidden)
        return self.fc2(self._hidden(hidden_states))


class EvaCLIPEncoderLayer(GradientCheckpointingLayer or nn.Module):
    """One transformer block: pre-norm `x + ls(f(norm(x)))` or post-norm `x + ls(norm(f(x)))` (EVA02-bigE). Where
    transformers has `GradientCheckpointingLayer`, the block checkpoints itself; on older versions the encoder does."""

    def __init__(self, config: EvaCLIPVisionConfig | EvaCLIPTextConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.post_layernorm = bool(config.post_layernorm)
        attention_class = EvaCLIPTextAttention if isinstance(config, EvaCLIPTextConfig) else EvaCLIPAttention
        self.self_attn = attention_class(config)
        self.layer_norm1 = build_norm(config, self.embed_dim)
        self.mlp = EvaCLIPMLP(config)
        self.layer_norm2 = build_norm(config, self.embed_dim)
        if config.layer_scale_init_value is not None:
            self.layer_scale1 = nn.Parameter(torch.full((self.embed_dim,), float(config.layer_scale_init_value)))
            self.layer_scale2 = nn.Parameter(torch.full((self.embed_dim,), float(config.layer_scale_init_value)))
        else:
            self.layer_scale1 = None
            self.layer_scale2 = None

    def _residual_branch(
        self, hidden_states: torch.Tensor, norm: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
        scale: Optional[torch.Tensor],
    ) -> torch.Tensor:
        branch = norm(fn(hidden_states)) if self.post_layernorm else fn(norm(hidden_states))
        return branch * scale if scale is not None else branch

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        attn_weights = None

        def attend(x: torch.Tensor) -> torch.Tensor:
            nonlocal attn_weights
            out, attn_weights = self.self_attn(x, attention_mask, rotary, output_attentions)
            return out

        hidden_states = hidden_states + self._residual_branch(hidden_states, self.layer_norm1, attend, self.layer_scale1)
        hidden_states = hidden_states + self._residual_branch(hidden_states, self.layer_norm2, self.mlp, self.layer_scale2)
        return hidden_states, attn_weights

    if GradientCheckpointingLayer is not None:

        @property
        def _gradient_checkpointing_func(self) -> Optional[Callable]:
            return self.__dict__.get("_non_reentrant_checkpoint")

        @_gradient_checkpointing_func.setter
        def _gradient_checkpointing_func(self, checkpoint: Optional[Callable]) -> None:
            """A model around the tower (LLaVA's `gradient_checkpointing_enable`) hands its checkpoint function to
            every `GradientCheckpointingLayer` itself, past our `_set_gradient_checkpointing`; a reentrant one behind
            the patch embedding, which needs no gradient, silently left every trainable tower parameter without
            gradients (seen on transformers 4.53 and 4.56, whose `enable_input_require_grads` hooks only the LM's
            embeddings)."""
            self.__dict__["_non_reentrant_checkpoint"] = _non_reentrant(checkpoint)


def _non_reentrant(checkpoint: Optional[Callable]) -> Optional[Callable]:
    """torch's checkpoint as transformers hands it out (bare, or a partial with its kwargs), made non-reentrant: our
    towers have no trainable module between the embeddings and the first layer (CLIP has `pre_layrnorm`), so with
    frozen embeddings a reentrant checkpoint gives no layer a gradient. Any other function is left as it is."""
    torch_checkpoint = torch.utils.checkpoint.checkpoint
    if checkpoint is torch_checkpoint:
        return functools.partial(checkpoint, use_reentrant=False)
    if (isinstance(checkpoint, functools.partial) and checkpoint.func is torch_checkpoint
            and checkpoint.keywords.get("use_reentrant", True) is not False):
        return functools.partial(checkpoint.func, *checkpoint.args, **{**checkpoint.keywords, "use_reentrant": False})
    return checkpoint


class EvaCLIPEncoder(nn.Module):
    """A stack of `EvaCLIPEncoderLayer`, with gradient checkpointing and an early stop after the deepest layer a
    caller needs (the LLaVA tower reads layer -2, so the last layer need not run)."""

    def __init__(self, config: EvaCLIPVisionConfig | EvaCLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([EvaCLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def _run_layer(self, layer: EvaCLIPEncoderLayer, hidden_states: torch.Tensor, *args: Any) -> tuple:
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and GradientCheckpointingLayer is None:  # newer layers checkpoint themselves
            # A reentrant function here comes from LLaVA enabling checkpointing on the whole model on transformers 4.x.
            checkpoint = getattr(self, "_gradient_checkpointing_func", None) or torch.utils.checkpoint.checkpoint
            return _non_reentrant(checkpoint)(layer.__call__, hidden_states, *args)
        return layer(hidden_states, *args)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        num_layers: Optional[int] = None,
        keep_hidden_states: Optional[Collection[int]] = None,
    ) -> Union[tuple, BaseModelOutput]:
        """`num_layers` runs only the first layers; `keep_hidden_states` keeps only those indices of `hidden_states`
        (0 = embeddings), as a dict index -> tensor, instead of the full tuple."""
        num_layers = len(self.layers) if num_layers is None else num_layers
        all_hidden_states: Any = () if output_hidden_states else None
        kept: dict[int, torch.Tensor] = {}
        all_attentions: Any = () if output_attentions else None
        hidden_states = inputs_embeds
        for index, layer in zip(range(num_layers), self.layers):  # not a slice: torch 2.5's non-strict export fails on it
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if keep_hidden_states is not None and index in keep_hidden_states:
                kept[index] = hidden_states
            hidden_states, attn_weights = self._run_layer(
                layer, hidden_states, attention_mask, rotary, output_attentions
            )
            if output_attentions:
                all_attentions += (attn_weights,)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if keep_hidden_states is not None and num_layers in keep_hidden_states:
            kept[num_layers] = hidden_states
        if keep_hidden_states is not None:
            all_hidden_states = kept
        if not return_dict:
            return tuple(v for v in (hidden_states, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


# --------------------------------------------------------------------------------------------------------------------
# Towers
# --------------------------------------------------------------------------------------------------------------------


def _resolve_flags(config: Any, output_attentions, output_hidden_states, return_dict) -> tuple[bool, bool, bool]:
    output_attentions = output_attentions if output_attentions is not None else config.output_attentions
    if isinstance(output_hidden_states, (int, list, tuple)) and not isinstance(output_hidden_states, bool):
        output_hidden_states = True  # transformers 5's LLaVA passes the index (or indices) it reads, 0 included
    output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
    if return_dict is None:  # the config's `use_return_dict` of the installed transformers
        torchscript = TORCHSCRIPT_RETURNS_TUPLES and bool(getattr(config, "torchscript", False))
        return_dict = getattr(config, "return_dict", True) and not torchscript
    return bool(output_attentions), bool(output_hidden_states), bool(return_dict)


class EvaCLIPVisionTransformer(nn.Module):
    """Embeddings, encoder, and CLS pooling through the final LayerNorm (`last_hidden_state` stays before it)."""

    def __init__(self, config: EvaCLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = EvaCLIPVisionEmbeddings(config)
        self.rotary_embedding = EvaCLIPRotaryEmbedding(config) if config.use_rope else None
        self.encoder = EvaCLIPEncoder(config)
        self.post_layernorm = build_norm(config, config.hidden_size)

    def check_pixel_values(self, pixel_values: Optional[torch.Tensor], interpolate_pos_encoding: bool) -> None:
        """Clear errors for inputs that would otherwise fail deep inside with a shape error."""
        config = self.config
        if pixel_values is None:
            raise ValueError("pixel_values is required: a float tensor [batch, channels, height, width].")
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point (the image processor's normalised output), got "
                             f"dtype {pixel_values.dtype}; pass image_processor(images, return_tensors='pt').")
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must have 4 dimensions [batch, {config.num_channels}, {config.image_size}, "
                f"{config.image_size}], got shape {tuple(pixel_values.shape)}."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values holds no images (batch size 0); pass at least one image.")
        if pixel_values.shape[1] != config.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels; this model expects {config.num_channels} "
                f"(shape [batch, {config.num_channels}, H, W])."
            )
        height, width = pixel_values.shape[-2:]
        if interpolate_pos_encoding:
            if height % config.patch_size or width % config.patch_size or min(height, width) < config.patch_size:
                raise ValueError(
                    f"With interpolate_pos_encoding=True the image size must be a positive multiple of the patch size "
                    f"({config.patch_size}); got {height}x{width}."
                )
        elif (height, width) != (config.image_size, config.image_size):
            raise ValueError(
                f"Input image size {height}x{width} does not match the model's {config.image_size}x"
                f"{config.image_size}; resize the image (the image processor does) or pass "
                f"interpolate_pos_encoding=True to run at another multiple of the patch size ({config.patch_size})."
            )

    def embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False):
        """Patch + position embeddings and the matching rotary table."""
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        rotary = None
        if self.rotary_embedding is not None:
            grid_h = pixel_values.shape[-2] // self.config.patch_size
            grid_w = pixel_values.shape[-1] // self.config.patch_size
            rotary = self.rotary_embedding(grid_h, grid_w, hidden_states.dtype)
        return hidden_states, rotary

    def forward(
        self,
        pixel_values: Optional[torch.FloatTensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
    ) -> Union[tuple, BaseModelOutputWithPooling]:
        output_attentions, output_hidden_states, return_dict = _resolve_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        hidden_states, rotary = self.embed(pixel_values, interpolate_pos_encoding)
        encoder_outputs = self.encoder(
            hidden_states,
            rotary=rotary,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        last_hidden_state = encoder_outputs.last_hidden_state
        pooled_output = self.post_layernorm(last_hidden_state[:, 0, :])
        if not return_dict:
            extra = tuple(v for v in (encoder_outputs.hidden_states, encoder_outputs.attentions) if v is not None)
            return (last_hidden_state, pooled_output) + extra
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled_output,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
        )

    def select_hidden_states(
        self, pixel_values: torch.Tensor, indices: Collection[int], interpolate_pos_encoding: bool = False
    ) -> dict[int, torch.Tensor]:
        """`hidden_states[i]` for each non-negative index i, running no layer past the deepest one asked for and
        keeping no other hidden state."""
        num_layers = max(indices)
        if min(indices) < 0 or num_layers > self.config.num_hidden_layers:
            raise ValueError(
                f"hidden-state indices must be in [0, {self.config.num_hidden_layers}], got {sorted(indices)}."
            )
        hidden_states, rotary = self.embed(pixel_values, interpolate_pos_encoding)
        outputs = self.encoder(  # a tuple, not a set: torch 2.1's dynamo traces membership in a tuple only
            hidden_states, rotary=rotary, num_layers=num_layers, keep_hidden_states=tuple(sorted(set(indices))),
            return_dict=True,
        )
        return outputs.hidden_states


def end_token_positions(input_ids: torch.Tensor, eos_token_id: Optional[int]) -> torch.Tensor:
    """Where each text is pooled: its first `eos_token_id`, as transformers' CLIP pools, so that tokens added after
    the vocabulary (`tokenizer.add_tokens` + `resize_token_embeddings`, textual inversion), whose ids exceed the end
    token's, are not taken for it. A row without one, an unset id, or CLIP's legacy `eos_token_id=2` keeps BAAI's and
    open_clip's `input_ids.argmax(-1)`, which is the first end token whenever the ids are the CLIP vocabulary's."""
    positions = input_ids.argmax(dim=-1)
    if eos_token_id is None or eos_token_id == 2:
        return positions
    is_end = input_ids == eos_token_id
    return torch.where(is_end.any(dim=-1), is_end.int().argmax(dim=-1), positions)


def _causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu_(1)[None, None]


def _flex_causal_mask(attention_mask: Optional[torch.Tensor], shape: torch.Size, device: torch.device) -> Any:
    """The text tower's causal + padding mask as flex_attention's own `BlockMask`, as transformers' models build it:
    given a dense mask, transformers 5's flex path indexes it element by element, which torch 2.14's compiled CPU
    kernel turns into heap corruption (the process aborts)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = shape
    kept = None if attention_mask is None else attention_mask.to(device=device) != 0

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        causal = kv <= q
        return causal if kept is None else causal & kept[b, kv]

    return create_block_mask(mask_mod, None if kept is None else batch, None, length, length, device=device)


class EvaCLIPTextTransformer(nn.Module):
    """Token + position embeddings, a causal encoder, the final LayerNorm and pooling at the first end token
    (`end_token_positions`)."""

    def __init__(self, config: EvaCLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = EvaCLIPTextEmbeddings(config)
        self.encoder = EvaCLIPEncoder(config)
        self.final_layer_norm = build_norm(config, config.hidden_size)

    def _check_inputs(
        self, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
    ) -> None:
        limit = self.config.max_position_embeddings
        if input_ids is None:
            raise ValueError("input_ids is required: a LongTensor [batch, seq_len] of token ids.")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex \
                or input_ids.dtype == torch.bool:
            kind = f"dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor of token ids (the tokenizer's output), got {kind}.")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}.")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids holds no tokens (shape {tuple(input_ids.shape)}); pass at least one text of at "
                             "least one token.")
        if input_ids.shape[-1] > limit:
            raise ValueError(
                f"input_ids has {input_ids.shape[-1]} tokens but the text tower has {limit} positions "
                f"(max_position_embeddings); truncate to at most {limit} tokens."
            )
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 (or int32) token ids, got dtype {input_ids.dtype}; "
                             "convert with input_ids.long().")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)}."
            )
        if position_ids is not None and (
            not isinstance(position_ids, torch.Tensor)
            or position_ids.dtype not in (torch.int64, torch.int32)
            or position_ids.ndim not in (1, 2)
            or position_ids.shape[-1] != input_ids.shape[-1]
            or (position_ids.ndim == 2 and position_ids.shape[0] not in (1, input_ids.shape[0]))
        ):
            kind = f"{position_ids.dtype} {tuple(position_ids.shape)}" if isinstance(position_ids, torch.Tensor) \
                else type(position_ids).__name__
            raise ValueError(f"position_ids must be an integer (int64) tensor of shape [1 or batch, seq_len] = "
                             f"[1 or {input_ids.shape[0]}, {input_ids.shape[-1]}], got {kind}.")
        # A value check syncs with the device and cannot be traced: eager only, so torch.compile(fullgraph=True),
        # torch.export and vmap still see a graph without data-dependent branches (an id out of range fails in the
        # embedding).
        if is_tracing():
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"input_ids holds ids in [{low}, {high}]; this text tower's vocabulary is "
                             f"[0, {self.config.vocab_size - 1}] (vocab_size {self.config.vocab_size}).")
        if position_ids is not None:
            low, high = int(position_ids.min()), int(position_ids.max())
            if low < 0 or high >= limit:
                raise ValueError(f"position_ids holds positions in [{low}, {high}]; this text tower has positions "
                                 f"[0, {limit - 1}] (max_position_embeddings {limit}).")
        # Positions count from the first column and pooling reads the first end token: a row that starts masked
        # (left padding) or whose first end token is masked (a padding token) would give another text's embedding.
        if attention_mask is not None:
            kept = attention_mask != 0
            ends = end_token_positions(input_ids, self.config.eos_token_id)
            pooled = kept.gather(1, ends.unsqueeze(1).to(kept.device)).squeeze(1)
            if bool((~kept[:, 0] & kept.any(dim=-1)).any()) or not bool(pooled.all()):
                raise ValueError("attention_mask masks the start of a text or its first end token (left padding?): "
                                 "the text tower reads absolute positions and pools at the first end token, so pad "
                                 "on the right (tokenizer.padding_side = 'right', the CLIP tokenizers' default).")
        # Without a mask the same left padding shows as a row that starts with the end token (the CLIP tokenizers'
        # pad) and holds other tokens: it would pool at position 0, one embedding for every such text.
        eos = self.config.eos_token_id
        if eos is not None and eos != 2:
            starts = input_ids[:, 0] == eos
            if bool((starts & (input_ids != eos).any(dim=-1)).any()):
                raise ValueError(f"input_ids has a row that starts with the end token ({eos}, the padding token) "
                                 "and holds text after it (left padding?): the text tower pools at the first end "
                                 "token and reads absolute positions, so every such text would get the same "
                                 "embedding; pad on the right (tokenizer.padding_side = 'right', the CLIP "
                                 "tokenizers' default).")

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[tuple, BaseModelOutputWithPooling]:
        output_attentions, output_hidden_states, return_dict = _resolve_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        self._check_inputs(input_ids, attention_mask, position_ids)
        hidden_states = self.embeddings(input_ids=input_ids, position_ids=position_ids)
        dtype, device = hidden_states.dtype, hidden_states.device
        if attention_kernel(self.config, output_attentions) == "flex_attention":
            mask = _flex_causal_mask(attention_mask, input_ids.shape, device)
        else:
            mask = _causal_mask(input_ids.shape[-1], dtype, device)
        if attention_mask is not None and isinstance(mask, torch.Tensor):
            padding = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
            mask = mask + padding
            mask = mask.clamp(min=torch.finfo(dtype).min)
        encoder_outputs = self.encoder(
            hidden_states,
            attention_mask=mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        last_hidden_state = self.final_layer_norm(encoder_outputs.last_hidden_state)
        eos_positions = end_token_positions(input_ids.to(device=device), self.config.eos_token_id)
        pooled_output = last_hidden_state[torch.arange(last_hidden_state.shape[0], device=device), eos_positions]
        if not return_dict:
            extra = tuple(v for v in (encoder_outputs.hidden_states, encoder_outputs.attentions) if v is not None)
            return (last_hidden_state, pooled_output) + extra
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled_output,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
        )


# --------------------------------------------------------------------------------------------------------------------
# Pretrained models
# --------------------------------------------------------------------------------------------------------------------


class EvaCLIPPreTrainedModel(PreTrainedModel):
    """Weight initialisation (CLIP-style scaled normals), checkpointing and attention-kernel support flags."""

    config_class = EvaCLIPConfig
    base_model_prefix = "evaclip"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn_2 = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True  # any function registered with transformers' `AttentionInterface`
    _no_split_modules = ["EvaCLIPEncoderLayer", "EvaCLIPVisionEmbeddings", "EvaCLIPTextEmbeddings"]
    _keys_to_ignore_on_load_unexpected = [r".*position_ids$"]

    def __init__(self, config: Any, *inputs: Any, **kwargs: Any) -> None:
        """Refuses another class's config up front (it would fail later on a missing attribute)."""
        expected = type(self).config_class
        if not isinstance(config, expected):
            hint = ""
            if isinstance(config, EvaCLIPConfig) and expected in (EvaCLIPVisionConfig, EvaCLIPTextConfig):
                hint = f" (pass config.{expected.base_config_key})"
            elif isinstance(config, (EvaCLIPVisionConfig, EvaCLIPTextConfig)) and expected is EvaCLIPConfig:
                hint = f" (wrap the tower's config: EvaCLIPConfig({config.base_config_key}=config.to_dict()))"
            raise ValueError(f"{type(self).__name__} takes an {expected.__name__}, got {type(config).__name__}{hint}.")
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """Lets transformers 5's `set_attn_implementation` switch kernels on a built model (its source heuristic
        misses our dispatch): `EvaCLIPAttention` reads `config._attn_implementation` at every call."""
        return True

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' loader; inside a bare `deepspeed.zero.Init` it is told that ZeRO-3 is on (see `zero.py`),
        so the checkpoint goes into the partitioned parameters instead of failing on their empty placeholders. Under
        ZeRO-3 a local safetensors dir is streamed into the partitioned model instead (`zero.streamed_from_pretrained`).
        Loads take turns (`_LOADING`)."""
        with _LOADING, transformers_zero3_context():
            streamed = _compat.zero3_from_pretrained
            model = streamed(cls, *args, **kwargs) if streamed is not None else None
            return model if model is not None else super().from_pretrained(*args, **kwargs)

    if not HAS_ACTIVATION_CHECKPOINTING:  # transformers 5 already defaults to non-reentrant (and deprecates this name)

        def gradient_checkpointing_enable(
            self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs: Any
        ) -> None:
            """Non-reentrant checkpointing unless asked otherwise, as on transformers 5: 4.x defaults to reentrant,
            which silently drops the gradients of trainable layers behind frozen patch embeddings."""
            if gradient_checkpointing_kwargs is None:
                gradient_checkpointing_kwargs = {"use_reentrant": False}
            super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = torch.utils.checkpoint.checkpoint,
        **kwargs: Any,
    ) -> None:
        """Reentrant checkpointing (`use_reentrant=True`, or 4.x's default) runs non-reentrant: our towers have no
        trainable module between the embeddings and the first layer (CLIP has `pre_layrnorm`), so with frozen
        embeddings (partial unfreezing, or PEFT without `enable_input_require_grads`) every vision layer silently got
        no gradient. Where transformers has `GradientCheckpointingLayer` (4.52+) the layers checkpoint themselves with
        this function; before, they go through `EvaCLIPEncoder._run_layer`, which does the same."""
        super()._set_gradient_checkpointing(
            enable=enable, gradient_checkpointing_func=_non_reentrant(gradient_checkpointing_func), **kwargs
        )

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        """transformers 5 skips, for code outside transformers, every module without parameters of its own (our
        attention, MLP and model-level heads), leaving them at torch's default or, after `from_pretrained`, at
        uninitialised memory. `_init_weights` uses transformers' initialisers, which never touch loaded tensors, so
        that shortcut is not needed: every module goes through it."""
        super()._initialize_weights(module)

    def _init_weights(self, module: nn.Module) -> None:
        config = self.config
        factor = getattr(config, "initializer_factor", 1.0)
        if isinstance(module, EvaCLIPTextEmbeddings):
            init.normal_(module.token_embedding.weight, std=factor * 0.02)
            init.normal_(module.position_embedding.weight, std=factor * 0.02)
        elif isinstance(module, EvaCLIPVisionEmbeddings):
            init.normal_(module.class_embedding, std=module.embed_dim**-0.5 * factor)
            init.normal_(module.patch_embedding.weight, std=module.config.initializer_range * factor)
            init.normal_(module.position_embedding.weight, std=module.config.initializer_range * factor)
            if module.patch_embedding.bias is not None:
                init.zeros_(module.patch_embedding.bias)
        elif isinstance(module, EvaCLIPAttention):
            tower = module.config
            in_proj_std = (module.embed_dim**-0.5) * ((2 * tower.num_hidden_layers) ** -0.5) * factor
            for projection in (module.q_proj, module.k_proj, module.v_proj):
                init.normal_(projection.weight, std=in_proj_std)
            init.normal_(module.out_proj.weight, std=(module.embed_dim**-0.5) * factor)
        elif isinstance(module, EvaCLIPMLP):
            tower = module.config
            in_proj_std = (tower.hidden_size**-0.5) * ((2 * tower.num_hidden_layers) ** -0.5) * factor
            fc_std = (2 * tower.hidden_size) ** -0.5 * factor
            init.normal_(module.fc1.weight, std=fc_std)
            if module.fc1_up is not None:
                init.normal_(module.fc1_up.weight, std=fc_std)
            init.normal_(module.fc2.weight, std=in_proj_std)
        elif isinstance(module, EvaCLIPEncoderLayer) and module.layer_scale1 is not None:
            value = float(module.self_attn.config.layer_scale_init_value)
            init.constant_(module.layer_scale1, value)
            init.constant_(module.layer_scale2, value)
        elif isinstance(module, EvaCLIPRotaryEmbedding):
            cos, sin = module.compute_table(module.grid_size, module.grid_size)
            init.copy_(module.cos, cos)
            init.copy_(module.sin, sin)
            module.reset_cache()
        elif isinstance(module, EvaCLIPModel):
            init.normal_(module.text_projection.weight, std=module.text_embed_dim**-0.5 * factor)
            init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5 * factor)
            init.constant_(module.logit_scale, config.logit_scale_init_value)
        elif isinstance(module, EvaCLIPVisionModelWithProjection):
            init.normal_(module.visual_projection.weight, std=config.hidden_size**-0.5 * factor)
        elif isinstance(module, EvaCLIPTextModelWithProjection):
            init.normal_(module.text_projection.weight, std=config.hidden_size**-0.5 * factor)
        elif isinstance(module, EvaCLIPForImageClassification) and isinstance(module.classifier, nn.Linear):
            init.normal_(module.classifier.weight, std=config.vision_config.hidden_size**-0.5 * factor)

        if isinstance(module, nn.LayerNorm):
            init.zeros_(module.bias)
            init.ones_(module.weight)
        if isinstance(module, EvaCLIPRMSNorm):
            init.ones_(module.weight)
        if isinstance(module, nn.Linear) and module.bias is not None:
            init.zeros_(module.bias)


_VISION_ONLY_IGNORES = [r"^text_model\.", r"^text_projection\.", r"^visual_projection\.", r"^logit_scale$", r".*position_ids$"]
_TEXT_ONLY_IGNORES = [r"^vision_model\.", r"^visual_projection\.", r"^text_projection\.", r"^logit_scale$", r".*position_ids$"]


class EvaCLIPVisionModel(EvaCLIPPreTrainedModel):
    """The EVA-CLIP vision tower without projection. Loads from a full `EvaCLIPModel` checkpoint too (LLaVA does)."""

    config_class = EvaCLIPVisionConfig
    main_input_name = "pixel_values"
    _no_split_modules = ["EvaCLIPEncoderLayer", "EvaCLIPVisionEmbeddings"]
    _keys_to_ignore_on_load_unexpected = _VISION_ONLY_IGNORES

    def __init__(self, config: EvaCLIPVisionConfig) -> None:
        super().__init__(config)
        self.vision_model = EvaCLIPVisionTransformer(config)
        self._build_head(config)
        self.post_init()

    def _build_head(self, config: EvaCLIPVisionConfig) -> None:
        """No head on the bare tower; `EvaCLIPVisionModelWithProjection` adds its projection here."""

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Swaps the patch convolution, as transformers 5's CLIPVisionModel allows (its generic setter cannot find
        ours under `vision_model.embeddings`)."""
        self.vision_model.embeddings.patch_embedding = value

    def forward(
        self,
        pixel_values: Optional[torch.FloatTensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Any,
    ) -> Union[tuple, BaseModelOutputWithPooling]:
        return self.vision_model(
            pixel_values=pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )


class EvaCLIPTextModel(EvaCLIPPreTrainedModel):
    """The EVA-CLIP text tower without projection."""

    config_class = EvaCLIPTextConfig
    _no_split_modules = ["EvaCLIPEncoderLayer", "EvaCLIPTextEmbeddings"]
    _keys_to_ignore_on_load_unexpected = _TEXT_ONLY_IGNORES

    def __init__(self, config: EvaCLIPTextConfig) -> None:
        super().__init__(config)
        self.text_model = EvaCLIPTextTransformer(config)
        self._build_head(config)
        self.post_init()

    def _build_head(self, config: EvaCLIPTextConfig) -> None:
        """No head on the bare tower; `EvaCLIPTextModelWithProjection` adds its projection here."""

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.embeddings.token_embedding = value

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[tuple, BaseModelOutputWithPooling]:
        return self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )


def _output_flags(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`output_attentions` / `output_hidden_states` out of `get_*_features`' kwargs: CLIPModel passes them to the
    tower, so on 5.x the returned output carries the hidden states and attentions asked for."""
    return {name: kwargs[name] for name in ("output_attentions", "output_hidden_states") if name in kwargs}


def _features(
    outputs: BaseModelOutputWithPooling, projection: nn.Linear, return_dict: Optional[bool]
) -> Union[torch.Tensor, tuple, BaseModelOutputWithPooling]:
    """What CLIPModel's `get_*_features` return on the installed transformers: on 5.x the tower's output with the
    projected embeddings as `pooler_output` (a tuple with `return_dict=False`), on 4.x the projected tensor."""
    projected = projection(outputs.pooler_output)
    if not FEATURES_RETURN_MODEL_OUTPUT:
        return projected
    outputs.pooler_output = projected
    return outputs.to_tuple() if return_dict is False else outputs


def _output_requires_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    """`enable_input_require_grads`' hook: an embedding output that autograd records, so a reentrant checkpoint of the
    layers behind a frozen embedding still reaches their trainable parameters."""
    output.requires_grad_(True)


def _inherit_attn_implementation(config: EvaCLIPConfig, towers: Sequence[Any]) -> None:
    """The towers take the top-level attention kernel on transformers 4.x, which sets it on the top config only. On
    5.x transformers sets it on each tower itself (per tower from `attn_implementation={"vision_config": ...,
    "text_config": ...}`, while the top config then falls back to sdpa), so only a tower with none is filled in."""
    requested = getattr(config, "_attn_implementation_internal", None)
    for tower in towers:
        own = getattr(tower, "_attn_implementation_internal", None)
        if requested is not None and (own is None or not SUB_CONFIGS_TAKE_ATTN_IMPLEMENTATION):
            tower._attn_implementation_internal = requested


class EvaCLIPModel(EvaCLIPPreTrainedModel):
    """Both towers, their projections (visual with a bias unless `projection_bias=False`, text without), a learnable
    temperature and the loss."""

    config_class = EvaCLIPConfig

    def __init__(self, config: EvaCLIPConfig) -> None:
        super().__init__(config)
        if not isinstance(config.text_config, EvaCLIPTextConfig):
            raise ValueError(f"config.text_config must be an EvaCLIPTextConfig, got {type(config.text_config).__name__}.")
        if not isinstance(config.vision_config, EvaCLIPVisionConfig):
            raise ValueError(
                f"config.vision_config must be an EvaCLIPVisionConfig, got {type(config.vision_config).__name__}."
            )
        text_config, vision_config = config.text_config, config.vision_config
        _inherit_attn_implementation(config, (text_config, vision_config))
        self.projection_dim = config.projection_dim
        self.text_embed_dim = text_config.hidden_size
        self.vision_embed_dim = vision_config.hidden_size
        self.text_model = EvaCLIPTextTransformer(text_config)
        self.vision_model = EvaCLIPVisionTransformer(vision_config)
        self.visual_projection = nn.Linear(
            self.vision_embed_dim, self.projection_dim, bias=vision_config.projection_bias
        )
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.embeddings.token_embedding = value

    def enable_input_require_grads(self) -> None:
        """Hooks both towers' input embeddings (token and patch), as transformers 5's CLIPModel does through its tower
        models. transformers hooks `get_input_embeddings()` only (the text one: our towers are plain modules), so
        with a frozen base under a reentrant checkpoint that `gradient_checkpointing_enable` does not set (torch's
        `checkpoint_wrapper`, DeepSpeed's activation checkpointing), every vision LoRA parameter got no gradient."""
        self.disable_input_require_grads()
        embeddings = (self.get_input_embeddings(), self.vision_model.embeddings.patch_embedding)
        self._require_grads_hooks = [module.register_forward_hook(_output_requires_grad) for module in embeddings]
        self._require_grads_hook = self._require_grads_hooks[0]  # the one hook's name on transformers 4.x

    def disable_input_require_grads(self) -> None:
        """Removes the hooks of `enable_input_require_grads` (transformers 4.x's removes only `_require_grads_hook`)."""
        for hook in getattr(self, "_require_grads_hooks", ()):
            hook.remove()
        self._require_grads_hooks = []
        self.__dict__.pop("_require_grads_hook", None)

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Embedding:
        """transformers 4.x records the new size as `config.vocab_size`; the text tower (its id check) and
        `from_pretrained` read `config.text_config.vocab_size`, which transformers 5 sets (`get_text_config()`)."""
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        self.config.text_config.vocab_size = self.get_input_embeddings().num_embeddings
        return embeddings

    def get_text_features(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Union[torch.FloatTensor, BaseModelOutputWithPooling]:
        """Projected (not normalised) text embeddings [batch, projection_dim], returned as the installed
        transformers' `CLIPModel.get_text_features` returns them (see `_features`)."""
        text_outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True,
            **_output_flags(kwargs),
        )
        return _features(text_outputs, self.text_projection, kwargs.get("return_dict"))

    def get_image_features(
        self, pixel_values: Optional[torch.FloatTensor] = None, interpolate_pos_encoding: bool = False, **kwargs: Any
    ) -> Union[torch.FloatTensor, BaseModelOutputWithPooling]:
        """Projected (not normalised) image embeddings [batch, projection_dim], returned as the installed
        transformers' `CLIPModel.get_image_features` returns them (see `_features`)."""
        vision_outputs = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True,
            **_output_flags(kwargs),
        )
        return _features(vision_outputs, self.visual_projection, kwargs.get("return_dict"))

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        return_loss: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Any,
    ) -> Union[tuple, EvaCLIPOutput]:
        output_attentions, output_hidden_states, return_dict = _resolve_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        if return_loss and all(isinstance(x, torch.Tensor) and x.ndim for x in (input_ids, pixel_values)) \
                and input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"return_loss=True needs matching image-text pairs: got {pixel_values.shape[0]} images and "
                             f"{input_ids.shape[0]} texts; the contrastive loss pairs image i with text i.")
        vision_outputs = self.vision_model(
            pixel_values=pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        text_outputs = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        image_embeds = self.visual_projection(vision_outputs.pooler_output)
        text_embeds = self.text_projection(text_outputs.pooler_output)
        image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
        logits_per_text = torch.matmul(text_embeds, image_embeds.t().to(text_embeds.device)) * self.logit_scale.exp()
        logits_per_image = logits_per_text.t()
        loss = clip_loss(logits_per_text) if return_loss else None
        if not return_dict:
            output = (
                logits_per_image,
                logits_per_text,
                text_embeds,
                image_embeds,
                text_outputs.to_tuple(),
                vision_outputs.to_tuple(),
            )
            return ((loss,) + output) if loss is not None else output
        return EvaCLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )


class EvaCLIPVisionModelWithProjection(EvaCLIPVisionModel):
    """Vision tower plus `visual_projection`: image embeddings in the shared space."""

    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale$"]

    def _build_head(self, config: EvaCLIPVisionConfig) -> None:
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=config.projection_bias)

    def forward(
        self,
        pixel_values: Optional[torch.FloatTensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Any,
    ) -> Union[tuple, EvaCLIPVisionModelOutput]:
        _, _, return_dict = _resolve_flags(self.config, output_attentions, output_hidden_states, return_dict)
        outputs = super().forward(
            pixel_values=pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        result = EvaCLIPVisionModelOutput(
            image_embeds=self.visual_projection(outputs.pooler_output),
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return result if return_dict else result.to_tuple()


class EvaCLIPTextModelWithProjection(EvaCLIPTextModel):
    """Text tower plus `text_projection`: text embeddings in the shared space."""

    _keys_to_ignore_on_load_unexpected = [r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$"]

    def _build_head(self, config: EvaCLIPTextConfig) -> None:
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[tuple, EvaCLIPTextModelOutput]:
        _, _, return_dict = _resolve_flags(self.config, output_attentions, output_hidden_states, return_dict)
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        result = EvaCLIPTextModelOutput(
            text_embeds=self.text_projection(outputs.pooler_output),
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return result if return_dict else result.to_tuple()


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: EvaCLIPConfig) -> torch.Tensor:
    """transformers' sequence/image-classification loss: the problem type (regression for one label, single-label
    for integer labels, multi-label otherwise) is inferred once and recorded on the config."""
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if config.problem_type == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze()) if num_labels == 1 else F.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


class EvaCLIPForImageClassification(EvaCLIPPreTrainedModel):
    """The vision tower with a linear classifier on its mean-pooled patch tokens (CLS excluded), as
    `CLIPForImageClassification`; `from_pretrained` of a full `EvaCLIPModel` dir loads the tower and starts the
    classifier from scratch."""

    main_input_name = "pixel_values"
    _no_split_modules = ["EvaCLIPEncoderLayer", "EvaCLIPVisionEmbeddings"]
    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^visual_projection\.",
                                          r"^logit_scale$", r".*position_ids$"]

    def __init__(self, config: EvaCLIPConfig) -> None:
        super().__init__(config)
        vision_config = config.vision_config
        _inherit_attn_implementation(config, (vision_config,))
        self.num_labels = config.num_labels
        self.vision_model = EvaCLIPVisionTransformer(vision_config)
        self.classifier = (
            nn.Linear(vision_config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Any,
    ) -> Union[tuple, ImageClassifierOutput]:
        _, _, return_dict = _resolve_flags(self.config, output_attentions, output_hidden_states, return_dict)
        outputs = self.vision_model(
            pixel_values=pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        logits = self.classifier(outputs.last_hidden_state[:, 1:, :].mean(dim=1))
        loss = _classification_loss(logits, labels, self.config) if labels is not None else None
        result = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return result if return_dict else result.to_tuple()


__all__ = [
    "EvaCLIPAttention",
    "EvaCLIPEncoder",
    "EvaCLIPEncoderLayer",
    "EvaCLIPForImageClassification",
    "EvaCLIPMLP",
    "EvaCLIPModel",
    "EvaCLIPOutput",
    "EvaCLIPPreTrainedModel",
    "EvaCLIPRotaryEmbedding",
    "EvaCLIPTextAttention",
    "EvaCLIPTextEmbeddings",
    "EvaCLIPTextModel",
    "EvaCLIPTextModelOutput",
    "EvaCLIPTextModelWithProjection",
    "EvaCLIPTextTransformer",
    "EvaCLIPVisionEmbeddings",
    "EvaCLIPVisionModel",
    "EvaCLIPVisionModelOutput",
    "EvaCLIPVisionModelWithProjection",
    "EvaCLIPVisionTransformer",
]
