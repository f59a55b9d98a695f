"""Hostile captions on the text side, against BAAI's tokenizer and text tower (and open_clip's tokenizer, the same
algorithm): literal special tokens, the ids every tokenizer this package hands out gives them, and the text features
of a model converted from a BAAI checkpoint on padded, truncated and masked batches.

BAAI's `tokenize` takes a literal `<end_of_text>` / `<start_of_text>` in a caption for its special token and
`<|endoftext|>` for plain characters; transformers' CLIP tokenizers do the opposite, so before `baai_special_tokens`
either literal pooled the text tower somewhere else than BAAI's (one caption's feature for another's).
"""

from __future__ import annotations

import copy
import json
import os
import random
import sys

import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("ftfy")
consisid_model = pytest.importorskip("consisid_eva_clip.model", reason="BAAI's reference code (consisid-eva-clip)")

import test_convert as tc  # noqa: E402
from conftest import features  # noqa: E402
from transformers import AutoProcessor, AutoTokenizer  # noqa: E402

from llava_evaclip import EvaCLIPModel  # noqa: E402
from llava_evaclip.cli import main  # noqa: E402
from llava_evaclip.convert import convert_checkpoint  # noqa: E402
from llava_evaclip.tokenization import (  # noqa: E402
    CONTEXT_LENGTH,
    EOS_TOKEN_ID,
    basic_clean,
    build_tokenizer,
    clean_text,
    write_tokenizer_files,
)

REL_TOL = 1e-5


def _baai_tokenize():
    """BAAI's `tokenize` as released with EVA-CLIP-18B (its BPE loop is the original; consisid's copy catches the
    wrong exception), else open_clip's, the same algorithm and special tokens."""
    root = os.environ.get("EVACLIP_18B_REFERENCE")
    if root and os.path.isdir(os.path.join(root, "eva_clip")):
        sys.path.insert(0, root)
        try:
            from eva_clip.tokenizer import tokenize
        finally:
            sys.path.remove(root)
        return tokenize
    return open_clip.tokenize


def _tokenizer(use_fast: bool):
    try:
        return build_tokenizer(use_fast=use_fast)
    except (ValueError, ImportError) as error:  # pragma: no cover - a line without a slow tokenizer class
        pytest.skip(f"no {'fast' if use_fast else 'slow'} CLIP tokenizer on this transformers: {error}")


SPECIAL_CAPTIONS = [
    "a photo <|endoftext|> of a cat",
    "a photo <|startoftext|> of a cat",
    "A PHOTO <|ENDOFTEXT|> OF A CAT",
    "a photo <end_of_text> of a cat",
    "a photo <END_OF_TEXT> of a <start_of_text> cat",
    "!<end_of_text> stays plain after punctuation",
    "it'<end_of_text>s",
    "<end_of_text>'s",
    "<|endoftext|><end_of_text>",
    "x&lt;end_of_text&gt;y &lt;|endoftext|&gt;",
    "<start_of_text>",
    "<|endoftext|>",
]


def _fuzz_captions(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    parts = ["<|endoftext|>", "<|startoftext|>", "<end_of_text>", "<start_of_text>", "<END_OF_TEXT>", "<|ENDOFTEXT|>",
             "<|", "|>", "<", ">", "|", "!", "'", "'s", " ", "\t", "a", "cat", "end", "of", "text", "_", "1", "é",
             "&amp;", "&lt;"]
    return ["".join(rng.choice(parts) for _ in range(rng.randint(0, 12))) for _ in range(count)]


def _assert_baai_ids(ids: torch.Tensor, expected: torch.Tensor, texts: list[str]) -> None:
    """Every token BAAI writes (its padding is 0, ours the end token), and the pooled position (the first end token;
    BAAI's argmax)."""
    for row, text in enumerate(texts):
        reference = expected[row].tolist()
        length = reference.index(0) if 0 in reference else len(reference)
        assert ids[row, :length].tolist() == reference[:length], repr(text)
        assert int((ids[row] == EOS_TOKEN_ID).int().argmax()) == int(expected[row].argmax()), repr(text)


@pytest.mark.parametrize("clean", [clean_text, basic_clean])
@pytest.mark.parametrize("use_fast", [True, False])
def test_cleaned_literal_special_tokens_are_baais_ids(use_fast, clean):
    texts = SPECIAL_CAPTIONS + _fuzz_captions(150, seed=11)
    expected = _baai_tokenize()(texts, context_length=CONTEXT_LENGTH)
    assert torch.equal(expected, open_clip.tokenize(texts, context_length=CONTEXT_LENGTH))
    ids = _tokenizer(use_fast)([clean(text) for text in texts], padding="max_length", truncation=True,
                               max_length=CONTEXT_LENGTH, return_tensors="pt").input_ids
    _assert_baai_ids(ids, expected, texts)


def test_written_fast_tokenizer_matches_special_tokens_in_the_raw_text(tmp_path, converted):
    """The fast tokenizer of the written files (and of a converted dir) takes only the exact literal for a special
    token, on every line: transformers 4.37 matched it after lower-casing, so "<|ENDOFTEXT|>" cut the caption there
    (BAAI, transformers 5: plain text), and a dir converted on 4.37 did so on 5.x too."""
    write_tokenizer_files(tmp_path)
    texts = ["A PHOTO <|ENDOFTEXT|> OF A CAT", "a <|EndOfText|> b <|StartOfText|> c"]
    expected = _baai_tokenize()(texts, context_length=CONTEXT_LENGTH)
    _, out = converted
    for tokenizer in (AutoTokenizer.from_pretrained(tmp_path, use_fast=True), build_tokenizer(use_fast=True),
                      AutoTokenizer.from_pretrained(out, use_fast=True), AutoProcessor.from_pretrained(out).tokenizer):
        ids = tokenizer(texts, padding="max_length", max_length=CONTEXT_LENGTH, return_tensors="pt").input_ids
        _assert_baai_ids(ids, expected, texts)


# --------------------------------------------------------------------------------------------------------------------
# Text features of a converted BAAI checkpoint
# --------------------------------------------------------------------------------------------------------------------

FAMILY = "EVA02-CLIP-B-16"
FEATURE_TEXTS = [
    "a photo of a cat",
    "A much LONGER caption: a dog running on the beach at sunset!",
    "x",
    " ".join(f"w{i}" for i in range(100)),  # truncated: BAAI keeps its end token last
    "fish &amp; chips \u201cquoted\u201d",
    "",
    "a photo <|endoftext|> of a red square",
    "a photo <|endoftext|> of a blue square",
    "a photo <end_of_text> of a green square",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A BAAI-written checkpoint with CLIP's 77-token context, converted with its tokenizer and processor."""
    directory = tmp_path_factory.mktemp("text_hostile")
    config = tc.baai_config(FAMILY)
    config["text_cfg"]["context_length"] = CONTEXT_LENGTH
    model_class = consisid_model.CLIP if tc.FAMILIES[FAMILY]["layout"] == "CLIP" else consisid_model.CustomCLIP
    torch.manual_seed(0)
    reference = tc.randomize_(model_class(**copy.deepcopy(config)), seed=21)
    checkpoint = directory / "baai.pt"
    torch.save(reference.state_dict(), checkpoint)
    arch = directory / "arch.json"
    arch.write_text(json.dumps(config))
    out = directory / "out"
    convert_checkpoint(checkpoint, out, arch=str(arch))
    return reference, out


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def test_text_features_of_cleaned_captions_equal_baais(converted):
    """Right padding (to the longest or to the context), with or without the mask, a truncated caption, and captions
    holding literal special tokens: the features are BAAI's `encode_text` on its own tokenization."""
    reference, out = converted
    with torch.no_grad():
        expected = reference.encode_text(_baai_tokenize()(FEATURE_TEXTS, context_length=CONTEXT_LENGTH))
    assert _relative_error(expected[6], expected[7]) > 1e-2  # BAAI reads past the literal <|endoftext|>
    model = EvaCLIPModel.from_pretrained(out).eval()
    cleaned = [clean_text(text) for text in FEATURE_TEXTS]
    for tokenizer in (AutoTokenizer.from_pretrained(out), AutoProcessor.from_pretrained(out).tokenizer):
        for padding in (True, "max_length"):
            batch = tokenizer(cleaned, padding=padding, truncation=True, max_length=CONTEXT_LENGTH,
                              return_tensors="pt")
            for inputs in (dict(batch), {"input_ids": batch["input_ids"]}):
                with torch.no_grad():
                    actual = features(model.get_text_features(**inputs))
                assert _relative_error(actual, expected) <= REL_TOL, (type(tokenizer).__name__, padding, list(inputs))


def test_similarity_command_reads_literal_special_tokens_as_baai(converted, tmp_path, capsys):
    """`llava-evaclip similarity` on captions with literal special tokens: BAAI's probabilities (the two captions
    that differ after "<|endoftext|>" had the same probability, the caption cut there)."""
    reference, out = converted
    texts = FEATURE_TEXTS[6:]
    image_size = tc.FAMILIES[FAMILY]["vision"]["image_size"]
    path = str(tmp_path / "red.png")
    Image.new("RGB", (image_size + 9, image_size + 4), (220, 30, 30)).save(path)  # one colour: any resize keeps it
    assert main(["similarity", "--model", str(out), "--images", path, "--texts", *texts]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "red.png" in line)
    import re

    table = torch.tensor([float(value) for value in re.findall(r"\b[01]\.\d{4}\b", row)[: len(texts)]])
    transform = pytest.importorskip("consisid_eva_clip.transform")
    pixels = transform.image_transform(image_size, is_train=False)(Image.open(path).convert("RGB"))[None]
    with torch.no_grad():
        image, text, scale = reference(pixels, _baai_tokenize()(texts, context_length=CONTEXT_LENGTH))
    expected = (scale * image @ text.t()).softmax(dim=-1)[0]
    assert (expected[0] - expected[1]).abs() > 1e-3
    torch.testing.assert_close(table, expected.float(), atol=6e-5, rtol=0)


def test_left_padding_without_a_mask_is_refused(converted):
    """A left-padded batch passed without its attention_mask started with the end token (the pad) and pooled there,
    position 0: one feature for every such caption, unlike BAAI's. Refused as left padding is with the mask; a row of
    padding alone (all end tokens) and right padding stay accepted and equal BAAI's."""
    reference, out = converted
    model = EvaCLIPModel.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = ["a photo of a cat", "a dog on the beach at sunset", "x"]
    tokenizer.padding_side = "left"
    left = tokenizer(texts, padding=True, return_tensors="pt")
    assert int(left.input_ids[0, 0]) == EOS_TOKEN_ID
    with torch.no_grad(), pytest.raises(ValueError, match=r"starts with the end token.*left padding.*padding_side"):
        model.get_text_features(input_ids=left.input_ids)
    with torch.no_grad(), pytest.raises(ValueError, match=r"left padding"):
        model(input_ids=left.input_ids, pixel_values=torch.zeros(1, 3, 21, 21))
    tokenizer.padding_side = "right"
    right = tokenizer(texts, padding=True, return_tensors="pt").input_ids
    padding_only = torch.full((1, right.shape[1]), EOS_TOKEN_ID)
    with torch.no_grad():
        actual = features(model.get_text_features(input_ids=torch.cat([right, padding_only])))[: len(texts)]
        expected = reference.encode_text(_baai_tokenize()(texts, context_length=CONTEXT_LENGTH))
    assert _relative_error(actual, expected) <= REL_TOL
