"""`llava-evaclip presets`: the architecture names `--model` and `--arch` accept."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "presets",
        help="list the preset names --model / --arch accept",
        description="Print the released EVA-CLIP architectures by BAAI's names, one per line. As --arch of "
                    "`convert` they give the architecture of a checkpoint; as --model they build that "
                    "architecture with RANDOM weights (for trying the pipeline without a download).",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print image size, patch size, layers and width of each vision tower")
    parser.set_defaults(func=run, needs_model=False)


def run(args: argparse.Namespace) -> int:
    from ..presets import list_presets, vision_shape

    for name in list_presets():
        if args.verbose:
            shape = vision_shape(name)
            print(f"{name:<26} image {shape['image_size']}, patch {shape['patch_size']}, "
                  f"{shape['layers']} layers, width {shape['width']}")
        else:
            print(name)
    return 0
