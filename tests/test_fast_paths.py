"""The fast paths of the EVA-CLIP tower give the eager path's numbers, and the tower benchmark runs end to end.

The fast path is what LLaVA runs: sdpa, `select_hidden_states` (stops after the deepest selected layer and keeps only
the selected states), the per-grid RoPE table with an identity row for CLS applied as one pair swap (three passes), and
SwiGLU's two input matmuls writing into one row-aligned buffer for inference, and (bf16 / fp16 on CPU) every
inference matmul of 513-1023 rows split after 512. It is checked against the same weights
run the slow way (eager attention, every layer, every hidden state, SwiGLU as two module calls because grad is on) and
against timm's EVA-02, an independent implementation (CLS split off for RoPE, its own rotation, unfused SwiGLU).
Under torch.compile the aligned SwiGLU runs as the custom op `llava_evaclip::aligned_gated_linear`: checked with
torch.library.opcheck and gradcheck, against `silu(F.linear) * F.linear`, in the graphs dynamo captures (compiled
no-grad inference only, never in an exported program) and, compiled by inductor, against the eager module calls.
fp32 tolerance: 1e-5 absolute.
The benchmark is only smoke-tested (`--quick`): it must run and write valid results; no timing is asserted.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import FAMILY_FLAGS, needs_cpu_fp16, randomize as _randomize, tiny_vision_config
from llava_evaclip import EvaCLIPVisionModel
from llava_evaclip import modeling_evaclip
from llava_evaclip.modeling_evaclip import EvaCLIPMLP, apply_rotary

timm = pytest.importorskip("timm")
from timm.layers.pos_embed_sincos import apply_rot_embed  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from benchmarks import tower as bench  # noqa: E402

ATOL = 1e-5
AMX_PROBE = modeling_evaclip.cpu_has_amx  # the real probes; `avx512_cpu` below patches the dispatch
HALF_KERNELS = modeling_evaclip.cpu_half_kernels


@pytest.fixture(autouse=True)
def avx512_cpu(monkeypatch):
    """The CPU half-precision paths tuned for AVX-512 CPUs (row splits, MLP token blocks) step
    aside on AMX CPUs and where torch has only portable half-precision kernels (AVX2); these tests exercise them as an
    AVX-512 CPU runs them, whatever this machine has (oneDNN's fused ops still ask the real probe).
    `test_amx_cpus_take_whole_matmuls_fused_attention_and_whole_mlp` and
    `test_cpus_with_portable_half_kernels_run_matmuls_in_fp32` cover the other dispatches."""
    monkeypatch.setattr(modeling_evaclip, "cpu_half_kernels", lambda dtype: "avx512")


def _eager_twin(model: EvaCLIPVisionModel) -> EvaCLIPVisionModel:
    """The same parameters, its own config switched to eager attention."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    twin = copy.deepcopy(model, memo)
    twin.config._attn_implementation_internal = "eager"
    return twin


def _eager_states(model: EvaCLIPVisionModel, pixel_values: torch.Tensor, **kwargs) -> tuple[torch.Tensor, ...]:
    """Every hidden state the slow way: eager attention, all layers, grad on (so SwiGLU is not fused)."""
    twin = _eager_twin(model)
    with torch.enable_grad():
        states = twin(pixel_values, output_hidden_states=True, **kwargs).hidden_states
    return tuple(state.detach() for state in states)


def _tiny_eva02(**overrides) -> EvaCLIPVisionModel:
    torch.manual_seed(0)
    return _randomize(EvaCLIPVisionModel(tiny_vision_config("eva02", **overrides))).eval()


# --------------------------------------------------------------------------------------------------------------------
# RoPE and SwiGLU kernels
# --------------------------------------------------------------------------------------------------------------------


def test_cpu_fp32_inference_attention_gets_contiguous_heads(monkeypatch):
    """fp32 eager inference hands torch's sdpa contiguous [B, H, N, D] q, k and v (`CPU_FP32_CONTIGUOUS_ATTENTION`)
    and gives the strided views' numbers; grad, bf16 and the switch off keep the projections' transposed views."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        seen.append(tuple(t.is_contiguous() for t in (query, key, value)))
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    model = _tiny_eva02(num_hidden_layers=2)
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        contiguous = model(pixel_values, output_hidden_states=True).hidden_states
    assert seen == [(True, True, True)] * 2
    seen.clear()
    with torch.no_grad(), monkeypatch.context() as switch:
        switch.setattr(modeling_evaclip, "CPU_FP32_CONTIGUOUS_ATTENTION", False)
        strided = model(pixel_values, output_hidden_states=True).hidden_states
    assert seen == [(False, False, False)] * 2
    seen.clear()
    with torch.enable_grad():
        model(pixel_values)
    assert seen == [(False, False, False)] * 2
    seen.clear()
    monkeypatch.setattr(modeling_evaclip, "cpu_half_kernels", lambda dtype: "amx")  # half precision keeps the views
    with torch.no_grad():
        copy.deepcopy(model).bfloat16()(pixel_values.bfloat16())
    assert seen == [(False, False, False)] * 2
    reference = _eager_states(model, pixel_values)
    for got, views, expected in zip(contiguous, strided, reference):
        torch.testing.assert_close(got, views, atol=1e-6, rtol=0)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _pair_shared_table(length: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random table shaped like EVA's: both channels of a pair share one angle."""
    angles = (torch.rand(length, head_dim // 2) * 6.0).repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotary_matches_timm_rotation_on_strided_heads(dtype):
    """The pair-swap rotation equals timm's `x * cos + rot(x) * sin`, on the non-contiguous [B, H, N, D] views
    attention passes, on a view with an odd storage offset, and in its gradient."""
    torch.manual_seed(0)
    cos, sin = (table.to(dtype) for table in _pair_shared_table(17, 16))
    projected = torch.randn(2, 17, 4, 16, dtype=dtype)  # [B, N, H, D] as the projection leaves it
    query = projected.transpose(1, 2).requires_grad_()  # non-contiguous [B, H, N, D]
    expected = apply_rot_embed(query, sin, cos)
    rotated = apply_rotary(query, cos, sin)
    assert rotated.dtype == dtype
    torch.testing.assert_close(rotated, expected, atol=1e-6, rtol=0)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), query)
    (grad,) = torch.autograd.grad(rotated.square().sum(), query)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=0)

    shifted = torch.randn(2 * 4 * 17 * 16 + 1, dtype=dtype)[1:].view(2, 4, 17, 16)  # storage offset 1
    torch.testing.assert_close(apply_rotary(shifted, cos, sin), apply_rot_embed(shifted, sin, cos), atol=1e-6, rtol=0)


def test_rotary_in_bfloat16_matches_timm_rotation():
    """bf16: against timm's rotation of the same bf16 inputs in fp32."""
    torch.manual_seed(0)
    cos, sin = _pair_shared_table(17, 16)
    query = torch.randn(2, 17, 4, 16).transpose(1, 2).bfloat16()
    half = apply_rotary(query, cos.bfloat16(), sin.bfloat16())
    assert half.dtype == torch.bfloat16
    expected = apply_rot_embed(query.float(), sin.bfloat16().float(), cos.bfloat16().float())
    torch.testing.assert_close(half.float(), expected, atol=3e-2, rtol=2e-2)


def _projection_heads(batch: int, length: int, heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """q or k as the inference path holds them: [B, N, H * D] projection rows seen as [B, H, N, D]."""
    return torch.randn(batch, length, heads * head_dim, dtype=dtype).view(batch, length, heads, head_dim).transpose(1, 2)


def test_rotary_in_place_turns_pairs_as_timm_rotates_them_in_fp32():
    """fp32: the in-place rotation of the inference path's own q/k buffers (channel pairs turned as complex numbers)
    writes into the buffer it was given, at batch 1 and 3, and equals timm's rotation within one multiply-add's
    rounding."""
    torch.manual_seed(0)
    cos, sin = _pair_shared_table(17, 16)
    for batch in (1, 3):
        heads = _projection_heads(batch, 17, 4, 16, torch.float32)
        original = heads.clone()
        expected = apply_rot_embed(original.double(), sin.double(), cos.double())
        (rotated,) = modeling_evaclip.apply_rotary_((heads,), cos, sin)
        assert rotated is heads
        assert not torch.equal(heads, original)
        torch.testing.assert_close(heads.double(), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(heads, apply_rotary(original, cos, sin), atol=1e-6, rtol=0)
    # q and k as the attention rotates them: together, each as if alone
    query, key = _projection_heads(2, 17, 4, 16, torch.float32), _projection_heads(2, 17, 4, 16, torch.float32)
    expected = [apply_rot_embed(x.double(), sin.double(), cos.double()) for x in (query, key)]
    rotated = modeling_evaclip.apply_rotary_((query, key), cos, sin)
    assert rotated[0] is query and rotated[1] is key
    for got, want in zip(rotated, expected):
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_in_place_in_half_precision_rounds_once(dtype):
    """CPU half precision turns each image in fp32 and rounds once: the result is the fp64 rotation of the same
    half-precision inputs and tables, correctly rounded (all but a rare fp32 miss), so on average at least as close
    to it as the pair swap's two roundings (`apply_rotary`); at batch 1 and 3 (one fp32 buffer serves every image)."""
    torch.manual_seed(0)
    cos, sin = (table.to(dtype) for table in _pair_shared_table(17, 16))
    for batch in (1, 3):
        heads = _projection_heads(batch, 17, 4, 16, dtype)
        original = heads.clone()
        exact = apply_rot_embed(original.double(), sin.double(), cos.double())
        (rotated,) = modeling_evaclip.apply_rotary_((heads,), cos, sin)
        assert rotated is heads
        assert heads.dtype == dtype
        torch.testing.assert_close(heads, exact.to(dtype))  # torch's tolerances for the dtype
        correctly_rounded = (heads == exact.to(dtype)).double().mean().item()
        assert correctly_rounded > 0.999  # fp32 may miss a rounding boundary by an ulp of its own, very rarely
        swap_error = (apply_rotary(original, cos, sin).double() - exact).abs().mean()
        assert (heads.double() - exact).abs().mean() <= swap_error


def test_rotary_in_place_takes_the_pair_swap_where_pairs_cannot_be_turned():
    """Tables whose pair channels differ (not EVA's), and fp32 buffers with no complex view (odd storage offset), get
    the pair swap's bits, which timm's general rotation confirms; nothing is turned twice."""
    torch.manual_seed(0)
    cos, sin = _pair_shared_table(17, 16)
    cos_unshared = cos.clone()
    cos_unshared[:, 1] += 0.25
    for dtype, table in ((torch.float32, cos_unshared), (torch.bfloat16, cos_unshared.bfloat16())):
        heads = _projection_heads(2, 17, 4, 16, dtype)
        original, sin_d = heads.clone(), sin.to(dtype)
        modeling_evaclip.apply_rotary_((heads,), table, sin_d)
        assert torch.equal(heads, apply_rotary(original, table, sin_d))
        exact = apply_rot_embed(original.double(), sin_d.double(), table.double())
        torch.testing.assert_close(heads.double(), exact, atol=1e-6 if dtype == torch.float32 else 4e-2, rtol=0)
    shifted = torch.randn(2 * 17 * 64 + 1)[1:].view(2, 17, 4, 16).transpose(1, 2)  # storage offset 1
    original = shifted.clone()
    modeling_evaclip.apply_rotary_((shifted,), cos, sin)
    assert torch.equal(shifted, apply_rotary(original, cos, sin))
    torch.testing.assert_close(shifted, apply_rot_embed(original, sin, cos), atol=1e-6, rtol=0)


def test_inference_forward_runs_on_the_meta_device():
    """A shape-only forward (weights and pixels on the meta device, no grad) runs the inference path through and
    gives the real forward's shapes: nothing in it reads values (the RoPE pair check does, on CPU only)."""
    config = tiny_vision_config("eva02")
    with torch.no_grad():
        real = EvaCLIPVisionModel(config).eval()(torch.randn(2, 3, 28, 28), output_hidden_states=True)
        with torch.device("meta"):
            model = EvaCLIPVisionModel(config).eval()
        shaped = model(torch.empty(2, 3, 28, 28, device="meta"), output_hidden_states=True)
    assert shaped.last_hidden_state.is_meta and shaped.last_hidden_state.shape == real.last_hidden_state.shape
    assert [state.shape for state in shaped.hidden_states] == [state.shape for state in real.hidden_states]


def test_bf16_inference_mlp_takes_zero_tokens():
    """The MLP called directly with no tokens (the model refuses empty inputs before) returns an empty result, as
    `nn.Linear` does, instead of failing in the fused-bias matmul."""
    mlp = _tiny_eva02().to(torch.bfloat16).vision_model.encoder.layers[0].mlp
    with torch.no_grad():
        assert mlp._use_inference_path(torch.zeros(0, 5, 32).bfloat16())
        assert mlp(torch.zeros(0, 5, 32).bfloat16()).shape == (0, 5, 32)


def test_amx_probe_is_torchs():
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    assert AMX_PROBE() is (bool(probe()) if probe is not None else False)


def test_half_kernel_dispatch_follows_torchs_probes(monkeypatch):
    """bf16 runs on oneDNN's AMX or AVX-512 kernels where torch says oneDNN has bf16 kernels, fp16 where it says so for
    fp16; otherwise on torch's portable kernels."""
    for bf16, fp16, amx in itertools.product((False, True), repeat=3):
        monkeypatch.setattr(modeling_evaclip, "cpu_has_onednn_bf16", lambda: bf16)
        monkeypatch.setattr(modeling_evaclip, "cpu_has_onednn_fp16", lambda: fp16)
        monkeypatch.setattr(modeling_evaclip, "cpu_has_amx", lambda: amx)
        HALF_KERNELS.cache_clear()
        native = "amx" if amx else "avx512"
        assert (HALF_KERNELS(torch.bfloat16), HALF_KERNELS(torch.float16)) == (
            native if bf16 else "portable", native if fp16 else "portable")
    HALF_KERNELS.cache_clear()
    monkeypatch.undo()
    mkldnn = torch.ops.mkldnn
    bf16, fp16 = (bool(torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
                       and getattr(mkldnn, name, lambda: False)())
                  for name in ("_is_mkldnn_bf16_supported", "_is_mkldnn_fp16_supported"))
    assert (modeling_evaclip.cpu_has_onednn_bf16(), modeling_evaclip.cpu_has_onednn_fp16()) == (bf16, fp16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=needs_cpu_fp16)])
def test_cpus_with_portable_half_kernels_run_matmuls_in_fp32(monkeypatch, dtype):
    """Where torch has only portable kernels for a half-precision dtype (no oneDNN kernels: bf16 on AVX2), the
    inference matmuls run as one fp32 matmul rounded once: exactly `F.linear` in fp32 rounded to `dtype`, within half
    a unit in the last place of the fp64 result (plus the fp32 sum's error), never split; switched off they are torch's
    kernel's bits again."""
    monkeypatch.setattr(modeling_evaclip, "cpu_half_kernels", lambda dtype: "portable")
    monkeypatch.setattr(modeling_evaclip, "cpu_has_onednn_bf16", lambda: False)
    monkeypatch.setattr(modeling_evaclip, "CPU_HALF_GEMM_ROWS", 10)
    torch.manual_seed(0)
    rows, weight, bias = torch.randn(300, 96), torch.randn(85, 96) / 10, torch.randn(85)
    exact = F.linear(rows.to(dtype).double(), weight.to(dtype).double(), bias.to(dtype).double())
    rows, weight, bias = rows.to(dtype), weight.to(dtype), bias.to(dtype)
    gemm, outputs = modeling_evaclip._gemm_into, []
    monkeypatch.setattr(modeling_evaclip, "_gemm_into", lambda *args: outputs.append(args[-1]) or gemm(*args))
    for layer_bias in (bias, None):
        out = torch.empty(300, 85, dtype=dtype)
        with torch.profiler.profile(record_shapes=True) as profile:
            modeling_evaclip._addmm_into(rows, weight, layer_bias, out)
        matmuls = [event for event in profile.events() if event.name in ("aten::addmm", "aten::mm")]
        row_operands = [event.input_shapes[0 if event.name == "aten::mm" else 1] for event in matmuls]
        assert row_operands == [[300, 96]]  # one matmul, not 30 blocks of 10 rows
        # into fp32 rows that start on cache lines (85 columns would leave them misaligned, ~30% of an AMD GEMM)
        wide_out = outputs.pop()
        assert wide_out.dtype == torch.float32 and wide_out.stride() == (96, 1) and wide_out.data_ptr() % 64 == 0
        wide = F.linear(rows.float(), weight.float(), None if layer_bias is None else layer_bias.float())
        assert torch.equal(out, wide.to(dtype))
    assert modeling_evaclip._half_matmul_in_fp32(rows) and not modeling_evaclip._half_matmul_in_fp32(rows.float())
    # rounded once from an fp32 sum: within half a unit in the last place of `dtype` of the fp64 result, plus the fp32
    # accumulation's own error bound (96 products: 96 * 2**-24 of the sum of their magnitudes)
    out = torch.empty(300, 85, dtype=dtype)
    modeling_evaclip._addmm_into(rows, weight, bias, out)
    _, exponent = torch.frexp(exact)
    half_ulp = torch.ldexp(torch.ones_like(exact), exponent - (8 if dtype == torch.bfloat16 else 11) - 1)
    magnitude = F.linear(rows.double().abs(), weight.double().abs(), bias.double().abs())
    assert ((out.double() - exact).abs() <= half_ulp + 96 * 2**-24 * magnitude).all()
    monkeypatch.setattr(modeling_evaclip, "CPU_HALF_MATMULS_IN_FP32", False)
    modeling_evaclip._addmm_into(rows, weight, bias, out)
    assert torch.equal(out, F.linear(rows, weight, bias))


def test_amx_cpus_take_whole_matmuls_fused_attention_and_whole_mlp(monkeypatch):
    """On an AMX CPU the AVX-512 paths step aside: a 34-row bf16 matmul runs whole even below the split point, sdpa
    takes torch's fused kernel, and the MLP runs the batch as one block whatever `INFERENCE_MLP_BLOCK_BYTES` says,
    with the same results as the AVX-512 paths (within bf16 rounding)."""
    monkeypatch.setattr(modeling_evaclip, "CPU_HALF_GEMM_ROWS", 20)
    model = _tiny_eva02(intermediate_size=43).to(torch.bfloat16)
    layer = model.vision_model.encoder.layers[0]
    tokens = torch.randn(2, 17, 32).bfloat16()
    rows = tokens.reshape(-1, 32)
    monkeypatch.setattr(modeling_evaclip, "INFERENCE_MLP_BLOCK_BYTES", 3 * 43 * 2 * 2)  # 3-token blocks
    with torch.no_grad():
        assert len(modeling_evaclip._gemm_row_blocks(rows)) == 2
        avx512_mlp_calls = _matmul_calls(lambda: layer.mlp(tokens), width=32)
        avx512 = layer(tokens)[0]
        monkeypatch.setattr(modeling_evaclip, "cpu_half_kernels", lambda dtype: "amx")
        assert modeling_evaclip._gemm_row_blocks(rows) == [slice(0, 34)]
        assert modeling_evaclip._gemm_row_blocks(rows.float()) == [slice(0, 34)]
        amx_mlp_calls = _matmul_calls(lambda: layer.mlp(tokens), width=32)
        amx = layer(tokens)[0]
        exact = copy.deepcopy(layer).double()(tokens.double())[0]
    assert (avx512_mlp_calls, amx_mlp_calls) == (3 * 12, 3)  # gate, up, fc2 per 3-token block (2 x 17 = 12 blocks)
    errors = _relative_error(amx, exact), _relative_error(avx512, exact)
    assert max(errors) < 2**-7, errors  # both ~1 bf16 unit roundoff (2**-8) from the fp64 layer


@pytest.mark.parametrize("kernels", ["avx512", "amx", "portable"])
def test_sdpa_is_torchs_fused_attention_on_every_cpu(monkeypatch, kernels):
    """bf16 inference attention is torch's fused kernel whatever the CPU (what timm's EVA runs): bit for bit."""
    monkeypatch.setattr(modeling_evaclip, "cpu_half_kernels", lambda dtype: kernels)
    query, key, value = (torch.randn(1, 2, 5, 8).bfloat16() for _ in range(3))
    with torch.no_grad():
        out, _ = modeling_evaclip.sdpa_attention(nn.Module(), query, key, value, None, 0.5)
    expected = F.scaled_dot_product_attention(query, key, value, scale=0.5).transpose(1, 2)  # [B, N, H, D]
    assert torch.equal(out.contiguous(), expected.contiguous())


def _swiglu_reference(mlp: EvaCLIPMLP, x: torch.Tensor) -> torch.Tensor:
    hidden = F.silu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)) * F.linear(x, mlp.fc1_up.weight, mlp.fc1_up.bias)
    return mlp.fc2(mlp.ffn_ln(hidden))


def _relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).norm() / exact.norm()).item()


def _assert_as_exact(got: torch.Tensor, baseline: torch.Tensor, exact: torch.Tensor) -> None:
    """`got` (a fused bf16 path, which rounds fewer intermediates) is no farther from the fp64 result `exact` than
    `baseline` (the module calls in bf16)."""
    assert got.shape == baseline.shape == exact.shape and got.dtype == baseline.dtype
    assert _relative_error(got, exact) <= _relative_error(baseline, exact), (
        _relative_error(got, exact), _relative_error(baseline, exact))


@pytest.mark.parametrize("intermediate_size", [64, 43])  # 43: rows padded to 48 floats, as EVA02-L's 2730 to 2736
def test_aligned_swiglu_equals_two_matmuls_and_stays_out_of_training(intermediate_size):
    torch.manual_seed(0)
    mlp = _randomize(EvaCLIPMLP(tiny_vision_config("eva02", intermediate_size=intermediate_size)))
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        expected = _swiglu_reference(mlp, x)
        assert mlp._use_inference_path(x)
        torch.testing.assert_close(mlp(x), expected, atol=ATOL, rtol=0)
        half = copy.deepcopy(mlp).to(torch.bfloat16)
        assert half._use_inference_path(x.bfloat16())
        exact = _swiglu_reference(copy.deepcopy(mlp).double(), x.double())
        _assert_as_exact(half(x.bfloat16()), _swiglu_reference(half, x.bfloat16()), exact)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not mlp._use_inference_path(x)  # out= matmuls are not autocast
        assert not mlp._use_inference_path(x.double())  # weights in another dtype keep the module calls
        mlp.fc1.bias = None  # a bias-free projection takes the plain matmul
        assert mlp._use_inference_path(x)
        torch.testing.assert_close(mlp(x), _swiglu_reference(mlp, x), atol=ATOL, rtol=0)

    # with grad on the two layers run as modules: gradients reach both weights, equal to the reference ones
    assert not mlp._use_inference_path(x)
    mlp(x).square().sum().backward()
    got = [mlp.fc1.weight.grad.clone(), mlp.fc1_up.weight.grad.clone()]
    mlp.zero_grad()
    _swiglu_reference(mlp, x).square().sum().backward()
    torch.testing.assert_close(got, [mlp.fc1.weight.grad, mlp.fc1_up.weight.grad], atol=ATOL, rtol=0)

    # hooks (adapters, profilers) and ZeRO-3 partitioned weights keep the module calls
    calls = []
    handle = mlp.fc1_up.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), _swiglu_reference(mlp, x), atol=ATOL, rtol=0)
    handle.remove()
    assert calls == [1]
    mlp.fc1.weight.ds_id = 0  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    with torch.no_grad():
        assert not mlp._use_inference_path(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_tokens", [3, None])
@pytest.mark.parametrize("family", ["eva02", "eva01"])
def test_inference_mlp_in_token_blocks_equals_the_module_calls(monkeypatch, family, block_tokens, dtype):
    """Blocks of 3 tokens over 2 x 17 (the last block short), or one block (fc2 into a new tensor), for SwiGLU +
    sub-LN and for the plain GELU MLP; in bf16 the direct matmuls give the module calls' bits, except the fused
    SwiGLU, which is at least as exact."""
    torch.manual_seed(0)
    mlp = _randomize(EvaCLIPMLP(tiny_vision_config(family, intermediate_size=43))).to(dtype)
    x = torch.randn(2, 17, 32).to(dtype)
    hidden_bytes = 43 * x.element_size() * (2 if family == "eva02" else 1)
    if block_tokens is not None:
        monkeypatch.setattr(modeling_evaclip, "INFERENCE_MLP_BLOCK_BYTES", block_tokens * hidden_bytes)
    with torch.enable_grad():
        expected = mlp(x).detach()  # grad on: the module calls
    calls = []
    mlp.fc2.register_forward_pre_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected, atol=ATOL, rtol=0)  # the hook makes it take module calls
        assert calls == [1]
        mlp.fc2._forward_pre_hooks.clear()
        assert mlp._use_inference_path(x)
        got = mlp(x)
        if family == "eva02" and dtype == torch.bfloat16:  # `_fused_swiglu`; the separate passes give the bits
            monkeypatch.setattr(modeling_evaclip, "CPU_BF16_FUSED_SWIGLU", False)
            unfused = mlp(x)
            exact = copy.deepcopy(mlp).double()(x.double())
    assert got.shape == expected.shape and got.is_contiguous()
    if family == "eva02" and dtype == torch.bfloat16:
        assert torch.equal(unfused, expected)
        _assert_as_exact(got, expected, exact)
    elif dtype == torch.bfloat16:
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_aligned_swiglu_sees_weight_updates():
    """No stale copy: the matmuls read the parameters themselves on every call."""
    torch.manual_seed(0)
    mlp = _randomize(EvaCLIPMLP(tiny_vision_config("eva02", intermediate_size=43)))
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        before = mlp(x)
        mlp.fc1_up.weight.mul_(-1.5)
        mlp.load_state_dict({**mlp.state_dict(), "fc1.bias": mlp.fc1.bias + 0.3})
        after = mlp(x)
        torch.testing.assert_close(after, _swiglu_reference(mlp, x), atol=ATOL, rtol=0)
    assert (after - before).abs().max() > 1e-2


def _matmul_calls(fn, width: int | None = None) -> int:
    """How many matmul kernels (`aten::addmm` / `aten::mm`) `fn()` runs; with `width`, only those whose second
    operand has a dimension of that size (the projections of a model that wide, not the attention's per-head
    matmuls)."""
    with torch.profiler.profile(record_shapes=width is not None) as profile:
        fn()
    calls = [event for event in profile.events() if event.name in ("aten::addmm", "aten::mm", FUSED_LINEAR)]
    if width is None:
        return len(calls)
    return sum(width in _weight_shape(event) for event in calls)


def _weight_shape(event) -> list[int]:
    """The weight's (second operand's) shape in a profiled matmul: after the bias of `addmm`, after `other` in the
    fused linear's binary overload (X, other, W, B, attr)."""
    binary = event.name == FUSED_LINEAR and len(event.input_shapes) == 5
    return event.input_shapes[2 if event.name == "aten::addmm" or binary else 1]


FUSED_LINEAR = "mkldnn::_linear_pointwise"  # `_fused_bias_linear`: oneDNN's linear with the bias in its epilogue
ONEDNN_BF16 = modeling_evaclip.cpu_has_onednn_bf16()
NO_ONEDNN_BF16 = "oneDNN has no bf16 kernels for this CPU (AVX2 only), or this torch has no oneDNN linear"


def test_onednn_bf16_probe_is_torchs():
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    usable = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    assert ONEDNN_BF16 is bool(usable and probe is not None and probe())


def test_cpus_without_onednn_bf16_keep_addmm(monkeypatch):
    """On a CPU oneDNN has no bf16 kernels for (AVX2 only: its linear refuses bf16 there), the fused-bias linear and
    the fused SwiGLU step aside and bf16 inference gives the bits of the module calls, through `addmm` alone."""
    monkeypatch.setattr(modeling_evaclip, "cpu_has_onednn_bf16", lambda: False)
    model = _tiny_eva02(intermediate_size=43).to(torch.bfloat16)
    pixel_values = torch.randn(2, 3, 28, 28).bfloat16()
    rows = torch.randn(34, 32).bfloat16()
    mlp = model.vision_model.encoder.layers[0].mlp
    with torch.no_grad():
        assert modeling_evaclip._fused_bias_linear(rows, mlp.fc1.weight, mlp.fc1.bias) is None
        gate_up = (mlp.fc1.weight, mlp.fc1.bias, mlp.fc1_up.weight, mlp.fc1_up.bias)
        assert modeling_evaclip._fused_swiglu(rows, *gate_up) is None
        with torch.profiler.profile() as profile:
            got = model(pixel_values, output_hidden_states=True).hidden_states
        monkeypatch.setattr(modeling_evaclip, "CPU_BF16_FUSED_BIAS", False)
        monkeypatch.setattr(modeling_evaclip, "CPU_BF16_FUSED_SWIGLU", False)
        expected = model(pixel_values, output_hidden_states=True).hidden_states
    assert not any(event.name == FUSED_LINEAR for event in profile.events())
    for state, reference in zip(got, expected, strict=True):
        assert torch.equal(state, reference)


@pytest.mark.parametrize("rows", [34, 2100])  # one block: below CPU_HALF_GEMM_ROWS and above twice it
def test_fused_bias_linear_gives_addmm_bits_and_steps_aside_where_it_must(monkeypatch, rows):
    """CPU bf16 matmuls into new tensors take oneDNN's linear with the bias in its epilogue, split ones block by
    block: the bits of `F.linear` (addmm); fp32, bias-free layers, the switch off and a torch without oneDNN keep
    `addmm`."""
    if not ONEDNN_BF16:
        pytest.skip(NO_ONEDNN_BF16)
    torch.manual_seed(0)
    layer = nn.Linear(64, 48).bfloat16()
    x = torch.randn(rows, 64).bfloat16()
    with torch.no_grad():
        expected = F.linear(x, layer.weight, layer.bias)
        fused = modeling_evaclip._fused_bias_linear(x, layer.weight, layer.bias)
        assert fused is not None and torch.equal(fused, expected)
        assert _matmul_calls(lambda: modeling_evaclip._linear_rows(x, layer)) == 1
        assert torch.equal(modeling_evaclip._linear_rows(x, layer), expected)
        assert modeling_evaclip._fused_bias_linear(x.float(), layer.weight.float(), layer.bias.float()) is None
        assert modeling_evaclip._fused_bias_linear(x, layer.weight, None) is None
        # strided rows, weight or bias (which oneDNN's linear refuses) keep addmm
        strided_rows, strided_weight, strided_bias = (
            torch.stack((tensor, tensor), dim=-1).flatten(-2)[..., ::2] for tensor in (x, layer.weight, layer.bias)
        )
        assert not strided_rows.is_contiguous() and torch.equal(strided_rows, x)
        for args in ((strided_rows, layer.weight, layer.bias), (x, strided_weight, layer.bias),
                     (x, layer.weight, strided_bias)):
            assert modeling_evaclip._fused_bias_linear(*args) is None
        assert torch.equal(modeling_evaclip._linear_rows(strided_rows, layer), expected)
        layer.bias = nn.Parameter(strided_bias)
        assert torch.equal(modeling_evaclip._linear_rows(x, layer), expected)
        monkeypatch.setattr(modeling_evaclip, "CPU_HALF_GEMM_ROWS", rows // 2 + 1)  # now split in two
        assert _matmul_calls(lambda: modeling_evaclip._linear_rows(x, layer)) == 2
        assert torch.equal(modeling_evaclip._linear_rows(x, layer), expected)
        monkeypatch.undo()
        for switch_off in (
            lambda: monkeypatch.setattr(modeling_evaclip, "CPU_BF16_FUSED_BIAS", False),
            lambda: monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False),
        ):
            switch_off()
            assert modeling_evaclip._fused_bias_linear(x, layer.weight, layer.bias) is None
            assert torch.equal(modeling_evaclip._linear_rows(x, layer), expected)
            monkeypatch.undo()


@pytest.mark.parametrize("rows", [34, 2100])  # one block: below CPU_HALF_GEMM_ROWS and above twice it
def test_fused_swiglu_rounds_once_and_steps_aside_where_it_must(monkeypatch, rows):
    """CPU bf16 SwiGLU with the SiLU and the gating multiply in oneDNN's epilogues: no separate pass, each product
    rounded to bf16 once (the gate after its SiLU, the output after the multiply), never farther from fp64 than the
    module calls, the same bits when split in row blocks; fp32, strided inputs, the switch off and a torch without
    oneDNN get None (the caller's separate passes)."""
    if not ONEDNN_BF16:
        pytest.skip(NO_ONEDNN_BF16)
    torch.manual_seed(0)
    x, gate_weight, gate_bias, up_weight, up_bias = (
        tensor.bfloat16()
        for tensor in (torch.randn(rows, 64), torch.randn(48, 64) / 8, torch.randn(48), torch.randn(48, 64) / 8,
                       torch.randn(48))
    )
    args = (x, gate_weight, gate_bias, up_weight, up_bias)
    with torch.no_grad():
        with torch.profiler.profile() as profile:
            fused = modeling_evaclip._fused_swiglu(*args)
        names = {event.name for event in profile.events()}
        assert FUSED_LINEAR in names and not names & {"aten::silu", "aten::mul", "aten::mul_", "aten::addmm"}
        gate = F.silu(F.linear(x.float(), gate_weight.float(), gate_bias.float())).bfloat16()
        once = (F.linear(x.float(), up_weight.float(), up_bias.float()) * gate.float()).bfloat16()
        torch.testing.assert_close(fused, once)  # bf16 tolerances: the fp32 sums run in another order
        exact = _gated_reference(*(tensor.double() for tensor in args))
        _assert_as_exact(fused, _gated_reference(*args), exact)
        monkeypatch.setattr(modeling_evaclip, "CPU_HALF_GEMM_ROWS", rows // 2 + 1)  # split in two (AVX-512 CPUs)
        assert len(modeling_evaclip._gemm_row_blocks(x)) == 2
        assert torch.equal(modeling_evaclip._fused_swiglu(*args), fused)
        assert modeling_evaclip._fused_swiglu(*(tensor.float() for tensor in args)) is None
        strided = torch.stack((x, x), dim=-1).flatten(-2)[..., ::2]
        assert torch.equal(strided, x) and modeling_evaclip._fused_swiglu(strided, *args[1:]) is None
        monkeypatch.setattr(modeling_evaclip, "CPU_BF16_FUSED_SWIGLU", False)
        assert modeling_evaclip._fused_swiglu(*args) is None
        monkeypatch.setattr(modeling_evaclip, "CPU_BF16_FUSED_SWIGLU", True)
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
        assert modeling_evaclip._fused_swiglu(*args) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=needs_cpu_fp16)])
@pytest.mark.parametrize("bias", [True, False])
def test_half_precision_matmuls_split_in_row_blocks_equal_one_matmul(monkeypatch, dtype, bias):
    """Each output row is computed alone: 17 rows split after 10 give exactly `F.linear`'s bits; 17 rows run whole
    once the split point is below half of them, and so does fp32."""
    torch.manual_seed(0)
    rows, weight = torch.randn(17, 24, dtype=dtype), torch.randn(40, 24, dtype=dtype)
    bias_tensor = torch.randn(40, dtype=dtype) if bias else None
    out = torch.empty(17, 40, dtype=dtype)
    monkeypatch.setattr(modeling_evaclip, "CPU_HALF_GEMM_ROWS", 10)
    assert _matmul_calls(lambda: modeling_evaclip._addmm_into(rows, weight, bias_tensor, out)) == 2
    assert torch.equal(out, F.linear(rows, weight, bias_tensor))
    fp32 = torch.empty(17, 40)
    assert _matmul_calls(lambda: modeling_evaclip._addmm_into(rows.float(), weight.float(), None, fp32)) == 1
    monkeypatch.setattr(modeling_evaclip, "CPU_HALF_GEMM_ROWS", 8)
    out.zero_()
    assert _matmul_calls(lambda: modeling_evaclip._addmm_into(rows, weight, bias_tensor, out)) == 1
    assert torch.equal(out, F.linear(rows, weight, bias_tensor))


def test_bf16_tower_with_split_matmuls_equals_whole_matmuls(monkeypatch):
    """The EVA-02 tower in bf16 inference with every matmul (attention projections and MLP over 2 x 17 tokens)
    split after 20 rows gives every hidden state bit for bit as with each matmul whole, and really splits."""
    model = _tiny_eva02().to(torch.bfloat16)
    pixel_values = torch.randn(2, 3, 28, 28).bfloat16()
    tokens = torch.randn(2, 17, 32).bfloat16()
    layer = model.vision_model.encoder.layers[0]
    with torch.no_grad():
        monkeypatch.setattr(modeling_evaclip, "CPU_HALF_GEMM_ROWS", 1 << 40)
        expected = model(pixel_values, output_hidden_states=True).hidden_states
        whole_calls = _matmul_calls(lambda: layer(tokens), width=32)
        monkeypatch.setattr(modeling_evaclip, "CPU_HALF_GEMM_ROWS", 20)
        got = model(pixel_values, output_hidden_states=True).hidden_states
        split_calls = _matmul_calls(lambda: layer(tokens), width=32)
    assert (whole_calls, split_calls) == (7, 2 * 7)  # q, k, v, out, fc1, fc1_up, fc2; 34 rows as 20 + 14
    assert len(got) == len(expected) == 4
    for state, reference in zip(got, expected):
        assert torch.equal(state, reference)


def test_bf16_tower_with_fused_bias_linears_equals_addmm(monkeypatch):
    """The EVA-02 tower in bf16 inference, its whole matmuls through oneDNN's fused-bias linear, gives every hidden
    state bit for bit as with `addmm` (itself checked against timm above), and really takes the fused op."""
    if not ONEDNN_BF16:
        pytest.skip(NO_ONEDNN_BF16)
    model = _tiny_eva02().to(torch.bfloat16)
    pixel_values = torch.randn(2, 3, 28, 28).bfloat16()
    with torch.no_grad():
        monkeypatch.setattr(modeling_evaclip, "CPU_BF16_FUSED_BIAS", False)
        expected = model(pixel_values, output_hidden_states=True).hidden_states
        monkeypatch.setattr(modeling_evaclip, "CPU_BF16_FUSED_BIAS", True)
        with torch.profiler.profile() as profile:
            got = model(pixel_values, output_hidden_states=True).hidden_states
    fused = sum(event.name == FUSED_LINEAR for event in profile.events())
    assert fused == 6 * model.config.num_hidden_layers  # q, v, out, fc1, fc1_up, fc2 per layer (k has no bias)
    for state, reference in zip(got, expected, strict=True):
        assert torch.equal(state, reference)


def test_attention_projections_keep_module_calls_for_hooks_offload_zero3_and_grad():
    """The attention projections take the direct matmuls only where the MLP does: a hooked layer (adapters,
    profilers), one that accelerate manages (`_hf_hook`), a ZeRO-3 partitioned weight, grad or autocast keep the
    module calls, and the hook sees the call."""
    model = _tiny_eva02()
    attention = model.vision_model.encoder.layers[0].self_attn
    x = torch.randn(1, 5, 32)
    expected = attention(x)[0].detach()
    with torch.no_grad():
        assert modeling_evaclip.plain_inference_linears(x, (attention.q_proj, attention.out_proj))
        calls = []
        handle = attention.k_proj.register_forward_hook(lambda *args: calls.append(1))
        torch.testing.assert_close(attention(x)[0], expected, atol=ATOL, rtol=0)
        assert calls == [1]
        handle.remove()
        attention.v_proj._hf_hook = object()
        assert not modeling_evaclip.plain_inference_linears(x, (attention.v_proj,))
        del attention.v_proj._hf_hook
        attention.out_proj.weight.ds_id = 0  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
        assert not modeling_evaclip.plain_inference_linears(x, (attention.out_proj,))
        del attention.out_proj.weight.ds_id
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not modeling_evaclip.plain_inference_linears(x, (attention.q_proj,))
        torch.testing.assert_close(attention(x)[0], expected, atol=ATOL, rtol=0)
    assert not modeling_evaclip.plain_inference_linears(x, (attention.q_proj,))  # grad on


# --------------------------------------------------------------------------------------------------------------------
# Compiled inference: SwiGLU's aligned matmuls as the custom op `llava_evaclip::aligned_gated_linear`
# --------------------------------------------------------------------------------------------------------------------

needs_custom_op = pytest.mark.skipif(modeling_evaclip.aligned_gated_linear is None, reason="torch < 2.4")


def _dynamo_tells_compile_from_export() -> bool:
    """Whether `torch.compiler.is_exporting()` is False under a plain torch.compile. torch 2.4 / 2.5 lack it, and the
    dynamo of torch 2.6-2.11 (at least; 2.14 tells them apart) folds it to True under any compile; the model then
    keeps the aligned op out of compiled graphs too (the conservative side: a program it leaves must stay aten-only)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    if modeling_evaclip.aligned_gated_linear is None or is_exporting is None:
        return False
    torch._dynamo.reset()
    try:
        folded = torch.compile(lambda x: x + int(torch.compiler.is_exporting()), backend="eager", fullgraph=True)
        return bool(folded(torch.zeros(1)).item() == 0)
    finally:
        torch._dynamo.reset()


needs_compiled_custom_op = pytest.mark.skipif(
    not _dynamo_tells_compile_from_export(),
    reason="this torch cannot tell torch.export from torch.compile inside compiled code (no "
           "torch.compiler.is_exporting before 2.6; dynamo folds it to True in 2.6-2.11): compiled code keeps the "
           "module calls",
)
OP_NAME = "llava_evaclip.aligned_gated_linear"


def _gated_inputs(dtype: torch.dtype, inner: int = 43, bias: bool = True, shape=(2, 5), requires_grad=False):
    torch.manual_seed(0)
    x = torch.randn(*shape, 16, dtype=dtype)
    tensors = [x, torch.randn(inner, 16, dtype=dtype), torch.randn(inner, dtype=dtype) if bias else None,
               torch.randn(inner, 16, dtype=dtype), torch.randn(inner, dtype=dtype) if bias else None]
    return [t.requires_grad_(requires_grad) if t is not None else None for t in tensors]


def _gated_reference(x, gate_weight, gate_bias, up_weight, up_bias):
    return F.silu(F.linear(x, gate_weight, gate_bias)) * F.linear(x, up_weight, up_bias)


@needs_custom_op
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7,), (2, 5)], ids=["rows", "batch"])
def test_aligned_gated_linear_op_passes_opcheck_and_equals_the_reference(bias, shape):
    """torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch with dynamic shapes) and the
    values against `silu(F.linear) * F.linear`, with 43 outputs (rows padded to 48 floats in the buffer)."""
    op = torch.ops.llava_evaclip.aligned_gated_linear.default
    for requires_grad in (False, True):
        inputs = _gated_inputs(torch.float32, bias=bias, shape=shape, requires_grad=requires_grad)
        torch.library.opcheck(op, tuple(inputs))
        got = op(*inputs)
        assert got.shape == (*shape, 43) and got.is_contiguous()
        torch.testing.assert_close(got, _gated_reference(*inputs), atol=ATOL, rtol=0)
    half = [t.bfloat16() if t is not None else None for t in _gated_inputs(torch.float32, bias=bias, shape=shape)]
    exact = _gated_reference(*(t.double() if t is not None else None for t in half))
    _assert_as_exact(op(*half), _gated_reference(*half), exact)  # CPU bf16: `_fused_swiglu`, which rounds once


@needs_custom_op
@pytest.mark.parametrize("bias", [True, False])
def test_aligned_gated_linear_gradients_pass_gradcheck(bias):
    inputs = _gated_inputs(torch.float64, inner=5, bias=bias, shape=(2, 3), requires_grad=True)
    assert torch.autograd.gradcheck(modeling_evaclip.aligned_gated_linear, tuple(inputs))
    # and in fp32 at the real call's layout: each gradient's error against fp64 autograd through the reference is
    # at most 1.3x that of fp32 autograd through the reference (gradients reach ~1e4 here, and how the CPU's
    # threads split a sum moves either fp32 result by more than 1e-4, so an fp32-to-fp32 tolerance was arbitrary)
    inputs = _gated_inputs(torch.float32, bias=bias, requires_grad=True)
    params = [t for t in inputs if t is not None]
    got = torch.autograd.grad(modeling_evaclip.aligned_gated_linear(*inputs).square().sum(), params)
    fp32 = torch.autograd.grad(_gated_reference(*inputs).square().sum(), params)
    params64 = [t.detach().double().requires_grad_() for t in params]
    inputs64 = iter(params64)
    exact = torch.autograd.grad(
        _gated_reference(*(next(inputs64) if t is not None else None for t in inputs)).square().sum(), params64)
    for ours, reference, truth in zip(got, fp32, exact):
        assert ours.shape == truth.shape
        assert (ours.double() - truth).abs().max() <= 1.3 * (reference.double() - truth).abs().max()


def _op_targets(graphs) -> set[str]:
    return {str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}


def _captured_ops(model: nn.Module, pixel_values: torch.Tensor, grad: bool = False) -> set[str]:
    """The call targets of the graph dynamo captures for `model` (no codegen: the eager backend)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    with torch.set_grad_enabled(grad):
        torch.compile(model, backend=counter, fullgraph=True, dynamic=True)(pixel_values)
    torch._dynamo.reset()
    return _op_targets(counter.graphs)


@needs_compiled_custom_op
def test_compiled_inference_alone_captures_the_aligned_op(monkeypatch):
    """The op is in the graph of compiled no-grad inference only: not with grad on, not under autocast, not with a
    hooked (adapter / offloaded) layer, not with `COMPILED_ALIGNED_SWIGLU` off, not for a GELU SwiGLU, and never in
    an exported program (aten only, equal to eager)."""
    model = _tiny_eva02(num_hidden_layers=2, intermediate_size=43)
    pixel_values = torch.randn(2, 3, 28, 28)
    assert any(OP_NAME in target for target in _captured_ops(model, pixel_values))
    assert not any(OP_NAME in target for target in _captured_ops(model, pixel_values, grad=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not any(OP_NAME in target for target in _captured_ops(model, pixel_values))
    handle = model.vision_model.encoder.layers[0].mlp.fc1.register_forward_hook(lambda *args: None)
    targets = _captured_ops(model, pixel_values)
    handle.remove()
    assert sum(OP_NAME in target for target in targets) == 1  # the second layer keeps it
    monkeypatch.setattr(modeling_evaclip, "COMPILED_ALIGNED_SWIGLU", False)
    assert not any(OP_NAME in target for target in _captured_ops(model, pixel_values))
    monkeypatch.setattr(modeling_evaclip, "COMPILED_ALIGNED_SWIGLU", True)
    gelu = _tiny_eva02(num_hidden_layers=1, hidden_act="gelu")
    assert not any(OP_NAME in target for target in _captured_ops(gelu, pixel_values))
    try:
        import peft
    except ImportError:  # peft 0.21 needs a newer transformers than 4.37.2
        peft = None
    if peft is not None:  # LoRA on the gate: its layers are not plain nn.Linear, the adapters stay in the graph
        lora = peft.get_peft_model(_tiny_eva02(num_hidden_layers=1), peft.LoraConfig(r=2, target_modules=["fc1"]))
        # the model with the adapters injected, without PeftModel's forward (whose hook context manager torch 2.5's
        # dynamo cannot trace, for any model)
        assert not any(OP_NAME in target for target in _captured_ops(lora.eval().get_base_model(), pixel_values))

    for strict in (False, True):
        batch = torch.export.Dim("batch", min=1, max=64)
        with torch.no_grad():
            program = torch.export.export(model, (pixel_values,), dynamic_shapes=({0: batch},), strict=strict)
            targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
            assert targets and all(target.startswith(("aten.", "<built-in")) for target in targets), targets
            other = torch.randn(3, 3, 28, 28)
            torch.testing.assert_close(program.module()(other).last_hidden_state,
                                       model(other).last_hidden_state, atol=ATOL, rtol=0)


@needs_custom_op
@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_a_torch_that_cannot_tell_export_from_compile_exports_no_aligned_op(monkeypatch, strict):
    """torch 2.4 / 2.5 have the custom op but no `torch.compiler.is_exporting`: the op went into their exported
    programs (seen on torch 2.5.1), which then need this package to run and leave aten. Such a torch is taken as
    exporting; simulated here by hiding the probe from the model."""
    model = _tiny_eva02(num_hidden_layers=2, intermediate_size=43)
    pixel_values = torch.randn(2, 3, 28, 28)
    monkeypatch.setattr(modeling_evaclip, "_TORCH_IS_EXPORTING", None)
    with torch.no_grad():
        program = torch.export.export(model, (pixel_values,), strict=strict)
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert targets and not any(OP_NAME in target for target in targets), targets
        torch.testing.assert_close(program.module()(pixel_values).last_hidden_state,
                                   model(pixel_values).last_hidden_state, atol=ATOL, rtol=0)


@needs_compiled_custom_op
def test_compiled_aligned_op_equals_eager_without_recompiling(monkeypatch):
    """inductor, fullgraph, dynamic: every SwiGLU of the tower runs through the aligned buffer (counted at run time),
    the outputs equal the eager module calls (grad on) within 1e-5, and a new batch size does not recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _tiny_eva02(num_hidden_layers=2, intermediate_size=43)
    calls = []
    gate_up = modeling_evaclip._aligned_gate_up
    monkeypatch.setattr(modeling_evaclip, "_aligned_gate_up", lambda *args: calls.append(1) or gate_up(*args))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    try:
        for batch in (2, 3):
            pixel_values = torch.randn(batch, 3, 28, 28)
            expected = _eager_states(model, pixel_values)
            calls.clear()
            with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=batch != 2):
                got = compiled(pixel_values, output_hidden_states=True).hidden_states
            assert len(calls) == 2, calls  # one per layer, inside inductor's code
            for index, (state, reference) in enumerate(zip(got, expected)):
                torch.testing.assert_close(state, reference, atol=ATOL, rtol=0, msg=f"batch {batch} state {index}")
    finally:
        torch._dynamo.reset()
    assert any(OP_NAME in target for target in _op_targets(counter.graphs))


# --------------------------------------------------------------------------------------------------------------------
# Whole tower: fast path == eager path
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILY_FLAGS))
def test_selected_states_equal_the_eager_path(family):
    torch.manual_seed(0)
    model = _randomize(EvaCLIPVisionModel(tiny_vision_config(family))).eval()
    layers = model.config.num_hidden_layers
    pixel_values = torch.randn(2, 3, 28, 28)
    expected = _eager_states(model, pixel_values)

    ran = []
    for index, layer in enumerate(model.vision_model.encoder.layers):
        layer.register_forward_hook(lambda *args, index=index: ran.append(index))
    with torch.inference_mode():
        fast = model.vision_model.select_hidden_states(pixel_values, [layers - 1, 0, 1])
    assert sorted(fast) == [0, 1, layers - 1]
    assert ran == list(range(layers - 1))  # nothing after the deepest selected layer runs
    for index, state in fast.items():
        torch.testing.assert_close(state, expected[index], atol=ATOL, rtol=0, msg=f"{family} hidden_states[{index}]")


def test_rope_table_per_grid_equals_the_eager_path():
    """Other resolutions get their own cached table; switching grids back and forth gives the eager numbers."""
    model = _tiny_eva02()
    rotary = model.vision_model.rotary_embedding
    layers = model.config.num_hidden_layers
    for size in (42, 28, 42):
        pixel_values = torch.randn(1, 3, size, size)
        expected = _eager_states(model, pixel_values, interpolate_pos_encoding=True)
        with torch.inference_mode():
            fast = model.vision_model.select_hidden_states(pixel_values, [layers], interpolate_pos_encoding=True)
        torch.testing.assert_close(fast[layers], expected[layers], atol=ATOL, rtol=0, msg=f"{size}px")
    grid = 42 // model.config.patch_size
    table = rotary(grid, grid, torch.float32)
    assert table[0] is rotary(grid, grid, torch.float32)[0]  # cached, not recomputed
    cos, sin = rotary.compute_table(grid, grid)
    assert torch.equal(table[0], cos) and torch.equal(table[1], sin)


def _timm_twin(model: EvaCLIPVisionModel) -> nn.Module:
    """timm's eva02_large_patch14_clip_336 at the tiny shape, holding our weights."""
    config = model.config
    reference = timm.create_model(
        "eva02_large_patch14_clip_336", pretrained=False, num_classes=0, embed_dim=config.hidden_size,
        depth=config.num_hidden_layers, num_heads=config.num_attention_heads, img_size=config.image_size,
        patch_size=config.patch_size, ref_feat_shape=(config.rope_pt_grid_size,) * 2,
    ).eval()
    ours = model.vision_model.state_dict()
    names = {"layer_norm1": "norm1", "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
             "self_attn.v_proj": "attn.v_proj", "self_attn.inner_attn_ln": "attn.norm",
             "self_attn.out_proj": "attn.proj", "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1_g",
             "mlp.fc1_up": "mlp.fc1_x", "mlp.ffn_ln": "mlp.norm", "mlp.fc2": "mlp.fc2"}
    state = {
        "cls_token": ours["embeddings.class_embedding"].reshape(1, 1, -1),
        "pos_embed": ours["embeddings.position_embedding.weight"][None],
        "patch_embed.proj.weight": ours["embeddings.patch_embedding.weight"],
        "patch_embed.proj.bias": ours["embeddings.patch_embedding.bias"],
        "norm.weight": ours["post_layernorm.weight"],
        "norm.bias": ours["post_layernorm.bias"],
    }
    for key, value in ours.items():
        if key.startswith("encoder.layers."):
            index, rest = key[len("encoder.layers."):].split(".", 1)
            module, parameter = rest.rsplit(".", 1)
            state[f"blocks.{index}.{names[module]}.{parameter}"] = value
    reference.load_state_dict(state, strict=True)
    return reference


def test_tower_fast_path_matches_timm_eva02():
    """LLaVA's features (layer -2, patch tokens) and the last layer against timm's independent EVA-02, fp32."""
    from llava_evaclip.tower import EvaCLIPVisionTower

    model = _tiny_eva02(intermediate_size=85)  # timm's SwiGLU width: int(32 * 4 * 2 / 3)
    reference = _timm_twin(model)
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        x, rope = reference._pos_embed(reference.patch_embed(pixel_values))
        blocks = []
        for block in reference.blocks:
            x = block(x, rope=rope)
            blocks.append(x)

    tower, _ = bench._tower(model)
    assert isinstance(tower, EvaCLIPVisionTower)
    with torch.inference_mode():
        features = tower(pixel_values)
        last = model.vision_model.select_hidden_states(pixel_values, [model.config.num_hidden_layers])
    torch.testing.assert_close(features, blocks[-2][:, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(last[model.config.num_hidden_layers], blocks[-1], atol=ATOL, rtol=0)


def test_portable_half_patch_embedding_runs_in_fp32_where_the_module_call_is_not_needed(monkeypatch):
    """Where half-precision kernels are portable (AVX2), eager bf16 inference embeds patches as one fp32 convolution
    rounded once; a hooked convolution (offload, adapters), grad and the switch off keep the module call and its
    bits."""
    monkeypatch.setattr(modeling_evaclip, "cpu_half_kernels", lambda dtype: "portable")
    model = _tiny_eva02().to(torch.bfloat16)
    embeddings = model.vision_model.embeddings
    conv = embeddings.patch_embedding
    pixel_values = torch.randn(2, 3, 28, 28).bfloat16()
    wide = F.conv2d(pixel_values.float(), conv.weight.float(), conv.bias.float(), stride=conv.stride).bfloat16()
    with torch.no_grad():
        module_call = conv(pixel_values)
        assert torch.equal(embeddings._embed_patches(pixel_values), wide)
        calls = []
        handle = conv.register_forward_hook(lambda *args: calls.append(1))
        assert torch.equal(embeddings._embed_patches(pixel_values), module_call) and calls == [1]
        handle.remove()
    assert torch.equal(embeddings._embed_patches(pixel_values).detach(), module_call)  # grad: the module call
    with torch.no_grad():
        monkeypatch.setattr(modeling_evaclip, "CPU_HALF_MATMULS_IN_FP32", False)
        assert torch.equal(embeddings._embed_patches(pixel_values), module_call)
        monkeypatch.setattr(modeling_evaclip, "cpu_half_kernels", lambda dtype: "avx512")
        monkeypatch.setattr(modeling_evaclip, "CPU_HALF_MATMULS_IN_FP32", True)
        assert torch.equal(embeddings._embed_patches(pixel_values), module_call)


@pytest.mark.parametrize("kernels", ["avx512", "amx", "portable"])
def test_bf16_tower_fast_paths_match_timm_eva02(monkeypatch, kernels):
    """bf16 inference against timm's independent EVA-02 holding the same bf16-rounded weights in fp32, every layer
    within bf16 rounding: as an AVX-512 CPU runs it (every matmul split, 34 rows as 20 + 14), as an AMX CPU does
    (whole matmuls), both with torch's fused attention and the fused SwiGLU where oneDNN has bf16 kernels, and as an
    AVX2 CPU does (the patch embedding and every projection in fp32, rounded once)."""
    monkeypatch.setattr(modeling_evaclip, "CPU_HALF_GEMM_ROWS", 20)
    monkeypatch.setattr(modeling_evaclip, "cpu_half_kernels", lambda dtype: kernels)
    in_fp32 = []
    if kernels == "portable":  # fp32 matmuls; oneDNN's fused ops are for CPUs with its bf16 kernels
        monkeypatch.setattr(modeling_evaclip, "cpu_has_onednn_bf16", lambda: False)
        probe = modeling_evaclip._half_matmul_in_fp32
        monkeypatch.setattr(modeling_evaclip, "_half_matmul_in_fp32",
                            lambda rows: in_fp32.append(probe(rows)) or in_fp32[-1])
    model = _tiny_eva02(intermediate_size=85).to(torch.bfloat16)  # timm's SwiGLU width: int(32 * 4 * 2 / 3)
    reference = _timm_twin(model.float()).float()
    model.to(torch.bfloat16)
    pixel_values = torch.randn(2, 3, 28, 28).bfloat16()
    with torch.no_grad():
        x, rope = reference._pos_embed(reference.patch_embed(pixel_values.float()))
        expected = []
        for block in reference.blocks:
            x = block(x, rope=rope)
            expected.append(x)
        got = model(pixel_values, output_hidden_states=True).hidden_states[1:]
    # the patch embedding, then q, k, v, out, gate, up, fc2 in each layer
    assert in_fp32 == ([True] * (1 + 7 * len(got)) if kernels == "portable" else [])
    for index, (state, reference_state) in enumerate(zip(got, expected)):
        error = (state.float() - reference_state).norm() / reference_state.norm()
        assert state.dtype == torch.bfloat16 and 0 < error < 2e-2, (index, error)


def test_cpu_bf16_autocast_tower_is_close_to_fp32():
    """fp32 weights under CPU autocast: bf16 matmuls, features back in the input dtype, near the fp32 features."""
    model = _tiny_eva02()
    tower, _ = bench._tower(model)
    pixel_values = torch.randn(2, 3, 28, 28)
    expected = _eager_states(model, pixel_values)[-2][:, 1:]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = tower(pixel_values)
    assert features.dtype == torch.float32
    error = (features - expected).norm() / expected.norm()
    assert 0 < error < 2e-2, error  # bf16 rounding happened, and no more than bf16 rounding


# --------------------------------------------------------------------------------------------------------------------
# The benchmark (smoke only: no timing assertions)
# --------------------------------------------------------------------------------------------------------------------


def test_benchmark_quick_run_writes_valid_results(tmp_path, capsys):
    argv = ["--quick", "--batch-sizes", "1", "--reps", "1", "--warmup", "0", "--threads", "1", "--no-memory",
            "--output-dir", str(tmp_path)]
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "tower_cpu_quick.json").read_text())
    assert set(report["settings"]) == {"fp32/b1", "bf16/b1"}
    for key, setting in report["settings"].items():
        results = setting["results"]
        autocast = {"ours_eva02_autocast"} if key.startswith("bf16") else set()
        expected = set(bench.BASE_CONTENDERS) | {"matmul", "ours_eva02_kernels", "ours_plain_kernels"} | autocast
        assert set(results) == expected
        for name, entry in results.items():
            assert len(entry["times_s"]) == 1 and entry["median_s"] > 0 and entry["gflops"] > 0, name
        config = bench.build_shapes(True).eva02
        assert results["ours_eva02"]["layers"] == config.num_hidden_layers - 1  # layer -2: the last one never runs
        assert results["timm_eva02"]["layers"] == config.num_hidden_layers
        assert results["ours_eva02"]["gflop"] == pytest.approx(
            bench.tower_flops(config, config.num_hidden_layers - 1, 1) / 1e9)
        pairs = {(r["ours"], r["peer"]) for r in setting["ratios"]}
        assert {("ours_eva02", "timm_eva02"), ("ours_eva02", "ours_eager"), ("ours_plain", "hf_clip")} <= pairs
        for name in ("ours_eva02", "ours_plain"):
            assert 0 < results[name]["ceiling_fraction"], name
            assert results[f"{name}_kernels"]["gflop"] < results[name]["gflop"]  # no patch embedding
    assert set(report["matmul_peak_gflops"]) == {"fp32", "bf16"}
    assert report["goals"] and all(isinstance(goal["met"], bool) for goal in report["goals"])
    peak_goals = [goal for goal in report["goals"] if "matmul peak" in goal["goal"]]
    assert len(peak_goals) == 3 and all(goal["ceiling"] > 0 for goal in peak_goals)
    markdown = (tmp_path / "tower_cpu_quick.md").read_text()
    assert "| `ours_eva02`" in markdown and "## Goals" in markdown
    assert (tmp_path / "tower_cpu_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run refuses to overwrite (before building anything) and leaves the results as they were
    before = (tmp_path / "tower_cpu_quick.json").read_bytes()
    capsys.readouterr()
    assert bench.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--overwrite" in error
    assert (tmp_path / "tower_cpu_quick.json").read_bytes() == before


def test_benchmark_stopped_part_way_keeps_the_settings_it_timed(tmp_path):
    """A run cut short (the time limit of a lent GPU's one run, a crash) keeps what it timed: the JSON is rewritten
    after each (dtype, batch) setting and says `"partial": true` until the run ends; the finished run's says false."""
    argv = ["--quick", "--batch-sizes", "1,2", "--reps", "1", "--warmup", "0", "--threads", "1", "--dtypes", "fp32",
            "--contenders", "ours_eva02,timm_eva02", "--no-ceiling", "--no-autocast", "--no-memory", "--no-chart",
            "--output-dir", str(tmp_path)]

    def stop_at_the_second_batch_size(message: str) -> None:
        if message.startswith("[fp32] batch 2"):
            raise KeyboardInterrupt

    threads = torch.get_num_threads()
    try:
        with pytest.raises(KeyboardInterrupt):
            bench.run_benchmark(bench.build_parser().parse_args(argv), progress=stop_at_the_second_batch_size)
        report = json.loads((tmp_path / "tower_cpu_quick.json").read_text())
        assert report["partial"] is True and set(report["settings"]) == {"fp32/b1"}
        assert set(report["settings"]["fp32/b1"]["results"]) == {"ours_eva02", "timm_eva02", "matmul"}
        assert not (tmp_path / "tower_cpu_quick.md").exists()
        assert bench.main(argv) == 2  # the partial results count as results: no silent replacement
        assert bench.main([*argv, "--overwrite"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "tower_cpu_quick.json").read_text())
    assert report["partial"] is False and set(report["settings"]) == {"fp32/b1", "fp32/b2"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's plumbing where no GPU can run it")
def test_gpu_check_script_runs_every_step_and_says_which_failed(tmp_path):
    """benchmarks/gpu_check.sh, the one run a lent GPU machine gets: without a GPU every step still runs and logs (the
    accelerator tests skip, the CUDA benchmark is refused in one line), OUT is taken relative to the caller, and the
    exit status says that a step failed."""
    import subprocess

    env = {**os.environ, "OUT": "results", "PYTHON": sys.executable}
    env.pop("EVACLIP_ACCELERATOR_DRY_RUN", None)
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, "benchmarks", "gpu_check.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    out = tmp_path / "results"
    assert sorted(os.listdir(out)) == ["bench.log", "machine.txt", "tests.log"]
    assert f"torch {torch.__version__}" in (out / "machine.txt").read_text()
    assert "1 skipped" in (out / "tests.log").read_text()
    assert "needs a CUDA GPU" in (out / "bench.log").read_text()
    # pytest's 5: no test ran (the module skipped as a whole); the benchmark's 2: a one-line refusal
    assert "== tests: exit status 5" in result.stdout and "== bench: exit status 2" in result.stdout


@pytest.mark.parametrize("shape", ["ours_eva02", "ours_plain"])
def test_ceiling_contender_runs_exactly_the_towers_matmuls_and_attention(shape):
    """`<tower>_kernels` runs one `torch.mm` per `nn.Linear` of the layers the tower runs, with those weights and as
    many rows, and one sdpa per layer at the tower's attention shape; nothing else of size. Its FLOP count is the
    layers' FLOPs from the config, which the modules' own sizes confirm."""
    shapes = bench.build_shapes(True)
    built = {shape: bench.build_contender(shape, shapes, torch.float32, torch.device("cpu"), {})}
    contender = bench.build_contender(f"{shape}_kernels", shapes, torch.float32, torch.device("cpu"), built)
    assert contender.model is built[shape].model and contender.layers == built[shape].layers
    config = shapes.config(contender.shape)
    layers = contender.model.vision_model.encoder.layers[: contender.layers]
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    batch, tokens = 2, (config.image_size // config.patch_size) ** 2 + 1
    with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as profile:
        contender.run(torch.randn(batch, 3, config.image_size, config.image_size))
    events = [e for e in profile.events() if e.name in ("aten::mm", "aten::scaled_dot_product_attention")]
    mms = [e.input_shapes for e in events if e.name == "aten::mm"]
    assert mms == [[[batch * tokens, m.in_features], [m.in_features, m.out_features], [batch * tokens, m.out_features]]
                   for m in linears]
    head_dim = config.hidden_size // config.num_attention_heads
    attention = [e.input_shapes[0] for e in events if e.name == "aten::scaled_dot_product_attention"]
    assert attention == [[batch, config.num_attention_heads, tokens, head_dim]] * len(layers)
    flops = 2 * batch * tokens * sum(m.in_features * m.out_features for m in linears)
    flops += len(layers) * batch * 4 * tokens * tokens * config.hidden_size
    assert bench.contender_flops(contender, shapes, batch) == flops


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse non-UTF-8 names")
def test_benchmark_writes_every_result_under_a_non_utf8_name_through_a_symlink(tmp_path, monkeypatch):
    """`--name` with bytes that are not UTF-8, into a symlinked directory: JSON and markdown both land there under
    that name (the markdown used to fail half-way, after the JSON, on the recorded command line)."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    name = os.fsdecode(b"run\xff")
    argv = ["--quick", "--batch-sizes", "1", "--reps", "1", "--warmup", "0", "--threads", "1", "--no-memory",
            "--no-chart", "--dtypes", "fp32", "--contenders", "ours_eva02", "--output-dir", str(tmp_path / "link"),
            "--name", name]
    monkeypatch.setattr(sys, "argv", ["tower.py", *argv])
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert sorted(os.listdir(real)) == [name + ".json", name + ".md"]
    assert "run\\udcff" in (real / (name + ".md")).read_text(encoding="utf-8")
    assert json.loads((real / (name + ".json")).read_text())["settings"]["fp32/b1"]["results"]["ours_eva02"]


def test_ceiling_is_the_tower_with_everything_but_its_kernels_free():
    """10 GFLOP tower whose matmuls and attention (8 GFLOP) took 1 s alone, peak 10 GFLOP/s: 1 s + the remaining
    2 GFLOP at the peak (0.2 s) = 1.2 s, so the tower can reach at most 10 / 1.2 / 10 of the peak."""
    results = {"ours_eva02": {"shape": "eva02", "gflop": 10.0, "median_s": 2.0},
               "ours_eva02_kernels": {"shape": "eva02", "gflop": 8.0, "median_s": 1.0},
               "timm_eva02": {"shape": "eva02", "gflop": 10.0, "median_s": 2.0},
               "matmul": {"shape": "matmul", "gflop": 1.0, "median_s": 0.1}}
    bench.add_ceilings(results, peak=10.0)
    assert results["ours_eva02"]["ceiling_fraction"] == pytest.approx(10 / 1.2 / 10)
    assert [name for name, entry in results.items() if "ceiling_fraction" in entry] == ["ours_eva02"]
    args = bench.build_parser().parse_args(["--no-ceiling"])
    assert not set(bench.CEILING_CONTENDERS) & set(bench.contenders_for(torch.float32, args))


def test_ablation_contenders_patch_existing_attributes_and_keep_the_features():
    """Each ablation patches an attribute the model really has, and its bf16 features equal the tower's within
    bf16 rounding (the same arithmetic by another route), so a ratio in the benchmark compares like with like."""
    shapes = bench.build_shapes(True)
    built = {"ours_eva02": bench.build_contender("ours_eva02", shapes, torch.bfloat16, torch.device("cpu"), {})}
    pixel_values = torch.randn(1, 3, 56, 56).bfloat16()
    with torch.no_grad():
        expected = built["ours_eva02"].run(pixel_values).float()
        for name, ablation in bench.ABLATIONS.items():
            target, attribute, _, _ = ablation()
            assert hasattr(target, attribute), name
            got = bench.build_contender(name, shapes, torch.bfloat16, torch.device("cpu"), built).run(pixel_values)
            torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=3e-2, msg=name)


def test_compiled_ablation_contender_runs_with_the_aligned_op_switched_off(monkeypatch):
    """`--compile --ablations` adds `ours_eva02_compiled_module_mlp`, whose calls (compile included) see
    `COMPILED_ALIGNED_SWIGLU` off and leave it on for the other contenders."""
    args = bench.build_parser().parse_args(["--compile", "--ablations"])
    assert {"ours_eva02_compiled", "timm_eva02_compiled", "ours_eva02_compiled_module_mlp"} <= set(
        bench.contenders_for(torch.float32, args))
    assert "ours_eva02_compiled_module_mlp" not in bench.contenders_for(
        torch.float32, bench.build_parser().parse_args(["--compile"]))
    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: lambda pixel_values: seen.append(
        modeling_evaclip.COMPILED_ALIGNED_SWIGLU) or module(pixel_values))
    contender = bench.build_contender("ours_eva02_compiled_module_mlp", bench.build_shapes(True), torch.float32,
                                      torch.device("cpu"), {})
    assert contender.compiled and contender.peers == ("ours_eva02_compiled",)
    with torch.inference_mode():
        features = contender.run(torch.randn(1, 3, 56, 56))
    assert seen == [False] and modeling_evaclip.COMPILED_ALIGNED_SWIGLU is True
    assert features.shape == (1, 16, 64)


def test_memory_child_measures_one_forward_in_a_fresh_process():
    """`python -m benchmarks.tower --memory-child`: peak RSS above the weights covers the live MLP activations."""
    spec = {"contender": "ours_plain", "dtype": "fp32", "batch": 64, "device": "cpu", "quick": True}
    entry = bench.memory_in_subprocess(spec, threads=1, timeout=300)
    assert "error" not in entry, entry.get("error")
    config = bench.build_shapes(True).plain
    model = EvaCLIPVisionModel(config)
    assert entry["weights_mib"] == pytest.approx(bench.weight_bytes(model) / 2**20)
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    mlp_hidden_mib = 64 * tokens * config.intermediate_size * 4 / 2**20
    assert entry["peak_above_weights_mib"] >= mlp_hidden_mib  # fc1's output was live during the forward
    assert entry["output_mib"] == pytest.approx(64 * (tokens - 1) * config.hidden_size * 4 / 2**20)


def test_bench_subcommand_usage_errors_exit_2(tmp_path, capsys):
    from llava_evaclip.cli import main as cli_main

    (tmp_path / "tower_cpu_quick.json").write_text("{}")
    assert cli_main(["bench", "--quick", "--output-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("llava-evaclip bench: error:") and "--overwrite" in error
    assert (tmp_path / "tower_cpu_quick.json").read_text() == "{}"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "--batch-sizes", "0"])
    assert exit_info.value.code == 2
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert cli_main(["bench", "--device", "cuda", "--output-dir", str(tmp_path / "gpu")]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
        assert not (tmp_path / "gpu").exists()
