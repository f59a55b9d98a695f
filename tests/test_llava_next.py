"""EVA-CLIP towers in LLaVA-NeXT / LLaVA-OneVision's code (issue 15). LLaVA-NeXT's package is also named `llava`, like
the installed llava-torch, so its tests (tests/llava_next/next_*.py) run in one pytest process of their own with
LLaVA-NeXT first on PYTHONPATH; each of their files is reported here as one test. LLaVA-NeXT is found through
LLAVA_NEXT_PATH (default: ../shared/reference/llava_next beside the repository) and these tests skip where it is
absent. It runs on transformers 4.x only; on 5.x the launcher must say so."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import accelerate
import pytest
import transformers

from conftest import needs_cpu_fp16

REPO = Path(__file__).resolve().parents[1]
NEXT_PATH = Path(os.environ.get("LLAVA_NEXT_PATH") or REPO.parent / "shared" / "reference" / "llava_next")
INNER_DIR = REPO / "tests" / "llava_next"
INNER_FILES = ["next_tower.py", "next_arch.py", "next_launcher.py", "next_train.py"]
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# LLaVA-NeXT's trainer builds its Accelerator with `dispatch_batches=`, which accelerate 1.0 removed.
ACCELERATE_TAKES_DISPATCH_BATCHES = "dispatch_batches" in inspect.signature(accelerate.Accelerator.__init__).parameters
RUN_TIMEOUT_S = 1200

pytestmark = pytest.mark.skipif(
    not (NEXT_PATH / "llava" / "__init__.py").is_file(),
    reason=f"LLaVA-NeXT's llava package not found at {NEXT_PATH} (set LLAVA_NEXT_PATH)",
)


def next_env() -> dict[str, str]:
    """This process's environment (the transformers 4.37.2 overlay included) with LLaVA-NeXT first on PYTHONPATH."""
    env = dict(os.environ, LLAVA_NEXT_PATH=str(NEXT_PATH), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    paths = [str(NEXT_PATH), str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run with a hard time limit; the whole process group (training ranks included) is killed at the limit."""
    process = subprocess.Popen(command, cwd=REPO, env=next_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += f"\n[killed after {timeout} s]"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def inner_results(tmp_path_factory) -> tuple[dict[str, list[tuple[str, str, str]]], str]:
    """Outcomes per inner file: (test name, "passed" / "failed" / "skipped", message), and the run's output."""
    if TRANSFORMERS_5:
        pytest.skip(f"LLaVA-NeXT needs transformers 4.x (found {transformers.__version__}); see the README")
    if not ACCELERATE_TAKES_DISPATCH_BATCHES:
        pytest.skip(f"LLaVA-NeXT's trainer needs accelerate < 1.0 (found {accelerate.__version__}); the launcher says "
                    "so (test_launcher_says_llava_next_training_needs_accelerate_before_1)")
    junit = tmp_path_factory.mktemp("llava_next") / "junit.xml"
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                  *(str(INNER_DIR / name) for name in INNER_FILES)], RUN_TIMEOUT_S)
    output = f"{result.stdout[-6000:]}\n{result.stderr[-4000:]}"
    assert junit.exists(), f"the LLaVA-NeXT tests did not run:\n{output}"
    outcomes: dict[str, list[tuple[str, str, str]]] = {name: [] for name in INNER_FILES}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1] + ".py"
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        outcome = "passed" if problem is None else ("skipped" if problem.tag == "skipped" else "failed")
        message = "" if problem is None else f"{problem.get('message', '')}\n{(problem.text or '')[-3000:]}"
        outcomes.setdefault(module, []).append((case.get("name", ""), outcome, message))
    return outcomes, output


@pytest.mark.parametrize("inner_file", [  # LLaVA-NeXT's training scripts run fp16 without --bf16
    pytest.param(name, marks=needs_cpu_fp16) if name == "next_train.py" else name for name in INNER_FILES])
def test_llava_next(inner_results, inner_file):
    outcomes, output = inner_results
    cases = outcomes[inner_file]
    assert cases, f"no test of {inner_file} ran:\n{output}"
    failed = [f"{name}: {message}" for name, outcome, message in cases if outcome == "failed"]
    assert not failed, "\n\n".join(failed)


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 5 only: on 4.x LLaVA-NeXT runs (test_llava_next)")
def test_launcher_says_llava_next_needs_transformers_4():
    result = run([sys.executable, "-m", "llava_evaclip.launch", "llava.train.train", "--help"], timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("run_llava.py: error: LLaVA-NeXT's code needs transformers 4.x"), result.stderr[-3000:]


@pytest.mark.skipif(TRANSFORMERS_5 or ACCELERATE_TAKES_DISPATCH_BATCHES,
                    reason="transformers 4.x with accelerate 1.x only (elsewhere LLaVA-NeXT trains, or the launcher "
                           "refuses transformers 5 first)")
def test_launcher_says_llava_next_training_needs_accelerate_before_1():
    result = run([sys.executable, "-m", "llava_evaclip.launch", "llava.train.train", "--help"], timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("run_llava.py: error: LLaVA-NeXT's trainer passes `dispatch_batches` to accelerate's "
                           "Accelerator, which accelerate 1.0 removed"), result.stderr[-3000:]
