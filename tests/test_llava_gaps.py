"""LLaVA flows the other LLaVA tests leave out, run through LLaVA's own code.

LLaVA 1.5's `load_pretrained_model(model_path, model_base, name)` for a projector-only checkpoint whose config says
`unfreeze_mm_vision_tower` (what `--tune_mm_mlp_adapter True --unfreeze_mm_vision_tower True` writes: LLaVA's
tune_mm_mlp_adapter then freezes the tower and saves only mm_projector.bin) built the tower on the meta device inside
the base model's `from_pretrained`, where nothing holds its weights: a random tower. The reference is the tower's own
safetensors file and the plain EvaCLIPVisionModel's hidden state -2.

LLaVA-NeXT's `load_pretrained_model(model_path, model_base, name)` for a projector-only (stage 1) or a LoRA checkpoint
builds the LLaVA model from the base language model, whose checkpoint has no tower weights, and LLaVA-NeXT builds the
tower inside that `from_pretrained` (its delay_load defaults to False): a frozen tower came out with random weights
(LLaVA-NeXT's own CLIPVisionTower does too). The inner script (tests/_llava_gaps/next_model_base.py) runs in its own
process with LLaVA-NeXT first on PYTHONPATH and checks the tower against its own directory: every tensor of the
tower's safetensors file, and the plain EvaCLIPVisionModel's hidden state -2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from test_llava_next import NEXT_PATH, TRANSFORMERS_5, run

INNER = Path(__file__).resolve().parent / "_llava_gaps" / "next_model_base.py"
RUN_TIMEOUT_S = 120


@pytest.mark.skipif(not (NEXT_PATH / "llava" / "__init__.py").is_file(),
                    reason=f"LLaVA-NeXT's llava package not found at {NEXT_PATH} (set LLAVA_NEXT_PATH)")
@pytest.mark.skipif(TRANSFORMERS_5, reason="LLaVA-NeXT needs transformers 4.x")
def test_llava_next_model_base_loads_keep_the_towers_own_weights():
    pytest.importorskip("peft", reason="the LoRA checkpoint needs peft")
    pytest.importorskip("consisid_eva_clip", reason="the tiny tower is written by BAAI's EVA-CLIP code")
    result = run([sys.executable, str(INNER)], RUN_TIMEOUT_S)
    output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0, output
    cases = {case["case"]: case for case in map(json.loads, (line for line in result.stdout.splitlines()
                                                                 if line.startswith("{")))}
    assert set(cases) == {"llava-llama-eva-pretrain", "llava-llama-eva-lora"}, output
    for name, case in cases.items():
        assert case["tower"] == "EvaCLIPVisionTower" and case["compared"] > 0, (name, case)
        assert case["num_differing"] == 0, f"{name}: the tower's weights are not its checkpoint's: {case}"
        assert case["features_equal"], f"{name}: features differ from EvaCLIPVisionModel's: {case}"
        assert case["processor_is_towers"], (name, case)


def test_llava15_projector_only_checkpoint_of_an_unfrozen_tower_loads_the_towers_own_weights(tmp_path):
    pytest.importorskip("llava", reason="LLaVA's code (pip install --no-deps llava-torch) is needed for this test")
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import tiny_config
    from llava_evaclip import EvaCLIPModel, EvaCLIPVisionModel, register_with_llava, unregister_from_llava
    from llava_evaclip.processing import build_image_processor
    from test_llava_launcher import TINY_LLAMA, tiny_llava15, write_tokenizer

    torch.manual_seed(0)
    config = tiny_config("eva02")
    tower_dir, base, checkpoint = tmp_path / "tower", tmp_path / "lm", tmp_path / "llava-v1.5-evaclip-pretrain"
    EvaCLIPModel(config).save_pretrained(tower_dir)
    build_image_processor(config).save_pretrained(tower_dir)
    base.mkdir()
    LlamaForCausalLM(LlamaConfig(vocab_size=write_tokenizer(base), **TINY_LLAMA)).save_pretrained(base)
    checkpoint.mkdir()
    model = tiny_llava15(checkpoint, tower_dir)
    # What LLaVA 1.5's train() saves for a stage-1 run given --unfreeze_mm_vision_tower True through the launcher.
    model.config.tune_mm_mlp_adapter = model.config.unfreeze_mm_vision_tower = True
    model.config.image_aspect_ratio = "pad"
    model.config.save_pretrained(checkpoint)
    torch.save({key: value for key, value in model.state_dict().items() if "mm_projector" in key},
               checkpoint / "mm_projector.bin")

    register_with_llava()
    try:
        from llava.model.builder import load_pretrained_model

        _, loaded, processor, _ = load_pretrained_model(str(checkpoint), str(base), checkpoint.name, device="cpu")
    finally:
        unregister_from_llava()
    tower = loaded.get_vision_tower()
    expected = load_file(tower_dir / "model.safetensors")
    weights = tower.vision_tower.state_dict()
    compared = [key for key in weights if key in expected]
    assert compared and processor is tower.image_processor
    differing = [key for key in compared if not torch.equal(weights[key].float(), expected[key].float())]
    assert not differing, f"{len(differing)} of {len(compared)} tower tensors are not the tower checkpoint's"
    images = torch.randn(2, 3, config.vision_config.image_size, config.vision_config.image_size)
    with torch.no_grad():
        reference = EvaCLIPVisionModel.from_pretrained(tower_dir).float().eval()
        expected_features = reference(images, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower(images.to(tower.dtype)).float(), expected_features.to(tower.dtype).float(),
                                   rtol=0, atol=0)
