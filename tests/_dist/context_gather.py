"""Worker: `DistributedContext.gather` on gloo CPU ranks, started and stopped as `llava-evaclip features` does.

Run by tests/test_features_multinode.py. Records what every rank gathered, whether `all_gather_object` was used, and
whether the tensors handed to the group were still alive after the gather and released after `stop()`."""

from __future__ import annotations

import argparse
import json
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from llava_evaclip.features import DistributedContext


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    handed: list[weakref.ref] = []
    used_object_gather = []
    all_gather, all_gather_object = dist.all_gather, dist.all_gather_object

    def recording_all_gather(tensor_list, tensor, *rest, **kwargs):
        handed.extend(weakref.ref(each) for each in (*tensor_list, tensor))
        return all_gather(tensor_list, tensor, *rest, **kwargs)

    def recording_all_gather_object(*args, **kwargs):
        used_object_gather.append(True)
        return all_gather_object(*args, **kwargs)

    dist.all_gather, dist.all_gather_object = recording_all_gather, recording_all_gather_object
    context = DistributedContext.from_env()
    context.start(torch.device("cpu"))
    # Payloads of other lengths on each rank (the padding), with text that is not ASCII.
    value = {"rank": context.rank, "text": "é" * (3 + 500 * context.rank), "items": list(range(7 * context.rank))}
    gathered = context.gather(value)
    first_error = context.first_error(None if context.rank else "missing on rank 0")
    alive_before_stop = sum(ref() is not None for ref in handed)
    context.stop()
    results = {
        "rank": context.rank, "gathered": gathered, "first_error": first_error, "handed": len(handed),
        "alive_before_stop": alive_before_stop, "alive_after_stop": sum(ref() is not None for ref in handed),
        "used_all_gather_object": bool(used_object_gather), "group_left": not dist.is_initialized(),
    }
    (args.out / f"rank{context.rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
