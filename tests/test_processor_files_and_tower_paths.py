"""Review of the cross-version processor reading, the tower's path errors and the CLI's module entry point: a dir
holding both transformers 5's processor_config.json and an older or newer preprocessor_config.json, a tower crop-size
error naming the file the processor came from, `~` and `dir/name` tower paths, and `python -m llava_evaclip.cli`.
The references are transformers' own readers of the same files and `python -m llava_evaclip`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoImageProcessor, CLIPImageProcessor

from conftest import tiny_vision_config, without_deepspeed_import_log
from llava_evaclip import EvaCLIPVisionModel, EvaCLIPVisionTower
from llava_evaclip.processing import build_image_processor, image_processor_settings, load_image_processor

TF5 = int(transformers.__version__.split(".")[0]) >= 5
REPO = Path(__file__).resolve().parents[1]
TOWER_ARGS = types.SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch")


def _tower_dir(path: Path, **nested_settings) -> dict:
    """A converted tower dir (weights, config, preprocessor_config.json) plus, as transformers 5's
    `processor.save_pretrained` writes it, a processor_config.json whose nested image processor has `nested_settings`.
    Returns the nested dict."""
    config = tiny_vision_config("eva02")
    EvaCLIPVisionModel(config).save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    nested = build_image_processor(config)
    for key, value in nested_settings.items():
        setattr(nested, key, value)
    nested = json.loads(nested.to_json_string())
    (path / "processor_config.json").write_text(json.dumps({"image_processor": nested}))
    return nested


def _preprocessor_file_settings(path: Path) -> dict:
    """What transformers 4.x reads there: preprocessor_config.json alone."""
    return image_processor_settings(
        CLIPImageProcessor.from_dict(json.loads((path / "preprocessor_config.json").read_text())))


def test_differing_processor_files_are_read_as_transformers_5_reads_them_and_said(tmp_path, caplog):
    """A processor re-saved on 4.37 (preprocessor_config.json) after 5.x wrote processor_config.json, or the reverse:
    the two lines' transformers read different files, and the user's newer edit may be the ignored one. The nested
    processor is used (transformers 5's rule, its AutoImageProcessor on 5.x), with a warning naming both files and
    the settings that differ; before, only an info message (hidden by default) said so."""
    nested = _tower_dir(tmp_path, image_mean=[0.5, 0.5, 0.5])
    assert _preprocessor_file_settings(tmp_path)["image_mean"] != [0.5, 0.5, 0.5]  # the files really differ
    with caplog.at_level(logging.WARNING):
        processor = load_image_processor(tmp_path, tiny_vision_config("eva02"))
    expected = image_processor_settings(
        AutoImageProcessor.from_pretrained(tmp_path) if TF5 else CLIPImageProcessor.from_dict(nested))
    assert image_processor_settings(processor) == expected
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING
                and "processor_config.json" in record.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "preprocessor_config.json" in warnings[0] and "image_mean" in warnings[0]
    assert "image_std" not in warnings[0]  # only what differs


def test_equal_processor_files_load_without_a_warning(tmp_path, caplog):
    _tower_dir(tmp_path)
    with caplog.at_level(logging.WARNING):
        processor = load_image_processor(tmp_path, tiny_vision_config("eva02"))
    assert image_processor_settings(processor) == _preprocessor_file_settings(tmp_path)
    assert "processor_config.json" not in caplog.text


def test_a_crop_size_error_names_the_file_the_processor_came_from(tmp_path):
    """The crop size came from processor_config.json: the error told the user to fix preprocessor_config.json, which
    holds the right size already (and would change nothing)."""
    _tower_dir(tmp_path, crop_size={"height": 32, "width": 32})
    tower = EvaCLIPVisionTower(str(tmp_path), args=TOWER_ARGS, delay_load=True)
    with pytest.raises(ValueError, match="32x32") as error:
        tower.load_model()
    assert "fix crop_size in its processor_config.json" in str(error.value)


def test_a_tilde_tower_path_says_only_a_shell_expands_it(tmp_path, monkeypatch):
    """`mm_vision_tower: "~/towers/eva"` (a quoted --vision_tower, a JSON config): the dir exists under $HOME, yet the
    error said it does not exist and blamed the current directory only."""
    home = tmp_path / "home"
    (home / "towers" / "eva").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as error:
        EvaCLIPVisionTower("~/towers/eva", args=TOWER_ARGS, delay_load=True)
    message = str(error.value)
    assert os.path.expanduser("~/towers/eva") == str(home / "towers" / "eva")
    assert f"{home / 'towers' / 'eva'} is a directory" in message and "shell" in message


def test_a_two_part_relative_tower_path_gets_the_current_directory_hint(tmp_path, monkeypatch):
    """`checkpoints/eva02` is how LLaVA's scripts name a tower dir; it is also the shape of a Hub id, which is why it
    got no hint at all."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as error:
        EvaCLIPVisionTower("checkpoints/eva02", args=TOWER_ARGS, delay_load=True)
    assert str(tmp_path) in str(error.value) and "mm_vision_tower" in str(error.value)


def _run_cli(*args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=300)


def test_python_m_cli_module_ends_a_command_error_with_one_line(tmp_path):
    """`python -m llava_evaclip.cli` ran cli.py as __main__, whose CLIError is not the one the commands raise: a
    traceback and status 1 instead of the one line and status 2 of `python -m llava_evaclip`."""
    missing = str(tmp_path / "missing")
    reference = _run_cli("-m", "llava_evaclip", "inspect", missing)
    result = _run_cli("-m", "llava_evaclip.cli", "inspect", missing)
    expected = without_deepspeed_import_log(reference.stderr)
    assert reference.returncode == 2 and expected.count("\n") == 1
    assert (result.returncode, without_deepspeed_import_log(result.stderr)) == (reference.returncode, expected)


HUB_WORKER = r"""
import json, sys, types
import transformers
from llava_evaclip.processing import image_processor_settings
from llava_evaclip.tower import EvaCLIPVisionTower
tower = EvaCLIPVisionTower("org/tower", types.SimpleNamespace(mm_vision_select_layer=-2,
                                                              mm_vision_select_feature="patch"), delay_load=True)
tower.load_model()
out = {"tower": image_processor_settings(tower.image_processor)}
if int(transformers.__version__.split(".")[0]) >= 5:
    out["auto"] = image_processor_settings(transformers.AutoImageProcessor.from_pretrained("org/tower"))
print(json.dumps(out))
"""


def test_a_hub_tower_uses_the_processor_transformers_5_saved_there(tmp_path):
    """`--vision_tower org/tower` (a Hub repo id: here an offline cache) whose processor was re-saved on transformers
    5: the tower read the nested processor on 5.x (through transformers) but preprocessor_config.json on 4.37, which
    the local-dir fix did not cover. Both lines must use the nested one, as 5.x's AutoImageProcessor does."""
    snapshot = tmp_path / "hub" / "models--org--tower" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    nested = _tower_dir(snapshot, image_mean=[0.5, 0.5, 0.5])
    (tmp_path / "hub" / "models--org--tower" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tower" / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([*filter(None, [os.environ.get("PYTHONPATH")]), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", HUB_WORKER], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    expected = out["auto"] if TF5 else image_processor_settings(CLIPImageProcessor.from_dict(nested))
    assert out["tower"] == expected and expected["image_mean"] == [0.5, 0.5, 0.5]
    assert _preprocessor_file_settings(snapshot)["image_mean"] != expected["image_mean"]


def _clip_processor_classes() -> list[type]:
    """The installed transformers' CLIP image processors: numpy (4.x; `CLIPImageProcessorPil` on 5.x) and tensor
    (`CLIPImageProcessorFast` on 4.4x-4.5x; the default on 5.x) ones."""
    import transformers

    classes = []
    for name in ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil"):
        try:
            cls = getattr(transformers, name)
        except (AttributeError, ImportError):
            continue
        if isinstance(cls, type) and cls not in classes:
            classes.append(cls)
    return classes


@pytest.mark.parametrize("height", [1, 3, 70])
def test_rgb_image_kwargs_let_every_clip_processor_read_a_pil_image(height):
    """The CLI hands RGB PIL images to the tower's processor. A numpy processor must be told the channels are last (it
    took a height of 1 or 3 for them); a tensor processor of 4.56 (fast) or 5.5 told so fails with a shape error on the
    tensor it made of the image. Reference: the same pixels as a channels-last uint8 array, which every processor
    reads one way."""
    from llava_evaclip.processing import rgb_image_kwargs

    pixels = np.random.default_rng(height).integers(0, 256, (height, 90, 3), dtype=np.uint8)
    for cls in _clip_processor_classes():
        processor = cls(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        expected = processor([pixels], input_data_format="channels_last", return_tensors="pt")["pixel_values"]
        got = processor([Image.fromarray(pixels)], return_tensors="pt", **rgb_image_kwargs(processor))["pixel_values"]
        assert torch.equal(got, expected), cls.__name__
