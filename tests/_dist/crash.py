"""Worker: one rank dies (or stalls) before a collective that the other rank has entered.

Run by tests/test_zero3.py. `--mode exit` ends rank 1 with os._exit (a hard crash: no teardown, no exception);
`--mode stall` keeps rank 1 alive but away from the collective. Rank 0 records when it
entered the all_reduce (wall clock) and whether it ever left it; the test asserts that the whole run ends, non-zero,
within a bound counted from that moment, so a slow start on a loaded machine neither fails nor hides anything.

Only the collective under test has the short `--collective-timeout` (a group of its own); joining the process group
and the readiness barrier keep the long default, since a loaded machine can start one rank much later than the other.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path

import torch
from common import distributed_run, run_worker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--mode", choices=("exit", "stall"), required=True)
    parser.add_argument("--collective-timeout", type=float, default=30.0)
    args = parser.parse_args()
    with distributed_run(args.out) as results:
        torch.distributed.barrier()  # readiness: both ranks are up before anyone fails
        results["joined"] = True
        group = torch.distributed.new_group(backend="gloo",
                                            timeout=datetime.timedelta(seconds=args.collective_timeout))
        if results.rank == 1:
            if args.mode == "exit":
                os._exit(3)
            time.sleep(600)  # stall: alive, but never joins the collective
        results["entered_collective"] = time.time()
        torch.distributed.all_reduce(torch.ones(1), group=group)
        results["left_collective"] = True


if __name__ == "__main__":
    run_worker(main)
