"""`convert` under hostile conditions: what --overwrite may remove, signals and killed runs, corrupted and non-finite
checkpoints, a wrong --arch, malformed Hugging Face dirs, file modes; and what the written dir holds (streamed
shards, processor files, model card). Checkpoints are toy EVA02 models written with BAAI's original code."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("consisid_eva_clip.model", reason="BAAI's reference code (consisid-eva-clip)")

from safetensors.torch import load_file  # noqa: E402
from test_convert import FAMILIES, build_baai, write_baai  # noqa: E402
from transformers import AutoProcessor, CLIPImageProcessor, CLIPProcessor  # noqa: E402

import llava_evaclip.convert as convert_module  # noqa: E402
from llava_evaclip import EvaCLIPModel  # noqa: E402
from llava_evaclip.cli import main as cli_main  # noqa: E402
from llava_evaclip.convert import ConversionError, convert_checkpoint  # noqa: E402

FAMILY = "EVA02-CLIP-B-16"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A BAAI release-layout checkpoint, its BAAI model config and a finished conversion of it."""
    directory = tmp_path_factory.mktemp("toy")
    checkpoint, arch = write_baai(directory, FAMILY, build_baai(FAMILY, seed=21))
    converted = directory / "converted"
    convert_checkpoint(checkpoint, converted, arch=str(arch))
    return checkpoint, arch, converted


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below `root` (not following symlinks) with its bytes."""
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if not path.is_symlink():
                files[str(path.relative_to(root))] = path.read_bytes()
    return files


@pytest.fixture
def workspace(tmp_path, toy, monkeypatch):
    """tmp/ckpts/toy.pt with a neighbour, plus a guard that fails if the checkpoint is read at all."""
    checkpoint, arch, converted = toy
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    shutil.copy(checkpoint, ckpts / "toy.pt")
    (ckpts / "notes.txt").write_text("my notes")

    def must_not_read(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output path was refused")

    monkeypatch.setattr(convert_module, "load_source", must_not_read)
    return ckpts / "toy.pt", arch, converted


def refused(capsys, src, out, arch, expected: str) -> None:
    """The CLI refuses with one line naming `expected`, exit 2."""
    assert cli_main(["convert", str(src), str(out), "--arch", str(arch), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and err.count("\n") == 0 and "Traceback" not in err, err


# ----------------------------------------------------------------------------------------------------------------------
# --overwrite never removes what is not a previous convert output
# ----------------------------------------------------------------------------------------------------------------------


def test_overwrite_refuses_src(tmp_path, workspace, capsys):
    src, arch, _ = workspace
    before = snapshot(tmp_path)
    refused(capsys, src, src, arch, "is SRC")
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_folder_holding_src(tmp_path, workspace, capsys):
    src, arch, _ = workspace
    before = snapshot(tmp_path)
    refused(capsys, src, src.parent, arch, "contains SRC")
    refused(capsys, src, tmp_path, arch, "contains SRC")
    refused(capsys, src, f"{src.parent}/./", arch, "contains SRC")
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_symlink_to_src_folder(tmp_path, workspace, capsys):
    src, arch, _ = workspace
    link = tmp_path / "link"
    link.symlink_to(src.parent, target_is_directory=True)
    before = snapshot(tmp_path)
    refused(capsys, src, link, arch, "contains SRC")
    assert link.is_symlink() and snapshot(tmp_path) == before


def test_non_utf8_paths_are_refused_before_anything_is_read(tmp_path, workspace, capsys):
    """torch.load, safetensors and the tokenizers backend each fail deep inside on such names; convert says so first."""
    src, arch, _ = workspace
    odd = os.fsdecode(b"odd-\xff\xfe")
    odd_src = src.parent / odd
    os.link(src, odd_src)
    before = snapshot(tmp_path)
    for role, source, out in (("OUT", src, tmp_path / odd), ("SRC", odd_src, tmp_path / "out")):
        assert cli_main(["convert", str(source), str(out), "--arch", str(arch)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{role} " in err and "is not a UTF-8 path" in err, err
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_current_directory_and_ancestors(tmp_path, workspace, capsys, monkeypatch):
    src, arch, converted = workspace
    monkeypatch.chdir(src.parent)  # the case: `convert toy.pt . --overwrite` beside toy.pt
    before = snapshot(tmp_path)
    refused(capsys, "toy.pt", ".", arch, "contains SRC")
    # A previous output that is the working dir (or holds it) is not removed either.
    previous = tmp_path / "previous"
    shutil.copytree(converted, previous)
    (previous / "sub").mkdir()
    monkeypatch.chdir(previous / "sub")
    refused(capsys, src, "..", arch, "current directory or one of its ancestors")
    (previous / "sub").rmdir()
    monkeypatch.chdir(previous)
    refused(capsys, src, ".", arch, "current directory or one of its ancestors")
    assert snapshot(tmp_path) == {**before, **{f"previous/{k}": v for k, v in snapshot(converted).items()}}


def test_overwrite_refuses_home(tmp_path, workspace, capsys, monkeypatch, toy):
    src, arch, converted = workspace
    home = tmp_path / "home"
    shutil.copytree(converted, home)  # even a dir that looks like a convert output
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(tmp_path)
    refused(capsys, src, home, arch, "home directory")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["user files", "extra file", "clip model", "no weights", "a file"])
def test_overwrite_refuses_other_folders(tmp_path, workspace, capsys, case):
    src, arch, converted = workspace
    out = tmp_path / "out"
    if case == "a file":
        out.write_text("not a folder")
    elif case == "user files":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    else:
        shutil.copytree(converted, out)
        if case == "extra file":
            (out / "features").mkdir()
            (out / "features" / "dog.safetensors").write_bytes(b"computed features")
        elif case == "clip model":  # e.g. a downloaded openai/clip-vit checkpoint or an InternVL-port dir
            config = json.loads((out / "config.json").read_text())
            (out / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
        else:
            (out / "model.safetensors").unlink()
    before = snapshot(tmp_path)
    refused(capsys, src, out, arch, "not a previous convert output")
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_previous_output(tmp_path, toy):
    checkpoint, arch, converted = toy
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    (out / "model.safetensors").write_bytes(b"stale")
    with pytest.raises(ConversionError, match="--overwrite"):
        convert_checkpoint(checkpoint, out, arch=str(arch))
    assert (out / "model.safetensors").read_bytes() == b"stale"
    convert_checkpoint(checkpoint, out, arch=str(arch), overwrite=True)
    new, expected = snapshot(out), snapshot(converted)
    assert new.pop("README.md") != b"" and expected.pop("README.md") != b""  # the card names its folder
    assert new == expected
    assert os.listdir(tmp_path) == ["out"]


def test_out_below_a_file_and_malformed_hf_dirs(tmp_path, toy, capsys):
    checkpoint, arch, converted = toy
    assert cli_main(["convert", str(checkpoint), f"{checkpoint}/sub", "--arch", str(arch)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a file" in err and err.count("\n") == 0, err

    listed = tmp_path / "listed"
    shutil.copytree(converted, listed)
    (listed / "model.safetensors").rename(listed / "model-00001-of-00001.safetensors")
    (listed / "model.safetensors.index.json").write_text(json.dumps(["model-00001-of-00001.safetensors"]))
    stringly = tmp_path / "stringly"
    shutil.copytree(converted, stringly)
    config = json.loads((stringly / "config.json").read_text())
    config["vision_config"]["hidden_size"] = "forty-eight"
    (stringly / "config.json").write_text(json.dumps(config))
    for src, expected in ((listed, "weight_map"), (stringly, "config.json")):
        assert cli_main(["convert", str(src), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and err.count("\n") == 0 and "Traceback" not in err, err
        with pytest.raises(ConversionError):
            convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Signals and killed runs
# ----------------------------------------------------------------------------------------------------------------------

def _paused_convert(marker: Path, stderr_path: Path, argv: list[str]) -> None:
    """A forked process running the CLI whose weight writer pauses after its first tensor (saying so through
    `marker`), so a signal lands mid-conversion; its stderr goes to `stderr_path`."""
    sys.stderr = open(stderr_path, "w", buffering=1)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal session, also when the tests run under nohup
    write = convert_module._write_safetensors

    def paused_write(path, tensors, produce, written):
        def produce_then_wait(key):
            tensor = produce(key)
            if not marker.exists():
                marker.touch()
                time.sleep(120)
            return tensor

        return write(path, tensors, produce_then_wait, written)

    convert_module._write_safetensors = paused_write
    status = cli_main(["convert", *argv])
    sys.stderr.flush()
    os._exit(status)


def _start_paused(tmp_path: Path, name: str, *argv: str) -> tuple[multiprocessing.Process, Path, Path]:
    """Forked from the test process (torch is imported once, not per run)."""
    marker, stderr_path = tmp_path / f"{name}.paused", tmp_path / f"{name}.stderr"
    process = multiprocessing.get_context("fork").Process(target=_paused_convert,
                                                          args=(marker, stderr_path, list(argv)))
    process.start()
    return process, marker, stderr_path


def _wait_for(process: multiprocessing.Process, marker: Path) -> None:
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert process.is_alive(), f"the conversion ended early (exit {process.exitcode})"
        assert time.monotonic() < deadline, "the conversion never reached its first tensor"
        time.sleep(0.1)


def staging_dirs(parent: Path) -> list[str]:
    return sorted(name for name in os.listdir(parent) if ".converting-" in name)


def test_signals_clean_up_and_killed_runs_are_cleaned_next_time(tmp_path, toy):
    """SIGTERM (exit 143), SIGINT (exit 130) and SIGHUP (a closed terminal, 129) remove the staging dir and keep the
    previous OUT; a SIGKILLed run's staging dir is removed by the next conversion into the same parent."""
    checkpoint, arch, converted = toy
    runs = {}
    for name, signum in (("term", signal.SIGTERM), ("int", signal.SIGINT), ("hup", signal.SIGHUP),
                         ("kill", signal.SIGKILL)):
        parent = tmp_path / name
        parent.mkdir()
        out = parent / "out"
        shutil.copytree(converted, out)  # a previous output, replaced with --overwrite
        (out / "config.json").write_text((out / "config.json").read_text() + "\n")  # marks the old one
        runs[name] = (signum, parent, snapshot(parent),
                      *_start_paused(tmp_path, name, str(checkpoint), str(out), "--arch", str(arch), "--overwrite"))
    try:
        for name, (signum, parent, before, process, marker, _) in runs.items():
            _wait_for(process, marker)
            assert len(staging_dirs(parent)) == 1  # a staging dir with a partial shard exists now
            os.kill(process.pid, signum)
        for name, (signum, parent, before, process, marker, stderr_path) in runs.items():
            process.join(120)
            err = stderr_path.read_text()
            if signum == signal.SIGKILL:
                assert process.exitcode == -signal.SIGKILL
                assert len(staging_dirs(parent)) == 1  # nothing could clean up
                continue
            assert process.exitcode == 128 + signum, err
            assert "Traceback" not in err and err.strip().count("\n") == 0 and "removed" in err, err
            assert staging_dirs(parent) == [] and snapshot(parent) == before
    finally:
        for _, _, _, process, _, _ in runs.values():
            if process.is_alive():
                process.kill()
                process.join()
    _, parent, before, _, _, _ = runs["kill"]
    assert snapshot(parent / "out") == {k[len("out/"):]: v for k, v in before.items() if k.startswith("out/")}
    convert_checkpoint(checkpoint, parent / "other", arch=str(arch))  # the next convert into the same parent
    assert staging_dirs(parent) == [] and sorted(os.listdir(parent)) == ["other", "out"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_sigterm_handler_is_restored(tmp_path, toy):
    """SIGTERM raises only while converting: the caller's handler is back afterwards, after success or failure."""
    checkpoint, arch, _ = toy

    def handler(signum, frame):
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        convert_checkpoint(checkpoint, tmp_path / "out", arch=str(arch))
        assert signal.getsignal(signal.SIGTERM) is handler
        with pytest.raises(ConversionError):
            convert_checkpoint(checkpoint, tmp_path / "other", arch="EVA01-CLIP-B-16")
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_killed_swap_restores_previous_output(tmp_path, toy):
    """A run killed between moving the old OUT aside and moving the new one in: the next run puts the old OUT back
    (or drops the swapped-out copy when OUT is already the new one); live processes' staging dirs are left alone."""
    checkpoint, arch, converted = toy
    pid, host = _dead_pid(), convert_module._host_id()
    shutil.copytree(converted, tmp_path / f".out.converting-{pid}@{host}-0a1b-replaced")
    shutil.copytree(converted, tmp_path / "done")
    shutil.copytree(converted, tmp_path / f".done.converting-{pid}@{host}-2c3d-replaced")
    busy = f".busy.converting-{os.getpid()}@{host}-4e5f"  # a conversion still running (this process)
    (tmp_path / busy).mkdir()
    convert_checkpoint(checkpoint, tmp_path / "new", arch=str(arch))
    assert sorted(os.listdir(tmp_path)) == sorted(["out", "done", "new", busy])
    assert snapshot(tmp_path / "out") == snapshot(converted)


# ----------------------------------------------------------------------------------------------------------------------
# Corrupted and non-finite checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def _member_data_offset(path: Path, suffix: str) -> tuple[int, int]:
    with zipfile.ZipFile(path) as archive:
        info = next(info for info in archive.infolist() if info.filename.endswith(suffix))
        with open(path, "rb") as handle:
            handle.seek(info.header_offset + 26)
            name_length, extra_length = (int.from_bytes(handle.read(2), "little") for _ in range(2))
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def test_crc_mismatch_is_refused_naming_the_key(tmp_path):
    state_dict = {"visual.blocks.0.attn.q_proj.weight": torch.randn(48, 48), "visual.cls_token": torch.zeros(1, 1, 48)}
    path = tmp_path / "corrupt.pt"
    torch.save(state_dict, path)
    with zipfile.ZipFile(path) as archive:  # which member holds q_proj's data
        storages = sorted(info.filename for info in archive.infolist() if "/data/" in info.filename)
    offset, size = _member_data_offset(path, storages[0])
    data = bytearray(path.read_bytes())
    data[offset + size // 2 : offset + size // 2 + 4] = b"\xff\xff\xff\x7f"  # a NaN where a float was
    path.write_bytes(bytes(data))
    source = convert_module.load_source(path)
    with pytest.raises(ConversionError, match="CRC") as error:
        source.verify()
    assert "visual.blocks.0.attn.q_proj.weight" in str(error.value)
    assert "visual.cls_token" not in str(error.value)


def test_corrupted_release_checkpoint_writes_nothing(tmp_path, toy, capsys):
    checkpoint, arch, _ = toy
    path = tmp_path / "corrupt.pt"
    shutil.copy(checkpoint, path)
    offset, size = _member_data_offset(path, "/data/5")
    data = bytearray(path.read_bytes())
    data[offset : offset + 4] = bytes(4 - i for i in range(4))
    path.write_bytes(bytes(data))
    assert cli_main(["convert", str(path), str(tmp_path / "out"), "--arch", str(arch)]) == 2
    err = capsys.readouterr().err.strip()
    assert "CRC" in err and "the data of " in err and err.count("\n") == 0, err
    assert sorted(os.listdir(tmp_path)) == ["corrupt.pt"]


def test_non_finite_weights_are_refused(tmp_path, toy):
    checkpoint, arch, _ = toy
    state_dict = torch.load(checkpoint, weights_only=True)["module"]
    state_dict["visual.blocks.1.mlp.w3.weight"][0, 0] = float("nan")
    state_dict["text.token_embedding.weight"][5, 0] = float("inf")
    path = tmp_path / "nan.pt"
    torch.save({"module": state_dict}, path)
    with pytest.raises(ConversionError, match="non-finite") as error:
        convert_checkpoint(path, tmp_path / "out", arch=str(arch))
    assert "visual.blocks.1.mlp.w3.weight" in str(error.value) and "text.token_embedding.weight" in str(error.value)
    # Finite in fp32 but not in fp16: overflow on casting is refused too.
    state_dict = torch.load(checkpoint, weights_only=True)["module"]
    state_dict["logit_scale"] = torch.tensor(1e6)
    torch.save(state_dict, path)
    with pytest.raises(ConversionError, match="after casting to float16") as error:
        convert_checkpoint(path, tmp_path / "out", arch=str(arch), dtype="float16")
    assert "logit_scale" in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["nan.pt"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_in_blocks_equals_the_whole_tensor_cast(tmp_path, monkeypatch, dtype):
    """The cast path reads, casts and writes a tensor's file range through two buffers reused block after block:
    many blocks and a short last one give exactly torch's cast of the whole tensor, and a value that overflows the
    target dtype only in the last block is still reported."""
    monkeypatch.setattr(convert_module, "_READ_CHUNK", 4096)  # 1024 fp32 values a block: 3 blocks, the last short
    monkeypatch.setattr(convert_module, "_SERIAL_ELEMENTS", 300)  # cast in pieces of 300 within each block
    values = torch.randn(2500, generator=torch.Generator().manual_seed(0)) * 100
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 24 + values.numpy().tobytes() + b"y" * 8)  # the range starts and ends inside the file
    piece = convert_module._FileSlice(str(source), 24, torch.float32, dtype, (50, 50))

    def cast_through_file() -> tuple[bool, torch.Tensor]:
        out = tmp_path / "out.bin"
        with open(out, "wb", buffering=0) as handle:
            finite = convert_module._copy_slice(piece, handle.fileno())
        return finite, torch.frombuffer(bytearray(out.read_bytes()), dtype=dtype)

    finite, written = cast_through_file()
    assert finite and torch.equal(written, values.to(dtype))
    values[-1] = torch.finfo(torch.float32).max  # finite in fp32, inf in bf16 and fp16
    source.write_bytes(b"x" * 24 + values.numpy().tobytes() + b"y" * 8)
    finite, written = cast_through_file()
    assert not finite and torch.equal(written, values.to(dtype)) and torch.isinf(written[-1])


# ----------------------------------------------------------------------------------------------------------------------
# Wrong --arch: every differing dimension in one message
# ----------------------------------------------------------------------------------------------------------------------


def test_wrong_arch_lists_every_differing_dimension(tmp_path, toy, capsys):
    checkpoint, arch, _ = toy
    assert cli_main(["convert", str(checkpoint), str(tmp_path / "out"), "--arch", "EVA02-CLIP-L-14"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    vision = FAMILIES[FAMILY]["vision"]
    expected = {  # checkpoint value (toy, BAAI's config) vs EVA02-CLIP-L-14 (BAAI's EVA02-CLIP-L-14.json)
        "vision width": (vision["width"], 1024), "vision depth": (vision["layers"], 24),
        "patch size": (vision["patch_size"], 14), "image size": (vision["image_size"], 224),
        "vision heads": (vision["width"] // vision["head_width"], 16), "vision MLP width": (128, 2730),
        "text width": (32, 768), "text depth": (2, 12), "text context length": (16, 77),
        "image projection dim": (16, 768), "text projection dim": (16, 768),
    }
    for name, (found, wanted) in expected.items():
        assert re.search(rf"{name} {found} \(from [^)]*\) vs {wanted}[;.]", err), (name, err)
    assert "text vocabulary" not in err  # equal dimensions are not listed
    assert "missing" not in err and "Shape mismatch" not in err  # the dimension report comes before any per-key one


# ----------------------------------------------------------------------------------------------------------------------
# What the written dir holds
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_follows_umask(tmp_path, toy, umask):
    checkpoint, arch, _ = toy
    previous = os.umask(umask)
    try:
        convert_checkpoint(checkpoint, tmp_path / "out", arch=str(arch))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    for path in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_streamed_shards_load_with_from_pretrained(tmp_path, toy):
    """Shards as transformers names them (model-0000X-of-0000N.safetensors + index), tensors equal to the one-file
    conversion, loadable by from_pretrained; bf16 written straight from the fp32 source."""
    checkpoint, arch, converted = toy
    out = tmp_path / "sharded"
    convert_checkpoint(checkpoint, out, arch=str(arch), max_shard_size="1MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(path.name for path in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                          for i in range(1, len(shards) + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    whole = load_file(converted / "model.safetensors")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in whole.values())
    streamed = {}
    for shard in shards:
        streamed.update(load_file(out / shard))
    assert streamed.keys() == whole.keys() and all(torch.equal(streamed[k], whole[k]) for k in whole)
    model = EvaCLIPModel.from_pretrained(out)
    assert all(torch.equal(model.state_dict()[k], whole[k]) for k in whole)

    convert_checkpoint(checkpoint, tmp_path / "bf16", arch=str(arch), dtype="bfloat16")
    half = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(torch.equal(half[k], whole[k].to(torch.bfloat16)) for k in whole)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_processor_files_and_model_card(tmp_path, toy):
    checkpoint, arch, converted = toy
    processor = AutoProcessor.from_pretrained(converted)
    assert isinstance(processor, CLIPProcessor)
    assert (converted / "tokenizer.json").is_file()
    # The fast tokenizer gives what transformers' CLIPTokenizer gives on the same BPE vocabulary.
    from llava_evaclip.tokenization import write_tokenizer_files

    vocabulary = tmp_path / "vocabulary"
    write_tokenizer_files(vocabulary)
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(vocabulary)
    captions = ["a photo of a cat", "Two DOGS, 3 cats & a café!", "  spaces\tand tabs ", "x" * 300]
    ours = processor.tokenizer(captions, padding="max_length", truncation=True, max_length=16).input_ids
    theirs = reference(captions, padding="max_length", truncation=True, max_length=16).input_ids
    assert ours == theirs
    # The slow tokenizer's files are there too (transformers 5 saves tokenizer.json only, which 4.37's
    # use_fast=False cannot read): alone, they give the same ids.
    slow_only = tmp_path / "slow_only"
    slow_only.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (converted / name).is_file():
            shutil.copy(converted / name, slow_only / name)
    slow = CLIPTokenizer.from_pretrained(slow_only)
    assert slow(captions, padding="max_length", truncation=True, max_length=16).input_ids == theirs
    image_size = FAMILIES[FAMILY]["vision"]["image_size"]
    assert processor.image_processor.crop_size["height"] == image_size

    vision_dir = tmp_path / "vision"
    convert_checkpoint(checkpoint, vision_dir, arch=str(arch), vision_only=True)
    assert isinstance(AutoProcessor.from_pretrained(vision_dir), CLIPImageProcessor)

    card = (converted / "README.md").read_text()
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert f"`{checkpoint.name}`: sha256 `{digest}`" in card
    assert f"llava-evaclip convert {checkpoint.name} converted --arch {Path(arch).name}" in card
    assert "width 48, 2 layers, 3 heads, patch 7, image 21 px" in card and "RoPE" in card
    assert "python -m pytest tests/test_convert.py" in card
    assert "import llava_evaclip" in card and "pip install llava-evaclip" in card
    assert "trust_remote_code" in card and "auto_map" not in json.loads((converted / "config.json").read_text())
    assert "--vision-only" in (vision_dir / "README.md").read_text()


def test_torch_2_5_refusal_is_named_without_its_advice_to_drop_the_guard():
    """torch 2.5.1's weights_only error (its text, captured from that release) puts the refusal on the line after
    its advice to reload with weights_only=False, in one paragraph: the advice was passed on whole before."""
    from llava_evaclip.convert import _refusal_reason

    message = ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
               "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted "
               "source.\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.\n\nCheck the "
               "documentation of torch.load to learn more about types accepted by default with weights_only "
               "https://pytorch.org/docs/stable/generated/torch.load.html.")
    assert _refusal_reason(message) == "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
