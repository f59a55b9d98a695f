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

from llava_evaclip.launch import llava_next_trainer_problems

REPO = Path(__file__).resolve().parents[1]
NEXT_PATH = Path(os.environ.get("LLAVA_NEXT_PATH") or REPO.parent / "shared" / "reference" / "llava_next")
INNER_DIR = REPO / "tests" / "llava_next"
INNER_FILES = ["next_tower.py", "next_arch.py", "next_launcher.py", "next_train.py"]
TRAINING_FILES = ("next_launcher.py", "next_train.py")  # LLaVA-NeXT's trainer module and training runs
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# LLaVA-NeXT's trainer builds its Accelerator with `dispatch_batches=self.args.dispatch_batches`: accelerate 1.0
# removed the argument, transformers 4.5x the TrainingArguments field.
ACCELERATE_TAKES_DISPATCH_BATCHES = "dispatch_batches" in inspect.signature(accelerate.Accelerator.__init__).parameters
LLAVA_NEXT_TRAINS = not llava_next_trainer_problems()
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
    files = INNER_FILES if LLAVA_NEXT_TRAINS else [name for name in INNER_FILES if name not in TRAINING_FILES]
    junit = tmp_path_factory.mktemp("llava_next") / "junit.xml"
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                  *(str(INNER_DIR / name) for name in files)], RUN_TIMEOUT_S)
    output = f"{result.stdout[-6000:]}\n{result.stderr[-4000:]}"
    assert junit.exists(), f"the LLaVA-NeXT tests did not run:\n{output}"
    outcomes: dict[str, list[tuple[str, str, str]]] = {name: [] for name in files}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1] + ".py"
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        outcome = "passed" if problem is None else ("skipped" if problem.tag == "skipped" else "failed")
        message = "" if problem is None else f"{problem.get('message', '')}\n{(problem.text or '')[-3000:]}"
        outcomes.setdefault(module, []).append((case.get("name", ""), outcome, message))
    return outcomes, output


def _inner_file_marks(name: str) -> list[pytest.MarkDecorator]:
    marks = [needs_cpu_fp16] if name == "next_train.py" else []  # LLaVA-NeXT's scripts run fp16 without --bf16
    if name in TRAINING_FILES:
        marks.append(pytest.mark.skipif(not LLAVA_NEXT_TRAINS, reason=(
            f"LLaVA-NeXT's trainer needs accelerate < 1.0 and a transformers with TrainingArguments.dispatch_batches "
            f"(found accelerate {accelerate.__version__}, transformers {transformers.__version__}); the launcher "
            "says so (test_launcher_says_what_llava_next_training_lacks)")))
    return marks


@pytest.mark.parametrize("inner_file", [pytest.param(name, marks=_inner_file_marks(name)) for name in INNER_FILES])
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


@pytest.mark.skipif(TRANSFORMERS_5 or LLAVA_NEXT_TRAINS,
                    reason="transformers 4.x with accelerate 1.x or a TrainingArguments without dispatch_batches only "
                           "(elsewhere LLaVA-NeXT trains, or the launcher refuses transformers 5 first)")
def test_launcher_says_what_llava_next_training_lacks():
    result = run([sys.executable, "-m", "llava_evaclip.launch", "llava.train.train", "--help"], timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("run_llava.py: error: LLaVA-NeXT's trainer passes `dispatch_batches` to "), \
        result.stderr[-3000:]
    if not ACCELERATE_TAKES_DISPATCH_BATCHES:
        assert "accelerate's Accelerator, which accelerate 1.0 removed" in last, last
    if "dispatch_batches" not in transformers.TrainingArguments.__dataclass_fields__:
        assert "TrainingArguments.dispatch_batches" in last, last


# What transformers 4.5x no longer re-exports from `transformers.modeling_utils` (they live in `pytorch_utils`) and
# LLaVA-NeXT's model package still imports from there; removed here to run that transformers' case on any 4.x.
DROPPED_BY_4_5X = ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer")
WITHOUT_DROPPED_NAMES = (
    "import sys, transformers.modeling_utils as modeling_utils, transformers.pytorch_utils as pytorch_utils\n"
    f"for name in {DROPPED_BY_4_5X!r}:\n"
    "    modeling_utils.__dict__.pop(name, None)\n"
)


@pytest.mark.skipif(TRANSFORMERS_5, reason="the launcher refuses LLaVA-NeXT on transformers 5 "
                                           "(test_launcher_says_llava_next_needs_transformers_4)")
@pytest.mark.parametrize("entry", ["launcher", "register_with_llava"])
def test_llava_next_imports_where_transformers_dropped_its_modeling_utils_names(entry):
    """On transformers 4.5x LLaVA-NeXT's `llava/model/__init__.py` swallows the Q-Former's ImportError and leaves out
    every model class: the launcher said `no module named 'llava.eval.model_vqa'` and `register_with_llava()` failed.
    Both give the names back (the same functions) before LLaVA-NeXT's package is imported."""
    if entry == "launcher":
        code = WITHOUT_DROPPED_NAMES + (
            "import types\n"
            "sys.modules.setdefault('shortuuid', types.ModuleType('shortuuid'))  # used once it runs only\n"
            "from llava_evaclip.launch import main\nsys.exit(main(['llava.eval.model_vqa', '--help']))\n")
    else:
        code = WITHOUT_DROPPED_NAMES + (
            "from llava_evaclip import register_with_llava\nregister_with_llava()\n"
            "from llava.model import LlavaLlamaForCausalLM, LlavaQwenForCausalLM\n"
            f"assert all(getattr(modeling_utils, name) is getattr(pytorch_utils, name)\n"
            f"           for name in {DROPPED_BY_4_5X!r})\n"
            "print('imported', LlavaLlamaForCausalLM.__name__, LlavaQwenForCausalLM.__name__)\n")
    result = run([sys.executable, "-c", code], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    if entry == "launcher":
        assert "--question-file" in result.stdout, result.stdout[-3000:]  # model_vqa's own argument parser ran
    else:
        assert "imported LlavaLlamaForCausalLM LlavaQwenForCausalLM" in result.stdout, result.stderr[-3000:]
