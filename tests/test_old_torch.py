"""What LLaVA's pinned torch lacks, simulated on the installed torch: LLaVA-NeXT pins torch 2.1.2, which has no
`torch.compiler.is_compiling` (torch 2.3) and whose `torch.is_autocast_enabled` takes no device type (torch 2.4).
Every forward asks the first, so before the fallback no model ran there. The reference is the same computation on
the installed torch, in this process."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from _dist.runner import worker_env
from llava_evaclip import _compat, modeling_evaclip

REPO = Path(__file__).resolve().parents[1]

# Builds a tiny EVA02 model (RoPE, SwiGLU, sub-LN), runs no-grad fp32 and bf16 inference and a backward pass, and
# prints the results, optionally after removing what torch 2.1 lacks.
WORKER = r"""
import json, sys
import torch
if sys.argv[1] == "torch-2.1":
    del torch.compiler.is_compiling
    torch._utils.is_compiling = lambda: False  # torch 2.1's own, which dynamo replaces while tracing
    try:  # transformers' image utils import torchvision, and torchvision >= 0.20 calls it itself
        import transformers.image_utils
    except Exception as error:
        print(json.dumps({"others_need_it": str(error)}))
        sys.exit()
sys.path.insert(0, sys.argv[2])
from conftest import tiny_config
from llava_evaclip import EvaCLIPVisionModel
torch.manual_seed(0)
model = EvaCLIPVisionModel(tiny_config("eva02").vision_config).eval()
pixels = torch.randn(2, 3, model.config.image_size, model.config.image_size)
with torch.no_grad():
    fp32 = model(pixels).last_hidden_state
    bf16 = model.to(torch.bfloat16)(pixels.bfloat16()).last_hidden_state.float()
model.float()
model(pixels).last_hidden_state.square().sum().backward()
grad = model.vision_model.embeddings.patch_embedding.weight.grad
from llava_evaclip import _compat
print(json.dumps({"fp32": fp32.tolist(), "bf16": bf16.tolist(), "grad": grad.tolist(),
                  "torch_utils_fallback": _compat.is_compiling is torch._utils.is_compiling}))
"""


def _run(torch_version: str) -> dict:
    result = subprocess.run([sys.executable, "-c", WORKER, torch_version, str(REPO / "tests")], env=worker_env(),
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) >= 5,
                    reason="transformers 5 itself calls torch.compiler.is_compiling (torch >= 2.3); torch 2.1 goes "
                           "with the 4.x line")
@pytest.mark.skipif(not hasattr(torch.compiler, "is_compiling"),
                    reason="the installed torch is one that lacks it: the whole suite runs without it")
def test_models_run_without_torch_compiler_is_compiling():
    old, new = _run("torch-2.1"), _run("installed")
    if "others_need_it" in old:
        pytest.skip(f"the installed torchvision / transformers call it themselves ({old['others_need_it']})")
    assert old["torch_utils_fallback"] and not new["torch_utils_fallback"]  # what torch 2.1's optimizers ask
    for key in ("fp32", "bf16", "grad"):
        assert torch.equal(torch.tensor(old[key]), torch.tensor(new[key])), key


def test_is_compiling_fallbacks(monkeypatch):
    monkeypatch.delattr(torch.compiler, "is_compiling", raising=False)  # torch < 2.3 has none
    assert _compat._find_is_compiling() is torch._utils.is_compiling
    monkeypatch.delattr(torch._utils, "is_compiling")
    assert _compat._find_is_compiling()() is False


@pytest.mark.parametrize("enabled", [True, False])
def test_autocast_probe_without_a_device_argument(monkeypatch, enabled):
    """torch < 2.4: `torch.is_autocast_enabled()` takes no argument and answers for CUDA only; CPU autocast has its
    own probe, and a device without one (meta) is never autocast."""
    cuda_state = not enabled

    def no_device_argument(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments")
        return cuda_state

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled), monkeypatch.context() as patch:
        patch.setattr(torch, "is_autocast_enabled", no_device_argument)
        assert modeling_evaclip._autocast_enabled("cpu") is enabled
        assert modeling_evaclip._autocast_enabled("cuda") is cuda_state
        assert modeling_evaclip._autocast_enabled("meta") is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_text_tower_under_autocast_passes_sdpa_a_mask_of_the_query_dtype(monkeypatch, dtype):
    """torch 2.1's CPU `scaled_dot_product_attention` refuses a float mask of another dtype than q ("Expected
    attn_mask dtype to be bool or to match query dtype"): under autocast the padded text tower's fp32 mask met a
    half-precision q, so every padded batch failed there. The check is put in front of the installed kernel; the
    result must be what the installed torch gives without it, and the eager kernel's within half precision."""
    from conftest import tiny_config
    from llava_evaclip import EvaCLIPTextModel

    try:
        with warnings.catch_warnings(), torch.autocast("cpu", dtype=dtype):
            warnings.simplefilter("ignore")  # torch 2.1: "the target dtype is not supported. Disabling autocast."
    except RuntimeError:  # torch 2.1: "AutocastCPU only support Bfloat16"
        pytest.skip(f"this torch has no CPU autocast to {dtype}")

    config = tiny_config("eva02").text_config
    vocab = config.vocab_size
    ids = torch.randint(1, vocab - 1, (2, 7), generator=torch.Generator().manual_seed(0))
    ids[:, -1], ids[1, 4] = vocab - 1, vocab - 1  # the second text ends early and is padded
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0

    def text_embeds(implementation: str) -> torch.Tensor:
        config._attn_implementation = implementation
        torch.manual_seed(0)
        model = EvaCLIPTextModel(config).eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            return model(input_ids=ids, attention_mask=mask).last_hidden_state.float()

    unchecked, eager = text_embeds("sdpa"), text_embeds("eager")
    kernel = torch.nn.functional.scaled_dot_product_attention

    def torch_2_1_kernel(query, key, value, attn_mask=None, *args, **kwargs):
        if attn_mask is not None and attn_mask.dtype not in (torch.bool, query.dtype):
            raise RuntimeError("Expected attn_mask dtype to be bool or to match query dtype")
        return kernel(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", torch_2_1_kernel)
    checked = text_embeds("sdpa")
    assert torch.equal(checked, unchecked)
    torch.testing.assert_close(checked, eager, atol=2e-2, rtol=2e-2)


def test_traced_code_has_none_of_what_torch_2_1_dynamo_refuses(monkeypatch):
    """torch 2.1's dynamo (LLaVA's pin) stopped `torch.compile(fullgraph=True)` of the model at three constructs:
    unpacking a generator, `Tensor.is_complex()`, and membership in a set (the tower's kept hidden states). The
    compile tests pass on the real torch 2.1.2 without them (run by hand, README); this keeps them out on every
    torch."""
    from conftest import tiny_vision_config
    from llava_evaclip import EvaCLIPVisionModel

    offenders = []
    for name in ("modeling_evaclip.py", "tower.py", "_compat.py"):
        path = REPO / "llava_evaclip" / name
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            unpacks_generator = (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple)
                                 and isinstance(node.value, ast.GeneratorExp))
            asks_is_complex = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                               and node.func.attr == "is_complex")
            if unpacks_generator or asks_is_complex:
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, offenders

    model = EvaCLIPVisionModel(tiny_vision_config("eva02", num_hidden_layers=3)).eval()
    handed = []
    encoder_forward = type(model.vision_model.encoder).forward

    def spy(self, *args, **kwargs):
        handed.append(kwargs.get("keep_hidden_states"))
        return encoder_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model.vision_model.encoder), "forward", spy)
    pixels = torch.randn(1, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        states = model.vision_model.select_hidden_states(pixels, {2, 0})
    assert sorted(states) == [0, 2]
    assert handed == [(0, 2)] and isinstance(handed[0], tuple)


@pytest.mark.skipif(_compat.ALL_ATTENTION_FUNCTIONS is not None,
                    reason="transformers with AttentionInterface calls sdpa itself (and needs a torch newer than 2.1)")
def test_sdpa_takes_torchs_default_scale_which_torch_2_1_onnx_export_needs(monkeypatch):
    """torch 2.1's ONNX exporter (torchscript's, its only one) fails on an explicit float `scale` to
    `scaled_dot_product_attention` ("z_(): incompatible function arguments"). Every EVA-CLIP scales by
    1/sqrt(head_dim), torch's default, so the kernel is called without it; fp32 features are bit for bit those of
    the explicit scale."""
    from conftest import tiny_vision_config
    from llava_evaclip import EvaCLIPVisionModel

    kernel = torch.nn.functional.scaled_dot_product_attention
    scales = []

    def recording_kernel(*args, scale=None, **kwargs):
        scales.append(scale)
        return kernel(*args, scale=scale, **kwargs)

    def explicit_scale_kernel(query, *args, scale=None, **kwargs):
        return kernel(query, *args, scale=query.shape[-1] ** -0.5 if scale is None else scale, **kwargs)

    config = tiny_vision_config("eva02", num_hidden_layers=2)
    config._attn_implementation = "sdpa"
    model = EvaCLIPVisionModel(config).eval()
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_kernel)
        default = model(pixels).last_hidden_state
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", explicit_scale_kernel)
        explicit = model(pixels).last_hidden_state
    assert scales == [None] * config.num_hidden_layers
    assert torch.equal(default, explicit)
