"""Worker-side helpers: join the process group (gloo, bounded timeout), record results, always tear down."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

# A rank waiting on a peer that never comes fails after this instead of hanging (tests may shorten it).
COLLECTIVE_TIMEOUT_S = float(os.environ.get("EVACLIP_TEST_COLLECTIVE_TIMEOUT", "60"))


def zero3_config(**zero: Any) -> dict[str, Any]:
    """A CPU ZeRO-3 DeepSpeed config; batch sizes are explicit (DeepSpeed checks them against the world size)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "zero_optimization": {"stage": 3, **zero},
    }


class Results:
    """This rank's results, written atomically to `rank{N}.json` at every `save` (so a crash keeps what was done)."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.out_dir = Path(out_dir)
        self.data: dict[str, Any] = {"rank": self.rank, "world_size": self.world_size}
        self.tensors: dict[str, torch.Tensor] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def tensor(self, key: str, value: torch.Tensor) -> None:
        self.tensors[key] = value.detach().cpu().clone()

    def save(self) -> None:
        path = self.out_dir / f"rank{self.rank}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, path)
        if self.tensors:
            target = self.out_dir / f"rank{self.rank}.pt"
            tmp_pt = target.with_suffix(".pt.tmp")
            torch.save(self.tensors, tmp_pt)
            os.replace(tmp_pt, target)

    @contextlib.contextmanager
    def expect_error(self, key: str) -> Iterator[None]:
        """Record the exception a block raises (type and message) under `key`, or that it raised none."""
        try:
            yield
        except Exception as error:  # recorded for the test to judge
            self[key] = {"raised": True, "type": type(error).__name__, "message": str(error)}
        else:
            self[key] = {"raised": False}


def init_distributed() -> None:
    """Join the torchrun process group through DeepSpeed on gloo, with a bounded collective timeout."""
    import deepspeed

    deepspeed.init_distributed(
        dist_backend="gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S), verbose=False
    )


@contextlib.contextmanager
def distributed_run(out_dir: str | os.PathLike) -> Iterator[Results]:
    """init -> results -> always destroy the process group; an exception is recorded, then re-raised (exit != 0)."""
    init_distributed()
    results = Results(out_dir)
    try:
        yield results
        results["finished"] = True
    except BaseException:
        results.data["failed_at"] = time.time()  # wall clock, to compare with times the worker recorded
        results["error"] = traceback.format_exc()
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_worker(main: Callable[[], Optional[int]]) -> NoReturn:
    """Run a worker's `main`, then leave through os._exit, past the interpreter's and the C++ libraries' teardown.

    DeepSpeed keeps references to the gloo process group, so its threads (gloo_tcp_loop, pt_gloo_runloop) still run
    after destroy_process_group and the group is torn down during interpreter exit, which now and then aborted a
    rank whose results were all written ("terminate called without an active exception", SIGABRT, no Python frame;
    about 1 run of zero3_stream.py in 75 to 360 here). The tests judge the results files, so skipping that teardown
    loses nothing; an exception still prints its traceback and exits 1."""
    try:
        code = main() or 0
    except SystemExit as exit_request:
        code = exit_request.code if isinstance(exit_request.code, int) else int(exit_request.code is not None)
    except BaseException:  # reported as the interpreter would, then the same exit status
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
