"""Per-rank resident parameter memory of the EVA-CLIP vision tower loaded under DeepSpeed ZeRO-3, on 1, 2 and 4 ranks.

    DS_ACCELERATOR=cpu python -m benchmarks.zero3_memory --overwrite      # EVA02-CLIP-B-16 tower, 1/2/4 CPU ranks
    DS_ACCELERATOR=cpu python -m benchmarks.zero3_memory --ranks 1 2 --preset EVA02-CLIP-L-14
    DS_ACCELERATOR=cpu python -m benchmarks.zero3_memory --ranks 1 2 4 --preset EVA-CLIP-8B --layers 4 \
        --dtype bfloat16 --shard-mb 500 --output benchmarks/results/zero3_memory_8b.json  # 8B width, 4 layers

For each world size N the script starts `torchrun --nproc_per_node N` on itself (gloo, CPU). Every rank keeps a stage-3
`HfDeepSpeedConfig` alive and calls `EvaCLIPVisionModel.from_pretrained` on one checkpoint (random weights of the
preset, written once to a temporary directory; values do not change sizes), then reports what it holds: the bytes of
its `ds_tensor` slices (ZeRO-3 pads each parameter to a multiple of N) and the buffers (never partitioned: the RoPE
tables). Goal per rank: slices <= 1.1 / N of the full tower's parameter bytes, plus the buffers. For context it also
reports its RSS after the imports, after loading (and again once glibc's malloc_trim has returned freed pages: the
full-size tensors that construction and per-module gathering create are transient, but the allocator keeps their
pages), and its peak (rank 0 also holds the checkpoint while loading), with the peak's growth over the imports set
against the same goal. `--layers` cuts the depth (EVA-CLIP-8B's layers are 470 M parameters each) and `--dtype
bfloat16` writes and loads bf16 (with DeepSpeed's bf16 mode on). Results: benchmarks/results/zero3_memory.json.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "zero3_memory.json"
GOAL_FACTOR = 1.1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _AnonymousPeak:
    """Peak anonymous RSS (RssAnon: the process's own memory, not the checkpoint's file pages that safetensors maps
    and the kernel may drop), sampled every few milliseconds; the kernel keeps no peak of it."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    @staticmethod
    def read() -> int:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("RssAnon:"))

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> "_AnonymousPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def _rss_after_malloc_trim() -> int | None:
    """RSS once glibc has handed freed heap memory back to the OS: what the process really keeps (the transient
    full-size tensors of construction and gathering are freed, but the allocator may hold on to their pages)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return _current_rss_bytes()


# --------------------------------------------------------------------------------------------------------------------
# Worker (one rank)
# --------------------------------------------------------------------------------------------------------------------


def worker(checkpoint: Path, part: Path, dtype_name: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import transformers
    from transformers.integrations import HfDeepSpeedConfig

    from llava_evaclip import EvaCLIPVisionModel, zero

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=300), verbose=False)
    try:
        world = torch.distributed.get_world_size()
        ds_config = HfDeepSpeedConfig({
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "train_batch_size": world,
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": dtype_name == "bfloat16"},
        })
        dtype = getattr(torch, dtype_name)
        dtype_kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        rss_before = _current_rss_bytes()
        anon_before = _AnonymousPeak.read()
        start = time.perf_counter()
        with _AnonymousPeak() as anonymous:
            model = EvaCLIPVisionModel.from_pretrained(checkpoint, **{dtype_kwarg: dtype})
        load_seconds = time.perf_counter() - start
        stats = zero.partition_stats(model).as_dict()
        stats["load_seconds"] = round(load_seconds, 2)
        stats["rank"] = torch.distributed.get_rank()
        stats["rss_before_load_bytes"] = rss_before
        stats["rss_after_load_bytes"] = _current_rss_bytes()
        stats["rss_after_malloc_trim_bytes"] = _rss_after_malloc_trim()
        stats["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        stats["anonymous_peak_growth_bytes"] = anonymous.peak - anon_before
        gathered = zero.all_gather_object(stats)
        if stats["rank"] == 0:
            tmp = part.with_suffix(".tmp")
            tmp.write_text(json.dumps(gathered))
            os.replace(tmp, part)
        del model, ds_config
    finally:
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------


def write_checkpoint(preset: str, directory: Path, layers: int | None, dtype_name: str,
                     shard_bytes: int | None = None) -> dict[str, Any]:
    """Random weights of the preset (depth cut to `layers`), written tensor by tensor from a meta-device build: an
    EVA-CLIP-8B layer is 1.9 GB in fp32, so the tower is never materialised whole here either. With `shard_bytes`,
    in shards of about that size with an index, as `save_pretrained(max_shard_size=...)` writes them: rank 0 reads
    the checkpoint one shard at a time, so its peak holds one shard, not the whole tower."""
    import torch
    from safetensors.torch import save_file

    from llava_evaclip import EvaCLIPVisionConfig, EvaCLIPVisionModel

    config = EvaCLIPVisionConfig.from_preset(preset, **({"num_hidden_layers": layers} if layers else {}))
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        model = EvaCLIPVisionModel(config)
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(param.shape, generator=generator).mul_(0.02).to(dtype)
             for name, param in model.named_parameters()}
    directory.mkdir(parents=True)
    shards: list[dict[str, Any]] = [{}]
    for name, tensor in state.items():
        if shard_bytes and shards[-1] and sum(t.nbytes for t in shards[-1].values()) + tensor.nbytes > shard_bytes:
            shards.append({})
        shards[-1][name] = tensor
    if len(shards) == 1:
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for index, shard in enumerate(shards, 1):
            file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / file_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file_name))
        index_data = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2))
    config.torch_dtype = dtype_name
    config.save_pretrained(directory)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "param_bytes": sum(p.numel() * dtype.itemsize for p in model.parameters()),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
        "dtype": dtype_name,
        "hidden_size": config.hidden_size,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "checkpoint_shards": len(shards),
    }


def run_world(world: int, checkpoint: Path, workdir: Path, timeout: float, dtype_name: str) -> list[dict[str, Any]]:
    part = workdir / f"ranks{world}.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(world),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "--max-restarts", "0",
        str(Path(__file__).resolve()), "--worker", "--checkpoint", str(checkpoint), "--part", str(part),
        "--dtype", dtype_name,
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    from llava_evaclip.cli import CLIError

    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise CLIError(f"{world} ranks: no result within {timeout:.0f} s; last output: {_last_line(output)}") from None
    except BaseException:  # Ctrl-C, SIGTERM: the ranks run in their own session, out of the terminal's reach
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    if process.returncode != 0 or not part.exists():
        raise CLIError(f"{world} ranks failed (exit status {process.returncode}): {_last_line(output)}")
    return json.loads(part.read_text())


def _last_line(output: str) -> str:
    """The last non-empty line of the ranks' output (the error of a failed rank), for a one-line message."""
    return next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "no output")


def summarize(world: int, ranks: list[dict[str, Any]], full_bytes: int) -> dict[str, Any]:
    worst = max(rank["resident_bytes"] for rank in ranks)
    buffers = max(rank["buffer_bytes"] for rank in ranks)
    goal = GOAL_FACTOR * full_bytes / world + buffers
    peak_growth = max(rank["max_rss_bytes"] - rank["rss_before_load_bytes"] for rank in ranks)
    anonymous_growth = max(rank["anonymous_peak_growth_bytes"] for rank in ranks)
    return {
        "world_size": world,
        "ranks": ranks,
        "max_resident_bytes": worst,
        "max_local_param_fraction": max(rank["local_param_bytes"] for rank in ranks) / full_bytes,
        "ideal_fraction": 1 / world,
        "goal_bytes": int(goal),
        "meets_goal": worst <= goal,
        "max_peak_rss_growth_bytes": peak_growth,
        "peak_rss_growth_meets_goal": peak_growth <= goal,
        "max_anonymous_peak_growth_bytes": anonymous_growth,
    }


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.zero3_memory`: errors, Ctrl-C and SIGTERM end it with one line (`run_command`)."""
    from llava_evaclip_cli import import_cli

    return import_cli().run_command(lambda: "benchmarks.zero3_memory", lambda: _run(argv))


def _run(argv: list[str] | None) -> int:
    import math

    from llava_evaclip.cli import OneLineErrorParser
    from llava_evaclip.commands import _common

    parser = OneLineErrorParser(prog="python -m benchmarks.zero3_memory", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="EVA02-CLIP-B-16", help="vision tower preset (default: %(default)s)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="world sizes (default: 1 2 4)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per world size")
    parser.add_argument("--layers", type=int, help="cut the tower to this many layers (default: the preset's)")
    parser.add_argument("--shard-mb", type=int, help="write the checkpoint in shards of about this many MiB")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights written and loaded in this dtype (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.checkpoint, args.part, args.dtype)
        return 0
    if any(world < 1 for world in args.ranks) or len(set(args.ranks)) != len(args.ranks):
        parser.error("--ranks must be distinct positive integers")
    most = 4 * (os.cpu_count() or 1)  # each rank imports torch and deepspeed (~0.8 GB): more would swamp the machine
    if max(args.ranks) > most:
        parser.error(f"--ranks {max(args.ranks)}: at most {most} ranks (4 per core) on this machine")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.shard_mb is not None and args.shard_mb < 1:
        parser.error(f"--shard-mb must be at least 1, got {args.shard_mb}")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be a positive integer")
    from llava_evaclip import list_presets

    if args.preset not in list_presets():
        parser.error(f"unknown --preset {args.preset!r}; choose one of {', '.join(list_presets())}")
    _common.check_output_file(str(args.output), args.overwrite, option="--output")  # before minutes of loading

    import deepspeed
    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="zero3_memory_") as workdir:
        checkpoint = Path(workdir) / "tower"
        tower = write_checkpoint(args.preset, checkpoint, args.layers, args.dtype,
                                 args.shard_mb * 2**20 if args.shard_mb else None)
        print(f"{args.preset} vision tower ({tower['num_hidden_layers']} layers): {tower['params'] / 1e6:.1f} M "
              f"parameters, {_mib(tower['param_bytes'])} {args.dtype}, buffers {_mib(tower['buffer_bytes'])}")
        runs = []
        for world in args.ranks:
            ranks = run_world(world, checkpoint, Path(workdir), args.timeout, args.dtype)
            summary = summarize(world, ranks, tower["param_bytes"])
            runs.append(summary)
            print(f"N={world}: max per-rank resident {_mib(summary['max_resident_bytes'])} "
                  f"({summary['max_local_param_fraction']:.4f} of the parameters, ideal {1 / world:.4f}); goal "
                  f"<= {_mib(summary['goal_bytes'])}: {'met' if summary['meets_goal'] else 'NOT met'}; peak RSS growth "
                  f"{_mib(summary['max_peak_rss_growth_bytes'])}: "
                  f"{'met' if summary['peak_rss_growth_meets_goal'] else 'NOT met'}, of which anonymous (not the "
                  f"mapped checkpoint) at most {_mib(summary['max_anonymous_peak_growth_bytes'])}")
            for rank in ranks:
                trimmed = rank["rss_after_malloc_trim_bytes"]
                print(f"    rank {rank['rank']}: RSS after imports {_mib(rank['rss_before_load_bytes'])}, after load "
                      f"{_mib(rank['rss_after_load_bytes'])}"
                      + (f" ({_mib(trimmed)} once malloc_trim returned freed pages)" if trimmed else "")
                      + f", peak {_mib(rank['max_rss_bytes'])} (anonymous growth "
                      + f"{_mib(rank['anonymous_peak_growth_bytes'])})")

    result = {
        "preset": args.preset,
        "tower": tower,
        "goal": f"per-rank ds_tensor bytes + buffers <= {GOAL_FACTOR} / N * full parameter bytes + buffers (also "
                "reported: per-rank peak RSS growth over the imports against the same bound)",
        "runs": runs,
        "command": shlex.join(["DS_ACCELERATOR=cpu", "python", "-m", "benchmarks.zero3_memory", *sys.argv[1:]]),
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "backend": "gloo (CPU)",
        },
    }
    _common.atomic_write(str(args.output), lambda temp: Path(temp).write_text(json.dumps(result, indent=2) + "\n"),
                         replace=args.overwrite)
    print(f"wrote {args.output}")
    return 0 if all(run["meets_goal"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
