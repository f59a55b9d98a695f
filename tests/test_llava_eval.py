"""LLaVA's own evaluation and serving entry points with an EVA-CLIP tower, on the installed transformers line, run as a
user runs them (`python -m llava_evaclip.launch llava.eval.model_vqa ...`, in a worker process: tests/_llava/
eval_entries.py): model_vqa, model_vqa_loader (DataLoader), model_vqa_science, run_llava (a batch of two images),
serve.cli, the model worker's load path, and `load_pretrained_model`'s branches (a full checkpoint, projector-only
`mm_projector.bin` over a base model, LoRA + `non_lora_trainables.bin` over a base model), with "pad" and LLaVA 1.6's
anyres, `cls_patch` and a positive select layer.

Each run's tower inputs are checked against LLaVA's own `process_images` with a CLIPImageProcessor built here from
EVA-CLIP's published preprocessing (not the tower's), and what the language model receives against our tower model
run directly on those pixels, at the configured layer, through the projector the checkpoint holds. LLaVA-NeXT's
loader (`overwrite_config`), multi-image, video and its model_vqa run in tests/_llava/eval_next.py (transformers 4.x).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers

pytest.importorskip("llava", reason="LLaVA's code (pip install --no-deps llava-torch) is needed for these tests")
pytest.importorskip("sentencepiece")

from llava.mm_utils import process_images  # noqa: E402
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM  # noqa: E402
from transformers import CLIPImageProcessor, LlamaConfig, LlamaForCausalLM  # noqa: E402

from _dist.runner import worker_env  # noqa: E402
from conftest import needs_cpu_fp16, tiny_config  # noqa: E402
from llava_evaclip import EvaCLIPModel, EvaCLIPVisionModel, register_with_llava, unregister_from_llava  # noqa: E402
from llava_evaclip.processing import build_image_processor  # noqa: E402
from test_llava_launcher import TINY_LLAMA, write_tokenizer  # noqa: E402

HERE = Path(__file__).resolve().parent
ENTRIES = HERE / "_llava" / "eval_entries.py"
NEXT_WORKER = HERE / "_llava" / "eval_next.py"
NEXT_PATH = Path(os.environ.get("LLAVA_NEXT_PATH") or HERE.parents[1] / "shared" / "reference" / "llava_next")
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
SIZE, LAYERS = 28, 4
# EVA-CLIP's preprocessing as BAAI publishes it (OpenAI's mean / std, bicubic shortest-edge resize, centre crop).
EVA_MEAN, EVA_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
LM = TINY_LLAMA
PINPOINTS = [[SIZE, 2 * SIZE], [2 * SIZE, SIZE], [2 * SIZE, 2 * SIZE]]
IMAGE_SHAPES = [(30, 44), (60, 20), (28, 28)]  # (height, width): wide, tall, square
# LLaVA's eval scripts cast pixels to fp16 (2^-11 of values up to 2.2); LLaVA-NeXT also runs the tower in fp16, which
# its worker compares with our tower in fp32 (fp16 rounding of features up to ~7, over 4 layers).
PIXEL_TOL, FEATURE_TOL = 2e-3, 1e-2


def reference_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, resample=3,
                              image_mean=EVA_MEAN, image_std=EVA_STD)


def _llava(root: Path, name: str, select_layer=-2, feature="patch", aspect="pad", merge="flat", pinpoints=None,
           base: Path | None = None) -> LlavaLlamaForCausalLM:
    """A tiny LLaVA 1.5 model built by LLaVA's own initialize_vision_modules, saved with a tokenizer."""
    directory = root / name
    directory.mkdir()
    vocab = write_tokenizer(directory)
    torch.manual_seed(1)
    if base is None:
        model = LlavaLlamaForCausalLM(LlavaConfig(vocab_size=vocab, **LM))
    else:
        model = LlavaLlamaForCausalLM.from_pretrained(base, config=LlavaConfig(vocab_size=vocab, **LM))
    register_with_llava()
    try:
        model.get_model().initialize_vision_modules(types.SimpleNamespace(
            vision_tower=str(root / "tower"), mm_vision_select_layer=select_layer, mm_vision_select_feature=feature,
            pretrain_mm_mlp_adapter=None, mm_patch_merge_type=merge, mm_projector_type="mlp2x_gelu"))
    finally:
        unregister_from_llava()
    model.config.image_aspect_ratio = aspect
    if pinpoints:
        model.config.image_grid_pinpoints = pinpoints
    model.config.mm_use_im_start_end = model.config.mm_use_im_patch_token = False
    with torch.no_grad():  # a projector far from identity, so a wrong one shows
        for parameter in model.get_model().mm_projector.parameters():
            parameter.normal_(0, 0.3)
    model.save_pretrained(directory)
    return model


def _projector_state(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items() if "mm_projector" in key}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> types.SimpleNamespace:
    """A tower, LLaVA checkpoints in each layout LLaVA's loader takes, three images and question files."""
    from PIL import Image

    root = tmp_path_factory.mktemp("llava_eval")
    torch.manual_seed(0)
    config = tiny_config("eva02", num_hidden_layers=LAYERS)
    EvaCLIPModel(config).save_pretrained(root / "tower")
    build_image_processor(config).save_pretrained(root / "tower")
    projectors = {
        "llava-v1.5-evaclip-tiny": _projector_state(_llava(root, "llava-v1.5-evaclip-tiny")),
        "llava-v1.5-evaclip-cls": _projector_state(_llava(root, "llava-v1.5-evaclip-cls", 1, "cls_patch")),
        "llava-v1.6-evaclip-anyres": _projector_state(_llava(root, "llava-v1.6-evaclip-anyres", aspect="anyres",
                                                             merge="spatial_unpad", pinpoints=PINPOINTS)),
    }
    # A base language model, and a projector-only stage over it (config + mm_projector.bin, no weights).
    base = root / "vicuna-tiny"
    base.mkdir()
    write_tokenizer(base)
    torch.manual_seed(5)
    LlamaForCausalLM(LlamaConfig(vocab_size=120, **LM)).save_pretrained(base)
    pretrain = root / "llava-v1.5-evaclip-tiny-pretrain"
    projectors[pretrain.name] = _projector_state(_llava(root, pretrain.name))
    for weights in [*pretrain.glob("*.safetensors"), *pretrain.glob("*.index.json")]:
        weights.unlink()
    torch.save(projectors[pretrain.name], pretrain / "mm_projector.bin")
    # LoRA over the base: adapters, config and non_lora_trainables.bin as LLaVA's training writes them.
    from peft import LoraConfig, get_peft_model

    lora = root / "llava-v1.5-evaclip-tiny-lora"
    model = _llava(root, lora.name, base=base)
    for weights in [*lora.glob("*.safetensors"), *lora.glob("*.index.json")]:
        weights.unlink()
    projectors[lora.name] = _projector_state(model)
    adapters = LoraConfig(r=4, lora_alpha=8, target_modules=["model.layers.0.self_attn.q_proj"])
    peft_model = get_peft_model(model, adapters)
    peft_model.save_pretrained(lora)
    torch.save({f"base_model.model.{key}": value for key, value in projectors[lora.name].items()},
               lora / "non_lora_trainables.bin")

    images = root / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(3)
    for index, shape in enumerate(IMAGE_SHAPES):
        pixels = torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(images / f"im{index}.png")
    with open(root / "questions.jsonl", "w") as handle:
        for index in range(len(IMAGE_SHAPES)):
            handle.write(json.dumps({"question_id": index, "image": f"im{index}.png", "text": "what is it"}) + "\n")
    science = [{"id": index, "image": f"im{index}.png",
                "conversations": [{"from": "human", "value": "<image>\nA or B"}]} for index in range(2)]
    science.append({"id": 9, "conversations": [{"from": "human", "value": "no image here"}]})  # text only
    (root / "science.json").write_text(json.dumps(science))
    return types.SimpleNamespace(root=root, projectors=projectors, images=images)


def _vqa(models, model: str, module: str = "llava.eval.model_vqa", *extra: str) -> list[str]:
    root = models.root
    return [module, "--model-path", str(root / model), "--image-folder", str(models.images), "--question-file",
            str(root / "questions.jsonl"), "--answers-file", str(root / "answers" / f"{model}-{module}.jsonl"),
            "--temperature", "0", *extra]


@pytest.fixture(scope="module")
def runs(models) -> dict:
    """Every entry point once, in one worker process."""
    root, image = models.root, str(models.images / "im0.png")
    plan = [
        {"name": "model_vqa", "argv": _vqa(models, "llava-v1.5-evaclip-tiny")},
        {"name": "model_vqa_loader", "argv": _vqa(models, "llava-v1.5-evaclip-tiny", "llava.eval.model_vqa_loader",
                                                  "--max_new_tokens", "3")},
        {"name": "model_vqa_science", "argv": [
            "llava.eval.model_vqa_science", "--model-path", str(root / "llava-v1.5-evaclip-tiny"), "--image-folder",
            str(models.images), "--question-file", str(root / "science.json"), "--answers-file",
            str(root / "answers" / "science.jsonl"), "--temperature", "0", "--single-pred-prompt"]},
        {"name": "run_llava", "argv": [
            "llava.eval.run_llava", "--model-path", str(root / "llava-v1.5-evaclip-tiny"), "--image-file",
            f"{image},{models.images / 'im1.png'}", "--query", "what is it", "--temperature", "0",
            "--max_new_tokens", "3"]},
        {"name": "cli", "stdin": "what is it\n", "argv": [
            "llava.serve.cli", "--model-path", str(root / "llava-v1.5-evaclip-tiny"), "--image-file", image,
            "--device", "cpu", "--temperature", "0", "--max-new-tokens", "3"]},
        {"name": "worker", "worker": str(root / "llava-v1.5-evaclip-tiny") + "/", "image": image},
        {"name": "cls_layer1", "argv": _vqa(models, "llava-v1.5-evaclip-cls")},
        {"name": "anyres", "argv": _vqa(models, "llava-v1.6-evaclip-anyres")},
        {"name": "projector_only", "argv": _vqa(models, "llava-v1.5-evaclip-tiny-pretrain") + [
            "--model-base", str(root / "vicuna-tiny")]},
        {"name": "lora", "argv": _vqa(models, "llava-v1.5-evaclip-tiny-lora") + [
            "--model-base", str(root / "vicuna-tiny")]},
    ]
    (root / "plan.json").write_text(json.dumps(plan))
    out = root / "runs.pt"
    result = subprocess.run([sys.executable, str(ENTRIES), str(root / "plan.json"), str(out)], cwd=root,
                            env=worker_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and out.is_file(), result.stderr[-6000:]
    return torch.load(out, weights_only=True)


def _reference(models, model: str, images: list[str], layer: int, selection: str, config: dict):
    """LLaVA's process_images with the hand-built EVA-CLIP processor (pixels per image), and a function giving our
    tower model run directly at `layer` on given pixels, with the checkpoint's projector on top."""
    from PIL import Image

    tower = EvaCLIPVisionModel.from_pretrained(models.root / "tower").float().eval()
    width, lm_width = tower.config.hidden_size, LM["hidden_size"]  # LLaVA's mlp2x_gelu
    projector = torch.nn.Sequential(torch.nn.Linear(width, lm_width), torch.nn.GELU(),
                                    torch.nn.Linear(lm_width, lm_width))
    projector.load_state_dict({key.rsplit("mm_projector.", 1)[1]: value.float()
                               for key, value in models.projectors[model].items()})
    copies: dict[tuple[torch.nn.Module, torch.dtype], torch.nn.Module] = {}

    def in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
        if (module, dtype) not in copies:
            copies[module, dtype] = copy.deepcopy(module).to(dtype)
        return copies[module, dtype]

    @torch.no_grad()
    def run(pixels: torch.Tensor, tower_dtype: torch.dtype, features_dtype: torch.dtype,
            projector_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """In the dtypes LLaVA ran the tower (fp32 on CPU, as CLIP's), returned its features and ran the projector.
        On one thread, as the worker runs (OMP_NUM_THREADS=1): CPU kernels split their sums by thread count, which
        moves half-precision results by an ulp."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            states = in_dtype(tower, tower_dtype)(pixels.to(tower_dtype), output_hidden_states=True).hidden_states[layer]
            features = (states[:, 1:] if selection == "patch" else states).to(features_dtype)
            return features, in_dtype(projector, projector_dtype)(features.to(projector_dtype))
        finally:
            torch.set_num_threads(threads)

    expected_pixels = []
    for name in images:
        pixels = process_images([Image.open(models.images / name).convert("RGB")], reference_processor(),
                                types.SimpleNamespace(**config))
        pixels = pixels[0] if isinstance(pixels, list) else pixels
        expected_pixels.append(pixels.flatten(0, -4))
    return expected_pixels, run


PAD = {"image_aspect_ratio": "pad"}
THREE = ["im0.png", "im1.png", "im2.png"]
CASES = {  # run -> (model, images in call order, hidden-state index, token selection, the model's image config)
    "model_vqa": ("llava-v1.5-evaclip-tiny", THREE, -2, "patch", PAD),
    "model_vqa_loader": ("llava-v1.5-evaclip-tiny", THREE, -2, "patch", PAD),
    "model_vqa_science": ("llava-v1.5-evaclip-tiny", ["im0.png", "im1.png"], -2, "patch", PAD),
    "run_llava": ("llava-v1.5-evaclip-tiny", ["im0.png", "im1.png"], -2, "patch", PAD),
    "cli": ("llava-v1.5-evaclip-tiny", ["im0.png"], -2, "patch", PAD),
    "worker": ("llava-v1.5-evaclip-tiny", ["im0.png"], -2, "patch", PAD),
    "cls_layer1": ("llava-v1.5-evaclip-cls", THREE, 1, "cls_patch", PAD),
    "anyres": ("llava-v1.6-evaclip-anyres", THREE, -2, "patch",
               {"image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS}),
    "projector_only": ("llava-v1.5-evaclip-tiny-pretrain", THREE, -2, "patch", PAD),
    "lora": ("llava-v1.5-evaclip-tiny-lora", THREE, -2, "patch", PAD),
}


@needs_cpu_fp16  # LLaVA's entry points run fp16
@pytest.mark.parametrize("run", list(CASES))
def test_entry_point_feeds_the_language_model_our_towers_features(models, runs, run):
    model, images, layer, selection, config = CASES[run]
    result = runs[run]
    assert result["rc"] in (0, None), result.get("error")
    calls = result["calls"]
    assert calls and all(call["tower"] == "EvaCLIPVisionTower" for call in calls)
    assert {call["tower_device"] for call in calls} == {"cpu"}
    assert {tuple(call["select_layers"]) for call in calls} == {(layer % (LAYERS + 1),)}
    assert {call["token_selection"] for call in calls} == {selection}
    # One call per image, or one per batch (run_llava); split them back into images.
    got = [(*(tensor[i:i + 1] for tensor in (call["images"], call["features"], call["projected"])),
            call["tower_dtype"]) for call in calls for i in range(call["images"].shape[0])]
    if config["image_aspect_ratio"] == "anyres":  # one call per image with all its tiles
        got = [(call["images"], call["features"], call["projected"], call["tower_dtype"]) for call in calls]
    expected_pixels, reference = _reference(models, model, images, layer, selection, config)
    assert len(got) == len(expected_pixels)
    for (pixels, features, projected, tower_dtype), ref_pixels in zip(got, expected_pixels):
        assert pixels.shape == ref_pixels.shape
        torch.testing.assert_close(pixels.float(), ref_pixels, atol=PIXEL_TOL, rtol=0)
        # The same pixels, as LLaVA cast them, through our tower model and the checkpoint's projector directly.
        tower_dtype = getattr(torch, tower_dtype.removeprefix("torch."))
        ref_features, ref_projected = reference(pixels, tower_dtype, features.dtype, projected.dtype)
        torch.testing.assert_close(features, ref_features, atol=0, rtol=0)
        torch.testing.assert_close(projected, ref_projected, atol=0, rtol=0)


def test_a_missing_relative_tower_path_says_where_it_was_looked_for(models, tmp_path, monkeypatch):
    """README's training commands pass `--vision_tower ./checkpoints/...`, which LLaVA records as given in the model's
    config.json: evaluating from another directory must say the path is relative to the current directory and where
    it comes from."""
    from llava_evaclip import EvaCLIPVisionTower

    monkeypatch.chdir(tmp_path)
    args = types.SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    with pytest.raises(ValueError) as error:
        EvaCLIPVisionTower("./checkpoints/EVA02-CLIP-L-14-336", args=args, delay_load=True)
    message = str(error.value)
    assert str(tmp_path) in message and "mm_vision_tower" in message and "absolute path" in message
    assert "architecture preset" not in message  # its last part names a preset, but it is a path


@pytest.mark.skipif(TRANSFORMERS_5, reason="LLaVA-NeXT runs on transformers 4.x only")
@pytest.mark.skipif(not (NEXT_PATH / "llava" / "__init__.py").is_file(), reason=f"LLaVA-NeXT not found at {NEXT_PATH}")
@needs_cpu_fp16
def test_llava_next_overwrite_config_multi_image_video_and_model_vqa(tmp_path):
    """LLaVA-NeXT's load_pretrained_model(..., overwrite_config=...) (select layer, pool mode and pixel pinpoints for a
    28-pixel tower), multi-image anyres and video generate, and its llava.eval.model_vqa through the launcher: the
    worker compares with our tower run directly and a hand-built CLIPImageProcessor, and reports the differences."""
    env = worker_env(pythonpath=[NEXT_PATH])
    env["LLAVA_NEXT_PATH"] = str(NEXT_PATH)
    result = subprocess.run([sys.executable, str(NEXT_WORKER), str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tower"] == "EvaCLIPVisionTower" and report["select_layers"] == [LAYERS + 1 - 3]
    for case in ("multi_image", "video", "model_vqa"):
        assert report[case]["pixels"] <= PIXEL_TOL, (case, report[case])
        assert report[case]["features"] <= FEATURE_TOL, (case, report[case])
    assert report["multi_image"]["processor_matches_reference"] and report["video"]["processor_matches_reference"]
    assert report["video"]["pooled_tokens"] == report["video"]["frames"] * (SIZE // 7 // 2) ** 2
