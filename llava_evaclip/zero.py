"""DeepSpeed ZeRO-3 helpers for the EVA-CLIP tower: detection, collective-safe loading and gathering.

Under ZeRO-3 every parameter is partitioned across ranks as soon as its module is built (`deepspeed.zero.Init`, which
transformers opens itself when an `HfDeepSpeedConfig` of stage 3 is alive): `param.data` is an empty placeholder and
each rank holds `param.ds_tensor`, its 1/N slice. Loading a full checkpoint then has to gather each module's
parameters, let one rank write them, and re-partition; and every decision that can end in an error has to be taken
by all ranks together, or the ranks that did not fail wait forever in the next collective. Everything here also works
without DeepSpeed and without a process group (a plain single-process model), so callers need no separate path.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn
from transformers.utils import logging

from ._compat import (  # detection lives below modeling so that modeling need not import this module
    _transformers_zero3_enabled,
    is_partitioned,
    is_zero3_enabled,
    is_zero_init_active,
    transformers_zero3_context,
)

logger = logging.get_logger(__name__)

_MAX_KEYS_IN_MESSAGE = 20


# --------------------------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------------------------


def has_partitioned_parameters(module: nn.Module) -> bool:
    return any(is_partitioned(param) for param in module.parameters())


def full_shape(param: torch.Tensor) -> torch.Size:
    """The unpartitioned shape of a parameter (ZeRO-3 placeholders report an empty `shape`)."""
    return param.ds_shape if is_partitioned(param) else param.shape


def full_numel(param: torch.Tensor) -> int:
    return int(param.ds_numel) if is_partitioned(param) else param.numel()


# --------------------------------------------------------------------------------------------------------------------
# Collectives that also run single-process
# --------------------------------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if _distributed() else 1


def _communication_device() -> torch.device:
    """Where tensors must be for the process group's collectives (NCCL and friends need the accelerator)."""
    if torch.distributed.get_backend() == "gloo":
        return torch.device("cpu")
    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())
    return torch.device("cuda", torch.cuda.current_device())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just `[obj]` without a process group)."""
    if not _distributed() or torch.distributed.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src`, on every rank."""
    if not _distributed() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj if torch.distributed.get_rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def raise_if_any_rank_failed(local_error: Optional[str], exception_type: type[Exception] = ValueError) -> None:
    """Agree on an error before raising it: every rank passes its own message (or None) and, if any rank has one,
    every rank raises the same exception naming the ranks and their messages. A rank that raised alone would leave
    the others blocked in their next collective until the process-group timeout."""
    errors = all_gather_object(local_error)
    failed = [(rank, message) for rank, message in enumerate(errors) if message]
    if not failed:
        return
    if len(errors) == 1:
        raise exception_type(failed[0][1])
    messages = sorted({message for _, message in failed})
    if len(messages) == 1:
        ranks = ", ".join(str(rank) for rank, _ in failed)
        raise exception_type(f"{messages[0]} (on rank {ranks} of {len(errors)})")
    raise exception_type("; ".join(f"rank {rank}: {message}" for rank, message in failed))


# --------------------------------------------------------------------------------------------------------------------
# Gathering
# --------------------------------------------------------------------------------------------------------------------


def gathered_parameters(
    params: nn.Module | torch.Tensor | Iterable[torch.Tensor], modifier_rank: Optional[int] = None
) -> contextlib.AbstractContextManager:
    """`deepspeed.zero.GatheredParameters` over the partitioned ones among `params` (a module means all of its
    parameters); a no-op when none is partitioned, so the same code runs with and without ZeRO-3. Collective: all ranks
    must enter it with the same parameters. With `modifier_rank`, that rank's in-place changes are re-partitioned to
    all ranks on exit."""
    if isinstance(params, nn.Module):
        params = list(params.parameters())
    elif isinstance(params, torch.Tensor):
        params = [params]
    else:
        params = list(params)
    partitioned = [param for param in params if is_partitioned(param)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def _named_persistent_buffers(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for name, child in module.named_modules(prefix=prefix):
        for buffer_name, buffer in child._buffers.items():
            if buffer is not None and buffer_name not in child._non_persistent_buffers_set:
                yield (f"{name}.{buffer_name}" if name else buffer_name), buffer


def gathered_state_dict(module: nn.Module, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Full copies of every parameter and persistent buffer, gathered from their ZeRO-3 partitions one module at a
    time (peak extra memory: one module's parameters), on every rank. For comparisons and for saving; equals
    `module.state_dict()` (detached copies) when nothing is partitioned. Collective under ZeRO-3."""
    result: dict[str, torch.Tensor] = {}
    for name, child in module.named_modules():
        own = list(child.named_parameters(recurse=False))
        if not own:
            continue
        with gathered_parameters([param for _, param in own]):
            for param_name, param in own:
                key = f"{name}.{param_name}" if name else param_name
                result[key] = param.detach().to(device, copy=True)
    for key, buffer in _named_persistent_buffers(module):
        result[key] = buffer.detach().to(device, copy=True)
    return {key: result[key] for key in module.state_dict().keys() if key in result}


@dataclass
class PartitionStats:
    """How much of a module's parameter memory one rank holds."""

    local_param_bytes: int  # this rank's ZeRO-3 slices (or the full tensors of unpartitioned parameters)
    full_param_bytes: int  # all parameters, unpartitioned
    buffer_bytes: int  # buffers (never partitioned by ZeRO-3), persistent or not
    num_params: int
    num_partitioned: int

    @property
    def resident_bytes(self) -> int:
        return self.local_param_bytes + self.buffer_bytes

    def as_dict(self) -> dict[str, int]:
        return {
            "local_param_bytes": self.local_param_bytes,
            "full_param_bytes": self.full_param_bytes,
            "buffer_bytes": self.buffer_bytes,
            "resident_bytes": self.resident_bytes,
            "num_params": self.num_params,
            "num_partitioned": self.num_partitioned,
        }


def partition_stats(module: nn.Module) -> PartitionStats:
    """Per-rank resident parameter bytes (`ds_tensor` slices for partitioned parameters) against the full size."""
    local = full = count = partitioned = 0
    for param in module.parameters():
        count += 1
        full += full_numel(param) * param.element_size()
        if is_partitioned(param):
            partitioned += 1
            local += param.ds_tensor.numel() * param.ds_tensor.element_size()
        else:
            local += param.numel() * param.element_size()
    buffers = sum(buffer.numel() * buffer.element_size() for buffer in module.buffers())
    return PartitionStats(local, full, buffers, count, partitioned)


def align_unpartitioned_dtypes(module: nn.Module) -> list[str]:
    """Cast the floating-point parameters ZeRO-3 has not partitioned to the dtype of the partitioned ones; returns
    their names.

    Modules built after `zero.Init` closed (LLaVA's `mm_projector`, created in `initialize_vision_modules` once the
    language model and the tower are loaded) keep fp32 while the partitioned weights are bf16/fp16. DeepSpeed used to
    cast the whole model when wrapping it; recent releases skip that for zero-initialised models, and the ZeRO-3
    optimizer then refuses the mix of trainable dtypes (`assert len(set(t.dtype for t in tensors)) == 1` in
    `defragment`), or the forward fails on a bf16 input to an fp32 projector. A no-op without partitioned parameters
    or when they disagree among themselves."""
    dtypes = {param.ds_tensor.dtype for param in module.parameters() if is_partitioned(param)}
    if len(dtypes) != 1:
        return []
    (target,) = dtypes
    if not target.is_floating_point:
        return []
    cast = []
    for name, param in module.named_parameters():
        if not is_partitioned(param) and param.is_floating_point() and param.dtype != target:
            param.data = param.data.to(target)
            cast.append(name)
    if cast:
        logger.info(f"Cast {len(cast)} parameter(s) built outside zero.Init to {target}: {_format_keys(cast)}")
    return cast


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def _format_keys(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_KEYS_IN_MESSAGE])
    more = len(keys) - _MAX_KEYS_IN_MESSAGE
    return f"{shown}, ... ({more} more)" if more > 0 else shown


@dataclass
class LoadReport:
    """What `load_state_dict` found, identical on every rank."""

    loaded_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def error_message(self, strict: bool, source: str) -> Optional[str]:
        problems = []
        if self.mismatched:
            shapes = "; ".join(f"{key}: checkpoint {list(got)} vs model {list(want)}" for key, got, want in self.mismatched)
            problems.append(f"shape mismatch for {len(self.mismatched)} tensor(s): {shapes}")
        if strict and self.missing_keys:
            problems.append(f"missing {len(self.missing_keys)} key(s): {_format_keys(self.missing_keys)}")
        if strict and self.unexpected_keys:
            problems.append(f"unexpected {len(self.unexpected_keys)} key(s): {_format_keys(self.unexpected_keys)}")
        if not problems:
            return None
        return f"Cannot load {source}: " + "; ".join(problems) + "."


def _expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    expected = dict(model.named_parameters())
    expected.update(_named_persistent_buffers(model))
    return expected


def _inspect_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], ignore_unexpected: Sequence[str]
) -> LoadReport:
    expected = _expected_tensors(model)
    provided = set(state_dict)
    report = LoadReport()
    report.missing_keys = sorted(set(expected) - provided)
    patterns = [re.compile(pattern) for pattern in ignore_unexpected]
    report.unexpected_keys = sorted(
        key for key in provided - set(expected) if not any(pattern.search(key) for pattern in patterns)
    )
    for key in sorted(provided & set(expected)):
        got, want = tuple(state_dict[key].shape), tuple(full_shape(expected[key]))
        if got != want:
            report.mismatched.append((key, got, want))
        else:
            report.loaded_keys.append(key)
    return report


def load_state_dict(
    model: nn.Module,
    state_dict: Optional[Mapping[str, torch.Tensor]],
    *,
    strict: bool = True,
    src_rank: int = 0,
    ignore_unexpected: Sequence[str] = (),
    source: str = "the state dict",
) -> LoadReport:
    """Load a full (unpartitioned) state dict into `model`, whose parameters may be ZeRO-3 partitioned.

    Only rank `src_rank` needs the values: the other ranks may pass None (or meta tensors), so a large checkpoint is
    read once per node instead of once per rank. The source rank checks keys and shapes and broadcasts its verdict;
    on any mismatch (and, when `strict`, on missing or unexpected keys) every rank raises the same ValueError listing
    the keys, before any parameter is touched. Then each module's parameters are gathered, written by the source rank
    and re-partitioned (`GatheredParameters(modifier_rank=src_rank)`), and persistent buffers are broadcast.
    Collective under ZeRO-3: all ranks must call it. Without a process group it is a checked `load_state_dict`."""
    rank = get_rank()
    is_source = rank == src_rank
    verdict: Optional[tuple[Optional[LoadReport], Optional[str]]] = None
    if is_source:
        if state_dict is None:
            verdict = (None, f"Cannot load {source}: rank {src_rank} (the source rank) was given no state dict.")
        else:
            report = _inspect_state_dict(model, state_dict, ignore_unexpected)
            verdict = (report, report.error_message(strict, source))
    # One broadcast decides for everyone: all ranks raise together, or all go on to the gathers below.
    report, error = broadcast_object(verdict, src=src_rank)
    if error:
        raise ValueError(error)
    if report.missing_keys and is_source:
        logger.warning(f"{source}: {len(report.missing_keys)} key(s) missing, left as initialised: "
                       f"{_format_keys(report.missing_keys)}")

    loaded = set(report.loaded_keys)
    broadcast_plain = get_world_size() > 1
    with torch.no_grad():
        for name, child in model.named_modules():
            own = [
                (f"{name}.{param_name}" if name else param_name, param)
                for param_name, param in child.named_parameters(recurse=False)
            ]
            own = [(key, param) for key, param in own if key in loaded]
            partitioned = [(key, param) for key, param in own if is_partitioned(param)]
            if partitioned:
                with gathered_parameters([param for _, param in partitioned], modifier_rank=src_rank):
                    if is_source:
                        for key, param in partitioned:
                            param.data.copy_(state_dict[key])
            plain = [(key, param) for key, param in own if not is_partitioned(param)]
            plain += [
                (f"{name}.{buffer_name}" if name else buffer_name, buffer)
                for buffer_name, buffer in child._buffers.items()
                if buffer is not None and buffer_name not in child._non_persistent_buffers_set
                and (f"{name}.{buffer_name}" if name else buffer_name) in loaded
            ]
            for key, tensor in plain:  # replicated tensors: the source rank's values, sent to every rank
                if is_source:
                    tensor.data.copy_(state_dict[key])
                if broadcast_plain:
                    value = tensor.data.detach().to(_communication_device(), copy=True).contiguous()
                    torch.distributed.broadcast(value, src=src_rank)
                    if not is_source:
                        tensor.data.copy_(value)
    return report


def load_checkpoint(
    model: nn.Module, checkpoint: str | os.PathLike, *, src_rank: int = 0, strict: bool = True
) -> LoadReport:
    """Load an original checkpoint (BAAI's .pt/.bin, open_clip, timm, or a Hugging Face dir: whatever
    `llava-evaclip convert` reads) straight into `model`, whose parameters may be ZeRO-3 partitioned.

    Only rank `src_rank` reads the file and maps it to our key names (the converter's mapping, so the result equals
    converting first); the other ranks never touch it. A file that cannot be read or mapped, and any missing,
    unexpected or mis-shaped weight, raises the same ValueError on every rank. Collective under ZeRO-3."""
    from .configuration_evaclip import EvaCLIPVisionConfig
    from .convert import load_source, map_state_dict

    config = model.config
    vision_only = isinstance(config, EvaCLIPVisionConfig)
    vision_config = config if vision_only else config.vision_config
    state_dict, local_error = None, None
    if get_rank() == src_rank:
        try:
            state_dict, _ = map_state_dict(load_source(checkpoint), vision_config, vision_only=vision_only)
        except (OSError, ValueError, RuntimeError) as error:
            local_error = f"Cannot load {os.fspath(checkpoint)!r}: {error}"
    raise_if_any_rank_failed(local_error)
    expected = _expected_tensors(model)
    # A vision tower without projection takes a checkpoint that has one (BAAI's `visual.head`), as LLaVA does.
    ignore = [r"^visual_projection\."] if "visual_projection.weight" not in expected else []
    return load_state_dict(
        model, state_dict, strict=strict, src_rank=src_rank, ignore_unexpected=ignore, source=os.fspath(checkpoint)
    )


def from_pretrained(model_class: Any, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """`model_class.from_pretrained`, refusing a checkpoint that lacks any of the model's weights.

    transformers only warns about missing keys and initialises them randomly; under ZeRO-3 that silently trains a
    half-random tower. Here each rank reports what it found missing and, if any rank did, every rank raises the same
    ValueError listing the keys (no rank is left waiting in a collective). Works with and without ZeRO-3."""
    kwargs["output_loading_info"] = True
    own_error: Optional[Exception] = None
    local_error = None
    model = None
    try:
        model, info = model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
    except Exception as error:  # a rank that cannot read the checkpoint must not leave the others waiting
        own_error = error
        local_error = f"{type(error).__name__}: {error}"
        info = {}
    missing = sorted(info.get("missing_keys") or [])
    if missing and local_error is None:
        local_error = (
            f"The checkpoint {os.fspath(pretrained_model_name_or_path)!r} lacks {len(missing)} weight(s) of "
            f"{model_class.__name__}: {_format_keys(missing)}. Convert the checkpoint again (llava-evaclip convert) "
            f"or point to the right directory."
        )
    try:
        raise_if_any_rank_failed(local_error)
    except ValueError as agreed:
        if own_error is not None:
            raise agreed from own_error
        raise
    return model


__all__ = [
    "LoadReport",
    "align_unpartitioned_dtypes",
    "PartitionStats",
    "all_gather_object",
    "broadcast_object",
    "from_pretrained",
    "full_numel",
    "full_shape",
    "gathered_parameters",
    "gathered_state_dict",
    "get_rank",
    "get_world_size",
    "has_partitioned_parameters",
    "is_partitioned",
    "is_zero3_enabled",
    "is_zero_init_active",
    "load_checkpoint",
    "load_state_dict",
    "partition_stats",
    "raise_if_any_rank_failed",
    "transformers_zero3_context",
]
