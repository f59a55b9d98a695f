"""`llava-evaclip features` and `FeatureStore` against a hostile tester's findings: transparent palette / grey images
(LLaVA's pixels on each transformers line), a user folder named `shards`, a files store mixing two models, a store
reused for other images under the same names, names too long for the file system, a disk or file-size limit hit while
writing the index, temp files of a killed run, unrelated .safetensors in --out, and the same checkpoint at another path.
Features are compared with LLaVA's own path (`Image.open(p).convert("RGB")` -> the processor -> the plain model)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor

from llava_evaclip import EvaCLIPVisionModel, launch
from llava_evaclip import features as F
from llava_evaclip.cli import main
from test_features import PixelsTower, one_line_error, read, reference, save_tower, tower_dir, write_image  # noqa: F401

FEATURES_LOGGER = "llava_evaclip.features"


def llava_features(model_dir: str, path: Path) -> torch.Tensor:
    """LLaVA's path for one image: `Image.open(path).convert("RGB")`, the tower's processor `preprocess(image)` alone,
    the plain model's hidden_states[-2] patch tokens."""
    model = EvaCLIPVisionModel.from_pretrained(model_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    image = Image.open(path).convert("RGB")
    with torch.no_grad():
        pixels = processor.preprocess(image, return_tensors="pt")["pixel_values"]
        return model(pixels, output_hidden_states=True).hidden_states[-2][0, 1:]


def stopped_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "stopped" in line]
    assert len(lines) == 1 and lines[0].startswith("llava-evaclip features: stopped: "), err
    assert "every finished output was kept, rerun" in lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------------------------------
# 1. Images whose RGB conversion keeps a transparent colour
# --------------------------------------------------------------------------------------------------------------------


def transparent_images(root: Path) -> list[Path]:
    """A palette PNG with a transparent index, a GIF with one, and a grey PNG with a transparent value: LLaVA's
    `convert("RGB")` keeps the colour in `info["transparency"]`, which transformers 5's processor composites on
    white (transformers 4's ignores it)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    palette = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).quantize(colors=16)
    palette.save(root / "pal.png", transparency=0)
    palette.save(root / "trans.gif", transparency=3)
    grey = Image.fromarray(rng.integers(0, 256, (35, 29), dtype=np.uint8))
    grey.save(root / "grey.png", transparency=int(np.asarray(grey)[0, 0]))
    paths = [root / "grey.png", root / "pal.png", root / "trans.gif"]
    for path in paths:  # what makes these images different from a plain RGB one
        assert Image.open(path).convert("RGB").info.get("transparency") is not None, path
    return paths


def test_transparent_palette_and_grey_images_get_llavas_features(tower_dir, tmp_path):
    paths = transparent_images(tmp_path / "images")
    for fmt, workers in (("files", "0"), ("shards", "2")):
        out = tmp_path / fmt
        assert main(["features", str(tmp_path / "images"), "--model", tower_dir, "--out", str(out), "--format", fmt,
                     "--workers", workers, "--batch-size", "2"]) == 0
        store = F.FeatureStore(out)
        for path in paths:
            torch.testing.assert_close(store[path.name], llava_features(tower_dir, path), atol=1e-5, rtol=0)


def test_transparent_images_reach_the_model_with_llavas_pixels(tmp_path):
    """Bit for bit, with and without workers, for the processors the installed transformers has."""
    from test_features import processors_to_check

    paths = transparent_images(tmp_path / "images")
    items = [F.ImageItem(str(path), path.name) for path in paths]
    for name, processor in processors_to_check(28).items():
        expected = torch.stack([processor.preprocess(Image.open(path).convert("RGB"), return_tensors="pt")
                                ["pixel_values"][0] for path in paths])
        for workers in (0, 2):
            results = list(F.iter_features(PixelsTower(processor), items, batch_size=2, workers=workers))
            assert [result.error for result in results] == [None] * len(paths)
            pixels = torch.stack([result.features for result in results])
            assert torch.equal(pixels, expected), (name, workers)


# --------------------------------------------------------------------------------------------------------------------
# 2. Store format detection is not fooled by a user folder named `shards`
# --------------------------------------------------------------------------------------------------------------------


def test_a_folder_named_shards_in_a_files_store_resumes(tower_dir, tmp_path, capsys):
    images = tmp_path / "images"
    write_image(images / "shards" / "0001.png", seed=1)
    write_image(images / "other" / "0002.png", seed=2)
    out = tmp_path / "out"
    command = ["features", str(images), "--model", tower_dir, "--out", str(out)]
    assert main(command) == 0
    store = F.FeatureStore(out)
    assert store.format == "files" and list(store) == ["other/0002.png", "shards/0001.png"]
    torch.testing.assert_close(store["shards/0001.png"], llava_features(tower_dir, images / "shards" / "0001.png"),
                               atol=1e-5, rtol=0)
    capsys.readouterr()
    assert main(command) == 0
    assert "2 images: 0 written, 2 skipped" in capsys.readouterr().out
    # And a shards run refuses it as the files store it is.
    assert main(command + ["--format", "shards"]) == 2
    one_line_error(capsys.readouterr().err, "holds per-image feature files")


def test_a_shards_run_leaves_a_users_files_in_a_shards_folder_alone(tower_dir, tmp_path):
    images = tmp_path / "images"
    write_image(images / "a.png", seed=1)
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, out / "shards" / "mine.safetensors")
    (out / "shards" / ".mine.tmp").write_text("user's")
    assert main(["features", str(images), "--model", tower_dir, "--out", str(out), "--format", "shards"]) == 0
    assert (out / "shards" / "mine.safetensors").exists() and (out / "shards" / ".mine.tmp").exists()
    store = F.FeatureStore(out)
    assert store.format == "shards" and list(store) == ["a.png"] and store.verify() == []


# --------------------------------------------------------------------------------------------------------------------
# 3. A files store mixing two models
# --------------------------------------------------------------------------------------------------------------------


def tower_for_llava(model_dir: str):
    from llava_evaclip.tower import EvaCLIPVisionTower

    args = argparse.Namespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                              unfreeze_mm_vision_tower=False)
    return EvaCLIPVisionTower(model_dir, args), args


def test_a_files_store_mixing_two_models_is_refused_by_the_cache_and_resume(tower_dir, tmp_path, capsys):
    other = save_tower(tmp_path / "other", seed=2)
    images = tmp_path / "images"
    for index in range(6):
        write_image(images / f"{index}.png", seed=index)
    out = tmp_path / "cache"
    assert main(["features", str(images), "--model", tower_dir, "--out", str(out)]) == 0
    # An --overwrite run with the other model that stopped after the first 3 files (killed, out of disk).
    items, _ = F.find_images([str(images)])
    F.extract_features(F.load_tower(other), items[:3], str(out), overwrite=True)
    with pytest.raises(ValueError, match=r"mixes features made with different settings: 3 of 6 files differ from "
                                         r"'0.png', e.g. '3.png': .*weights_fingerprint"):
        F.FeatureStore(out)
    for model_dir in (other, tower_dir):  # either model: training refuses at start
        tower, args = tower_for_llava(model_dir)
        with pytest.raises(launch.FeatureCacheError, match="mixes features made with different settings"):
            launch.attach_feature_cache(tower, str(out), args)
    launch._feature_cache.clear()
    # Resume with the other model: the first model's files are named, never kept as current.
    capsys.readouterr()
    assert main(["features", str(images), "--model", other, "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "6 images: 0 written, 3 skipped (output exists), 3 failed" in captured.out
    assert captured.err.count("made with other settings: ") == 3 and captured.err.count("weights_fingerprint") == 3
    assert main(["features", str(images), "--model", other, "--out", str(out), "--overwrite"]) == 0
    store = launch.attach_feature_cache(tower_for_llava(other)[0], str(out), tower_for_llava(other)[1])
    launch._feature_cache.clear()
    for index in range(6):
        torch.testing.assert_close(store[f"{index}.png"], llava_features(other, images / f"{index}.png"),
                                   atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# 4. A store reused for other images under the same names
# --------------------------------------------------------------------------------------------------------------------


def test_outputs_of_other_images_under_the_same_names_are_not_kept(tower_dir, tmp_path, capsys):
    set_a, set_b = tmp_path / "setA", tmp_path / "setB"
    write_image(set_a / "0001.jpg", seed=1)
    write_image(set_b / "0001.jpg", seed=999, size=(64, 20))
    (tmp_path / "linkA").symlink_to(set_a, target_is_directory=True)
    for fmt in ("files", "shards"):
        out = tmp_path / f"out-{fmt}"
        common = ["--model", tower_dir, "--out", str(out), "--format", fmt]
        assert main(["features", str(set_a), *common]) == 0
        before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
        capsys.readouterr()
        code = main(["features", str(set_b), *common])
        err = capsys.readouterr().err
        assert str(set_a / "0001.jpg") in err and str(set_b / "0001.jpg") in err, err
        if fmt == "files":
            assert code == 1 and "holds the features of another image" in err and "--overwrite" in err
        else:
            assert code == 2
            one_line_error(err, "holds features of other images", "use another output folder")
        assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
        # The same images reached through a symlink are the same source: kept.
        assert main(["features", str(tmp_path / "linkA"), *common]) == 0
        assert "1 images: 0 written, 1 skipped" in capsys.readouterr().out
    out = tmp_path / "out-files"
    assert main(["features", str(set_b), "--model", tower_dir, "--out", str(out), "--overwrite"]) == 0
    torch.testing.assert_close(F.FeatureStore(out)["0001.jpg"], llava_features(tower_dir, set_b / "0001.jpg"),
                               atol=1e-5, rtol=0)
    assert read(out / "0001.jpg.safetensors")[1]["source"] == str(set_b / "0001.jpg")


# --------------------------------------------------------------------------------------------------------------------
# 5. Names too long for the file system
# --------------------------------------------------------------------------------------------------------------------


def test_a_name_too_long_for_its_output_fails_that_image_only(tower_dir, tmp_path, capsys):
    images = tmp_path / "images"
    long_name = "x" * 240 + ".png"  # a valid name; with ".safetensors" it is 256 bytes
    fits = "y" * 226 + ".png"  # its output name (242 bytes) fits, its temp name must too
    for seed, name in enumerate(["a.png", long_name, fits, "z.png"]):
        write_image(images / name, seed=seed)
    out = tmp_path / "out"
    assert main(["features", str(images), "--model", tower_dir, "--out", str(out), "--batch-size", "2"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "4 images: 3 written, 0 skipped (output exists), 1 failed" in captured.out
    failure = [line for line in captured.err.splitlines() if line.startswith(f"  {images / long_name}: ")]
    assert len(failure) == 1 and "File name too long" in failure[0] and "256-byte" in failure[0], captured.err
    assert sorted(os.listdir(out)) == sorted(name + ".safetensors" for name in ["a.png", fits, "z.png"])
    for name in ["a.png", fits, "z.png"]:
        torch.testing.assert_close(F.FeatureStore(out)[name], llava_features(tower_dir, images / name),
                                   atol=1e-5, rtol=0)
    # --format shards keeps keys in its index: every image is stored.
    assert main(["features", str(images), "--model", tower_dir, "--out", str(tmp_path / "shards"),
                 "--format", "shards"]) == 0
    assert long_name in F.FeatureStore(tmp_path / "shards")


def test_an_image_the_resize_would_blow_up_fails_that_image_only(tower_dir, tmp_path, capsys):
    """A thin strip resized to the short side would hold billions of pixels (several GiB per worker, the whole run
    killed for lack of memory): that image fails with the reason, the others get LLaVA's features."""
    processor = CLIPImageProcessor.from_pretrained(tower_dir)
    short_side = processor.size["shortest_edge"]
    images = tmp_path / "images"
    write_image(images / "a.png", seed=0)
    # The longest strip under the limit (still LLaVA's features) and one pixel past it.
    ok_width = F.MAX_RESIZED_PIXELS // short_side**2 // 4
    write_image(images / "wide_ok.png", size=(ok_width, 4), seed=1)
    strip_width = F.MAX_RESIZED_PIXELS // short_side**2 + 1
    Image.fromarray(np.zeros((1, strip_width, 3), dtype=np.uint8)).save(images / "strip.png")
    out = tmp_path / "out"
    assert main(["features", str(images), "--model", tower_dir, "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "3 images: 2 written, 0 skipped (output exists), 1 failed" in captured.out, captured
    failure = [line for line in captured.err.splitlines() if line.startswith(f"  {images / 'strip.png'}: ")]
    assert len(failure) == 1 and f"image too elongated ({strip_width}x1)" in failure[0], captured.err
    for name in ("a.png", "wide_ok.png"):
        torch.testing.assert_close(F.FeatureStore(out)[name], llava_features(tower_dir, images / name),
                                   atol=1e-5, rtol=0)


def test_temp_names_stay_within_name_max_and_are_recognised():
    for name in ["a.png.safetensors", "y" * 230 + ".png.safetensors", "é" * 120 + ".safetensors"]:
        temp = F._temp_name(name)
        assert temp.startswith(".") and temp.endswith(".tmp")
        assert len(os.fsencode(temp)) <= F.NAME_MAX
        assert F._is_temp_of(temp, {name}) and not F._is_temp_of(temp, {"other.safetensors"})
    assert F._temp_name("a.png.safetensors").startswith(".a.png.safetensors.")


# --------------------------------------------------------------------------------------------------------------------
# 6. A full disk or a file-size limit while writing the index or a shard
# --------------------------------------------------------------------------------------------------------------------


def test_a_full_disk_at_the_index_stops_with_one_line_and_the_rerun_merges(tower_dir, tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    for index in range(4):
        write_image(images / f"{index}.png", seed=index)
    out = tmp_path / "out"
    real_write = F._write_chunk

    def full_for_the_index(descriptor, view):
        if os.path.basename(os.readlink(f"/proc/self/fd/{descriptor}")).startswith(".index.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(descriptor, view)

    monkeypatch.setattr(F, "_write_chunk", full_for_the_index)
    command = ["features", str(images), "--model", tower_dir, "--out", str(out), "--format", "shards"]
    assert main(command) == 1
    line = stopped_line(capsys.readouterr().err)
    assert "index.json: No space left on device" in line
    assert not (out / "index.json").exists() and not [name for name in os.listdir(out) if name.endswith(".tmp")]
    assert len(F.FeatureStore(out)) == 4  # the fragments count
    monkeypatch.setattr(F, "_write_chunk", real_write)
    assert main(command) == 0
    assert "4 images: 0 written, 4 skipped" in capsys.readouterr().out
    assert len(json.loads((out / "index.json").read_text())["entries"]) == 4


@pytest.mark.parametrize("fmt", ["files", "shards"])
def test_a_file_size_limit_stops_with_one_line(tower_dir, tmp_path, capsys, monkeypatch, fmt):
    images = tmp_path / "images"
    for index in range(6):
        write_image(images / f"{index}.png", seed=index)
    out = tmp_path / "out"
    real_write = F._write_chunk
    calls = []

    def limited(descriptor, view):  # what `ulimit -f` or a FAT-like maximum file size does
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        return real_write(descriptor, view)

    monkeypatch.setattr(F, "_write_chunk", limited)
    command = ["features", str(images), "--model", tower_dir, "--out", str(out), "--format", fmt, "--batch-size", "1",
               "--shard-size", "0.005"]
    assert main(command) == 1
    captured = capsys.readouterr()
    assert "File too large" in stopped_line(captured.err)
    written = len(F.FeatureStore(out))
    assert f"6 images: {written} written" in captured.out  # what was finished, never a negative count
    monkeypatch.setattr(F, "_write_chunk", real_write)
    assert main(command) == 0
    assert f"6 images: {6 - written} written, {written} skipped" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------------
# 7. Temp files of a killed --format files run
# --------------------------------------------------------------------------------------------------------------------

KILLED_RUN = r"""
import os, sys
from llava_evaclip import features as F
real, calls = F._write_chunk, []
def die(descriptor, view):
    calls.append(1)
    if len(calls) == 3:
        os.write(descriptor, bytes(view[:100]))
        os._exit(9)  # killed in the middle of the third file
    return real(descriptor, view)
F._write_chunk = die
from llava_evaclip.cli import main
sys.exit(main(["features", sys.argv[1], "--model", sys.argv[2], "--out", sys.argv[3], "--batch-size", "1"]))
"""


def test_temp_files_of_a_killed_files_run_are_removed_on_resume(tower_dir, tmp_path, capsys):
    images = tmp_path / "images"
    for index in range(4):
        write_image(images / f"{index}.png", seed=index)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(images), tower_dir, str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-3000:]
    left = [name for name in os.listdir(out) if name.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".2.png.safetensors."), os.listdir(out)
    users = [".notes.tmp", ".2.png.safetensors.tmp", "2.png.safetensors.123.abcdef12.tmp",
             ".9.png.safetensors.123.abcdef12.tmp"]  # not ours, or no output of this run
    for name in users:
        (out / name).write_text("user's")
    assert main(["features", str(images), "--model", tower_dir, "--out", str(out)]) == 0
    assert "4 images: 2 written, 2 skipped" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == sorted([f"{index}.png.safetensors" for index in range(4)] + users)
    assert F.FeatureStore(out).verify() == []


# --------------------------------------------------------------------------------------------------------------------
# 8. Unrelated .safetensors in --out
# --------------------------------------------------------------------------------------------------------------------


def test_unrelated_safetensors_in_out_are_ignored_with_a_warning(tower_dir, tmp_path, caplog, capsys):
    images = tmp_path / "work" / "images"
    write_image(images / "x.jpg", seed=1)
    out = tmp_path / "work"
    save_file({"w": torch.zeros(2)}, out / "adapter.safetensors", metadata={"format": "pt"})  # sorts first
    shutil.copytree(tower_dir, out / "mytower")  # a checkpoint in the working folder
    (out / "broken.safetensors").write_bytes(b"not safetensors")
    assert main(["features", str(images), "--model", str(out / "mytower"), "--out", str(out)]) == 0
    with caplog.at_level(logging.WARNING, logger=FEATURES_LOGGER):
        store = F.FeatureStore(out)
    assert list(store) == ["x.jpg"]
    assert store.settings["weights_fingerprint"] == F.weights_fingerprint(tower_dir)
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "ignoring 3 .safetensors file(s)" in warning and "adapter.safetensors" in warning
    assert [problem for problem in store.verify() if "broken.safetensors" in problem]
    tower, args = tower_for_llava(str(out / "mytower"))
    assert len(launch.attach_feature_cache(tower, str(out), args)) == 1  # settings from the features, not {}
    launch._feature_cache.clear()
    # A shard store beside a checkpoint: the checkpoint is not "per-image feature files".
    shard_out = tmp_path / "shard_work"
    shutil.copytree(tower_dir, shard_out / "mytower")
    capsys.readouterr()
    assert main(["features", str(images), "--model", str(shard_out / "mytower"), "--out", str(shard_out),
                 "--format", "shards"]) == 0
    assert list(F.FeatureStore(shard_out)) == ["x.jpg"] and (shard_out / "mytower" / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------------------------------
# 9. The same checkpoint at another path
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["files", "shards"])
def test_the_same_checkpoint_at_another_path_resumes(tower_dir, tmp_path, capsys, caplog, fmt):
    images = tmp_path / "images"
    for index in range(3):
        write_image(images / f"{index}.png", seed=index)
    shutil.copytree(tower_dir, tmp_path / "ckpt-1000")
    (tmp_path / "latest").symlink_to("ckpt-1000")
    out = tmp_path / "out"
    common = ["--out", str(out), "--format", fmt]
    assert main(["features", str(images / "0.png"), str(images / "1.png"), "--model", str(tmp_path / "latest"),
                 *common]) == 0
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger=FEATURES_LOGGER):
        assert main(["features", str(images), "--model", str(tmp_path / "ckpt-1000"), *common]) == 0
    assert "3 images: 1 written, 2 skipped" in capsys.readouterr().out
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert f"made from {tmp_path / 'latest'}" in warning and f"loads {tmp_path / 'ckpt-1000'}" in warning
    store = F.FeatureStore(out)
    assert list(store) == ["0.png", "1.png", "2.png"] and store.verify() == []
    for index in range(3):
        torch.testing.assert_close(store[f"{index}.png"], llava_features(tower_dir, images / f"{index}.png"),
                                   atol=1e-5, rtol=0)
    # Other weights are still refused.
    save_tower(tmp_path / "other", seed=2)
    assert main(["features", str(images), "--model", str(tmp_path / "other"), *common]) in (1, 2)
    assert "weights_fingerprint" in capsys.readouterr().err


@pytest.mark.parametrize("format", ["shards", "files"])
def test_a_store_opened_by_a_relative_path_reads_after_the_process_changes_directory(tower_dir, tmp_path, monkeypatch,
                                                                                     format):
    """Shards and per-image files are opened on first read: a store opened as "." (or any relative path) looked them
    up from whatever the current directory was by then, so a training script that changed directory after opening
    it could read nothing (FileNotFoundError). Opened as ".", through a symlink, then read from elsewhere: the
    features are the plain model's on the saved processor's pixels."""
    paths = [tmp_path / "images" / f"{index}.png" for index in range(3)]
    for index, path in enumerate(paths):
        write_image(path, seed=index)
    out = tmp_path / "out"
    F.extract_features(F.load_tower(tower_dir), [str(tmp_path / "images")], str(out), format=format)
    (tmp_path / "link").symlink_to(out)
    (tmp_path / "elsewhere").mkdir()
    expected = reference(tower_dir, paths)
    monkeypatch.chdir(out)
    from_dot = F.FeatureStore(".")
    monkeypatch.chdir(tmp_path)
    from_link = F.FeatureStore("link")
    monkeypatch.chdir(tmp_path / "elsewhere")
    for store in (from_dot, from_link):
        assert list(store) == ["0.png", "1.png", "2.png"] and store.verify() == []
        for index, key in enumerate(store):
            torch.testing.assert_close(store[key], expected[index], atol=1e-5, rtol=0)
