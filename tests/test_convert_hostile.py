"""`convert` and `zero.load_checkpoint` against a hostile tester's findings: integrity checks on every loading path,
staging dirs on storage shared between hosts, killed runs' backups, system errors through the CLI, ambiguous or
odd tensors, malformed --arch configs and the model card's record of the command. Checkpoints are toy EVA02 models
written with BAAI's original code."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import multiprocessing
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("consisid_eva_clip.model", reason="BAAI's reference code (consisid-eva-clip)")

from safetensors.torch import load_file, save_file  # noqa: E402
from test_convert_safety import snapshot, toy  # noqa: E402,F401 (toy: the module-scoped fixture, shared)

import llava_evaclip.convert as convert_module  # noqa: E402
from llava_evaclip import EvaCLIPConfig, EvaCLIPModel, zero  # noqa: E402
from llava_evaclip.cli import main as cli_main  # noqa: E402
from llava_evaclip.convert import ConversionError, convert_checkpoint, remove_stale_staging  # noqa: E402

CONVERT_LOGGER = "llava_evaclip.convert"


def state_dict_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    loaded = torch.load(checkpoint, weights_only=True)
    return dict(loaded.get("module", loaded))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def staging_name(out: str, pid: int, host: str, replaced: bool = False) -> str:
    return f".{out}.converting-{pid}@{host}-0a1b2c3d" + ("-replaced" if replaced else "")


def same_weights(a: Path, b: Path) -> bool:
    return (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and err.startswith("llava-evaclip convert: error:"), err
    return err


# ----------------------------------------------------------------------------------------------------------------------
# 1. zero.load_checkpoint runs convert's integrity checks
# ----------------------------------------------------------------------------------------------------------------------


def _corrupt_largest_member(source: Path, target: Path) -> None:
    """A finite value changed inside the largest tensor's zip member: only the CRC can tell."""
    shutil.copy(source, target)
    with zipfile.ZipFile(target) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(target, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = (int.from_bytes(handle.read(2), "little") for _ in range(2))
    offset = info.header_offset + 30 + name_length + extra_length
    data = bytearray(target.read_bytes())
    data[offset + 800: offset + 804] = b"\x00\x00\x20\x41"  # 10.0
    target.write_bytes(bytes(data))


def test_load_checkpoint_refuses_what_convert_refuses(tmp_path, toy):
    checkpoint, arch, converted = toy
    model = EvaCLIPModel(EvaCLIPConfig.from_pretrained(converted))
    before = {key: value.clone() for key, value in model.state_dict().items()}

    corrupt = tmp_path / "corrupt.bin"
    _corrupt_largest_member(checkpoint, corrupt)
    with pytest.raises(ConversionError, match="CRC") as refused:
        convert_checkpoint(corrupt, tmp_path / "out", arch=str(arch))
    with pytest.raises(ValueError, match="CRC") as error:
        zero.load_checkpoint(model, corrupt)
    assert "text.token_embedding.weight" in str(error.value) and str(refused.value) in str(error.value)

    state_dict = state_dict_of(checkpoint)  # a valid archive holding NaN / inf
    state_dict["visual.blocks.1.mlp.w3.weight"][0, 0] = float("nan")
    state_dict["logit_scale"] = torch.tensor(float("inf"))
    nan = tmp_path / "nan.pt"
    torch.save(state_dict, nan)
    with pytest.raises(ValueError, match="non-finite") as error:
        zero.load_checkpoint(model, nan)
    assert "visual.blocks.1.mlp.w3.weight" in str(error.value) and "logit_scale" in str(error.value)

    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # nothing was loaded
    assert sorted(os.listdir(tmp_path)) == ["corrupt.bin", "nan.pt"]
    # The intact checkpoint still loads.
    report = zero.load_checkpoint(model, checkpoint)
    assert report.missing_keys == [] and report.loaded_keys


# ----------------------------------------------------------------------------------------------------------------------
# 2. Staging dirs on shared storage; incomplete staging dirs are never published
# ----------------------------------------------------------------------------------------------------------------------


def test_staging_dirs_of_other_hosts_and_old_names_are_left_alone(tmp_path, caplog):
    pid, host = dead_pid(), convert_module._host_id()
    assert re.fullmatch(r"[A-Za-z0-9_]+", host)
    foreign = staging_name("a", pid, "otherhost")
    old = f".b.converting-{pid}-0a1b2c3d"  # an older version's name: no host recorded
    foreign_backup = staging_name("c", pid, "otherhost", replaced=True)
    ours = staging_name("d", pid, host)
    for name in (foreign, old, foreign_backup, ours):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger=CONVERT_LOGGER):
        cleaned = remove_stale_staging(tmp_path)
    assert cleaned == [str(tmp_path / ours)]
    assert sorted(os.listdir(tmp_path)) == sorted([foreign, old, foreign_backup])
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert foreign in warning and old in warning and foreign_backup in warning and "another host" in warning


def _host_a(checkpoint: Path, out: Path, arch: Path, pid: int, paused: Path, resume: Path, result: Path) -> None:
    """A conversion on "another host": its staging dir records a host and a pid this host cannot check (`pid` is
    dead here). Pauses after its first tensor until `resume` exists."""
    convert_module._host_id = lambda: "otherhost"
    convert_module.os.getpid = lambda: pid
    write = convert_module._write_safetensors

    def paused_write(path, tensors, produce, written):
        def produce_then_wait(key):
            tensor = produce(key)
            if not paused.exists():
                paused.touch()
                deadline = time.monotonic() + 120
                while not resume.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
            return tensor

        return write(path, tensors, produce_then_wait, written)

    convert_module._write_safetensors = paused_write
    try:
        convert_checkpoint(checkpoint, out, arch=str(arch), overwrite=True)
        result.write_text("ok")
    except BaseException as error:  # reported to the test
        result.write_text(f"{type(error).__name__}: {error}")
    os._exit(0)


def test_live_conversion_of_another_host_is_not_removed(tmp_path, toy):
    """Host B converting into the same parent while host A's conversion is mid-write leaves A's staging dir alone;
    A then publishes a complete OUT (replacing its previous output)."""
    checkpoint, arch, converted = toy
    parent = tmp_path / "shared"
    shutil.copytree(converted, parent / "model_a")
    paused, resume, result = tmp_path / "paused", tmp_path / "resume", tmp_path / "result"
    # Spawned, not forked: a fork of a process whose torch thread pool has run can hang in its first parallel op.
    process = multiprocessing.get_context("spawn").Process(
        target=_host_a, args=(checkpoint, parent / "model_a", arch, dead_pid(), paused, resume, result))
    process.start()
    try:
        deadline = time.monotonic() + 240
        while not paused.exists():
            assert process.is_alive() and time.monotonic() < deadline, "host A never reached its first tensor"
            time.sleep(0.1)
        staged = [name for name in os.listdir(parent) if ".converting-" in name]
        assert len(staged) == 1 and "@otherhost-" in staged[0]
        convert_checkpoint(checkpoint, parent / "model_b", arch=str(arch))  # host B, same parent
        assert staged[0] in os.listdir(parent)
        resume.touch()
        process.join(240)
    finally:
        if process.is_alive():
            process.kill()
            process.join()
    assert result.read_text() == "ok"
    assert sorted(os.listdir(parent)) == ["model_a", "model_b"]
    assert sorted(os.listdir(parent / "model_a")) == sorted(os.listdir(converted))
    assert same_weights(parent / "model_a", converted)


def test_incomplete_staging_dir_is_not_published(tmp_path, toy, monkeypatch, capsys):
    """Something else removes the staging dir mid-write (every write still succeeds, into an unlinked file): the
    conversion fails naming what is missing, and the previous OUT is left untouched."""
    checkpoint, arch, converted = toy
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    before = snapshot(out)
    write = convert_module._write_safetensors

    def write_then_vanish(path, tensors, produce, written):
        write(path, tensors, produce, written)
        shutil.rmtree(path.parent)  # what another host's cleanup did

    monkeypatch.setattr(convert_module, "_write_safetensors", write_then_vanish)
    assert cli_main(["convert", str(checkpoint), str(out), "--arch", str(arch), "--overwrite"]) == 2
    err = one_line_error(capsys)
    assert "incomplete" in err and "model.safetensors" in err and "left as it was" in err
    assert sorted(os.listdir(tmp_path)) == ["out"] and snapshot(out) == before


@pytest.mark.parametrize("damage", ["missing shard", "truncated shard", "no index"])
def test_weights_check_of_sharded_outputs(tmp_path, toy, damage):
    checkpoint, arch, _ = toy
    sharded = tmp_path / "sharded"
    convert_checkpoint(checkpoint, sharded, arch=str(arch), max_shard_size="2MB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and convert_module._weights_problem(sharded) is None
    if damage == "missing shard":
        shards[-1].unlink()
    elif damage == "truncated shard":
        shards[0].write_bytes(shards[0].read_bytes()[:-4])
    else:
        (sharded / "model.safetensors.index.json").unlink()
    problem = convert_module._weights_problem(sharded)
    assert problem is not None and (damage == "no index" or shards[-1 if damage == "missing shard" else 0].name
                                    in problem), problem


# ----------------------------------------------------------------------------------------------------------------------
# 3. A killed run's swapped-out previous OUT
# ----------------------------------------------------------------------------------------------------------------------


def test_incomplete_backup_is_not_restored(tmp_path, toy, caplog):
    checkpoint, arch, converted = toy
    backup = tmp_path / staging_name("out", dead_pid(), convert_module._host_id(), replaced=True)
    shutil.copytree(converted, backup)
    (backup / "model.safetensors").unlink()  # the killed run's rmtree got this far
    remains = snapshot(backup)
    with caplog.at_level(logging.WARNING, logger=CONVERT_LOGGER):
        convert_checkpoint(checkpoint, tmp_path / "out", arch=str(arch))
    assert sorted(os.listdir(tmp_path)) == sorted(["out", backup.name])
    assert same_weights(tmp_path / "out", converted) and snapshot(backup) == remains
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert backup.name in warning and "safetensors" in warning and "not restored" in warning


def test_restored_backup_is_checked_before_converting(tmp_path, toy, monkeypatch):
    """A complete backup is restored as OUT; a conversion into that very OUT then stops at once ("already exists",
    before reading anything), not after converting everything."""
    checkpoint, arch, converted = toy
    backup = tmp_path / staging_name("out", dead_pid(), convert_module._host_id(), replaced=True)
    shutil.copytree(converted, backup)

    def must_not_read(*args, **kwargs):
        raise AssertionError("the checkpoint was read although OUT exists")

    monkeypatch.setattr(convert_module, "load_source", must_not_read)
    with pytest.raises(ConversionError, match="already exists"):
        convert_checkpoint(checkpoint, tmp_path / "out", arch=str(arch))
    assert sorted(os.listdir(tmp_path)) == ["out"] and snapshot(tmp_path / "out") == snapshot(converted)


# ----------------------------------------------------------------------------------------------------------------------
# 4. System errors through the CLI
# ----------------------------------------------------------------------------------------------------------------------


def test_disk_full_is_one_line_naming_the_file(tmp_path, toy, monkeypatch, capsys):
    checkpoint, arch, _ = toy

    def no_space(fd, data):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(convert_module, "_write_all", no_space)
    assert cli_main(["convert", str(checkpoint), str(tmp_path / "out"), "--arch", str(arch)]) == 2
    err = one_line_error(capsys)
    assert "No space left on device" in err and "model.safetensors" in err and str(tmp_path) in err, err
    assert os.listdir(tmp_path) == []


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))


def test_file_size_limit_is_one_line_exit_2(tmp_path, toy):
    checkpoint, arch, _ = toy
    out = tmp_path / "parent" / "out"
    out.parent.mkdir()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "llava_evaclip", "convert", str(checkpoint), str(out), "--arch",
                          str(arch)], capture_output=True, text=True, env=env, preexec_fn=_limit_file_size,
                         timeout=300)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("llava-evaclip convert:")]
    assert len(lines) == 1 and "File too large" in lines[0] and str(out.parent) in lines[0], run.stderr
    assert os.listdir(out.parent) == []


# ----------------------------------------------------------------------------------------------------------------------
# 5, 6. Ambiguous keys and tensors that are not dense floating-point weights
# ----------------------------------------------------------------------------------------------------------------------


def test_module_prefix_collision_is_refused(tmp_path, toy):
    checkpoint, arch, _ = toy
    state_dict = state_dict_of(checkpoint)
    state_dict["module.visual.cls_token"] = torch.full_like(state_dict["visual.cls_token"], 7.0)
    path = tmp_path / "collide.pt"
    torch.save(state_dict, path)
    with pytest.raises(ConversionError, match="both 'module.visual.cls_token' and 'visual.cls_token'"):
        convert_checkpoint(path, tmp_path / "out", arch=str(arch))
    assert os.listdir(tmp_path) == ["collide.pt"]


@pytest.mark.parametrize("case", ["int64", "bool", "complex", "sparse", "quantized"])
def test_tensors_that_are_not_dense_floats_are_refused(tmp_path, toy, case):
    checkpoint, arch, _ = toy
    state_dict = state_dict_of(checkpoint)
    value = state_dict["visual.cls_token"]
    state_dict["visual.cls_token"] = {
        "int64": lambda: (value * 100).long(),
        "bool": lambda: value > 0,
        "complex": lambda: value.to(torch.complex64),
        "sparse": lambda: value.reshape(1, -1).to_sparse(),
        "quantized": lambda: torch.quantize_per_tensor(value, 0.01, 0, torch.qint8),
    }[case]()
    path = tmp_path / f"{case}.pt"
    torch.save(state_dict, path)
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(path, tmp_path / "out", arch=str(arch))
    message = str(error.value)
    if case == "quantized" and "_rebuild_qtensor" in message:  # torch 2.1's weights_only loader refuses these itself
        assert "refused this file" in message and os.listdir(tmp_path) == [path.name], message
        return
    assert "visual.cls_token" in message, message
    assert {"int64": "not floating point", "bool": "not floating point", "complex": "complex",
            "sparse": "sparse", "quantized": "quantized"}[case] in message, message
    assert os.listdir(tmp_path) == [path.name]


def test_files_are_read_by_their_contents_not_their_names(tmp_path, toy):
    checkpoint, arch, converted = toy
    tensors = {key: value.clone().contiguous() for key, value in state_dict_of(checkpoint).items()}
    renamed = tmp_path / "weights.bin"
    save_file(tensors, renamed)  # a safetensors file with a .bin name
    convert_checkpoint(renamed, tmp_path / "from_bin", arch=str(arch))
    expected = load_file(converted / "model.safetensors")
    got = load_file(tmp_path / "from_bin" / "model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[key], expected[key]) for key in got)

    misnamed = tmp_path / "weights.safetensors"
    shutil.copy(checkpoint, misnamed)  # a torch.save zip with a .safetensors name
    with pytest.raises(ConversionError, match="holds a PyTorch checkpoint") as error:
        convert_checkpoint(misnamed, tmp_path / "out", arch=str(arch))
    assert "arbitrary code" not in str(error.value)


# ----------------------------------------------------------------------------------------------------------------------
# 7. --arch: odd paths and malformed model configs, refused before anything is read
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def nothing_read(monkeypatch):
    def must_not_read(*args, **kwargs):
        raise AssertionError("the checkpoint was read before --arch was refused")

    monkeypatch.setattr(convert_module, "load_source", must_not_read)


def test_non_utf8_arch_path_is_refused_first(tmp_path, toy, nothing_read, capsys):
    checkpoint, arch, _ = toy
    odd = tmp_path / os.fsdecode(b"arch-\xff.json")
    shutil.copy(arch, odd)
    assert cli_main(["convert", str(checkpoint), str(tmp_path / "out"), "--arch", str(odd)]) == 2
    err = one_line_error(capsys)
    assert "--arch" in err and "UTF-8" in err
    assert sorted(os.listdir(tmp_path)) == [odd.name]


@pytest.mark.parametrize("change, field, expected", [
    ({"head_width": 0}, "vision_cfg.head_width", "positive integer"),
    ({"width": "wide"}, "vision_cfg.width", "positive integer"),
    ({"layers": 2.5}, "vision_cfg.layers", "positive integer"),
    ({"mlp_ratio": -1}, "vision_cfg.mlp_ratio", "positive number"),
    ({"rope": "false"}, "vision_cfg.rope", "true or false"),
    ({"head_width": 7}, "vision_cfg.width (48)", "multiple of vision_cfg.head_width (7)"),
])
def test_malformed_arch_json_names_the_field(tmp_path, toy, nothing_read, capsys, change, field, expected):
    checkpoint, arch, _ = toy
    model_cfg = json.loads(arch.read_text())
    model_cfg["vision_cfg"].update(change)
    bad = tmp_path / "bad arch.json"
    bad.write_text(json.dumps(model_cfg))
    assert cli_main(["convert", str(checkpoint), str(tmp_path / "out"), "--arch", str(bad)]) == 2
    err = one_line_error(capsys)
    assert field in err and expected in err and str(bad) in err, err
    assert os.listdir(tmp_path) == [bad.name]


def test_arch_sections_must_be_objects(tmp_path, toy, nothing_read):
    checkpoint, arch, _ = toy
    model_cfg = json.loads(arch.read_text())
    model_cfg["text_cfg"] = [1, 2]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(model_cfg))
    with pytest.raises(ValueError, match="text_cfg must be a JSON object"):
        convert_checkpoint(checkpoint, tmp_path / "out", arch=str(bad))


# ----------------------------------------------------------------------------------------------------------------------
# 8. The model card's "Reproduce" command
# ----------------------------------------------------------------------------------------------------------------------


def test_model_card_command_is_shell_quoted_and_records_the_arch(tmp_path, toy):
    checkpoint, arch, _ = toy
    folder = tmp_path / "sp ace"
    folder.mkdir()
    shutil.copy(checkpoint, folder / "my ckpt.pt")
    shutil.copy(arch, folder / "my $arch's.json")
    out_name = 'out "dir" \\ it\'s'  # quotes and a backslash: the card's shell line and Python snippet stay valid
    convert_checkpoint(folder / "my ckpt.pt", folder / out_name, arch=str(folder / "my $arch's.json"))
    card = (folder / out_name / "README.md").read_text()
    command = re.search(r"Reproduce: `([^`]*)`", card).group(1)
    assert shlex.split(command) == ["llava-evaclip", "convert", "my ckpt.pt", out_name, "--arch", "my $arch's.json"]
    snippets = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    calls = [node for snippet in snippets for node in ast.walk(ast.parse(snippet))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained"]
    assert calls and all(ast.literal_eval(call.args[0]) == out_name for call in calls), snippets
    digest = hashlib.sha256((folder / "my $arch's.json").read_bytes()).hexdigest()
    assert f"my $arch's.json`: sha256 `{digest}`" in card


def test_staging_names_stay_short_whatever_the_hostname(tmp_path, toy, monkeypatch):
    """The host id is a short digest: a long cluster hostname must not push a long (but valid) OUT name's staging
    dir past the 255-byte name limit, which the names of older versions fit."""
    checkpoint, arch, _ = toy
    monkeypatch.setattr(convert_module.socket, "gethostname", lambda: "gpu-node-0123.rack-17.cluster.example.org" * 2)
    convert_module._host_id.cache_clear()
    try:
        host = convert_module._host_id()
        assert re.fullmatch(r"[0-9a-f]{12}", host)
        out = tmp_path / ("o" * 200)
        convert_checkpoint(checkpoint, out, arch=str(arch))
        assert (out / "model.safetensors").is_file()
        assert len(convert_module._staging_name("o" * 200) + "-replaced") <= 255
    finally:
        convert_module._host_id.cache_clear()
