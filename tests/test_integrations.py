"""What a transformers CLIP user reaches for works on EVA-CLIP: accelerate big-model offload, torch.compile,
torch.export, transformers' attention backends and checkpointing layers, CLIP-shaped `get_*_features`, and the
package's import layering.

References are independent of the code under test: the same weights run in memory, in eager mode (sdpa or eager
attention, the module calls), transformers' own `CLIPModel` for the return types. fp32 tolerance 1e-5 absolute.
Compiling on a 2-core CPU is slow, so each model class and each EVA family is compiled once with inductor (what users
run): EvaCLIPVisionModel at EVA-02 (RoPE, SwiGLU, sub-LN), EvaCLIPModel with the post-norm (EVA02-bigE) vision tower
and the pre-norm GELU text tower (EVA01's block), and the LLaVA tower at EVA01 with layer scale.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
from torch import nn

from conftest import (
    export_with_dynamic_batch, needs_cpu_fp16, randomize as _randomize, tiny_config, tiny_text_config,
    tiny_vision_config,
)
from llava_evaclip import EvaCLIPConfig, EvaCLIPModel, EvaCLIPVisionModel, EvaCLIPVisionTower
from llava_evaclip import _compat
from llava_evaclip.modeling_evaclip import EvaCLIPPreTrainedModel, EvaCLIPTextModel

ATOL = 1e-5
PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "llava_evaclip")


def _pixels(batch: int, size: int = 28) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def _text(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 97, (batch, 7))
    ids[:, -1] = 98  # EOS, pooled at argmax
    ids[0, 4:] = 98  # the first text is 5 tokens, right-padded with EOS (the tokenizer's padding)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return ids, mask


def _assert_outputs_equal(actual, expected, atol: float = ATOL) -> None:
    """Every tensor of two model outputs (nested tuples included)."""
    flat_actual, flat_expected = (torch.utils._pytree.tree_flatten(output)[0] for output in (actual, expected))
    assert len(flat_actual) == len(flat_expected) > 0
    for got, want in zip(flat_actual, flat_expected):
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# accelerate big-model inference: CPU and disk offload
# --------------------------------------------------------------------------------------------------------------------


def _offload_budget(model: nn.Module) -> int:
    """A CPU budget of about half the weights: accelerate keeps the first blocks in memory, the rest on disk."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) // 2


def _assert_split(device_map: dict) -> None:
    assert "cpu" in device_map.values() and "disk" in device_map.values(), device_map


def test_vision_model_with_disk_offload_equals_the_in_memory_model(tmp_path):
    torch.manual_seed(0)
    model = _randomize(EvaCLIPVisionModel(tiny_vision_config("eva02", num_hidden_layers=4))).eval()
    model.save_pretrained(tmp_path / "model")
    pixel_values = _pixels(2)
    with torch.no_grad():
        expected = model(pixel_values, output_hidden_states=True)
        offloaded = EvaCLIPVisionModel.from_pretrained(
            tmp_path / "model", device_map="auto", max_memory={"cpu": _offload_budget(model)},
            offload_folder=str(tmp_path / "offload"),
        ).eval()
        _assert_split(offloaded.hf_device_map)
        _assert_outputs_equal(offloaded(pixel_values, output_hidden_states=True), expected)
        resized = _pixels(1, 42)  # another grid: interpolated positions and a RoPE table computed on the fly
        _assert_outputs_equal(offloaded(resized, interpolate_pos_encoding=True),
                              model(resized, interpolate_pos_encoding=True))


def test_full_model_with_disk_offload_equals_the_in_memory_model(tmp_path):
    torch.manual_seed(0)
    model = _randomize(EvaCLIPModel(tiny_config("eva02"))).eval()
    model.save_pretrained(tmp_path / "model")
    ids, mask = _text(2)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(2))
    with torch.no_grad():
        expected = model(**inputs)
        offloaded = EvaCLIPModel.from_pretrained(
            tmp_path / "model", device_map="auto", max_memory={"cpu": _offload_budget(model)},
            offload_folder=str(tmp_path / "offload"),
        ).eval()
        _assert_split(offloaded.hf_device_map)
        _assert_outputs_equal(offloaded(**inputs), expected)


def test_llava_tower_with_cpu_and_disk_offload_equals_the_in_memory_tower(tmp_path):
    from accelerate import dispatch_model, infer_auto_device_map

    torch.manual_seed(0)
    model = _randomize(EvaCLIPVisionModel(tiny_vision_config("eva02", num_hidden_layers=4))).eval()
    model.save_pretrained(tmp_path / "model")
    args = types.SimpleNamespace(mm_vision_select_layer=-2)
    images = _pixels(2)
    with torch.no_grad():
        expected = EvaCLIPVisionTower(str(tmp_path / "model"), args)(images)
        tower = EvaCLIPVisionTower(str(tmp_path / "model"), args)
        device_map = infer_auto_device_map(
            tower.vision_tower, max_memory={"cpu": _offload_budget(model)},
            no_split_module_classes=tower.vision_tower._no_split_modules,
        )
        _assert_split(device_map)
        dispatch_model(tower.vision_tower, device_map, main_device="cpu", offload_dir=str(tmp_path / "offload"))
        torch.testing.assert_close(tower(images), expected, atol=ATOL, rtol=0)


def test_lora_adapters_are_not_bypassed_by_the_inference_fast_path():
    """PEFT LoRA on the attention and MLP projections: inference (no_grad, where the MLP fast path would run) gives
    the numbers of the merged model, whose plain Linears hold the adapters' contribution."""
    try:
        import peft
    except ImportError as error:  # peft 0.21 needs a newer transformers than 4.37.2
        pytest.skip(f"peft is not importable with this transformers: {error}")
    torch.manual_seed(0)
    model = _randomize(EvaCLIPVisionModel(tiny_vision_config("eva02"))).eval()
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "fc1", "fc1_up", "fc2"], init_lora_weights=False)
    pixel_values = _pixels(2)
    with torch.no_grad():
        base = model(pixel_values).last_hidden_state.clone()
        adapted = peft.get_peft_model(model, config).eval()
        got = adapted(pixel_values=pixel_values, output_hidden_states=True)
        merged = adapted.merge_and_unload()
        expected = merged(pixel_values=pixel_values, output_hidden_states=True)
    assert all(type(layer.mlp.fc1) is nn.Linear for layer in merged.vision_model.encoder.layers)
    assert (expected.last_hidden_state - base).abs().max() > 1e-2  # the adapters change the numbers
    _assert_outputs_equal(got, expected)


# --------------------------------------------------------------------------------------------------------------------
# torch.compile and torch.export
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_twice(model: nn.Module, call, first: tuple, second: tuple):
    """Compile with fullgraph (any graph break fails) and dynamic shapes, run `call` on the first inputs, then on the
    second (another batch size) with recompilation forbidden. Returns both compiled results."""
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        got_first = call(compiled, *first)
        with torch._dynamo.config.patch(error_on_recompile=True):
            got_second = call(compiled, *second)
    return got_first, got_second


def _eager(model: nn.Module, call, inputs: tuple):
    with torch.no_grad():
        return call(model, *inputs)


def test_compiled_vision_model_eva02_equals_eager_without_recompiling(fresh_dynamo):
    torch.manual_seed(0)
    model = _randomize(EvaCLIPVisionModel(tiny_vision_config("eva02", num_hidden_layers=2))).eval()

    def call(module, pixel_values):
        return module(pixel_values, output_hidden_states=True)

    first, second = (_pixels(2),), (_pixels(3),)  # batch 1 would be specialised by dynamo: start at 2
    got_first, got_second = _compiled_twice(model, call, first, second)
    _assert_outputs_equal(got_first, _eager(model, call, first))
    _assert_outputs_equal(got_second, _eager(model, call, second))


def test_compiled_full_model_post_norm_equals_eager_without_recompiling(fresh_dynamo):
    """EvaCLIPModel with the EVA02-bigE (post-norm) vision tower and the pre-norm GELU text tower (masked)."""
    torch.manual_seed(0)
    config = EvaCLIPConfig(
        text_config=tiny_text_config(num_hidden_layers=1).to_dict(),
        vision_config=tiny_vision_config("bige", num_hidden_layers=2).to_dict(),
        projection_dim=16,
    )
    model = _randomize(EvaCLIPModel(config)).eval()

    def call(module, pixel_values, ids, mask):
        return module(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)

    first, second = (_pixels(2), *_text(2)), (_pixels(3), *_text(3))
    got_first, got_second = _compiled_twice(model, call, first, second)
    _assert_outputs_equal(got_first, _eager(model, call, first))
    _assert_outputs_equal(got_second, _eager(model, call, second))


def test_compiled_llava_tower_eva01_equals_eager_without_recompiling(fresh_dynamo, tmp_path):
    torch.manual_seed(0)
    _randomize(EvaCLIPVisionModel(tiny_vision_config("eva01_layer_scale", num_hidden_layers=2))).save_pretrained(tmp_path)
    tower = EvaCLIPVisionTower(str(tmp_path), types.SimpleNamespace(mm_vision_select_layer="-1,-2"))

    def call(module, images):
        return module(images)

    first, second = (_pixels(2),), (_pixels(3),)
    got_first, got_second = _compiled_twice(tower, call, first, second)
    _assert_outputs_equal(got_first, _eager(tower, call, first))
    _assert_outputs_equal(got_second, _eager(tower, call, second))


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=needs_cpu_fp16)],
                         ids=["bf16", "fp16"])
def test_compiled_half_precision_llava_tower_runs_in_one_graph(fresh_dynamo, tmp_path, dtype):
    """CPU half precision under torch.compile(fullgraph=True, dynamic=True), with this machine's real kernel probes
    (not pinned): the eager-only paths ask which half-precision kernels the CPU has (`cpu_half_kernels`, whose
    oneDNN probe dynamo refuses to trace) only outside traced code, so the tower compiles into one graph, runs a
    second batch size without recompiling, and gives the fp32 tower's features within half-precision rounding."""
    torch.manual_seed(0)
    _randomize(EvaCLIPVisionModel(tiny_vision_config("eva02", num_hidden_layers=2))).save_pretrained(tmp_path)
    args = types.SimpleNamespace(mm_vision_select_layer=-2)
    reference = EvaCLIPVisionTower(str(tmp_path), args)
    tower = EvaCLIPVisionTower(str(tmp_path), args).to(dtype)
    assert tower.dtype == dtype
    first, second = (_pixels(2),), (_pixels(3),)
    got_first, got_second = _compiled_twice(tower, lambda module, images: module(images), first, second)
    for got, (images,) in ((got_first, first), (got_second, second)):
        expected = _eager(reference, lambda module, x: module(x), (images,))
        assert got.shape == expected.shape
        error = (got.float() - expected).norm() / expected.norm()
        assert 0 < error < 2e-2, error  # half-precision rounding happened, and no more than that


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_export_with_a_dynamic_batch_equals_eager(trainable):
    """torch.export under no_grad (what inference export does) with a symbolic batch dimension: the exported program
    runs another batch size and gives the eager numbers, whether the parameters require grad or not."""
    torch.manual_seed(0)
    model = _randomize(EvaCLIPVisionModel(tiny_vision_config("eva02"))).eval().requires_grad_(trainable)
    with torch.no_grad():
        exported_module = export_with_dynamic_batch(
            model, {"pixel_values": _pixels(2), "output_hidden_states": True}, batched=["pixel_values"]
        )
        pixel_values = _pixels(5)
        exported = exported_module(pixel_values=pixel_values, output_hidden_states=True)
        expected = model(pixel_values, output_hidden_states=True)
    _assert_outputs_equal(exported, expected)


# --------------------------------------------------------------------------------------------------------------------
# Attention backends and checkpointing layers of transformers
# --------------------------------------------------------------------------------------------------------------------

needs_attention_interface = pytest.mark.skipif(
    _compat.ALL_ATTENTION_FUNCTIONS is None, reason="transformers without AttentionInterface (4.37: eager/sdpa/flash)"
)


def _with_attention(model: EvaCLIPPreTrainedModel, implementation: str) -> EvaCLIPPreTrainedModel:
    model.set_attn_implementation(implementation)
    return model


def _run_both_towers(vision: EvaCLIPVisionModel, text: EvaCLIPTextModel, inputs: dict) -> tuple:
    with torch.no_grad():
        return (vision(inputs["pixel_values"], output_hidden_states=True),
                text(inputs["input_ids"], attention_mask=inputs["attention_mask"]))


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    vision = _randomize(EvaCLIPVisionModel(tiny_vision_config("eva02", num_hidden_layers=2, hidden_size=64))).eval()
    text = _randomize(EvaCLIPTextModel(tiny_text_config(hidden_size=64))).eval()
    ids, mask = _text(2)
    return vision, text, {"pixel_values": _pixels(2), "input_ids": ids, "attention_mask": mask}


@needs_attention_interface
def test_sdpa_backend_equals_eager(towers):
    """transformers' sdpa function on both towers (the text tower with causal + padding mask) against eager attention
    on the same weights."""
    vision, text, inputs = towers
    expected = _run_both_towers(_with_attention(vision, "eager"), _with_attention(text, "eager"), inputs)
    got = _run_both_towers(_with_attention(vision, "sdpa"), _with_attention(text, "sdpa"), inputs)
    assert vision.config._attn_implementation == "sdpa" and text.config._attn_implementation == "sdpa"
    _assert_outputs_equal(got, expected)


FLEX_SCRIPT = """
import sys, torch
from test_integrations import _randomize, _text, tiny_text_config, tiny_vision_config
from llava_evaclip import EvaCLIPVisionModel
from llava_evaclip.modeling_evaclip import EvaCLIPTextModel
torch.manual_seed(0)
vision = _randomize(EvaCLIPVisionModel(tiny_vision_config("eva02", num_hidden_layers=2, hidden_size=64))).eval()
text = _randomize(EvaCLIPTextModel(tiny_text_config(hidden_size=64))).eval()
pixel_values, (ids, mask) = torch.randn(2, 3, 28, 28), _text(2)
with torch.no_grad():
    for name, model, run in (("vision", vision, lambda m: m(pixel_values).last_hidden_state),
                             ("text", text, lambda m: m(ids, attention_mask=mask).last_hidden_state)):
        model.set_attn_implementation("eager")
        expected = run(model)
        model.set_attn_implementation("flex_attention")
        print(name, float((run(model) - expected).abs().max()), flush=True)
"""


@needs_attention_interface
def test_flex_attention_equals_eager(tmp_path):
    """flex_attention on both towers against eager. In a child process: flex compiles its kernel. The text tower
    passes its causal + padding mask as a `BlockMask`: given the dense mask, transformers 5's flex path aborted the
    interpreter on torch 2.14's CPU kernel ("malloc(): unaligned tcache chunk", "double free or corruption")."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(PACKAGE), os.path.dirname(__file__),
                                                      os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", FLEX_SCRIPT], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=600)
    diffs = dict(line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["vision"], ["text"]))
    if "vision" not in diffs:
        pytest.skip(f"flex_attention does not run on this CPU build: {result.stderr[-500:]}")
    assert float(diffs["vision"]) <= ATOL, diffs
    assert "text" in diffs, f"the masked text tower under flex_attention died (exit {result.returncode}): " \
                            f"{result.stderr[-500:]}"
    assert float(diffs["text"]) <= ATOL, diffs


def test_flash_attention_2_equals_eager_on_gpu():
    """flash-attn needs a CUDA device and the flash-attn package; bf16, so bf16 tolerances."""
    if not _compat.is_flash_attn_available():
        pytest.skip("flash_attention_2 needs a CUDA device and the flash-attn package")
    torch.manual_seed(0)
    model = EvaCLIPVisionModel(tiny_vision_config("eva02", hidden_size=64)).to("cuda", torch.bfloat16).eval()
    pixel_values = _pixels(2).to("cuda", torch.bfloat16)
    with torch.no_grad():
        expected = _with_attention(model, "eager")(pixel_values).last_hidden_state
        got = _with_attention(model, "flash_attention_2")(pixel_values).last_hidden_state
    torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=2e-2)


@needs_attention_interface
def test_a_registered_attention_function_is_called_and_equals_eager(towers):
    from transformers import AttentionInterface

    from llava_evaclip.modeling_evaclip import eager_attention

    calls = []

    def counted_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        calls.append(type(module).__name__)
        return eager_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)

    AttentionInterface.register("evaclip_test_attention", counted_attention)
    vision, text, inputs = towers
    expected = _run_both_towers(_with_attention(vision, "sdpa"), _with_attention(text, "sdpa"), inputs)
    try:
        got = _run_both_towers(
            _with_attention(vision, "evaclip_test_attention"), _with_attention(text, "evaclip_test_attention"), inputs
        )
    finally:
        _with_attention(vision, "sdpa"), _with_attention(text, "sdpa")
    assert calls == ["EvaCLIPAttention"] * 2 + ["EvaCLIPTextAttention"] * 2
    _assert_outputs_equal(got, expected)


def test_attention_support_flags_match_the_installed_transformers():
    assert EvaCLIPPreTrainedModel._supports_sdpa and EvaCLIPPreTrainedModel._supports_flash_attn_2
    if _compat.ALL_ATTENTION_FUNCTIONS is not None:
        assert EvaCLIPPreTrainedModel._supports_flex_attn and EvaCLIPPreTrainedModel._supports_attention_backend


def test_checkpointing_layers_and_no_future_warning():
    """Where transformers has `GradientCheckpointingLayer`, the blocks are ones and transformers' own entry point
    turns checkpointing on without a deprecation warning from our override; gradients equal the plain run."""
    torch.manual_seed(0)
    model = _randomize(EvaCLIPVisionModel(tiny_vision_config("eva02"))).train()
    reference = _randomize(EvaCLIPVisionModel(tiny_vision_config("eva02"))).train()
    reference.load_state_dict(model.state_dict())
    if _compat.GradientCheckpointingLayer is not None:
        assert all(isinstance(layer, _compat.GradientCheckpointingLayer) for layer in model.vision_model.encoder.layers)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        enable()
    checkpointing = [model.vision_model.encoder] if _compat.GradientCheckpointingLayer is None else (
        model.vision_model.encoder.layers)  # 4.x: the encoder checkpoints each layer
    assert all(module.gradient_checkpointing for module in checkpointing)
    pixel_values = _pixels(2)
    grads = []
    for run in (model, reference):
        run(pixel_values).pooler_output.square().sum().backward()
        grads.append([p.grad for p in run.parameters()])
    torch.testing.assert_close(grads[0], grads[1], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# get_image_features / get_text_features as transformers' CLIPModel
# --------------------------------------------------------------------------------------------------------------------


def _takes_keyword(function, name: str) -> bool:
    parameters = inspect.signature(function).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def test_get_features_return_what_clip_returns():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    clip_config = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=28, patch_size=7),
        projection_dim=16,
    )
    clip = CLIPModel._from_config(clip_config, attn_implementation="eager").eval()  # sdpa returns no attentions
    model = _randomize(EvaCLIPModel(tiny_config("eva02"))).eval()
    # the same depths, so CLIP's and our hidden-state tuples have the same lengths
    assert (model.config.text_config.num_hidden_layers, model.config.vision_config.num_hidden_layers) == (2, 3)
    ids, mask = _text(2)
    pixel_values = _pixels(2)
    with torch.no_grad():
        for kwargs in ({}, {"return_dict": False}, {"output_hidden_states": True}, {"output_attentions": True},
                       {"output_hidden_states": True, "output_attentions": True, "return_dict": False}):
            # transformers 4.5x's CLIP takes no return_dict there (it always returns the tensor); ours takes it
            clip_kwargs = {k: v for k, v in kwargs.items() if _takes_keyword(clip.get_image_features, k)}
            clip_image = clip.get_image_features(pixel_values=pixel_values, **clip_kwargs)
            clip_text = clip.get_text_features(input_ids=ids, attention_mask=mask, **clip_kwargs)
            image = model.get_image_features(pixel_values=pixel_values, **kwargs)
            text = model.get_text_features(input_ids=ids, attention_mask=mask, **kwargs)
            assert type(image) is type(clip_image) and type(text) is type(clip_text), kwargs
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)
            vision_pooled = out.vision_model_output.pooler_output
            text_pooled = out.text_model_output.pooler_output
            projected_image = model.visual_projection(vision_pooled)
            projected_text = model.text_projection(text_pooled)
            if isinstance(clip_image, torch.Tensor):
                torch.testing.assert_close(image, projected_image, atol=ATOL, rtol=0)
                torch.testing.assert_close(text, projected_text, atol=ATOL, rtol=0)
            elif isinstance(clip_image, tuple):  # same positions as CLIP's tuple: (last_hidden_state, pooler_output)
                assert len(image) == len(clip_image) and len(text) == len(clip_text), kwargs
                assert [len(x) for x in image[2:]] == [len(x) for x in clip_image[2:]], kwargs
                assert [len(x) for x in text[2:]] == [len(x) for x in clip_text[2:]], kwargs
                torch.testing.assert_close(image[1], projected_image, atol=ATOL, rtol=0)
                torch.testing.assert_close(text[1], projected_text, atol=ATOL, rtol=0)
            else:  # the tower's hidden states / attentions where CLIP gives them (they are the tower's own)
                assert image.keys() == clip_image.keys() and text.keys() == clip_text.keys(), kwargs
                torch.testing.assert_close(image.pooler_output, projected_image, atol=ATOL, rtol=0)
                torch.testing.assert_close(text.pooler_output, projected_text, atol=ATOL, rtol=0)
                full = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                             output_hidden_states=True, output_attentions=True)
                for name in ("hidden_states", "attentions"):
                    for ours, reference, tower in ((image, clip_image, full.vision_model_output),
                                                   (text, clip_text, full.text_model_output)):
                        if reference.get(name) is not None:
                            assert len(ours[name]) == len(reference[name]), (name, kwargs)
                            torch.testing.assert_close(ours[name], getattr(tower, name), atol=ATOL, rtol=0)
