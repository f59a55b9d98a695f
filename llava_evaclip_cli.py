"""Entry point of the `llava-evaclip` console script.

It sits outside the `llava_evaclip` package because importing the package registers the models with transformers'
Auto classes, which imports torch and transformers (seconds, ~1 GB). The script asks the package to defer that until
a command needs a model, so `--help`, argument errors and `presets` start at once. `python -m llava_evaclip` works
too, without that saving.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Optional, Sequence

_DEFER_ENV = "LLAVA_EVACLIP_DEFER_AUTO_REGISTRATION"  # llava_evaclip.DEFER_REGISTRATION_ENV


def import_cli() -> ModuleType:
    """`llava_evaclip.cli`, with the package's Auto registration deferred until a command needs a model: `--help` and
    argument errors import neither torch nor transformers (nor DeepSpeed, which accelerate 0.21, LLaVA's pin, imports
    where installed, and which logs to stdout). The benchmarks' entry points import it so too."""
    previous = os.environ.get(_DEFER_ENV)
    os.environ[_DEFER_ENV] = "1"
    try:
        return importlib.import_module("llava_evaclip.cli")
    finally:  # not inherited by anything the command starts
        if previous is None:
            os.environ.pop(_DEFER_ENV, None)
        else:
            os.environ[_DEFER_ENV] = previous


def main(argv: Optional[Sequence[str]] = None) -> int:
    return import_cli().main(argv)


if __name__ == "__main__":
    sys.exit(main())
