"""`llava-evaclip bench`: the tower benchmark of the source tree's `benchmarks/` (same options as
`python -m benchmarks.tower`)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Any

from ..cli import CLIError

_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TOWER_PATH = os.path.join(_SOURCE_ROOT, "benchmarks", "tower.py")
_MODULE_NAME = "_llava_evaclip_benchmarks_tower"


def _benchmark_module() -> Any:
    """`benchmarks/tower.py` of the source tree, which ships with the checkout, not with the installed package. It is
    loaded from its file: imported by package name, a `benchmarks` folder in the current directory (a common name,
    first on `python -m`'s path) was imported instead, running its code on every `llava-evaclip` call and leaving
    `bench` without its options."""
    loaded = sys.modules.get("benchmarks.tower")
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", None) or "") == _TOWER_PATH:
        return loaded  # `python -m benchmarks.tower`, or a test, imported the same file already
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    if not os.path.isfile(_TOWER_PATH) or not os.path.isfile(os.path.join(_SOURCE_ROOT, "pyproject.toml")):
        return None  # only a source checkout has our benchmarks/: installed, _SOURCE_ROOT is site-packages, where a
        # `benchmarks/tower.py` is another distribution's (it ran, and broke, on every `llava-evaclip` command)
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, _TOWER_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except ImportError:
        del sys.modules[_MODULE_NAME]
        return None
    return module


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
