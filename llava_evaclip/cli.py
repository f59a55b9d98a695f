"""`llava-evaclip` command line: each sub-command lives in `llava_evaclip.commands.<name>`.

Parsing imports only the command modules, which keep torch and transformers inside their `run`; signals and a closed
stdout end a command here, at the top, with one line (the commands' own cleanup runs first, as the exception passes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from typing import Any, Callable, Optional, Sequence, TextIO

from ._processes import TERMINATING_SIGNALS

COMMANDS = ("convert", "features", "inspect", "similarity", "visualize", "presets", "bench")
EXIT_SIGINT = 128 + signal.SIGINT  # 130, as a shell reports a command ended by Ctrl-C
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2, no traceback."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread like KeyboardInterrupt so that `finally` blocks and cleanup run;
    not an `Exception`, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


class OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors as the README promises them: one line on stderr and exit status 2 (argparse's default
    prints the whole usage block first); the sub-command parsers, and the benchmarks' parsers, are of this class too."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def _print_message(self, message: str, file: Optional[TextIO] = None) -> None:
        """argparse drops write errors, so `--help > out.txt` on a full disk exited 0 with nothing written: on
        stdout they propagate (one line, status 2, from `run_command`); stderr keeps argparse's way."""
        if message and file is sys.stdout:
            file.write(message)
        else:
            super()._print_message(message, file)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="llava-evaclip", description="EVA-CLIP towers for LLaVA.")
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


def _install_signal_handlers() -> dict[int, Any]:
    """Raise `Terminated` on TERMINATING_SIGNALS; returns the handlers to restore. A signal the parent ignores stays
    ignored (`nohup llava-evaclip ...` must survive the logout it was started to survive). Outside the main thread
    (signals cannot be set there) nothing changes."""
    previous: dict[int, Any] = {}
    for signum in TERMINATING_SIGNALS:
        try:
            if signal.getsignal(signum) == signal.SIG_IGN:
                continue
            previous[signum] = signal.signal(signum, _raise_terminated)
        except ValueError:  # not the main thread
            break
    return previous


_STANDARD_STREAMS = ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w"))


def _fill_closed_standard_streams() -> None:
    """A standard stream closed at start (`llava-evaclip presets >&-`, `2>&-`) leaves sys.stdout / sys.stderr None and
    its descriptor free: the next file opened (the PNG being written, a checkpoint) would get descriptor 1 or 2, and
    whatever writes to that stream (torch's C++ warnings, a stray print) would write into that file. Such a stream
    gets /dev/null, as if the user had redirected it there."""
    for descriptor, name, mode in _STANDARD_STREAMS:
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(descriptor)
            continue  # taken by a file opened since: not ours to replace
        except OSError:
            pass
        devnull = os.open(os.devnull, os.O_RDWR)
        if devnull != descriptor:
            os.dup2(devnull, descriptor)
            os.close(devnull)
        setattr(sys, name, open(descriptor, mode, closefd=False))


def _print_undecodable_names() -> None:
    """A file name that is not valid UTF-8 reaches Python as lone surrogates; a strict stream (PYTHONIOENCODING=utf-8,
    a UTF-8 locale) fails on it with a traceback where the name is printed. Such streams write it back as its
    original bytes instead, as `ls` prints it."""
    for stream in (sys.stdout, sys.stderr):  # the process's own streams only, not a caller's capture
        if stream in (sys.__stdout__, sys.__stderr__) and getattr(stream, "errors", None) == "strict":
            stream.reconfigure(errors="surrogateescape")


def _say(text: str) -> None:
    """One line on stderr; a file name's undecodable bytes (lone surrogates) shown escaped whatever the stream."""
    print(text.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)


def _settle_stdout() -> None:
    """After a failed write: if stdout itself cannot take its pending data (a full disk behind `> out.txt`), point it
    at devnull (`_stdout_closed`) so that the interpreter's final flush does not fail again, with a traceback."""
    try:
        sys.stdout.flush()
    except OSError:
        _stdout_closed()


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


def run_command(label: Callable[[], str], body: Callable[[], Optional[int]]) -> int:
    """Run `body` as every command line program of this project ends (`llava-evaclip`, `python -m benchmarks.*`):
    a CLIError or a refused system call is one line `<label>: error: ...` and exit status 2, Ctrl-C one line and
    130, SIGTERM / SIGHUP one line and 128 + N (the body's `finally` blocks and cleanup run first, as the exception
    passes), a closed stdout ends quietly; never a traceback. `label()` is read when the line is printed."""
    _fill_closed_standard_streams()
    _print_undecodable_names()
    previous_handlers = _install_signal_handlers()
    try:
        try:
            status = body()
        except CLIError as error:
            _say(f"{label()}: error: {error}")
            status = 2
        except SystemExit:  # argparse's --help / usage error; its output may meet a closed pipe or a full disk too
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                _stdout_closed()
            raise  # a full disk's OSError replaces this exit (argparse swallowed it): one line below, status 2
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return int(status or 0)
    except BrokenPipeError:
        return _stdout_closed()
    except OSError as error:  # the system refused something no command expected (stdout on a full disk): one line
        _settle_stdout()
        where = f"{error.filename}: " if error.filename else ""
        _say(f"{label()}: error: {where}{error.strerror or error}")
        return 2
    except KeyboardInterrupt:
        _say(f"{label()}: interrupted (SIGINT)")
        return EXIT_SIGINT
    except BaseException as error:  # SIGTERM / SIGHUP, as raised here or by a command's own handler (convert's)
        signum = getattr(error, "signum", None)
        if signum not in TERMINATING_SIGNALS:
            raise
        _say(f"{label()}: terminated ({signal.Signals(signum).name})")
        return 128 + signum
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = _take_launcher_local_rank(sys.argv[1:] if argv is None else argv)
    command = ""

    def body() -> int:
        nonlocal command
        args = build_parser().parse_args(argv)
        command = args.command
        if getattr(args, "needs_model", True):  # deferred by the console script until a command needs a model
            # stdout is the command's output (`inspect --json`): what the imports print goes to stderr. accelerate
            # 0.21 (LLaVA's pin) imports DeepSpeed where installed, whose logger writes to stdout (INFO lines too up
            # to 0.14 at least: "Setting ds_accelerator to cuda").
            with contextlib.redirect_stdout(sys.stderr):
                from . import _register_auto_classes

                _register_auto_classes()
        return args.func(args)

    return run_command(lambda: f"llava-evaclip {command}".rstrip(), body)


if __name__ == "__main__":
    # `python -m llava_evaclip.cli`: this module runs as __main__, but the commands raise `llava_evaclip.cli.CLIError`,
    # a class of the imported module that this copy's `except CLIError` would not catch (a traceback, status 1).
    from llava_evaclip.cli import main as package_main

    sys.exit(package_main())
