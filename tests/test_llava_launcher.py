"""The integration launcher: command-line handling, LLaVA's training arguments, and LLaVA-1.5's pretrain and finetune
scripts run end to end on CPU (a tiny Llama, a tiny EVA-CLIP tower, a synthetic dataset in LLaVA's JSON format)."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("llava", reason="LLaVA's code (pip install --no-deps llava-torch) is needed for these tests")

from safetensors.torch import load_file  # noqa: E402

from conftest import cpu_training_arguments, needs_cpu_fp16, tiny_config  # noqa: E402
from llava_evaclip import EvaCLIPModel  # noqa: E402
from llava_evaclip import launch  # noqa: E402
from llava_evaclip.processing import build_image_processor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INTEGRATION = REPO / "integration"
TOWER_WIDTH = 48  # distinct from the LM width, so the projector's input shape shows which tower fed it
LM_WIDTH = 64


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def test_split_command_passes_deepspeeds_local_rank_on():
    assert launch.split_command(["llava.train.train", "--a", "1"]) == ("llava.train.train", ["--a", "1"])
    # deepspeed runs `script --local_rank=N user args...`
    assert launch.split_command(["--local_rank=1", "llava.train.train", "--a", "1"]) == (
        "llava.train.train", ["--a", "1", "--local_rank=1"])
    assert launch.split_command(["--local_rank", "0", "llava.serve.cli"]) == ("llava.serve.cli", ["--local_rank", "0"])


def test_llavas_own_file_spelling_resolves_to_the_module():
    import importlib.util

    path = importlib.util.find_spec("llava.train.train_mem").origin
    assert launch.resolve_module(path) == "llava.train.train_mem"


@pytest.mark.parametrize("argv, message", [
    ([], "expected a LLaVA module"),
    (["--bf16", "True"], "expected a LLaVA module"),
    (["llava.train.trian"], "no module named 'llava.train.trian'"),
    (["other/train.py"], "not a module of the installed `llava` package"),
])
def test_usage_errors_exit_2_with_one_line(argv, message, capsys):
    assert launch.main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("run_llava.py: error: ") and message in error[-1]


def test_renamed_training_flags_are_translated():
    """LLaVA's scripts spell flags for transformers 4.3x; the installed TrainingArguments must accept them."""
    from transformers import HfArgumentParser, TrainingArguments

    for strategy_flag in ("--evaluation_strategy", "--eval_strategy"):
        args = launch.translate_training_args(
            ["--output_dir", "unused", strategy_flag, "steps", "--warmup_ratio=0.25", "--max_steps", "8"])
        (parsed,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(args)
        strategy = getattr(parsed, "eval_strategy", None) or parsed.evaluation_strategy
        assert str(getattr(strategy, "value", strategy)) == "steps"
        assert parsed.get_warmup_steps(8) == 2


def test_model_arguments_take_the_tower_options(tmp_path):
    import transformers

    train_module = launch.prepare_llava("llava.train.train")
    parser = transformers.HfArgumentParser(train_module.ModelArguments)
    eva_dir = str(tmp_path / "my-eva-tower")
    (args,) = parser.parse_args_into_dataclasses(launch.translate_training_args(
        ["--vision_tower", eva_dir, "--mm_vision_select_layer", "-2,-5,-8", "--s2", "True", "--s2_scales", "336,672",
         "--unfreeze_mm_vision_tower", "True"]))
    assert args.mm_vision_select_layer == "-2,-5,-8" and args.s2 and args.s2_scales == "336,672"
    assert args.unfreeze_mm_vision_tower
    (args,) = parser.parse_args_into_dataclasses(["--vision_tower", eva_dir, "--mm_vision_select_layer", "-2"])
    assert args.mm_vision_select_layer == -2 and not args.s2 and not args.unfreeze_mm_vision_tower
    (args,) = parser.parse_args_into_dataclasses(["--vision_tower", "openai/clip-vit-large-patch14"])
    assert args.mm_vision_select_layer == -1  # LLaVA's default, an int for its own tower
    with pytest.raises(ValueError, match="several layers need an EVA-CLIP tower"):
        parser.parse_args_into_dataclasses(
            ["--vision_tower", "openai/clip-vit-large-patch14", "--mm_vision_select_layer=-2,-3"])
    # LLaVA 1.5's builder has no S2: its CLIP tower would train without it while the saved config says s2=True
    with pytest.raises(ValueError, match=r"--s2 True: S2 multi-scale features need an EVA-CLIP tower"):
        parser.parse_args_into_dataclasses(["--vision_tower", "openai/clip-vit-large-patch14", "--s2", "True"])
    (args,) = parser.parse_args_into_dataclasses(["--vision_tower", "openai/clip-vit-large-patch14", "--s2", "False"])
    assert not args.s2


@pytest.mark.parametrize("config_name", ["zero3.json", "zero3_offload.json"])
def test_auto_zero3_bucket_sizes_are_filled_as_deepspeed_takes_them(config_name, tmp_path, monkeypatch):
    """The shipped ZeRO-3 configs say "auto" for the hidden-size-based bucket sizes, as LLaVA's do. Filled the way the
    Trainer fills them for a 7B LLaVA (hidden size 4096), DeepSpeed's own config class must accept the result:
    transformers 4.37 computes the prefetch bucket as 0.9 * 4096**2 = 15099494.4, which it refuses."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from llava.model.language_model.llava_llama import LlavaConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    monkeypatch.setattr(HfTrainerDeepSpeedConfig, "trainer_config_finalize",
                        HfTrainerDeepSpeedConfig.trainer_config_finalize)  # restored after the test
    launch.patch_deepspeed_auto_fill()
    launch.patch_deepspeed_auto_fill()  # idempotent
    config = json.loads((INTEGRATION / config_name).read_text())
    assert all(config["zero_optimization"][key] == "auto" for key in launch._HIDDEN_SIZE_ZERO_KEYS)
    ds_config = HfTrainerDeepSpeedConfig(config)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, report_to="none")
    ds_config.trainer_config_process(args)
    model = types.SimpleNamespace(config=LlavaConfig(hidden_size=4096, num_hidden_layers=1))
    ds_config.trainer_config_finalize(args, model, 100)
    zero = ds_config.config["zero_optimization"]
    expected = {"reduce_bucket_size": 4096 * 4096, "stage3_prefetch_bucket_size": 15099494,
                "stage3_param_persistence_threshold": 10 * 4096}
    assert {key: zero[key] for key in expected} == expected
    assert all(type(zero[key]) is int for key in expected)
    parsed = DeepSpeedZeroConfig(**zero)
    assert (parsed.prefetch_bucket_size, parsed.param_persistence_threshold, parsed.reduce_bucket_size) == (
        15099494, 10 * 4096, 4096 * 4096)


def test_llava_next_loop_fix_reaches_through_the_signature_adapter(monkeypatch):
    """On transformers 4.46+ (whose Trainer takes `processing_class`, not `tokenizer`) `patch_llava_trainer` puts its
    adapter above LLaVA-NeXT's `LLaVATrainer` first; the training-loop fix must still find LLaVA-NeXT's override of
    `_inner_training_loop` below it (it looked in the adapter's own attributes only, so regular training ran LLaVA-NeXT's
    broken copy of the loop)."""
    from transformers import Trainer

    calls = []

    class LLaVATrainer(Trainer):  # LLaVA-NeXT's: a copy of the loop for its zeroth-order mode
        def _inner_training_loop(self, *args, **kwargs):
            calls.append("llava-next")

    monkeypatch.setattr(Trainer, "_inner_training_loop", lambda self, *a, **k: calls.append("transformers"))
    # what `patch_llava_trainer` does where the Trainer takes no `tokenizer`
    train_module = types.SimpleNamespace(LLaVATrainer=launch._compat_trainer_class(LLaVATrainer))
    launch.patch_llava_next_trainer(train_module)
    trainer = object.__new__(train_module.LLaVATrainer)
    for mode in ("regular", "zo"):
        trainer.trainer_mode = mode
        trainer._inner_training_loop(batch_size=1)
    assert calls == ["transformers", "llava-next"]
    assert train_module.LLaVATrainer._evaclip_next and train_module.LLaVATrainer._evaclip_compat


def test_llava_next_training_with_an_accelerate_without_dispatch_batches_is_refused_in_one_line():
    """LLaVA-NeXT's trainer passes `dispatch_batches=` to accelerate's Accelerator (removed in accelerate 1.0): the
    launcher says so before training starts, instead of a TypeError from inside the Trainer's constructor."""
    import inspect

    import accelerate

    try:  # the arguments bound as LLaVA-NeXT's call passes them, without building an Accelerator (global state)
        inspect.signature(accelerate.Accelerator).bind(dispatch_batches=None, split_batches=False)
    except TypeError as error:  # what LLaVA-NeXT's trainer hits on this accelerate
        assert "dispatch_batches" in str(error)
        with pytest.raises(launch.LaunchError, match=r"^LLaVA-NeXT's trainer passes `dispatch_batches` .* accelerate 1\.0 "
                           r"removed; found accelerate \S+: pip install 'accelerate<1\.0'"):
            launch.check_llava_next_accelerate()
    else:  # no complaint about accelerate (transformers 4.5x gets its own, the test below)
        assert not [problem for problem in launch.llava_next_trainer_problems() if "accelerate 1.0" in problem]


def test_a_trainer_that_needs_a_newer_accelerate_is_refused_in_one_line(monkeypatch, tmp_path):
    """transformers 4.52+'s Trainer calls `Accelerator.unwrap_model(model, keep_torch_compile=False)` as training
    starts (accelerate >= 1.3), though it asks for accelerate >= 0.26 only: with transformers 4.57.6 and accelerate
    0.34.2, LLaVA's pretraining loaded its model and stopped with a TypeError. The launcher says so first."""
    import inspect

    import accelerate
    from transformers import Trainer, trainer

    def unwrap_model(self, model, keep_fp32_wrapper=True):  # accelerate 1.2's signature
        return model

    monkeypatch.setattr(accelerate.Accelerator, "unwrap_model", unwrap_model)
    arguments = cpu_training_arguments(output_dir=str(tmp_path), report_to=[])
    reference = Trainer(model=torch.nn.Linear(2, 2), args=arguments)
    if "keep_torch_compile" in inspect.getsource(trainer):
        with pytest.raises(TypeError, match="keep_torch_compile"):  # what the run hits without the launcher's check
            reference._wrap_model(reference.model)
        with pytest.raises(launch.LaunchError, match=r"^transformers \S+'s Trainer calls Accelerator\.unwrap_model\("
                           r"keep_torch_compile=\.\.\.\), which accelerate \S+ lacks .*pip install 'accelerate>=1\.3'"):
            launch.check_trainer_accelerate()
    else:  # transformers 4.37.2: the Trainer runs on that accelerate
        reference._wrap_model(reference.model)
        launch.check_trainer_accelerate()


def test_llava_next_training_with_a_transformers_without_dispatch_batches_is_refused_in_one_line(monkeypatch):
    """The same Accelerator call reads `self.args.dispatch_batches` / `split_batches`, TrainingArguments fields that
    transformers 4.5x removed (an AttributeError inside the Trainer's constructor on 4.56): the launcher names them."""
    from transformers import TrainingArguments

    fields = {name: field for name, field in TrainingArguments.__dataclass_fields__.items()
              if name not in ("dispatch_batches", "split_batches")}
    monkeypatch.setattr(TrainingArguments, "__dataclass_fields__", fields)
    with pytest.raises(launch.LaunchError) as error:
        launch.check_llava_next_accelerate()
    message = str(error.value)
    assert message.startswith("LLaVA-NeXT's trainer passes `dispatch_batches` to ") and "\n" not in message
    assert "TrainingArguments.dispatch_batches and .split_batches, which this transformers" in message
    assert message.endswith("pip install transformers==4.37.2 (4.47.1 works too)")


def test_cuda_synchronize_is_a_no_op_without_cuda(monkeypatch):
    """LLaVA's train.py calls torch.cuda.synchronize() before its final DeepSpeed save; without CUDA that raises."""
    original, has_cuda = torch.cuda.synchronize, torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "synchronize", original)  # restored after the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    launch.patch_cuda_synchronize()
    assert torch.cuda.synchronize is original  # with CUDA nothing changes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if not has_cuda:  # what the launcher fixes
        with pytest.raises((RuntimeError, AssertionError)):
            original()
    launch.patch_cuda_synchronize()
    assert torch.cuda.synchronize is not original
    assert torch.cuda.synchronize() is None and torch.cuda.synchronize("cuda:0") is None


# --------------------------------------------------------------------------------------------------------------------
# End to end: LLaVA-1.5's two stages from the shell scripts
# --------------------------------------------------------------------------------------------------------------------

ANSWERS = ["a red square on a blue background", "the image shows a green circle", "a small yellow shape",
           "two dark stripes"]
QUESTIONS = ["What is in the image?", "Describe the picture briefly."]
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions. USER: ASSISTANT:")


def write_tokenizer(directory: Path) -> int:
    """A Llama SentencePiece tokenizer trained on the dataset's sentences (LLaVA loads it with use_fast=False)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter((ANSWERS + QUESTIONS + [SYSTEM]) * 10), model_writer=model, vocab_size=120,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    return 120


# The Llama language model of the tiny LLaVA-1.5 models the tests build (with `write_tokenizer`'s 120 tokens).
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_llava15(directory: Path, tower: Path, seed: int = 0, **vision_options):
    """A tiny LLaVA-1.5 model whose vision modules LLaVA's own `initialize_vision_modules` builds with our tower
    (options: `mm_vision_select_layer`, `mm_vision_select_feature`, `mm_patch_merge_type`), its tokenizer written to
    `directory`; image start/end tokens off, as LLaVA-1.5 trains."""
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    from llava_evaclip import register_with_llava, unregister_from_llava

    vocab = write_tokenizer(directory)
    torch.manual_seed(seed)
    register_with_llava()
    try:
        model = LlavaLlamaForCausalLM(LlavaConfig(vocab_size=vocab, **TINY_LLAMA))
        model.get_model().initialize_vision_modules(types.SimpleNamespace(**{
            "vision_tower": str(tower), "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
            "pretrain_mm_mlp_adapter": None, "mm_patch_merge_type": "flat", "mm_projector_type": "mlp2x_gelu",
            **vision_options}))
    finally:
        unregister_from_llava()
    model.config.mm_use_im_start_end = model.config.mm_use_im_patch_token = False
    return model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny Llama LM + tokenizer, a tiny EVA-CLIP checkpoint and a few images with conversations."""
    from PIL import Image
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llava_e2e")
    torch.manual_seed(0)
    config = tiny_config("eva02", hidden_size=TOWER_WIDTH, intermediate_size=96)
    EvaCLIPModel(config).save_pretrained(root / "tower")
    build_image_processor(config).save_pretrained(root / "tower")

    (root / "lm").mkdir()
    vocab_size = write_tokenizer(root / "lm")
    LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=LM_WIDTH, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )).save_pretrained(root / "lm")

    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for index, answer in enumerate(ANSWERS):
        size = (36, 40 + 8 * index)  # not square and not the tower's size: the processor resizes and crops
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(root / "images" / f"{index}.png")
        question = QUESTIONS[index % 2]
        prompt = f"<image>\n{question}" if index % 2 else f"{question}\n<image>"
        records.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]})
    (root / "data.json").write_text(json.dumps(records))
    return root


def run_script(script: str, workspace: Path, output_dir: Path, *extra: str, **env_overrides: str) -> None:
    env = dict(os.environ, LAUNCHER=sys.executable, ENTRY="llava.train.train", DEEPSPEED_CONFIG="",
               MODEL_PATH=str(workspace / "lm"), VISION_TOWER=str(workspace / "tower"),
               DATA_PATH=str(workspace / "data.json"), IMAGE_FOLDER=str(workspace / "images"),
               OUTPUT_DIR=str(output_dir), OMP_NUM_THREADS="1", WANDB_MODE="disabled", **env_overrides)
    # CPU settings, two steps; later flags override the script's.
    cpu_args = ["--bf16", "False", "--tf32", "False", "--max_steps", "2", "--per_device_train_batch_size", "2",
                "--dataloader_num_workers", "0", "--report_to", "none", "--gradient_checkpointing", "False",
                "--model_max_length", "512"]
    result = subprocess.run(["bash", str(INTEGRATION / script), *cpu_args, *extra], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def logged_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    return [float(entry["loss"]) for entry in state["log_history"] if "loss" in entry]


@needs_cpu_fp16  # the scripts train in fp16 without --bf16
def test_pretrain_then_finetune_from_the_shell_scripts(workspace):
    pretrain_dir = workspace / "pretrain"
    run_script("pretrain.sh", workspace, pretrain_dir)

    # Stage 1 trains and saves only the projector, fed by the EVA-CLIP tower's features.
    losses = logged_losses(pretrain_dir)
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    projector = torch.load(pretrain_dir / "mm_projector.bin", map_location="cpu", weights_only=True)
    assert projector["model.mm_projector.0.weight"].shape == (LM_WIDTH, TOWER_WIDTH)
    config = json.loads((pretrain_dir / "config.json").read_text())
    assert config["mm_vision_tower"] == str(workspace / "tower")
    assert config["mm_hidden_size"] == TOWER_WIDTH and config["mm_vision_select_layer"] == -2

    # Stage 2 starts from that projector and, here, trains the tower too. LLaVA casts the tower to fp16 unless bf16
    # is on (Adam on fp16 weights overflows without DeepSpeed's fp32 master copy), so this stage runs in CPU bf16.
    finetune_dir = workspace / "finetune"
    run_script("finetune.sh", workspace, finetune_dir, "--unfreeze_mm_vision_tower", "True", "--learning_rate", "1e-3",
               "--bf16", "True", "--use_cpu", "True", PRETRAIN_MM_MLP_ADAPTER=str(pretrain_dir / "mm_projector.bin"))
    losses = logged_losses(finetune_dir)
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    config = json.loads((finetune_dir / "config.json").read_text())
    assert config["unfreeze_mm_vision_tower"] is True and config["mm_vision_tower"] == str(workspace / "tower")
    saved = load_file(finetune_dir / "model.safetensors")
    original = load_file(workspace / "tower" / "model.safetensors")
    prefix = "model.vision_tower.vision_tower."
    tower_keys = [key for key in saved if key.startswith(prefix)]
    assert tower_keys and all(key[len(prefix):] in original for key in tower_keys)
    changed = [key for key in tower_keys if not torch.equal(saved[key].float(), original[key[len(prefix):]].float())]
    assert changed, "the unfrozen tower was not trained"


def test_paths_and_tower_options_are_checked_before_anything_loads(tmp_path, capsys, monkeypatch):
    """What LLaVA would trip over only after loading the language model (a missing data file or image folder, an
    output "folder" that is a file), an output folder that would overwrite the tower's checkpoint, and the launcher's
    own argument checks: one line, exit status 2, and LLaVA's train() never runs."""
    train_module = launch.prepare_llava("llava.train.train")
    tower = tmp_path / "eva-tower"
    tower.mkdir()
    (tower / "config.json").write_text("{}")
    data = tmp_path / "data.json"
    data.write_text("[]")
    images = tmp_path / "images"
    images.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "config.json").write_text("{}")
    lora_run = tmp_path / "lora-run"
    (lora_run / "checkpoint-4").mkdir(parents=True)
    base = ["llava.train.train", "--model_name_or_path", str(tmp_path / "lm"), "--vision_tower", str(tower),
            "--data_path", str(data), "--image_folder", str(images)]
    cases = [
        (["--data_path", str(tmp_path / "nope.json"), "--output_dir", str(tmp_path / "out")],
         "--data_path", "no such file"),
        (["--image_folder=" + str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out")], "--image_folder",
         "not a folder"),
        (["--output_dir", str(a_file)], "--output_dir", "is a file"),
        (["--output_dir", str(tower)], "vision tower's checkpoint folder", "write its config and weights over it"),
        (["--output_dir", str(tower / "run")], "or inside it", "give this run its own output folder"),
        # The next stage started from the previous stage's output, with OUTPUT_DIR left the same.
        (["--model_name_or_path", str(stage1), "--output_dir", str(stage1)], "the model this run starts from",
         "--model_name_or_path"),
        (["--model_name_or_path", str(stage1), f"--output_dir={stage1}/../stage1/"], "the model this run starts from"),
        (["--vision_tower", "openai/clip-vit-large-patch14", "--mm_vision_select_layer", "-2,-3",
          "--output_dir", str(tmp_path / "out")], "several layers need an EVA-CLIP tower"),
        # LLaVA would resume a LoRA run whose checkpoint (no DeepSpeed) holds only the adapters.
        (["--lora_enable", "True", "--output_dir", str(lora_run)], "checkpoint-4", "projector"),
        (["--output_dir", str(lora_run), "--lora_enable"], "checkpoint-4", "holds only the adapters"),
        # LLaVA 1.5's --tune_mm_mlp_adapter freezes the tower again and saves only mm_projector.bin.
        (["--tune_mm_mlp_adapter", "True", "--unfreeze_mm_vision_tower=True", "--output_dir", str(tmp_path / "out")],
         "--tune_mm_mlp_adapter True trains and saves only the projector", "drop --tune_mm_mlp_adapter"),
    ]
    for extra, *fragments in cases:
        checked_first = "--mm_vision_select_layer" not in extra  # that one is LLaVA's parser's (our dataclass hook)
        if checked_first:
            monkeypatch.setattr(train_module, "train", lambda: pytest.fail("LLaVA's train() ran"))
        assert launch.main(base + extra) == 2, extra
        monkeypatch.undo()
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("run_llava.py: error: "), lines
        for fragment in fragments:
            assert fragment in lines[0], (fragment, lines[0])
    assert a_file.read_text() == "keep me" and sorted(p.name for p in tower.iterdir()) == ["config.json"]
    assert sorted(p.name for p in stage1.iterdir()) == ["config.json"]
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in lora_run.iterdir()) == ["checkpoint-4"]
    for alone in (["--tune_mm_mlp_adapter", "True"], ["--unfreeze_mm_vision_tower", "True", "--tune_mm_mlp_adapter",
                                                        "False"]):
        launch.check_tower_training(alone)
    for resumable in (["--lora_enable", "True", "--deepspeed", "zero3.json"], ["--lora_enable", "False"], []):
        launch.check_resume(["--output_dir", str(lora_run), *resumable])  # DeepSpeed's checkpoint holds every weight
