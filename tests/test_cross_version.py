"""Checkpoints moving between the two transformers lines: written on one (convert, save_pretrained, LLaVA's training,
`llava-evaclip features`), used on the other. Users convert and save on transformers 5.x and train with LLaVA's scripts
pinned to 4.37.2, or train under 4.37.2 and serve or evaluate under 5.x.

The "other" line runs in a subprocess: in the 5.x run it is the transformers 4.37.2 overlay named by
EVACLIP_TF437_OVERLAY (put first on PYTHONPATH, as CI installs it), in the 4.37.2 run the same environment without the
overlay. Unset, or not a 4.37.2 overlay: the tests skip and say so. Every artefact is made on both lines from one BAAI
checkpoint and loaded on both lines; what a line loads from the other line's artefact must equal what the writing
line loads itself (and BAAI's own model, for the CLIP outputs). Run as a script, this file is the worker:
`python tests/test_cross_version.py make|load ROOT`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
OVERLAY_VARIABLE = "EVACLIP_TF437_OVERLAY"
TF5 = int(transformers.__version__.split(".")[0]) >= 5
FAMILY = "EVA02-CLIP-L-14"  # RoPE, SwiGLU, sub-LN: the EVA-02 tower LLaVA users pick, at toy size
CAPTIONS = ["a photo of a cat", "two dogs, playing in the snow!", "an image of a (red) car."]
CUSTOM_MEAN = [0.5, 0.5, 0.5]  # a processor setting a user changed and re-saved
CUSTOM_STD = [0.25, 0.25, 0.25]
PROCESSOR_FIELDS = ("image_mean", "image_std", "size", "crop_size", "resample", "do_center_crop")
LLAVA_IMAGE_TOKEN = 63


def _inputs() -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The same pixels, token ids and PIL image in every process."""
    import numpy as np
    from PIL import Image

    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    ids = torch.full((2, 16), 49407)
    ids[:, 0] = 49406
    ids[0, 1:9] = torch.randint(1, 49406, (8,), generator=generator)
    ids[1, 1:15] = torch.randint(1, 49406, (14,), generator=generator)
    image = Image.fromarray((np.arange(40 * 56 * 3) % 251).astype("uint8").reshape(40, 56, 3))
    return pixels, ids, image


def _dtype_kwargs(dtype: Any) -> dict[str, Any]:
    return {"dtype": dtype} if TF5 else {"torch_dtype": dtype}


def _llava_available() -> bool:
    try:
        import llava.model  # noqa: F401
        import sentencepiece  # noqa: F401
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Worker: make the artefacts on this line / load every artefact on this line
# ---------------------------------------------------------------------------------------------------------------------


def make(root: Path, checkpoint: Path, arch: Path, peer: Path | None = None) -> None:
    """Every artefact a user writes on one line: converted dirs, save_pretrained outputs, a processor re-saved with
    other settings, a LLaVA-1.5 model with a trained tower, transformers' LLaVA and a features store; with `peer` (the
    other line's artefacts), its bf16 tower loaded in fp32 here and saved again, as a fine-tuning run would."""
    from transformers import AutoProcessor

    from llava_evaclip import EvaCLIPModel, EvaCLIPVisionModel, EvaCLIPVisionModelWithProjection
    from llava_evaclip.cli import main as cli_main

    assert cli_main(["convert", str(checkpoint), str(root / "conv"), "--arch", str(arch)]) == 0
    assert cli_main(["convert", str(checkpoint), str(root / "vis_bf16"), "--arch", str(arch), "--vision-only",
                     "--dtype", "bfloat16"]) == 0
    model = EvaCLIPModel.from_pretrained(root / "conv")
    model.save_pretrained(root / "sharded", max_shard_size="300KB", safe_serialization=True)
    model.to(torch.bfloat16).save_pretrained(root / "bf16")
    # A tower dir whose processor the user changed and saved again (on 5.x: nested in processor_config.json, next to
    # the preprocessor_config.json the dir already had).
    EvaCLIPVisionModel.from_pretrained(root / "conv").save_pretrained(root / "resaved")
    processor = AutoProcessor.from_pretrained(root / "conv")
    processor.image_processor.save_pretrained(root / "resaved")
    processor.image_processor.image_mean, processor.image_processor.image_std = CUSTOM_MEAN, CUSTOM_STD
    processor.save_pretrained(root / "resaved")
    assert cli_main(["features", "--samples", "--model", str(root / "conv"), "--out", str(root / "features")]) == 0
    _make_hf_llava(root, _inputs()[0][:1])
    if _llava_available():
        _make_llava15(root)
    if peer is not None:
        model = EvaCLIPVisionModelWithProjection.from_pretrained(peer / "vis_bf16", **_dtype_kwargs(torch.float32))
        model.save_pretrained(root / "refit")


def _make_hf_llava(root: Path, pixels: torch.Tensor) -> None:
    """transformers' LLaVA built from the bf16 tower dir (README: `convert --vision-only --dtype bfloat16`), its
    in-memory logits (or the error) kept beside the saved model."""
    from transformers import LlamaConfig

    from llava_evaclip.hf import build_llava

    torch.manual_seed(0)
    language = LlamaConfig(vocab_size=LLAVA_IMAGE_TOKEN + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = build_llava(str(root / "vis_bf16"), language, image_token_index=LLAVA_IMAGE_TOKEN).eval()
    try:
        with torch.no_grad():
            built: dict[str, Any] = {"logits": _hf_llava_logits(model, pixels)}
    except RuntimeError as error:
        built = {"error": f"{type(error).__name__}: {error}"}
    torch.save(built, root / "hf_llava_built.pt")
    model.save_pretrained(root / "hf_llava")


def _hf_llava_logits(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    # transformers 5 takes one placeholder per image token, 4.37 one per image (it expands it itself).
    image_tokens = 16 if TF5 else 1
    ids = torch.tensor([[1, 5, 6] + [LLAVA_IMAGE_TOKEN] * image_tokens + [7, 8]])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits.float()


def _make_llava15(root: Path) -> None:
    """LLaVA-1.5 as LLaVA's training saves it after `--unfreeze_mm_vision_tower True`: the trained tower is in the
    LLaVA checkpoint, in bf16."""
    from test_llava_launcher import tiny_llava15

    directory = root / "llava15"
    directory.mkdir()
    model = tiny_llava15(directory, root / "conv", mm_vision_select_layer="-2,-3",
                         mm_vision_select_feature="cls_patch")
    model.config.unfreeze_mm_vision_tower = True
    model.config.image_aspect_ratio = "pad"
    with torch.no_grad():  # "trained": the tower's weights now differ from the converted dir's
        for parameter in model.get_vision_tower().parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.to(torch.bfloat16).save_pretrained(directory)


def _processor_fields(processor: Any) -> dict[str, Any]:
    """The settings that decide an image processor's output, JSON-normalised (tuples and lists alike)."""
    values = processor.to_dict()
    return json.loads(json.dumps({key: values.get(key) for key in PROCESSOR_FIELDS}))


def _digests(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file() and not path.name.startswith(".")}


def load(root: Path) -> dict[str, Any]:
    """What this line gets from each artefact in ROOT."""
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer, pipeline

    from llava_evaclip import EvaCLIPModel, EvaCLIPVisionModelWithProjection
    from llava_evaclip.cli import main as cli_main
    from llava_evaclip.tower import EvaCLIPVisionTower

    pixels, ids, image = _inputs()
    out: dict[str, Any] = {"transformers": transformers.__version__}
    with torch.no_grad():
        for name in ("conv", "sharded"):
            model = AutoModel.from_pretrained(root / name).eval()
            output = model(input_ids=ids, pixel_values=pixels)
            out[name] = {"class": type(model).__name__, "logits": output.logits_per_image,
                         "image_embeds": output.image_embeds, "text_embeds": output.text_embeds}
        model = EvaCLIPModel.from_pretrained(root / "bf16", **_dtype_kwargs("auto")).eval()
        output = model(input_ids=ids, pixel_values=pixels.to(model.dtype))
        out["bf16"] = {"dtype": str(model.dtype), "logits": output.logits_per_image.float()}
        model = EvaCLIPVisionModelWithProjection.from_pretrained(root / "vis_bf16", **_dtype_kwargs("auto")).eval()
        out["vis_bf16"] = {"dtype": str(model.dtype),
                           "image_embeds": model(pixel_values=pixels.to(model.dtype)).image_embeds.float()}
        for use_fast in (True, False):
            tokenizer = AutoTokenizer.from_pretrained(root / "conv", use_fast=use_fast)
            out[f"tokens_fast={use_fast}"] = tokenizer(CAPTIONS, padding="max_length", return_tensors="pt")["input_ids"]
        processor = AutoProcessor.from_pretrained(root / "conv")
        out["processor"] = {"class": type(processor).__name__,
                            "pixel_values": processor(images=image, return_tensors="pt")["pixel_values"]}
        classifier = pipeline("zero-shot-image-classification", model=str(root / "conv"))
        out["pipeline"] = {r["label"]: r["score"] for r in classifier(image, candidate_labels=["cat", "dog", "car"])}
        tower = EvaCLIPVisionTower(str(root / "vis_bf16"), types.SimpleNamespace(
            mm_vision_select_layer=-2, mm_vision_select_feature="patch"))
        out["tower"] = {"dtype": str(tower.dtype), "features": tower(pixels.to(tower.dtype)).float()}
        resaved = EvaCLIPVisionTower(str(root / "resaved"), types.SimpleNamespace(
            mm_vision_select_layer=-2, mm_vision_select_feature="patch"))
        out["resaved_tower_processor"] = _processor_fields(resaved.image_processor)
        if TF5:  # what transformers itself reads there (4.37 cannot read a 5.x processor_config.json)
            out["resaved_auto_processor"] = _processor_fields(AutoImageProcessor.from_pretrained(root / "resaved"))
        if (root / "refit").is_dir():
            from safetensors import safe_open

            with safe_open(str(root / "refit" / "model.safetensors"), "pt") as handle:
                stored = {str(handle.get_slice(key).get_dtype()) for key in handle.keys()}
            model = EvaCLIPVisionModelWithProjection.from_pretrained(root / "refit", **_dtype_kwargs("auto")).eval()
            out["refit"] = {"stored": sorted(stored), "dtype": str(model.dtype),
                            "image_embeds": model(pixel_values=pixels.to(model.dtype)).image_embeds.float()}
        out.update(_load_hf_llava(root, pixels[:1]))
        if (root / "llava15").is_dir() and _llava_available():
            out.update(_load_llava15(root, pixels[:1]))
    # A features store resumes on the line that wrote it; the other line refuses it (another resize). Nothing changes.
    before = _digests(root / "features")
    out["features_resume"] = cli_main(["features", "--samples", "--model", str(root / "conv"),
                                       "--out", str(root / "features")])
    out["features_unchanged"] = _digests(root / "features") == before
    return out


def _load_hf_llava(root: Path, pixels: torch.Tensor) -> dict[str, Any]:
    from transformers import LlavaForConditionalGeneration

    import llava_evaclip  # noqa: F401  (registers the tower's model type)

    model = LlavaForConditionalGeneration.from_pretrained(root / "hf_llava").eval()
    return {"hf_llava": {"built": torch.load(root / "hf_llava_built.pt", weights_only=True),
                         "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                         "logits": _hf_llava_logits(model, pixels)}}


def _load_llava15(root: Path, pixels: torch.Tensor) -> dict[str, Any]:
    from llava_evaclip import register_with_llava, unregister_from_llava

    register_with_llava()
    try:
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.model.builder import load_pretrained_model

        _, model, _, _ = load_pretrained_model(str(root / "llava15"), None, "llava-v1.5-evaclip-tiny", device="cpu")
    finally:
        unregister_from_llava()
    model = model.float().eval()
    tower = model.get_vision_tower()
    ids = torch.tensor([[1, 5, 6, IMAGE_TOKEN_INDEX, 7, 8]])
    return {"llava15": {"tower": type(tower).__name__, "features": tower(pixels),
                        "logits": model(input_ids=ids, images=pixels).logits}}


# ---------------------------------------------------------------------------------------------------------------------
# The other line
# ---------------------------------------------------------------------------------------------------------------------


def _overlay() -> Path:
    """The transformers 4.37.2 overlay CI installs (`pip install --target`), or a skip saying what is missing."""
    value = os.environ.get(OVERLAY_VARIABLE, "")
    if not value:
        pytest.skip(f"{OVERLAY_VARIABLE} is not set: point it at the transformers 4.37.2 overlay (pip install "
                    "--no-deps --target DIR transformers==4.37.2 tokenizers==0.15.2 ...) to run the cross-version "
                    "tests")
    overlay = Path(value).resolve()
    init = overlay / "transformers" / "__init__.py"
    found = re.search(r'^__version__ = "([^"]+)"', init.read_text(), re.M) if init.is_file() else None
    if found is None or found.group(1) != "4.37.2":
        pytest.skip(f"{OVERLAY_VARIABLE}={value} is not a transformers 4.37.2 overlay "
                    f"({'transformers ' + found.group(1) if found else 'no transformers package'} there)")
    return overlay


def other_line_env() -> dict[str, str]:
    """This environment with the overlay added (5.x run) or taken away (4.37.2 run)."""
    overlay = _overlay()
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
             if p and Path(p).resolve() != overlay and Path(p).resolve() != REPO_ROOT]
    if not TF5 and transformers.__file__ and not Path(transformers.__file__).resolve().is_relative_to(overlay):
        pytest.skip(f"this run's transformers 4.37.2 ({transformers.__file__}) is not the overlay {OVERLAY_VARIABLE} "
                    "names, so taking the overlay away would not give the other line")
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(([str(overlay)] if TF5 else []) + [str(REPO_ROOT), *paths])
    return env


def run_other_line(command: str, *args: Path) -> None:
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), command, *map(str, args)],
                            env=other_line_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])["transformers"]
    assert (int(line.split(".")[0]) >= 5) != TF5, f"the other line ran transformers {line}, as this one does"


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> dict[str, Any]:
    """One BAAI checkpoint; every artefact made on both lines; each loaded on both lines. Returns
    {writer: {reader: outputs}} with writer/reader "here" / "there", and BAAI's own outputs."""
    pytest.importorskip("consisid_eva_clip.model", reason="BAAI's reference code (consisid-eva-clip)")
    other_line_env()  # skip early, before any work, without an overlay
    from test_convert import build_baai, write_baai

    root = tmp_path_factory.mktemp("cross_version")
    reference = build_baai(FAMILY, seed=3).eval()
    checkpoint, arch = write_baai(root, FAMILY, reference)
    here, there = root / "here", root / "there"
    here.mkdir()
    there.mkdir()
    if TF5:  # the 4.37.2 side re-saves a tower the 5.x side wrote: 5.x makes its artefacts first
        make(here, checkpoint, arch)
        run_other_line("make", there, checkpoint, arch, here)
    else:
        run_other_line("make", there, checkpoint, arch)
        make(here, checkpoint, arch, peer=there)
    run_other_line("load", here, there)
    results = {"here": {"here": load(here)}, "there": {"here": load(there)}}
    for writer, directory in (("here", here), ("there", there)):
        results[writer]["there"] = torch.load(directory / "loaded.pt", weights_only=True)
    pixels, ids, _ = _inputs()
    with torch.no_grad():
        image_features, text_features, logit_scale = reference(pixels, ids)
    results["baai"] = {"image_embeds": image_features, "text_embeds": text_features,
                       "logits": logit_scale * image_features @ text_features.T}
    return results


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float = 2e-5) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(expected.abs().max().item(), 1.0)
    difference = (actual.float() - expected.float()).abs().max().item()
    assert difference <= tolerance * scale, f"{what}: max difference {difference:.3g}"


WRITERS = ("here", "there")


def _same_line(artefacts: dict, writer: str) -> tuple[dict, dict]:
    """(what the writing line loads, what the other line loads) for one writer's artefacts."""
    other = "there" if writer == "here" else "here"
    return artefacts[writer][writer], artefacts[writer][other]


@pytest.mark.parametrize("writer", WRITERS)
def test_converted_and_saved_models_give_the_writing_lines_outputs(artefacts, writer):
    own, other = _same_line(artefacts, writer)
    for name in ("conv", "sharded"):
        assert other[name]["class"] == own[name]["class"] == "EvaCLIPModel"
        for key in ("logits", "image_embeds", "text_embeds"):
            _assert_close(other[name][key], own[name][key], f"{name} {key}")
            _assert_close(other[name][key], artefacts["baai"][key], f"{name} {key} vs BAAI", tolerance=1e-4)
    for name in ("bf16", "vis_bf16"):  # a bf16 checkpoint loads in bf16 with dtype/torch_dtype="auto" on both lines
        assert other[name]["dtype"] == own[name]["dtype"] == "torch.bfloat16", name
    _assert_close(other["bf16"]["logits"], own["bf16"]["logits"], "bf16 logits", tolerance=0)
    _assert_close(other["vis_bf16"]["image_embeds"], own["vis_bf16"]["image_embeds"], "vision bf16", tolerance=0)
    _assert_close(other["tower"]["features"], own["tower"]["features"], "LLaVA tower features", tolerance=0)
    assert other["tower"]["dtype"] == own["tower"]["dtype"] == "torch.bfloat16"


@pytest.mark.parametrize("writer", WRITERS)
def test_tokenizer_processor_and_pipeline_load_on_the_other_line(artefacts, writer):
    own, other = _same_line(artefacts, writer)
    for use_fast in (True, False):
        key = f"tokens_fast={use_fast}"
        assert torch.equal(other[key], own[key]), key
    assert other["processor"]["class"] == own["processor"]["class"] == "CLIPProcessor"
    # Pixels: the lines resize differently (transformers 5 with torchvision; README "Images:"), up to 0.03.
    _assert_close(other["processor"]["pixel_values"], own["processor"]["pixel_values"], "pixels", tolerance=0.035)
    assert other["pipeline"].keys() == own["pipeline"].keys()
    for label, score in own["pipeline"].items():
        assert abs(other["pipeline"][label] - score) < 5e-3, (label, other["pipeline"], own["pipeline"])


def test_a_processor_resaved_on_transformers_5_is_what_the_tower_uses_on_both_lines(artefacts):
    """transformers 5 saves a processor's image processor inside processor_config.json, which 4.37 does not read: the
    LLaVA tower (and `features`, `similarity`, `build_llava_processor`) must use it there too, not the dir's older
    preprocessor_config.json, as transformers 5 itself does."""
    writer = "here" if TF5 else "there"  # the line that is 5.x
    expected = artefacts[writer][writer]["resaved_auto_processor"]
    assert expected["image_mean"] == CUSTOM_MEAN and expected["image_std"] == CUSTOM_STD
    for reader in ("here", "there"):
        assert artefacts[writer][reader]["resaved_tower_processor"] == expected, reader
    # 4.37.2 saves the flat layout, which both lines read alike.
    other = "there" if writer == "here" else "here"
    for reader in ("here", "there"):
        assert artefacts[other][reader]["resaved_tower_processor"]["image_mean"] == CUSTOM_MEAN, reader


def test_a_tower_from_5x_saved_again_on_4_37_loads_in_the_dtype_of_its_weights(artefacts):
    """A bf16 tower converted on 5.x, loaded in fp32 on 4.37.2 and saved there: its config.json must not make 5.x
    load the fp32 weights in bf16 (4.37 kept 5.x's `dtype` key, unread, beside its own `torch_dtype`)."""
    writer = "there" if TF5 else "here"  # the 4.37.2 side
    stored = artefacts[writer][writer]["refit"]["stored"]
    assert stored == ["F32"], stored
    for reader in ("here", "there"):
        assert artefacts[writer][reader]["refit"]["dtype"] == "torch.float32", reader
    _assert_close(artefacts[writer]["here"]["refit"]["image_embeds"],
                  artefacts[writer]["there"]["refit"]["image_embeds"], "re-saved tower", tolerance=1e-6)


@pytest.mark.parametrize("writer", WRITERS)
def test_transformers_llava_with_the_tower_loads_on_the_other_line(artefacts, writer):
    """build_llava from a bf16 tower dir: a working fp32 model on both lines (no bf16 tower beside an fp32 projector),
    reloaded on either line to the logits it had when built."""
    own, other = _same_line(artefacts, writer)
    built = own["hf_llava"]["built"]
    assert "error" not in built, built.get("error")
    for reader, loaded in (("writer", own), ("other line", other)):
        assert loaded["hf_llava"]["dtypes"] == ["torch.float32"], reader
        _assert_close(loaded["hf_llava"]["logits"], built["logits"], f"LlavaForConditionalGeneration logits, {reader}")


@pytest.mark.parametrize("writer", WRITERS)
def test_llava15_with_a_trained_tower_loads_on_the_other_line(artefacts, writer):
    pytest.importorskip("llava", reason="LLaVA's code (pip install --no-deps llava-torch) is needed for this test")
    own, other = _same_line(artefacts, writer)
    assert other["llava15"]["tower"] == own["llava15"]["tower"] == "EvaCLIPVisionTower"
    _assert_close(other["llava15"]["features"], own["llava15"]["features"], "trained tower features", tolerance=0)
    _assert_close(other["llava15"]["logits"], own["llava15"]["logits"], "LLaVA-1.5 logits")


@pytest.mark.parametrize("writer", WRITERS)
def test_a_features_store_resumes_on_its_own_line_and_is_refused_on_the_other(artefacts, writer):
    """transformers 5's CLIPImageProcessor resizes with torchvision, 4.37's with PIL (other pixels at sharp edges):
    a store resumed on the other line would mix the two. Each image is refused there (status 1), nothing rewritten."""
    own, other = _same_line(artefacts, writer)
    assert own["features_resume"] == 0 and other["features_resume"] == 1
    assert own["features_unchanged"] and other["features_unchanged"]


def test_processor_config_of_transformers_5_wins_on_this_line(tmp_path):
    """Same line, no overlay needed: a dir whose only processor file is transformers 5's processor_config.json."""
    if not TF5:
        pytest.skip("transformers 4.37.2 does not write processor_config.json (the cross-version test covers it)")
    from transformers import AutoImageProcessor, CLIPProcessor

    from conftest import tiny_config
    from llava_evaclip import EvaCLIPVisionModel
    from llava_evaclip.processing import build_image_processor
    from llava_evaclip.tokenization import build_tokenizer
    from llava_evaclip.tower import EvaCLIPVisionTower

    config = tiny_config("eva02").vision_config
    EvaCLIPVisionModel(config).save_pretrained(tmp_path)
    image_processor = build_image_processor(config)
    image_processor.image_mean, image_processor.image_std = CUSTOM_MEAN, CUSTOM_STD
    CLIPProcessor(image_processor=image_processor, tokenizer=build_tokenizer()).save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").is_file() and not (tmp_path / "preprocessor_config.json").exists()
    expected = _processor_fields(AutoImageProcessor.from_pretrained(tmp_path))
    assert expected["image_mean"] == CUSTOM_MEAN
    tower = EvaCLIPVisionTower(str(tmp_path), types.SimpleNamespace(mm_vision_select_layer=-2,
                                                                    mm_vision_select_feature="patch"))
    assert _processor_fields(tower.image_processor) == expected


@pytest.mark.parametrize("content", [b"{not json", b'{"image_processor": [1, 2]}',
                                     b'{"image_processor": {"image_mean": "\xff"}}'])  # not UTF-8
def test_a_broken_processor_config_is_refused_naming_the_file(tmp_path, content):
    """A processor_config.json the tower would read but cannot is one clear ValueError, not a stale processor."""
    from conftest import tiny_config
    from llava_evaclip.processing import load_image_processor

    (tmp_path / "processor_config.json").write_bytes(content)
    with pytest.raises(ValueError, match="processor_config.json"):
        load_image_processor(tmp_path, tiny_config("eva02").vision_config)


if __name__ == "__main__":  # the other line's worker
    sys.path.insert(0, str(TESTS_DIR))
    command, *paths = sys.argv[1:]
    if command == "make":
        make(*map(Path, paths))
    elif command == "load":
        for directory in map(Path, paths):
            torch.save(load(directory), directory / "loaded.pt")
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps({"transformers": transformers.__version__}))
