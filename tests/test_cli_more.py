"""The command line against a hostile user, round 5: signals at any moment (`python -m llava_evaclip` while it
registers with transformers, SIGHUP from a closed terminal, a signal in the middle of writing the PNG), temp files of
killed runs, closed or full standard streams, and the benchmark scripts (`python -m benchmarks.*`): argument checks
before any work, results never silently replaced, ratios computed from the raw times, one line for every failure.
No test waits a fixed time for another process: each waits for a file the other process creates."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_evaclip.cli import main
from llava_evaclip.commands import _common

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
CONSOLE_SCRIPT = "import sys, llava_evaclip_cli; sys.exit(llava_evaclip_cli.main())"


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    return lines[0]


def benchmark(name: str):
    sys.path.insert(0, str(REPO))
    try:
        return __import__(f"benchmarks.{name}", fromlist=[name])
    finally:
        sys.path.remove(str(REPO))


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory) -> str:
    import torch

    from conftest import tiny_vision_config
    from llava_evaclip import EvaCLIPVisionModel
    from llava_evaclip.processing import build_image_processor

    path = str(tmp_path_factory.mktemp("tower"))
    torch.manual_seed(0)
    config = tiny_vision_config("eva02")
    EvaCLIPVisionModel(config).save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    return path


def write_image(path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def wait_for(path: Path, process: subprocess.Popen) -> None:
    """Until `process` creates `path` (or ends: then the test fails on what it printed)."""
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"ended before {path.name} appeared: {process.communicate()[1][-3000:]}")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------------------------
# 1. `python -m llava_evaclip` + Ctrl-C / SIGTERM while the package registers with transformers' Auto classes
# --------------------------------------------------------------------------------------------------------------------

STALL_SITE = """import os, sys, time
class _Stall:  # the registration imports this module: say so, then wait there for the signal
    def find_spec(self, name, path=None, target=None):
        if name == "llava_evaclip.configuration_evaclip":
            open(os.environ["STALL_MARKER"], "w").close()
            time.sleep(300)
        return None
sys.meta_path.insert(0, _Stall())
"""


@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
def test_python_m_signalled_while_registering_is_one_line_like_the_console_script(signum, status, word, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(STALL_SITE)
    marker = tmp_path / "registering"
    env = {**ENV, "STALL_MARKER": str(marker), "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ENV['PYTHONPATH']}"}
    process = subprocess.Popen([sys.executable, "-m", "llava_evaclip", "inspect", "EVA02-CLIP-B-16"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker, process)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == status, err[-3000:]
    assert one_line(err) == f"llava-evaclip inspect: {word} ({signal.Signals(signum).name})"


# --------------------------------------------------------------------------------------------------------------------
# 2. SIGHUP (terminal closed) and signals in the middle of writing the PNG: the temp file goes, one line
# --------------------------------------------------------------------------------------------------------------------

STALLED_SAVE = """import os, signal, sys
from PIL import Image
from llava_evaclip.cli import main
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal session, also when the tests run under nohup
def save(self, fp, *args, **kwargs):  # half a PNG in the temp file, then the signal arrives
    with open(fp, "wb") as handle:
        handle.write(b"\\x89PNG half")
    signal.raise_signal(int(os.environ["SIGNUM"]))
Image.Image.save = save
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_visualize_writes_removes_the_temp_file(signum, tower_dir, tmp_path):
    write_image(tmp_path / "cat.png")
    out = tmp_path / "out" / "pca.png"
    out.parent.mkdir()
    run = subprocess.run([sys.executable, "-c", STALLED_SAVE, "visualize", str(tmp_path / "cat.png"), "--model",
                          tower_dir, "--out", str(out)], env={**ENV, "SIGNUM": str(int(signum))},
                         capture_output=True, text=True, timeout=300)
    name = signal.Signals(signum).name
    word = "interrupted" if signum == signal.SIGINT else "terminated"
    assert run.returncode == 128 + signum, run.stderr[-3000:]
    assert one_line(run.stderr) == f"llava-evaclip visualize: {word} ({name})"
    assert os.listdir(out.parent) == []  # neither the PNG nor a hidden `.pca.png.<pid>.<hex>.tmp`


def test_an_ignored_sighup_stays_ignored(monkeypatch, capsys):
    """`nohup llava-evaclip ...`: the command must survive the logout it was started to survive."""
    seen = []

    def resolve_model(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGHUP))
        raise _common.CLIError("stop here")

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        monkeypatch.setattr(_common, "resolve_model", resolve_model)
        assert main(["inspect", "EVA02-CLIP-B-16"]) == 2
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert one_line(capsys.readouterr().err) == "llava-evaclip inspect: error: stop here"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temp_files_of_killed_writes_are_removed_and_nothing_else(tower_dir, tmp_path, capsys):
    """A SIGKILLed visualize leaves `.pca.png.<pid>.<hex>.tmp`; the next write of pca.png removes such files whose
    writer is gone and which nobody touched for a while, and nothing that merely looks alike."""
    write_image(tmp_path / "cat.png")
    folder = tmp_path / "out"
    folder.mkdir()
    dead, old = _dead_pid(), time.time() - 2 * _common.STALE_TEMP_SECONDS
    stale = folder / f".pca.png.{dead}.0123abcd.tmp"
    keep = {
        f".pca.png.{os.getpid()}.0123abcd.tmp": "a running writer (this process)",
        f".pca.png.{dead}.89abcdef.tmp": "touched just now (a writer on another machine?)",
        f".other.png.{dead}.0123abcd.tmp": "another file's temp",
        f".pca.png.{dead}.0123abc.tmp": "not the exact pattern",
        f"pca.png.{dead}.0123abcd.tmp": "not hidden",
        f".pca.png.{dead}.0123abcd.tmp.bak": "not the exact pattern",
    }
    for name in [stale.name, *keep]:
        (folder / name).write_text("user data")
        if name != f".pca.png.{dead}.89abcdef.tmp":
            os.utime(folder / name, (old, old))
    link = folder / f".pca.png.{dead}.fedcba98.tmp"
    os.symlink(tmp_path / "cat.png", link)  # a symlink is not a file this program writes
    os.utime(link, (old, old), follow_symlinks=False)

    assert main(["visualize", str(tmp_path / "cat.png"), "--model", tower_dir, "--out", str(folder / "pca.png")]) == 0
    assert "removed 1 temp file(s)" in capsys.readouterr().err
    assert sorted(os.listdir(folder)) == sorted(["pca.png", link.name, *keep])
    assert all((folder / name).read_text() == "user data" for name in keep)


# --------------------------------------------------------------------------------------------------------------------
# 3. Closed and full standard streams
# --------------------------------------------------------------------------------------------------------------------


def test_a_closed_stdout_is_like_dev_null():
    """`llava-evaclip presets >&-`: Python sets sys.stdout to None; no AttributeError traceback, status 0."""
    run = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, "presets"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=ENV, timeout=120, preexec_fn=lambda: os.close(1))
    assert (run.returncode, run.stderr) == (0, "")


def test_stdout_on_a_full_disk_is_one_line():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        run = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, "presets"], stdout=full, stderr=subprocess.PIPE,
                             text=True, env=ENV, timeout=120)
    assert run.returncode == 2
    assert one_line(run.stderr) == "llava-evaclip presets: error: No space left on device"


@pytest.mark.parametrize("argv, label", [(["--help"], "llava-evaclip"), (["convert", "--help"], "llava-evaclip"),
                                         (["-m", "benchmarks.tower", "--help"], "benchmarks.tower"),
                                         (["-m", "benchmarks.features", "--help"], "benchmarks.features")])
def test_help_on_a_full_disk_is_one_line(argv, label):
    """argparse drops the error of writing its help, so `--help > out.txt` on a full disk exited 0 with nothing
    written (under PYTHONUNBUFFERED, as CI and many job scripts run, and when the help outgrows the buffer)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    command = argv if argv[0] == "-m" else ["-c", CONSOLE_SCRIPT, *argv]
    for unbuffered in ("1", ""):
        with open("/dev/full", "w") as full:
            run = subprocess.run([sys.executable, *command], stdout=full, stderr=subprocess.PIPE, text=True,
                                 env={**ENV, "PYTHONUNBUFFERED": unbuffered}, timeout=120, cwd=REPO)
        assert run.returncode == 2, (unbuffered, run.stderr)
        assert one_line(run.stderr) == f"{label}: error: No space left on device"
    ok = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=ENV, timeout=120, cwd=REPO)
    assert ok.returncode == 0 and ok.stdout.startswith("usage:") and not ok.stderr


# --------------------------------------------------------------------------------------------------------------------
# 4. benchmarks.tower: the ratios, argument checks before the run, one line for Ctrl-C
# --------------------------------------------------------------------------------------------------------------------


def test_tower_memory_ratio_against_a_clip_that_grew_by_nothing_does_not_crash_the_report():
    tower = benchmark("tower")
    memory = [{"contender": name, "dtype": "fp32", "batch": 2, "weights_mib": 1.0, "peak_above_weights_mib": peak,
               "method": "peak RSS"} for name, peak in (("ours_plain", 0.5), ("hf_clip", 0.0), ("ours_eva02", 0.25))]
    report = {"device": "cpu", "command": "python -m benchmarks.tower --quick", "image_size": 56,
              "machine": {"cpu_count": 2, "torch": "x", "torch_threads": 1, "transformers": "y"},
              "matmul_peak_gflops": {}, "settings": {}, "memory": memory}
    report["goals"] = tower.evaluate_goals(report)
    assert report["goals"] == []  # no ratio against zero (it was 0.5 / 1e-9 = 5e8, "MISS")
    text = tower.render_markdown(report)  # was ZeroDivisionError, after the whole run, with the JSON already written
    assert "| `ours_plain` | fp32 | 2 | 1 | 0 |  |" in text
    memory[1]["peak_above_weights_mib"] = 2.0
    assert tower.memory_versus_hf_clip(memory[0], memory) == 0.25
    assert tower.evaluate_goals(report)[0]["value"] == 0.25


def test_tower_ratios_are_medians_of_the_same_run():
    tower = benchmark("tower")
    times = {"ours": [1.0, 5.0, 2.0], "peer": [2.0, 2.0, 8.0]}
    results = {name: {"median_s": statistics.median(values), "peers": ["peer"] if name == "ours" else []}
               for name, values in times.items()}
    (ratio,) = tower.compute_ratios(results, times)
    assert ratio["ratio"] == 2.0 / 2.0 and ratio["paired_ratio"] == statistics.median([0.5, 2.5, 0.25])


@pytest.mark.parametrize("argv, fragment", [
    (["--batch-sizes", "1,1"], "--batch-sizes lists 1 more than once"),
    (["--dtypes", "fp32,fp32"], "--dtypes lists fp32 more than once"),
    (["--contenders", "hf_clip,hf_clip"], "--contenders lists hf_clip more than once"),
    (["--name", "../elsewhere"], "must be a plain file name"),
])
def test_tower_settings_that_would_replace_each_other_are_refused_before_running(argv, fragment, tmp_path, capsys,
                                                                                  monkeypatch):
    tower = benchmark("tower")
    monkeypatch.setattr(tower, "build_contender", lambda *args: pytest.fail("the benchmark started"))
    assert tower.main(["--quick", "--output-dir", str(tmp_path), *argv]) == 2
    assert fragment in one_line(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exception, status, word", [(KeyboardInterrupt, 130, "interrupted (SIGINT)"),
                                                     (OSError(28, "No space left on device"), 2,
                                                      "error: No space left on device")])
def test_tower_interrupted_or_refused_is_one_line(exception, status, word, tmp_path, capsys, monkeypatch):
    tower = benchmark("tower")

    def run_benchmark(args, progress=print):
        raise exception

    monkeypatch.setattr(tower, "run_benchmark", run_benchmark)
    assert tower.main(["--quick", "--output-dir", str(tmp_path)]) == status
    assert one_line(capsys.readouterr().err) == f"benchmarks.tower: {word}"


# --------------------------------------------------------------------------------------------------------------------
# 5. benchmarks.convert_memory and benchmarks.zero3_memory: results never silently replaced, the user's files untouched
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def convert_bench(monkeypatch, tmp_path):
    """benchmarks.convert_memory with its children stubbed: the "checkpoint" is a small file, `cp` and the
    conversions take the times listed here (a cp of 4 ms rounded to 0.0 s divided by zero)."""
    bench = benchmark("convert_memory")
    cp_times = iter([0.004, 0.006, 0.005])
    convert_times = iter([0.03, 0.01, 0.02])

    def run_child(kind, *args):
        if kind == "write":
            Path(args[0]).write_bytes(b"x" * 1000)
            return {"parameters": 10, "tensors": 2}
        return {"wall_s": next(convert_times), "peak_rss_bytes": 200, "baseline_rss_bytes": 100,
                "transformers": "x", "output_bytes": 10, "files": ["model.safetensors"]}

    monkeypatch.setattr(bench, "run_child", run_child)
    monkeypatch.setattr(bench, "time_cp", lambda checkpoint, target: next(cp_times))
    monkeypatch.setattr(bench, "baai_model_config", lambda layers: {"vision_cfg": {}})
    return bench


def test_convert_memory_ratios_and_the_users_workdir(convert_bench, tmp_path, capsys):
    workdir = tmp_path / "work"
    (workdir / "converted-float32").mkdir(parents=True)
    (workdir / "converted-float32" / "mine.txt").write_text("mine")
    (workdir / "copy.pt").write_text("mine too")
    results = tmp_path / "results.json"
    argv = ["--dtypes", "float32", "--repeats", "3", "--workdir", str(workdir), "--results", str(results)]
    assert convert_bench.main(argv) == 0, capsys.readouterr().err
    (record,) = json.loads(results.read_text())["records"]
    assert record["time_over_cp"] == round(0.02 / 0.005, 2)  # median conversion / median cp, unrounded times
    assert record["peak_rss_over_checkpoint"] == round(200 / 1000, 3)
    assert sorted(p.relative_to(workdir).as_posix() for p in workdir.rglob("*")) == [
        "converted-float32", "converted-float32/mine.txt", "copy.pt"]
    assert (workdir / "copy.pt").read_text() == "mine too"

    before = results.read_text()
    assert convert_bench.main(argv) == 2  # the results exist: refused before any work
    assert "already exists; pass --overwrite" in one_line(capsys.readouterr().err)
    assert results.read_text() == before


@pytest.mark.parametrize("argv, fragment", [(["--layers", "0"], "--layers must be 1 to 32"),
                                            (["--dtypes", "float64"], "--dtypes 'float64'"),
                                            (["--results", "."], "is a directory")])
def test_convert_memory_bad_arguments_are_one_line_before_any_work(argv, fragment, convert_bench, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(convert_bench, "run_child", lambda *args: pytest.fail("the benchmark started"))
    assert convert_bench.main(["--results", str(tmp_path / "r.json"), *argv]) == 2
    assert fragment in one_line(capsys.readouterr().err)


def test_zero3_memory_refuses_to_replace_results_before_running(tmp_path, capsys, monkeypatch):
    bench = benchmark("zero3_memory")
    monkeypatch.setattr(bench, "write_checkpoint", lambda *args: pytest.fail("the benchmark started"))
    output = tmp_path / "zero3.json"
    output.write_text("committed results")
    assert bench.main(["--ranks", "1", "--output", str(output)]) == 2
    assert "already exists; pass --overwrite" in one_line(capsys.readouterr().err)
    assert output.read_text() == "committed results"


# --------------------------------------------------------------------------------------------------------------------
# 6. A damaged checkpoint dir is named for what it is
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["folder", "dangling symlink"])
def test_a_config_json_that_is_not_a_file_is_named_as_such(damage, tower_dir, tmp_path, capsys):
    """It was reported as "the directory has no config.json", which sends the user looking for a missing file."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tower_dir, model)
    (model / "config.json").unlink()
    if damage == "folder":
        (model / "config.json").mkdir()
    else:
        (model / "config.json").symlink_to(tmp_path / "gone.json")
    assert main(["inspect", str(model)]) == 2
    assert "config.json is not a readable file" in one_line(capsys.readouterr().err)


def test_an_output_that_appears_during_the_run_is_not_replaced_without_overwrite(tower_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    """Two runs writing the same --out: both passed the "already exists?" check at their start; the one finishing
    second must not replace the first one's PNG (no --overwrite was given)."""
    write_image(tmp_path / "cat.png")
    out = tmp_path / "pca.png"
    save = Image.Image.save

    def other_run_finishes_first(self, fp, *args, **kwargs):
        out.write_bytes(b"the other run's picture")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", other_run_finishes_first)
    assert main(["visualize", str(tmp_path / "cat.png"), "--model", tower_dir, "--out", str(out)]) == 2
    assert "appeared while this command ran" in one_line(capsys.readouterr().err)
    assert out.read_bytes() == b"the other run's picture"
    assert sorted(os.listdir(tmp_path)) == ["cat.png", "pca.png"]
    out.unlink()
    assert main(["visualize", str(tmp_path / "cat.png"), "--model", tower_dir, "--out", str(out), "--overwrite"]) == 0
    assert Image.open(out).format == "PNG"


def test_a_benchmarks_folder_in_the_current_directory_is_not_imported(tmp_path):
    """`python -m llava_evaclip` puts the current directory first on the path; `bench` imported `benchmarks.tower` by
    name, so a user's own `benchmarks` package ran on every call (even `--help`) and `bench` lost its options."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("open('USER_CODE_RAN', 'w').close()\n")
    run = subprocess.run([sys.executable, "-m", "llava_evaclip", "bench", "--help"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (tmp_path / "USER_CODE_RAN").exists()
    assert "--batch-sizes" in run.stdout


def test_inspect_reads_weights_in_a_folder_whose_name_is_not_utf8(tower_dir, tmp_path, capsys):
    """The safetensors library refuses such paths, and inspect called the (intact) weights "damaged"."""
    import shutil

    model = os.path.join(os.fsencode(tmp_path), b"caf\xe9-latin1")
    shutil.copytree(os.fsencode(tower_dir), model)
    assert main(["inspect", os.fsdecode(model), "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["weights"].endswith("dtype float32")
    weights = os.path.join(model, b"model.safetensors")
    with open(weights, "r+b") as handle:  # the last tensor's bytes cut short
        handle.truncate(os.path.getsize(weights) - 4)
    assert main(["inspect", os.fsdecode(model)]) == 2
    line = one_line(capsys.readouterr().err)  # the name's byte escaped, even on a strict stream (pytest's capture)
    assert "caf\\udce9-latin1/model.safetensors" in line and "damaged or incomplete" in line


def test_absurd_thread_and_rank_counts_are_refused_before_running(tmp_path, capsys, monkeypatch):
    """`--threads 100000` made libgomp abort the process ("Thread creation failed") once the models were built;
    `--ranks 100000` would start that many torch + deepspeed processes."""
    tower = benchmark("tower")
    monkeypatch.setattr(tower, "build_contender", lambda *args: pytest.fail("the benchmark started"))
    assert tower.main(["--quick", "--threads", "100000", "--output-dir", str(tmp_path)]) == 2
    assert "--threads must be 1 to" in one_line(capsys.readouterr().err)
    zero3 = benchmark("zero3_memory")
    monkeypatch.setattr(zero3, "write_checkpoint", lambda *args: pytest.fail("the benchmark started"))
    with pytest.raises(SystemExit) as exit_info:  # an argument error, as argparse reports it: one line, status 2
        zero3.main(["--ranks", "1", "100000", "--output", str(tmp_path / "z.json")])
    assert exit_info.value.code == 2 and "at most" in one_line(capsys.readouterr().err)
