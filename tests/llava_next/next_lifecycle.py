"""LLaVA-NeXT's training lifecycle around an EVA-CLIP tower, beyond what next_train.py runs: LoRA from a LLaVA-NeXT
checkpoint (its LlavaMetaModel builds the tower eagerly, so the tower is there when LoRA is added) and
`--vision_feature_cache`, which LLaVA-NeXT's dataset and model cannot take. Runs only with LLaVA-NeXT's `llava` first on
PYTHONPATH (tests/test_llava_next_lifecycle.py starts it)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from next_common import NEXT_PATH  # noqa: F401  (asserts that `llava` is LLaVA-NeXT's)

from llava.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM  # noqa: E402

from llava_evaclip import EvaCLIPVisionConfig, EvaCLIPVisionModel, EvaCLIPVisionTower, launch  # noqa: E402
from llava_evaclip import register_with_llava, unregister_from_llava  # noqa: E402
from llava_evaclip.processing import build_image_processor  # noqa: E402

TUNABLE_ALL = "mm_vision_tower,mm_mlp_adapter,mm_language_model"


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    """A 2-layer EVA02-style tower (rope, SwiGLU, sub-LN) with q/k/v/out projections, as converted towers have."""
    torch.manual_seed(31)
    config = EvaCLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=28, patch_size=7, projection_dim=16, use_rope=True, rope_pt_grid_size=4,
                                 use_swiglu=True, use_sub_layernorm=True)
    path = tmp_path_factory.mktemp("next_lifecycle") / "eva-tower"
    EvaCLIPVisionModel(config).save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def train_module():
    """LLaVA-NeXT's llava.train.train as the launcher prepares it."""
    module = launch.prepare_llava("llava.train.train")
    yield module
    unregister_from_llava()


def vision_args(tower_dir, **fields) -> SimpleNamespace:
    args = dict(vision_tower=str(tower_dir), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                pretrain_mm_mlp_adapter=None, mm_patch_merge_type="spatial_unpad", mm_projector_type="mlp2x_gelu",
                add_faster_video=False, unfreeze_mm_vision_tower=False)
    args.update(fields)
    return SimpleNamespace(**args)


def tiny_qwen() -> LlavaQwenForCausalLM:
    torch.manual_seed(32)
    return LlavaQwenForCausalLM(LlavaQwenConfig(
        vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))


def test_lora_from_a_llava_next_checkpoint_keeps_adapters_off_the_tower(train_module, tower_dir, tmp_path):
    """LLaVA-NeXT builds the tower while it loads any LLaVA checkpoint (its `delay_load` defaults to False), so a LoRA
    run from such a checkpoint (fine-tuning a OneVision model) adds LoRA with the tower loaded. LLaVA-NeXT's own
    find_all_linear_names returns bare leaf names that peft also matches inside the tower (the reference: adapters land
    in it); the launcher's version adapts every Linear of the language model and none of the tower or projector."""
    from peft import LoraConfig, get_peft_model

    register_with_llava()
    model = tiny_qwen()
    model.get_model().initialize_vision_modules(vision_args(tower_dir))
    model.config.mm_tunable_parts = TUNABLE_ALL
    model.save_pretrained(tmp_path / "llava-qwen")
    model = LlavaQwenForCausalLM.from_pretrained(tmp_path / "llava-qwen")  # as train.py's get_model loads it
    tower = model.get_vision_tower()
    assert isinstance(tower, EvaCLIPVisionTower) and tower.is_loaded

    def adapted(targets):
        peft_model = get_peft_model(LlavaQwenForCausalLM.from_pretrained(tmp_path / "llava-qwen"), LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
        return {name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}

    original = train_module.find_all_linear_names.__wrapped__  # LLaVA-NeXT's own function
    assert original.__module__ == "llava.train.train"
    assert [name for name in adapted(original(model)) if "vision_tower" in name]  # the leak the launcher closes
    ours = adapted(train_module.find_all_linear_names(model))
    language_linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                        and not any(key in name for key in ("vision_tower", "mm_projector", "lm_head"))}
    assert {f"base_model.model.{name}" for name in language_linears} == ours


def test_feature_cache_is_refused_with_llava_next_before_anything_loads(tmp_path):
    """LLaVA-NeXT's dataset gives its collator (image, size, modality) tuples: with --vision_feature_cache the run
    loaded the language model and failed in its first step inside LLaVA-NeXT's model ("The vision tower reads cached
    features ... got (32,)"). The launcher refuses it in one line, exit status 2, before loading (the model path does
    not even exist)."""
    result = subprocess.run(
        [sys.executable, "-m", "llava_evaclip.launch", "llava.train.train", "--model_name_or_path",
         str(tmp_path / "no-such-qwen"), "--vision_tower", str(tmp_path / "no-such-tower"), "--output_dir",
         str(tmp_path / "out"), "--vision_feature_cache", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "run_llava.py: error: --vision_feature_cache works with LLaVA 1.5's training only"), result.stderr[-3000:]


@pytest.mark.parametrize("tunable, message", [
    (TUNABLE_ALL, "cannot be used with --mm_tunable_parts naming mm_vision_tower"),
    ("mm_mlp_adapter", "works with LLaVA 1.5's training only"),
])
def test_feature_cache_is_refused_where_the_tower_is_built(train_module, tower_dir, tmp_path, tunable, message):
    """Code that calls LLaVA-NeXT's initialize_vision_modules itself gets the same refusal (and, when the tower is to be
    trained, the reason that holds for LLaVA 1.5 too) instead of a tower that hands on cached features."""
    model = tiny_qwen()
    with pytest.raises(launch.FeatureCacheError, match=message):
        model.get_model().initialize_vision_modules(vision_args(tower_dir, mm_tunable_parts=tunable,
                                                                vision_feature_cache=str(tmp_path)))


@pytest.fixture
def train_dpo_module(train_module, tmp_path, monkeypatch):
    """LLaVA-NeXT's llava.train.train_dpo, importable: it imports `data_processing.utils`, which LLaVA-NeXT's repository
    does not have (a stub here), and trl (the launcher's stand-ins where it is missing)."""
    stub = tmp_path / "stub" / "data_processing"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "utils.py").write_text("def load_json(path):\n    raise NotImplementedError\n\n\n"
                                   "def load_jsonl(path):\n    raise NotImplementedError\n")
    monkeypatch.syspath_prepend(str(stub.parent))
    try:
        launch.prepare_llava("llava.train.train_dpo")
        return importlib.import_module("llava.train.train_dpo")
    except ImportError as error:
        pytest.skip(f"LLaVA-NeXT's train_dpo does not import here: {error}")


def test_dpo_lora_targets_keep_off_the_tower_and_the_launcher_runs_that_module(train_dpo_module, tower_dir, tmp_path,
                                                                             monkeypatch):
    """train_dpo.py has its own copy of find_all_linear_names and always starts from a LLaVA checkpoint, so the tower
    is loaded when LoRA is added: its copy (the reference) puts adapters in the tower; the launcher patches it and runs
    that patched module's train() (runpy would run a fresh, unpatched copy)."""
    from peft import LoraConfig, get_peft_model

    register_with_llava()
    model = tiny_qwen()
    model.get_model().initialize_vision_modules(vision_args(tower_dir))
    model.save_pretrained(tmp_path / "llava-qwen")

    def tower_adapters(targets):
        peft_model = get_peft_model(LlavaQwenForCausalLM.from_pretrained(tmp_path / "llava-qwen"), LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
        return [name for name, _ in peft_model.named_modules() if name.endswith(".lora_A") and "vision_tower" in name]

    loaded = LlavaQwenForCausalLM.from_pretrained(tmp_path / "llava-qwen")
    dpo_find = train_dpo_module.find_all_linear_names
    assert getattr(dpo_find, "_evaclip_wrapped", False)
    assert tower_adapters(dpo_find.__wrapped__(loaded))  # LLaVA-NeXT's DPO copy, unpatched: the leak
    assert tower_adapters(dpo_find(loaded)) == []

    calls = []
    monkeypatch.setattr(train_dpo_module, "train", lambda: calls.append(
        (list(sys.argv), sys.modules["llava.train.train_dpo"].find_all_linear_names)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert launch.main(["llava.train.train_dpo", "--output_dir", str(tmp_path / "dpo")]) == 0
    assert calls == [([train_dpo_module.__file__, "--output_dir", str(tmp_path / "dpo")], dpo_find)]
