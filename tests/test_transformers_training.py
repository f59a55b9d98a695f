"""EVA-CLIP trained and extended the way a transformers user trains CLIP: contrastive fine-tuning in train mode and
under `transformers.Trainer` (against transformers' CLIPModel with the same weights), Trainer checkpoint resume,
gradient checkpointing as transformers 5 enables it with `use_reentrant=True`, a vocabulary grown with
`resize_token_embeddings` (textual inversion, added special tokens) against transformers' CLIPTextModel, and the
sub-models of a sharded half-precision directory, and the feature-extraction pipeline on a text-tower directory."""

from __future__ import annotations

import copy
import inspect
import math
import os

import pytest
import torch
import transformers
from transformers import CLIPModel, CLIPTextModel, Trainer, TrainingArguments

from llava_evaclip import EvaCLIPModel, EvaCLIPTextModel, EvaCLIPVisionModel

from conftest import cpu_training_arguments, randomize, tiny_config, tiny_text_config, tiny_vision_config
from test_model_parity_hf_clip import (
    _clip_text_config,
    _copy_text,
    _inner,
    _randomize,
    _text_inputs,
    clip_model_like,
)

TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
ATOL = 1e-5
_ENVIRONMENT_AT_COLLECTION = dict(os.environ)


def _training_args(output_dir, **overrides) -> TrainingArguments:
    fields = dict(output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=0.05, optim="sgd",
                  lr_scheduler_type="constant", weight_decay=0.0, report_to=[], logging_steps=1, save_strategy="no",
                  seed=0, dataloader_num_workers=0, disable_tqdm=True)
    fields.update(overrides)
    return cpu_training_arguments(**fields)


class _Pairs(torch.utils.data.Dataset):
    """Image-text pairs; `_collate` adds `return_loss=True` to each batch, as a CLIP fine-tuning script does."""

    def __init__(self, config, count: int = 8) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, config.text_config.eos_token_id - 1, (count, 7), generator=generator)
        self.ids[:, -1] = config.text_config.eos_token_id
        size = config.vision_config.image_size
        self.pixel_values = torch.randn(count, 3, size, size, generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "pixel_values": self.pixel_values[index]}


def _collate(rows: list[dict]) -> dict:
    return {"input_ids": torch.stack([r["input_ids"] for r in rows]),
            "pixel_values": torch.stack([r["pixel_values"] for r in rows]), "return_loss": True}


def _eva_and_clip() -> tuple[EvaCLIPModel, CLIPModel]:
    """An EVA01-style EvaCLIPModel and transformers' CLIPModel holding the same weights (see the parity tests). The
    patch-conv bias, folded into CLIP's positions, is frozen on our side so that both train the same parameters."""
    config = tiny_config("eva01", num_hidden_layers=2, projection_bias=False)
    ours = EvaCLIPModel(config)
    _randomize(ours)
    with torch.no_grad():
        ours.logit_scale.fill_(math.log(20.0))
    clip = clip_model_like(ours)
    ours.vision_model.embeddings.patch_embedding.bias.requires_grad_(False)
    return ours.train(), clip.train()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_train_mode_loss_and_gradients_match_clip(checkpointing: bool) -> None:
    """The parity tests compare outputs under no_grad; training runs other code (module calls, checkpointed layers).
    Loss and every gradient, logit_scale's included, equal CLIPModel's."""
    ours, clip = _eva_and_clip()
    if checkpointing:
        ours.gradient_checkpointing_enable()
        clip.gradient_checkpointing_enable()
    ids, mask = _text_inputs(ours.config.text_config)
    pixel_values = torch.randn(3, 3, 28, 28)
    losses = []
    for model in (ours, clip):
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, return_loss=True).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=ATOL, rtol=0)
    clip_grads = {name: p.grad for name, p in clip.named_parameters()}
    checked = 0
    for name, parameter in ours.named_parameters():
        if not parameter.requires_grad:
            continue
        assert parameter.grad is not None, name
        torch.testing.assert_close(parameter.grad, clip_grads[name], atol=ATOL, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    assert checked == sum(p.requires_grad for p in ours.parameters()) and ours.logit_scale.grad.abs() > 0


def test_trainer_contrastive_fine_tuning_matches_clip(tmp_path) -> None:
    """`Trainer` on batches carrying `return_loss=True`: the logged losses and the weights after the steps equal
    those of CLIPModel trained alike."""
    ours, clip = _eva_and_clip()
    data = _Pairs(ours.config)
    runs = []
    for name, model in (("ours", ours), ("clip", clip)):
        trainer = Trainer(model=model, args=_training_args(tmp_path / name, max_steps=2), train_dataset=data,
                          data_collator=_collate)
        trainer.train()
        runs.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert len(runs[0]) == 2
    torch.testing.assert_close(torch.tensor(runs[0]), torch.tensor(runs[1]), atol=1e-4, rtol=0)  # logged at 4 digits
    clip_state = clip.state_dict()
    ours_state = dict(ours.state_dict())
    positions = ours_state["vision_model.embeddings.position_embedding.weight"].clone()
    positions[1:] += ours_state.pop("vision_model.embeddings.patch_embedding.bias")  # folded as `_copy_vision` does
    ours_state["vision_model.embeddings.position_embedding.weight"] = positions
    assert ours_state.keys() <= clip_state.keys()
    for name, value in ours_state.items():
        torch.testing.assert_close(value, clip_state[name], atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(TRANSFORMERS_4 and not hasattr(transformers.trainer, "safe_globals"),
                    reason=f"transformers {transformers.__version__}'s Trainer restores its RNG state with torch.load's "
                    "weights_only default of torch >= 2.6, which refuses it (any model; 4.47 allowlists it)")
def test_trainer_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path) -> None:
    config = tiny_config("eva02", num_hidden_layers=1)
    initial = EvaCLIPModel(config)
    data = _Pairs(config, count=16)
    straight = copy.deepcopy(initial)
    Trainer(model=straight, args=_training_args(tmp_path / "a", max_steps=4), train_dataset=data,
            data_collator=_collate).train()
    Trainer(model=copy.deepcopy(initial), args=_training_args(tmp_path / "b", max_steps=2, save_strategy="steps",
                                                               save_steps=2),
            train_dataset=data, data_collator=_collate).train()
    resumed = copy.deepcopy(initial)
    Trainer(model=resumed, args=_training_args(tmp_path / "b", max_steps=4), train_dataset=data,
            data_collator=_collate).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    reloaded = EvaCLIPModel.from_pretrained(tmp_path / "b" / "checkpoint-2")
    assert os.path.isfile(tmp_path / "b" / "checkpoint-2" / "model.safetensors")
    assert reloaded.state_dict().keys() == initial.state_dict().keys()


def _frozen_embeddings_model(kind: str) -> torch.nn.Module:
    if kind == "full":
        model = EvaCLIPModel(tiny_config("eva02", num_hidden_layers=2))
        model.text_model.embeddings.requires_grad_(False)
    else:
        model = EvaCLIPVisionModel(tiny_vision_config("eva02", num_hidden_layers=2))
    model.vision_model.embeddings.requires_grad_(False)
    return randomize(model).train()


@pytest.mark.parametrize("kind", ["full", "vision"])
def test_reentrant_checkpointing_keeps_vision_gradients_behind_frozen_embeddings(kind: str) -> None:
    """`gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})` (TrainingArguments'
    `gradient_checkpointing_kwargs`) with frozen embeddings, as under PEFT: on transformers 5 each layer checkpoints
    itself reentrantly, and with no trainable module before the first layer (CLIP has `pre_layrnorm`) and, for the
    full model, only the text embedding hooked by `enable_input_require_grads`, no vision layer got a gradient
    (CLIPModel's did). On 4.x the encoder already switches to non-reentrant. Reference: the same model without
    checkpointing."""
    reference = _frozen_embeddings_model(kind)
    checkpointed = copy.deepcopy(reference)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    pixel_values = torch.randn(2, 3, 28, 28)
    ids = torch.randint(1, 97, (2, 7))
    ids[:, -1] = 98
    grads = []
    for model in (reference, checkpointed):
        if kind == "full":
            model(input_ids=ids, pixel_values=pixel_values, return_loss=True).loss.backward()
        else:
            model(pixel_values).pooler_output.square().sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        assert grads[1][name] is not None, f"{name} got no gradient under reentrant checkpointing"
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0)


def _text_pair_with_added_tokens(new_tokens: int = 2) -> tuple[EvaCLIPTextModel, CLIPTextModel]:
    """EvaCLIPTextModel and CLIPTextModel with the same weights, both grown by `resize_token_embeddings` and the new
    rows set alike."""
    config = tiny_text_config()
    ours = EvaCLIPTextModel(config).eval()
    randomize(ours)
    clip = CLIPTextModel(_clip_text_config(config)).eval()
    _copy_text(ours.text_model, _inner(clip, "text_model"))
    size = config.vocab_size + new_tokens
    for model in (ours, clip):
        model.resize_token_embeddings(size)
    with torch.no_grad():
        clip.get_input_embeddings().weight.copy_(ours.get_input_embeddings().weight)
    return ours, clip


def test_added_tokens_pool_at_the_end_token_as_clip() -> None:
    """Textual inversion / added special tokens: `tokenizer.add_tokens` gives ids above `<|endoftext|>`, then
    `resize_token_embeddings`. Pooling at `input_ids.argmax(-1)` took the added token's state instead of the end
    token's; transformers' CLIP pools at the first `eos_token_id`. Right-padded with the end token, as our tokenizer
    pads."""
    ours, clip = _text_pair_with_added_tokens()
    eos, pad = ours.config.eos_token_id, ours.config.eos_token_id
    added = ours.config.vocab_size - 1
    ids = torch.tensor([[97, 5, added, 7, eos, pad, pad], [97, added, eos, pad, pad, pad, pad],
                        [97, 3, 4, 5, 6, 7, eos]])
    mask = (ids != pad).long()
    mask[torch.arange(3), (ids == eos).int().argmax(-1)] = 1
    with torch.no_grad():
        expected = clip(input_ids=ids, attention_mask=mask).pooler_output
        actual = ours(input_ids=ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_resized_full_model_runs_and_round_trips(tmp_path) -> None:
    """`EvaCLIPModel.resize_token_embeddings` (CLIPModel cannot: it has no `get_input_embeddings`): transformers 4.x
    writes the new size to `config.vocab_size`, the text tower checks ids against `text_config.vocab_size`, so a new
    token's id was refused and `from_pretrained` of the saved model failed on the embedding's shape."""
    model = EvaCLIPModel(tiny_config("eva02", num_hidden_layers=1)).eval()
    size = model.config.text_config.vocab_size + 2
    model.resize_token_embeddings(size)
    assert model.config.text_config.vocab_size == size
    ids = torch.tensor([[97, 5, size - 1, 98]])
    pixel_values = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixel_values).text_embeds
    model.save_pretrained(tmp_path)
    reloaded = EvaCLIPModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, pixel_values=pixel_values).text_embeds, expected,
                                   atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sub_models_of_a_sharded_half_precision_dir_keep_its_dtype_and_weights(dtype, tmp_path) -> None:
    """A full model saved in half precision, in shards (`max_shard_size`): the projection models and the bare towers
    load from it with `dtype="auto"` (`torch_dtype` on 4.x) in that dtype, bit for bit the full model's tensors,
    nothing missing or unexpected beyond the other tower."""
    from llava_evaclip import EvaCLIPTextModelWithProjection, EvaCLIPVisionModelWithProjection

    full = randomize(EvaCLIPModel(tiny_config("eva02", num_hidden_layers=1))).to(dtype).eval()
    full.save_pretrained(tmp_path, max_shard_size="50KB")
    assert len([name for name in os.listdir(tmp_path) if name.endswith(".safetensors")]) > 1
    auto = {"torch_dtype" if TRANSFORMERS_4 else "dtype": "auto"}
    state = full.state_dict()
    for cls in (EvaCLIPModel, EvaCLIPVisionModelWithProjection, EvaCLIPTextModelWithProjection, EvaCLIPVisionModel,
                EvaCLIPTextModel):
        model, info = cls.from_pretrained(tmp_path, output_loading_info=True, **auto)
        assert not any(info[key] for key in ("missing_keys", "mismatched_keys")), (cls.__name__, info)
        assert {p.dtype for p in model.parameters()} == {dtype}, cls.__name__
        for name, value in model.state_dict().items():
            assert torch.equal(value, state[name]), (cls.__name__, name)


def test_feature_extraction_pipeline_on_a_text_tower_dir(tmp_path) -> None:
    """`pipeline("feature-extraction", text_tower_dir)` (AutoModel gives EvaCLIPTextModel): transformers 4.x loads a
    tokenizer only for a config class in TOKENIZER_MAPPING, so the pipeline had none and failed with "'NoneType'
    object is not callable"; 5.x loads the saved one. The features equal the tower's last hidden state."""
    from llava_evaclip.tokenization import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, VOCAB_SIZE, build_tokenizer

    config = tiny_text_config(vocab_size=VOCAB_SIZE, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
                              pad_token_id=PAD_TOKEN_ID, max_position_embeddings=77)
    tower = randomize(EvaCLIPTextModel(config)).eval()
    tokenizer = build_tokenizer(use_fast=True)
    tower.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    extractor = transformers.pipeline("feature-extraction", model=str(tmp_path))
    text = "a photo of a cat"
    with torch.no_grad():
        expected = tower(**tokenizer(text, return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(extractor(text, return_tensors=True), expected, atol=1e-6, rtol=0)


def _decay_names(use_rms_norm: bool, select) -> set[str]:
    model = EvaCLIPVisionModel(tiny_vision_config("eva02", num_hidden_layers=2, use_rms_norm=use_rms_norm))
    return {name for name in select(model) if "bias" not in name}


def test_rms_norm_gains_are_kept_out_of_weight_decay_as_layer_norms_are(tmp_path) -> None:
    """EVA-CLIP-8B / 18B's RMSNorm gains (`layer_norm1` / `layer_norm2`, which no name pattern matches): LLaVA's and
    LLaVA-NeXT's trainers (every transformers line) and transformers' Trainer up to 4.51 take the decayed parameters
    from `get_parameter_names(model, ALL_LAYERNORM_LAYERS)`, and put weight decay on the gains. Reference: the same tower
    with LayerNorms, whose exclusion transformers defines; without biases the two sets must be equal."""
    from transformers.trainer_pt_utils import get_parameter_names
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

    def llava_trainer_rule(model):
        return get_parameter_names(model, ALL_LAYERNORM_LAYERS)

    expected = _decay_names(False, llava_trainer_rule)
    assert not any("norm" in name for name in expected)
    assert _decay_names(True, llava_trainer_rule) == expected
    # the Trainer of 4.53 (at the latest) and 5.x matches nn.LayerNorm and names only (README: Known limitations)
    if "get_parameter_names(model, ALL_LAYERNORM_LAYERS" in inspect.getsource(Trainer.get_decay_parameter_names):
        trainer = Trainer(model=EvaCLIPVisionModel(tiny_vision_config("eva02")), args=_training_args(tmp_path))
        assert _decay_names(True, trainer.get_decay_parameter_names) == expected


def test_the_bf16_probe_of_the_test_suite_leaves_the_environment_alone():
    """transformers 4.x's TrainingArguments(bf16=True) sets ACCELERATE_MIXED_PRECISION=bf16 in os.environ; the suite's
    probe (conftest.deepspeed_bf16_cpu_flags) once left it there, and later Trainers and LLaVA-NeXT's training
    subprocesses of the same session ran under bf16 autocast (other numbers, and an fp16 run failing in autocast)."""
    from conftest import _trainer_refuses_bf16_without_gpu

    _trainer_refuses_bf16_without_gpu.cache_clear()
    before = dict(os.environ)
    _trainer_refuses_bf16_without_gpu()
    assert dict(os.environ) == before


def test_bf16_training_arguments_set_accelerates_mixed_precision_on_transformers_4(tmp_path):
    """The first half of a pair. transformers 4.x's TrainingArguments(bf16=True) sets ACCELERATE_MIXED_PRECISION=bf16
    for the whole process (5.x does not). On 4.57, test_hf_llava_training's bf16 Trainer case left it behind: a LLaVA
    fp16 training subprocess started later failed in autocast (`Unexpected floating ScalarType in
    at::autocast::prioritize`), and a later fp32 Trainer gave other numbers."""
    _training_args(tmp_path, bf16=True)
    assert (os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16") == TRANSFORMERS_4
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"  # on every line, so that the second half checks something
    os.environ["FSDP_OFFLOAD_PARAMS"] = "true"


def test_the_next_test_starts_without_it():
    """The second half: conftest's autouse fixture puts accelerate's variables back after every test."""
    assert os.environ.get("ACCELERATE_MIXED_PRECISION") == _ENVIRONMENT_AT_COLLECTION.get("ACCELERATE_MIXED_PRECISION")
    assert os.environ.get("FSDP_OFFLOAD_PARAMS") == _ENVIRONMENT_AT_COLLECTION.get("FSDP_OFFLOAD_PARAMS")
