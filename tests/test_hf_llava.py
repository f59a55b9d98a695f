"""EVA-CLIP as the vision tower of transformers' own LLaVA / LLaVA-NeXT (issue 8), on transformers 5.x and 4.37.2.

The reference for every feature check is our `EvaCLIPVisionModel` called directly (hidden_states[layer], CLS dropped
for "default"); what is tested is that LLaVA drives the tower the same way, saves and reloads it, and trains through it.
"""

from __future__ import annotations

import inspect
import json
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

import llava_evaclip.modeling_evaclip as modeling
from conftest import needs_cpu_fp16, tiny_config, tiny_vision_config
from llava_evaclip import EvaCLIPModel, EvaCLIPVisionConfig, EvaCLIPVisionModel
from llava_evaclip._compat import SUB_CONFIGS_TAKE_ATTN_IMPLEMENTATION
from llava_evaclip.hf import (
    build_llava,
    build_llava_config,
    build_llava_processor,
    _decoder,
    default_image_grid_pinpoints,
    get_multi_modal_projector,
    get_vision_tower,
    is_llava_next_available,
    set_vision_attn_implementation,
    supports_feature_layer_lists,
)
from llava_evaclip.processing import build_image_processor

TF5 = int(transformers.__version__.split(".")[0]) >= 5
# From transformers 4.48 LLaVA's model no longer expands a single image token: the prompt holds one per feature.
MODEL_NEEDS_EXPANDED_TOKENS = tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (4, 48)
needs_next = pytest.mark.skipif(
    not is_llava_next_available(),
    reason=f"LlavaNextForConditionalGeneration arrived in transformers 4.39; {transformers.__version__} lacks it",
)
needs_layer_lists = pytest.mark.skipif(
    not supports_feature_layer_lists(),
    reason=f"transformers {transformers.__version__}'s LLaVA reads one int vision_feature_layer (lists came in 4.49)",
)
if is_llava_next_available():
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessor
# LLaVA-NeXT's image processor pads each image's tiles to the batch's largest count (`do_pad`, there in 4.43.4, not in
# 4.40.2); before, it returns one array per image, so a batch of differently shaped images cannot become one tensor.
needs_tile_padding = pytest.mark.skipif(
    is_llava_next_available() and not hasattr(LlavaNextImageProcessor(), "do_pad"),
    reason=f"transformers {transformers.__version__}'s LlavaNextImageProcessor cannot batch images of different "
           "tile counts (it has no do_pad)",
)
# transformers >= 4.45's processors expand each image token to the model's feature count (given patch_size);
# older ones leave one token per image, which their model expands.
PROCESSOR_EXPANDS = "patch_size" in inspect.signature(LlavaProcessor.__init__).parameters

IMAGE_TOKEN_ID = 63  # the last id of the tiny LM's vocabulary
WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + "a photo of cat dog what is in the image ? USER : ASSISTANT".split()


# --------------------------------------------------------------------------------------------------------------------
# Tiny parts
# --------------------------------------------------------------------------------------------------------------------


def tiny_llama_config(vocab_size: int = 64, **overrides) -> LlamaConfig:
    # No padding_idx: a trained LM has no all-zero embedding row, and 4.37.2's LLaVA takes all-zero rows for image
    # slots.
    fields = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=None,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_tokenizer():
    """A word-level tokenizer built offline, without an image token (as Vicuna / Llama ship)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # 4.37.2's LlavaProcessor accepts only Llama tokenizer classes; transformers 5's LlamaTokenizer rebuilds its own
    # BPE model on reload, so there the generic fast tokenizer keeps the word-level model.
    if TF5:
        from transformers import PreTrainedTokenizerFast as tokenizer_class
    else:
        from transformers import LlamaTokenizerFast as tokenizer_class
    return tokenizer_class(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>")


def tiny_llava(vision_config=None, next_=False, **kwargs):
    """A random LLaVA (-NeXT) from configs via build_llava (nothing is loaded without dirs)."""
    vision_config = vision_config if vision_config is not None else tiny_vision_config()
    return build_llava(vision_config, tiny_llama_config(), image_token_index=IMAGE_TOKEN_ID, next=next_, **kwargs)


def random_images(sizes):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def reference_features(tower: EvaCLIPVisionModel, pixel_values, layer, strategy) -> torch.Tensor:
    """What LLaVA should hand its projector: our tower's hidden_states[layer] (CLS dropped for "default")."""
    hidden_states = tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
    layers = [layer] if isinstance(layer, int) else layer
    selected = [hidden_states[i][:, 1:] if strategy == "default" else hidden_states[i] for i in layers]
    return torch.cat(selected, dim=-1)


def standalone_tower(model) -> EvaCLIPVisionModel:
    """A separate EvaCLIPVisionModel with the LLaVA tower's weights, called outside LLaVA."""
    tower = get_vision_tower(model)
    reference = EvaCLIPVisionModel(EvaCLIPVisionConfig.from_dict(tower.config.to_dict())).eval()
    reference.load_state_dict(tower.state_dict())
    return reference


class ProjectorInput:
    """Captures what LLaVA feeds its multimodal projector."""

    def __init__(self, model):
        self.captured = []
        self.handle = get_multi_modal_projector(model).register_forward_hook(
            lambda module, args, output: self.captured.append(args[0].detach())
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def image_prompt(batch: int, tokens_per_image: int, text_len: int = 5) -> dict[str, torch.Tensor]:
    """input_ids with the image placeholder(s) first (one token before 4.48, whose model expands it; one per feature
    from 4.48), its attention mask (4.37.2 requires one) and labels."""
    count = tokens_per_image if MODEL_NEEDS_EXPANDED_TOKENS else 1
    text = torch.arange(4, 4 + text_len).repeat(batch, 1)
    input_ids = torch.cat([torch.full((batch, count), IMAGE_TOKEN_ID), text], dim=1)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids)


def assert_state_dicts_equal(left: dict, right: dict) -> None:
    assert set(left) == set(right)
    for key in left:
        assert torch.equal(left[key], right[key]), key


# --------------------------------------------------------------------------------------------------------------------
# LLaVA-1.5: config, save / load
# --------------------------------------------------------------------------------------------------------------------


def test_llava_config_with_evaclip_vision_config_builds_our_tower():
    vision_config = tiny_vision_config()
    config = LlavaConfig(vision_config=vision_config, text_config=tiny_llama_config(), image_token_index=IMAGE_TOKEN_ID)
    model = LlavaForConditionalGeneration(config)
    tower = get_vision_tower(model)
    assert type(tower) is EvaCLIPVisionModel
    assert isinstance(model.config.vision_config, EvaCLIPVisionConfig)
    assert model.config.vision_config.model_type == "evaclip_vision_model"
    projector = get_multi_modal_projector(model)
    assert projector.linear_1.in_features == vision_config.hidden_size
    assert projector.linear_2.out_features == model.config.text_config.hidden_size


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    model = tiny_llava(tiny_vision_config("eva01_layer_scale")).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llava"
    assert saved["vision_config"]["model_type"] == "evaclip_vision_model"
    assert saved["vision_config"]["layer_scale_init_value"] == 0.1
    assert "auto_map" not in saved  # nothing for trust_remote_code to fetch

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config.vision_config, EvaCLIPVisionConfig)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert type(get_vision_tower(reloaded)) is EvaCLIPVisionModel
    assert_state_dicts_equal(model.state_dict(), reloaded.state_dict())
    for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size", "layer_scale_init_value", "use_rope"):
        assert getattr(reloaded.config.vision_config, key) == getattr(model.config.vision_config, key)

    pixel_values = torch.randn(1, 3, 28, 28)
    prompt = image_prompt(1, 16)
    with torch.no_grad():
        expected = model(**prompt, pixel_values=pixel_values).logits
        actual = reloaded(**prompt, pixel_values=pixel_values).logits
    assert torch.equal(expected, actual)


def test_from_pretrained_without_importing_llava_evaclip_names_the_missing_type(tmp_path, monkeypatch):
    """Without `import llava_evaclip` transformers cannot resolve our vision model type (documented in the README).
    Simulated in-process by hiding the registration `import llava_evaclip` makes (a fresh interpreter is 10x slower)."""
    tiny_llava().save_pretrained(tmp_path)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    monkeypatch.delitem(CONFIG_MAPPING._extra_content, "evaclip_vision_model")
    # 5.x: "ValueError: Unrecognized model type for subconfig: evaclip_vision_model ..."; 4.37.2 and 5.5: "KeyError".
    with pytest.raises((ValueError, KeyError), match="evaclip_vision_model"):
        LlavaForConditionalGeneration.from_pretrained(tmp_path)
    monkeypatch.undo()
    assert type(get_vision_tower(LlavaForConditionalGeneration.from_pretrained(tmp_path))) is EvaCLIPVisionModel


# --------------------------------------------------------------------------------------------------------------------
# LLaVA-1.5: features, loss, gradients
# --------------------------------------------------------------------------------------------------------------------

FEATURE_CASES = [
    pytest.param("eva02", -2, "default", id="eva02-layer-2-default"),
    pytest.param("eva02", -1, "full", id="eva02-layer-1-full"),
    pytest.param("eva02", 0, "default", id="eva02-layer0-default"),
    pytest.param("eva02", 3, "full", id="eva02-layer3-full"),
    pytest.param("bige", -2, "default", id="bige-layer-2-default"),
    pytest.param("eva02", [-3, -1], "default", id="eva02-layers-3-1-default", marks=needs_layer_lists),
    pytest.param("eva01", [0, 2], "full", id="eva01-layers0-2-full", marks=needs_layer_lists),
    pytest.param("eva8b", -2, "default", id="eva8b-layer-2-default"),  # RMSNorm, no q/k/v bias
    pytest.param("eva18b", [-2, -1], "full", id="eva18b-layers-2-1-full", marks=needs_layer_lists),  # + post-norm
]


@pytest.mark.parametrize("family, layer, strategy", FEATURE_CASES)
def test_llava_image_features_loss_and_gradients(family, layer, strategy):
    model = tiny_llava(tiny_vision_config(family), vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    model.train()  # dropout is 0 in the tiny configs; train mode is what the Trainer runs
    reference = standalone_tower(model)
    pixel_values = torch.randn(2, 3, 28, 28)
    expected = reference_features(reference, pixel_values, layer, strategy).detach()
    tokens = expected.shape[1]
    assert tokens == 16 + (strategy == "full")
    prompt = image_prompt(2, tokens)

    with ProjectorInput(model) as projector_input:
        output = model(**prompt, pixel_values=pixel_values)
    (captured,) = projector_input.captured
    torch.testing.assert_close(captured, expected, atol=1e-6, rtol=0)

    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    output.loss.backward()
    projector = get_multi_modal_projector(model)
    for parameter in (projector.linear_1.weight, projector.linear_2.weight):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0
    patch_grad = get_vision_tower(model).vision_model.embeddings.patch_embedding.weight.grad
    assert patch_grad is not None and patch_grad.abs().sum() > 0  # the tower trains too unless frozen

    if TF5:  # the public accessor of 5.x agrees with the hook
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=pixel_values)
            projected = projector(expected)
        torch.testing.assert_close(torch.stack(list(features.pooler_output)), projected, atol=1e-6, rtol=0)


def test_gradient_checkpointing_through_llava_matches_plain_backward():
    model = tiny_llava().train()
    pixel_values = torch.randn(2, 3, 28, 28)
    prompt = image_prompt(2, 16)

    def grads():
        model.zero_grad()
        model(**prompt, pixel_values=pixel_values).loss.backward()
        tower = get_vision_tower(model).vision_model
        watched = (tower.embeddings.patch_embedding.weight, tower.encoder.layers[0].mlp.fc1.weight,
                   get_multi_modal_projector(model).linear_1.weight)
        return [p.grad.clone() for p in watched]

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert get_vision_tower(model).vision_model.encoder.gradient_checkpointing
    for checkpointed, reference in zip(grads(), plain):
        torch.testing.assert_close(checkpointed, reference, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Attention implementation dispatch through the composite config
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of each attention kernel of our tower."""
    calls = {name: 0 for name in modeling.ATTENTION_FUNCTIONS}
    for name, function in list(modeling.ATTENTION_FUNCTIONS.items()):
        def counted(*args, _name=name, _function=function, **kwargs):
            calls[_name] += 1
            return _function(*args, **kwargs)

        monkeypatch.setitem(modeling.ATTENTION_FUNCTIONS, name, counted)
    return calls


def _run_tower_once(model):
    with torch.no_grad():
        get_vision_tower(model)(torch.randn(1, 3, 28, 28))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_tower_via_build_llava(implementation, kernel_calls):
    model = tiny_llava(attn_implementation=implementation)
    assert modeling.resolve_attn_implementation(get_vision_tower(model).config) == implementation
    _run_tower_once(model)
    layers = model.config.vision_config.num_hidden_layers
    assert kernel_calls == {**{name: 0 for name in kernel_calls}, implementation: layers}

    other = "sdpa" if implementation == "eager" else "eager"
    set_vision_attn_implementation(model, other)  # e.g. after from_pretrained on 4.x
    _run_tower_once(model)
    assert kernel_calls[other] == layers
    with pytest.raises(ValueError, match="not supported"):
        set_vision_attn_implementation(model, "flex")
    assert modeling.resolve_attn_implementation(get_vision_tower(model).config) == other


@pytest.mark.skipif(not SUB_CONFIGS_TAKE_ATTN_IMPLEMENTATION,
                    reason="transformers 4.37-4.53 set attn_implementation on the top config only; build_llava / "
                           "set_vision_attn_implementation hand it to the tower there (tested above)")
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_dispatch_through_llava_config_and_from_pretrained(implementation, kernel_calls, tmp_path):
    config = LlavaConfig(vision_config=tiny_vision_config(), text_config=tiny_llama_config(),
                         image_token_index=IMAGE_TOKEN_ID, attn_implementation=implementation)
    assert config.vision_config._attn_implementation_internal == implementation
    model = LlavaForConditionalGeneration(config)
    _run_tower_once(model)
    assert kernel_calls[implementation] == 3 and sum(kernel_calls.values()) == 3

    model.save_pretrained(tmp_path)
    other = "sdpa" if implementation == "eager" else "eager"
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=other)
    assert modeling.resolve_attn_implementation(get_vision_tower(reloaded).config) == other
    per_part = LlavaForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation={"vision_config": implementation, "text_config": other, "": other}
    )
    assert modeling.resolve_attn_implementation(get_vision_tower(per_part).config) == implementation
    assert per_part.config.text_config._attn_implementation == other

    # ... and 5.x's runtime switch reaches the tower too
    reloaded.set_attn_implementation(implementation)
    assert modeling.resolve_attn_implementation(get_vision_tower(reloaded).config) == implementation
    reloaded.set_attn_implementation({"vision_config": other})
    assert modeling.resolve_attn_implementation(get_vision_tower(reloaded).config) == other
    for name in kernel_calls:
        kernel_calls[name] = 0
    _run_tower_once(reloaded)
    assert kernel_calls[other] == 3 and sum(kernel_calls.values()) == 3


def test_eager_and_sdpa_towers_give_the_same_llava_logits():
    eager = tiny_llava(attn_implementation="eager").eval()
    sdpa = tiny_llava(attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    pixel_values = torch.randn(1, 3, 28, 28)
    prompt = image_prompt(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**prompt, pixel_values=pixel_values).logits,
                                   eager(**prompt, pixel_values=pixel_values).logits, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT (anyres tiling)
# --------------------------------------------------------------------------------------------------------------------

PINPOINTS = [[28, 56], [56, 28], [56, 56]]


@needs_next
@needs_tile_padding
@pytest.mark.parametrize("layer", [-2, 0])
def test_llava_next_image_features_loss_gradients_and_round_trip(layer, tmp_path):
    strategy = "default"  # NeXT reshapes tile features into the patch grid, so CLS is always dropped
    model = tiny_llava(next_=True, image_grid_pinpoints=PINPOINTS, vision_feature_layer=layer,
                       vision_feature_select_strategy=strategy).train()
    assert type(get_vision_tower(model)) is EvaCLIPVisionModel
    processor = build_llava_processor(tiny_vision_config(), tiny_tokenizer(), next=True, image_grid_pinpoints=PINPOINTS,
                                      vision_feature_select_strategy=strategy)
    if not PROCESSOR_EXPANDS:  # < 4.45 the model expands the tokens, and in training it assumes right padding
        processor.tokenizer.padding_side = "right"
    images = random_images([(40, 60), (30, 30)])
    inputs = processor(text=["<image> a photo of a cat", "<image> a dog"], images=images, return_tensors="pt",
                       padding=True)
    # the processor's ids: map the processor's image token onto this model's
    processor_image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    input_ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor_image_id, IMAGE_TOKEN_ID)
    pixel_values, image_sizes = inputs["pixel_values"], inputs["image_sizes"]
    assert pixel_values.shape[-3:] == (3, 28, 28) and pixel_values.shape[1] > 1  # base image + tiles

    reference = standalone_tower(model)
    with torch.no_grad():
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        tiles = torch.cat([pv[:image_size_to_num_patches(size, PINPOINTS, 28)]
                           for pv, size in zip(pixel_values, image_sizes.tolist())])
        expected = reference_features(reference, tiles, layer, strategy)

    with ProjectorInput(model) as projector_input:
        output = model(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes,
                       attention_mask=inputs["attention_mask"], labels=input_ids)
    (captured,) = projector_input.captured
    # one side runs with grad (module calls), the other without (inference path: RoPE pairs turned as complex
    # numbers, equal within fp32 rounding): torch's fp32 tolerances
    torch.testing.assert_close(captured, expected)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    projector = get_multi_modal_projector(model)
    assert projector.linear_1.weight.grad.abs().sum() > 0
    image_newline = getattr(model, "model", model).image_newline  # 5.x: on the inner LlavaNextModel; 4.4x: on top
    assert image_newline.grad is not None and image_newline.grad.abs().sum() > 0

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llava_next" and saved["vision_config"]["model_type"] == "evaclip_vision_model"
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    assert type(get_vision_tower(reloaded)) is EvaCLIPVisionModel
    assert_state_dicts_equal(model.state_dict(), reloaded.state_dict())


# --------------------------------------------------------------------------------------------------------------------
# build_llava / build_llava_processor from dirs, end to end
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["vision-only", "full-evaclip"])
def vision_dir(request, tmp_path_factory):
    """An EVA-CLIP dir as `save_pretrained` (vision-only) or the converter (a full EvaCLIPModel) writes it."""
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "vision-only":
        config = tiny_vision_config()
        EvaCLIPVisionModel(config).save_pretrained(path)
    else:
        config = tiny_config()
        EvaCLIPModel(config).save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def language_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm")
    tokenizer = tiny_tokenizer()
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _check_loaded_weights(model, vision_dir, language_model_dir, original_vocab):
    tower = EvaCLIPVisionModel.from_pretrained(vision_dir)
    assert_state_dicts_equal(tower.state_dict(), get_vision_tower(model).state_dict())
    language = LlamaForCausalLM.from_pretrained(language_model_dir)
    expected = language.get_decoder().state_dict()
    actual = _decoder(model).state_dict()  # 4.53's LlavaForConditionalGeneration.get_decoder returns a bound method
    assert set(expected) == set(actual)
    for key in expected:
        if key == "embed_tokens.weight":  # grown by one row for the image token
            assert actual[key].shape[0] == original_vocab + 1
            assert torch.equal(actual[key][:original_vocab], expected[key])
        else:
            assert torch.equal(actual[key], expected[key]), key
    assert torch.equal(model.get_output_embeddings().weight[:original_vocab], language.lm_head.weight)


def test_build_llava_and_processor_from_dirs_end_to_end(vision_dir, language_model_dir, tmp_path):
    original_vocab = len(WORDS)
    processor = build_llava_processor(vision_dir, language_model_dir)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_token_id == original_vocab  # added, as the LM's tokenizer lacks it
    model = build_llava(vision_dir, language_model_dir, tokenizer=processor.tokenizer).eval()
    assert model.config.image_token_index == image_token_id
    assert model.config.text_config.vocab_size == original_vocab + 1
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    _check_loaded_weights(model, vision_dir, language_model_dir, original_vocab)

    images = random_images([(40, 60), (30, 30)])
    texts = ["<image>\nUSER : what is in the image ? ASSISTANT : a cat", "<image>\nUSER : a dog"]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    expected_pixels = build_image_processor(get_vision_tower(model).config)(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(inputs["pixel_values"], expected_pixels)
    image_tokens = (inputs["input_ids"] == image_token_id).sum(dim=1)
    # >= 4.45's processors expand; before, the model does
    assert image_tokens.tolist() == ([16, 16] if PROCESSOR_EXPANDS else [1, 1])

    with ProjectorInput(model) as projector_input, torch.no_grad():
        output = model(**inputs, labels=inputs["input_ids"])
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    expected = reference_features(standalone_tower(model), inputs["pixel_values"], -2, "default")
    # one side runs with grad (module calls), the other without (inference path: RoPE pairs turned as complex
    # numbers, equal within fp32 rounding): torch's fp32 tolerances
    torch.testing.assert_close(projector_input.captured[0], expected)
    assert torch.isfinite(output.loss)
    assert generated.shape[1] >= inputs["input_ids"].shape[1] + 1

    # The pair saves as a llava-hf style dir and reloads with the stock classes (after `import llava_evaclip`).
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    again = reloaded_processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(reloaded(**again).logits, output.logits)


@needs_next
@needs_tile_padding
def test_build_llava_next_and_processor_from_dirs_end_to_end(language_model_dir):
    vision = tiny_vision_config()
    processor = build_llava_processor(vision, language_model_dir, next=True)
    model = build_llava(vision, language_model_dir, tokenizer=processor.tokenizer, next=True).eval()
    assert isinstance(model, LlavaNextForConditionalGeneration)
    pinpoints = default_image_grid_pinpoints(28)
    assert model.config.image_grid_pinpoints == pinpoints == processor.image_processor.image_grid_pinpoints
    inputs = processor(text=["<image> a photo of a cat", "<image> a dog"], images=random_images([(40, 90), (30, 30)]),
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(output.loss)
    if PROCESSOR_EXPANDS:
        assert output.logits.shape[:2] == inputs["input_ids"].shape
    else:  # < 4.45: the model puts each image's features in place of its one token, so the sequence grows
        assert output.logits.shape[0] == 2 and output.logits.shape[1] > inputs["input_ids"].shape[1]


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vision_feature_select_strategy="cls"), "vision_feature_select_strategy"),
        (dict(vision_feature_layer=4), r"\[-4, 3\]"),
        (dict(vision_feature_layer=-5), r"\[-4, 3\]"),
        (dict(vision_feature_layer=[]), "non-empty"),
        (dict(image_token_index=64), "image_token_index"),
        (dict(image_grid_pinpoints=[[28, 56]]), "LLaVA-NeXT only"),
    ],
)
def test_build_llava_config_rejects_bad_settings(kwargs, message):
    kwargs = {"image_token_index": IMAGE_TOKEN_ID, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_llava_config(tiny_vision_config(), tiny_llama_config(), **kwargs)


@pytest.mark.skipif(supports_feature_layer_lists(), reason="this transformers' LLaVA accepts lists of layers")
def test_layer_lists_are_refused_where_llava_reads_one_layer():
    with pytest.raises(ValueError, match="single vision_feature_layer"):
        build_llava_config(tiny_vision_config(), tiny_llama_config(), image_token_index=IMAGE_TOKEN_ID,
                           vision_feature_layer=[-2, -1])


@needs_next
def test_llava_next_refuses_the_full_strategy():
    with pytest.raises(ValueError, match="CLS token must be dropped"):
        build_llava_config(tiny_vision_config(), tiny_llama_config(), image_token_index=IMAGE_TOKEN_ID, next=True,
                           vision_feature_select_strategy="full")


@needs_next
def test_pinpoints_must_be_multiples_of_the_tower_size():
    with pytest.raises(ValueError, match="multiples of the tower's image size"):
        build_llava_config(tiny_vision_config(), tiny_llama_config(), image_token_index=IMAGE_TOKEN_ID, next=True,
                           image_grid_pinpoints=[[28, 50]])


def test_build_llava_rejects_unusable_sources(tmp_path):
    with pytest.raises(ValueError, match="EVA-CLIP checkpoint dir"):
        build_llava(str(tmp_path / "missing"), tiny_llama_config(), image_token_index=IMAGE_TOKEN_ID)
    with pytest.raises(ValueError, match="causal language model dir"):
        build_llava(tiny_vision_config(), str(tmp_path / "missing"), image_token_index=IMAGE_TOKEN_ID)
    with pytest.raises(ValueError, match="image token's id"):
        build_llava(tiny_vision_config(), tiny_llama_config())
    with pytest.raises(ValueError, match="tokenizer must be"):
        build_llava_processor(tiny_vision_config(), str(tmp_path / "missing"))


def test_build_llava_refuses_a_vision_dir_with_missing_tower_weights(tmp_path, language_model_dir):
    """A dir whose weights do not cover the tower would otherwise leave it silently random."""
    from safetensors.torch import load_file, save_file

    EvaCLIPVisionModel(tiny_vision_config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = "vision_model.encoder.layers.1.mlp.fc2.weight"
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="weights are missing") as error:
        build_llava(tmp_path, language_model_dir)
    assert dropped in str(error.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=needs_cpu_fp16)])
def test_build_llava_in_half_precision_gives_the_logits_of_its_saved_copy(vision_dir, language_model_dir, tmp_path,
                                                                          dtype):
    """`dtype=` casts what the state dict holds, as `from_pretrained(..., dtype)` loads it: the buffers each model
    computes in fp32 (the LM's rotary inv_freq) stay fp32, so save -> reload gives the same logits, bit for bit."""
    processor = build_llava_processor(vision_dir, language_model_dir)
    model = build_llava(vision_dir, language_model_dir, tokenizer=processor.tokenizer, dtype=dtype).eval()
    assert {p.dtype for p in model.parameters()} == {dtype}
    inputs = processor(text=["<image>\nUSER : a cat"], images=random_images([(40, 60)]), return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    model.save_pretrained(tmp_path)
    key = "dtype" if TF5 else "torch_dtype"
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, **{key: dtype}).eval()
    built_buffers, loaded_buffers = dict(model.named_buffers()), dict(reloaded.named_buffers())
    assert {name: b.dtype for name, b in built_buffers.items()} == {name: b.dtype for name, b in loaded_buffers.items()}
    for name, buffer in built_buffers.items():
        assert torch.equal(buffer, loaded_buffers[name]), name
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


def test_build_llava_leaves_the_callers_configs_alone():
    vision_config, text_config = tiny_vision_config(), tiny_llama_config(vocab_size=len(WORDS))
    vision_before, text_before = vision_config.to_dict(), text_config.to_dict()
    first = build_llava(vision_config, text_config, tokenizer=tiny_tokenizer(), attn_implementation="eager")
    build_llava(vision_config, text_config, tokenizer=tiny_tokenizer(), attn_implementation="sdpa")
    assert vision_config.to_dict() == vision_before and text_config.to_dict() == text_before  # vocab not grown
    assert get_vision_tower(first).config is not vision_config
    assert modeling.resolve_attn_implementation(get_vision_tower(first).config) == "eager"  # not switched by the second build


def test_a_saved_llava_processor_reloads_padding_on_the_left(tmp_path):
    """Batched generation needs left padding (4.37.2's LLaVA also places image features right only then). transformers
    5.5 saved a tokenizer's init kwargs, not the `padding_side` set on it: the processor the image-text-to-text
    pipeline reloads padded on the right, and every shorter prompt of a batch was generated from pad tokens."""
    from transformers import AutoProcessor

    processor = build_llava_processor(tiny_vision_config("eva02"), tiny_tokenizer())
    processor.save_pretrained(tmp_path)
    with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as file:
        assert json.load(file).get("padding_side") == "left"
    assert AutoProcessor.from_pretrained(tmp_path).tokenizer.padding_side == "left"
