"""The command line under hostile use: startup that imports nothing heavy, signals, a closed stdout, unusable
devices, a folder where a file belongs, and the modes of the files it writes. Errors are one line on stderr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import numpy as np
import pytest
import torch
from PIL import Image

import llava_evaclip.commands._common as common
from llava_evaclip.cli import EXIT_SIGINT, EXIT_SIGTERM, main
from llava_evaclip import EvaCLIPConfig
from llava_evaclip.presets import list_presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH"))))}
HEAVY = ("torch", "transformers", "safetensors", "PIL", "numpy", "timm", "accelerate")


def console_script() -> str:
    """What the installed `llava-evaclip` script runs (pyproject's [project.scripts]), as a `-c` program that
    reports the heavy modules it imported, whatever way it exits."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        module, function = tomllib.load(handle)["project"]["scripts"]["llava-evaclip"].split(":")
    return (
        "import atexit, sys\n"
        f"atexit.register(lambda: sys.stderr.write('HEAVY=' + ','.join(sorted({{m.split('.')[0] for m in sys.modules}}"
        f" & set({HEAVY!r})))))\n"
        f"from {module} import {function}\nsys.exit({function}())\n"
    )


def run_script(*args: str, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-c", console_script(), *args], stderr=subprocess.PIPE, text=True,
                          env=ENV, timeout=120, **kwargs)


def heavy_modules(stderr: str) -> str:
    return stderr.rsplit("HEAVY=", 1)[1].strip()


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


def write_image(path: str) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Startup: parsing, --help and presets import neither torch nor transformers
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, status", [
    (["--help"], 0), (["presets"], 0), (["presets", "-v"], 0), (["convert", "--help"], 0),
    (["features", "--help"], 0), (["visualize", "--help"], 0), (["bench", "--help"], 0),
    (["features"], 2), (["no-such-command"], 2), (["presets", "--bogus"], 2),
])
def test_parsing_help_and_presets_stay_light(args, status):
    result = run_script(*args)
    assert result.returncode == status, result.stderr
    assert heavy_modules(result.stderr) == "", result.stderr
    if args == ["presets"]:
        assert result.stdout.split() == list_presets()


def test_presets_verbose_shapes_are_the_configs():
    """`presets -v` reads the plain preset data; it must say what the built configs say."""
    lines = run_script("presets", "-v").stdout.splitlines()
    assert len(lines) == len(list_presets())
    for line, name in zip(lines, list_presets()):
        vision = EvaCLIPConfig.from_preset(name).vision_config
        assert line.split() == [name, "image", f"{vision.image_size},", "patch", f"{vision.patch_size},",
                                str(vision.num_hidden_layers), "layers,", "width", str(vision.hidden_size)]


def test_library_import_still_registers_the_auto_classes():
    """Only the console script defers registration; `import llava_evaclip` (done by conftest) registers at once."""
    from transformers import AutoConfig

    import llava_evaclip

    assert type(AutoConfig.for_model("evaclip")) is llava_evaclip.EvaCLIPConfig
    assert not os.environ.get(llava_evaclip.DEFER_REGISTRATION_ENV)


# --------------------------------------------------------------------------------------------------------------------
# A closed stdout (`llava-evaclip presets -v | head -1`)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["presets", "-v"], ["presets"], ["--help"]])
def test_closed_stdout_is_not_a_traceback(args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: EPIPE every time, no race
    try:
        result = run_script(*args, stdout=write_end)
    finally:
        os.close(write_end)
    assert "BrokenPipeError" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "Exception ignored" not in result.stderr, result.stderr


# --------------------------------------------------------------------------------------------------------------------
# Signals: one line, exit 130 / 143, in any command
# --------------------------------------------------------------------------------------------------------------------


def _signal_in_resolve_model(signum: int):
    def resolve_model(*args, **kwargs):
        signal.raise_signal(signum)
        raise AssertionError("the signal should have stopped the command")

    return resolve_model


@pytest.mark.parametrize("argv", [
    ["inspect", "EVA02-CLIP-B-16"],
    ["features", "--samples", "--model", "EVA02-CLIP-B-16", "--out", "{tmp}/out"],
    ["visualize", "{tmp}/x.png", "--model", "EVA02-CLIP-B-16", "--out", "{tmp}/v.png"],
])
@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, EXIT_SIGINT, "interrupted"),
                                                  (signal.SIGTERM, EXIT_SIGTERM, "terminated")])
def test_signals_end_any_command_with_one_line(argv, signum, status, word, tmp_path, monkeypatch, capsys):
    write_image(str(tmp_path / "x.png"))
    monkeypatch.setattr(common, "resolve_model", _signal_in_resolve_model(signum))
    before = signal.getsignal(signal.SIGTERM)
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == status
    assert one_line(capsys.readouterr().err) == f"llava-evaclip {argv[0]}: {word} ({signal.Signals(signum).name})"
    assert signal.getsignal(signal.SIGTERM) is before  # main puts the previous handler back


@pytest.mark.parametrize("exception, status", [(KeyboardInterrupt, EXIT_SIGINT),
                                               (lambda: _sigterm_like(), EXIT_SIGTERM)])
def test_convert_interrupted_is_one_line(exception, status, tmp_path, monkeypatch, capsys):
    """convert's own cleanup runs first (its tests); what reaches the top becomes one line."""
    import llava_evaclip.convert as convert_module

    def interrupted(*args, **kwargs):
        raise exception()

    monkeypatch.setattr(convert_module, "convert_checkpoint", interrupted)
    assert main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "out"), "--arch", "EVA02-CLIP-B-16"]) == status
    assert one_line(capsys.readouterr().err).startswith("llava-evaclip convert: ")


def _sigterm_like() -> BaseException:
    """A command's own SIGTERM exception (convert raises one while it cleans up): recognised by its signum."""

    class CommandTerminated(BaseException):
        signum = signal.SIGTERM

    return CommandTerminated()


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_real_signal_in_a_subprocess(signum, status):
    """The installed script end to end: a real signal while a command runs gives one line and the shell's status
    (a light command, so the test needs no torch start-up; the in-process tests above cover the heavy ones)."""
    wrapper = ("import os, signal, time\nos.environ['LLAVA_EVACLIP_DEFER_AUTO_REGISTRATION'] = '1'  # as the script\n"
               "import llava_evaclip.commands.presets as command\n"
               "def run(args):\n"
               f"    signal.raise_signal({int(signum)})\n    time.sleep(60)\n"
               "command.run = run\n")
    result = subprocess.run([sys.executable, "-c", wrapper + console_script(), "presets"],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == status, result.stderr
    name = signal.Signals(signum).name
    assert one_line(result.stderr.rsplit("HEAVY=", 1)[0]) == f"llava-evaclip presets: {'interrupted' if signum == signal.SIGINT else 'terminated'} ({name})"


# --------------------------------------------------------------------------------------------------------------------
# Devices and paths
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, fragment", [
    ("meta", "the meta device holds no data"),
    ("mps", "MPS backend is not available" if not torch.backends.mps.is_available() else None),
    ("xpu", "not supported"),
    ("cpu:3", "not supported"),
    ("cuda:99", "CUDA"),
    ("gpu0", "is not a torch device"),
])
def test_unusable_devices_are_one_line(device, fragment, tmp_path, capsys):
    if fragment is None:
        pytest.skip(f"{device} is usable here")
    image = write_image(str(tmp_path / "x.png"))
    argv_by_command = {
        "visualize": ["visualize", image, "--model", "EVA02-CLIP-B-16", "--out", str(tmp_path / "v.png")],
        "features": ["features", image, "--model", "EVA02-CLIP-B-16", "--out", str(tmp_path / "out")],
    }
    for command, argv in argv_by_command.items():
        assert main([*argv, "--device", device]) == 2
        line = one_line(capsys.readouterr().err)
        assert line.startswith(f"llava-evaclip {command}: error: --device ") and fragment in line, line
    assert not (tmp_path / "v.png").exists()


def test_cuda_index_past_the_last_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(common.CLIError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        common.resolve_device("cuda:2")
    assert common.resolve_device("cuda:1") == torch.device("cuda:1")
    assert common.resolve_device("cpu") == torch.device("cpu")


def test_visualize_on_a_folder_asks_for_an_image_file(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(str(folder / "a.png"))
    assert main(["visualize", str(folder), "--model", "EVA02-CLIP-B-16", "--out", str(tmp_path / "v.png")]) == 2
    line = one_line(capsys.readouterr().err)
    assert "is a folder; visualize takes one image file" in line and "features" in line
    assert main(["visualize", os.devnull, "--model", "EVA02-CLIP-B-16", "--out", str(tmp_path / "v.png")]) == 2
    assert "not a regular file (expected one image file)" in one_line(capsys.readouterr().err)


def test_visualize_output_that_cannot_be_written_is_found_first(tmp_path, capsys, monkeypatch):
    image = write_image(str(tmp_path / "x.png"))
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(common, "load_tower", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    for out, fragment in [(tmp_path / "file" / "sub" / "v.png", "is a file, not a folder"),
                          (os.path.join(os.devnull, "v.png"), "is a file, not a folder")]:
        assert main(["visualize", image, "--model", "EVA02-CLIP-B-16", "--out", str(out)]) == 2
        assert fragment in one_line(capsys.readouterr().err)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert main(["visualize", image, "--model", "EVA02-CLIP-B-16", "--out", str(locked / "v.png")]) == 2
        assert "cannot write into" in one_line(capsys.readouterr().err)


# --------------------------------------------------------------------------------------------------------------------
# Written files follow the umask
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_write_follows_the_umask(umask, mode, tmp_path):
    from safetensors.torch import save_file

    previous = os.umask(umask)
    try:
        path = str(tmp_path / "a.safetensors")
        common.atomic_write(path, lambda temp: save_file({"x": torch.zeros(2)}, temp))  # safetensors makes 0600
        png = str(tmp_path / "a.png")
        common.atomic_write(png, lambda temp: Image.new("RGB", (2, 2)).save(temp, format="PNG"))
    finally:
        os.umask(previous)
    assert oct(os.stat(path).st_mode & 0o777) == oct(mode)
    assert oct(os.stat(png).st_mode & 0o777) == oct(mode)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "a.safetensors"]  # no temp file left
