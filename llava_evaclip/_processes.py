"""What every part of the package that writes files agrees on about processes, kept free of torch so the command line
can import it before a command needs torch: which signals end a run with cleanup, and whether a writer still lives."""

from __future__ import annotations

import os
import signal

# Signals that end a run through an exception (cleanup runs, one line, exit 128 + N) instead of killing it on the
# spot and leaving temp files behind: SIGTERM (kill, Slurm's scancel) and SIGHUP (the terminal or ssh session went
# away).
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def process_exists(pid: int) -> bool:
    """Whether a process with this pid exists here (another user's counts: EPERM); any doubt counts as existing."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # EPERM, or no pid could be that number: not ours to judge
        return True
    return True


__all__ = ["TERMINATING_SIGNALS", "process_exists"]
