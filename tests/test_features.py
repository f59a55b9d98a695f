"""Feature extraction at dataset scale (`llava_evaclip.features`, `llava-evaclip features`): resume decided by settings
and a weights fingerprint, hostile input trees (symlinks, non-UTF-8 names, folders where files go), unwritable and
full output folders, umask, DataLoader decoding, the shard store and `FeatureStore`, and 2 CPU ranks under torchrun.
Features are checked against the plain model's `hidden_states` (an independent path from the tower)."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import CLIPImageProcessor

from conftest import tiny_vision_config
from llava_evaclip import EvaCLIPVisionModel
from llava_evaclip import features as F
from llava_evaclip.cli import main
from llava_evaclip.processing import build_image_processor

DIST = Path(__file__).resolve().parent / "_dist"
sys.path.insert(0, str(DIST))
from runner import run_torchrun  # noqa: E402


def save_tower(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    config = tiny_vision_config("eva02")  # 28 px, 4 x 4 patches of 7, width 32
    EvaCLIPVisionModel(config).save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory) -> str:
    return save_tower(tmp_path_factory.mktemp("tower"), seed=1)


def write_image(path: Path, size=(40, 30), seed=0, mode="RGB") -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)


def reference(model_dir: str, paths: list, layer: int = -2) -> torch.Tensor:
    """Patch tokens of hidden_states[layer] from the plain model and the saved processor."""
    model = EvaCLIPVisionModel.from_pretrained(model_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    images = [Image.open(path).convert("RGB") for path in paths]
    with torch.no_grad():
        states = model(processor(images, return_tensors="pt")["pixel_values"], output_hidden_states=True)
    return states.hidden_states[layer][:, 1:]


def read(path) -> tuple[torch.Tensor, dict]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor("features"), handle.metadata()


def one_line_error(err: str, *fragments: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("llava-evaclip features: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------------------------
# Resume: settings and a weights fingerprint (issue 12 item 5)
# --------------------------------------------------------------------------------------------------------------------


def test_other_weights_in_the_same_model_dir_are_not_current(tmp_path, capsys):
    model_dir = save_tower(tmp_path / "model", seed=1)
    images = tmp_path / "images"
    write_image(images / "a.png", seed=1)
    out = tmp_path / "out"
    assert main(["features", str(images), "--model", model_dir, "--out", str(out)]) == 0
    first, metadata = read(out / "a.png.safetensors")
    assert metadata["weights_fingerprint"].startswith("blake2b:") and metadata["image_size"] == "28"
    assert metadata["weights_fingerprint"] == F.weights_fingerprint(model_dir)
    before = (out / "a.png.safetensors").read_bytes()

    save_tower(tmp_path / "model", seed=2)  # different weights converted into the same dir
    capsys.readouterr()
    assert main(["features", str(images), "--model", model_dir, "--out", str(out)]) == 1
    assert "made with other settings: weights_fingerprint" in capsys.readouterr().err
    assert (out / "a.png.safetensors").read_bytes() == before  # kept, not silently reused or overwritten
    assert main(["features", str(images), "--model", model_dir, "--out", str(out), "--overwrite"]) == 0
    second, _ = read(out / "a.png.safetensors")
    torch.testing.assert_close(second, reference(model_dir, [images / "a.png"])[0], atol=1e-5, rtol=0)
    assert not torch.allclose(first, second)

    # A copy of the same checkpoint (other path, other mtimes) has the same fingerprint; presets get one from their
    # config and seed.
    import shutil

    shutil.copytree(model_dir, tmp_path / "copy")
    assert F.weights_fingerprint(str(tmp_path / "copy")) == F.weights_fingerprint(model_dir)
    config = tiny_vision_config("eva02")
    assert F.preset_fingerprint("X", config, 0) == F.preset_fingerprint("X", config, 0)
    assert F.preset_fingerprint("X", config, 0) != F.preset_fingerprint("X", config, 1)
    assert F.preset_fingerprint("X", config, 0) != F.preset_fingerprint("X", tiny_vision_config("eva01"), 0)


@pytest.mark.parametrize("processor_file", ["preprocessor_config.json", "processor_config.json"])
def test_a_resaved_image_processor_makes_earlier_features_stale(processor_file, tmp_path, capsys):
    """The tower reads its preprocessing from either file (transformers 5's `processor.save_pretrained` nests it in
    processor_config.json): changing it changes every feature, so features made before are not current."""
    model_dir = save_tower(tmp_path / "model", seed=1)
    images = tmp_path / "images"
    write_image(images / "a.png", seed=1)
    out = tmp_path / "out"
    assert main(["features", str(images), "--model", model_dir, "--out", str(out)]) == 0
    before = (out / "a.png.safetensors").read_bytes()
    settings = {**json.loads((Path(model_dir) / "preprocessor_config.json").read_text()),
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    saved = settings if processor_file == "preprocessor_config.json" else {"image_processor": settings}
    (Path(model_dir) / processor_file).write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(["features", str(images), "--model", model_dir, "--out", str(out)]) == 1
    assert "made with other settings: weights_fingerprint" in capsys.readouterr().err
    assert (out / "a.png.safetensors").read_bytes() == before


# --------------------------------------------------------------------------------------------------------------------
# Hostile input trees and outputs (issue 12 items 6, 8, 9, 10, 12)
# --------------------------------------------------------------------------------------------------------------------


def test_directory_symlinks_are_followed_and_loops_listed(tower_dir, tmp_path, capsys):
    real = tmp_path / "data" / "real"
    write_image(real / "a.png", seed=1)
    (tmp_path / "data" / "linked").symlink_to(real, target_is_directory=True)
    outside = tmp_path / "elsewhere"
    write_image(outside / "b.png", seed=2)
    (real / "more").symlink_to(outside, target_is_directory=True)
    (real / "loop").symlink_to(tmp_path / "data", target_is_directory=True)  # back to an ancestor
    out = tmp_path / "out"
    assert main(["features", str(tmp_path / "data"), "--model", tower_dir, "--out", str(out)]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors"))
    assert written == ["linked/a.png.safetensors", "linked/more/b.png.safetensors", "real/a.png.safetensors",
                       "real/more/b.png.safetensors"]
    err = capsys.readouterr().err
    assert "directory symlink loop" in err and str(real / "loop") in err


def test_a_non_utf8_file_name_is_stored_escaped_and_a_rerun_goes_on(tower_dir, tmp_path, capsys):
    images = tmp_path / "images"
    write_image(images / "good.png", seed=1)
    bad = os.path.join(os.fsencode(images), b"bad\xffname.png")
    write_image(Path(os.fsdecode(bad)), seed=2)
    out = tmp_path / "out"
    assert main(["features", str(images), "--model", tower_dir, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["bad\\xffname.png.safetensors", "good.png.safetensors"]
    features, metadata = read(out / "bad\\xffname.png.safetensors")
    assert metadata["relative_path"] == "bad\\xffname.png"
    torch.testing.assert_close(features, reference(tower_dir, [os.fsdecode(bad)])[0], atol=1e-5, rtol=0)
    capsys.readouterr()
    assert main(["features", str(images), "--model", tower_dir, "--out", str(out)]) == 0
    assert "2 images: 0 written, 2 skipped" in capsys.readouterr().out
    assert F.FeatureStore(out)[os.fsdecode(b"bad\xffname.png")].shape == (16, 32)


def test_an_unwritable_output_is_refused_before_loading(tower_dir, tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    write_image(images / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def read_only_open(path, flags, *args):
        if str(path).startswith(str(out)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(os, "open", read_only_open)
    monkeypatch.setattr(F, "load_tower", no_loading)
    assert main(["features", str(images), "--model", tower_dir, "--out", str(out)]) == 2
    one_line_error(capsys.readouterr().err, f"cannot write to {out}", "Read-only file system")


def test_a_full_disk_stops_with_one_line_and_keeps_finished_files(tower_dir, tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    names = [f"{index}.png" for index in range(6)]
    for index, name in enumerate(names):
        write_image(images / name, seed=index)
    out = tmp_path / "out"
    real_write = F._write_chunk
    calls = []

    def disk_fills_up(descriptor, view):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(descriptor, view)

    monkeypatch.setattr(F, "_write_chunk", disk_fills_up)
    assert main(["features", str(images), "--model", tower_dir, "--out", str(out), "--batch-size", "2"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    stop = [line for line in captured.err.splitlines() if "stopped" in line]
    assert len(stop) == 1 and "No space left on device" in stop[0] and "finished output was kept" in stop[0]
    assert sorted(os.listdir(out)) == [f"{index}.png.safetensors" for index in range(3)]  # no temp files
    expected = reference(tower_dir, [images / name for name in names])
    for index in range(3):
        torch.testing.assert_close(read(out / f"{index}.png.safetensors")[0], expected[index], atol=1e-5, rtol=0)
    monkeypatch.setattr(F, "_write_chunk", real_write)
    assert main(["features", str(images), "--model", tower_dir, "--out", str(out)]) == 0  # the rerun completes
    assert "6 images: 3 written, 3 skipped" in capsys.readouterr().out


def test_a_folder_where_an_output_file_goes_is_one_line(tower_dir, tmp_path, capsys):
    images = tmp_path / "images"
    write_image(images / "x.jpg")
    out = tmp_path / "out"
    (out / "x.jpg.safetensors").mkdir(parents=True)
    assert main(["features", str(images), "--model", tower_dir, "--out", str(out)]) == 2
    one_line_error(capsys.readouterr().err, "x.jpg.safetensors is a folder")
    # Inside one input tree: x.jpg beside a folder x.jpg.safetensors/ holding images.
    write_image(images / "x.jpg.safetensors" / "y.jpg")
    assert main(["features", str(images), "--model", tower_dir, "--out", str(tmp_path / "out2")]) == 2
    one_line_error(capsys.readouterr().err, "cannot both be saved")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_feature_files_follow_the_umask(tower_dir, tmp_path, umask, mode):
    images = tmp_path / "images"
    write_image(images / "sub" / "a.png")
    previous = os.umask(umask)
    try:
        assert main(["features", str(images), "--model", tower_dir, "--out", str(tmp_path / "files")]) == 0
        assert main(["features", str(images), "--model", tower_dir, "--out", str(tmp_path / "shards"),
                     "--format", "shards"]) == 0
    finally:
        os.umask(previous)
    files = [tmp_path / "files" / "sub" / "a.png.safetensors", tmp_path / "shards" / "index.json",
             *(tmp_path / "shards" / "shards").iterdir()]
    assert {oct(path.stat().st_mode & 0o777) for path in files} == {oct(mode)}
    assert oct((tmp_path / "files" / "sub").stat().st_mode & 0o777) == oct(0o777 & ~umask)


# --------------------------------------------------------------------------------------------------------------------
# The library: DataLoader decoding, shards, FeatureStore (issue 16 items 1, 2, 4)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def mixed_images(tmp_path) -> Path:
    root = tmp_path / "mixed"
    for index in range(7):
        write_image(root / f"{index}.png", size=(20 + 9 * index, 50 - 3 * index), seed=index,
                    mode="RGBA" if index == 3 else "RGB")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def test_workers_decode_in_parallel_and_broken_images_are_named(tower_dir, mixed_images):
    tower = F.load_tower(tower_dir, select_layer=-2, select_feature="patch")
    items, skipped = F.find_images([str(mixed_images)])
    assert skipped == [] and len(items) == 8
    expected = reference(tower_dir, [mixed_images / f"{index}.png" for index in range(7)])
    by_workers = {}
    for workers in (0, 2):
        results = {result.item.key: result for result in F.iter_features(tower, items, batch_size=3, workers=workers)}
        assert set(results) == {item.key for item in items}
        assert results["broken.jpg"].features is None and "cannot read image" in results["broken.jpg"].error
        for index in range(7):
            torch.testing.assert_close(results[f"{index}.png"].features, expected[index], atol=1e-5, rtol=0)
        by_workers[workers] = results
    for index in range(7):  # the workers' decoding and the main process's thread share change no bit
        assert torch.equal(by_workers[2][f"{index}.png"].features, by_workers[0][f"{index}.png"].features)


def processor_cases(tmp_path: Path, image_size: int) -> list:
    """Images of many sizes and modes (LLaVA converts them all to RGB), and a JPEG."""
    cases = [((640, 480), "RGB"), ((480, 640), "RGB"), ((3, 3), "RGB"), ((1, 7), "RGB"), ((45, 31), "RGBA"),
             ((50, 20), "L"), ((33, 65), "P"), ((image_size, image_size), "RGB"), ((image_size + 1, 300), "RGB")]
    items = []
    for index, (size, mode) in enumerate(cases):
        path = tmp_path / f"{index}.png"
        write_image(path, size=size, seed=index, mode=mode)
        items.append(F.ImageItem(str(path), path.name))
    jpeg = tmp_path / "photo.jpg"
    Image.open(tmp_path / "0.png").save(jpeg, quality=90)
    items.append(F.ImageItem(str(jpeg), jpeg.name))
    return items


def per_image_pixels(processor, items) -> torch.Tensor:
    """The processor run on each of LLaVA's `Image.open(path).convert("RGB")` alone, as LLaVA's dataset does."""
    return torch.stack([processor([Image.open(item.path).convert("RGB")], return_tensors="pt")["pixel_values"][0]
                        for item in items])


@pytest.mark.parametrize("image_size", [28, 224])
def test_dataset_preprocessing_is_the_processors_on_llavas_rgb_image(tmp_path, image_size):
    """What a worker computes, finished for the batch, equals the processor applied to LLaVA's
    `Image.open(path).convert("RGB")` alone, bit for bit, for every size and mode: the worker ships the uint8 crop
    (transformers 5 is handed a channel-first tensor, transformers 4 the PIL image) and the batch is rescaled and
    normalised at once."""
    processor = build_image_processor(image_size)
    items = processor_cases(tmp_path, image_size)
    expected = per_image_pixels(processor, items)
    dataset = F.ImageDataset(items, processor)
    assert dataset.normaliser is not None  # the split path is the one under test
    crops = []
    for index, item in enumerate(items):
        position, pixels, size, cpu_seconds = dataset[index]
        assert position == index and pixels.dtype == torch.uint8 and pixels.shape == expected.shape[1:], item.key
        assert size == "x".join(map(str, Image.open(item.path).size)) and cpu_seconds >= 0
        assert torch.equal(dataset.finish(pixels[None])[0], expected[index]), item.key
        crops.append(pixels)
    batch = dataset.finish(torch.stack(crops))
    assert batch.dtype == expected.dtype == torch.float32 and torch.equal(batch, expected)


class PixelsTower:
    """Stands in for a tower in `iter_features` and hands back the pixel values it is given, so what reaches the
    model can be compared with the processor's."""

    def __init__(self, processor) -> None:
        self.image_processor, self.device, self.dtype = processor, torch.device("cpu"), torch.float32
        self.batches: list = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.batches.append(pixels.clone())
        return pixels


class SubclassedProcessor(CLIPImageProcessor):
    """A processor of another class: its steps may differ from CLIP's, so workers run it whole."""


def processors_to_check(image_size: int) -> dict:
    built = build_image_processor(image_size)
    processors = {"clip": built, "subclass": SubclassedProcessor(**built.to_dict())}
    import transformers

    if hasattr(transformers, "CLIPImageProcessorPil"):  # transformers 5's numpy backend
        processors["clip_pil"] = transformers.CLIPImageProcessorPil(**built.to_dict())
    return processors


@pytest.mark.parametrize("image_size", [28, 224])
def test_the_model_gets_the_processors_pixels_with_and_without_workers(tmp_path, image_size):
    """Pixel batches reaching the model through `iter_features` (uint8 crops from the workers, normalised per batch)
    equal the processor run per image, with 0 and 2 workers; a processor the split does not support (another class)
    takes the per-image path and is equally exact; a broken image is still named."""
    items = processor_cases(tmp_path, image_size)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    items.insert(3, F.ImageItem(str(broken), broken.name))
    good = [item for item in items if item.key != "broken.jpg"]
    for name, processor in processors_to_check(image_size).items():
        expected = per_image_pixels(processor, good)
        assert (F.ImageDataset([], processor).normaliser is None) == (name == "subclass")
        for workers in (0, 2):
            tower = PixelsTower(processor)
            results = list(F.iter_features(tower, items, batch_size=4, workers=workers))
            failed = [result for result in results if result.error is not None]
            assert [result.item.key for result in failed] == ["broken.jpg"] and "cannot read image" in failed[0].error
            assert [result.item.key for result in results if result.error is None] == [item.key for item in good]
            pixels = torch.stack([result.features for result in results if result.error is None])
            assert pixels.dtype == torch.float32 and torch.equal(pixels, expected), (name, workers)
            assert [len(batch) for batch in tower.batches] == [3, 4, 3]  # batches of 4, less the broken image


def test_a_batch_path_that_would_change_a_bit_is_not_used(tmp_path, monkeypatch):
    """The split is proved on every (channel, value) before use: a normaliser one ulp off on a single value is
    refused on the CPU (workers then run the processor whole), and on a device where it would be off, batches are
    normalised on the CPU and then moved."""
    processor = build_image_processor(28)
    normaliser = F._BatchNormaliser.for_processor(processor)
    assert normaliser is not None and normaliser.exact_on(torch.device("cpu"))
    exact_call = F._BatchNormaliser.__call__

    def off_by_one_ulp(self, pixels):
        result = exact_call(self, pixels)
        return torch.where(pixels == 77, torch.nextafter(result, torch.full_like(result, 10.0)), result)

    monkeypatch.setattr(F._BatchNormaliser, "__call__", off_by_one_ulp)
    assert F._BatchNormaliser.for_processor(processor) is None
    items = processor_cases(tmp_path, 28)
    dataset = F.ImageDataset(items, processor)
    assert dataset.normaliser is None and dataset[0][1].dtype == torch.float32
    assert torch.equal(torch.stack([dataset.finish(dataset[index][1][None])[0] for index in range(len(items))]),
                       per_image_pixels(processor, items))
    seen = []
    monkeypatch.setattr(F._BatchNormaliser, "__call__", lambda self, pixels: seen.append(pixels.device) or
                        exact_call(self, pixels))
    dataset = F.ImageDataset(items, processor)
    crops = torch.stack([dataset[index][1] for index in range(2)])
    for exact, normalised_on in ((True, "meta"), (False, "cpu")):
        dataset.normaliser._exact["meta"] = exact  # as if the batch path were exact, or not, on that device
        seen.clear()
        pixels = dataset.finish(crops, "meta")
        assert pixels.device.type == "meta" and pixels.dtype == torch.float32
        assert [device.type for device in seen] == [normalised_on]


def test_main_process_threads_leave_the_decoding_workers_their_cores(tower_dir, mixed_images):
    """With workers, the main process's intra-op threads are the caller's less the cores decoding takes (a model
    slower than decoding keeps them all), and the caller's count comes back, also when the loop is left early."""
    share = F._ThreadShare.__new__(F._ThreadShare)
    share.initial = 2
    assert [share.threads_for(cores) for cores in (0.0, 0.02, 0.49, 0.96, 1.9, 3.0)] == [2, 2, 2, 1, 1, 1]
    share.initial = 16
    assert share.threads_for(8.2) == 8 and share.threads_for(0.3) == 16
    tower = F.load_tower(tower_dir, select_layer=-2, select_feature="patch")
    items, _ = F.find_images([str(mixed_images)])
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert F._ThreadShare(workers=2).active and not F._ThreadShare(workers=0).active
        for result in F.iter_features(tower, items, batch_size=2, workers=2):
            assert 1 <= torch.get_num_threads() <= 2
        assert torch.get_num_threads() == 2
        results = F.iter_features(tower, items, batch_size=2, workers=2)
        next(results)
        results.close()  # a caller that stops early
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_shard_store_and_file_store_read_the_same_features(tower_dir, mixed_images, tmp_path, capsys):
    shards, files = tmp_path / "shards", tmp_path / "files"
    common = [str(mixed_images), "--model", tower_dir, "--batch-size", "2"]
    # 16 tokens x 32 fp32 = 2048 bytes per image: a 0.005 MB shard holds 3 images.
    assert main(["features", *common, "--out", str(shards), "--format", "shards", "--shard-size", "0.005"]) == 1
    assert main(["features", *common, "--out", str(files), "--workers", "2"]) == 1
    assert "broken.jpg" in capsys.readouterr().err
    import llava_evaclip

    shard_store, file_store = llava_evaclip.FeatureStore(shards), F.FeatureStore(files)
    keys = [f"{index}.png" for index in range(7)]
    assert list(shard_store) == list(file_store) == keys and len(shard_store) == 7
    assert shard_store.missing(keys + ["broken.jpg"]) == ["broken.jpg"]
    expected = reference(tower_dir, [mixed_images / key for key in keys])
    for index, key in enumerate(keys):
        torch.testing.assert_close(shard_store[key], expected[index], atol=1e-5, rtol=0)
        assert torch.equal(shard_store[key], file_store[key])
    assert shard_store.verify() == [] and file_store.verify() == []
    index = json.loads((shards / "index.json").read_text())
    assert index["settings"] == shard_store.settings == file_store.settings
    assert index["settings"]["weights_fingerprint"] == F.weights_fingerprint(tower_dir)
    entry = index["entries"]["3.png"]
    assert entry["shape"] == [16, 32] and entry["dtype"] == "float32" and entry["original_size"] == "47x41"
    shard_files = sorted((shards / "shards").glob("*.safetensors"))
    assert len(shard_files) == 3  # 3 + 3 + 1 images
    raw = 7 * 16 * 32 * 4
    assert sum(path.stat().st_size for path in shard_files) <= 1.05 * raw + 3 * 200  # headers only on top

    # A damaged shard and a store made with other settings are reported, never read as good.
    capsys.readouterr()
    assert main(["features", *common, "--out", str(shards), "--format", "shards", "--select-layer", "-1"]) == 2
    one_line_error(capsys.readouterr().err, "made with other settings: select_layer '-2' (now '-1')")
    data = bytearray(shard_files[0].read_bytes())
    shard_files[0].write_bytes(bytes(data[: len(data) // 2]))
    problems = F.FeatureStore(shards).verify()
    assert len(problems) == 3 and all("cannot read its features" in problem for problem in problems)


# --------------------------------------------------------------------------------------------------------------------
# 2 CPU ranks through torchrun (issue 16 items 3 and 6)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """240 small images of four sizes in nested folders, and one corrupt file."""
    root = tmp_path_factory.mktemp("many")
    sizes = [(28, 28), (40, 30), (17, 60), (64, 48)]
    for index in range(240):
        write_image(root / f"d{index % 3}" / f"{index:03d}.png", size=sizes[index % 4], seed=index)
    (root / "d1" / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    return root


def test_two_ranks_shard_the_work_and_a_killed_run_resumes_on_one_rank(tower_dir, many_images, tmp_path, capsys):
    args = [str(many_images), "--model", tower_dir, "--format", "shards", "--shard-size", "0.02",
            "--batch-size", "8", "--device", "cpu"]
    worker = DIST / "features_run.py"
    # The single-process run, in this process.
    single = tmp_path / "single"
    assert main(["features", *args, "--out", str(single)]) == 1  # the corrupt file
    single_store = F.FeatureStore(single)
    assert len(single_store) == 240 and single_store.verify() == []

    # Two ranks: every image exactly once (the index would hold a repeat once; count the shards' tensors).
    two = tmp_path / "two"
    result = run_torchrun(worker, *args, "--out", str(two), nproc=2, timeout=240)
    assert result.returncode == 1, result.describe()  # the corrupt image, reported by rank 0 for both ranks
    assert "241 images: 240 written, 0 skipped (output exists), 1 failed" in result.output
    assert "on 2 ranks" in result.output and "corrupt.jpg" in result.output
    store = F.FeatureStore(two)
    assert store.verify() == [] and list(store) == list(single_store)
    fragments = [json.loads(path.read_text()) for path in (two / "shards").glob("*.json")]
    stored_keys = [key for fragment in fragments for key in fragment["entries"]]
    assert sorted(stored_keys) == list(single_store)  # each image once, by one rank
    assert {name.rsplit("-", 2)[-2] for fragment in fragments for name in [fragment["shard"]]} == {"r0", "r1"}
    for key in single_store:
        torch.testing.assert_close(store[key], single_store[key])  # fp32 defaults: other batch neighbours

    # Rank 1 dies after its second shard; the finished shards of both ranks count, and one rank completes the rest.
    killed = tmp_path / "killed"
    result = run_torchrun(worker, *args, "--out", str(killed), nproc=2, timeout=240,
                          env={"FEATURES_CRASH_RANK": "1", "FEATURES_CRASH_AFTER_SHARDS": "2"})
    assert result.returncode not in (0, None), result.describe()
    partial = F.FeatureStore(killed)
    assert 0 < len(partial) < 240
    done_before = {key: partial[key].clone() for key in partial}
    capsys.readouterr()
    assert main(["features", *args, "--out", str(killed)]) == 1
    out = capsys.readouterr().out
    assert f"241 images: {240 - len(done_before)} written, {len(done_before)} skipped" in out
    resumed = F.FeatureStore(killed)
    assert resumed.verify() == [] and list(resumed) == list(single_store)
    for key in single_store:
        torch.testing.assert_close(resumed[key], single_store[key])
    for key, value in done_before.items():
        assert torch.equal(resumed[key], value)  # finished work was kept, not recomputed
