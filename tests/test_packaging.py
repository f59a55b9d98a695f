"""What a user gets from the built distributions, not from the editable checkout the other tests run in.

The sdist and wheel are built offline with setuptools' own backend (no build isolation, nothing fetched) from a copy
of the tree, in a few seconds, and checked for: the whole test suite, the LLaVA integration scripts and the
benchmarks in the sdist (setuptools alone ships only tests/test*.py: no conftest.py, so no test ran from an sdist);
every file of the package in the wheel (the BPE vocabulary and the sample images are read at run time) and nothing
else; the same wheel from the sdist as from the tree; the console script; and license metadata in the SPDX form
(the `{ text = ... }` table is deprecated by setuptools, which stops building it after 2027-02-18).
"""

from __future__ import annotations

import argparse
import ast
import email.parser
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "llava_evaclip"
SOURCE_ITEMS = ("pyproject.toml", "README.md", "MANIFEST.in", "llava_evaclip_cli.py", PACKAGE, "tests", "integration",
                "benchmarks")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.egg-info", "build", "dist", ".pytest_cache")


def _setuptools_version() -> tuple[int, ...]:
    setuptools = pytest.importorskip("setuptools")
    parts = []
    for part in setuptools.__version__.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _files(root: Path) -> set[str]:
    """Relative paths of the files under `root`, as a build sees them (no caches)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.endswith(".egg-info")]
        for name in filenames:
            if not name.endswith((".pyc", ".pyo")):
                found.add((Path(dirpath) / name).relative_to(root).as_posix())
    return found


def _build(kind: str, source: Path, out: Path) -> tuple[Path, str]:
    """setuptools.build_meta.build_<kind>(out) run in `source`; returns the artifact and the build's output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the backend must read `source`, nothing else
    env["PYTHONWARNINGS"] = "default"
    code = ("import sys; from setuptools import build_meta as b; "
            f"print('ARTIFACT=' + b.build_{kind}(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=source, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"build_{kind} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    name = [line for line in result.stdout.splitlines() if line.startswith("ARTIFACT=")][-1].split("=", 1)[1]
    return out / name, result.stdout + result.stderr


def _digests(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name: hashlib.sha256(archive.read(name)).hexdigest() for name in archive.namelist()
                if not name.endswith(".dist-info/RECORD")}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if _setuptools_version() < (77, 0):
        pytest.skip("setuptools >= 77 (pyproject's build-system requirement) is not installed")
    work = tmp_path_factory.mktemp("packaging")
    tree = work / "tree"
    tree.mkdir()
    for item in SOURCE_ITEMS:
        path = REPO / item
        if path.is_dir():
            shutil.copytree(path, tree / item, ignore=IGNORED)
        elif path.exists():
            shutil.copy2(path, tree / item)
    sdist, sdist_log = _build("sdist", tree, work / "sdist")
    wheel, wheel_log = _build("wheel", tree, work / "wheel")
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+ / 3.11.4+
            archive.extractall(work / "unpacked", filter="data")
        else:
            archive.extractall(work / "unpacked")
    (unpacked,) = (work / "unpacked").iterdir()
    rebuilt, _ = _build("wheel", unpacked, work / "rebuilt")
    return {"tree": tree, "sdist": sdist, "unpacked": unpacked, "wheel": wheel, "rebuilt": rebuilt,
            "log": sdist_log + wheel_log}


def test_sdist_holds_the_whole_test_suite_integration_scripts_and_benchmarks(built):
    tree, shipped = built["tree"], _files(built["unpacked"])
    wanted = {f"tests/{name}" for name in _files(tree / "tests")}
    wanted |= {f"integration/{name}" for name in _files(tree / "integration")}
    wanted |= {f"benchmarks/{name}" for name in _files(tree / "benchmarks") if not name.endswith(".tmp")}
    wanted |= {f"{PACKAGE}/{name}" for name in _files(tree / PACKAGE)}
    assert "tests/conftest.py" in wanted and "integration/pretrain.sh" in wanted
    missing = sorted(wanted - shipped)
    assert not missing, f"{len(missing)} source files missing from the sdist, e.g. {missing[:8]}"
    assert not any(name.startswith(".ci/") for name in shipped)


def test_wheel_holds_the_package_files_and_nothing_else(built):
    with zipfile.ZipFile(built["wheel"]) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = email.parser.Parser().parsestr(
            next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA")))
    payload = {name for name in names if ".dist-info/" not in name}
    expected = {f"{PACKAGE}/{name}" for name in _files(built["tree"] / PACKAGE)} | {"llava_evaclip_cli.py"}
    assert payload == expected, (f"missing from the wheel: {sorted(expected - payload)}; "
                                 f"not part of the package: {sorted(payload - expected)}")
    # What the package opens at run time lies inside it, so the comparison above covers it.
    for data in (f"{PACKAGE}/bpe_simple_vocab_16e6.txt.gz", f"{PACKAGE}/samples/landscape.jpg"):
        assert data in payload
    assert "llava-evaclip = llava_evaclip_cli:main" in entry_points
    requires = metadata.get_all("Requires-Dist") or []
    assert any(r.startswith("torch") for r in requires) and any(r.startswith("transformers") for r in requires)
    assert metadata["Requires-Python"] == ">=3.10"
    # features' metadata and converted model cards record llava_evaclip.__version__: it must be the distribution's.
    init = (built["tree"] / PACKAGE / "__init__.py").read_text()
    (version,) = [node.value.value for node in ast.parse(init).body if isinstance(node, ast.Assign)
                  and [getattr(t, "id", None) for t in node.targets] == ["__version__"]]
    assert metadata["Version"] == version
    assert metadata["License-Expression"] == "Apache-2.0", metadata.get("License")


def test_sdist_rebuilds_the_same_wheel(built):
    assert _digests(built["rebuilt"]) == _digests(built["wheel"])


def test_build_has_no_license_deprecation(built):
    assert "project.license` as a TOML table is deprecated" not in built["log"]


def test_installed_bench_never_runs_another_distributions_benchmarks(tmp_path, monkeypatch):
    """Installed from a wheel, the package's parent folder is site-packages, where a `benchmarks/tower.py` belongs to
    some other distribution: `llava-evaclip bench` builds its options on every command, so that file ran (and broke
    the command) each time. Only a source checkout (a pyproject.toml beside the package) supplies the benchmark."""
    from llava_evaclip.cli import CLIError
    from llava_evaclip.commands import bench

    site_packages = tmp_path / "site-packages"
    (site_packages / "benchmarks").mkdir(parents=True)
    ran = tmp_path / "ran"
    (site_packages / "benchmarks" / "tower.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    monkeypatch.setattr(bench, "_SOURCE_ROOT", str(site_packages))
    monkeypatch.setattr(bench, "_TOWER_PATH", str(site_packages / "benchmarks" / "tower.py"))
    monkeypatch.delitem(sys.modules, bench._MODULE_NAME, raising=False)
    monkeypatch.delitem(sys.modules, "benchmarks.tower", raising=False)
    assert bench._benchmark_module() is None and not ran.exists()
    with pytest.raises(CLIError, match="source checkout"):
        bench.run(argparse.Namespace())
    assert not ran.exists()
