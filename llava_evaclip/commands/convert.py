"""`llava-evaclip convert SRC OUT --arch ARCH`: a released EVA-CLIP checkpoint to a Hugging Face dir."""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import time
from typing import Any

from ..cli import CLIError

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a BAAI / timm / open_clip / InternVL-port EVA-CLIP checkpoint to a Hugging Face dir",
        description="Convert SRC into a complete Hugging Face dir OUT (config.json, safetensors weights, "
                    "preprocessor_config.json and, for full models, the CLIP tokenizer). SRC is a BAAI release "
                    "state dict (.pt/.bin, CLIP or CustomCLIP layout), a timm EVA / EVA-02 vision state dict, an "
                    "open_clip EVA state dict, or an InternVL-port Hugging Face dir; the kind is detected from the "
                    "keys. .pt files are read with torch.load(weights_only=True). Every weight must match the "
                    "architecture exactly, and OUT appears only once it is complete.",
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint file (.pt, .pth, .bin, .safetensors) or HF dir")
    parser.add_argument("out", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--arch", metavar="ARCH",
                        help="preset name (see `llava-evaclip presets`) or a BAAI model-config JSON (embed_dim, "
                             "vision_cfg, text_cfg); optional for Hugging Face dirs, whose config.json is used")
    parser.add_argument("--vision-only", action="store_true",
                        help="write only the vision tower (plus its image projection when the source has one); "
                             "timm state dicts always give a vision tower")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                        help="dtype of the written weights (default: float32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it is a previous convert output (never SRC or a folder holding it, the "
                             "current directory or its ancestors, the home directory, or any other folder); the new "
                             "OUT keeps the old one's permissions")
    parser.set_defaults(func=run)


def _os_error_message(error: OSError, out: str) -> str:
    """One line: what the system refused, on which path, and that OUT was left as it was (the converter removes
    its temporary files on any failure)."""
    reason = error.strerror or str(error) or type(error).__name__
    where = f": {error.filename}" if error.filename is not None else ""
    hint = {errno.ENOSPC: " (the disk is full: free space or choose OUT on another disk)",
            errno.EDQUOT: " (the disk quota is used up)",
            errno.EFBIG: " (a file size limit was reached: see `ulimit -f`)"}.get(error.errno, "")
    message = (f"{reason}{where}{hint}; the conversion stopped, its temporary files were removed and {out} was left "
               "as it was.")
    return " ".join(message.split())


def run(args: argparse.Namespace) -> int:
    from ..convert import ConversionError, ConversionTerminated, convert_checkpoint

    start = time.perf_counter()
    try:
        result = convert_checkpoint(
            args.src, args.out, arch=args.arch, vision_only=args.vision_only, dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except (ConversionError, ValueError) as error:
        raise CLIError(" ".join(str(error).split())) from None  # one line, whatever the message holds
    except OSError as error:  # ENOSPC, EFBIG, EACCES, EIO ...: the system's refusal, not a converter bug
        raise CLIError(_os_error_message(error, args.out)) from None
    except (ConversionTerminated, KeyboardInterrupt) as error:
        # The converter has removed its staging dir and left OUT as it was; say so on one line, no traceback.
        signum = getattr(error, "signum", signal.SIGINT)
        how = f"terminated ({signal.Signals(signum).name})" if signum != signal.SIGINT else "interrupted"
        print(f"llava-evaclip convert: {how}; temporary files removed, {args.out} left as it was.", file=sys.stderr)
        return 128 + signum
    print(
        f"converted {result.source_kind} checkpoint {args.src} -> {result.output_dir}: {result.model_class}, "
        f"{result.num_parameters / 1e6:.1f}M parameters, {result.dtype}, {len(result.files)} files "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0
