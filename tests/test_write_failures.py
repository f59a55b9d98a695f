"""Failures in the middle of writing, against a hostile tester's findings: a file-size limit hit while `visualize`
writes its PNG, the tokenizers library refusing a write inside `convert`, a previous OUT that `--overwrite` cannot
remove, the mode of a replaced OUT, two `features` runs writing into one folder at once (and the lock that stops the
second), a dangling symlink as --out, and SIGTERM sent to a `features` run's whole process group. Each test states what
the user must find afterwards: previous outputs intact, no half file, one error line, and a store a rerun completes.
The machine may be a loaded 2-core one: no test waits a fixed time for another process, each waits for a file it
creates."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llava_evaclip import features as F
from llava_evaclip.cli import main
from test_features import tower_dir, write_image  # noqa: F401 (tower_dir: module-scoped fixture)

CONVERT_LOGGER = "llava_evaclip.convert"


def error_lines(err: str, command: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith(f"llava-evaclip {command}: error:")]


# ----------------------------------------------------------------------------------------------------------------------
# 1. visualize: a write the system refuses is one line, and the previous PNG stays
# ----------------------------------------------------------------------------------------------------------------------


def test_visualize_past_a_file_size_limit_is_one_line_and_keeps_the_previous_png(tower_dir, tmp_path, capsys):
    write_image(tmp_path / "cat.png", seed=3)
    out = tmp_path / "pca.png"
    out.write_bytes(b"the user's previous picture")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))  # CPython ignores SIGXFSZ: the write fails with EFBIG
    try:
        status = main(["visualize", str(tmp_path / "cat.png"), "--model", tower_dir, "--out", str(out),
                       "--overwrite"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err
    lines = error_lines(err, "visualize")
    assert status == 2 and len(lines) == 1, err
    assert "File too large" in lines[0] and str(out) in lines[0] and "left as it was" in lines[0], lines[0]
    assert out.read_bytes() == b"the user's previous picture"
    assert sorted(os.listdir(tmp_path)) == ["cat.png", "pca.png"]  # no temp file
    assert main(["visualize", str(tmp_path / "cat.png"), "--model", tower_dir, "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


# ----------------------------------------------------------------------------------------------------------------------
# 2. Two `features` runs into one folder: the second refuses while the first writes
# ----------------------------------------------------------------------------------------------------------------------


PAUSED_RUN = r"""
import os, sys, time
from llava_evaclip import features as F
marker, release = sys.argv[1], sys.argv[2]
real = F._write_chunk
def paused(descriptor, view):  # the first write waits (saying so through `marker`) until `release` exists
    if not os.path.exists(marker):
        open(marker, "w").close()
        deadline = time.monotonic() + 240
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.02)
    return real(descriptor, view)
F._write_chunk = paused
from llava_evaclip.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("fmt", ["files", "shards"])
def test_a_second_features_run_into_the_same_folder_is_refused(tower_dir, tmp_path, capsys, fmt):
    """Without the lock the second run removed the first's temp files (the resume cleanup) or its unindexed shards
    (the index merge), and the first then failed, or indexed a shard that was gone."""
    images = tmp_path / "images"
    for index in range(4):
        write_image(images / f"{index}.png", seed=index)
    out = tmp_path / "out"
    argv = ["features", str(images), "--model", tower_dir, "--out", str(out), "--format", fmt, "--batch-size", "1",
            "--shard-size", "0.001"]
    marker, release = tmp_path / "paused", tmp_path / "release"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(marker), str(release), *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert first.poll() is None, f"the first run ended early: {first.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "the first run never reached its first write"
            time.sleep(0.05)
        before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
        assert main(argv) == 2
        lines = error_lines(capsys.readouterr().err, "features")
        assert len(lines) == 1 and "another `llava-evaclip features` run is writing to" in lines[0], lines
        assert f"pid {first.pid}" in lines[0]
        assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before  # nothing touched
        release.touch()
        _, first_err = first.communicate(timeout=240)
        assert first.returncode == 0, first_err[-3000:]
    finally:
        release.touch()
        if first.poll() is None:
            first.kill()
            first.wait()
    store = F.FeatureStore(out)
    assert len(store) == 4 and store.verify() == []
    assert not (out / F.LOCK_NAME).exists()
    capsys.readouterr()
    assert main(argv) == 0  # the lock is free again: a rerun finds everything done
    assert "4 images: 0 written, 4 skipped" in capsys.readouterr().out


def test_the_lock_of_a_killed_run_does_not_block_the_next(tower_dir, tmp_path, capsys):
    write_image(tmp_path / "images" / "a.png", seed=1)
    out = tmp_path / "out"
    child = multiprocessing.get_context("fork").Process(
        target=lambda: os._exit(0 if F._try_lock(str(out))[0] is not None else 3))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and (out / F.LOCK_NAME).exists()  # killed while holding it: the file stays
    assert main(["features", str(tmp_path / "images"), "--model", tower_dir, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["a.png.safetensors"]


def test_resuming_a_store_whose_index_names_a_missing_shard_is_refused(tower_dir, tmp_path, capsys):
    """A shard deleted by hand (or lost with a disk) while the index still names it: a resume counted its images as
    done, so they silently stayed without features. It is refused, naming the shard, and nothing else changes."""
    for index in range(3):
        write_image(tmp_path / "images" / f"{index}.png", seed=index)
    out = tmp_path / "out"
    argv = ["features", str(tmp_path / "images"), "--model", tower_dir, "--out", str(out), "--format", "shards"]
    assert main(argv) == 0
    shards = sorted((out / F.SHARDS_DIR).glob("*.safetensors"))
    assert shards
    shards[0].unlink()
    before = sorted(path.name for path in out.rglob("*"))
    capsys.readouterr()
    assert main(argv) == 2
    lines = error_lines(capsys.readouterr().err, "features")
    assert len(lines) == 1 and "missing" in lines[0] and shards[0].name in lines[0], lines
    assert sorted(path.name for path in out.rglob("*")) == before


def test_a_damaged_index_is_named_and_the_remedy_it_gives_restores_the_store(tower_dir, tmp_path, capsys):
    """An index.json damaged outside the program (its own writes are atomic) gave json's bare "Expecting property
    name ..." with no file named. Now one line names it and says to remove it; doing so rebuilds the index from the
    shards' fragments, and the store reads back exactly as before."""
    for index in range(3):
        write_image(tmp_path / "images" / f"{index}.png", seed=index)
    out = tmp_path / "out"
    argv = ["features", str(tmp_path / "images"), "--model", tower_dir, "--out", str(out), "--format", "shards"]
    assert main(argv) == 0
    store = F.FeatureStore(str(out))
    before = {key: store[key].clone() for key in store}
    (out / "index.json").write_text('{"format": "llava-evaclip')
    capsys.readouterr()
    assert main(argv) == 2
    lines = error_lines(capsys.readouterr().err, "features")
    assert len(lines) == 1 and "index.json is damaged" in lines[0] and "remove it" in lines[0], lines
    (out / "index.json").unlink()
    assert main(argv) == 0
    assert "3 skipped" in capsys.readouterr().out
    after = F.FeatureStore(str(out))
    assert len(before) == 3 and sorted(after) == sorted(before)
    assert all(torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize("edit", ["entries_a_list", "entry_a_string", "entry_without_tensor", "settings_a_string"])
def test_an_index_of_valid_json_but_the_wrong_shape_is_named_as_damaged(tower_dir, tmp_path, capsys, edit):
    """An index.json edited by hand into valid JSON of another shape (entries a list, an entry a string or without
    its tensor name, settings a string) stopped with a bare KeyError / AttributeError, or let a read fail later in a
    training worker: it is named as damaged, with its remedy, as broken JSON is; nothing is written."""
    import json

    for index in range(2):
        write_image(tmp_path / "images" / f"{index}.png", seed=index)
    out = tmp_path / "out"
    argv = ["features", str(tmp_path / "images"), "--model", tower_dir, "--out", str(out), "--format", "shards"]
    assert main(argv) == 0
    index = json.loads((out / "index.json").read_text())
    key = sorted(index["entries"])[0]
    if edit == "entries_a_list":
        index["entries"] = list(index["entries"])
    elif edit == "entry_a_string":
        index["entries"][key] = "shards/x.safetensors"
    elif edit == "entry_without_tensor":
        del index["entries"][key]["tensor"]
    else:
        index["settings"] = "eva02"
    (out / "index.json").write_text(json.dumps(index))
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(ValueError, match="index.json is damaged .*remove it and rerun"):
        F.FeatureStore(str(out))
    capsys.readouterr()
    assert main(argv) == 2
    lines = error_lines(capsys.readouterr().err, "features")
    assert len(lines) == 1 and "index.json is damaged" in lines[0] and "remove it" in lines[0], lines
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


# ----------------------------------------------------------------------------------------------------------------------
# 3. convert: writes refused inside libraries, a previous OUT that cannot be removed, the mode of a replaced OUT
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    pytest.importorskip("consisid_eva_clip.model", reason="BAAI's reference code (consisid-eva-clip)")
    from test_convert import build_baai, write_baai

    directory = tmp_path_factory.mktemp("toy")
    checkpoint, arch = write_baai(directory, "EVA02-CLIP-B-16", build_baai("EVA02-CLIP-B-16", seed=21))
    return checkpoint, arch


def _convert(toy, out: Path, *extra: str) -> int:
    checkpoint, arch = toy
    return main(["convert", str(checkpoint), str(out), "--arch", str(arch), *extra])


def test_a_tokenizer_write_the_system_refuses_is_one_line(toy, tmp_path, capsys, monkeypatch):
    """tokenizers (Rust) raises a plain `Exception: ... (os error N)` where the disk is full; here the same error comes
    from a folder standing where tokenizer.json goes (os error 21)."""
    import llava_evaclip.convert as convert_module

    real = convert_module.write_processor

    def blocked(config, directory):
        (Path(directory) / "tokenizer.json").mkdir()
        return real(config, directory)

    monkeypatch.setattr(convert_module, "write_processor", blocked)
    parent = tmp_path / "parent"
    parent.mkdir()
    assert _convert(toy, parent / "out") == 2
    lines = error_lines(capsys.readouterr().err, "convert")
    assert len(lines) == 1 and "Is a directory" in lines[0] and str(parent) in lines[0], lines
    assert os.listdir(parent) == []


def test_overwrite_keeps_the_mode_of_the_folder_it_replaces(toy, tmp_path):
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        assert _convert(toy, out) == 0
        os.chmod(out, 0o700)  # made private by its owner
        assert _convert(toy, out, "--overwrite") == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    assert [name for name in os.listdir(tmp_path) if name != "out"] == []


def test_a_previous_output_that_cannot_be_removed_is_not_reported_as_kept(toy, tmp_path, capsys, caplog,
                                                                          monkeypatch):
    """The new OUT is in place when the old one's removal fails (a read-only folder for a non-root user): the run
    succeeded and says where the old files are, instead of "stopped ... OUT was left as it was"."""
    import llava_evaclip.convert as convert_module

    out = tmp_path / "out"
    assert _convert(toy, out) == 0
    config = json.loads((out / "config.json").read_text())
    config["old_marker"] = True
    (out / "config.json").write_text(json.dumps(config))
    real_remove = convert_module._remove

    def read_only(path):
        if path.name.endswith("-replaced"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "config.json")
        return real_remove(path)

    monkeypatch.setattr(convert_module, "_remove", read_only)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger=CONVERT_LOGGER):
        assert _convert(toy, out, "--overwrite") == 0
    err = capsys.readouterr().err
    assert "left as it was" not in err and "error" not in err, err
    assert "old_marker" not in json.loads((out / "config.json").read_text())  # replaced
    backups = [name for name in os.listdir(tmp_path) if name.endswith("-replaced")]
    assert len(backups) == 1
    assert json.loads((tmp_path / backups[0] / "config.json").read_text())["old_marker"] is True
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "could not be removed" in warning and str(tmp_path / backups[0]) in warning, warning


# ----------------------------------------------------------------------------------------------------------------------
# 4. features: what sits where the lock file or --out goes
# ----------------------------------------------------------------------------------------------------------------------


def test_a_symlink_under_the_lock_name_is_not_written_through(tower_dir, tmp_path):
    write_image(tmp_path / "images" / "a.png", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's notes")
    (out / F.LOCK_NAME).symlink_to(precious)
    assert main(["features", str(tmp_path / "images"), "--model", tower_dir, "--out", str(out)]) == 0
    assert precious.read_text() == "the user's notes"
    assert (out / F.LOCK_NAME).is_symlink() and (out / "a.png.safetensors").is_file()


def test_a_dangling_symlink_as_out_is_named_as_such(tower_dir, tmp_path, capsys):
    write_image(tmp_path / "images" / "a.png", seed=1)
    (tmp_path / "out").symlink_to(tmp_path / "gone" / "features")
    assert main(["features", str(tmp_path / "images"), "--model", tower_dir, "--out", str(tmp_path / "out")]) == 2
    lines = error_lines(capsys.readouterr().err, "features")
    assert len(lines) == 1 and "is a symlink to" in lines[0] and "does not exist" in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["images", "out"]


# ----------------------------------------------------------------------------------------------------------------------
# 5. SIGTERM to the whole process group (Slurm's scancel) while DataLoader workers decode
# ----------------------------------------------------------------------------------------------------------------------

STALLED_RUN = r"""
import os, sys, time
from llava_evaclip import features as F
marker = sys.argv[1]
real, calls = F._write_chunk, []
def stall(descriptor, view):  # the third file's write waits for the signal, the workers' batches queued behind it
    calls.append(1)
    if len(calls) == 3:
        open(marker, "w").close()
        time.sleep(240)
    return real(descriptor, view)
F._write_chunk = stall
from llava_evaclip.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_to_the_process_group_with_workers_is_one_line_and_resumes_identically(tower_dir, tmp_path, capsys):
    images = tmp_path / "images"
    for index in range(12):
        write_image(images / f"{index:02d}.png", seed=index)
    argv = ["features", str(images), "--model", tower_dir, "--batch-size", "1", "--workers", "2"]
    out, marker = tmp_path / "out", tmp_path / "stalled"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    run = subprocess.Popen([sys.executable, "-c", STALLED_RUN, str(marker), *argv, "--out", str(out)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert run.poll() is None, run.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never reached its third file"
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGTERM)  # the main process and its decoding workers, as scancel does
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    lines = [line for line in err.splitlines() if line.strip() and "img/s" not in line
             and not line.startswith(("Please", "Optional"))]  # progress bar, BAAI code's import notes
    assert run.returncode == 143 and lines == ["llava-evaclip features: terminated (SIGTERM)"], err[-3000:]
    assert sorted(os.listdir(out)) == ["00.png.safetensors", "01.png.safetensors"]  # no temp file, no lock
    assert main([*argv, "--out", str(out)]) == 0
    assert main([*argv, "--out", str(tmp_path / "uninterrupted")]) == 0
    resumed, reference = F.FeatureStore(out), F.FeatureStore(tmp_path / "uninterrupted")
    assert list(resumed) == list(reference) and resumed.verify() == []
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
