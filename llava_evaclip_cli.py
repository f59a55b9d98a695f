"""Entry point of the `llava-evaclip` console script.

It sits outside the `llava_evaclip` package because importing the package registers the models with transformers'
Auto classes, which imports torch and transformers (seconds, ~1 GB). The script asks the package to defer that until
a command needs a model, so `--help`, argument errors and `presets` start at once. `python -m llava_evaclip` works
too, without that saving.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

_DEFER_ENV = "LLAVA_EVACLIP_DEFER_AUTO_REGISTRATION"  # llava_evaclip.DEFER_REGISTRATION_ENV


def main(argv: Optional[Sequence[str]] = None) -> int:
    previous = os.environ.get(_DEFER_ENV)
    os.environ[_DEFER_ENV] = "1"
    try:
        from llava_evaclip.cli import main as cli_main
    finally:  # not inherited by anything the command starts
        if previous is None:
            os.environ.pop(_DEFER_ENV, None)
        else:
            os.environ[_DEFER_ENV] = previous
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
