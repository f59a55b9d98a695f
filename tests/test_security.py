"""A security review's findings: model dirs whose `.bin` weights torch.load(weights_only=True) refuses (a hostile
pickle) are one line on every command, without torch's advice to load them with weights_only=False or to allowlist
the refused global; `inspect` of a config within the validated bounds never allocates its weights; a feature store's
index cannot make the store read a file outside its shards/ folder; named pipes among the images or as a weights file
are skipped or refused, never opened. Nothing here touches the network."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_evaclip import FeatureStore
from llava_evaclip.cli import main
import test_cli
from test_cli import SUBPROCESS_ENV, assert_one_line_error, write_image

REPO_ROOT = Path(__file__).resolve().parents[1]
vision_dir, full_dir = test_cli.vision_dir, test_cli.full_dir  # test_cli's tiny checkpoint dirs (module fixtures)


class _WritesMarker:
    """Unpickled, it would create the file named by the marker: the proof that code in a checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def hostile_copy(model_dir: str, target: Path, marker: Path) -> str:
    """`model_dir` with its safetensors weights replaced by a pytorch_model.bin holding the same tensors plus an object
    whose unpickling would run code."""
    shutil.copytree(model_dir, target)
    state_dict = dict(load_file(target / "model.safetensors"))
    (target / "model.safetensors").unlink()
    state_dict["payload"] = _WritesMarker(marker)
    torch.save(state_dict, target / "pytorch_model.bin")
    return str(target)


# ----------------------------------------------------------------------------------------------------------------------
# 1. A refused pickle: one line, convert's wording, on every command that loads a model
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["features", "visualize", "similarity"])
def test_a_refused_pickle_in_a_model_dir_is_one_line_without_torchs_advice(command, vision_dir, full_dir, tmp_path,
                                                                           capsys):
    marker = tmp_path / "code-ran"
    model = hostile_copy(full_dir if command == "similarity" else vision_dir, tmp_path / "model", marker)
    image = tmp_path / "images" / "a.png"
    write_image(str(image))
    argv = {
        "features": ["features", str(image), "--model", model, "--out", str(tmp_path / "out")],
        "visualize": ["visualize", str(image), "--model", model, "--out", str(tmp_path / "pca.png")],
        "similarity": ["similarity", "--model", model, "--images", str(image), "--texts", "a dog"],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err, "torch.load(weights_only=True) refused", "nothing was executed", "Refused:")
    # torch's own message tells the user to load the file with weights_only=False or allowlist the refused global:
    # not advice to pass on about an untrusted download (nor its terminal escape codes)
    for advice in ("weights_only` set to `False", "weights_only=False", "add_safe_globals", "safe_globals(", "\x1b"):
        assert advice not in err, (advice, err)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------------
# 2. inspect never allocates the weights of the config it describes
# ----------------------------------------------------------------------------------------------------------------------


def _limit_address_space() -> None:
    """6 GiB of address space: torch and transformers load in it, one 64 GiB weight matrix does not."""
    limit = 6 * 1024**3
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_inspect_of_a_config_at_the_validated_bounds_allocates_no_weights(vision_dir, tmp_path):
    """hidden 65536 x MLP 262144 passes the config's bounds; accelerate's init_empty_weights created each such matrix
    (64 GiB) on the CPU before moving it to the meta device: a RuntimeError traceback where the system refuses it."""
    model = tmp_path / "wide"
    shutil.copytree(vision_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_size=65536, intermediate_size=262144, num_attention_heads=512, num_hidden_layers=2)
    (model / "config.json").write_text(json.dumps(config))
    env = {**SUBPROCESS_ENV, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), SUBPROCESS_ENV.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "llava_evaclip", "inspect", str(model), "--json"],
                            capture_output=True, text=True, env=env, timeout=300, preexec_fn=_limit_address_space)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    info = json.loads(result.stdout)
    width, mlp = 65536, 262144
    per_layer_matrices = 4 * width * width + 3 * width * mlp  # q, k, v, out; SwiGLU's fc1, fc1_up and fc2
    assert info["parameters"]["vision_encoder"] > 2 * per_layer_matrices


# ----------------------------------------------------------------------------------------------------------------------
# 3. A store's index names shards in its shards/ folder only
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["absolute", "parent", "in a fragment"])
def test_a_store_naming_a_shard_outside_its_folder_is_refused(where, vision_dir, tmp_path, capsys):
    images = tmp_path / "images"
    write_image(str(images / "a.png"), seed=1)
    write_image(str(images / "b.png"), seed=2)
    store = tmp_path / "store"
    assert main(["features", str(images), "--model", vision_dir, "--out", str(store), "--format", "shards"]) == 0
    capsys.readouterr()
    outside = tmp_path / "private.safetensors"  # another file on the disk, which the store must not read
    shutil.copy(next((store / "shards").glob("*.safetensors")), outside)
    name = str(outside) if where == "absolute" else "../../private.safetensors"
    if where == "in a fragment":  # an unmerged fragment (a killed run's) is read when the store is opened too
        path = next(p for p in (store / "shards").glob("*.json"))
        (store / "index.json").unlink()
    else:
        path = store / "index.json"
    data = json.loads(path.read_text())
    data["entries"]["a.png"]["shard"] = name
    path.write_text(json.dumps(data))

    with pytest.raises(ValueError, match="names a shard outside the store's shards/ folder"):
        FeatureStore(store)
    # the command resuming into it says so in one line
    assert main(["features", str(images), "--model", vision_dir, "--out", str(store), "--format", "shards"]) == 2
    assert_one_line_error(capsys.readouterr().err, "outside the store's shards/ folder", repr(name))


# ----------------------------------------------------------------------------------------------------------------------
# 4. Named pipes are never opened: an image or weights file that is a FIFO would wait for a writer forever
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fifo(path: Path):
    """A named pipe at `path`, with a writer that opens it and at once closes it as soon as anything opens it for
    reading: code that opens it gets an empty file instead of hanging the test (the hang a user would see)."""
    os.mkfifo(path)

    def writer() -> None:
        os.close(os.open(path, os.O_WRONLY))  # blocks until a reader opens the pipe

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # release the writer if nothing opened the pipe
        thread.join(timeout=10)


def test_a_named_pipe_among_the_images_is_skipped_not_read(vision_dir, full_dir, tmp_path, capsys):
    """A FIFO named b.png in a downloaded dataset stalled `features` (every rank) and `similarity` forever."""
    images = tmp_path / "images"
    write_image(str(images / "a.png"), seed=1)
    with fifo(images / "b.png"), fifo(tmp_path / "given.png"):
        assert main(["features", str(images), str(tmp_path / "given.png"), "--model", vision_dir,
                     "--out", str(tmp_path / "out")]) == 0
        assert main(["similarity", "--model", full_dir, "--images", str(images), "--texts", "a"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "failed" not in err, err
    assert err.count("b.png: not a regular file") == 3, err  # warned by features and similarity, listed by features
    assert "given.png: not a regular file" in err, err
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png.safetensors"]


def test_a_named_pipe_as_a_weights_file_is_refused_not_read(vision_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(vision_dir, model)
    (model / "model.safetensors").unlink()
    with fifo(model / "model.safetensors"):
        assert main(["inspect", str(model)]) == 2
    assert_one_line_error(capsys.readouterr().err, "model.safetensors", "not a regular file")
    with fifo(tmp_path / "checkpoint.pt") as source:  # convert said such a SRC "does not exist"
        assert main(["convert", str(source), str(tmp_path / "out"), "--arch", "EVA02-CLIP-B-16"]) == 2
    assert_one_line_error(capsys.readouterr().err, "checkpoint.pt", "not a regular file")
    assert not (tmp_path / "out").exists()
