"""Start a worker script under `torchrun` on CPU ranks, with a free port, a hard time limit and no leftovers.

Each worker writes its results as JSON (and tensors as .pt) into an output directory; the test asserts on those files,
so a worker never decides whether a check passed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

DIST_DIR = Path(__file__).resolve().parent
REPO_ROOT = DIST_DIR.parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    """A TCP port nothing listens on right now (bound to port 0, then released for torchrun's store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


MAX_LOAD_SCALE = 4.0
# torchrun's store lost the race for the port `free_port` found (another job took it in between): start again.
PORT_TAKEN = ("address already in use", "EADDRINUSE")


def load_scale() -> float:
    """How much slower than idle this machine runs now (1-minute load per core, 1 to 4): time limits meant for an
    idle machine are multiplied by it, so a busy shared machine does not fail a healthy run."""
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 1.0
    return min(MAX_LOAD_SCALE, max(1.0, load))


@dataclass
class RunResult:
    returncode: Optional[int]  # None when the run was killed at the time limit
    output: str
    elapsed: float
    timed_out: bool
    limit: float = 0.0  # the time limit the run had (the idle-machine limit times load_scale())

    def describe(self) -> str:
        tail = self.output[-6000:]
        return (f"returncode={self.returncode} timed_out={self.timed_out} elapsed={self.elapsed:.1f}s "
                f"limit={self.limit:.0f}s\n{tail}")


def worker_env(extra: Optional[dict[str, str]] = None, pythonpath: Sequence[str] = ()) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONWARNINGS="ignore",
        PYTHONFAULTHANDLER="1",  # a rank killed by a signal prints where it was (a bare SIGABRT says nothing)
    )
    # The transformers 4.37.2 overlay (PYTHONPATH) must reach the workers; the repository must be importable too.
    paths = [*map(str, pythonpath), str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra or {})
    return env


def run_torchrun(
    script: str | os.PathLike,
    *args: str,
    nproc: int = 2,
    timeout: float = 120.0,
    env: Optional[dict[str, str]] = None,
    pythonpath: Sequence[str] = (),
) -> RunResult:
    """Run `torchrun --nproc_per_node nproc script args` and wait at most `timeout * load_scale()` seconds
    (`timeout` is the limit on an idle machine).

    `pythonpath` entries go first on the workers' PYTHONPATH. The run gets its own session, so on timeout the whole
    process group (agent and every rank) is killed: a hung collective can fail the test, never hang it. A run whose
    port was taken before torchrun bound it starts again on another port (twice at most)."""
    limit = timeout * load_scale()
    for attempt in range(3):
        result = _run_once(script, args, nproc, limit, env, pythonpath)
        if result.returncode in (0, None) or not any(text in result.output for text in PORT_TAKEN):
            break
    return result


def _run_once(script: str | os.PathLike, args: Sequence[str], nproc: int, limit: float,
              env: Optional[dict[str, str]], pythonpath: Sequence[str]) -> RunResult:
    command = [
        *TORCHRUN,
        "--nnodes", "1",
        "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()),
        "--max-restarts", "0",
        "--monitor-interval", "0.5",
    ]
    command += [str(script), *map(str, args)]
    start = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=str(REPO_ROOT),
        env=worker_env(env, pythonpath),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=limit)
        return RunResult(process.returncode, output, time.monotonic() - start, False, limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return RunResult(None, output, time.monotonic() - start, True, limit)
    finally:
        if process.poll() is None:  # an interrupted test (Ctrl-C) must not leave ranks behind
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def read_rank_results(out_dir: Path, nproc: int) -> list[dict[str, Any]]:
    """Each rank's JSON result, in rank order; a rank that wrote none gets an empty dict."""
    results = []
    for rank in range(nproc):
        path = Path(out_dir) / f"rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {})
    return results
