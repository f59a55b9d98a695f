"""Issue 15 item 4: LLaVA-NeXT's own llava/train/train.py through the launcher, from the OneVision-style scripts in
integration/: Stage 1 (projector only) and Stage 2 (tower, projector and language model through `mm_tunable_parts`,
anyres_max_9 + spatial_unpad) in one process, and Stage 2 on 2 CPU ranks under ZeRO-3 (integration/zero3.json). Each
saved model reloads through LLaVA-NeXT's `load_pretrained_model` with the EVA-CLIP tower and gives the logits of a
model built from the same config with the saved weights loaded strictly."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from _dist.runner import free_port, worker_env
from next_common import LM_WIDTH, PINPOINTS, QUESTION, TOWER_WIDTH, workspace_once

from llava_evaclip import EvaCLIPVisionTower

INTEGRATION = Path(__file__).resolve().parents[2] / "integration"
TOWER_PREFIX = "model.vision_tower.vision_tower."
RUN_TIMEOUT_S = 420
# Toy scale on CPU; later flags override the script's.
CPU_ARGS = ["--max_steps", "2", "--gradient_accumulation_steps", "1", "--dataloader_num_workers", "0",
            "--report_to", "none", "--gradient_checkpointing", "False", "--model_max_length", "256", "--tf32", "False",
            "--image_grid_pinpoints", str(PINPOINTS), "--save_strategy", "no", "--warmup_ratio", "0",
            "--dataloader_drop_last", "False", "--seed", "0"]


@pytest.fixture(scope="module")
def ws():
    return workspace_once()


def run_script(script: str, ws, output_dir: Path, *extra: str, launcher: str = sys.executable, **env: str) -> dict:
    """One of the OneVision-style scripts with the tiny Qwen2 and EVA-CLIP tower; returns the trainer state."""
    variables = dict(LAUNCHER=launcher, DEEPSPEED_CONFIG="", MODEL_PATH=str(ws.qwen), VISION_TOWER=str(ws.eva),
                     DATA_PATH=str(ws.data), IMAGE_FOLDER=str(ws.images), OUTPUT_DIR=str(output_dir),
                     WANDB_MODE="disabled")
    variables.update(env)
    process = subprocess.Popen(["bash", str(INTEGRATION / script), *CPU_ARGS, *extra], env=worker_env(variables),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:  # timed out or interrupted: no rank is left behind
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, f"{script} failed:\n{output[-8000:]}"
    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [float(entry["loss"]) for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == 2 and len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    return state


def assert_tower_trained(ws, output_dir: Path) -> None:
    saved = load_file(output_dir / "model.safetensors")
    original = load_file(ws.eva / "model.safetensors")
    tower_keys = [key for key in saved if key.startswith(TOWER_PREFIX)]
    assert tower_keys and {key[len(TOWER_PREFIX):] for key in tower_keys} <= set(original)
    changed = [key for key in tower_keys if not torch.equal(saved[key].float(), original[key[len(TOWER_PREFIX):]].float())]
    assert changed, "the tower named in mm_tunable_parts was not trained"


def assert_reloads_with_same_logits(ws, output_dir: Path) -> None:
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model
    from llava.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM

    from llava_evaclip import register_with_llava, unregister_from_llava

    register_with_llava()
    try:
        # device_map "auto" keeps everything on the CPU here; any other value makes LLaVA-NeXT move the tower to CUDA.
        tokenizer, model, processor, _ = load_pretrained_model(
            str(output_dir), None, "llava_qwen", device_map="auto", torch_dtype="bfloat16", attn_implementation="sdpa")
        tower = model.get_vision_tower()
        assert isinstance(model, LlavaQwenForCausalLM) and isinstance(tower, EvaCLIPVisionTower)
        assert tower.is_loaded and tower.vision_tower_name == str(ws.eva) and processor is tower.image_processor
        # The reference: the same config, every saved weight loaded strictly. Only the weights are cast to bf16, as
        # from_pretrained(torch_dtype=bfloat16) leaves them: transformers >= 4.45's Qwen2 keeps its non-persistent RoPE
        # `inv_freq` in fp32 and reads it so, and .to(bfloat16) would round it (other logits, whatever the tower).
        reference = LlavaQwenForCausalLM(LlavaQwenConfig.from_pretrained(output_dir)).eval()
        reference.load_state_dict(load_file(output_dir / "model.safetensors"), strict=True)
        for parameter in reference.parameters():
            parameter.data = parameter.data.to(torch.bfloat16)
    finally:
        unregister_from_llava()
    pictures = [Image.open(ws.images / name).convert("RGB") for name in ("0.png", "1.png")]
    images = process_images(pictures, processor, model.config)
    prompt = f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt").unsqueeze(0).repeat(2, 1)
    kwargs = dict(input_ids=ids, images=[image.to(torch.bfloat16) for image in images],
                  image_sizes=[p.size for p in pictures], modalities=["image", "image"])
    with torch.no_grad():
        logits = model.eval()(**kwargs).logits
        expected = reference(**kwargs).logits
    assert logits.shape[0] == 2 and logits.shape[1] > ids.shape[1] + 2 * 16  # the image tokens are in
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def stage1(ws, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("onevision") / "stage1"
    run_script("onevision_stage1.sh", ws, output_dir, "--per_device_train_batch_size", "2", "--bf16", "False")
    return output_dir


def test_stage1_trains_the_projector_on_eva_features(ws, stage1):
    projector = torch.load(stage1 / "mm_projector.bin", map_location="cpu", weights_only=True)
    assert projector["model.mm_projector.0.weight"].shape == (LM_WIDTH, TOWER_WIDTH)
    config = json.loads((stage1 / "config.json").read_text())
    assert config["mm_vision_tower"] == str(ws.eva) and config["mm_tunable_parts"] == "mm_mlp_adapter"
    assert config["mm_hidden_size"] == TOWER_WIDTH and config["mm_vision_select_layer"] == -2


def test_stage2_trains_the_tower_and_reloads(ws, stage1, tmp_path):
    output_dir = tmp_path / "stage2"
    run_script("onevision_stage2.sh", ws, output_dir, "--per_device_train_batch_size", "2", "--bf16", "True",
               "--learning_rate", "1e-3", "--mm_vision_tower_lr", "1e-3",
               PRETRAIN_MM_MLP_ADAPTER=str(stage1 / "mm_projector.bin"))
    config = json.loads((output_dir / "config.json").read_text())
    assert config["mm_tunable_parts"] == "mm_vision_tower,mm_mlp_adapter,mm_language_model"
    assert config["image_aspect_ratio"] == "anyres_max_9" and config["mm_patch_merge_type"] == "spatial_unpad"
    assert_tower_trained(ws, output_dir)
    assert_reloads_with_same_logits(ws, output_dir)


def test_stage2_on_two_ranks_with_zero3(ws, stage1, tmp_path):
    output_dir = tmp_path / "stage2_zero3"
    launcher = (f"{sys.executable} -m torch.distributed.run --nnodes 1 --nproc_per_node 2 --master_addr 127.0.0.1 "
                f"--master_port {free_port()} --max-restarts 0")
    state = run_script("onevision_stage2.sh", ws, output_dir, "--per_device_train_batch_size", "1", "--bf16", "True",
                       "--learning_rate", "1e-3", "--mm_vision_tower_lr", "1e-3", launcher=launcher,
                       DEEPSPEED_CONFIG=str(INTEGRATION / "zero3.json"), OMP_NUM_THREADS="1",
                       PRETRAIN_MM_MLP_ADAPTER=str(stage1 / "mm_projector.bin"))
    assert state["train_batch_size"] == 1  # per rank: 2 ranks share the 4 samples over 2 steps
    assert_tower_trained(ws, output_dir)
    assert_reloads_with_same_logits(ws, output_dir)
