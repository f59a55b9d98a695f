"""Worker: `llava-evaclip features` on this rank, as `torchrun -m llava_evaclip features ...` runs it.

Run by tests/test_features.py. With FEATURES_CRASH_RANK=R and FEATURES_CRASH_AFTER_SHARDS=N, rank R dies hard
(os._exit, no clean-up) right after writing its N-th shard and index fragment: a rank killed mid-way."""

from __future__ import annotations

import os
import sys


def main() -> int:
    crash_rank = int(os.environ.get("FEATURES_CRASH_RANK", "-1"))
    if crash_rank == int(os.environ.get("RANK", "0")):
        from llava_evaclip import features

        after = int(os.environ["FEATURES_CRASH_AFTER_SHARDS"])
        flush = features.ShardWriter.flush

        def flush_then_die(self) -> None:
            flush(self)
            if self.count >= after:
                os._exit(9)

        features.ShardWriter.flush = flush_then_die
    from llava_evaclip.cli import main as cli_main

    return cli_main(["features", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
