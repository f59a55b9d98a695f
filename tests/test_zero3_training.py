"""LLaVA training with the EVA-CLIP tower under DeepSpeed on 2 CPU ranks, through integration/run_llava.py and the
ZeRO configs of integration/: LLaVA-1.5's pretrain stage (projector only, ZeRO-2) and its finetune stage (ZeRO-3) with
the tower trained (`--unfreeze_mm_vision_tower True`) and frozen. A tiny Llama and a tiny EVA02 tower, bf16 as LLaVA's
scripts train. The checkpoints are consolidated both ways DeepSpeed offers (the 16-bit gather at save time and
zero_to_fp32 from the partitioned optimizer shards) and reloaded through LLaVA's own loader.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("llava", reason="LLaVA's code (pip install --no-deps llava-torch) is needed for these tests")
sentencepiece = pytest.importorskip("sentencepiece")

from _dist.runner import REPO_ROOT, run_torchrun  # noqa: E402
from conftest import (  # noqa: E402
    deepspeed_bf16_cpu_flags,
    needs_deepspeed_gloo_multi_gather,
    needs_gloo_all_gather,
    tiny_config,
)
from safetensors.torch import load_file  # noqa: E402

from llava_evaclip import EvaCLIPModel  # noqa: E402
from llava_evaclip.processing import build_image_processor  # noqa: E402

pytestmark = needs_gloo_all_gather()

NPROC = 2
MICRO_BATCH = 2
LM_WIDTH = 48  # differs from the tower's width (32), so the projector's shape shows which side is which
TOWER_PREFIX = "model.vision_tower.vision_tower."
RUN_TIMEOUT_S = 420
INTEGRATION = REPO_ROOT / "integration"
ANSWERS = ["a red square", "the image shows a green circle", "a small blue shape", "two dark stripes"]


# --------------------------------------------------------------------------------------------------------------------
# Workspace: tiny language model, tokenizer, tower, images and LLaVA-format conversations
# --------------------------------------------------------------------------------------------------------------------


def _write_tokenizer(directory: Path) -> int:
    """A SentencePiece Llama tokenizer trained on the answers (LLaVA loads it with use_fast=False)."""
    model_path = directory / "tokenizer"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(ANSWERS * 20 + ["what is in the image"] * 20), model_prefix=str(model_path),
        vocab_size=64, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        minloglevel=2, num_threads=1)
    (directory / "tokenizer.vocab").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    return 64


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> SimpleNamespace:
    from PIL import Image
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("zero3_training")
    torch.manual_seed(0)
    config = tiny_config("eva02")
    EvaCLIPModel(config).save_pretrained(root / "tower")
    build_image_processor(config).save_pretrained(root / "tower")
    (root / "lm").mkdir()
    vocab = _write_tokenizer(root / "lm")
    LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=LM_WIDTH, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )).save_pretrained(root / "lm")
    (root / "images").mkdir()
    generator = torch.Generator().manual_seed(0)
    records = []
    for index, answer in enumerate(ANSWERS):
        pixels = torch.randint(0, 256, (30 + 4 * index, 36, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / "images" / f"{index}.png")
        records.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the image"}, {"from": "gpt", "value": answer}]})
    (root / "data.json").write_text(json.dumps(records))
    return SimpleNamespace(
        root=root,
        zero2=INTEGRATION / "zero2.json",  # the shipped configs, unchanged: "auto" sizes filled by the Trainer
        zero3=INTEGRATION / "zero3.json",
        tower=load_file(root / "tower" / "model.safetensors"),
    )


def train(workspace: SimpleNamespace, output_dir: Path, deepspeed_config: Path, *args: str) -> SimpleNamespace:
    """LLaVA's llava.train.train through the integration launcher on 2 ranks, with LLaVA-1.5's script flags at toy
    scale (bf16 as LLaVA trains; the "plain" conversation format of its pretrain stage)."""
    root = workspace.root
    result = run_torchrun(
        INTEGRATION / "run_llava.py", "llava.train.train",
        "--deepspeed", deepspeed_config,
        "--model_name_or_path", root / "lm", "--version", "plain",
        "--data_path", root / "data.json", "--image_folder", root / "images", "--vision_tower", root / "tower",
        "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--bf16", "True", *deepspeed_bf16_cpu_flags(), "--output_dir", output_dir,
        "--per_device_train_batch_size", str(MICRO_BATCH), "--gradient_accumulation_steps", "1",
        "--evaluation_strategy", "no", "--weight_decay", "0.", "--warmup_ratio", "0.0",
        "--lr_scheduler_type", "constant", "--logging_steps", "1", "--model_max_length", "64",
        "--gradient_checkpointing", "False", "--dataloader_num_workers", "0", "--lazy_preprocess", "True",
        "--report_to", "none", "--seed", "0",
        *args,
        nproc=NPROC, timeout=RUN_TIMEOUT_S, env={"WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.describe()
    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [float(entry["loss"]) for entry in state["log_history"] if "loss" in entry]
    return SimpleNamespace(output_dir=output_dir, losses=losses, state=state)


def assert_loss_decreases(run: SimpleNamespace, steps: int) -> None:
    assert run.state["global_step"] == steps and len(run.losses) == steps, run.state["log_history"]
    assert all(math.isfinite(loss) and loss > 0 for loss in run.losses), run.losses
    assert run.losses[-1] < run.losses[0], run.losses


def consolidated_fp32(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation of a ZeRO checkpoint into fp32 (trainable weights from the fp32 optimizer
    partitions, frozen ones from the model states)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))


def tower_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key[len(TOWER_PREFIX):]: value for key, value in state_dict.items() if key.startswith(TOWER_PREFIX)}


# --------------------------------------------------------------------------------------------------------------------
# Runs (module-scoped: each is one torchrun job; the finetune runs start from the pretrained projector)
# --------------------------------------------------------------------------------------------------------------------

PRETRAIN_STEPS = 4
FINETUNE_STEPS = 4


@pytest.fixture(scope="module")
def pretrain_run(workspace) -> SimpleNamespace:
    return train(workspace, workspace.root / "pretrain", workspace.zero2, "--tune_mm_mlp_adapter", "True",
                 "--learning_rate", "1e-2", "--max_steps", str(PRETRAIN_STEPS), "--save_strategy", "no")


def _finetune(workspace, pretrain_run, name: str, *extra: str) -> SimpleNamespace:
    return train(workspace, workspace.root / name, workspace.zero3,
                 "--pretrain_mm_mlp_adapter", pretrain_run.output_dir / "mm_projector.bin",
                 "--learning_rate", "2e-3", "--max_steps", str(FINETUNE_STEPS),
                 "--save_strategy", "steps", "--save_steps", str(FINETUNE_STEPS), *extra)


@pytest.fixture(scope="module")
def finetune_unfrozen_run(workspace, pretrain_run) -> SimpleNamespace:
    return _finetune(workspace, pretrain_run, "finetune_unfrozen", "--unfreeze_mm_vision_tower", "True")


@pytest.fixture(scope="module")
def finetune_frozen_run(workspace, pretrain_run) -> SimpleNamespace:
    return _finetune(workspace, pretrain_run, "finetune_frozen")


# --------------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------------


def test_pretrain_zero2_trains_and_saves_the_projector(workspace, pretrain_run):
    assert_loss_decreases(pretrain_run, PRETRAIN_STEPS)
    projector = torch.load(pretrain_run.output_dir / "mm_projector.bin", map_location="cpu", weights_only=True)
    assert sorted(projector) == [f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    assert projector["model.mm_projector.0.weight"].shape == (LM_WIDTH, 32)
    assert all(torch.isfinite(value).all() for value in projector.values())
    config = json.loads((pretrain_run.output_dir / "config.json").read_text())
    assert config["mm_vision_tower"] == str(workspace.root / "tower") and config["mm_hidden_size"] == 32


@needs_deepspeed_gloo_multi_gather()
def test_finetune_zero3_trains_the_unfrozen_tower(workspace, finetune_unfrozen_run):
    run = finetune_unfrozen_run
    assert_loss_decreases(run, FINETUNE_STEPS)
    saved = load_file(run.output_dir / "model.safetensors")  # LLaVA's final save: ZeRO-3's 16-bit gather
    saved_tower = tower_weights(saved)
    assert saved_tower.keys() == {key for key in workspace.tower if key.startswith("vision_model.")}
    assert all(value.dtype == torch.bfloat16 for value in saved_tower.values())

    # The trained weights: DeepSpeed's fp32 master copy, consolidated from the partitioned optimizer shards of the
    # checkpoint saved at the same (last) step. The 16-bit save holds exactly their bf16 rounding.
    master_tower = tower_weights(consolidated_fp32(run.output_dir / f"checkpoint-{FINETUNE_STEPS}"))
    assert master_tower.keys() == saved_tower.keys()
    for key, value in master_tower.items():
        assert value.dtype == torch.float32
        assert torch.equal(value.to(torch.bfloat16), saved_tower[key]), key
    # ... and they did train. The master copy started as the checkpoint in bf16; every tensor of the part of the tower
    # LLaVA runs (embeddings and the layers up to the selected one, -2) moved, and what never runs (the last layer,
    # the final norm) got no gradient and kept its value exactly.
    used = ("vision_model.embeddings.", "vision_model.encoder.layers.0.", "vision_model.encoder.layers.1.")
    for key, value in master_tower.items():
        start = workspace.tower[key].to(torch.bfloat16).float()
        assert torch.equal(value, start) != key.startswith(used), key


@needs_deepspeed_gloo_multi_gather()
def test_unfrozen_finetune_checkpoint_reloads_through_llava(finetune_unfrozen_run):
    """LLaVA reloads the saved model with its own loader; the config says the tower was trained, so the tower is built
    eagerly and ends up with the saved (trained) weights, not the original checkpoint's."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    from llava_evaclip import register_with_llava, unregister_from_llava

    saved_tower = tower_weights(load_file(finetune_unfrozen_run.output_dir / "model.safetensors"))
    register_with_llava()
    try:
        model = LlavaLlamaForCausalLM.from_pretrained(finetune_unfrozen_run.output_dir, torch_dtype=torch.float32)
    finally:
        unregister_from_llava()
    tower = model.get_vision_tower()
    assert tower.is_loaded
    reloaded = {f"vision_model.{k}": v for k, v in tower.vision_tower.vision_model.state_dict().items()}
    assert reloaded.keys() == saved_tower.keys()
    for key, value in reloaded.items():
        assert torch.equal(value, saved_tower[key].float()), key


@needs_deepspeed_gloo_multi_gather()
def test_finetune_zero3_keeps_the_frozen_tower_exactly(workspace, finetune_frozen_run):
    run = finetune_frozen_run
    assert_loss_decreases(run, FINETUNE_STEPS)
    saved = load_file(run.output_dir / "model.safetensors")
    saved_tower = tower_weights(saved)
    assert saved_tower
    # Loaded into bf16 partitions, never updated, gathered at save: exactly the checkpoint's values in bf16.
    for key, value in saved_tower.items():
        assert torch.equal(value, workspace.tower[key].to(torch.bfloat16)), key
    # DeepSpeed's fp32 consolidation of the same run carries the frozen tower unchanged too.
    master_tower = tower_weights(consolidated_fp32(run.output_dir / f"checkpoint-{FINETUNE_STEPS}"))
    assert master_tower.keys() == saved_tower.keys()
    for key, value in master_tower.items():
        assert torch.equal(value.to(torch.bfloat16), saved_tower[key]), key
    # The language model did train.
    original_lm = load_file(workspace.root / "lm" / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(saved[key], original_lm[key].to(torch.bfloat16))
