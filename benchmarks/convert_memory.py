"""Peak memory and time of `convert` on a checkpoint larger than a quarter of memory: EVA-CLIP-8B's vision tower.

The checkpoint (random values, fp32 like BAAI's release) has exactly the keys and shapes of BAAI's EVA-CLIP-8B
`visual` tower — taken from BAAI's own code (`eva_clip` of the 18B release, built with empty weights) — at width
4096, head width 128, MLP 20480, RMSNorm, no q/k/v bias, with the depth cut so the file is >= 6 GB (7 of 32 layers:
6.6 GB). It is written tensor by tensor from file-backed storages, so the generator does not hold it in memory either.
Then, in fresh child processes, alternating so that both see the same machine (it is shared; a `cp` timed once and a
conversion timed minutes later measured the load in between more than either):

- `cp` of the checkpoint (the same page-cache state as the conversion that follows it);
- `convert --vision-only` to fp32 and to bf16, whose peak RSS (`ru_maxrss`, including torch / transformers themselves)
  is compared with the checkpoint size. Goals: peak RSS <= 0.25x the checkpoint, wall time <= 3x the `cp`.

Each of the `--repeats` rounds times, for each output dtype, a `cp` and then the conversion, with a `sync` (untimed)
before every timed run and the written copy or output deleted right after it, so no run pays for the previous one's
dirty pages. The time ratio is the median conversion over the median of all the `cp` runs; the peak RSS is the
largest of the rounds.

    python -m benchmarks.convert_memory --repeats 3 --overwrite   # -> benchmarks/results/convert_memory.json
    python -m benchmarks.convert_memory --layers 1 --no-save   # a quick check (1 layer, ~1 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = os.environ.get(
    "EVACLIP_18B_REFERENCE", str(Path(__file__).resolve().parents[2] / "shared" / "reference" / "eva_clip_18b"))
MODEL_CONFIG = "EVA-CLIP-8B"
GOAL_RSS_RATIO = 0.25
GOAL_TIME_RATIO = 3.0
RESULTS = Path(__file__).resolve().parent / "results" / "convert_memory.json"


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def baai_model_config(layers: int) -> dict:
    with open(Path(REFERENCE) / "eva_clip" / "model_configs" / f"{MODEL_CONFIG}.json", encoding="utf-8") as handle:
        model_cfg = json.load(handle)
    model_cfg["vision_cfg"].update(layers=layers, xattn=False)
    return model_cfg


def child_write(checkpoint: str, layers: str) -> dict:
    """BAAI's `visual` state-dict layout with random values, one file-backed storage per tensor (page cache, not
    process memory), saved with torch.save as BAAI's release files are."""
    import torch
    from accelerate import init_empty_weights

    sys.path.insert(0, REFERENCE)
    import eva_clip.model as baai

    model_cfg = baai_model_config(int(layers))
    with init_empty_weights():
        visual = baai._build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"])
    shapes = {f"visual.{key}": tuple(tensor.shape) for key, tensor in visual.state_dict().items()}
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=Path(checkpoint).parent))
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    try:
        for index, (key, shape) in enumerate(shapes.items()):
            numel = int(torch.Size(shape).numel())
            flat = torch.from_file(str(scratch / str(index)), shared=True, size=numel, dtype=torch.float32)
            for start in range(0, numel, 1 << 24):
                flat[start : start + (1 << 24)].normal_(std=0.02, generator=generator)
            state_dict[key] = flat.view(shape)
        torch.save(state_dict, checkpoint)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"parameters": sum(tensor.numel() for tensor in state_dict.values()), "tensors": len(state_dict)}


def child_convert(checkpoint: str, out: str, arch: str, dtype: str) -> dict:
    import torch  # noqa: F401  (imported before the baseline so it counts as baseline, like the CLI)
    import transformers

    from llava_evaclip.convert import convert_checkpoint

    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    result = convert_checkpoint(checkpoint, out, arch=arch, vision_only=True, dtype=dtype)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "peak_rss_bytes": _peak_rss_bytes(), "baseline_rss_bytes": baseline,
            "parameters": result.num_parameters, "transformers": transformers.__version__,
            "output_bytes": sum(os.path.getsize(path) for path in result.files),
            "files": [os.path.basename(path) for path in result.files]}


def run_child(*args: str) -> dict:
    from llava_evaclip.cli import CLIError

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-m", "benchmarks.convert_memory", "--child", *args],
                               capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        reason = (completed.stderr.strip().splitlines() or ["no output"])[-1]  # the exception's own line
        raise CLIError(f"child {args[0]} failed (exit status {completed.returncode}): {reason}")
    return json.loads(lines[-1])


def _settle() -> None:
    """Write back what earlier runs left dirty, outside any timed run."""
    os.sync()


def time_cp(checkpoint: Path, target: Path) -> float:
    _settle()
    start = time.perf_counter()
    subprocess.run(["cp", str(checkpoint), str(target)], check=True)
    wall = time.perf_counter() - start
    target.unlink()
    return wall


def time_convert(checkpoint: Path, out: Path, arch: Path, dtype: str) -> dict:
    _settle()
    try:
        return run_child("convert", str(checkpoint), str(out), str(arch), dtype)
    finally:
        shutil.rmtree(out, ignore_errors=True)


MAX_LAYERS = 32  # EVA-CLIP-8B's depth


def build_parser() -> argparse.ArgumentParser:
    from llava_evaclip.cli import OneLineErrorParser

    parser = OneLineErrorParser(prog="python -m benchmarks.convert_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=7, help="vision layers kept of 32 (default 7: a 6.6 GB file)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="output dtypes to convert to")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of cp + conversions; medians are reported")
    parser.add_argument("--workdir", default=None,
                        help="folder in which a fresh temp dir takes the checkpoint and outputs (default: the system's "
                             "temp folder); that temp dir is removed at the end, nothing else there is touched")
    parser.add_argument("--results", default=str(RESULTS), help="JSON file the results are written to")
    parser.add_argument("--overwrite", action="store_true", help="replace --results if it exists")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return parser


def check_arguments(args: argparse.Namespace) -> list[str]:
    """Every argument problem, found before the minutes of writing a multi-GB checkpoint; returns the dtypes."""
    from llava_evaclip.cli import CLIError
    from llava_evaclip.commands import _common
    from llava_evaclip.commands.convert import DTYPE_CHOICES

    if args.repeats < 1:
        raise CLIError(f"--repeats must be at least 1, got {args.repeats}")
    if not 1 <= args.layers <= MAX_LAYERS:
        raise CLIError(f"--layers must be 1 to {MAX_LAYERS} (EVA-CLIP-8B's depth), got {args.layers}")
    dtypes = [part.strip() for part in args.dtypes.split(",")]
    unknown = [dtype for dtype in dtypes if dtype not in DTYPE_CHOICES]
    if unknown or len(set(dtypes)) != len(dtypes):
        raise CLIError(f"--dtypes {args.dtypes!r}: expected distinct names among {', '.join(DTYPE_CHOICES)}")
    if args.workdir is not None:
        if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
            raise CLIError(f"--workdir {args.workdir} is a file, not a folder")
        problem = _common.unwritable_folder(args.workdir)
        if problem is not None:
            raise CLIError(f"--workdir {args.workdir}: {problem}")
    if not args.no_save:
        _common.check_output_file(args.results, args.overwrite, option="--results")
    return dtypes


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.convert_memory`: errors, Ctrl-C and SIGTERM end it with one line (`run_command`)."""
    from llava_evaclip_cli import import_cli

    return import_cli().run_command(lambda: "benchmarks.convert_memory", lambda: _run(build_parser().parse_args(argv)))


def _run(args: argparse.Namespace) -> int:
    if args.child:
        kind, *rest = args.child
        result = child_write(*rest) if kind == "write" else child_convert(*rest)
        print(json.dumps(result))
        return 0
    dtypes = check_arguments(args)

    # A fresh dir, always removed: the checkpoint, its copy and the outputs never meet a file of the user's.
    if args.workdir is not None:
        os.makedirs(args.workdir, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="evaclip-convert-bench-", dir=args.workdir))
    checkpoint = workdir / f"EVA-CLIP-8B-visual-{args.layers}-layers.pt"
    arch = workdir / "arch.json"
    records = []
    try:
        arch.write_text(json.dumps(baai_model_config(args.layers)))
        written = run_child("write", str(checkpoint), str(args.layers))
        checkpoint_bytes = checkpoint.stat().st_size
        cp_runs: list[float] = []
        converts: dict[str, list[dict]] = {dtype: [] for dtype in dtypes}
        for _ in range(args.repeats):  # cp and a conversion, alternating
            for dtype in dtypes:
                cp_runs.append(time_cp(checkpoint, workdir / "copy.pt"))  # ratios from unrounded times
                converts[dtype].append(time_convert(checkpoint, workdir / f"converted-{dtype}", arch, dtype))
        cp_s = statistics.median(cp_runs)
        for dtype, runs in converts.items():
            convert_s = statistics.median(run["wall_s"] for run in runs)
            peak = max(run["peak_rss_bytes"] for run in runs)
            rss_ratio = peak / checkpoint_bytes
            time_ratio = convert_s / cp_s
            records.append({
                "layout": f"{MODEL_CONFIG} visual, {args.layers} of 32 layers (BAAI key names and shapes)",
                "parameters": written["parameters"], "tensors": written["tensors"], "checkpoint_dtype": "float32",
                "output_dtype": dtype, "checkpoint_bytes": checkpoint_bytes, "output_bytes": runs[0]["output_bytes"],
                "output_files": runs[0]["files"], "repeats": args.repeats,
                "convert_wall_s": round(convert_s, 2), "cp_wall_s": round(cp_s, 2),
                "convert_runs_s": [round(run["wall_s"], 2) for run in runs],
                "cp_runs_s": [round(seconds, 2) for seconds in cp_runs],
                "time_over_cp": round(time_ratio, 2), "goal_time_over_cp": GOAL_TIME_RATIO,
                "peak_rss_bytes": peak, "baseline_rss_bytes": max(run["baseline_rss_bytes"] for run in runs),
                "peak_rss_over_checkpoint": round(rss_ratio, 3), "goal_rss_over_checkpoint": GOAL_RSS_RATIO,
                "meets_goals": rss_ratio <= GOAL_RSS_RATIO and time_ratio <= GOAL_TIME_RATIO,
                "transformers": runs[0]["transformers"],
            })
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    gib = 1024**3
    for record in records:
        print(f"{record['layout']}: {record['parameters'] / 1e9:.2f}B params, checkpoint "
              f"{record['checkpoint_bytes'] / gib:.2f} GiB -> {record['output_dtype']}: convert "
              f"{record['convert_wall_s']:.1f} s = {record['time_over_cp']:.2f}x cp ({record['cp_wall_s']:.1f} s; "
              f"medians of {record['convert_runs_s']} and {record['cp_runs_s']}; "
              f"goal <= {GOAL_TIME_RATIO}x), peak RSS {record['peak_rss_bytes'] / gib:.2f} GiB = "
              f"{record['peak_rss_over_checkpoint']:.3f}x the checkpoint (goal <= {GOAL_RSS_RATIO}x; imports alone "
              f"{record['baseline_rss_bytes'] / gib:.2f} GiB)")
    if args.no_save:
        return 0
    results = {
        "records": records,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / gib, 1)},
        "command": " ".join(["python -m benchmarks.convert_memory", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    from llava_evaclip.commands._common import atomic_write

    atomic_write(args.results, lambda temp: Path(temp).write_text(json.dumps(results, indent=2) + "\n"),
                 replace=args.overwrite)
    print(f"-> {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
