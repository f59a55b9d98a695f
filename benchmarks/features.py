"""Feature extraction throughput: the `llava-evaclip features` pipeline against the bare tower, decoding workers,
ranks, bytes on disk, and LLaVA stage-1 step time from cached features.

    python -m benchmarks.features              # 64 JPEGs of 640x480; EVA02-CLIP-B-16 (random weights) and a tiny tower
    python -m benchmarks.features --quick      # 16 images, one repetition: a smoke run

For each model, in one process and round-robin over `--reps` repetitions (medians reported):
- bare: the tower's forward on the same batches, pixels decoded and preprocessed beforehand;
- pipeline with 0, 1 and 2 DataLoader workers (`llava_evaclip.features.iter_features`: decode, preprocess, forward).
Then `torchrun --nproc_per_node 1|2 -m llava_evaclip features ... --format shards` (images/s over all ranks, from the
run's summary: model loading excluded), bytes on disk per image for `--format files` and `--format shards` against the
raw tensor bytes, and the time of a LLaVA stage-1 training step (a tiny Llama with the B-16 tower, projector trained)
with the tower computing the features against the features read from the store. The tiny tower stands in for a
GPU-speed model, where decoding is the whole cost. Results: benchmarks/results/features.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"


def make_images(directory: Path, count: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):  # smooth noise compresses like a photo rather than like white noise
        small = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
        path = directory / f"{index:03d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def save_tower(kind: str, directory: Path) -> str:
    import torch

    from llava_evaclip import EvaCLIPVisionConfig, EvaCLIPVisionModel
    from llava_evaclip.processing import build_image_processor

    if kind == "tiny":
        config = EvaCLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=224, patch_size=32, hidden_act="silu", use_rope=True,
                                     use_swiglu=True, use_sub_layernorm=True)
    else:
        config = EvaCLIPVisionConfig.from_preset(kind)
    torch.manual_seed(0)
    EvaCLIPVisionModel(config).save_pretrained(directory)
    build_image_processor(config).save_pretrained(directory)
    return str(directory)


def median_time(function: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(tower_dir: str, paths: list[Path], batch_size: int, reps: int) -> dict[str, Any]:
    """Images/s: bare forward on pre-decoded batches, and the pipeline with 0, 1, 2 workers (round-robin)."""
    import torch

    from llava_evaclip import features

    tower = features.load_tower(tower_dir, select_layer=-2, select_feature="patch")
    items, _ = features.find_images([str(path.parent) for path in paths[:1]])
    items = items[: len(paths)]
    dataset = features.ImageDataset(items, tower.image_processor)
    pixels = torch.stack([dataset[index][1] for index in range(len(items))])
    batches = pixels.split(batch_size)

    def bare() -> None:
        with torch.no_grad():
            for batch in batches:
                tower(batch)

    def pipeline(workers: int) -> Callable[[], None]:
        return lambda: sum(1 for _ in features.iter_features(tower, items, batch_size, workers))

    contenders = {"bare": bare, "workers_0": pipeline(0), "workers_1": pipeline(1), "workers_2": pipeline(2)}
    bare()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, function in contenders.items():
            times[name].append(median_time(function, 1))
    rates = {name: len(items) / statistics.median(values) for name, values in times.items()}
    return {"images": len(items), "batch_size": batch_size, "images_per_s": rates,
            "ratio_to_bare": {name: rates[name] / rates["bare"] for name in rates},
            "workers_2_over_0": rates["workers_2"] / rates["workers_0"]}


def run_ranks(tower_dir: str, image_dir: Path, out: Path, nproc: int, batch_size: int, fmt: str = "shards") -> float:
    """`torchrun -m llava_evaclip features` on `nproc` CPU ranks; images/s from rank 0's summary."""
    from tests._dist.runner import free_port

    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)), PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "llava_evaclip", "features",
               str(image_dir), "--model", tower_dir, "--out", str(out), "--format", fmt, "--batch-size",
               str(batch_size), "--device", "cpu", "--shard-size", "64"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), timeout=1800)
    match = re.search(r"([\d.]+) img/s", result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"ranks={nproc} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return float(match.group(1))


def disk_bytes(tower_dir: str, image_dir: Path, root: Path, count: int) -> dict[str, Any]:
    from llava_evaclip.cli import main
    from llava_evaclip.features import FeatureStore

    sizes = {}
    for fmt in ("files", "shards"):
        out = root / f"disk_{fmt}"
        main(["features", str(image_dir), "--model", tower_dir, "--out", str(out), "--format", fmt, "--dtype",
              "float16", "--shard-size", "1024"])
        sizes[fmt] = sum(path.stat().st_size for path in out.rglob("*") if path.is_file()) / count
    store = FeatureStore(root / "disk_shards")
    tensor = store[next(iter(store))]
    raw = tensor.numel() * tensor.element_size()
    return {"raw_bytes_per_image": raw, "files_bytes_per_image": sizes["files"],
            "shards_bytes_per_image": sizes["shards"], "files_over_raw": sizes["files"] / raw,
            "shards_over_raw": sizes["shards"] / raw, "dtype": "float16", "shape": list(tensor.shape)}


def stage1_step(tower_dir: str, image_dir: Path, store_dir: Path, reps: int, batch_size: int) -> dict[str, Any]:
    """Forward + backward of a LLaVA stage-1 step (tiny Llama, projector trained): tower against cached features."""
    import types

    import torch
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM

    from llava_evaclip import launch
    from llava_evaclip.features import FeatureStore

    launch.prepare_llava("llava.train.train")
    torch.manual_seed(0)
    model = LlavaLlamaForCausalLM(LlavaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    args = types.SimpleNamespace(vision_tower=tower_dir, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                                 pretrain_mm_mlp_adapter=None, mm_patch_merge_type="flat",
                                 mm_projector_type="mlp2x_gelu")
    model.get_model().initialize_vision_modules(args)
    model.requires_grad_(False)
    model.get_model().mm_projector.requires_grad_(True)
    tower = model.get_vision_tower()
    store = FeatureStore(store_dir)
    keys = list(store)[:batch_size]
    from llava_evaclip.features import open_rgb

    pixels = torch.cat([tower.image_processor([open_rgb(str(image_dir / key))], return_tensors="pt")["pixel_values"]
                        for key in keys])
    cached = torch.stack([store[key].float() for key in keys])
    input_ids = torch.randint(3, 128, (batch_size, 24))
    input_ids[:, 1] = IMAGE_TOKEN_INDEX
    labels = input_ids.clone()
    labels[:, :2] = -100

    def step(images: Any) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            model(input_ids=input_ids, labels=labels, images=images).loss.backward()
        return run

    original_forward = tower.forward
    run_tower = step(pixels)

    def run_cached() -> None:
        tower.forward = lambda images: images  # what --vision_feature_cache installs
        try:
            step(cached)()
        finally:
            tower.forward = original_forward

    run_tower()
    run_cached()
    tower_times, cached_times = [], []
    for _ in range(reps):
        tower_times.append(median_time(run_tower, 1))
        cached_times.append(median_time(run_cached, 1))
    tower_s, cached_s = statistics.median(tower_times), statistics.median(cached_times)
    return {"batch_size": batch_size, "tower_step_s": tower_s, "cached_step_s": cached_s,
            "speedup": tower_s / cached_s}


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = [f"# Feature extraction ({results['machine']}, {results['images']} JPEGs of 640x480, CPU)", ""]
    lines += ["| model | bare img/s | 0 workers | 1 worker | 2 workers | 2 workers / 0 | 0 workers / bare | "
              "1 rank | 2 ranks |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, model in results["models"].items():
        rates = model["throughput"]["images_per_s"]
        lines.append(f"| {name} | {rates['bare']:.1f} | {rates['workers_0']:.1f} | {rates['workers_1']:.1f} | "
                     f"{rates['workers_2']:.1f} | {model['throughput']['workers_2_over_0']:.2f} | "
                     f"{model['throughput']['ratio_to_bare']['workers_0']:.2f} | "
                     f"{model['ranks'].get('1', float('nan')):.1f} | {model['ranks'].get('2', float('nan')):.1f} |")
    disk = results["disk"]
    lines += ["", f"Bytes per image ({disk['dtype']} {disk['shape']}): raw {disk['raw_bytes_per_image']:.0f}, files "
              f"{disk['files_bytes_per_image']:.0f} ({disk['files_over_raw']:.3f}x), shards "
              f"{disk['shards_bytes_per_image']:.0f} ({disk['shards_over_raw']:.4f}x)."]
    step = results.get("stage1_step")
    if step:
        lines += ["", f"LLaVA stage-1 step (tiny Llama, B-16 tower, batch {step['batch_size']}): tower "
                  f"{step['tower_step_s'] * 1000:.0f} ms, cached features {step['cached_step_s'] * 1000:.0f} ms "
                  f"({step['speedup']:.1f}x)."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["tiny", "EVA02-CLIP-B-16"])
    parser.add_argument("--quick", action="store_true", help="16 images, one repetition, no ranks")
    parser.add_argument("--name", default="features")
    args = parser.parse_args()
    if args.quick:
        args.images, args.reps = 16, 1
    import torch

    results: dict[str, Any] = {"images": args.images, "reps": args.reps, "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, "
                               f"{os.cpu_count()} cores", "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-features-") as temp:
        root = Path(temp)
        image_dir = root / "images"
        image_dir.mkdir()
        paths = make_images(image_dir, args.images)
        for name in args.models:
            tower_dir = save_tower(name, root / f"tower_{name}")
            model: dict[str, Any] = {"throughput": throughput(tower_dir, paths, args.batch_size, args.reps),
                                     "ranks": {}}
            if not args.quick:
                for nproc in (1, 2):
                    model["ranks"][str(nproc)] = run_ranks(tower_dir, image_dir, root / f"ranks_{name}_{nproc}",
                                                           nproc, args.batch_size)
            results["models"][name] = model
            print(json.dumps({name: model}, indent=1), flush=True)
            if name != "tiny":
                results["disk"] = disk_bytes(tower_dir, image_dir, root, args.images)
                results["stage1_step"] = stage1_step(tower_dir, image_dir, root / "disk_shards", args.reps, 4)
        if "disk" not in results:
            results["disk"] = disk_bytes(save_tower("tiny", root / "tower_tiny"), image_dir, root, args.images)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, RESULTS / f"{args.name}.md")
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
