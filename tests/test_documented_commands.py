"""The documentation as a user follows it: commands the README and the scripts' comments quote do what they say."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------------
# benchmarks/features.py: the documented smoke run must not replace the committed results the README quotes
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def features_bench(monkeypatch, tmp_path):
    """benchmarks.features with its measurements stubbed (each call recorded) and its results folder in tmp_path."""
    sys.path.insert(0, str(REPO))
    try:
        import benchmarks.features as bench
    finally:
        sys.path.remove(str(REPO))
    calls = []

    def throughput(tower_dir, paths, batch_size, reps):
        calls.append(("throughput", len(paths), reps))
        rates = {"bare": 2.0, "workers_0": 1.0, "workers_1": 1.0, "workers_2": 1.0}
        return {"images_per_s": rates, "steady_images_per_s": rates, "ratio_to_bare": rates,
                "steady_ratio_to_bare": rates, "first_batch_ms": {"workers_0": 1, "workers_1": 1, "workers_2": 1},
                "workers_2_over_0": 1.0, "steady_workers_2_over_0": 1.0,
                "costs": {"decode_ms": 1, "preprocess_ms": 1, "forward_ms": 1, "two_core_bound_images_per_s": 1}}

    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench, "make_images", lambda directory, count: [directory / f"{i}.jpg" for i in range(count)])
    monkeypatch.setattr(bench, "save_tower", lambda kind, directory: str(directory))
    monkeypatch.setattr(bench, "throughput", throughput)
    monkeypatch.setattr(bench, "run_ranks", lambda *args, **kwargs: calls.append(("ranks",)) or 1.0)
    monkeypatch.setattr(bench, "disk_bytes", lambda *args: {
        "dtype": "float16", "shape": [1, 1], "raw_bytes_per_image": 2, "files_bytes_per_image": 3,
        "shards_bytes_per_image": 3, "files_over_raw": 1.5, "shards_over_raw": 1.5})
    (tmp_path / "results").mkdir()
    return bench, tmp_path / "results", calls


def test_features_benchmark_quick_run_keeps_the_committed_results(features_bench, monkeypatch):
    """`python -m benchmarks.features --quick` ("a smoke run") wrote benchmarks/results/features.{json,md}, replacing
    the measured results the README quotes with 16-image, one-repetition numbers."""
    bench, results, calls = features_bench
    committed = {"json": '{"measured": true}\n', "md": "# measured\n"}
    for suffix, text in committed.items():
        (results / f"features.{suffix}").write_text(text)
    monkeypatch.setattr(sys, "argv", ["features.py", "--quick", "--models", "tiny"])
    assert bench.main() in (0, None)
    assert calls and calls[0] == ("throughput", 16, 1)
    for suffix, text in committed.items():
        assert (results / f"features.{suffix}").read_text() == text
    assert json.loads((results / "features_quick.json").read_text())["images"] == 16


def test_features_benchmark_refuses_to_replace_results_before_running(features_bench, monkeypatch, capsys):
    bench, results, calls = features_bench
    (results / "features_tiny512.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["features.py", "--models", "tiny", "--images", "512", "--name",
                                      "features_tiny512"])
    assert bench.main() == 2
    assert not calls  # refused before any timing
    assert "features_tiny512.json already exists; pass --overwrite" in capsys.readouterr().err
    assert (results / "features_tiny512.json").read_text() == "{}"
    monkeypatch.setattr(sys, "argv", sys.argv + ["--overwrite"])
    assert bench.main() == 0
    assert json.loads((results / "features_tiny512.json").read_text())["images"] == 512


def test_features_benchmark_refuses_an_output_dir_under_a_file_before_running(features_bench, monkeypatch, capsys,
                                                                              tmp_path):
    bench, _, calls = features_bench
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    monkeypatch.setattr(sys, "argv", ["features.py", "--quick", "--output-dir", str(a_file / "results")])
    assert bench.main() == 2
    assert not calls  # refused before any timing, not after it when the results are written
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a folder" in err[0], err
    assert a_file.read_text() == "keep me"


# --------------------------------------------------------------------------------------------------------------------
# `deepspeed --module llava_evaclip features ...` (README: works as torchrun does)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [["--local_rank=1"], ["--local_rank", "1"], ["--local-rank=1"]])
def test_launcher_local_rank_before_the_command_is_taken(flags, monkeypatch, capsys):
    """DeepSpeed's launcher runs `python -m llava_evaclip --local_rank=N features ...`: the flag lands before the
    command, where the top-level parser refused it (exit status 2 on every rank)."""
    from llava_evaclip.cli import main

    monkeypatch.setenv("LOCAL_RANK", "unset")  # recorded, so what main sets is undone after the test
    monkeypatch.delenv("LOCAL_RANK")
    assert main([*flags, "presets"]) == 0
    assert "EVA02-CLIP-L-14-336" in capsys.readouterr().out
    import os

    assert os.environ.get("LOCAL_RANK") == "1"  # read by the features command's rank context
    monkeypatch.setenv("LOCAL_RANK", "0")  # the launcher's own variable wins over the flag
    assert main([*flags, "presets"]) == 0
    assert os.environ["LOCAL_RANK"] == "0"


def test_deepspeed_module_spelling_runs_features(tmp_path, monkeypatch):
    """The argv DeepSpeed builds for one rank, end to end on a tiny tower (single rank: WORLD_SIZE unset)."""
    from conftest import tiny_vision_config
    from PIL import Image

    from llava_evaclip import EvaCLIPVisionModel
    from llava_evaclip.cli import main
    from llava_evaclip.processing import build_image_processor

    config = tiny_vision_config()
    EvaCLIPVisionModel(config).save_pretrained(tmp_path / "tower")
    build_image_processor(config).save_pretrained(tmp_path / "tower")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "images" / "a.png")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(name, "unset")  # recorded, so what main sets is undone after the test
        monkeypatch.delenv(name)
    assert main(["--local_rank=0", "features", str(tmp_path / "images"), "--model", str(tmp_path / "tower"),
                 "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "a.png.safetensors").is_file()


# --------------------------------------------------------------------------------------------------------------------
# README: "bad arguments give one line on stderr and exit status 2"
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["features", "--model", "x"], "the following arguments are required: --out"),
    (["features", "--model", "x", "--out", "y", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["convert", "only-src"], "the following arguments are required: OUT"),
    (["presets", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_argument_errors_are_one_line_with_exit_status_2(argv, fragment, capsys):
    from llava_evaclip.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava-evaclip") and fragment in lines[0], captured.err
    assert "--help" in lines[0] and not captured.out


def test_no_rank_variable_leaks_from_the_tests_above():
    import os

    assert "LOCAL_RANK" not in os.environ or os.environ["LOCAL_RANK"] != "1"
