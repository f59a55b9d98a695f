"""Small shims so one code base runs on transformers 4.37.2 (LLaVA's pin) and 5.x."""

from __future__ import annotations

import contextlib
import copy
import re
import sys
from typing import Any, Callable, Iterator, Optional

import torch
import transformers
from transformers import PreTrainedModel

try:  # transformers >= 5: init helpers that skip tensors already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4.x: plain torch initialisers are safe there

    class _TorchInit:
        """The subset of `transformers.initialization` this package uses, on torch.nn.init."""

        @staticmethod
        def normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
            return torch.nn.init.normal_(tensor, mean=mean, std=std)

        @staticmethod
        def zeros_(tensor: torch.Tensor) -> torch.Tensor:
            return torch.nn.init.zeros_(tensor)

        @staticmethod
        def ones_(tensor: torch.Tensor) -> torch.Tensor:
            return torch.nn.init.ones_(tensor)

        @staticmethod
        def constant_(tensor: torch.Tensor, val: float) -> torch.Tensor:
            return torch.nn.init.constant_(tensor, val)

        @staticmethod
        def copy_(tensor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return tensor.copy_(other)

    init = _TorchInit()

try:
    from transformers import PreTrainedConfig as PretrainedConfig  # 5.x name
except ImportError:
    from transformers import PretrainedConfig  # 4.x name


def is_flash_attn_available() -> bool:
    """True when the flash-attn package (and a CUDA device) can serve `flash_attention_2`."""
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True



try:  # transformers >= 4.48: attention kernels registered by name (`AttentionInterface.register` adds to it)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # 4.37.2: the package's own eager / sdpa / flash functions
    ALL_ATTENTION_FUNCTIONS = None

try:  # transformers >= 4.52: layers that checkpoint themselves when `gradient_checkpointing` is set on them
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:
    GradientCheckpointingLayer = None

# transformers 5 renamed `gradient_checkpointing_enable` (now a deprecated alias) and made non-reentrant the default.
HAS_ACTIVATION_CHECKPOINTING = hasattr(PreTrainedModel, "activation_checkpointing_enable")

# (major, minor) of the installed transformers ("5.0.0.dev0" and "4.57.0rc1" read as (5, 0) and (4, 57)).
TRANSFORMERS_VERSION = tuple(int(re.match(r"\d*", part).group() or 0) for part in transformers.__version__.split(".")[:2])

# transformers 5's CLIPModel.get_image_features / get_text_features return the tower's output with the projected
# embeddings as `pooler_output`; 4.x returns the projected tensor.
FEATURES_RETURN_MODEL_OUTPUT = TRANSFORMERS_VERSION >= (5,)


def _torchscript_returns_tuples() -> bool:
    """Whether CLIP's forward returns a tuple under `config.torchscript=True` here: 4.37-4.53 read
    `config.use_return_dict` (False under torchscript); 4.56's `can_return_tuple` reads `config.return_dict` only
    (CLIP then returns a ModelOutput; 4.54 / 4.55 unchecked), and transformers 5 dropped the flag. Asked of the
    decorator itself."""
    if TRANSFORMERS_VERSION >= (5,):
        return False
    try:
        from transformers.utils.generic import can_return_tuple
    except ImportError:  # 4.37-4.50: CLIP's forward reads `config.use_return_dict`
        return True
    from types import SimpleNamespace

    from transformers.modeling_outputs import BaseModelOutput

    probe = torch.nn.Module()  # the decorator walks the module tree on some versions
    probe.config = SimpleNamespace(return_dict=True, torchscript=True, use_return_dict=False)
    output = can_return_tuple(lambda self: BaseModelOutput(last_hidden_state=torch.zeros(1)))(probe)
    return isinstance(output, tuple)


# transformers 4.x's `config.torchscript=True` makes models return tuples (`config.use_return_dict`), so that
# torch.jit.trace takes them, up to 4.53 at least (see `_torchscript_returns_tuples`); transformers 5 dropped the flag.
TORCHSCRIPT_RETURNS_TUPLES = _torchscript_returns_tuples()


def _sub_configs_take_attn_implementation() -> bool:
    """Whether setting `config._attn_implementation` passes it on to the sub-configs (per tower when given as a dict):
    transformers 5 and 4.56 do (their setter); 4.37-4.53 set it on the top config only. Asked of the setter."""
    if TRANSFORMERS_VERSION >= (5,):
        return True

    class _ProbeTower(PretrainedConfig):
        model_type = "evaclip_attn_probe_tower"

    class _ProbeTop(PretrainedConfig):
        model_type = "evaclip_attn_probe"
        sub_configs = {"tower": _ProbeTower}

    try:
        top = _ProbeTop()
        top.tower = _ProbeTower()
        top._attn_implementation = {"tower": "eager"}
    except Exception:  # noqa: BLE001 - a setter that refuses a dict does not pass one on
        return False
    return getattr(top.tower, "_attn_implementation_internal", None) == "eager"


# transformers 5's (and 4.56's) configs pass `attn_implementation` on to their sub-configs (per tower when given as a
# dict); 4.37-4.53 set it on the top config only.
SUB_CONFIGS_TAKE_ATTN_IMPLEMENTATION = _sub_configs_take_attn_implementation()

# transformers 5 and 4.56-4.57 name the checkpoint dtype `dtype` (4.56's `torch_dtype` is a property that logs a
# deprecation when set); earlier 4.x name it `torch_dtype` and keep any other key as a plain attribute, which their
# save_pretrained writes back unchanged.
CONFIG_DTYPE_KEY = "dtype" if TRANSFORMERS_VERSION >= (4, 56) else "torch_dtype"

# `from_pretrained(..., dtype="auto")`: the checkpoint's own dtype (transformers 5's default; 4.x loads fp32, which
# would upcast a bf16 EVA-CLIP-8B dir to 30 GB). 4.56-4.57 take `dtype` and log a deprecation for `torch_dtype`.
CHECKPOINT_DTYPE = ({} if TRANSFORMERS_VERSION >= (5,) else {"dtype": "auto"} if TRANSFORMERS_VERSION >= (4, 56)
                    else {"torch_dtype": "auto"})


_PEEK_FUNCTORCH_STACK = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)


def _in_functorch_transform() -> bool:
    """True inside torch.func's vmap / grad / jacrev / jvp, which have no batching rules for `out=` writes."""
    return _PEEK_FUNCTORCH_STACK is not None and _PEEK_FUNCTORCH_STACK() is not None


def _find_is_compiling() -> Callable[[], bool]:
    """`torch.compiler.is_compiling` (torch >= 2.3). torch 2.1 / 2.2 (LLaVA-NeXT pins 2.1.2) lack it and every
    forward asks it: there `torch._utils.is_compiling`, which dynamo folds to True while tracing (torch's optimizers
    ask it there), takes its place; where neither exists nothing can be compiled, so False."""
    found = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if found is None:
        found = getattr(torch._utils, "is_compiling", None)
    return found if found is not None else (lambda: False)


is_compiling = _find_is_compiling()


def is_tracing() -> bool:
    """True under torch.compile, torch.export, jit tracing or a torch.func transform, where eager-only kernels
    (`out=` writes, Python loops over blocks, value checks) must step aside for plain module calls that trace into one
    graph (or that vmap can batch)."""
    return bool(is_compiling() or torch.jit.is_tracing() or _in_functorch_transform())


_FORWARD_AD = torch.autograd.forward_ad


def forward_ad_active() -> bool:
    """True inside a `torch.autograd.forward_ad.dual_level()` (forward-mode AD, which runs under `torch.no_grad()`
    too): an attribute read, since the inference paths ask it for every attention and MLP."""
    return _FORWARD_AD._current_level >= 0


try:  # the mode that `with torch.device(...)` enters: it only sets factory functions' default device
    from torch.utils._device import DeviceContext as _DeviceContext
except ImportError:  # pragma: no cover - every supported torch has it
    _DeviceContext = None


def overriding_modes_active() -> bool:
    """True while a `TorchDispatchMode` (FlopCounterMode, a user's op logger or rewriter) or a `TorchFunctionMode`
    other than `with torch.device(...)`'s is active: such modes see, and may replace, the ops a module call runs
    (`F.linear`, `aten.addmm`), so eager-only kernels must not swap those ops for others. Two C calls when none is
    active."""
    if torch._C._len_torch_dispatch_stack():
        return True
    if not torch._C._is_torch_function_mode_enabled():
        return False
    from torch.overrides import _get_current_function_mode_stack

    return any(type(mode) is not _DeviceContext for mode in _get_current_function_mode_stack())


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 detection (modeling needs it; `zero.py`, a layer above, re-exports it with the rest of its API)
# --------------------------------------------------------------------------------------------------------------------


def _transformers_zero3_enabled() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - every supported transformers line has it
        return False
    return bool(is_deepspeed_zero3_enabled())


def is_zero_init_active() -> bool:
    """True inside an open `deepspeed.zero.Init` context (modules built now get partitioned parameters).

    Reads DeepSpeed's own context counter only when DeepSpeed is already imported, so it never imports DeepSpeed."""
    module = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    return module is not None and getattr(module, "zero_init_context", 0) > 0


def is_zero3_enabled() -> bool:
    """True when a ZeRO-3 configuration is live: transformers' `HfDeepSpeedConfig` of stage 3 is alive (what the
    Trainer and LLaVA's train.py set up, on transformers 4.x and 5.x alike), or a `deepspeed.zero.Init` is open."""
    return _transformers_zero3_enabled() or is_zero_init_active()


def is_partitioned(tensor: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (its `data` is a placeholder; the values live in `ds_tensor` slices)."""
    return hasattr(tensor, "ds_id")


# A stage-3 config that only tells transformers' loader that ZeRO-3 is on; the open `zero.Init` (the outermost one
# decides how parameters are partitioned) keeps its own settings. Batch sizes are explicit because DeepSpeed checks them.
_ZERO_INIT_LOADING_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3},
}


@contextlib.contextmanager
def transformers_zero3_context() -> Iterator[None]:
    """Inside a bare `deepspeed.zero.Init` (no `HfDeepSpeedConfig` alive), make transformers' `from_pretrained` take
    its ZeRO-3 path for the duration of the block.

    Otherwise transformers does not know the parameters it builds are partitioned and copies the checkpoint into the
    empty placeholders: "size mismatch ... the shape in current model is torch.Size([0])" on 4.x and 5.x alike. With a
    live stage-3 config it gathers each module, lets rank 0 write it, and re-partitions. A no-op when no `zero.Init` is
    open or transformers already has a ZeRO-3 config; a user's own (non-stage-3) config is restored afterwards."""
    if not is_zero_init_active() or _transformers_zero3_enabled():
        yield
        return
    import transformers.integrations.deepspeed as hf_deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    previous = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = HfDeepSpeedConfig(copy.deepcopy(_ZERO_INIT_LOADING_CONFIG))  # registers itself through a weak reference
    try:
        yield
    finally:
        if hasattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref"):
            hf_deepspeed._hf_deepspeed_config_weak_ref = previous
        del config


# Streaming ZeRO-3 loader for the models' `from_pretrained`: it lives in `zero.py`, a layer above the models, which
# sets it here when imported (the tower, the launcher and `llava_evaclip.zero` users do); None leaves transformers'
# own loader in charge.
zero3_from_pretrained: Optional[Callable[..., Any]] = None


__all__ = [
    "init",
    "PretrainedConfig",
    "is_flash_attn_available",
    "is_compiling",
    "is_tracing",
    "forward_ad_active",
    "overriding_modes_active",
    "ALL_ATTENTION_FUNCTIONS",
    "FEATURES_RETURN_MODEL_OUTPUT",
    "SUB_CONFIGS_TAKE_ATTN_IMPLEMENTATION",
    "CONFIG_DTYPE_KEY",
    "TORCHSCRIPT_RETURNS_TUPLES",
    "GradientCheckpointingLayer",
    "HAS_ACTIVATION_CHECKPOINTING",
    "is_partitioned",
    "is_zero3_enabled",
    "is_zero_init_active",
    "transformers_zero3_context",
]
