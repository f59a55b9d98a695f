"""`llava-evaclip similarity`: zero-shot image-text probabilities with the full EVA-CLIP model and its tokenizer."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..cli import CLIError
from . import _common

TEXT_COLUMN_WIDTH = 24


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "similarity",
        help="image-text probabilities with a converted full model (vision + text towers)",
        description="Score every image against every text with the full EVA-CLIP model, as CLIP zero-shot "
                    "classification does: softmax over the texts of logit_scale * cosine(image, text). Texts are "
                    "cleaned as EVA-CLIP's tokenizer cleans them (ftfy, HTML entities, whitespace, lower case), "
                    "tokenized with the checkpoint's CLIP tokenizer and padded to the text tower's context length, "
                    "as EVA-CLIP does.",
    )
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a converted full checkpoint dir (with its text tower and tokenizer files)")
    parser.add_argument("--images", nargs="+", required=True, metavar="IMAGE", help="image files or folders")
    parser.add_argument("--texts", nargs="+", required=True, metavar="TEXT", help="candidate texts (quote each)")
    _common.add_runtime_arguments(parser)
    parser.set_defaults(func=run)


def load_full_model(source: _common.ModelSource, dtype: Any, device: Any) -> tuple[Any, Any, Any]:
    """The EvaCLIPModel, its tokenizer and its image processor from a checkpoint dir."""
    from transformers import AutoTokenizer

    from .. import zero
    from ..modeling_evaclip import EvaCLIPModel

    if source.random_weights:
        raise CLIError(f"--model {source.spec} is a preset (random weights, no tokenizer); similarity needs a "
                       "converted full checkpoint dir (llava-evaclip convert SRC OUT_DIR --arch "
                       f"{source.preset}).")
    if not source.has_text_tower:
        raise CLIError(f"--model {source.spec} holds only a vision tower (converted with --vision-only?); "
                       "similarity needs the full model with its text tower.")
    if not any(os.path.isfile(os.path.join(source.path, name)) for name in ("tokenizer.json", "vocab.json")):
        raise CLIError(f"--model {source.spec} has no tokenizer files (vocab.json + merges.txt or tokenizer.json); "
                       "convert the checkpoint again with `llava-evaclip convert`, which writes them.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        with _common.quiet_loading():  # zero.from_pretrained: any load failure (a refused pickle too) is a ValueError
            model = zero.from_pretrained(EvaCLIPModel, source.path)
    except (OSError, ValueError) as error:
        raise CLIError(f"cannot load the model from {source.spec}: {_common.one_line(error)}") from None
    model = model.to(device=device, dtype=dtype).eval()
    return model, tokenizer, _common.image_processor_for(source)


def run(args: argparse.Namespace) -> int:
    import torch

    source = _common.resolve_model(args.model)
    items = _common.collect_images(args.images)
    texts = list(args.texts)
    if any(not text.strip() for text in texts):
        raise CLIError("--texts contains an empty text; give each candidate text as a non-empty quoted string.")
    dtype = _common.resolve_dtype(args.dtype)
    device = _common.resolve_device(args.device)
    model, tokenizer, processor = load_full_model(source, dtype, device)

    images, names, failures = [], [], []
    for item in items:
        try:
            image = _common.open_rgb(item.path)
            # convert("RGB") keeps a palette or grey image's transparent colour in `info`, and transformers 5's
            # processor then paints those pixels white; EVA-CLIP's preprocessing (and transformers 4) use the pixels.
            image.info.pop("transparency", None)
            images.append(image)
            names.append(item.path)
        except OSError as error:
            _common.warn(f"skipping {item.path}: {error}")
            failures.append((item.path, str(error)))
    if images:
        context_length = model.config.text_config.max_position_embeddings
        # EVA-CLIP pads every text to the full context with no attention mask: the causal tower pools at the first
        # end token, so the padding never reaches the pooled output.
        tokens = tokenizer(clean_texts(texts), padding="max_length", truncation=True, max_length=context_length,
                           return_tensors="pt")
        from ..processing import rgb_image_kwargs  # transformers 4's would take an image 1 or 3 pixels high wrongly

        pixel_values = processor(images, return_tensors="pt", **rgb_image_kwargs(processor))["pixel_values"]
        with torch.no_grad():
            output = model(input_ids=tokens["input_ids"].to(device), pixel_values=pixel_values.to(device, dtype))
        probabilities = output.logits_per_image.float().softmax(dim=-1).cpu()
        print(render_table(names, texts, probabilities))
    if failures:
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0


def clean_texts(texts: list[str]) -> list[str]:
    """The texts cleaned as EVA-CLIP's (open_clip's) tokenizer cleans them, so the ids are EVA-CLIP's: curly quotes,
    ligatures, full-width letters, HTML entities and Greek final sigmas would otherwise become other tokens. Without
    ftfy only the ftfy step is missing, which changes nothing in printable ASCII text; other text gets a warning."""
    from ..tokenization import basic_clean, clean_text

    try:
        return [clean_text(text) for text in texts]
    except ImportError:
        if not all(char.isascii() and (char.isprintable() or char in " \t\n\r") for text in texts for char in text):
            _common.warn("ftfy is not installed: texts with characters outside printable ASCII may get other token "
                         "ids than EVA-CLIP's tokenizer gives them (pip install ftfy)")
        return [basic_clean(text) for text in texts]


def _clip(text: str, width: int) -> str:
    """`text` on one table line (runs of whitespace, newlines included, shown as one space), cut to `width`."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def render_table(images: list[str], texts: list[str], probabilities: Any) -> str:
    """Rows are images, columns texts; each row is a probability distribution over the texts (sums to 1)."""
    from ..tokenization import replace_lone_surrogates  # a strict UTF-8 stdout cannot print undecodable bytes

    images, texts = [replace_lone_surrogates(name) for name in images], [replace_lone_surrogates(t) for t in texts]
    image_width = min(max(len("image"), *(len(name) for name in images)), 60)
    columns = [_clip(text, TEXT_COLUMN_WIDTH) for text in texts]
    numbered = len(set(columns)) < len(columns)  # texts that differ only past the cut: numbered to tell them apart

    def label(index: int, width: int) -> str:
        return f"[{index + 1}] " + _clip(texts[index], width - 4) if numbered else _clip(texts[index], width)

    columns = [label(index, TEXT_COLUMN_WIDTH) for index in range(len(texts))]
    widths = [max(len(column), 6) for column in columns]
    lines = ["P(text | image): softmax over the texts of logit_scale * cosine similarity"]
    lines.append("  ".join([f"{'image':<{image_width}}", *(f"{c:>{w}}" for c, w in zip(columns, widths)),
                            "best match"]))
    for name, row in zip(images, probabilities.tolist()):
        cells = [f"{value:>{w}.4f}" for value, w in zip(row, widths)]
        best = label(max(range(len(row)), key=row.__getitem__), 40)
        shown = name if len(name) <= image_width else "..." + name[-(image_width - 3):]  # keep the file name
        lines.append("  ".join([f"{shown:<{image_width}}", *cells, best]))
    return "\n".join(lines)
