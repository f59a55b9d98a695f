"""`llava-evaclip features`: images -> LLaVA's visual tokens, one .safetensors per image, resumable."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional

from ..cli import CLIError
from . import _common
from ._common import ImageItem, ModelSource

FORMAT = "llava-evaclip.features/1"
OUTPUT_SUFFIX = ".safetensors"
# Metadata that must agree before an existing output is accepted as this run's result (resume).
SETTING_KEYS = ("model", "random_weights", "select_layer", "select_feature", "dtype")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "features",
        help="images -> LLaVA visual tokens (.safetensors per image)",
        description="Run the EVA-CLIP vision tower exactly as LLaVA does and save each image's selected hidden "
                    "states, with the image's metadata, to OUT_DIR/<path relative to its input>.safetensors. "
                    "Reruns skip images whose output exists (--overwrite recomputes).",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image files or folders (searched recursively)")
    parser.add_argument("--samples", action="store_true",
                        help="also process the sample images shipped with the package")
    parser.add_argument("--model", required=True, metavar="DIR_OR_PRESET",
                        help="a converted checkpoint dir, or a preset name (RANDOM weights; see `presets`)")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (created if missing)")
    _common.add_selection_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    _common.add_runtime_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="recompute images whose output already exists")
    parser.set_defaults(func=run)


def output_path(out_dir: str, item: ImageItem) -> str:
    return os.path.join(out_dir, *item.relative.split("/")) + OUTPUT_SUFFIX


def run_settings(source: ModelSource, args: argparse.Namespace) -> dict[str, str]:
    return {
        "model": source.label,
        "random_weights": "true" if source.random_weights else "false",
        "select_layer": _common.format_select_layer(args.select_layer),
        "select_feature": args.select_feature,
        "dtype": _common.DTYPES[args.dtype],
    }


def existing_mismatch(path: str, settings: dict[str, str]) -> Optional[str]:
    """None when the output at `path` was made with these settings; otherwise why it cannot be reused."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # a foreign or damaged file
        return f"{path} exists but is not a readable features file ({_common.one_line(error)})"
    differences = [f"{key} {metadata.get(key)!r} (now {settings[key]!r})" for key in SETTING_KEYS
                   if metadata.get(key) != settings[key]]
    if differences:
        return f"{path} exists but was made with other settings: {', '.join(differences)}"
    return None


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}.")
    inputs = list(args.inputs) + ([_common.samples_dir()] if args.samples else [])
    if not inputs:
        raise CLIError("no input: give image files or folders, or --samples for the bundled sample images.")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out} exists and is not a directory.")
    source = _common.resolve_model(args.model)
    _common.selected_layers(args.select_layer, source.vision_config.num_hidden_layers)
    items = _common.collect_images(inputs)
    dtype = _common.resolve_dtype(args.dtype)
    device = _common.resolve_device(args.device)
    settings = run_settings(source, args)
    if source.random_weights:
        print(_common.random_weights_banner(source.preset), file=sys.stderr)

    failures: list[tuple[str, str]] = []
    todo: list[ImageItem] = []
    skipped = 0
    for item in items:
        path = output_path(args.out, item)
        if os.path.exists(path) and not args.overwrite:
            problem = existing_mismatch(path, settings)
            if problem is None:
                skipped += 1
            else:
                failures.append((item.path, problem + "; pass --overwrite to replace it or use another --out"))
            continue
        todo.append(item)

    written = 0
    elapsed = 0.0
    shape: Optional[tuple[int, ...]] = None
    if todo:
        tower = _common.load_tower(source, args.select_layer, args.select_feature, dtype, device)
        started = time.perf_counter()
        written, shape = _extract(todo, tower, source, args, settings, dtype, device, failures)
        elapsed = time.perf_counter() - started

    _print_summary(args, source, len(items), written, skipped, failures, shape, elapsed)
    return 1 if failures else 0


def _extract(todo: list[ImageItem], tower: Any, source: ModelSource, args: argparse.Namespace,
             settings: dict[str, str], dtype: Any, device: Any,
             failures: list[tuple[str, str]]) -> tuple[int, Optional[tuple[int, ...]]]:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .. import __version__

    processor = tower.image_processor
    written = 0
    shape = None
    with tqdm(total=len(todo), unit="img", desc="features", file=sys.stderr, dynamic_ncols=True) as progress:
        for start in range(0, len(todo), args.batch_size):
            batch: list[tuple[ImageItem, Any]] = []
            pixels = []
            for item in todo[start:start + args.batch_size]:
                try:  # decode and preprocess one image at a time, so a bad one fails alone
                    image = _common.open_rgb(item.path)
                    pixels.append(processor([image], return_tensors="pt")["pixel_values"])
                except Exception as error:  # PIL and the processor raise many types for broken inputs
                    reason = (str(error) if isinstance(error, OSError)
                              else f"cannot preprocess ({_common.one_line(error)})")
                    _common.warn(f"skipping {item.path}: {reason}")
                    failures.append((item.path, reason))
                    progress.update(1)
                    continue
                batch.append((item, image))
            if not batch:
                continue
            pixel_values = torch.cat(pixels)
            with torch.no_grad():
                features = tower(pixel_values.to(device=device, dtype=dtype))
            for (item, image), feature in zip(batch, features):
                metadata = {
                    "format": FORMAT,
                    **settings,
                    "source": os.path.abspath(item.path),
                    "relative_path": item.relative,
                    "original_size": f"{image.width}x{image.height}",
                    "image_size": str(pixel_values.shape[-1]),
                    "num_tokens": str(feature.shape[0]),
                    "hidden_size": str(feature.shape[-1]),
                    "llava_evaclip_version": __version__,
                }
                if source.random_weights:
                    metadata["random_weights_seed"] = str(_common.PRESET_SEED)
                    metadata["warning"] = "RANDOM weights from a preset: not a trained model"
                tensor = feature.detach().to("cpu").clone()  # its own storage, not a view of the batch
                _common.atomic_write(
                    output_path(args.out, item), lambda temp: save_file({"features": tensor}, temp, metadata)
                )
                shape = tuple(tensor.shape)
                written += 1
                progress.update(1)
    return written, shape


def _print_summary(args: argparse.Namespace, source: ModelSource, total: int, written: int, skipped: int,
                   failures: list[tuple[str, str]], shape: Optional[tuple[int, ...]], elapsed: float) -> None:
    rate = f", {written / elapsed:.1f} img/s" if written and elapsed > 0 else ""
    print(f"{total} images: {written} written, {skipped} skipped (output exists), {len(failures)} failed "
          f"in {elapsed:.1f} s{rate}")
    if shape is not None:
        print(f"each file: 'features' {list(shape)} {_common.DTYPES[args.dtype]} = hidden_states"
              f"[{_common.format_select_layer(args.select_layer)}] ({args.select_feature}) from {source.label}")
    print(f"output: {os.path.abspath(args.out)}")
    if skipped and not args.overwrite:
        print("existing outputs were kept; pass --overwrite to recompute them")
    if source.random_weights:
        print(f"NOTE: RANDOM weights ({source.preset} preset); convert a real checkpoint for meaningful features",
              file=sys.stderr)
    if failures:
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
