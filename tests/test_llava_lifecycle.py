"""LLaVA 1.5's lifecycle around an EVA-CLIP tower beyond plain training: LoRA (LLaVA's own target selection, saving
and `load_pretrained_model(path, base, "...lora...")` merge), resuming and the tower contract LLaVA's code reads.
References are LLaVA's own code path or the trained model's own numbers before it is saved."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import transformers

pytest.importorskip("llava", reason="LLaVA's code (pip install --no-deps llava-torch) is needed for these tests")
pytest.importorskip("peft", reason="LLaVA's --lora_enable needs peft")
pytest.importorskip("sentencepiece")

from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM  # noqa: E402

from conftest import needs_gloo_all_gather  # noqa: E402
from llava_evaclip import launch, register_with_llava, unregister_from_llava  # noqa: E402
from test_llava_launcher import workspace, write_tokenizer  # noqa: E402,F401  (workspace: a fixture)
from test_llava_model import eva_dir as tower_dir  # noqa: E402,F401  (a fixture: the converted-style tower)
from test_llava_model import model_args  # noqa: E402

TOWER_PREFIX = "model.vision_tower.vision_tower."


def _save_llava_with_trained_tower(root, tower):
    """A LLaVA-1.5 checkpoint (with its tokenizer) saved after a stage that trained the tower: its config says
    `unfreeze_mm_vision_tower`, so LLaVA builds the tower eagerly whenever it loads this model."""
    vocab = write_tokenizer(root)
    register_with_llava()
    try:
        torch.manual_seed(12)
        model = LlavaLlamaForCausalLM(LlavaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0))
        model.get_model().initialize_vision_modules(model_args(str(tower)))
        with torch.no_grad():  # the earlier stage's training of the tower
            for parameter in model.get_vision_tower().parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
    finally:
        unregister_from_llava()
    model.config.unfreeze_mm_vision_tower = True
    model.config.mm_use_im_start_end = model.config.mm_use_im_patch_token = False
    model.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def llava_with_trained_tower(tmp_path_factory, tower_dir):
    return _save_llava_with_trained_tower(tmp_path_factory.mktemp("llava_trained_tower"), tower_dir)


@pytest.fixture(scope="module")
def llava_with_trained_clip_tower(tmp_path_factory):
    """The same with LLaVA's own CLIPVisionTower (a tiny transformers CLIP vision checkpoint): the reference."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(14)
    clip_dir = tmp_path_factory.mktemp("clip_tower")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=28, patch_size=7)).save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(clip_dir)
    return _save_llava_with_trained_tower(tmp_path_factory.mktemp("llava_trained_clip_tower"), clip_dir)


@pytest.fixture
def llava_train_module():
    """llava.train.train as the launcher prepares it (LoRA targets, the Trainer's RNG-state loading, tower options)."""
    module = launch.prepare_llava("llava.train.train")
    yield module
    unregister_from_llava()


def test_lora_from_a_llava_checkpoint_keeps_adapters_off_the_tower_and_reloads_the_trained_tower(
        llava_train_module, llava_with_trained_tower, tower_dir, tmp_path):
    """LLaVA's train() with --lora_enable, started from a LLaVA checkpoint whose tower was trained, then
    --unfreeze_mm_vision_tower True: LoRA goes on the language model only (LLaVA's find_all_linear_names leaves the
    multimodal modules out, but returns leaf names that peft would also match inside the eagerly built tower), the
    tower is trained whole and saved in non_lora_trainables.bin, and LLaVA's LoRA loader reloads exactly the trained
    tower and projector."""
    from llava.model.builder import load_pretrained_model
    from peft import LoraConfig, get_peft_model

    train = llava_train_module
    # What LLaVA's train() does, in its order, without the Trainer's loop.
    model = LlavaLlamaForCausalLM.from_pretrained(llava_with_trained_tower)
    assert model.get_vision_tower().is_loaded  # built eagerly: it is there when LoRA is added
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=train.find_all_linear_names(model), lora_dropout=0.0,
                             bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora_config)
    tower = model.get_model().get_vision_tower()
    adapted = {name.rsplit(".lora_", 1)[0] for name, _ in model.named_parameters() if ".lora_" in name}
    assert adapted and not [name for name in adapted if "vision_tower" in name or "mm_projector" in name]
    # Every Linear of the language model LLaVA means to adapt has its adapter (LLaVA skips only lm_head).
    language_linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                        and not any(key in name for key in ("vision_tower", "mm_projector", "lm_head", ".lora_"))}
    assert language_linears == {f"{name}.base_layer" for name in adapted}
    assert not any(parameter.requires_grad for parameter in tower.parameters())  # a tower not asked to train stays so

    model.get_model().initialize_vision_modules(model_args(str(tower_dir), unfreeze_mm_vision_tower=True))
    assert all(parameter.requires_grad for parameter in tower.parameters())
    torch.manual_seed(13)
    with torch.no_grad():  # "training": every trainable parameter moves (the LoRA B matrices start at zero)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    trained = copy.deepcopy(model).merge_and_unload().state_dict()

    # LLaVA's save at the end of train() with lora_enable.
    out = tmp_path / "llava-tiny-lora"
    state_dict = train.get_peft_state_maybe_zero_3(model.named_parameters(), "none")
    non_lora = train.get_peft_state_non_lora_maybe_zero_3(model.named_parameters())
    model.config.save_pretrained(out)
    model.save_pretrained(out, state_dict=state_dict)
    torch.save(non_lora, out / "non_lora_trainables.bin")

    _, reloaded, _, _ = load_pretrained_model(str(out), str(llava_with_trained_tower), "llava-tiny-lora", device="cpu")
    reloaded_state = reloaded.state_dict()
    checked = [key for key in trained if key.startswith(TOWER_PREFIX) or ".mm_projector." in key]
    assert any(key.endswith("self_attn.q_proj.weight") for key in checked)
    for key in checked:  # LLaVA's loader casts to fp16: exactly the trained values, rounded once
        assert torch.equal(reloaded_state[key], trained[key].to(torch.float16)), key


def _tiny_llava_with_tower(tower_dir, **tower_options) -> LlavaLlamaForCausalLM:
    torch.manual_seed(21)
    model = LlavaLlamaForCausalLM(LlavaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.get_model().initialize_vision_modules(model_args(str(tower_dir), **tower_options))
    return model


class _ImageTextData(torch.utils.data.Dataset):
    """Four samples in the form LLaVA's collator hands to the model: an image placeholder, text, labels and pixels."""

    def __init__(self) -> None:
        from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

        generator = torch.Generator().manual_seed(22)
        self.items = []
        for index in range(4):
            ids = torch.tensor([1, IMAGE_TOKEN_INDEX, 3 + index, 7, 9 + index, 2])
            labels = ids.clone()
            labels[:2] = IGNORE_INDEX
            images = torch.randn(3, 28, 28, generator=generator)
            self.items.append({"input_ids": ids, "labels": labels, "images": images,
                               "attention_mask": torch.ones_like(ids, dtype=torch.bool)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def _collate(items: list) -> dict:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


@pytest.mark.parametrize("unfreeze", [True, False], ids=["trained_tower", "frozen_tower"])
def test_resuming_from_a_checkpoint_continues_exactly(llava_train_module, tower_dir, tmp_path, unfreeze):
    """LLaVA's train() resumes by itself when --output_dir holds a checkpoint-*. Four steps in one go and two steps
    resumed from the step-2 checkpoint of the same run end with the same weights, the tower's (and its optimizer
    state, when it trains) included."""

    def trainer(output_dir):
        model = _tiny_llava_with_tower(tower_dir, unfreeze_mm_vision_tower=unfreeze)
        assert any(p.requires_grad for p in model.get_vision_tower().parameters()) == unfreeze
        args = llava_train_module.TrainingArguments(  # LLaVA's own (group_by_modality_length, ...)
            output_dir=str(output_dir), max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
            learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, report_to="none", seed=0,
            remove_unused_columns=False, dataloader_num_workers=0)
        return llava_train_module.LLaVATrainer(model=model, args=args, train_dataset=_ImageTextData(),
                                               data_collator=_collate)

    straight = trainer(tmp_path / "straight")
    straight.train()
    expected = {key: value.clone() for key, value in straight.model.state_dict().items()}
    start = _tiny_llava_with_tower(tower_dir).state_dict()
    moved = [key for key in expected if key.startswith(TOWER_PREFIX) and not torch.equal(expected[key], start[key])]
    assert bool(moved) == unfreeze

    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    actual = resumed.model.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.mark.parametrize("kind", ["clip", "evaclip"])
def test_a_tower_trained_in_an_earlier_stage_stays_frozen_unless_asked(llava_train_module, request, kind):
    """Training on from a LLaVA checkpoint whose tower was trained (its config makes LLaVA build the tower eagerly),
    without --unfreeze_mm_vision_tower this time: the tower gets no gradient and the Trainer's optimizer does not see
    it, while the language model trains. "clip" is the reference: LLaVA's own CLIPVisionTower in the same flow."""
    from test_llava_model import batch_with_images

    if kind == "clip" and int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("LLaVA's CLIPVisionTower cannot load eagerly inside from_pretrained on transformers 5 "
                    "(CLIPVisionModel.from_pretrained under the meta device)")
    checkpoint = request.getfixturevalue(f"llava_with_trained_{'clip_' if kind == 'clip' else ''}tower")
    model = LlavaLlamaForCausalLM.from_pretrained(checkpoint)  # as LLaVA's train() loads --model_name_or_path
    tower = model.get_vision_tower()
    assert tower.is_loaded  # built eagerly
    assert type(tower).__name__ == {"clip": "CLIPVisionTower", "evaclip": "EvaCLIPVisionTower"}[kind]
    model.get_model().initialize_vision_modules(model_args(model.config.mm_vision_tower))
    assert not any(parameter.requires_grad for parameter in tower.parameters())
    ids, attention_mask, labels = batch_with_images()
    torch.manual_seed(15)
    images = torch.randn(2, 3, 28, 28)
    model(input_ids=ids, attention_mask=attention_mask, labels=labels, images=images).loss.backward()
    assert model.get_model().layers[0].mlp.down_proj.weight.grad is not None
    assert [name for name, parameter in tower.named_parameters() if parameter.grad is not None] == []


@needs_gloo_all_gather()
def test_a_lora_run_under_zero3_resumes_exactly(workspace, tmp_path):
    """LLaVA's LoRA recipe (finetune_lora.sh: ZeRO-3, --lora_enable True) with the tower trained too, resumed from its
    own checkpoint as LLaVA's train() does when --output_dir holds one: the resumed run ends with the same adapters,
    projector and tower as the run that went straight through."""
    pytest.importorskip("deepspeed")
    from _dist.runner import REPO_ROOT, run_torchrun

    def train(output_dir):
        from conftest import deepspeed_bf16_cpu_flags

        cpu = deepspeed_bf16_cpu_flags()
        result = run_torchrun(
            REPO_ROOT / "integration" / "run_llava.py", "llava.train.train",
            "--deepspeed", REPO_ROOT / "integration" / "zero3.json", "--lora_enable", "True", "--lora_r", "4",
            "--lora_alpha", "8", "--unfreeze_mm_vision_tower", "True", "--model_name_or_path", workspace / "lm",
            "--version", "v1", "--data_path", workspace / "data.json", "--image_folder", workspace / "images",
            "--vision_tower", workspace / "tower", "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
            "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--bf16", "True", *cpu,
            "--output_dir", output_dir, "--per_device_train_batch_size", "2", "--max_steps", "2",
            "--save_strategy", "steps", "--save_steps", "1", "--learning_rate", "1e-2", "--lr_scheduler_type",
            "constant", "--warmup_ratio", "0.0", "--weight_decay", "0.", "--logging_steps", "1",
            "--model_max_length", "512", "--gradient_checkpointing", "False", "--dataloader_num_workers", "0",
            "--lazy_preprocess", "True", "--report_to", "none", "--seed", "0",
            nproc=1, timeout=240, env={"WANDB_MODE": "disabled"})
        assert result.returncode == 0, result.describe()

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight)
    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    train(resumed)  # LLaVA's train() finds checkpoint-1 and resumes from it
    from safetensors.torch import load_file

    for name, load in (("adapter_model.safetensors", load_file), ("non_lora_trainables.bin", torch.load)):
        expected, actual = load(straight / name), load(resumed / name)
        assert actual.keys() == expected.keys(), name
        for key, value in expected.items():
            assert torch.equal(actual[key], value), (name, key)
    trained = torch.load(straight / "non_lora_trainables.bin")
    assert any("vision_tower" in key for key in trained) and any("mm_projector" in key for key in trained)
