"""LLaVA-NeXT / OneVision's training lifecycle with an EVA-CLIP tower (tests/llava_next/next_lifecycle.py): LoRA from a
LLaVA-NeXT checkpoint and `--vision_feature_cache`. Like tests/test_llava_next.py, the inner file runs in a pytest
process of its own with LLaVA-NeXT first on PYTHONPATH, skipped where LLaVA-NeXT is absent or transformers is 5.x."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ElementTree

import pytest

from test_llava_next import INNER_DIR, LLAVA_NEXT_TRAINS, NEXT_PATH, TRANSFORMERS_5, run

INNER_FILE = "next_lifecycle.py"
RUN_TIMEOUT_S = 300

pytestmark = [
    pytest.mark.skipif(not (NEXT_PATH / "llava" / "__init__.py").is_file(),
                       reason=f"LLaVA-NeXT's llava package not found at {NEXT_PATH} (set LLAVA_NEXT_PATH)"),
    pytest.mark.skipif(TRANSFORMERS_5, reason="LLaVA-NeXT needs transformers 4.x"),
    pytest.mark.skipif(not LLAVA_NEXT_TRAINS, reason="LLaVA-NeXT's trainer needs accelerate < 1.0 and a "
                                                   "TrainingArguments with dispatch_batches"),
]


def test_llava_next_lifecycle(tmp_path):
    pytest.importorskip("peft", reason="LoRA needs peft")
    junit = tmp_path / "junit.xml"
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                  str(INNER_DIR / INNER_FILE)], RUN_TIMEOUT_S)
    output = f"{result.stdout[-6000:]}\n{result.stderr[-4000:]}"
    assert junit.exists(), f"the LLaVA-NeXT lifecycle tests did not run:\n{output}"
    cases = list(ElementTree.parse(junit).getroot().iter("testcase"))
    assert cases, f"no test of {INNER_FILE} ran:\n{output}"
    failed = []
    for case in cases:
        problem = next((child for child in case if child.tag in ("failure", "error")), None)
        if problem is not None:
            failed.append(f"{case.get('name')}: {problem.get('message', '')}\n{(problem.text or '')[-3000:]}")
    assert not failed, "\n\n".join(failed)
