"""The model under the tools users combine it with (RoPE tables in low-precision builds and inference mode, PEFT on the
patch embedding, per-tower attention kernels, torchscript, torch.func, module hooks, torch.export with the loss,
meta-device init), each against an independent reference (BAAI's code, an eager twin, transformers' own models)."""

from __future__ import annotations

import copy

import pytest
import torch

from llava_evaclip import EvaCLIPVisionModel

from conftest import TORCH_VERSION, export_with_dynamic_batch, tiny_vision_config


def test_rope_table_built_under_a_half_precision_default_dtype_is_baais_fp32_table(tmp_path) -> None:
    """transformers 4.x's `from_pretrained(torch_dtype=bf16)` builds the model under a bf16 default dtype; the rotary
    positions must still be computed in fp32 (rounded to bf16 they put the angles ~0.02 off at EVA02-L-336's grid)."""
    rope_module = pytest.importorskip("consisid_eva_clip.rope")
    config = tiny_vision_config("eva02", image_size=168, patch_size=7)  # a 24 x 24 grid, as EVA02-L-336's
    EvaCLIPVisionModel(config).save_pretrained(tmp_path)
    baai = rope_module.VisionRotaryEmbeddingFast(dim=config.head_dim // 2, pt_seq_len=16, ft_seq_len=24)
    for dtype in (torch.bfloat16, torch.float16):
        model = EvaCLIPVisionModel.from_pretrained(tmp_path, torch_dtype=dtype)
        rotary = model.vision_model.rotary_embedding
        for cos, sin in ((rotary.cos, rotary.sin), rotary.compute_table(24, 24)):
            torch.testing.assert_close(cos[1:].float(), baai.freqs_cos, atol=1e-6, rtol=0, msg=str(dtype))
            torch.testing.assert_close(sin[1:].float(), baai.freqs_sin, atol=1e-6, rtol=0, msg=str(dtype))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        cos, sin = EvaCLIPVisionModel(config).vision_model.rotary_embedding.compute_table(24, 24)
    finally:
        torch.set_default_dtype(previous)
    torch.testing.assert_close(cos[1:].float(), baai.freqs_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[1:].float(), baai.freqs_sin, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["other_grid", "bf16_checkpoint"])
def test_training_after_an_inference_mode_call_at_the_same_grid(case: str, tmp_path) -> None:
    """The rotary table cached by a call under torch.inference_mode() must not be an inference tensor: a later
    training step at that grid would fail ("Inference tensors cannot be saved for backward"). Cases: another grid
    (`interpolate_pos_encoding`), and the native grid of a model loaded with `torch_dtype=bf16` (its fp32 table is
    cast per call). Gradients equal those of a twin that never ran in inference mode."""
    model = EvaCLIPVisionModel(tiny_vision_config("eva02")).eval()
    size, dtype = (42, torch.float32) if case == "other_grid" else (28, torch.bfloat16)
    if case == "bf16_checkpoint":
        model.save_pretrained(tmp_path)
        model = EvaCLIPVisionModel.from_pretrained(tmp_path, torch_dtype=dtype).eval()
    twin = copy.deepcopy(model)
    pixel_values = torch.randn(2, 3, size, size, dtype=dtype)
    with torch.inference_mode():
        model(pixel_values, interpolate_pos_encoding=True)
    for net in (model, twin):
        net.train()(pixel_values, interpolate_pos_encoding=True).last_hidden_state.float().square().sum().backward()
    for (name, ours), theirs in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_lora_on_the_patch_embedding_runs_and_equals_the_merged_model() -> None:
    """PEFT LoRA on `patch_embedding` (its own Conv2d wrapper, without `padding_mode`) ran into an AttributeError in
    every mode. The adapter's output equals PEFT's merged model (plain layers, the fast path), with and without grad."""
    peft = pytest.importorskip("peft")
    base = EvaCLIPVisionModel(tiny_vision_config("eva02")).eval()
    reference = copy.deepcopy(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=["patch_embedding", "q_proj", "fc1_up", "fc2"])
    adapted = peft.get_peft_model(base, config).eval()
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.enable_grad():
        trained = adapted(pixel_values=pixel_values).last_hidden_state
    trained.square().sum().backward()
    lora_a = adapted.get_base_model().vision_model.embeddings.patch_embedding.lora_A["default"].weight
    assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0
    with torch.no_grad():
        adapter_out = adapted(pixel_values=pixel_values).last_hidden_state
        merged_out = adapted.merge_and_unload()(pixel_values).last_hidden_state
        base_out = reference(pixel_values).last_hidden_state
    torch.testing.assert_close(adapter_out, merged_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(trained.detach(), merged_out, atol=1e-5, rtol=0)
    assert (adapter_out - base_out).abs().max() > 1e-2  # the adapters took part


_SEEN_KERNELS: dict = {}


def _register_counting_kernels() -> None:
    """Attention kernels that record which model type called them, then run transformers' sdpa."""
    from transformers import AttentionInterface

    def counting(name):
        def kernel(module, *args, **kwargs):
            _SEEN_KERNELS.setdefault(module.config.model_type, set()).add(name)
            return AttentionInterface._global_mapping["sdpa"](module, *args, **kwargs)
        return kernel

    for name in ("r2_counting_a", "r2_counting_b"):
        AttentionInterface.register(name, counting(name))


def _attention_calls(model, inputs: dict) -> dict:
    _SEEN_KERNELS.clear()
    with torch.no_grad():
        model(**inputs)
    return dict(_SEEN_KERNELS)


@pytest.mark.skipif(not __import__("llava_evaclip._compat", fromlist=["x"]).SUB_CONFIGS_TAKE_ATTN_IMPLEMENTATION,
                    reason="transformers 4.x takes one attn_implementation for the whole model")
def test_per_tower_attn_implementation_reaches_each_tower_as_in_clip(tmp_path) -> None:
    """transformers 5's `attn_implementation={"vision_config": ..., "text_config": ...}` sets each tower's kernel (the
    top config then falls back to sdpa); EvaCLIPModel copied the top one over both towers, so neither choice took
    effect. transformers' CLIPModel with the same argument is the reference."""
    from transformers import CLIPConfig, CLIPModel

    from conftest import tiny_config
    from llava_evaclip import EvaCLIPModel

    ids = torch.randint(1, 97, (2, 7))
    ids[:, -1] = 98
    inputs = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 28, 28)}
    EvaCLIPModel(tiny_config("eva02")).save_pretrained(tmp_path / "eva")
    clip_config = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=28, patch_size=7), projection_dim=16)
    CLIPModel(clip_config).save_pretrained(tmp_path / "clip")
    _register_counting_kernels()
    for choice in ({"vision_config": "r2_counting_a", "text_config": "r2_counting_b"},
                   {"vision_config": "r2_counting_b"}):
        eva = EvaCLIPModel.from_pretrained(tmp_path / "eva", attn_implementation=choice).eval()
        clip = CLIPModel.from_pretrained(tmp_path / "clip", attn_implementation=choice).eval()
        expected = {("evaclip_vision_model" if k.startswith("clip_vision") else "evaclip_text_model"): v
                    for k, v in _attention_calls(clip, inputs).items()}
        assert _attention_calls(eva, inputs) == expected, choice


def test_a_reused_config_takes_the_new_attn_implementation() -> None:
    """A config that built a model (its towers then hold the kernel it resolved to) builds another with
    `_from_config(config, attn_implementation="eager")`: both towers run eager attention, as the eager reference,
    and call no fused attention."""
    from conftest import tiny_config
    from llava_evaclip import EvaCLIPModel

    first = EvaCLIPModel(tiny_config("eva02")).eval()
    eager = EvaCLIPModel._from_config(first.config, attn_implementation="eager").eval()
    eager.load_state_dict(first.state_dict())
    ids = torch.randint(1, 97, (2, 7))
    ids[:, -1] = 98
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            out = eager(input_ids=ids, pixel_values=torch.randn(2, 3, 28, 28), output_attentions=False)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert calls == []
    assert out.logits_per_image.shape == (2, 2)


@pytest.mark.parametrize("family", ["eva02", "eva18b"])
def test_torchscript_config_returns_what_clip_returns_and_traces(family: str) -> None:
    """transformers 4.x's `torchscript=True` makes CLIP return tuples so that torch.jit.trace takes it; EVA-CLIP
    returned a ModelOutput there (the trace failed on the dict). On 5.x, which dropped the flag, both return model
    outputs. Where tuples come back, the traced model gives the eager numbers at another batch size."""
    import warnings

    from transformers import CLIPVisionConfig, CLIPVisionModel

    pixel_values = torch.randn(2, 3, 28, 28)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, image_size=28, patch_size=7, torchscript=True))
    model = EvaCLIPVisionModel(tiny_vision_config(family, num_hidden_layers=2, torchscript=True)).eval()
    with torch.no_grad():
        expected_tuple = isinstance(clip.eval()(pixel_values), tuple)
        assert isinstance(model(pixel_values), tuple) == expected_tuple
        assert not isinstance(model(pixel_values, return_dict=True), tuple)
        if expected_tuple:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(model, (pixel_values,))
            other = torch.randn(3, 3, 28, 28)
            eager = model(other, return_dict=True)
            got = traced(other)
            torch.testing.assert_close(got[0], eager.last_hidden_state, atol=1e-5, rtol=0)
            torch.testing.assert_close(got[1], eager.pooler_output, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's vmap fallback for sdpa
@pytest.mark.skipif(TORCH_VERSION < (2, 2),
                    reason="torch 2.1 has no vmap rule for its fused attention (eager attention only)")
def test_vmap_over_both_towers_equals_the_batched_eager_call() -> None:
    """torch.func.vmap under no_grad (per-sample functions, as with transformers' CLIP): the eager inference paths'
    `out=` matmuls have no batching rule and the text tower's id-range check calls `.item()`; inside a torch.func
    transform both step aside. Each sample's result equals the batched eager call."""
    from conftest import tiny_text_config
    from llava_evaclip import EvaCLIPTextModel

    vision = EvaCLIPVisionModel(tiny_vision_config("eva02", num_hidden_layers=2)).eval()
    text = EvaCLIPTextModel(tiny_text_config()).eval()
    pixel_values = torch.randn(3, 3, 28, 28)
    ids = torch.randint(1, 97, (3, 7))
    ids[:, -1] = 98
    with torch.no_grad():
        images = torch.func.vmap(lambda image: vision(image[None]).pooler_output[0])(pixel_values)
        texts = torch.func.vmap(lambda row: text(row[None]).pooler_output[0])(ids)
        torch.testing.assert_close(images, vision(pixel_values).pooler_output, atol=1e-5, rtol=0)
        torch.testing.assert_close(texts, text(ids).pooler_output, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, module", [("eva02", "ffn_ln"), ("eva02", "activation_fn"), ("eva01", "activation_fn")])
def test_hooks_inside_the_mlp_see_module_call_inputs_in_inference(family: str, module: str) -> None:
    """The no-grad MLP path ran `ffn_ln` on [tokens, C] row blocks and folded SiLU into the matmuls, so a forward
    hook there saw [B * N, C] (or never ran) and a hook editing token 0 edited channel 0 of every token. With hooks
    present the MLP takes module calls: the hook sees [B, N, C] and the output equals the grad-mode (module-call)
    run with the same hook."""
    model = EvaCLIPVisionModel(tiny_vision_config(family)).eval()
    seen = []

    def ablate_first_token(_, __, output):
        seen.append(tuple(output.shape))
        output = output.clone()
        output[:, 0] = 0
        return output

    getattr(model.vision_model.encoder.layers[0].mlp, module).register_forward_hook(ablate_first_token)
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.enable_grad():
        expected = model(pixel_values).last_hidden_state.detach()
    with torch.no_grad():
        got = model(pixel_values).last_hidden_state
    with torch.inference_mode():
        got_inference = model(pixel_values).last_hidden_state
    assert seen == [(2, 17, model.config.intermediate_size)] * 3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_inference, expected, atol=1e-5, rtol=0)


def test_export_with_a_dynamic_batch_and_return_loss_equals_eager() -> None:
    """torch.export of EvaCLIPModel with `return_loss=True` and a symbolic batch: the loss's `len(logits)` pinned the
    batch to the example's ("Constraints violated"). The program runs another batch size with the eager numbers."""
    from conftest import tiny_config
    from llava_evaclip import EvaCLIPModel

    model = EvaCLIPModel(tiny_config("bige", num_hidden_layers=1)).eval()

    def inputs(batch: int) -> dict:
        ids = torch.randint(1, 97, (batch, 7))
        ids[:, -1] = 98
        return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 28, 28), "return_loss": True}

    with torch.no_grad():
        exported = export_with_dynamic_batch(model, inputs(2), ["input_ids", "pixel_values"], min_batch=2, max_batch=16)
        other = inputs(4)
        got, expected = exported(**other), model(**other)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.logits_per_image, expected.logits_per_image, atol=1e-5, rtol=0)


def test_meta_device_build_then_to_empty_and_load_state_dict_equals_the_model() -> None:
    """FSDP-style init: build on the meta device, `to_empty()`, load a state dict. The rotary tables are non-persistent
    buffers no checkpoint holds, so they were left as uninitialised memory (NaN or garbage features); they are
    recomputed on the move off meta. The result equals the model built normally."""
    config = tiny_vision_config("eva02")
    reference = EvaCLIPVisionModel(config).eval()
    with torch.device("meta"):
        model = EvaCLIPVisionModel(config)
    model.to_empty(device="cpu").load_state_dict(reference.state_dict(), strict=True)
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(pixel_values).last_hidden_state,
                                   reference(pixel_values).last_hidden_state, atol=1e-6, rtol=0)


def test_global_module_hooks_see_every_projection_in_inference() -> None:
    """Global forward hooks (`register_module_forward_hook`, as activation recorders and torch's ModuleTracker use)
    never saw the attention and MLP linears under no_grad: the inference paths ran them as direct matmuls. With such
    hooks the linears are module calls, and each hook sees the grad-mode (module-call) run's outputs."""
    model = EvaCLIPVisionModel(tiny_vision_config("eva02")).eval()
    names = {module: name for name, module in model.named_modules()}
    recorded: list = []

    def record(module, args, output):
        if isinstance(module, torch.nn.Linear):
            recorded.append((names[module], output.detach().clone()))

    pixel_values = torch.randn(2, 3, 28, 28)
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        with torch.enable_grad():
            model(pixel_values)
        expected, recorded[:] = list(recorded), []
        with torch.no_grad():
            model(pixel_values)
    finally:
        handle.remove()
    assert [name for name, _ in recorded] == [name for name, _ in expected]
    assert len(expected) == 7 * model.config.num_hidden_layers  # q, k, v, out; fc1, fc1_up, fc2
    for (name, got), (_, want) in zip(recorded, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
