"""`llava-evaclip visualize`: the tower's patch features as colour (PCA, first three components as RGB).

This is the usual way to eyeball ViT features: patches the tower considers alike get alike colours, so object parts
and background separate. The PNG shows the crop the tower saw, the PCA map over the patch grid, and both overlaid.
It is drawn with PIL alone, so no plotting library is needed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from ..cli import CLIError
from . import _common

CAPTION_HEIGHT = 18
GAP = 6
MIN_PANEL = 224
LOW_QUANTILE, HIGH_QUANTILE = 0.01, 0.99  # robust colour range: a few outlier tokens do not wash out the rest


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "visualize",
        help="PNG of the tower's patch features: first 3 principal components as RGB over the image",
        description="Run the vision tower on one image, project its patch features on their first three principal "
                    "components, and write a PNG: the model's input crop, the components as RGB over the patch "
                    "grid, and the two blended.",
    )
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    parser.add_argument("--model", required=True, metavar="DIR_OR_PRESET",
                        help="a converted checkpoint dir (a preset name works but has RANDOM weights)")
    parser.add_argument("--out", required=True, metavar="PNG", help="output .png file")
    parser.add_argument("--select-layer", default="-2", metavar="INDEX",
                        help="hidden state whose patch tokens are shown (default: -2, as LLaVA reads)")
    _common.add_runtime_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(func=run)


def pca_colors(features: Any) -> tuple[Any, list[float]]:
    """[N, C] features -> ([N, 3] colours in [0, 1], explained variance ratio of the three components).

    Components are signed deterministically (largest-magnitude score positive) and each is mapped to [0, 1] between
    its 1st and 99th percentile."""
    import torch

    x = features.float()
    x = x - x.mean(dim=0, keepdim=True)
    _, singular, vh = torch.linalg.svd(x, full_matrices=False)
    count = min(3, vh.shape[0])
    scores = x @ vh[:count].T
    signs = torch.sign(scores.gather(0, scores.abs().argmax(dim=0, keepdim=True)))
    scores = scores * torch.where(signs == 0, torch.ones_like(signs), signs)
    low = torch.quantile(scores, LOW_QUANTILE, dim=0, keepdim=True)
    high = torch.quantile(scores, HIGH_QUANTILE, dim=0, keepdim=True)
    colors = ((scores - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    if count < 3:
        colors = torch.cat((colors, torch.full((colors.shape[0], 3 - count), 0.5)), dim=1)
    variance = singular.square()
    ratios = (variance[:count] / variance.sum().clamp_min(1e-12)).tolist()
    return colors, ratios


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image, ImageDraw

    if os.path.isdir(args.image):
        raise CLIError(f"{args.image} is a folder; visualize takes one image file (for a folder of images use "
                       "`llava-evaclip features`).")
    if not os.path.isfile(args.image):
        problem = "not a regular file" if os.path.exists(args.image) else "no such file"
        raise CLIError(f"{args.image}: {problem} (expected one image file).")
    if not args.out.lower().endswith(".png"):
        raise CLIError(f"--out {args.out} must be a .png file name.")
    _common.check_output_file(args.out, args.overwrite)
    source = _common.resolve_model(args.model)
    _common.selected_layers(args.select_layer, source.vision_config.num_hidden_layers)
    dtype = _common.resolve_dtype(args.dtype)
    device = _common.resolve_device(args.device)
    try:
        image = _common.open_rgb(args.image)
    except OSError as error:
        raise CLIError(f"{args.image}: {error}") from None
    if source.random_weights:
        print(_common.random_weights_banner(source.preset), file=sys.stderr)
    tower = _common.load_tower(source, args.select_layer, "patch", dtype, device)

    from ..processing import rgb_image_kwargs  # transformers 4's would take an image 1 or 3 pixels high wrongly

    processor = tower.image_processor
    pixel_values = processor([image], return_tensors="pt", **rgb_image_kwargs(processor))["pixel_values"]
    with torch.no_grad():
        features = tower(pixel_values.to(device=device, dtype=dtype))[0]
    side = tower.num_patches_per_side
    colors, ratios = pca_colors(features.cpu())
    grid = (colors.reshape(side, side, 3) * 255).round().to(torch.uint8).numpy()

    panel = side * math.ceil(max(MIN_PANEL, pixel_values.shape[-1]) / side)  # whole pixels per patch
    crop = _denormalize(pixel_values[0], tower.image_processor).resize((panel, panel), Image.BICUBIC)
    pca = Image.fromarray(grid).resize((panel, panel), Image.NEAREST)
    overlay = Image.blend(crop, pca, 0.5)

    title = (f"{source.label}{' (RANDOM weights)' if source.random_weights else ''}: layer "
             f"{_common.format_select_layer(args.select_layer)}, {side}x{side} patches, PC1-3 -> RGB "
             f"(variance {', '.join(f'{100 * r:.0f}%' for r in ratios)})")
    width = 3 * panel + 4 * GAP
    canvas = Image.new("RGB", (width, 2 * CAPTION_HEIGHT + panel + 2 * GAP), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 3), title, fill="black")
    top = CAPTION_HEIGHT + GAP + CAPTION_HEIGHT
    for index, (caption, picture) in enumerate((("input (model crop)", crop), ("patch features, PCA", pca),
                                                 ("overlay", overlay))):
        left = GAP + index * (panel + GAP)
        draw.text((left, CAPTION_HEIGHT + GAP), caption, fill="black")
        canvas.paste(picture, (left, top))
    _common.atomic_write(args.out, lambda temp: canvas.save(temp, format="PNG"), replace=args.overwrite)
    print(f"wrote {args.out}: {side}x{side} patch grid of hidden_states[{_common.format_select_layer(args.select_layer)}]"
          f", explained variance of PC1-3: {', '.join(f'{r:.3f}' for r in ratios)}")
    return 0


def _denormalize(pixels: Any, processor: Any) -> Any:
    """The processor's output back to an 8-bit image (undo mean/std normalisation and rescaling)."""
    import torch
    from PIL import Image

    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    values = (pixels.float() * std + mean).clamp(0, 1) * 255
    return Image.fromarray(values.round().to(torch.uint8).permute(1, 2, 0).numpy())
