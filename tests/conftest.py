"""Shared test helpers: tiny configs of each EVA-CLIP family, small enough for a 2-core CPU."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
from typing import Callable, Iterator, Sequence

# Intel MKL (torch's fp32 BLAS on x86) picks its kernel by memory alignment and thread count on some CPUs (AVX2 ones,
# e.g. AMD EPYC): the same matmul then differs in the last bit between two allocations, or between the pytest process
# and a subprocess run on one thread. The tests that check resumed or multi-rank runs against a single run bit for bit
# need MKL's strict reproducible mode; set before torch loads MKL, and inherited by every subprocess.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# A runner that starts pytest in the background (`cmd &` without job control) leaves SIGINT ignored, and the children
# would inherit that: the tests that interrupt a command with SIGINT need it delivered.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from llava_evaclip import EvaCLIPConfig, EvaCLIPTextConfig, EvaCLIPVisionConfig  # noqa: E402

# DeepSpeed 0.12.6 / 0.14.4 (LLaVA's / LLaVA-NeXT's pins) log their accelerator choice when imported, which
# accelerate 0.21 (LLaVA's pin) does on import where DeepSpeed is installed: not a line of ours.
_DEEPSPEED_IMPORT_LOG = re.compile(r"^\[[\d\-:, ]+\] \[INFO\] \[real_accelerator\.py:\d+:get_accelerator\] Setting ds_accel")


def without_deepspeed_import_log(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not _DEEPSPEED_IMPORT_LOG.match(line))


def _cpu_runs_fp16() -> bool:
    """Whether this torch has fp16 CPU kernels for what every model runs (LayerNorm, the patch conv, matmul)."""
    x = torch.ones(1, 2, 2, 2, dtype=torch.float16)
    try:
        torch.nn.functional.layer_norm(x, (2,))
        torch.nn.functional.conv2d(x, x)
        torch.nn.functional.linear(x, x[0, 0])
    except RuntimeError:
        return False
    return True


# torch 2.1 (LLaVA 1.5's and LLaVA-NeXT's pin) has no fp16 LayerNorm, conv or matmul on the CPU, for any model (CLIP's
# too): the fp16 paths (LLaVA's default dtype without --bf16) are checked where torch has them.
needs_cpu_fp16 = pytest.mark.skipif(
    not _cpu_runs_fp16(), reason="this torch has no fp16 CPU kernels (LayerNorm, conv, matmul) for any model: torch 2.1"
)
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
needs_export_dims = pytest.mark.skipif(
    getattr(getattr(torch, "export", None), "Dim", None) is None,
    reason="this torch has no `torch.export.Dim`, which the dynamo ONNX exporter takes a dynamic batch in (torch 2.1)",
)


def export_with_dynamic_batch(model: torch.nn.Module, kwargs: dict, batched: Sequence[str], min_batch: int = 1,
                              max_batch: int = 64) -> Callable:
    """`torch.export` (under the caller's grad mode) with dim 0 of the `batched` inputs one symbol; the exported
    module. torch 2.1, LLaVA's pin, has no `torch.export.Dim` but states the same with `dynamic_dim` constraints."""
    if hasattr(torch.export, "Dim"):
        batch = torch.export.Dim("batch", min=min_batch, max=max_batch)
        shapes = {name: {0: batch} if name in batched else None for name in kwargs}
        return torch.export.export(model, (), kwargs=kwargs, dynamic_shapes=shapes).module()
    from torch.export import dynamic_dim

    first = dynamic_dim(kwargs[batched[0]], 0)
    constraints = [first >= min_batch, first <= max_batch]
    constraints += [dynamic_dim(kwargs[name], 0) == first for name in batched[1:]]
    return torch.export.export(model, (), kwargs, constraints=constraints)  # 2.1's program takes the inputs by name



@functools.lru_cache(maxsize=None)
def gloo_gathers_into_tensors() -> bool:
    """Whether torch's gloo backend has `all_gather_into_tensor` (a one-rank group, in a subprocess)."""
    probe = ("import torch, torch.distributed as dist\n"
             "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
             "dist.all_gather_into_tensor(torch.zeros(1), torch.zeros(1))\n"
             "dist.destroy_process_group()\n")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=300).returncode == 0


def needs_gloo_all_gather() -> pytest.MarkDecorator:
    """DeepSpeed's ZeRO-3 gathers parameters with `all_gather_into_tensor`, which torch 2.1's gloo lacks ("no support
    for _allgather_base in Gloo process group", with a plain nn.Linear too); NCCL has it, so only these tests' CPU
    ranks cannot run there. Probed when a module that needs it is collected."""
    return pytest.mark.skipif(not gloo_gathers_into_tensors(), reason="this torch's gloo has no all_gather_into_tensor, "
                              "which DeepSpeed's ZeRO-3 gathers with (torch 2.1; NCCL has it)")


def needs_deepspeed_gloo_multi_gather() -> pytest.MarkDecorator:
    """DeepSpeed before 0.19.8 gathers several parameters at once (`GatheredParameters` of a module, as its own 16-bit
    save at the end of training does) with one asynchronous collective each and waits for the last only: right with
    NCCL's one stream, but on gloo the others may still be arriving, and the saved weights are partly uninitialised
    memory, with any model. Our own gathers take one parameter at a time on gloo (`zero.gathered_parameters`)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        installed = version("deepspeed")
    except PackageNotFoundError:
        installed = None
    return pytest.mark.skipif(
        installed is not None and Version(installed) < Version("0.19.8"),
        reason=f"DeepSpeed {installed}'s multi-parameter gather waits for the last parameter only, which gloo (CPU "
               "ranks) does not order (fixed in 0.19.8; NCCL is unaffected)")


def cpu_training_arguments(**fields):
    """TrainingArguments for a CPU run: the switch is `use_cpu` from transformers 4.38 on, `no_cuda` before."""
    from transformers import TrainingArguments

    fields["use_cpu" if "use_cpu" in TrainingArguments.__dataclass_fields__ else "no_cuda"] = True
    return TrainingArguments(**fields)


# What transformers 4.x's TrainingArguments writes into os.environ for accelerate to read.
_TRAINING_ARGUMENTS_ENVIRONMENT = ("ACCELERATE_", "FSDP_")


@contextlib.contextmanager
def training_arguments_environment_kept() -> Iterator[None]:
    """Put back the variables TrainingArguments sets. On transformers 4.x, TrainingArguments(bf16=True) sets
    ACCELERATE_MIXED_PRECISION=bf16 (and ACCELERATE_USE_IPEX, ACCELERATE_USE_DEEPSPEED, FSDP_*) for the whole process,
    and a later TrainingArguments without fp16/bf16 keeps that value: every later Trainer of the session, and every
    training subprocess it starts, would run under bf16 autocast."""
    before = {key: value for key, value in os.environ.items() if key.startswith(_TRAINING_ARGUMENTS_ENVIRONMENT)}
    try:
        yield
    finally:
        for key in [key for key in os.environ if key.startswith(_TRAINING_ARGUMENTS_ENVIRONMENT)]:
            if key not in before:
                del os.environ[key]
        os.environ.update(before)


@functools.lru_cache(maxsize=None)
def _trainer_refuses_bf16_without_gpu() -> bool:
    """Whether TrainingArguments(bf16=True) raises here; the environment it sets is put back."""
    from transformers import TrainingArguments

    with training_arguments_environment_kept():
        try:
            TrainingArguments(output_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "unused"),
                              bf16=True, report_to=[])
        except ValueError as error:
            if "bf16" not in str(error):
                raise
            return True
    return False


def deepspeed_bf16_cpu_flags() -> list[str]:
    """The Trainer flags a `--bf16 True --deepspeed ...` LLaVA run needs on CPU ranks. transformers up to 4.4x takes
    bf16 without a GPU as is (none needed; `--use_cpu` would there replace DeepSpeed by plain DDP); 5.x refuses it
    unless told the run is on CPU and keeps DeepSpeed then. 4.5x refuses it and, with `--use_cpu`, drops DeepSpeed,
    so such a run cannot happen on a CPU-only machine there: the test skips (GPU runs are unaffected)."""
    import transformers

    if not _trainer_refuses_bf16_without_gpu():
        return []
    if int(transformers.__version__.split(".")[0]) >= 5:
        return ["--use_cpu", "True"]
    pytest.skip(f"transformers {transformers.__version__} refuses bf16 without a GPU, and its --use_cpu replaces "
                "DeepSpeed by plain DDP: no bf16 DeepSpeed run on CPU ranks")


# BAAI's code released with EVA-CLIP-8B / 18B (package `eva_clip`, in no registry): `.ci/run` sets the variable.
EVACLIP_18B_REFERENCE = os.environ.get(
    "EVACLIP_18B_REFERENCE",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "reference",
                 "eva_clip_18b"),
)
# Our preset name -> BAAI's model-config file name where they differ.
BAAI_CONFIG_FILES = {"EVA-CLIP-8B-448": "EVA-CLIP-8B-plus"}


def eva_clip_18b_dir() -> str:
    """The folder holding BAAI's `eva_clip` package of the 8B / 18B release; skips the test when it is absent."""
    if not os.path.isfile(os.path.join(EVACLIP_18B_REFERENCE, "eva_clip", "model.py")):
        pytest.skip(f"BAAI's EVA-CLIP-18B reference code not found at {EVACLIP_18B_REFERENCE} "
                    "(set EVACLIP_18B_REFERENCE)")
    return EVACLIP_18B_REFERENCE


@pytest.fixture(scope="module")
def eva_clip():
    """BAAI's 18B-release package `eva_clip` (its `model` imported), taken from the reference folder and removed again
    afterwards."""
    root = eva_clip_18b_dir()
    sys.path.insert(0, root)
    try:
        import eva_clip as package
        import eva_clip.model  # noqa: F401
    finally:
        sys.path.remove(root)
    yield package
    for name in [name for name in sys.modules if name == "eva_clip" or name.startswith("eva_clip.")]:
        del sys.modules[name]

# Vision-tower flags of each released family, at toy width.
FAMILY_FLAGS = {
    "eva01": {"hidden_act": "gelu"},
    "eva01_layer_scale": {"hidden_act": "gelu", "layer_scale_init_value": 0.1},
    "eva02": {"hidden_act": "silu", "use_rope": True, "use_swiglu": True, "use_sub_layernorm": True},
    "bige": {"hidden_act": "gelu", "post_layernorm": True},
    # EVA-CLIP-8B / 18B: RMSNorm, no q/k/v or projection bias (18B: post-norm blocks)
    "eva8b": {"hidden_act": "gelu", "use_rms_norm": True, "q_bias": False, "v_bias": False, "projection_bias": False},
    "eva18b": {"hidden_act": "gelu", "use_rms_norm": True, "q_bias": False, "v_bias": False, "projection_bias": False,
               "post_layernorm": True},
}


def tiny_vision_config(family: str = "eva02", **overrides) -> EvaCLIPVisionConfig:
    fields = dict(hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=3,
                  num_attention_heads=4, image_size=28, patch_size=7)
    fields.update(FAMILY_FLAGS[family])
    fields.update(overrides)
    return EvaCLIPVisionConfig(**fields)


def tiny_text_config(**overrides) -> EvaCLIPTextConfig:
    fields = dict(vocab_size=99, hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=16, bos_token_id=97, eos_token_id=98, pad_token_id=0)
    fields.update(overrides)
    return EvaCLIPTextConfig(**fields)


def tiny_config(family: str = "eva02", **vision_overrides) -> EvaCLIPConfig:
    return EvaCLIPConfig(
        text_config=tiny_text_config().to_dict(),
        vision_config=tiny_vision_config(family, **vision_overrides).to_dict(),
        projection_dim=16,
    )


def randomize(model: nn.Module) -> nn.Module:
    """Non-trivial LayerNorm parameters and biases (they start as ones / zeros), so every term is exercised."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
            elif isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
    return model


def features(output):
    """The projected embeddings from `get_image_features` / `get_text_features`: a tensor on transformers 4.x, the
    `pooler_output` of a model output on 5.x (as transformers' CLIPModel returns them)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.fixture(scope="module")
def llava_registered():
    """LLaVA's builder hooked for a whole module (`pytestmark = pytest.mark.usefixtures("llava_registered")`)."""
    from llava_evaclip import register_with_llava, unregister_from_llava

    register_with_llava()
    yield
    unregister_from_llava()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _training_arguments_environment_put_back():
    """A test that builds TrainingArguments(bf16=True) must not leave the rest of the session in bf16."""
    with training_arguments_environment_kept():
        yield
