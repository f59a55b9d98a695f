"""Artifacts written by earlier versions of this package, read by this one.

A converted dir keeps its config.json and tokenizer files across upgrades: a field the package added later must
default to what the earlier code did (else old dirs load as another architecture), and tokenizer files written
before the special-token fix must still give BAAI's ids through `clean_text`. Each old artifact is written here in
its old format explicitly (fields dropped, old files), and compared against BAAI's reference code on the same
weights, never against this package's own output. Feature outputs written before `image_resize` was recorded
cannot be checked against either resize, so resuming them says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

consisid_model = pytest.importorskip("consisid_eva_clip.model", reason="BAAI's reference code (consisid-eva-clip)")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("ftfy")

import test_convert as tc  # noqa: E402
from conftest import features  # noqa: E402
from test_text_hostile import _baai_tokenize as baai_tokenize  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from llava_evaclip import EvaCLIPModel, EvaCLIPVisionModelWithProjection  # noqa: E402
from llava_evaclip.convert import convert_checkpoint  # noqa: E402
from llava_evaclip.tokenization import EOS_TOKEN_ID, clean_text, write_bpe_files  # noqa: E402

# Fields config.json gained after the first landed version (4532ba7): absent from configs it wrote.
FIELDS_ADDED_SINCE_FIRST_RELEASE = {"vision_config": ("use_rms_norm", "projection_bias"),
                                    "text_config": ("use_rms_norm",)}
# tokenizer_config.json as the first landed version wrote it: no added_tokens_decoder (special tokens normalized on
# 4.37's fast tokenizer, so a literal "<|ENDOFTEXT|>" in a raw caption was its end token).
OLD_TOKENIZER_CONFIG = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                        "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": True,
                        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
CAPTIONS = ["A PHOTO <|ENDOFTEXT|> OF A CAT", "a <|EndOfText|> b <|StartOfText|> c", "a photo <|endoftext|> of a cat",
            "a photo <END_OF_TEXT> of a cat", "fish &amp; chips \u201cquoted\u201d", "ΟΔΟΣ", ""]


def _drop_added_fields(config_path: Path) -> None:
    """Rewrite a converted dir's config.json as the first landed version wrote it (without the later fields)."""
    config = json.loads(config_path.read_text())
    for tower, fields in FIELDS_ADDED_SINCE_FIRST_RELEASE.items():
        section = config.get(tower, config)
        for name in fields:
            section.pop(name, None)
    config_path.write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize("family", ["EVA01-CLIP-B-16", "EVA02-CLIP-L-14", "EVA02-CLIP-bigE-14"])
def test_config_json_without_later_fields_loads_as_baai(tmp_path, family):
    """EVA01, EVA02 (RoPE / SwiGLU / sub-LN) and post-norm dirs whose config.json predates use_rms_norm and
    projection_bias: LayerNorm and a biased visual projection, as BAAI's (and the old code's) model."""
    reference = tc.build_baai(family)
    checkpoint, arch = tc.write_baai(tmp_path, family, reference)
    out, vision_out = tmp_path / "full", tmp_path / "vision"
    convert_checkpoint(checkpoint, out, arch=str(arch))
    convert_checkpoint(checkpoint, vision_out, arch=str(arch), vision_only=True)
    _drop_added_fields(out / "config.json")
    _drop_added_fields(vision_out / "config.json")
    images, ids = tc.sample_inputs(tc.FAMILIES[family]["vision"]["image_size"])
    with torch.no_grad():
        image_features, text_features = reference.encode_image(images), reference.encode_text(ids)
        model = EvaCLIPModel.from_pretrained(out).eval()
        assert model.visual_projection.bias is not None
        tc.assert_close(features(model.get_image_features(pixel_values=images)), image_features, "image features")
        tc.assert_close(features(model.get_text_features(input_ids=ids)), text_features, "text features")
        vision = EvaCLIPVisionModelWithProjection.from_pretrained(vision_out).eval()
        tc.assert_close(vision(pixel_values=images).image_embeds, image_features, "vision-only image features")


def test_tokenizer_files_of_first_release_give_baais_ids_through_clean_text(tmp_path):
    """vocab.json / merges.txt / tokenizer_config.json / special_tokens_map.json as the first landed version wrote
    them (no tokenizer.json, no added_tokens_decoder): AutoTokenizer and AutoProcessor's tokenizer on cleaned
    captions give BAAI's ids and pool at BAAI's position, on both transformers lines."""
    write_bpe_files(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(OLD_TOKENIZER_CONFIG))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {key: OLD_TOKENIZER_CONFIG[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")}))
    expected = baai_tokenize()(CAPTIONS, context_length=77)
    for tokenizer in (AutoTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path, use_fast=True)):
        ids = tokenizer([clean_text(text) for text in CAPTIONS], padding="max_length", truncation=True,
                        max_length=77, return_tensors="pt").input_ids
        for row, text in enumerate(CAPTIONS):
            reference = expected[row].tolist()
            length = reference.index(0) if 0 in reference else len(reference)
            assert ids[row, :length].tolist() == reference[:length], (type(tokenizer).__name__, text)
            assert int((ids[row] == EOS_TOKEN_ID).int().argmax()) == int(expected[row].argmax()), text


def _drop_image_resize(out: Path) -> None:
    """Rewrite a features output folder as versions before `image_resize` was recorded wrote it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in out.rglob("*"):
        if path.suffix == ".json":
            record = json.loads(path.read_text())
            record["settings"].pop("image_resize")
            path.write_text(json.dumps(record))
        elif path.suffix == ".safetensors" and path.parent.name != "shards":
            with safe_open(str(path), "pt") as handle:
                metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
            metadata.pop("image_resize")
            save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("kind", ["files", "shards"])
def test_resuming_outputs_that_predate_the_recorded_resize_says_so(tmp_path, caplog, kind):
    """Outputs made before `image_resize` was recorded cannot be told apart: resumed on the other transformers line
    (4.37 resizes with PIL, 5.x with torchvision) they were kept beside the other resize's, and the store then
    claimed one resize for all, with nothing said. The resume names how many and how to recompute them."""
    from test_features import save_tower, write_image

    from llava_evaclip.cli import main

    model = save_tower(tmp_path / "model", seed=1)
    images = tmp_path / "images"
    for index in range(2):
        write_image(images / f"{index}.png", seed=index)
    out = tmp_path / "out"
    command = ["features", str(images), "--model", model, "--out", str(out), "--format", kind]
    assert main(command) == 0
    assert main(command) == 0
    assert "predate the recorded image resize" not in caplog.text  # a store that records it
    _drop_image_resize(out)
    write_image(images / "2.png", seed=2)
    caplog.clear()
    assert main(command) == 0
    assert "2 existing output(s) predate the recorded image resize" in caplog.text, caplog.text
    assert "(4.37: pil, 5.x: torchvision), recompute them" in caplog.text
