"""`llava-evaclip bench`: the tower benchmark of the source tree's `benchmarks/` (same options as
`python -m benchmarks.tower`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..cli import CLIError

_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _benchmark_module() -> Any:
    """`benchmarks.tower`, which ships with the source tree, not with the installed package."""
    if os.path.isfile(os.path.join(_SOURCE_ROOT, "benchmarks", "tower.py")) and _SOURCE_ROOT not in sys.path:
        sys.path.insert(0, _SOURCE_ROOT)
    try:
        from benchmarks import tower
    except ImportError:
        return None
    return tower


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time the LLaVA tower against transformers' CLIP, timm's EVA-02 and the eager path",
        description="Time the EVA-CLIP LLaVA tower (layer -2, patch tokens) next to transformers' CLIPVisionModel, "
                    "timm's eva02_large_patch14_clip_336 and our eager-attention path, interleaved in one process; "
                    "writes JSON, a markdown table and a PNG chart. Needs a source checkout (benchmarks/).",
    )
    tower = _benchmark_module()
    if tower is not None:
        tower.add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tower = _benchmark_module()
    if tower is None:
        raise CLIError("the benchmark lives in the source tree's benchmarks/ folder, which is not importable here; "
                       "run it from a source checkout (pip install -e .) or as `python -m benchmarks.tower`.")
    args.command_line = "llava-evaclip " + " ".join(sys.argv[1:])
    try:
        report = tower.run_benchmark(args)
    except tower.BenchmarkError as error:
        raise CLIError(str(error)) from None
    tower.print_summary(report)
    return 0
