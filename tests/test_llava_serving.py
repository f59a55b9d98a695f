"""LLaVA 1.5 served from the user's own code (README "Use with LLaVA", step 5) on both transformers lines: after
`register_with_llava()`, LLaVA's load_pretrained_model + process_images + tokenizer_image_token + generate work with
an EVA-CLIP tower. On transformers 5, `generate` passes arguments LLaVA's forward does not name (`cache`, ...); the
bridge for that comes with `register_with_llava()`. Runs in a fresh process, so nothing another test patched helps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llava", reason="LLaVA's code (pip install --no-deps llava-torch) is needed for these tests")
pytest.importorskip("sentencepiece")

from _dist.runner import worker_env  # noqa: E402
from conftest import tiny_config  # noqa: E402
from llava_evaclip import EvaCLIPModel  # noqa: E402
from llava_evaclip.processing import build_image_processor  # noqa: E402
from test_llava_launcher import tiny_llava15  # noqa: E402

WORKER = Path(__file__).resolve().parent / "_llava" / "serve_llava15.py"


@pytest.fixture(scope="module")
def served_model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny LLaVA-1.5 checkpoint with an EVA02 tower, saved as LLaVA's training saves it, and an image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("llava15_serving")
    torch.manual_seed(0)
    config = tiny_config("eva02")
    EvaCLIPModel(config).save_pretrained(root / "tower")
    build_image_processor(config).save_pretrained(root / "tower")
    model_dir = root / "llava-v1.5-evaclip-tiny"
    model_dir.mkdir()
    model = tiny_llava15(model_dir, root / "tower")
    model.config.image_aspect_ratio = "pad"
    model.save_pretrained(model_dir)
    image = root / "view.png"
    Image.fromarray(torch.randint(0, 256, (30, 44, 3), dtype=torch.uint8).numpy()).save(image)
    return model_dir, image


def test_llava_15_serving_from_user_code(served_model, tmp_path):
    model_dir, image = served_model
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, str(WORKER), str(model_dir), str(image), str(out)], env=worker_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    served = json.loads(out.read_text())
    assert served["tower"] == "EvaCLIPVisionTower" and served["images_shape"] == [1, 3, 28, 28]
    assert "error" not in served, served["error"]
    # Greedy generation with the KV cache picks what step-by-step full forwards over the image prompt pick.
    assert served["generated"] == served["stepwise"]
