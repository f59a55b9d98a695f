"""Worker: stream an EVA-CLIP checkpoint into a ZeRO-3 partitioned tower and record rank memory and the loaded values.

Run by tests/test_zero3_stream.py as `torchrun --nproc_per_node 2 zero3_stream.py --case CASE --out OUT`. CASE holds
`large/` (a few hundred MB, one safetensors file), `tiny/`, `full/` (an EvaCLIPModel), `mismatched/`,
`corrupt_index/` and `truncated/`. Each rank records its peak RSS growth (VmHWM, reset
through /proc/self/clear_refs) over the streamed load and over transformers' own ZeRO-3 loader on the same checkpoint,
and how far the gathered weights are from the checkpoint read by safetensors on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
from pathlib import Path
from typing import Iterator

import torch
from common import Results, distributed_run, run_worker, zero3_config


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def _reset_peak() -> int:
    """Free what earlier steps left (glibc keeps freed pages), reset VmHWM to the current RSS; returns the RSS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_kib("VmRSS") * 1024


def _peak_growth(load) -> tuple[object, int]:
    before = _reset_peak()
    model = load()
    return model, _status_kib("VmHWM") * 1024 - before


_COLLECTIVES = ("broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_reduce")


@contextlib.contextmanager
def _largest_collective_tensor() -> Iterator[dict[str, int]]:
    """The most bytes any one tensor carried through a broadcast / all-gather / all-reduce of torch.distributed (what
    DeepSpeed's comm layer ends in) inside the block: a whole parameter sent to the ranks shows here."""
    from torch.distributed import distributed_c10d  # broadcast_object_list calls its own module's broadcast

    record = {"bytes": 0, "calls": 0}
    namespaces = (torch.distributed, distributed_c10d)
    originals = {(namespace, name): getattr(namespace, name)
                 for namespace in namespaces for name in _COLLECTIVES if hasattr(namespace, name)}

    def spy(function):
        def wrapper(*args, **kwargs):
            tensors = [*args[:2], *kwargs.values()]
            flat = [t for item in tensors for t in (item if isinstance(item, (list, tuple)) else [item])]
            sizes = [t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor)]
            record["bytes"] = max([record["bytes"], *sizes])
            record["calls"] += 1
            return function(*args, **kwargs)

        return wrapper

    for (namespace, name), function in originals.items():
        setattr(namespace, name, spy(function))
    try:
        yield record
    finally:
        for (namespace, name), function in originals.items():
            setattr(namespace, name, function)


def _max_differences(model: torch.nn.Module, checkpoint: Path, dtype: torch.dtype) -> dict[str, float]:
    from safetensors.torch import load_file

    from llava_evaclip import zero

    reference = load_file(checkpoint / "model.safetensors")
    gathered = zero.gathered_state_dict(model)
    missing = sorted(set(gathered) - set(reference))
    if missing:
        raise AssertionError(f"gathered keys not in the checkpoint: {missing}")
    return {key: float((value.float() - reference[key].to(dtype).float()).abs().max()) for key, value in gathered.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    with distributed_run(args.out) as results:
        import deepspeed
        import transformers
        from transformers import PreTrainedModel
        from transformers.integrations import HfDeepSpeedConfig

        from llava_evaclip import EvaCLIPVisionModel, zero

        dtype_kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        large, tiny = args.case / "large", args.case / "tiny"
        hf_ds_config = HfDeepSpeedConfig(zero3_config())

        # 1. dtype like transformers' own ZeRO-3 loader (DeepSpeed's config decides the partitions' dtype): a dtype,
        # "auto", None; and a full CLIP dir as LLaVA points at (the text tower's keys are not the vision model's).
        # Also the warm-up: the first load imports and sets up what later loads reuse.
        original_load = PreTrainedModel.from_pretrained.__func__
        for name, requested in (("bfloat16", torch.bfloat16), ("auto", "auto"), ("none", None)):
            model = EvaCLIPVisionModel.from_pretrained(tiny, **{dtype_kwarg: requested})
            reference = original_load(EvaCLIPVisionModel, tiny, **{dtype_kwarg: requested})
            (dtype,) = {param.ds_tensor.dtype for param in model.parameters()}
            differences = _max_differences(model, tiny, dtype)
            results[f"dtype_{name}"] = {
                "dtype": str(dtype), "transformers_dtypes": sorted({str(p.ds_tensor.dtype) for p in reference.parameters()}),
                "max_abs_difference": max(differences.values()),
                "num_partitioned": zero.partition_stats(model).num_partitioned,
            }
        model, info = EvaCLIPVisionModel.from_pretrained(args.case / "full", output_loading_info=True)
        differences = _max_differences(model, args.case / "full", torch.float32)
        results["full"] = {"max_abs_difference": max(differences.values()), "num_tensors": len(differences),
                           "missing_keys": info["missing_keys"]}
        del model, reference

        # 2. The streamed load (what EvaCLIPVisionModel.from_pretrained does under ZeRO-3), then transformers' own
        # ZeRO-3 loader on the same checkpoint, each from a freshly reset peak.
        from deepspeed.runtime.zero.partition_parameters import Init

        zero_init_param = Init._zero_init_param
        with _largest_collective_tensor() as streamed_collectives:
            model, streamed = _peak_growth(lambda: EvaCLIPVisionModel.from_pretrained(large))
        stats = zero.partition_stats(model).as_dict()
        differences = _max_differences(model, large, torch.float32)
        results["large"] = {**stats, "streamed_peak_growth_bytes": streamed,
                            "max_abs_difference": max(differences.values()), "num_tensors": len(differences),
                            "largest_collective_bytes": streamed_collectives["bytes"],
                            "collective_calls": streamed_collectives["calls"],
                            "largest_param_bytes": max(zero.full_numel(p) * p.element_size()
                                                       for p in model.parameters()),
                            "zero_init_restored": Init._zero_init_param is zero_init_param}
        del model, differences
        with _largest_collective_tensor() as transformers_collectives:
            original, transformers_path = _peak_growth(lambda: original_load(EvaCLIPVisionModel, large))
        results["large_transformers_peak_growth_bytes"] = transformers_path
        results["large_transformers_largest_collective_bytes"] = transformers_collectives["bytes"]
        del original

        # 3. A checkpoint with a mis-shaped tensor: every rank raises the same ValueError, nobody hangs.
        with results.expect_error("mismatched"):
            EvaCLIPVisionModel.from_pretrained(args.case / "mismatched")
        # 3b. A damaged shard index and a truncated weights file (rank 0 reads them): the same on every rank.
        for name in ("corrupt_index", "truncated"):
            with results.expect_error(name):
                EvaCLIPVisionModel.from_pretrained(args.case / name)

        # 4. A bare deepspeed.zero.Init (no transformers config) streams as well.
        del hf_ds_config
        with deepspeed.zero.Init(config_dict_or_path=zero3_config()):
            model = EvaCLIPVisionModel.from_pretrained(tiny)
        differences = _max_differences(model, tiny, torch.float32)
        results["zero_init"] = {"max_abs_difference": max(differences.values()),
                                "num_partitioned": zero.partition_stats(model).num_partitioned}


if __name__ == "__main__":
    run_worker(main)
