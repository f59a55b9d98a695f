"""Every kind of image file a dataset holds, against LLaVA 1.5's own training data path as the reference
(`llava.train.train.LazySupervisedDataset`: `Image.open(...).convert('RGB')`, then `processor.preprocess`): EXIF
orientation, CMYK, 16-bit, I / F, LA, transparency chunks, 1-bit, YCbCr, multi-frame GIF / TIFF / WebP / APNG,
progressive and truncated JPEGs, ICC profiles, extensions that lie, 1x4000 strips, images 1 and 3 pixels high, a
decompression bomb. For each, `llava-evaclip features` stores what the tower computes on LLaVA's pixels (the pixels
bit for bit), or lists the file as failed where LLaVA's dataset fails on it: never a silent difference, never the
whole run lost for one file."""

from __future__ import annotations

import json
import struct
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageCms

pytest.importorskip("llava", reason="LLaVA's code (pip install --no-deps llava-torch) is needed for these tests")

from conftest import tiny_vision_config  # noqa: E402
from llava_evaclip import EvaCLIPVisionModel, launch  # noqa: E402
from llava_evaclip import features as F  # noqa: E402
from llava_evaclip.cli import main  # noqa: E402
from llava_evaclip.processing import build_image_processor  # noqa: E402
from test_llava_launcher import ANSWERS, QUESTIONS, write_tokenizer  # noqa: E402


def _rgb(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, depth: int, colour: int, rows: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def write_files(folder: Path) -> list[str]:
    """One small file of each kind; returns their names."""
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 (LLaVA does not apply it)
    _rgb(40, 30, 1).save(folder / "exif_rotated.jpg", exif=exif.tobytes(), quality=95)
    _rgb(33, 21, 2).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    grey16 = np.random.default_rng(3).integers(0, 65536, (25, 31), dtype=np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")  # I;16
    Image.fromarray(grey16.astype(np.int32) - 1000, mode="I").save(folder / "int32.tiff")
    Image.fromarray(np.random.default_rng(4).random((25, 31), dtype=np.float32) * 300 - 20, mode="F").save(
        folder / "float32.tiff")
    rgb48 = np.random.default_rng(5).integers(0, 65536, (23, 29, 3), dtype=np.uint16).astype(">u2")
    (folder / "rgb48.png").write_bytes(_png(29, 23, 16, 2, b"".join(b"\x00" + row.tobytes() for row in rgb48)))
    alpha = Image.fromarray(np.random.default_rng(7).integers(0, 256, (26, 30), dtype=np.uint8))
    Image.merge("LA", [_rgb(30, 26, 6).convert("L"), alpha]).save(folder / "grey_alpha.png")
    palette = _rgb(30, 26, 10).quantize(16)
    palette.save(folder / "palette_alpha_per_index.png", transparency=bytes(range(0, 256, 16)))
    palette.save(folder / "palette_transparent.gif", transparency=5)
    grey = _rgb(30, 26, 11).convert("L")
    grey.save(folder / "grey_transparent.png", transparency=int(np.asarray(grey)[0, 0]))
    colour = _rgb(30, 26, 12)
    colour.save(folder / "rgb_transparent.png", transparency=tuple(int(v) for v in np.asarray(colour)[0, 0]))
    _rgb(37, 19, 13).convert("1").save(folder / "bilevel.png")
    _rgb(37, 19, 13).convert("1").save(folder / "bilevel_g4.tiff", compression="group4")
    _rgb(35, 27, 14).convert("YCbCr").save(folder / "ycbcr.tiff")
    frames = [_rgb(30, 22, 20 + index) for index in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    frames[0].save(folder / "pages.tiff", save_all=True, append_images=frames[1:])
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    frames[0].save(folder / "animated.png", save_all=True, append_images=frames[1:], duration=50,
                   default_image=True)
    _rgb(64, 48, 30).save(folder / "progressive.jpg", progressive=True, quality=90)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    _rgb(40, 30, 33).save(folder / "icc_profile.jpg", icc_profile=icc, quality=95)
    _rgb(26, 20, 70).save(folder / "png_named.jpg", format="PNG")
    _rgb(26, 20, 71).save(folder / "UPPER_CASE.JPG", format="JPEG")
    _rgb(1, 4000, 34).save(folder / "strip_1x4000.png")
    _rgb(1, 1, 41).save(folder / "pixel_1x1.png")
    _rgb(40, 1, 52).save(folder / "one_high_40x1.png")  # transformers 4.37: channels-first, LLaVA fails
    _rgb(40, 3, 51).save(folder / "three_high_40x3.png")  # transformers 4.37: channels-first, LLaVA garbles it
    whole = folder / "whole.jpg"
    _rgb(64, 48, 31).save(whole, quality=90)
    (folder / "truncated.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    # a header claiming 200 M pixels: PIL's decompression-bomb limit (LLaVA leaves it at PIL's default)
    (folder / "bomb.png").write_bytes(_png(20000, 10000, 8, 2, b"\x00" * 10))
    return sorted(path.name for path in folder.iterdir())


def llava_dataset(folder: Path, names: list[str], processor, work: Path):
    """LLaVA 1.5's own LazySupervisedDataset over `names` in `folder` (square preprocessing, as the feature cache
    trains), one conversation per image."""
    train_module = launch.prepare_llava("llava.train.train")
    (work / "lm").mkdir(exist_ok=True)
    write_tokenizer(work / "lm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(work / "lm"), use_fast=False, model_max_length=512,
                                                           padding_side="right")
    tokenizer.pad_token = tokenizer.unk_token
    records = [{"id": name, "image": name, "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTIONS[0]}"}, {"from": "gpt", "value": ANSWERS[0]}]}
        for name in names]
    (work / "data.json").write_text(json.dumps(records))
    data_args = types.SimpleNamespace(data_path=str(work / "data.json"), image_folder=str(folder),
                                      image_processor=processor, is_multimodal=True, image_aspect_ratio="square",
                                      mm_use_im_start_end=False, lazy_preprocess=True)
    return train_module.LazySupervisedDataset(tokenizer=tokenizer, data_path=data_args.data_path, data_args=data_args)


def llava_pixels(folder: Path, names: list[str], processor, work: Path) -> dict:
    """Each file's `image` pixels from LLaVA's dataset (its stage-1 "plain" template), or the exception it raises."""
    from llava import conversation

    launch._feature_cache.clear()
    dataset = llava_dataset(folder, names, processor, work)
    previous = conversation.default_conversation
    conversation.default_conversation = conversation.conv_templates["plain"]
    results = {}
    try:
        for index, name in enumerate(names):
            try:
                results[name] = dataset[index]["image"]
            except Exception as error:  # noqa: BLE001 - what LLaVA raises is the reference
                results[name] = error
    finally:
        conversation.default_conversation = previous
    return results


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tower")
    torch.manual_seed(1)
    config = tiny_vision_config("eva02")  # 28 px, 4 x 4 patches of 7
    EvaCLIPVisionModel(config).save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    return str(path)


def test_features_of_every_kind_of_file_are_what_llavas_dataset_and_the_tower_give(tower_dir, tmp_path, capsys):
    """Pixels bit for bit and stored features equal LLaVA's dataset + the tower; what LLaVA fails on is listed as
    failed. On transformers 4.37 an image 1 pixel high ended the whole run in the batch collate (its channels-first
    crop has one channel) where LLaVA's dataset fails on that one image."""
    folder = tmp_path / "images"
    names = write_files(folder)
    tower = F.load_tower(tower_dir, select_layer=-2, select_feature="patch")
    reference = llava_pixels(folder, names, tower.image_processor, tmp_path)
    items, skipped = F.find_images([str(folder)])
    assert skipped == [] and sorted(item.key for item in items) == names  # every file is picked up

    # the pixels, bit for bit: LLaVA's where it has them, a reason where it fails
    dataset = F.ImageDataset(items, tower.image_processor)
    for index, item in enumerate(items):
        _, pixels, reason, _ = dataset[index]
        expected = reference[item.key]
        if isinstance(expected, Exception):
            assert pixels is None and reason, (item.key, expected)
        else:
            assert pixels is not None, (item.key, reason)
            assert torch.equal(dataset.finish(pixels[None])[0], expected), item.key

    # the whole run (batches mixing every kind) stores the tower's features of LLaVA's pixels and lists the rest
    out = tmp_path / "store"
    failing = sorted(name for name, value in reference.items() if isinstance(value, Exception))
    assert "truncated.jpg" in failing or truncated_images_load()
    assert "bomb.png" in failing
    if transformers.__version__.startswith("4."):  # LLaVA's dataset fails on them there (channels-first)
        assert {"one_high_40x1.png", "pixel_1x1.png"} <= set(failing)
    capsys.readouterr()
    assert main(["features", str(folder), "--model", tower_dir, "--out", str(out), "--format", "shards",
                 "--batch-size", "4"]) == 1
    printed = capsys.readouterr()
    store = F.FeatureStore(str(out))
    assert sorted(store.missing(names)) == failing
    for name in failing:
        assert f"{name}: cannot" in printed.err + printed.out, name
    computed = [name for name in names if name not in failing]
    with torch.no_grad():
        expected = tower(torch.stack([reference[name] for name in computed]))
    stored = torch.stack([store[name] for name in computed])
    worst = (stored - expected).abs().flatten(1).amax(1)
    assert worst.max() <= 1e-5, dict(zip(computed, worst.tolist()))


def truncated_images_load() -> bool:
    """LLaVA-NeXT's train.py (imported by other tests in this process) sets PIL's LOAD_TRUNCATED_IMAGES for the whole
    process: a truncated JPEG then decodes in LLaVA's dataset and in `features` alike."""
    from PIL import ImageFile

    return bool(ImageFile.LOAD_TRUNCATED_IMAGES)


def test_a_cached_image_whose_name_features_passes_over_is_refused_saying_so(tower_dir, tmp_path):
    """LLaVA opens any file PIL reads, whatever its name (`x.jfif`, `x.avif`, no extension); `features` looks for
    its listed extensions only, so such an image is not in the store. The launcher refuses the data, and says why
    instead of telling the user to run `features` over the folder they just ran it over."""
    from llava_evaclip.tower import EvaCLIPVisionTower

    folder = tmp_path / "images"
    folder.mkdir()
    names = ["a.jpg", "b.jfif", "c"]
    for index, name in enumerate(names):
        _rgb(30, 24, index).save(folder / name, format="JPEG")
        Image.open(folder / name).convert("RGB")  # LLaVA reads every one
    assert main(["features", str(folder), "--model", tower_dir, "--out", str(tmp_path / "cache")]) == 0
    args = types.SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                                 unfreeze_mm_vision_tower=False)
    tower = EvaCLIPVisionTower(tower_dir, args)
    launch._feature_cache.clear()
    try:
        launch.attach_feature_cache(tower, str(tmp_path / "cache"), args)
        with pytest.raises(launch.FeatureCacheError, match=r"2 of 3 images .*; 2 of them \(e.g. 'b.jfif'\) have "
                                                             r"names `features` does not look for \(files ending "
                                                             r"\.jpg, .*\): convert or rename"):
            llava_dataset(folder, names, tower.image_processor, tmp_path)
    finally:
        launch._feature_cache.clear()
