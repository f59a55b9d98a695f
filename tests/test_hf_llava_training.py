"""Training and serving transformers' own LLaVA classes with an EVA-CLIP vision config, against the same LLaVA built
on transformers' CLIPVisionModel holding equivalent EVA01-style weights (the copy of test_model_parity_hf_clip: patch
bias folded into CLIP's positions, CLIP's pre_layrnorm the identity, CLIP's k bias zero and frozen) or against an
explicit computation: Trainer runs (frozen / trained tower, checkpointing reentrant and not, bf16 autocast), PEFT LoRA
targets and training, batched left-padded generation, save / load with dtype="auto", shards and disk offload,
LLaVA-NeXT with odd aspect ratios, LLaVA-OneVision, the Auto classes and the image-text-to-text pipeline.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, Trainer, TrainingArguments

from conftest import tiny_vision_config
from llava_evaclip._compat import TRANSFORMERS_VERSION
from test_hf_llava import (
    IMAGE_TOKEN_ID,
    TF5,
    WORDS,
    PROCESSOR_EXPANDS,
    ProjectorInput,
    image_prompt,
    needs_tile_padding,
    random_images,
    reference_features,
    standalone_tower,
    tiny_llama_config,
    tiny_tokenizer,
)
from test_model_parity_hf_clip import _clip_vision_config, _copy_vision, _inner, _randomize
from llava_evaclip.hf import (
    build_llava,
    build_llava_processor,
    get_vision_tower,
    is_llava_next_available,
    supports_feature_layer_lists,
)

DTYPE_KEY = "dtype" if TF5 else "torch_dtype"
# 4.37.2's CLIP attention scales q before q.k^T (ours, like 5.x's CLIP, scales the product): last-ulp differences in
# fp32, which AdamW's normalisation blows up for near-zero gradients (3e-5 after two steps). There the two sides train
# with SGD and agree to 1e-6 (9e-9 measured); on 5.x they run the same ops and AdamW keeps them equal bit for bit.
OPTIM, WEIGHT_ATOL = ("adamw_torch", 0.0) if TF5 else ("sgd", 1e-6)


# --------------------------------------------------------------------------------------------------------------------
# An EVA-CLIP LLaVA and the CLIP-tower LLaVA with the same weights
# --------------------------------------------------------------------------------------------------------------------


def _copy_rest(eva: nn.Module, clip: nn.Module) -> None:
    """Everything but the tower (language model, projector, NeXT's image_newline) by name."""
    result = clip.load_state_dict({k: v for k, v in eva.state_dict().items() if "vision_tower" not in k}, strict=False)
    assert not result.unexpected_keys and all("vision_tower" in key for key in result.missing_keys)


def _pair(config_class=LlavaConfig, model_class=LlavaForConditionalGeneration, zero_patch_bias=False, **build):
    """(EVA-CLIP LLaVA, CLIP LLaVA) with equal weights. `zero_patch_bias`: EVA's patch bias zero and frozen (CLIP has
    none), so that training updates the same parameters on both sides and they stay equal."""
    torch.manual_seed(0)
    build.setdefault("image_token_index", IMAGE_TOKEN_ID)
    eva = build_llava(tiny_vision_config("eva01"), tiny_llama_config(vocab_size=build.pop("vocab_size", 64)), **build)
    tower = get_vision_tower(eva).vision_model
    _randomize(tower)
    if zero_patch_bias:
        with torch.no_grad():
            tower.embeddings.patch_embedding.bias.zero_()
        tower.embeddings.patch_embedding.bias.requires_grad_(False)
    c = eva.config
    extra = {"image_grid_pinpoints": c.image_grid_pinpoints} if hasattr(c, "image_grid_pinpoints") else {}
    if getattr(c, "pad_token_id", None) is not None:  # 4.4x's LLaVA zeroes pad embeddings; its cached decoding needs it
        extra["pad_token_id"] = c.pad_token_id
    clip = model_class(config_class(
        vision_config=_clip_vision_config(c.vision_config), text_config=copy.deepcopy(c.text_config),
        image_token_index=c.image_token_index, vision_feature_layer=c.vision_feature_layer,
        vision_feature_select_strategy=c.vision_feature_select_strategy, vocab_size=c.text_config.vocab_size,
        image_seq_length=c.image_seq_length, **extra))
    _copy_rest(eva, clip)
    _copy_vision(tower, _inner(get_vision_tower(clip), "vision_model"))
    for name, parameter in clip.named_parameters():  # zero k bias: EVA01 has none, so it must not train either
        if "vision_tower" in name and name.endswith("k_proj.bias"):
            parameter.requires_grad_(False)
    return eva, clip


def _tower_free_keys(state: dict) -> dict:
    """State dict keys without the tower's inner `vision_model.` (CLIP 5.x has none), so the two sides line up."""
    return {key.replace("vision_model.", ""): value for key, value in state.items()}


class _Prompts(torch.utils.data.Dataset):
    """Image prompt + 5 random text tokens; labels ignore the image placeholders."""

    def __init__(self, count: int = 4):
        generator = torch.Generator().manual_seed(1)
        prompt = image_prompt(count, 16)
        self.ids = prompt["input_ids"].clone()
        self.ids[:, -5:] = torch.randint(4, 60, (count, 5), generator=generator)
        self.pixels = torch.randn(count, 3, 28, 28, generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.ids[i] == IMAGE_TOKEN_ID, -100)
        return dict(input_ids=self.ids[i], attention_mask=torch.ones_like(self.ids[i]), labels=labels,
                    pixel_values=self.pixels[i])


def _train(model, tmp_path, dataset=None, batch=2, gradient_checkpointing=None, bf16=False):
    # No gradient clipping: the global norm sums parameters in model order, which differs between the towers, and
    # would turn last-ulp differences into a different clip factor everywhere.
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=batch, max_steps=2, learning_rate=1e-2,
                   max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                   logging_steps=1, bf16=bf16, optim=OPTIM)
    if gradient_checkpointing is not None:
        options.update(gradient_checkpointing=True,
                       gradient_checkpointing_kwargs={"use_reentrant": gradient_checkpointing})
    trainer = Trainer(model=model, args=TrainingArguments(**options), train_dataset=dataset or _Prompts())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _assert_same_weights(eva, clip, atol=WEIGHT_ATOL):
    ours, theirs = _tower_free_keys(eva.state_dict()), _tower_free_keys(clip.state_dict())
    for key, value in theirs.items():
        if key in ours:
            torch.testing.assert_close(ours[key], value, atol=atol, rtol=0, msg=key)


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------

TRAINER_CASES = [
    pytest.param(False, True, False, id="tower-trained-reentrant"),
    pytest.param(True, False, False, id="tower-frozen-non-reentrant"),
    pytest.param(False, False, True, id="tower-trained-bf16-autocast",
                 marks=pytest.mark.skipif(TRANSFORMERS_VERSION < (4, 56), reason=(
                     "the LLaVA of transformers before 4.56 (4.37.2 and 4.47.1 checked) fails under autocast with "
                     "CLIP's tower too (index_put of bf16 features into fp32 embeddings)"))),
]


@pytest.mark.parametrize("frozen, reentrant, bf16", TRAINER_CASES)
def test_trainer_fine_tuning_matches_the_clip_tower_llava(frozen, reentrant, bf16, tmp_path):
    """Two AdamW steps of `Trainer` (checkpointing through TrainingArguments, bf16 through its autocast) give the
    losses and the weights the CLIP-tower LLaVA gets, bit for bit: the towers run the same ops."""
    eva, clip = _pair(zero_patch_bias=True)
    before = {key: value.clone() for key, value in get_vision_tower(eva).state_dict().items()}
    if frozen:
        for model in (eva, clip):
            get_vision_tower(model).requires_grad_(False)
    losses = [_train(model, tmp_path / name, gradient_checkpointing=reentrant, bf16=bf16)
              for name, model in (("eva", eva), ("clip", clip))]
    assert losses[0] == losses[1] and len(losses[0]) == 2  # as logged (4.37.2 rounds to 4 decimals)
    _assert_same_weights(eva, clip)
    tower_after = get_vision_tower(eva).state_dict()
    changed = [key for key, value in before.items() if not torch.equal(value, tower_after[key])]
    assert (not changed) if frozen else changed


def test_trainer_checkpoint_reloads_with_from_pretrained(tmp_path):
    """A Trainer checkpoint dir (5.x writes LLaVA's legacy key layout there) loads the trained tower back. Note:
    `Trainer.train(resume_from_checkpoint=...)` on 5.25 loads none of those keys into a LLaVA model, CLIP-tower or ours
    (it warns of missing / unexpected keys); load the weights with from_pretrained first."""
    eva, _ = _pair()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=1e-2,
                             report_to=[], save_strategy="steps", save_steps=1, use_cpu=True, seed=0,
                             disable_tqdm=True, optim=OPTIM)
    Trainer(model=eva, args=args, train_dataset=_Prompts()).train()
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "checkpoint-1")
    trained, loaded = eva.state_dict(), reloaded.state_dict()
    assert set(trained) == set(loaded)
    for key, value in trained.items():
        assert torch.equal(value, loaded[key]), key


# --------------------------------------------------------------------------------------------------------------------
# PEFT LoRA
# --------------------------------------------------------------------------------------------------------------------


def _lora_modules(model, target_modules):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=target_modules))
    names = {name.split(".lora_A")[0] for name, _ in peft_model.named_parameters() if ".lora_A." in name}
    return {name.replace("vision_model.", "") for name in names}


@pytest.mark.parametrize("target_modules", [
    "all-linear", ["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ["fc1", "fc2", "out_proj"], r".*language_model.*\.(q_proj|v_proj)",
], ids=["all-linear", "q-v", "llama-names", "clip-mlp-names", "lm-regex"])
def test_lora_reaches_exactly_the_modules_it_reaches_in_the_clip_tower_llava(target_modules):
    pytest.importorskip("peft")
    eva, clip = _pair()
    assert _lora_modules(eva, target_modules) == _lora_modules(clip, target_modules)


def test_lora_all_linear_on_an_eva02_tower_adds_only_the_swiglu_up_projection():
    """EVA-02's SwiGLU MLP has one Linear more than CLIP's (fc1_up); "all-linear" reaches it, nothing else differs."""
    pytest.importorskip("peft")
    _, clip = _pair()
    torch.manual_seed(0)
    eva02 = build_llava(tiny_vision_config("eva02"), tiny_llama_config(), image_token_index=IMAGE_TOKEN_ID)
    extra = _lora_modules(eva02, "all-linear") - _lora_modules(clip, "all-linear")
    assert {name.rsplit(".", 1)[-1] for name in extra} == {"fc1_up"}
    assert len(extra) == eva02.config.vision_config.num_hidden_layers
    assert _lora_modules(clip, "all-linear") <= _lora_modules(eva02, "all-linear")


def test_lora_training_with_reentrant_checkpointing_equals_training_without(tmp_path):
    """LoRA on tower and LM, `use_reentrant=True` through the Trainer: the adapters train exactly as without
    checkpointing (the reference). On 4.37.2 the CLIP-tower LLaVA does not (its vision adapters lose their gradients;
    with q/v/fc1/fc2 only it stops with 'element 0 of tensors does not require grad'), so the reference is the run
    without checkpointing. The last tower layer is not read (layer -2): its adapters stay put."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    results = []
    for checkpointing in (None, True):
        eva, _ = _pair()
        torch.manual_seed(5)
        model = get_peft_model(eva, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        before = {name: value.clone() for name, value in model.state_dict().items() if "lora_" in name}
        losses = _train(model, tmp_path / str(checkpointing), gradient_checkpointing=checkpointing)
        after = {name: value.clone() for name, value in model.state_dict().items() if "lora_" in name}
        results.append((losses, after))
        moved = {name for name in after if not torch.equal(after[name], before[name])}
        vision = {name for name in after if "vision_tower" in name}
        last = f"layers.{eva.config.vision_config.num_hidden_layers - 1}."
        assert {name for name in vision if last not in name} <= moved and not {n for n in vision if last in n} & moved
    assert results[0][0] == results[1][0]
    for name, value in results[0][1].items():
        assert torch.equal(value, results[1][1][name]), name


# --------------------------------------------------------------------------------------------------------------------
# Serving: generate with batched images and left padding
# --------------------------------------------------------------------------------------------------------------------

GENERATE_CASES = [
    pytest.param(-2, "default", id="layer-2-default"),
    pytest.param(-1, "full", id="layer-1-full"),
    pytest.param([-3, -1], "default", id="layers-3-1-default", marks=pytest.mark.skipif(
        not supports_feature_layer_lists(), reason="this transformers' LLaVA reads one int vision_feature_layer")),
    pytest.param([0, 2], "full", id="layers0-2-full", marks=pytest.mark.skipif(
        not supports_feature_layer_lists(), reason="this transformers' LLaVA reads one int vision_feature_layer")),
]
TEXTS = ["<image>\nUSER : what is in the image ? ASSISTANT :", "USER : <image> a cat", "<image> dog"]
SIZES = [(40, 60), (30, 30), (50, 20)]


def _generate(model, inputs, tokenizer, tokens=5):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("layer, strategy", GENERATE_CASES)
def test_batched_left_padded_generate_matches_the_clip_tower_llava(layer, strategy):
    processor = build_llava_processor(tiny_vision_config("eva01"), tiny_tokenizer(),
                                      vision_feature_select_strategy=strategy)
    tokenizer = processor.tokenizer
    eva, clip = _pair(vocab_size=len(WORDS), tokenizer=tokenizer, image_token_index=None, vision_feature_layer=layer,
                      vision_feature_select_strategy=strategy)
    eva.eval(), clip.eval()
    inputs = processor(text=TEXTS, images=random_images(SIZES), return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left" and (inputs["attention_mask"][:, 0] == 0).any()
    batched, clip_batched = _generate(eva, inputs, tokenizer), _generate(clip, inputs, tokenizer)
    assert torch.equal(batched, clip_batched)
    for row, (text, image) in enumerate(zip(TEXTS, random_images(SIZES))):  # each prompt alone: no padding
        alone = processor(text=[text], images=[image], return_tensors="pt")
        ours_alone, clip_alone = _generate(eva, alone, tokenizer)[0], _generate(clip, alone, tokenizer)[0]
        assert torch.equal(ours_alone, clip_alone)
        if torch.equal(clip_alone, clip_batched[row]):  # 4.47.1's LLaVA decodes a padded row otherwise, CLIP's too
            assert torch.equal(ours_alone, batched[row])


@pytest.mark.skipif(TRANSFORMERS_VERSION < (4, 56), reason=(
    "the LLaVA of transformers before 4.56 asks the tower for all hidden states (tested in test_hf_llava), and 4.47.1's "
    "decodes a padded row unlike its prompt alone, with CLIP's tower too"))
def test_generate_reads_the_embedding_output_for_vision_feature_layer_0():
    """transformers 5's LLaVA passes `output_hidden_states=vision_feature_layer` to the tower; 0 must still mean
    hidden_states[0] (CLIP's tower returns no hidden states there and generate fails). Reference: our tower's
    hidden_states[0] without CLS, and each prompt generated alone."""
    processor = build_llava_processor(tiny_vision_config("eva01"), tiny_tokenizer())
    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    model = build_llava(tiny_vision_config("eva01"), tiny_llama_config(vocab_size=len(WORDS)), tokenizer=tokenizer,
                        vision_feature_layer=0).eval()
    inputs = processor(text=TEXTS, images=random_images(SIZES), return_tensors="pt", padding=True)
    with ProjectorInput(model) as projector_input:
        batched = _generate(model, inputs, tokenizer)
    expected = reference_features(standalone_tower(model), inputs["pixel_values"], 0, "default")
    torch.testing.assert_close(projector_input.captured[0], expected)
    for row, (text, image) in enumerate(zip(TEXTS, random_images(SIZES))):
        alone = processor(text=[text], images=[image], return_tensors="pt")
        assert torch.equal(_generate(model, alone, tokenizer)[0], batched[row])


# --------------------------------------------------------------------------------------------------------------------
# Save / load: dtype="auto", shards, device_map="auto" with disk offload
# --------------------------------------------------------------------------------------------------------------------


def test_sharded_half_precision_save_loads_with_dtype_auto_and_with_disk_offload(tmp_path):
    """An EVA-02 (RoPE) LLaVA built in bf16, saved in many shards: dtype="auto" reloads it in bf16 with the same
    logits; device_map="auto" with little CPU memory puts tower layers on disk and still gives its logits."""
    torch.manual_seed(0)
    model = build_llava(tiny_vision_config("eva02"), tiny_llama_config(), image_token_index=IMAGE_TOKEN_ID,
                        dtype=torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "bf16", max_shard_size="30KB")
    assert len(list((tmp_path / "bf16").glob("*.safetensors"))) > 3
    prompt, pixel_values = image_prompt(2, 16), torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = model(**prompt, pixel_values=pixel_values.bfloat16()).logits
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "bf16", **{DTYPE_KEY: "auto"}).eval()
    assert {p.dtype for p in get_vision_tower(reloaded).parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(reloaded(**prompt, pixel_values=pixel_values.bfloat16()).logits, expected)

    fp32 = build_llava(tiny_vision_config("eva02"), tiny_llama_config(), image_token_index=IMAGE_TOKEN_ID).eval()
    fp32.save_pretrained(tmp_path / "fp32", max_shard_size="30KB")
    offloaded = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "fp32", device_map="auto", max_memory={"cpu": "100KB"}, offload_folder=str(tmp_path / "offload"))
    tower_devices = {device for name, device in offloaded.hf_device_map.items() if "vision_tower" in name}
    assert "disk" in tower_devices
    with torch.no_grad():
        # the offload hooks send the tower through its module path, the plain model through the inference path
        # (RoPE as complex numbers): equal within fp32 rounding
        torch.testing.assert_close(offloaded.eval()(**prompt, pixel_values=pixel_values).logits,
                                   fp32(**prompt, pixel_values=pixel_values).logits)


# --------------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT with odd aspect ratios, LLaVA-OneVision
# --------------------------------------------------------------------------------------------------------------------

NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
ODD_SIZES = [(17, 300), (301, 7), (1, 1), (29, 55), (84, 27), (1000, 999)]


@pytest.mark.skipif(not is_llava_next_available(), reason="LLaVA-NeXT arrived in transformers 4.39")
@needs_tile_padding
def test_llava_next_odd_aspect_ratios_match_the_clip_tower_llava_next(tmp_path):
    """Forward, generate and two Trainer steps (the processor's padded tiles and image_sizes through the default
    collator) on images down to 1x1 and 1:43: as the CLIP-tower LlavaNext, bit for bit where both run the same ops."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    processor = build_llava_processor(tiny_vision_config("eva01"), tiny_tokenizer(), next=True,
                                      image_grid_pinpoints=NEXT_PINPOINTS)
    tokenizer = processor.tokenizer
    eva, clip = _pair(LlavaNextConfig, LlavaNextForConditionalGeneration, zero_patch_bias=True,
                      vocab_size=len(WORDS), tokenizer=tokenizer, image_token_index=None, next=True,
                      image_grid_pinpoints=NEXT_PINPOINTS)
    texts = ["<image> a cat" if i % 2 else "USER : <image> what is in the image ? ASSISTANT :" for i in
             range(len(ODD_SIZES))]
    inputs = processor(text=texts, images=random_images(ODD_SIZES), return_tensors="pt", padding=True)
    eva.eval(), clip.eval()
    with torch.no_grad():
        torch.testing.assert_close(eva(**inputs).logits, clip(**inputs).logits, atol=1e-6, rtol=0)
    assert torch.equal(_generate(eva, inputs, tokenizer, 3), _generate(clip, inputs, tokenizer, 3))
    if not PROCESSOR_EXPANDS:  # < 4.45 the model expands the image token, and in training it assumes right padding
        tokenizer.padding_side = "right"
        inputs = processor(text=texts, images=random_images(ODD_SIZES), return_tensors="pt", padding=True)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            labels = inputs["input_ids"][i].masked_fill(inputs["attention_mask"][i] == 0, -100)
            return {key: value[i] for key, value in inputs.items()} | {"labels": labels}

    losses = [_train(model, tmp_path / name, Rows(), gradient_checkpointing=True)
              for name, model in (("eva", eva), ("clip", clip))]
    assert losses[0] == losses[1]
    _assert_same_weights(eva, clip)


def test_llava_onevision_features_match_the_clip_tower_onevision():
    onevision = pytest.importorskip("transformers.models.llava_onevision")
    config_class, model_class = onevision.LlavaOnevisionConfig, onevision.LlavaOnevisionForConditionalGeneration
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    vision = tiny_vision_config("eva01")
    common = dict(text_config=tiny_llama_config(), image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints)
    torch.manual_seed(0)
    eva = model_class(config_class(vision_config=vision, **common)).eval()
    _randomize(get_vision_tower(eva))
    clip = model_class(config_class(vision_config=_clip_vision_config(vision), **common)).eval()
    _copy_rest(eva, clip)
    _copy_vision(get_vision_tower(eva).vision_model, _inner(get_vision_tower(clip), "vision_model"))
    pixel_values, image_sizes = torch.randn(2, 5, 3, 28, 28), torch.tensor([[28, 56], [56, 56]])
    features = []
    for model in (eva, clip):
        inner = getattr(model, "model", model)  # 4.4x: no inner LlavaOnevisionModel
        if not hasattr(inner, "get_image_features"):
            pytest.skip(f"transformers {transformers.__version__}'s LLaVA-OneVision has no get_image_features")
        with torch.no_grad():
            out = inner.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes,
                                           vision_feature_layer=-2, vision_feature_select_strategy="default")
        features.append(getattr(out, "pooler_output", out))
    assert [f.shape for f in features[0]] == [f.shape for f in features[1]]
    for ours, theirs in zip(*features):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Auto classes and the image-text-to-text pipeline
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(transformers, "AutoModelForImageTextToText"),
                    reason=f"transformers {transformers.__version__} has no AutoModelForImageTextToText")
def test_auto_image_text_to_text_and_its_pipeline_serve_a_saved_dir(tmp_path):
    from transformers import AutoModelForImageTextToText, pipeline

    processor = build_llava_processor(tiny_vision_config("eva02"), tiny_tokenizer())
    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    model = build_llava(tiny_vision_config("eva02"), tiny_llama_config(vocab_size=len(WORDS)),
                        tokenizer=tokenizer).eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    texts, images = TEXTS[:2], random_images(SIZES[:2])
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected_logits = model(**inputs).logits
    expected = [text.strip() for text in tokenizer.batch_decode(_generate(model, inputs, tokenizer, 4),
                                                                 skip_special_tokens=True)]
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(auto, LlavaForConditionalGeneration)
    with torch.no_grad():
        assert torch.equal(auto(**inputs).logits, expected_logits)
    legacy = getattr(transformers, "AutoModelForVision2Seq", None)
    if legacy is not None:
        assert isinstance(legacy.from_pretrained(tmp_path), LlavaForConditionalGeneration)

    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    outputs = pipe(images=images, text=texts, max_new_tokens=4, return_full_text=False, batch_size=2)
    generated = [(o[0] if isinstance(o, list) else o)["generated_text"].strip() for o in outputs]
    assert generated == expected
