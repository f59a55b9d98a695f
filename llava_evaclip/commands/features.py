"""`llava-evaclip features`: images -> LLaVA's visual tokens, one .safetensors per image or safetensors shards with an
index, resumable, on one or many processes. A thin layer over `llava_evaclip.features`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..cli import CLIError
from . import _common


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "features",
        help="images -> LLaVA visual tokens (.safetensors per image, or shards)",
        description="Run the EVA-CLIP vision tower exactly as LLaVA does and save each image's selected hidden "
                    "states: --format files writes OUT_DIR/<path relative to its input>.safetensors, --format shards "
                    "writes OUT_DIR/shards/*.safetensors with OUT_DIR/index.json. Reruns compute only what is "
                    "missing. Under torchrun / accelerate launch / deepspeed every rank takes its share.",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image files or folders (searched recursively)")
    parser.add_argument("--samples", action="store_true",
                        help="also process the sample images shipped with the package")
    parser.add_argument("--model", required=True, metavar="DIR_OR_PRESET",
                        help="a converted checkpoint dir, or a preset name (RANDOM weights; see `presets`)")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (created if missing)")
    _common.add_selection_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader processes decoding images (default: 0, decode in the main process)")
    parser.add_argument("--format", choices=("files", "shards"), default="files",
                        help="one file per image (default), or safetensors shards plus index.json for large sets")
    parser.add_argument("--shard-size", type=float, default=1024, metavar="MB",
                        help="approximate shard size in MB for --format shards (default: 1024)")
    _common.add_runtime_arguments(parser)
    # `deepspeed --module` passes --local_rank; the rank is read from LOCAL_RANK, which every launcher sets.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute images whose output file already exists (--format files)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import features

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.workers < 0:
        raise CLIError(f"--workers must be 0 or more, got {args.workers}.")
    if args.shard_size <= 0:
        raise CLIError(f"--shard-size must be positive (MB), got {args.shard_size}.")
    if args.overwrite and args.format == "shards":
        raise CLIError("--overwrite applies to --format files; a shard store only grows: use another --out.")
    inputs = list(args.inputs) + ([_common.samples_dir()] if args.samples else [])
    if not inputs:
        raise CLIError("no input: give image files or folders, or --samples for the bundled sample images.")
    try:
        context = features.DistributedContext.from_env()
    except ValueError as error:
        raise CLIError(str(error)) from None
    if args.device not in ("auto", "cuda"):
        _common.resolve_device(args.device)  # meta, absent backends, cuda:N past the last GPU: one line, before loading
    try:
        device = context.device(args.device)
    except (ValueError, RuntimeError) as error:
        raise CLIError(_common.one_line(error)) from None
    # Join the other ranks first: a check that fails on one node only (an input folder, the checkpoint or OUT missing
    # there) then stops every rank with that line, instead of leaving the others waiting for it.
    try:
        context.start(device)
    except (RuntimeError, ValueError) as error:  # torch's DistStoreError / DistNetworkError: no traceback
        raise CLIError(f"rank {context.rank} of {context.world_size} cannot join the others through "
                       f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({_common.one_line(error)}); "
                       "start every rank with one torchrun / accelerate / deepspeed launch, or unset WORLD_SIZE "
                       "for one process.") from None
    try:
        return _run(features, args, inputs, context, device)
    finally:
        context.stop()


def _run(features: Any, args: argparse.Namespace, inputs: list, context: Any, device: Any) -> int:
    error = None
    try:
        try:
            if os.path.exists(args.out) and not os.path.isdir(args.out):
                raise ValueError(f"--out {args.out} exists and is not a directory.")
            items, skipped_inputs = features.find_images(inputs)
            if args.format == "files":
                features._check_planned_outputs(items, args.out)
        except ValueError as raised:
            raise CLIError(str(raised)) from None
        source = _common.resolve_model(args.model)
        _common.selected_layers(args.select_layer, source.vision_config.num_hidden_layers)
        dtype = _common.resolve_dtype(args.dtype)
        try:  # an unwritable or full output folder is found before any weight is read
            features.check_writable(args.out)
        except ValueError as raised:
            raise CLIError(str(raised)) from None
    except CLIError as raised:
        error = str(raised)
    error = context.first_error(error)
    if error is not None:
        raise CLIError(error)
    main = context.rank == 0
    if source.random_weights and main:
        print(_common.random_weights_banner(source.preset), file=sys.stderr)
    for path, reason in skipped_inputs:
        if main:
            _common.warn(f"skipping {path}: {reason}")
    tower = None
    try:
        tower = _common.load_tower(source, args.select_layer, args.select_feature, dtype, device)
    except CLIError as raised:
        error = str(raised)
    error = context.first_error(error)
    if error is not None:
        raise CLIError(error)
    try:
        report = _extract(features, tower, items, args, context)
    except ValueError as raised:  # a store made with other settings, a mixed-format OUT, ranks that disagree
        raise CLIError(_common.one_line(raised)) from None
    if not main:
        return 1 if report.failures or report.stopped else 0
    report.skipped_inputs = skipped_inputs
    _print_summary(args, source, report)
    return 1 if report.failures or report.stopped else 0


def _extract(features: Any, tower: Any, items: list, args: argparse.Namespace, context: Any) -> Any:
    from tqdm import tqdm

    bar: list[Any] = []

    def progress(count: int) -> None:  # the bar opens with the first image, after every check has passed
        if not bar:
            bar.append(tqdm(total=len(items) if context.world_size == 1 else None, unit="img", desc="features", file=sys.stderr, dynamic_ncols=True,
                            disable=context.rank != 0))
        bar[0].update(count)

    try:
        return features.extract_features(
            tower, items, args.out, format=args.format, batch_size=args.batch_size, workers=args.workers,
            shard_size_mb=args.shard_size, overwrite=args.overwrite, context=context, progress=progress,
            on_failure=lambda path, reason: _common.warn(f"skipping {path}: {reason}"),
        )
    finally:
        if bar:
            bar[0].close()


def _print_summary(args: argparse.Namespace, source: _common.ModelSource, report: Any) -> None:
    rate = f", {report.written / report.elapsed:.1f} img/s" if report.written and report.elapsed > 0 else ""
    ranks = f" on {report.world_size} ranks" if report.world_size > 1 else ""
    print(f"{report.total} images: {report.written} written, {report.kept} skipped (output exists), "
          f"{len(report.failures)} failed in {report.elapsed:.1f} s{rate}{ranks}")
    if report.shape is not None:
        where = "each file" if args.format == "files" else "each entry"
        print(f"{where}: 'features' {list(report.shape)} {_common.DTYPES[args.dtype]} = hidden_states"
              f"[{_common.format_select_layer(args.select_layer)}] ({args.select_feature}) from {source.label}")
    print(f"output: {os.path.abspath(args.out)}" + (" (shards + index.json)" if args.format == "shards" else ""))
    if report.kept and not args.overwrite:
        print("existing outputs were kept" + ("; pass --overwrite to recompute them" if args.format == "files" else ""))
    if report.skipped_inputs:
        print(f"{len(report.skipped_inputs)} input(s) skipped:", file=sys.stderr)  # folders, or not regular files
        for path, reason in report.skipped_inputs:
            print(f"  {path}: {reason}", file=sys.stderr)
    if source.random_weights:
        print(f"NOTE: RANDOM weights ({source.preset} preset); convert a real checkpoint for meaningful features",
              file=sys.stderr)
    if report.failures:
        print(f"{len(report.failures)} image(s) failed:", file=sys.stderr)
        for path, reason in report.failures:
            print(f"  {path}: {reason}", file=sys.stderr)
    if report.stopped:
        print(f"llava-evaclip features: stopped: {report.stopped}; every finished output was kept, rerun to complete "
              "the rest once there is space", file=sys.stderr)


__all__ = ["add_parser", "run"]
