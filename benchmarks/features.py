"""Feature extraction throughput: the `llava-evaclip features` pipeline against the bare tower, decoding workers,
ranks, bytes on disk, and LLaVA stage-1 step time from cached features.

    python -m benchmarks.features --models EVA02-CLIP-B-16 --images 64 --reps 3    # -> results/features.{json,md}
    python -m benchmarks.features --models tiny --images 512 --reps 5 --name features_tiny512
    python -m benchmarks.features --quick      # 16 images, one repetition: a smoke run -> results/features_quick.*
    python -m benchmarks.features --scale 200000 --reps 3   # start-up and end of a run only -> features_scale_200000.*

Existing result files are never replaced without --overwrite (the run refuses before it starts); --output-dir and
--name put them elsewhere.

For each model, in one process and round-robin over `--reps` repetitions (medians reported):
- bare: the tower's forward on the same batches, pixels decoded and preprocessed beforehand;
- pipeline with 0, 1 and 2 DataLoader workers (`llava_evaclip.features.iter_features`: decode, preprocess, forward),
  as the steady rate over the last three quarters of the images (what a large dataset runs at), the whole call, and
  the start-up (time to the first batch: forking the workers and filling the first batch);
- the single-thread CPU cost per image of decoding, preprocessing and the forward, which bounds what 2 cores can do.
Then `torchrun --nproc_per_node 1|2 -m llava_evaclip features ... --format shards` (images/s over all ranks, from the
run's summary: model loading excluded), bytes on disk per image for `--format files` and `--format shards` against the
raw tensor bytes, and the time of a LLaVA stage-1 training step (a tiny Llama with the B-16 tower, projector trained)
with the tower computing the features against the features read from the store. The tiny tower stands in for a
GPU-speed model, where decoding is the whole cost.
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
    """Images/s: bare forward on pre-decoded batches, and the pipeline with 0, 1, 2 workers (round-robin, medians).

    For the pipeline, `images_per_s` is the whole call (worker start-up included) and `steady_images_per_s` the rate
    over its last three quarters (what a large dataset runs at); `first_batch_ms` is the start-up."""
    import torch

    from llava_evaclip import features

    tower = features.load_tower(tower_dir, select_layer=-2, select_feature="patch")
    items, _ = features.find_images([str(path.parent) for path in paths[:1]])
    items = items[: len(paths)]
    dataset = features.ImageDataset(items, tower.image_processor)
    pixels = dataset.finish(torch.stack([dataset[index][1] for index in range(len(items))]))
    batches = pixels.split(batch_size)

    def bare() -> tuple[float, float, float]:
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                tower(batch)
        return time.perf_counter() - start, 0.0, 0.0

    # The steady rate is measured over the last three quarters: by then every worker's queue is full, as it is for
    # most of a long run (counting from the first batch would credit the workers' head start).
    skipped = (len(items) // 4 // batch_size) * batch_size

    def pipeline(workers: int) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float, float]:
            start, first, quarter = time.perf_counter(), None, None
            for count, _ in enumerate(features.iter_features(tower, items, batch_size, workers), 1):
                if count == batch_size:
                    first = time.perf_counter()
                if count == skipped:
                    quarter = time.perf_counter()
            end = time.perf_counter()
            return end - start, (first or end) - start, (quarter or start) - start
        return run

    contenders = {"bare": bare, "workers_0": pipeline(0), "workers_1": pipeline(1), "workers_2": pipeline(2)}
    bare()  # warm-up
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, function in contenders.items():
            runs[name].append(function())
    count = len(items)
    rates = {name: count / statistics.median(total for total, _, _ in values) for name, values in runs.items()}
    steady = {name: (count - skipped) / statistics.median(total - quarter for total, _, quarter in values)
              for name, values in runs.items() if name != "bare"}
    steady["bare"] = rates["bare"]
    first_ms = {name: 1000 * statistics.median(first for _, first, _ in values) for name, values in runs.items()
                if name != "bare"}
    return {"images": count, "batch_size": batch_size, "reps": reps, "images_per_s": rates,
            "steady_images_per_s": steady, "first_batch_ms": first_ms,
            "ratio_to_bare": {name: rates[name] / rates["bare"] for name in rates},
            "steady_ratio_to_bare": {name: steady[name] / steady["bare"] for name in steady},
            "workers_2_over_0": rates["workers_2"] / rates["workers_0"],
            "steady_workers_2_over_0": steady["workers_2"] / steady["workers_0"],
            "costs": single_core_costs(tower, dataset, pixels[:batch_size])}


def single_core_costs(tower: Any, dataset: Any, batch: Any, count: int = 32) -> dict[str, float]:
    """Milliseconds of CPU per image on one thread: decode, preprocess, forward. Two cores can at best run the
    pipeline at 2 / their sum (no transfer, no contention); the 0-worker path already uses both cores' intra-op threads
    for the preprocessing's torch ops and the forward, so its rate is more than 1 / their sum."""
    import torch

    from llava_evaclip.features import open_rgb

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        paths = [dataset.items[index % len(dataset)].path for index in range(count)]
        images = [open_rgb(path) for path in paths]

        def cpu_ms(function: Callable[[], Any], per: int) -> float:
            function()
            start = time.process_time()
            function()
            return (time.process_time() - start) * 1000 / per

        decode = cpu_ms(lambda: [open_rgb(path) for path in paths], count)
        # the workers' part (resize, crop) and the main process's batched rescale + normalise
        preprocess = cpu_ms(lambda: dataset.finish(torch.stack([dataset.preprocess(image) for image in images])),
                            count)
        with torch.no_grad():
            forward = cpu_ms(lambda: [tower(batch) for _ in range(4)], 4 * len(batch))
    finally:
        torch.set_num_threads(threads)
    total = decode + preprocess + forward
    return {"decode_ms": decode, "preprocess_ms": preprocess, "forward_ms": forward,
            "two_core_bound_images_per_s": 2000 / total}


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


def scale_names(root: Path, count: int, per_folder: int = 1000) -> Path:
    """`count` image names (LLaVA-Pretrain's layout: folders of 1000) as hardlinks to a few 8x8 PNGs (ext4 allows
    65000 links to one file), so a 600K-image tree costs seconds and no space."""
    import numpy as np
    from PIL import Image

    images, bases = root / "images", root / "bases"
    bases.mkdir(parents=True)
    sources = []
    for index in range(count // 50000 + 4):
        path = bases / f"{index}.png"
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        sources.append(path)
    for index in range(count):
        folder = images / f"{index // per_folder:05d}"
        if index % per_folder == 0:
            folder.mkdir(parents=True)
        os.link(sources[index % len(sources)], folder / f"{index:09d}.png")
    return images


def scale_startup(count: int, reps: int) -> dict[str, Any]:
    """Seconds (medians) of the work a run does before its first image and after its last, at `count` images: listing
    the inputs, the --format files checks and plan on an empty and on a complete OUT, and for --format shards opening
    the store, planning a resume and merging the index with nothing new and with one new fragment; and the Python
    heap an open shard store takes (what each training rank and DataLoader worker holds). Features are
    stand-ins ([16, 32] zeros): only names, headers and the index are measured. Complete --format files outputs are
    hardlinks of one output per source PNG (its source is the same file as every image linked to that PNG)."""
    import tracemalloc

    import torch

    from llava_evaclip import features

    settings = {"model": "bench", "weights_fingerprint": "blake2b:0", "random_weights": "false",
                "select_layer": "-2", "select_feature": "patch", "image_size": "28", "dtype": "float32"}
    timings: dict[str, list[float]] = {}

    def timed(name: str, function: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = function()
        timings.setdefault(name, []).append(time.perf_counter() - start)
        return result

    with tempfile.TemporaryDirectory(prefix="bench-features-scale-") as temp:
        root = Path(temp)
        image_dir = scale_names(root, count)
        items, _ = features.find_images([str(image_dir)])
        files, shards = str(root / "files"), str(root / "shards")
        linked: dict[int, str] = {}  # the output of each source PNG, by inode
        for item in items:
            path = features.output_path(files, item.key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            inode = os.stat(item.path).st_ino
            if inode not in linked:
                features.FileWriter(files, settings).add(features.Extracted(item, torch.zeros(16, 32), "8x8"))
                linked[inode] = path
            else:
                os.link(linked[inode], path)
        writer = features.ShardWriter(shards, settings, shard_size_mb=2)
        for item in items[:-1]:
            writer.add(features.Extracted(item, torch.zeros(16, 32), "8x8"))
        writer.close()
        features.merge_index(shards)
        last = features.ShardWriter(shards, settings, shard_size_mb=2)
        last.add(features.Extracted(items[-1], torch.zeros(16, 32), "8x8"))
        for _ in range(reps):
            timed("find_images", lambda: features.find_images([str(image_dir)]))
            timed("files_checks_empty_out", lambda: (features._check_planned_outputs(items, str(root / "none")),
                                                     features.plan(items, str(root / "none"), settings, "files")))
            timed("files_checks_complete_out", lambda: (features._check_planned_outputs(items, files),
                                                        features.plan(items, files, settings, "files")))
            timed("shards_open_store", lambda: features.FeatureStore(shards))
            timed("shards_plan_resume", lambda: features.plan(items, shards, settings, "shards"))
            timed("shards_merge_nothing_new", lambda: features.merge_index(shards))
        for _ in range(reps):  # one new fragment to fold in, each time
            last.buffer, last.size = [features.Extracted(items[-1], torch.zeros(16, 32), "8x8")], 1
            last.flush()
            timed("shards_merge_one_fragment", lambda: features.merge_index(shards))
        tracemalloc.start()  # after the timings: tracing slows the process down
        store = features.FeatureStore(shards)
        heap = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del store
    return {"images": count, "reps": reps, "shards_store_heap_mb": heap / 1e6,
            "seconds": {name: statistics.median(values) for name, values in timings.items()}}


def render_markdown(results: dict[str, Any]) -> str:
    if "scale" in results:
        scale = results["scale"]
        lines = [f"# Feature extraction start-up and end at {scale['images']} images ({results['machine']}, "
                 f"median of {scale['reps']})", "", "| step | seconds |", "|---|---:|"]
        lines += [f"| {name} | {seconds:.2f} |" for name, seconds in scale["seconds"].items()]
        lines += ["", f"Python heap of an open shard store: {scale['shards_store_heap_mb']:.0f} MB."]
        return "\n".join(lines) + "\n"
    lines = [f"# Feature extraction ({results['machine']}, {results['images']} JPEGs of 640x480, CPU, "
             f"median of {results['reps']})", ""]
    lines += ["Steady state (last three quarters of the images: what a large dataset runs at), img/s:", "",
              "| model | bare | 0 workers | 1 worker | 2 workers | 2 workers / 0 | 0 workers / bare | "
              "2 workers / bare | 1 rank | 2 ranks |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, model in results["models"].items():
        run = model["throughput"]
        rates, ratio = run["steady_images_per_s"], run["steady_ratio_to_bare"]
        lines.append(f"| {name} | {rates['bare']:.1f} | {rates['workers_0']:.1f} | {rates['workers_1']:.1f} | "
                     f"{rates['workers_2']:.1f} | {run['steady_workers_2_over_0']:.2f} | {ratio['workers_0']:.2f} | "
                     f"{ratio['workers_2']:.2f} | {model['ranks'].get('1', float('nan')):.1f} | "
                     f"{model['ranks'].get('2', float('nan')):.1f} |")
    lines += ["", "Whole call (worker start-up included), img/s, and time to the first batch:", "",
              "| model | 0 workers | 1 worker | 2 workers | 2 workers / 0 | first batch 0 / 1 / 2 workers (ms) |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, model in results["models"].items():
        run = model["throughput"]
        rates, first = run["images_per_s"], run["first_batch_ms"]
        lines.append(f"| {name} | {rates['workers_0']:.1f} | {rates['workers_1']:.1f} | {rates['workers_2']:.1f} | "
                     f"{run['workers_2_over_0']:.2f} | {first['workers_0']:.0f} / {first['workers_1']:.0f} / "
                     f"{first['workers_2']:.0f} |")
    lines += ["", "CPU per image on one thread (ms): decode + preprocess + forward; two cores run at most 2 / their sum:",
              ""]
    for name, model in results["models"].items():
        costs = model["throughput"]["costs"]
        lines.append(f"- {name}: {costs['decode_ms']:.2f} + {costs['preprocess_ms']:.2f} + {costs['forward_ms']:.2f}"
                     f" -> at most {costs['two_core_bound_images_per_s']:.0f} img/s on 2 cores")
    disk = results["disk"]
    lines += ["", f"Bytes per image ({disk['dtype']} {disk['shape']}): raw {disk['raw_bytes_per_image']:.0f}, files "
              f"{disk['files_bytes_per_image']:.0f} ({disk['files_over_raw']:.3f}x), shards "
              f"{disk['shards_bytes_per_image']:.0f} ({disk['shards_over_raw']:.4f}x)."]
    step = results.get("stage1_step")
    if step:
        lines += ["", f"LLaVA stage-1 step (tiny Llama, B-16 tower, batch {step['batch_size']}): tower "
                  f"{step['tower_step_s'] * 1000:.0f} ms, cached features {step['cached_step_s'] * 1000:.0f} ms "
                  f"({step['speedup']:.1f}x)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from llava_evaclip.cli import OneLineErrorParser

    parser = OneLineErrorParser(prog="python -m benchmarks.features",
                                description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--images", type=int, default=64, help="JPEGs of 640x480 to run on (default: 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--reps", type=int, default=3, help="round-robin repetitions, medians reported (default: 3)")
    parser.add_argument("--models", nargs="+", default=["tiny", "EVA02-CLIP-B-16"],
                        help="'tiny' and/or preset names (default: tiny EVA02-CLIP-B-16)")
    parser.add_argument("--quick", action="store_true",
                        help="16 images, one repetition, no ranks: a smoke run (numbers meaningless)")
    parser.add_argument("--output-dir", default=str(RESULTS),
                        help=f"where NAME.json and NAME.md go (default: {RESULTS})")
    parser.add_argument("--name", default=None,
                        help="basename of the result files (default: features, with --quick features_quick)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.add_argument("--scale", type=int, default=None, metavar="N",
                        help="only the start-up and end of a run at N images (listing, planning, resume, index "
                             "merge; no model): results go to features_scale_N.*")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.reps = 16, 1
    if args.name is None:
        args.name = (f"features_scale_{args.scale}" if args.scale else
                     "features_quick" if args.quick else "features")
    if args.scale is not None and args.scale < 2:
        parser.error(f"--scale must be at least 2, got {args.scale}")
    for flag, value in (("--images", args.images), ("--batch-size", args.batch_size), ("--reps", args.reps)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    return args


def output_paths(args: argparse.Namespace) -> dict[str, Path]:
    directory = Path(args.output_dir)
    return {"json": directory / f"{args.name}.json", "md": directory / f"{args.name}.md"}


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.features`: --help into a full disk, errors, Ctrl-C and SIGTERM end it with one line."""
    from llava_evaclip_cli import import_cli

    return import_cli().run_command(lambda: "benchmarks.features", lambda: _run(parse_args(argv)))


def _run(args: argparse.Namespace) -> int:
    from llava_evaclip.commands._common import unwritable_folder

    outputs = output_paths(args)
    existing = [path for path in outputs.values() if os.path.lexists(path)]
    # Both refused before minutes of timing: a committed result replaced, or results lost at the end.
    problem = unwritable_folder(args.output_dir)
    if problem or (existing and not args.overwrite):
        reason = f"--output-dir {args.output_dir}: {problem}" if problem else (
            f"{existing[0]} already exists; pass --overwrite to replace it (or --output-dir / --name)")
        print(f"python -m benchmarks.features: error: {reason}", file=sys.stderr)
        return 2
    import torch

    results: dict[str, Any] = {"images": args.images, "reps": args.reps, "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, "
                               f"{os.cpu_count()} cores", "models": {}}
    if args.scale:
        results["scale"] = scale_startup(args.scale, args.reps)
        return save_results(outputs, results)
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
    return save_results(outputs, results)


def save_results(outputs: dict[str, Path], results: dict[str, Any]) -> int:
    from llava_evaclip.commands._common import atomic_write

    markdown = render_markdown(results)
    outputs["json"].parent.mkdir(parents=True, exist_ok=True)
    # Atomic: an interrupted --overwrite run leaves the previous results whole.
    atomic_write(str(outputs["json"]), lambda temp: Path(temp).write_text(json.dumps(results, indent=1)))
    atomic_write(str(outputs["md"]), lambda temp: Path(temp).write_text(markdown))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
