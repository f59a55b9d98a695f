"""The packaged CLIP BPE tokenizer against open_clip's `SimpleTokenizer` (the tokenizer EVA-CLIP was trained with).

BAAI's own copy (consisid_eva_clip.tokenizer) has the same vocabulary file but its BPE loop catches IndexError where
Python raises ValueError, so it fails on ordinary words; open_clip's identical algorithm is the reference here.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
import open_clip  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from llava_evaclip.tokenization import (  # noqa: E402
    BPE_VOCAB_FILE,
    CONTEXT_LENGTH,
    TOKENIZER_FILES,
    VOCAB_SIZE,
    build_tokenizer,
    build_vocab,
    read_bpe_merges,
    write_tokenizer_files,
)

CAPTIONS = [
    "a photo of a cat",
    "A DIAGRAM of EVA-CLIP's rotary embeddings!!",
    "  two  spaces\tand a tab, 123 numbers",
    "naïve café — ünïcödé",
    "emoji 🐱 and <b>html</b> tags",
    "a very long caption " * 30,  # truncated to 77 tokens, the end token kept last
]


@pytest.fixture(scope="module")
def reference():
    return open_clip_tokenizer.SimpleTokenizer()


def test_packaged_vocabulary_is_open_clips(reference):
    with open(BPE_VOCAB_FILE, "rb") as ours, open(open_clip_tokenizer.default_bpe(), "rb") as theirs:
        assert hashlib.sha256(ours.read()).hexdigest() == hashlib.sha256(theirs.read()).hexdigest()
    merges = read_bpe_merges()
    assert {merge: rank for rank, merge in enumerate(merges)} == reference.bpe_ranks
    vocab = build_vocab(merges)
    assert len(vocab) == VOCAB_SIZE
    specials = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}  # open_clip's names
    assert {specials.get(token, token): index for token, index in vocab.items()} == reference.encoder


def _tokenizer(use_fast: bool):
    try:
        return build_tokenizer(use_fast=use_fast)
    except (ValueError, ImportError) as error:  # pragma: no cover - a line without a slow tokenizer class
        pytest.skip(f"no {'fast' if use_fast else 'slow'} CLIP tokenizer on this transformers: {error}")


@pytest.mark.parametrize("use_fast", [True, False])
def test_token_ids_match_open_clip(use_fast):
    tokenizer = _tokenizer(use_fast)
    expected = open_clip.tokenize(CAPTIONS, context_length=CONTEXT_LENGTH)
    ids = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=CONTEXT_LENGTH,
                    return_tensors="pt").input_ids
    assert ids.shape == expected.shape
    for row, caption in enumerate(CAPTIONS):
        end = int(expected[row].argmax())  # open_clip pads with 0 after the end token, we pad with the end token
        assert ids[row, : end + 1].tolist() == expected[row, : end + 1].tolist(), caption
        assert int(ids[row].argmax()) == end  # EOS pooling finds the same position
        assert (ids[row, end:] == tokenizer.eos_token_id).all()
    assert tokenizer.model_max_length == CONTEXT_LENGTH
    assert tokenizer.decode(ids[0], skip_special_tokens=True).strip() == "a photo of a cat"


def test_written_files_load_as_fast_and_slow(tmp_path):
    files = write_tokenizer_files(tmp_path, model_max_length=CONTEXT_LENGTH)
    assert sorted(os.path.basename(path) for path in files) == sorted(TOKENIZER_FILES)
    expected = open_clip.tokenize(CAPTIONS[:2], context_length=CONTEXT_LENGTH)
    for use_fast in (True, False):
        tokenizer = AutoTokenizer.from_pretrained(tmp_path, use_fast=use_fast)
        ids = tokenizer(CAPTIONS[:2], padding="max_length", max_length=CONTEXT_LENGTH, return_tensors="pt").input_ids
        mask = torch.arange(CONTEXT_LENGTH)[None] <= expected.argmax(-1, keepdim=True)
        assert torch.equal(ids[mask], expected[mask])
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)


# Captions open_clip's cleaning (ftfy, HTML unescaping, whitespace) changes before BPE.
UNCLEAN_CAPTIONS = [
    "\u201cDon\u2019t panic,\u201d she said",  # curly quotes
    "\ufb01ne \ufb02ower ligatures",
    "\uff28\uff45\uff4c\uff4c\uff4f fullwidth",
    "\x00nul and\x07bell",
    "fish &amp; chips &amp;amp; more",
    "  tabs\t\tand\nnewlines  ",
]


@pytest.mark.parametrize("use_fast", [True, False])
def test_clean_text_gives_open_clips_ids(use_fast):
    from llava_evaclip.tokenization import clean_text

    tokenizer = _tokenizer(use_fast)
    expected = open_clip.tokenize(UNCLEAN_CAPTIONS, context_length=CONTEXT_LENGTH)
    ids = tokenizer([clean_text(caption) for caption in UNCLEAN_CAPTIONS], padding="max_length",
                    max_length=CONTEXT_LENGTH, return_tensors="pt").input_ids
    for row, caption in enumerate(UNCLEAN_CAPTIONS):
        end = int(expected[row].argmax())
        assert ids[row, : end + 1].tolist() == expected[row, : end + 1].tolist(), caption
    # clean text is left as it is, but for open_clip's lower-casing
    assert [clean_text(caption) for caption in CAPTIONS[:2]] == [caption.lower() for caption in CAPTIONS[:2]]
