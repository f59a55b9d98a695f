"""What goes into the model, against EVA-CLIP's own code: caption cleaning (open_clip's tokenizer) and the
`similarity` command's texts and images (open_clip's ids, BAAI's `image_transform` pixels)."""

from __future__ import annotations

import builtins
import math
import random
import re
import string

import numpy as np
import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("ftfy")

from conftest import features, tiny_text_config, tiny_vision_config  # noqa: E402
from llava_evaclip import EvaCLIPConfig, EvaCLIPModel  # noqa: E402
from llava_evaclip.cli import main  # noqa: E402
from llava_evaclip.processing import build_image_processor  # noqa: E402
from llava_evaclip.tokenization import CONTEXT_LENGTH, basic_clean, build_tokenizer, clean_text, write_tokenizer_files  # noqa: E402

IMAGE_SIZE = 56
# Capital sigma ending a word: Python's (open_clip's) lower-casing gives "ς", the fast tokenizer's "σ".
GREEK = ["ΟΔΟΣ ΚΟΚΚΙΝΟΣ", "Ο ΣΙΣΥΦΟΣ ΚΑΙ Ο ΑΧΙΛΛΕΥΣ.", "ΠΑΝΤΟΣ, ΚΟΣΜΟΣ!"]


def _ids(tokenizer, texts):
    return tokenizer(texts, padding="max_length", truncation=True, max_length=CONTEXT_LENGTH,
                     return_tensors="pt").input_ids


def _assert_open_clip_ids(ids, texts):
    expected = open_clip.tokenize(texts, context_length=CONTEXT_LENGTH)
    for row, text in enumerate(texts):
        end = int(expected[row].argmax())
        assert ids[row, : end + 1].tolist() == expected[row, : end + 1].tolist(), text


@pytest.mark.parametrize("use_fast", [True, False])
def test_clean_text_lower_cases_final_sigma_as_open_clip(use_fast):
    try:
        tokenizer = build_tokenizer(use_fast=use_fast)
    except (ValueError, ImportError) as error:  # pragma: no cover - a line without a slow tokenizer class
        pytest.skip(f"no such tokenizer here: {error}")
    _assert_open_clip_ids(_ids(tokenizer, [clean_text(text) for text in GREEK]), GREEK)


def test_basic_clean_is_open_clips_cleaning_on_printable_ascii():
    """The cleaning without ftfy (the `similarity` fallback) gives open_clip's ids for printable ASCII text."""
    rng = random.Random(0)
    alphabet = string.printable.replace("\x0b", "").replace("\x0c", "") + "&;#" * 5
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(200)]
    texts += ["fish &amp; chips &amp;amp; more", "  A  B\tC\n", "OK &lt;b&gt; &#39;x&#39;", "SOS"]
    tokenizer = build_tokenizer(use_fast=True)
    _assert_open_clip_ids(_ids(tokenizer, [basic_clean(text) for text in texts]), texts)


# --------------------------------------------------------------------------------------------------------------------
# similarity: EVA-CLIP's ids and BAAI's pixels
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory) -> str:
    """A full model dir with CLIP's 77-token context and a large temperature (peaked probabilities)."""
    path = str(tmp_path_factory.mktemp("r2_full_ckpt"))
    torch.manual_seed(2)
    text = tiny_text_config(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                            max_position_embeddings=CONTEXT_LENGTH)
    config = EvaCLIPConfig(text_config=text.to_dict(),
                           vision_config=tiny_vision_config("eva01", image_size=IMAGE_SIZE).to_dict(),
                           projection_dim=16, logit_scale_init_value=math.log(100.0))
    EvaCLIPModel(config).save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    write_tokenizer_files(path, model_max_length=CONTEXT_LENGTH)
    return path


def _table(stdout: str, name: str, columns: int) -> torch.Tensor:
    row = next(line for line in stdout.splitlines() if name in line)
    return torch.tensor([float(value) for value in re.findall(r"\b[01]\.\d{4}\b", row)[:columns]])


# The last is what Python makes of `--texts $'caf\xe9'` (a Latin-1 byte) in a UTF-8 locale: transformers 5's tokenizer
# raised a TypeError on the lone surrogate, 4.37's gave other ids; ftfy (open_clip) makes it U+FFFD.
UNCLEAN_TEXTS = ["\u201ca red square\u201d", "\ufb01sh &amp; chips", "\uff32\uff25\uff24", "ΟΔΟΣ ΚΟΚΚΙΝΟΣ", "caf\udce9"]


def test_similarity_tokenizes_texts_as_eva_clip(full_dir, tmp_path, capsys):
    """Curly quotes, ligatures, HTML entities, full-width letters and final sigmas: open_clip's ids, so open_clip's
    probabilities (they were 0.04 / 0.96 instead of 0.9997 / 0.0003 when the texts went to the tokenizer raw)."""
    image = str(tmp_path / "red.png")
    Image.new("RGB", (70, 60), (220, 30, 30)).save(image)
    assert main(["similarity", "--model", full_dir, "--images", image, "--texts", *UNCLEAN_TEXTS]) == 0
    table = _table(capsys.readouterr().out, "red.png", len(UNCLEAN_TEXTS))

    model = EvaCLIPModel.from_pretrained(full_dir).eval()
    pixels = build_image_processor(IMAGE_SIZE)(Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        text = features(model.get_text_features(input_ids=open_clip.tokenize(UNCLEAN_TEXTS, CONTEXT_LENGTH)))
        image_embeds = features(model.get_image_features(pixel_values=pixels))
    text = text / text.norm(dim=-1, keepdim=True)
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    expected = (model.logit_scale.exp() * image_embeds @ text.T).softmax(dim=-1)[0]
    assert expected.max() > 0.5
    torch.testing.assert_close(table, expected, atol=6e-5, rtol=0)


def test_similarity_without_ftfy_cleans_what_it_can_and_warns(monkeypatch, capsys):
    from llava_evaclip.commands.similarity import clean_texts

    real_import = builtins.__import__

    def no_ftfy(name, *args, **kwargs):
        if name == "ftfy":
            raise ImportError("No module named 'ftfy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ftfy)
    ascii_texts = ["A Red  Square", "fish &amp; chips"]
    assert clean_texts(ascii_texts) == ["a red square", "fish & chips"]
    assert capsys.readouterr().err == ""
    assert clean_texts(["\u201cquoted\u201d"]) == ["\u201cquoted\u201d"]
    assert "ftfy is not installed" in capsys.readouterr().err
    # Lone surrogates become U+FFFD as ftfy makes them (the fast tokenizer cannot take them).
    (cleaned,) = clean_texts(["caf\udce9"])
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert cleaned == "caf\ufffd"
    _assert_open_clip_ids(_ids(build_tokenizer(use_fast=True), [cleaned]), ["caf\udce9"])


def _similarity_pixel_values(path: str, full_dir: str, monkeypatch, capsys) -> list:
    """The pixel values `llava-evaclip similarity` hands the model for the image at `path`."""
    import llava_evaclip.commands._common as common

    recorded = []
    real = common.image_processor_for

    def spying_processor(source):
        processor = real(source)  # itself: the command chooses its arguments by the processor's kind
        preprocess = processor.preprocess  # what `processor(...)` runs, on both transformers lines

        def run(*args, **kwargs):
            output = preprocess(*args, **kwargs)
            recorded.append(output["pixel_values"])
            return output

        processor.preprocess = run
        return processor

    monkeypatch.setattr(common, "image_processor_for", spying_processor)
    assert main(["similarity", "--model", full_dir, "--images", path, "--texts", "a", "b"]) == 0
    capsys.readouterr()
    return recorded


@pytest.mark.parametrize("size", [(50, 3), (40, 1), (3, 3), (64, 48)])
def test_similarity_images_are_baais_pixels(size, full_dir, tmp_path, monkeypatch, capsys):
    """Images 1 or 3 pixels high: transformers 4's channel guess took their height for the channels (other pixels, or
    a ValueError); the command now gives the processor BAAI's `image_transform` pixels on both transformers lines."""
    transform = pytest.importorskip("consisid_eva_clip.transform")

    path = str(tmp_path / "thin.png")
    pixels = np.random.default_rng(sum(size)).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    recorded = _similarity_pixel_values(path, full_dir, monkeypatch, capsys)
    expected = transform.image_transform(IMAGE_SIZE, is_train=False)(Image.open(path))
    (got,) = recorded
    # transformers 4 resizes with PIL as BAAI does (equal bits); transformers 5's torchvision resize rounds up to two
    # grey levels apart (2 / 255 / std < 0.031).
    torch.testing.assert_close(got[0], expected, atol=0.031, rtol=0)
    assert got[0].shape == expected.shape


@pytest.mark.parametrize("mode", ["P", "L"])
def test_similarity_transparent_colour_is_baais_pixels(mode, full_dir, tmp_path, monkeypatch, capsys):
    """A palette or grey PNG / GIF with a transparent colour (tRNS): BAAI's `convert("RGB")` keeps the pixels' colour;
    transformers 5's processor painted them white (up to 170 grey levels apart) when handed the converted image."""
    transform = pytest.importorskip("consisid_eva_clip.transform")

    pixels = np.random.default_rng(3).integers(0, 256, size=(60, 70, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).quantize(32) if mode == "P" else Image.fromarray(pixels[..., 0])
    path = str(tmp_path / f"transparent_{mode}.png")
    image.save(path, transparency=int(np.asarray(image)[0, 0]))
    assert "transparency" in Image.open(path).convert("RGB").info
    recorded = _similarity_pixel_values(path, full_dir, monkeypatch, capsys)
    # BAAI's transform on the RGB image (given the palette image itself, PIL resizes it nearest-neighbour first).
    expected = transform.image_transform(IMAGE_SIZE, is_train=False)(Image.open(path).convert("RGB"))
    torch.testing.assert_close(recorded[0][0], expected, atol=0.031, rtol=0)


def test_similarity_table_prints_undecodable_names_on_a_strict_utf8_stdout():
    """A file name or text holding a byte that is not UTF-8 reaches Python as a lone surrogate; the table printed it
    and a strict UTF-8 stdout (en_US.UTF-8 and the like) raised UnicodeEncodeError after all the work."""
    from llava_evaclip.commands.similarity import render_table

    table = render_table(["/data/caf\udce9.png"], ["caf\udce9", "\ud800x"], torch.tensor([[0.25, 0.75]]))
    table.encode("utf-8")  # strict
    assert "/data/caf\ufffd.png" in table and "caf\ufffd" in table and "\ufffdx" in table
