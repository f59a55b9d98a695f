"""The CLIP BPE tokenizer of every EVA-CLIP text tower, built offline from the vocabulary file shipped in this package.

EVA-CLIP's text towers use OpenAI CLIP's byte-level BPE (`bpe_simple_vocab_16e6.txt.gz`, MIT-licensed, as shipped by
open_clip and BAAI's EVA-CLIP). This module turns that merge list into the `vocab.json` + `merges.txt` pair that
transformers' `CLIPTokenizer` / `CLIPTokenizerFast` read, so a converted checkpoint carries its tokenizer without any
download. Ids match open_clip's `SimpleTokenizer` (`<|startoftext|>` = 49406, `<|endoftext|>` = 49407) up to and
including the end token for text that open_clip's cleaning leaves as it is. open_clip first runs `ftfy.fix_text`
(straight quotes, split ligatures, normal-width letters, no control characters), unescapes HTML entities, collapses
whitespace and lower-cases with Python's rules (a capital sigma ending a word becomes "ς"); transformers' fast CLIP
tokenizer does none of that but a plainer lower-casing, so for exact ids pass captions through `clean_text` first (it
needs `ftfy`). Literal special tokens in a caption differ too: `<|endoftext|>` (or `<|startoftext|>`) is the special
token to transformers' tokenizers (the tower then pools there) and plain characters to BAAI's and open_clip's, whose
own specials are `<end_of_text>` / `<start_of_text>`; `clean_text` and `basic_clean` rewrite both kinds so that
transformers' tokenizers give BAAI's ids (`baai_special_tokens`).

Padding uses `<|endoftext|>` as transformers' CLIP does (open_clip pads with id 0): the text tower is causal and pools
at the first end token, so right padding (the default) never changes its output; left padding is refused by the
tower. "!" (id 0) cannot be the pad token: a special token is split out of the raw text, which would change how "!"
in captions is tokenized.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Union

from transformers import AutoTokenizer, PreTrainedTokenizerBase

BPE_VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = EOS_TOKEN
CONTEXT_LENGTH = 77
# CLIP keeps the first 49152 - 256 - 2 merges of the file: 256 byte symbols x 2 (with / without "</w>") plus the
# merges plus the two special tokens make the 49408-entry vocabulary.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2
BOS_TOKEN_ID = VOCAB_SIZE - 2
EOS_TOKEN_ID = VOCAB_SIZE - 1
PAD_TOKEN_ID = EOS_TOKEN_ID

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@lru_cache()
def byte_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) map to code points from 256
    upwards in byte order, so that BPE never sees whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_code_point)
            next_code_point += 1
    # Vocabulary order is the printable bytes first, then the remapped ones (insertion order of the original table).
    return {byte: mapping[byte] for byte in [*printable, *(b for b in range(256) if b not in printable)]}


@lru_cache()
def read_bpe_merges(path: Union[str, os.PathLike] = BPE_VOCAB_FILE) -> tuple[tuple[str, str], ...]:
    """The merges CLIP uses: the file's lines after its header, first `NUM_MERGES` only."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = []
    for line in lines[1 : NUM_MERGES + 1]:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"Malformed BPE merge line {line!r} in {path}; expected two symbols.")
        merges.append((parts[0], parts[1]))
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{path} holds {len(merges)} merges; CLIP's vocabulary needs {NUM_MERGES}.")
    return tuple(merges)


def build_vocab(merges: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """Token -> id, in CLIP's order: byte symbols, byte symbols + "</w>", one token per merge, then BOS and EOS."""
    symbols = list(byte_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("The BPE merges produce duplicate tokens; the vocabulary file is not CLIP's.")
    return vocab


def write_bpe_files(directory: Path) -> None:
    """`vocab.json` and `merges.txt`, the files the slow `CLIPTokenizer` reads (transformers 5 saves only
    `tokenizer.json`, which 4.37's `use_fast=False` cannot read)."""
    merges = read_bpe_merges()
    with open(directory / "vocab.json", "w", encoding="utf-8") as handle:
        json.dump(build_vocab(merges), handle, ensure_ascii=False)
    with open(directory / "merges.txt", "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")
        handle.write("\n".join(f"{left} {right}" for left, right in merges))
        handle.write("\n")


def write_tokenizer_files(directory: Union[str, os.PathLike], model_max_length: int = CONTEXT_LENGTH) -> list[str]:
    """Write `vocab.json`, `merges.txt`, `tokenizer_config.json` and `special_tokens_map.json` into `directory`.

    The files are written directly (not via `save_pretrained`) so the same bytes load on transformers 4.37 and 5.x,
    as `CLIPTokenizer` (slow, where it exists) and `CLIPTokenizerFast`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_bpe_files(directory)
    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": int(model_max_length),
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        **special_tokens,
        # Matched in the raw text, before lower-casing (`normalized: false`), as transformers 5 builds them: 4.37's
        # fast tokenizer otherwise matched them after its normalizer, so "<|ENDOFTEXT|>" was the end token there
        # (pooled at, cutting the caption) and plain characters on 5.x, in BAAI's tokenizer and after `clean_text`.
        "added_tokens_decoder": {
            str(index): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
            for index, token in ((BOS_TOKEN_ID, BOS_TOKEN), (EOS_TOKEN_ID, EOS_TOKEN))
        },
    }
    with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as handle:
        json.dump(tokenizer_config, handle, indent=2)
    with open(directory / "special_tokens_map.json", "w", encoding="utf-8") as handle:
        json.dump(special_tokens, handle, indent=2)
    return [str(directory / name) for name in TOKENIZER_FILES]


def clean_text(text: str) -> str:
    """A caption cleaned as open_clip cleans it before BPE (`ftfy.fix_text`, HTML entities unescaped twice, runs of
    whitespace collapsed, ends stripped, lower-cased), so that the tokenizer's ids equal open_clip's for any caption.

    The lower-casing is Python's, as open_clip's: the fast tokenizer's own lower-casing maps every capital sigma to
    "σ", where Python gives the final form "ς" at the end of a word ("ΟΔΟΣ" -> "οδος"), another token. Literal special
    tokens are rewritten as BAAI reads them (`baai_special_tokens`). Clean a caption once: like the HTML unescaping,
    that rewriting is not idempotent (the `<|endoftext|>` it writes for BAAI's `<end_of_text>` is plain text to a
    second pass, as to BAAI)."""
    try:
        import ftfy
    except ImportError as error:
        raise ImportError("clean_text needs ftfy (pip install ftfy), the text fixer open_clip's tokenizer runs.") from error
    return basic_clean(ftfy.fix_text(text))


def replace_lone_surrogates(text: str) -> str:
    """`text` with U+FFFD for each lone surrogate: Python keeps the bytes of a file name or an argument that are not
    UTF-8 as such (`surrogateescape`), and neither a UTF-8 stream nor the fast tokenizer can take them."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


# BAAI's (and open_clip's) pre-tokenizer: its special tokens are `<start_of_text>` / `<end_of_text>`, matched in the
# text itself wherever the pattern reaches them; `<|startoftext|>` / `<|endoftext|>` are plain characters to it.
_BAAI_SPECIALS = {"<start_of_text>": BOS_TOKEN, "<end_of_text>": EOS_TOKEN}
_BAAI_PATTERN = r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
# transformers' CLIP tokenizers take these literals for their special tokens wherever they stand in the text.
_TRANSFORMERS_SPECIALS = re.compile(r"<\|(startoftext|endoftext)\|>")


@lru_cache()
def _baai_pattern():
    import regex  # a dependency of transformers; `re` has no \p{L}

    return regex.compile(_BAAI_PATTERN, regex.IGNORECASE)


def baai_special_tokens(text: str) -> str:
    """`text` (cleaned and lower-cased) rewritten so that transformers' CLIP tokenizers give the special tokens where
    BAAI's tokenizer gives them, and only there.

    BAAI's `tokenize` (open_clip's too) takes a literal `<end_of_text>` / `<start_of_text>` in a caption for its
    special token (the text tower then pools there, at the first end token), and `<|endoftext|>` for the plain
    characters "<|", "endoftext", "|>"; transformers' tokenizers do the opposite, so either literal made the pooled
    feature another text's. A space between "<|" and the word (and before "|>") is a boundary BAAI's pattern splits
    at anyway, so it changes no id; a BAAI special token is written as transformers' literal only where BAAI's
    pattern matches it (`!<end_of_text>` is the plain "!<", "end", ... to BAAI)."""
    text = _TRANSFORMERS_SPECIALS.sub(lambda match: f"<| {match.group(1)} |>", text)
    if "<" not in text:
        return text
    pieces, end = [], 0
    for match in _baai_pattern().finditer(text):
        special = _BAAI_SPECIALS.get(match.group(0).lower())
        if special is not None:
            pieces += [text[end : match.start()], special]
            end = match.end()
    return "".join(pieces) + text[end:]


def basic_clean(text: str) -> str:
    """open_clip's cleaning without ftfy: HTML entities unescaped twice, runs of whitespace collapsed, ends stripped,
    lower-cased (Python's rules), literal special tokens as BAAI's tokenizer reads them (`baai_special_tokens`).
    Enough for open_clip's ids on printable ASCII text; `clean_text` does the rest.

    Lone surrogates (undecodable bytes in a command line, `surrogateescape`) become U+FFFD, as ftfy makes them: the
    fast tokenizer cannot take them at all."""
    text = html.unescape(html.unescape(replace_lone_surrogates(text)))
    return baai_special_tokens(re.sub(r"\s+", " ", text).strip().lower())


def build_tokenizer(use_fast: bool = True, model_max_length: int = CONTEXT_LENGTH) -> PreTrainedTokenizerBase:
    """A transformers CLIP tokenizer for EVA-CLIP's text towers, built from the packaged BPE file (no network)."""
    with tempfile.TemporaryDirectory(prefix="evaclip-tokenizer-") as directory:
        write_tokenizer_files(directory, model_max_length=model_max_length)
        tokenizer = AutoTokenizer.from_pretrained(directory, use_fast=use_fast)
        # Make sure every file is read before the directory goes away (slow tokenizers read lazily on some lines).
        tokenizer("warm up")
    return tokenizer


__all__ = [
    "BOS_TOKEN",
    "BOS_TOKEN_ID",
    "BPE_VOCAB_FILE",
    "CONTEXT_LENGTH",
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "PAD_TOKEN",
    "PAD_TOKEN_ID",
    "TOKENIZER_FILES",
    "VOCAB_SIZE",
    "build_tokenizer",
    "baai_special_tokens",
    "basic_clean",
    "replace_lone_surrogates",
    "build_vocab",
    "clean_text",
    "byte_to_unicode",
    "read_bpe_merges",
    "write_bpe_files",
    "write_tokenizer_files",
]
