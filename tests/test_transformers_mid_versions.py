"""Behaviour that differs between transformers 4.37.2 and 5.x in ways the CI lines do not exercise: the 4.48-4.56
releases (a plain-dict attention registry, self-checkpointing layers whose checkpoint function a wrapping LLaVA
sets, per-tower attn_implementation on 4.56, CLIP ignoring `torchscript` on 4.56, LLaVA's `get_decoder` of
4.53). Each test takes transformers' own CLIP (or LLaVA) on the installed version as the reference."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config, tiny_vision_config
from llava_evaclip import EvaCLIPModel, EvaCLIPVisionModel, _compat
from test_hf_llava import image_prompt, tiny_llama_config, tiny_llava

IMAGE_TOKEN_ID = 63


def _text_and_pixels() -> dict:
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = 98
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))}


@pytest.mark.skipif(_compat.ALL_ATTENTION_FUNCTIONS is None, reason="transformers without a kernel registry (4.37)")
def test_kernel_added_to_transformers_registry_runs_and_matches_sdpa() -> None:
    """4.48-4.49 keep `ALL_ATTENTION_FUNCTIONS` as a plain dict (no `AttentionInterface`, no `valid_keys`): every
    forward failed there with AttributeError, whatever the kernel. A kernel added to the registry by name (the
    dict's `[]=`, `AttentionInterface.register` where it exists) is dispatched and gives sdpa's numbers."""
    calls = []
    registry = _compat.ALL_ATTENTION_FUNCTIONS

    def counted(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return registry["sdpa"](module, *args, **kwargs)

    register = getattr(type(registry), "register", None)
    if register is not None:
        register("evaclip_mid_counted", counted)
    else:
        registry["evaclip_mid_counted"] = counted
    config = tiny_config("eva02")
    torch.manual_seed(0)
    reference = EvaCLIPModel(config).eval()
    config._attn_implementation = "evaclip_mid_counted"
    config.vision_config._attn_implementation = "evaclip_mid_counted"
    config.text_config._attn_implementation = "evaclip_mid_counted"
    torch.manual_seed(0)
    model = EvaCLIPModel(config).eval()
    model.load_state_dict(reference.state_dict())
    inputs = _text_and_pixels()
    with torch.no_grad():
        expected = reference(**inputs).logits_per_image
        actual = model(**inputs).logits_per_image
    assert calls, "the registered kernel was not called"
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_per_tower_attn_implementation_dict_is_honoured_as_clip_honours_it(tmp_path) -> None:
    """4.56 passes a dict `attn_implementation` on to the sub-configs as 5.x does; `_inherit_attn_implementation`
    assumed that only 5.x does and copied the top config's kernel over both towers, so the per-tower choice was lost
    (CLIPModel keeps it). Skipped where CLIP itself does not keep it."""
    from transformers import CLIPConfig, CLIPModel

    EvaCLIPModel(tiny_config("eva02")).save_pretrained(tmp_path / "eva")
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=28, patch_size=7), projection_dim=16)).save_pretrained(tmp_path / "clip")
    choice = {"vision_config": "eager", "text_config": "sdpa"}
    try:
        clip = CLIPModel.from_pretrained(tmp_path / "clip", attn_implementation=choice)
    except Exception as error:  # noqa: BLE001 - versions that refuse a dict
        pytest.skip(f"CLIPModel refuses a per-tower attn_implementation here: {error}")
    clip_towers = (clip.config.vision_config._attn_implementation, clip.config.text_config._attn_implementation)
    if clip_towers != ("eager", "sdpa"):
        pytest.skip(f"CLIPModel does not keep a per-tower choice here ({clip_towers})")
    from llava_evaclip.modeling_evaclip import resolve_attn_implementation

    model = EvaCLIPModel.from_pretrained(tmp_path / "eva", attn_implementation=choice)
    assert (resolve_attn_implementation(model.config.vision_config),
            resolve_attn_implementation(model.config.text_config)) == clip_towers


def test_build_llava_from_a_language_model_dir_loads_its_weights(tmp_path) -> None:
    """4.53's LlavaForConditionalGeneration.get_decoder returns the bound method `self.model.get_decoder`
    instead of the decoder: build_llava from a language-model dir failed with "'function' object has no attribute
    'load_state_dict'"."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    language = LlamaForCausalLM(tiny_llama_config())
    language.save_pretrained(tmp_path / "lm")
    from llava_evaclip.hf import build_llava

    model = build_llava(tiny_vision_config("eva02"), str(tmp_path / "lm"), image_token_index=IMAGE_TOKEN_ID)
    assert torch.equal(model.get_input_embeddings().weight, language.get_input_embeddings().weight)
    assert torch.equal(model.get_output_embeddings().weight, language.get_output_embeddings().weight)
    expected = language.model.layers[0].self_attn.q_proj.weight
    assert any(torch.equal(p, expected) for n, p in model.named_parameters()
               if n.endswith("layers.0.self_attn.q_proj.weight"))


def test_reentrant_checkpointing_enabled_on_llava_keeps_the_towers_gradients() -> None:
    """LLaVA's `gradient_checkpointing_enable(use_reentrant=True)` hands a reentrant checkpoint to every layer, ours
    included, without going through our `_set_gradient_checkpointing`. Where transformers has
    `GradientCheckpointingLayer` (4.52+; seen on 4.53.3 / 4.56.2) the block then checkpointed itself reentrantly,
    and behind the frozen patch embedding every tower layer silently got no gradient; 4.37's path
    (`EvaCLIPEncoder._run_layer`) runs it non-reentrant. Reference: the same step without checkpointing."""
    def tower_grads(checkpointing: bool) -> dict:
        torch.manual_seed(0)
        model = tiny_llava(tiny_vision_config("eva02")).train()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("vision_tower" in name and ".encoder.layers." in name)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        prompt = image_prompt(1, 16)
        pixel_values = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
        model(**prompt, pixel_values=pixel_values).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    expected = tower_grads(False)
    actual = tower_grads(True)
    layer0 = [n for n in expected if ".layers.0." in n]
    assert layer0 and all(expected[n] is not None for n in layer0)
    for name in layer0:
        assert actual[name] is not None, f"{name} got no gradient under reentrant checkpointing"
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5)


def test_build_llava_from_dirs_logs_no_torch_dtype_deprecation(tmp_path) -> None:
    """4.56 renamed the config's `torch_dtype` to `dtype` and logs "`torch_dtype` is deprecated!" when the old name is
    set: build_llava cleared the parts' checkpoint dtype through the old name there."""
    import io
    import logging

    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from llava_evaclip.hf import build_llava

    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "lm")
    EvaCLIPVisionModel(tiny_vision_config("eva02")).save_pretrained(tmp_path / "vision")
    cache_clear = getattr(getattr(hf_logging, "warning_once", None), "cache_clear", None)
    if cache_clear is not None:  # `logger.warning_once` logs a message once per process
        cache_clear()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        build_llava(str(tmp_path / "vision"), str(tmp_path / "lm"), image_token_index=IMAGE_TOKEN_ID)
    finally:
        logger.removeHandler(handler)
    assert "torch_dtype` is deprecated" not in stream.getvalue()


def test_transformers_4_47_attention_choice_flag_is_never_written_and_dropped_when_read(tmp_path):
    """transformers 4.47 keeps `_attn_implementation_autoset` (whether the model picked its attention kernel) in the
    config and `to_dict` writes it; a config.json holding it then loads there with eager attention instead of sdpa
    (seen: a converted EVA-CLIP loaded eager on 4.47.1, CLIP saved by save_pretrained sdpa). Written nowhere (the full
    config, each tower's, the JSON file), and a file written before (the flag in it) loads without it."""
    from llava_evaclip import EvaCLIPConfig, EvaCLIPVisionConfig

    config = tiny_config("eva02")
    for each in (config, config.vision_config, config.text_config):
        each._attn_implementation_autoset = True
    written = config.to_dict()
    assert "_attn_implementation_autoset" not in written
    assert not any("_attn_implementation_autoset" in written[key] for key in ("text_config", "vision_config"))
    config.save_pretrained(tmp_path)
    assert "_attn_implementation_autoset" not in (tmp_path / "config.json").read_text()

    for key in ("text_config", "vision_config"):
        written[key]["_attn_implementation_autoset"] = True
    written["_attn_implementation_autoset"] = True
    read = EvaCLIPConfig.from_dict(written)
    tower = EvaCLIPVisionConfig.from_dict(written["vision_config"])
    for each in (read, read.text_config, read.vision_config, tower):
        assert getattr(each, "_attn_implementation_autoset", False) is False


def test_loads_from_several_threads_at_once_leave_torch_unpatched(tmp_path):
    """transformers 4.5x (and 4.x with `low_cpu_mem_usage=True`) builds the model to load under accelerate's
    `init_empty_weights`, which swaps `nn.Module.register_parameter` class-wide. Two threads loading at once (thread
    ranks, a server loading towers in parallel) restored each other's swap, so every module built afterwards in the
    process had meta parameters ("Cannot copy out of meta tensor"), and LLaVA's tower, loading while another thread
    held the swap, took it for a parent model's meta build and built itself empty. Loads of our models take turns."""
    import threading
    from types import SimpleNamespace

    from conftest import randomize, tiny_vision_config
    from llava_evaclip.processing import build_image_processor
    from llava_evaclip.tower import EvaCLIPVisionTower

    randomize(EvaCLIPVisionModel(tiny_vision_config())).save_pretrained(tmp_path)
    build_image_processor(tiny_vision_config()).save_pretrained(tmp_path)
    expected = EvaCLIPVisionModel.from_pretrained(tmp_path).state_dict()
    register_parameter, register_buffer = torch.nn.Module.register_parameter, torch.nn.Module.register_buffer
    loaded: list = [None] * 4
    start = threading.Barrier(len(loaded))

    def load(index: int) -> None:
        start.wait()
        if index % 2:  # LLaVA's tower, which builds on the meta device when it sees a parent model's meta build
            tower = EvaCLIPVisionTower(str(tmp_path), SimpleNamespace(mm_vision_select_layer=-2), delay_load=True)
            tower.load_model()
            loaded[index] = tower.vision_tower
        else:
            loaded[index] = EvaCLIPVisionModel.from_pretrained(tmp_path, low_cpu_mem_usage=True)

    try:
        for _ in range(3):
            threads = [threading.Thread(target=load, args=(index,)) for index in range(len(loaded))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert torch.nn.Module.register_parameter is register_parameter
            assert torch.nn.Module.register_buffer is register_buffer
            assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
            for model in loaded:
                state = model.state_dict()
                assert state.keys() == expected.keys()
                assert all(torch.equal(state[key], value) for key, value in expected.items())
    finally:  # a failure must not leave the swap to the rest of the session
        torch.nn.Module.register_parameter, torch.nn.Module.register_buffer = register_parameter, register_buffer
