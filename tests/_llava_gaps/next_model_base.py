"""Run with LLaVA-NeXT's `llava` first on PYTHONPATH (tests/test_llava_gaps.py starts it) and transformers 4.x.

LLaVA-NeXT's `load_pretrained_model(model_path, model_base, name)` for the two checkpoints that need a base language
model: a projector-only one (stage 1: config.json + mm_projector.bin) and a LoRA one (adapter + non_lora_trainables.bin
holding the projector). The tower is frozen in both, so its weights must be those of its own directory. The reference
is independent of the tower class: the tensors in the tower's safetensors file, and the hidden state -2 of
EvaCLIPVisionModel loaded from that directory. Prints one JSON line per case."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "llava_next"), str(HERE.parent)]

from next_common import IMAGE_SIZE, LM_WIDTH, TOWER_WIDTH, write_eva_tower, write_llama  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from llava_evaclip import EvaCLIPVisionModel, register_with_llava  # noqa: E402

# Bound before register_with_llava(), as a script's top-of-file imports are: the hook must reach this name too.
from llava.model.builder import load_pretrained_model  # noqa: E402


def llava_config(llama: Path, tower: Path) -> dict:
    config = json.loads((llama / "config.json").read_text())
    config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=str(tower),
                  mm_projector_type="mlp2x_gelu", mm_hidden_size=TOWER_WIDTH, mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", image_aspect_ratio="pad", mm_patch_merge_type="flat",
                  mm_use_im_start_end=False, mm_use_im_patch_token=False, use_mm_proj=True,
                  mm_tunable_parts="mm_mlp_adapter")
    return config


def projector() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"model.mm_projector.0.weight": torch.randn(LM_WIDTH, TOWER_WIDTH, generator=generator),
            "model.mm_projector.0.bias": torch.zeros(LM_WIDTH),
            "model.mm_projector.2.weight": torch.randn(LM_WIDTH, LM_WIDTH, generator=generator),
            "model.mm_projector.2.bias": torch.zeros(LM_WIDTH)}


def checkpoint(root: Path, name: str, llama: Path, tower: Path) -> Path:
    out = root / name
    out.mkdir()
    (out / "config.json").write_text(json.dumps(llava_config(llama, tower)))
    for file in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(llama / file, out / file)
    return out


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="llava_gaps_"))
    try:
        tower_dir, llama = write_eva_tower(root), write_llama(root)
        stage1 = checkpoint(root, "llava-llama-eva-pretrain", llama, tower_dir)
        torch.save(projector(), stage1 / "mm_projector.bin")
        lora = checkpoint(root, "llava-llama-eva-lora", llama, tower_dir)
        torch.save({f"base_model.model.{key}": value for key, value in projector().items()},
                   lora / "non_lora_trainables.bin")
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        get_peft_model(LlamaForCausalLM.from_pretrained(llama), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM",
        )).save_pretrained(lora)

        expected_weights = load_file(tower_dir / "model.safetensors")
        reference = EvaCLIPVisionModel.from_pretrained(tower_dir).eval()
        images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            expected_features = reference(images, output_hidden_states=True).hidden_states[-2][:, 1:]

        register_with_llava()
        for path in (stage1, lora):
            _, model, processor, _ = load_pretrained_model(str(path), str(llama), path.name, device_map="auto",
                                                           torch_dtype="bfloat16", attn_implementation="sdpa")
            tower = model.get_vision_tower()
            weights = tower.vision_tower.state_dict()
            differing = sorted(key for key, value in weights.items() if key in expected_weights
                               and not torch.equal(value.float(), expected_weights[key].float()))
            with torch.no_grad():
                features = tower(images).float()
            print(json.dumps({
                "case": path.name, "tower": type(tower).__name__,
                "compared": sum(key in expected_weights for key in weights),
                "differing": differing[:5], "num_differing": len(differing),
                "processor_is_towers": processor is tower.image_processor,
                "features_equal": bool(torch.equal(features, expected_features.to(features.dtype))),
                "max_abs_diff": float((features - expected_features).abs().max()),
            }), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
