"""`llava-evaclip` command line: each sub-command lives in `llava_evaclip.commands.<name>`.

Parsing imports only the command modules, which keep torch and transformers inside their `run`; signals and a closed
stdout end a command here, at the top, with one line (the commands' own cleanup runs first, as the exception passes).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import Any, Optional, Sequence

COMMANDS = ("convert", "features", "inspect", "similarity", "visualize", "presets", "bench")
EXIT_SIGINT = 128 + signal.SIGINT  # 130, as a shell reports a command ended by Ctrl-C
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2, no traceback."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so that `finally` blocks and cleanup run; not an
    `Exception`, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


class _OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors as the README promises them: one line on stderr and exit status 2 (argparse's default
    prints the whole usage block first); the sub-command parsers are of this class too."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog="llava-evaclip", description="EVA-CLIP towers for LLaVA.")
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


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def _stdout_closed() -> int:
    """The reader of our stdout went away (`llava-evaclip presets -v | head -1`): stop quietly, as CPython's docs
    advise, pointing stdout at devnull so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests capture it)
        pass
    return 1


_LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")


def _take_launcher_local_rank(argv: Sequence[str]) -> list[str]:
    """`deepspeed --module llava_evaclip features ...` (and torch.distributed.launch) run
    `python -m llava_evaclip --local_rank=N features ...`: the flag comes before the command, where the top-level
    parser has no such option. Drop it there (every such launcher also sets LOCAL_RANK, which the commands read; it
    is set from the flag where it is missing)."""
    argv = list(argv)
    value = None
    while argv:
        head = argv[0]
        if head in _LOCAL_RANK_FLAGS and len(argv) > 1:
            value, argv = argv[1], argv[2:]
        elif head.split("=", 1)[0] in _LOCAL_RANK_FLAGS and "=" in head:
            value, argv = head.split("=", 1)[1], argv[1:]
        else:
            break
    if value is not None and value.strip().isdigit() and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = value.strip()
    return argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    command = "command"
    argv = _take_launcher_local_rank(sys.argv[1:] if argv is None else argv)
    try:
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals stay as they are
        previous_sigterm = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        if getattr(args, "needs_model", True):  # deferred by the console script until a command needs a model
            from . import _register_auto_classes

            _register_auto_classes()
        try:
            status = args.func(args)
        except CLIError as error:
            print(f"llava-evaclip {command}: error: {error}", file=sys.stderr)
            status = 2
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return int(status or 0)
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        print(f"llava-evaclip {command}: interrupted (SIGINT)", file=sys.stderr)
        return EXIT_SIGINT
    except SystemExit:  # argparse's --help / usage error: its output may meet a closed pipe too
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_closed()
        raise
    except BaseException as error:  # SIGTERM, as raised here or by a command's own handler (e.g. convert's)
        if getattr(error, "signum", None) != signal.SIGTERM:
            raise
        print(f"llava-evaclip {command}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_SIGTERM
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())
