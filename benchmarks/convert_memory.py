"""Peak memory and wall time of `convert` on a full-size EVA02-CLIP-L-14-336 checkpoint (~428M parameters).

The checkpoint is written first with BAAI's own code (consisid_eva_clip's CustomCLIP, random weights, release layout),
then converted in a fresh child process whose peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which includes
torch / transformers themselves) is compared with the checkpoint's size. Goal: peak RSS <= 2.2x the checkpoint bytes;
the converter memory-maps the checkpoint, builds the model on the meta device and assigns the tensors, so the
weights are held once.

    python benchmarks/convert_memory.py                 # results -> benchmarks/results/convert_memory.json
    python benchmarks/convert_memory.py --dtype float16 # also time a conversion to half precision

Results are merged into the JSON per transformers version, so running it on both lines keeps both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCH = "EVA02-CLIP-L-14-336"
GOAL_RATIO = 2.2
RESULTS = Path(__file__).resolve().parent / "results" / "convert_memory.json"


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child_write(checkpoint: str, checkpoint_dtype: str) -> dict:
    """Write the release-layout checkpoint with BAAI's code (fast random init: values do not matter here)."""
    import copy

    import torch

    import consisid_eva_clip.eva_vit_model as eva_vit_model
    from consisid_eva_clip.model import CustomCLIP
    from llava_evaclip.presets import BAAI_MODEL_CONFIGS

    eva_vit_model.trunc_normal_ = lambda tensor, std=1.0, **_: torch.nn.init.normal_(tensor, std=std)
    model_cfg = copy.deepcopy(BAAI_MODEL_CONFIGS[ARCH])
    model_cfg["vision_cfg"].update(eva_model_name="eva-clip-l-14-336", xattn=False, fusedLN=False, drop_path_rate=0.0)
    model_cfg["text_cfg"].update(xattn=False, fusedLN=False)
    model = CustomCLIP(**model_cfg).to(getattr(torch, checkpoint_dtype))
    torch.save(model.state_dict(), checkpoint)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def child_convert(checkpoint: str, out: str, dtype: str) -> dict:
    import torch  # noqa: F401  (imported before the baseline so it counts as baseline, like the CLI)
    import transformers

    from llava_evaclip.convert import convert_checkpoint

    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    result = convert_checkpoint(checkpoint, out, arch=ARCH, dtype=dtype)
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 2), "peak_rss_bytes": _peak_rss_bytes(), "baseline_rss_bytes": baseline,
            "parameters": result.num_parameters, "transformers": transformers.__version__,
            "output_bytes": sum(os.path.getsize(path) for path in result.files)}


def run_child(*args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="where the checkpoint and output go (default: a temp dir)")
    parser.add_argument("--checkpoint-dtype", default="float32", choices=("float32", "float16"),
                        help="dtype of the written BAAI checkpoint (default: float32)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="--dtype of the conversion (default: float32)")
    parser.add_argument("--results", default=str(RESULTS), help="JSON file the results are merged into")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, *rest = args.child
        result = child_write(*rest) if kind == "write" else child_convert(*rest)
        print(json.dumps(result))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="evaclip-convert-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / f"EVA02_CLIP_L_336_psz14_{args.checkpoint_dtype}.pt"
    out = workdir / "converted"
    try:
        written = run_child("write", str(checkpoint), args.checkpoint_dtype)
        shutil.rmtree(out, ignore_errors=True)
        converted = run_child("convert", str(checkpoint), str(out), args.dtype)
        checkpoint_bytes = checkpoint.stat().st_size
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    ratio = converted["peak_rss_bytes"] / checkpoint_bytes
    record = {
        "arch": ARCH,
        "parameters": written["parameters"],
        "checkpoint_dtype": args.checkpoint_dtype,
        "output_dtype": args.dtype,
        "checkpoint_bytes": checkpoint_bytes,
        "output_bytes": converted["output_bytes"],
        "wall_s": converted["wall_s"],
        "peak_rss_bytes": converted["peak_rss_bytes"],
        "baseline_rss_bytes": converted["baseline_rss_bytes"],
        "peak_rss_over_checkpoint": round(ratio, 3),
        "goal_ratio": GOAL_RATIO,
        "meets_goal": ratio <= GOAL_RATIO,
        "transformers": converted["transformers"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, "benchmarks/convert_memory.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results[f"transformers-{record['transformers']}/{args.checkpoint_dtype}->{args.dtype}"] = record
    staging = results_path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(staging, results_path)
    gib = 1024**3
    print(f"{ARCH}: {written['parameters'] / 1e6:.1f}M params, checkpoint {checkpoint_bytes / gib:.2f} GiB "
          f"({args.checkpoint_dtype}) -> {args.dtype}: {converted['wall_s']:.1f} s, peak RSS "
          f"{converted['peak_rss_bytes'] / gib:.2f} GiB = {ratio:.2f}x the checkpoint (goal <= {GOAL_RATIO}x; "
          f"imports alone {converted['baseline_rss_bytes'] / gib:.2f} GiB) -> {results_path}")


if __name__ == "__main__":
    main()
