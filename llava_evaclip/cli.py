"""`llava-evaclip` command line: each sub-command lives in `llava_evaclip.commands.<name>`."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS = ("convert", "features", "inspect", "similarity", "visualize", "presets", "bench")


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-evaclip", description="EVA-CLIP towers for LLaVA.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"llava_evaclip.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"llava_evaclip.commands.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except CLIError as error:
        print(f"llava-evaclip {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
