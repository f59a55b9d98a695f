"""LLaVA's own evaluation and serving entry points, run as a user runs them (`python -m llava_evaclip.launch MODULE
ARGS`, here `llava_evaclip.launch.main(argv)` once per entry in one process), plus the model worker's load path.

Only what a CPU-only machine lacks is stood in for: LLaVA's eval scripts call `.cuda()` / `.to("cuda")` on every
tensor (made no-ops: everything stays on the CPU), `shortuuid` and the model worker's server imports (fastapi, uvicorn)
are stubbed where absent. Every call of LLaVA's `encode_images` is recorded (the pixels it got, the tower's features
and the projected features the language model receives) per entry, with the tower's dtype, device and layers; the
test compares them with its own references.

    python eval_entries.py PLAN.json OUT.pt
PLAN: [{"name": ..., "argv": [MODULE, ARGS...], "stdin": "..."} | {"name": ..., "worker": MODEL_DIR, "image": PATH}]
"""

import base64
import importlib
import io
import json
import sys
import traceback
import types
import uuid

import torch
from torch import nn

torch.Tensor.cuda = lambda self, *args, **kwargs: self
nn.Module.cuda = lambda self, *args, **kwargs: self
_tensor_to = torch.Tensor.to


def _to_cpu(self, *args, **kwargs):
    if kwargs.get("device") == "cuda":
        kwargs["device"] = "cpu"
    return _tensor_to(self, *("cpu" if arg == "cuda" else arg for arg in args), **kwargs)


torch.Tensor.to = _to_cpu
# Before the stubs: transformers 4.5x probes find_spec("fastapi") as it is imported, which a stub without a spec breaks.
importlib.import_module("transformers")

SERVER_NAMES = ("FastAPI", "Request", "BackgroundTasks", "StreamingResponse")  # the worker's app, never started
for name in ("shortuuid", "fastapi", "fastapi.responses", "uvicorn"):
    try:
        __import__(name)
    except ImportError:
        module = types.ModuleType(name)
        if name == "shortuuid":
            module.uuid = lambda: uuid.uuid4().hex[:22]
        else:
            for attribute in SERVER_NAMES:
                setattr(module, attribute, type(attribute, (), {"__init__": lambda self, *a, **k: None,
                                                                "post": lambda self, *a, **k: (lambda f: f)}))
        sys.modules[name] = module

from llava_evaclip import register_with_llava  # noqa: E402
from llava_evaclip.launch import main  # noqa: E402

register_with_llava()
from llava.model.llava_arch import LlavaMetaForCausalLM  # noqa: E402

calls: list = []
_encode_images = LlavaMetaForCausalLM.encode_images


def encode_images(self, images):
    tower = self.get_model().get_vision_tower()
    features = tower(images)
    projected = self.get_model().mm_projector(features)
    calls.append({"images": images.detach().clone(), "features": features.detach().clone(),
                  "projected": projected.detach().clone(), "tower_dtype": str(tower.dtype),
                  "tower_device": str(tower.device), "select_layers": list(tower.select_layers),
                  "token_selection": tower.token_selection, "tower": type(tower).__name__})
    return projected


LlavaMetaForCausalLM.encode_images = encode_images

plan_path, out_path = sys.argv[1:3]
results = {}
for entry in json.load(open(plan_path)):
    calls = []
    result = {"rc": 0}
    try:
        if "worker" in entry:
            from llava.serve.model_worker import ModelWorker

            worker = ModelWorker("http://controller", "http://worker", "w0", True, entry["worker"], None, None, False,
                                 False, "cpu")
            image = base64.b64encode(open(entry["image"], "rb").read()).decode()
            chunks = list(worker.generate_stream_gate({"prompt": "USER: <image>\nwhat is it ASSISTANT:",
                                                       "images": [image], "temperature": 0, "max_new_tokens": 3,
                                                       "stop": "</s>"}))
            result["worker"] = json.loads(chunks[-1].rstrip(b"\0"))
        else:
            sys.stdin = io.StringIO(entry.get("stdin", ""))
            result["rc"] = main(entry["argv"])
    except SystemExit as exit_:
        result["rc"] = exit_.code
    except Exception as error:  # reported to the test, which shows it
        result["rc"] = 1
        result["error"] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"
    result["calls"] = calls
    results[entry["name"]] = result
torch.save(results, out_path)
