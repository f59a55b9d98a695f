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
import pickle
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn
from transformers.utils import logging

from . import _compat
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

    if len(partitioned) == 1 or not _gathers_on_gloo(partitioned[0]):
        return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)
    return _gathered_one_at_a_time(partitioned, modifier_rank)


@contextlib.contextmanager
def _gathered_one_at_a_time(params: list[torch.Tensor], modifier_rank: Optional[int]) -> Iterator[None]:
    """DeepSpeed before 0.19.8 gathers several parameters with one asynchronous collective each and waits for the last
    only: right with NCCL (one stream, in order), but gloo's works are independent, so on CPU ranks the others could
    still be arriving, and the gathered values were partly uninitialised memory. A gather of one parameter blocks."""
    import deepspeed

    unique = list({id(param): param for param in params}.values())
    with contextlib.ExitStack() as stack:
        for param in unique:
            stack.enter_context(deepspeed.zero.GatheredParameters([param], modifier_rank=modifier_rank))
        yield


def _gathers_on_gloo(param: torch.Tensor) -> bool:
    group = getattr(param, "ds_process_group", None)
    try:
        return torch.distributed.get_backend(group) == "gloo"
    except (RuntimeError, ValueError):  # no process group: DeepSpeed gathers nothing
        return False


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
    converting first); the other ranks never touch it. The converter's integrity checks run too (every zip member's
    CRC, every value finite), so a damaged file `convert` refuses is refused here with the same message. A file that
    cannot be read, mapped or trusted, and any missing, unexpected or mis-shaped weight, raises the same ValueError on
    every rank, before any parameter is touched. Collective under ZeRO-3."""
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


def _load_error_message(error: Exception, source: str | os.PathLike) -> str:
    """What a failed `from_pretrained` says. A `.bin` weights file that torch.load(weights_only=True) refuses gets
    convert's wording: torch's own message advises loading it with weights_only=False or allowlisting the refused
    global (`exec`, for a hostile file), which is not advice to pass on about an untrusted download. transformers 4.x
    raises an OSError about TF 2.0 checkpoints instead, with torch's error in the exception chain: found there too."""
    cause: Optional[BaseException] = error
    for _ in range(8):  # a short chain; never loop on a cyclic one
        if cause is None or isinstance(cause, pickle.UnpicklingError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, pickle.UnpicklingError):
        from .convert import weights_only_refusal

        return weights_only_refusal(f"{os.fspath(source)}: torch.load(weights_only=True) refused a weights file", cause)
    return str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"


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
        local_error = _load_error_message(error, pretrained_model_name_or_path)
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



# --------------------------------------------------------------------------------------------------------------------
# Streaming from_pretrained under ZeRO-3
# --------------------------------------------------------------------------------------------------------------------

_SAFE_WEIGHTS = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"
# from_pretrained arguments the streaming loader honours; any other one (a hub id's revision, device_map, quantization,
# a state_dict, ...) sends the call down transformers' own ZeRO-3 path.
_STREAMABLE_KWARGS = frozenset({
    "config", "dtype", "torch_dtype", "output_loading_info", "low_cpu_mem_usage", "device_map", "attn_implementation",
    "local_files_only", "use_safetensors",
})
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _safetensors_files(directory: str | os.PathLike) -> Optional[list[str]]:
    """The safetensors shards of a local model directory (one file or an index), or None."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    single = os.path.join(directory, _SAFE_WEIGHTS)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(directory, _SAFE_INDEX)
    if not os.path.isfile(index):
        return None
    import json

    with open(index) as handle:
        weight_map = json.load(handle).get("weight_map") or {}
    names = sorted(set(weight_map.values()))
    # as `convert`: an index names files in its own dir, never elsewhere on disk (".." is the parent dir itself)
    outside = [name for name in names if os.path.basename(name) != name or name in (os.curdir, os.pardir)]
    if outside:
        raise ValueError(f"{index} names shards outside its directory: {_format_keys(outside)}.")
    return [os.path.join(directory, name) for name in names] or None


def _safetensors_header(files: Sequence[str]) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """key -> (file, shape, safetensors dtype) from the shards' headers; no tensor data is read."""
    from safetensors import safe_open

    header = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                if key in header:  # two values for one weight: neither can be chosen silently (as in `convert`)
                    raise ValueError(f"{key!r} is stored in two shards, {os.path.basename(header[key][0])!r} and "
                                     f"{os.path.basename(file)!r}; expected each weight in one shard.")
                view = handle.get_slice(key)
                header[key] = (file, tuple(view.get_shape()), view.get_dtype())
    return header


_READ_CHUNK_BYTES = 16 << 20


def _copy_from_file(target: torch.Tensor, file: str, key: str) -> None:
    """Copy one checkpoint tensor into `target` (casting to its dtype) in row blocks of at most ~16 MB, each read
    with the file mapped only while it is read: a handle kept open keeps every page it touched resident, and a whole
    read tensor next to the gathered parameter doubles the reading rank's transient memory."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        shape = handle.get_slice(key).get_shape()
    row_bytes = max(1, target.element_size() * (int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1))
    step = max(1, _READ_CHUNK_BYTES // row_bytes)
    if not shape or shape[0] <= step:
        with safe_open(file, framework="pt") as handle:
            target.copy_(handle.get_tensor(key))
        return
    for start in range(0, shape[0], step):
        with safe_open(file, framework="pt") as handle:
            target[start:start + step].copy_(handle.get_slice(key)[start:start + step])


def _writable_partition(param: torch.Tensor) -> bool:
    """True when `param`'s slice on this rank is a plain tensor that can be written in place: partitioned over the
    whole world, not swapped to NVMe, not quantised, no secondary (hpZ) copy. Decided from the config, alike on all
    ranks; any other parameter is loaded through `GatheredParameters`."""
    partition = getattr(param, "ds_tensor", None)
    group = getattr(param, "ds_process_group", None)
    return (
        partition is not None and getattr(partition, "final_location", None) is None
        and getattr(param, "ds_secondary_tensor", None) is None and not hasattr(partition, "ds_quant_scale")
        and (not _distributed() or torch.distributed.get_world_size(group) == get_world_size())
    )


def _scatter_into_partitions(
    param: torch.Tensor, file: Optional[str], key: str, buffers: dict[torch.dtype, torch.Tensor]
) -> None:
    """Write a checkpoint tensor straight into every rank's ZeRO-3 slice: rank 0 reads rank r's range of the flattened
    tensor in row blocks of ~16 MB and sends each to rank r, which copies it into `param.ds_tensor`. No rank ever
    holds the full parameter (as `GatheredParameters` would, briefly, on every rank). The receiving ranks reuse one
    buffer from `buffers` for all blocks: a fresh block each time fragments the heap and grows their RSS. Collective."""
    rank, world = get_rank(), get_world_size()
    partition_size, numel = int(param.ds_tensor.ds_numel), int(param.ds_numel)
    shape = tuple(param.ds_shape)
    row = int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1
    step = max(row, (_READ_CHUNK_BYTES // param.ds_tensor.element_size()) // row * row)
    device = _communication_device() if world > 1 else param.ds_tensor.device
    if rank == 0:
        from safetensors import safe_open

    for owner in range(world):
        begin, end = owner * partition_size, min((owner + 1) * partition_size, numel)
        for start in range(begin, end, step):
            stop = min(start + step, end)
            if rank == 0:
                first, last = start // row, -(-stop // row)
                with safe_open(file, framework="pt") as handle:
                    block = handle.get_slice(key)[first:last] if shape else handle.get_tensor(key)
                piece = block.reshape(-1)[start - first * row: stop - first * row].to(param.ds_tensor.dtype)
                if owner != 0:
                    torch.distributed.send(piece.to(device).contiguous(), dst=owner)
                else:
                    param.ds_tensor.data[start - begin: stop - begin].copy_(piece)
            elif rank == owner:
                dtype = param.ds_tensor.dtype
                if dtype not in buffers or buffers[dtype].numel() < step:
                    buffers[dtype] = torch.empty(step, dtype=dtype, device=device)
                piece = buffers[dtype][: stop - start]
                torch.distributed.recv(piece, src=0)
                param.ds_tensor.data[start - begin: stop - begin].copy_(piece)


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _resolve_dtype(requested: Any, config: Any, header: Mapping[str, tuple[str, tuple[int, ...], str]]) -> torch.dtype:
    """transformers' rules: None -> torch's default, "auto" -> the config's dtype, else the checkpoint's first
    floating-point tensor, a name or a torch.dtype as given."""
    if requested is None:
        return torch.get_default_dtype()
    if requested == "auto":
        configured = getattr(config, "dtype", None) if _transformers_major() >= 5 else None
        configured = configured or getattr(config, "torch_dtype", None)
        if configured is not None:
            return getattr(torch, configured) if isinstance(configured, str) else configured
        found = (_SAFETENSORS_DTYPES.get(dtype) for _, _, dtype in header.values())
        return next((dtype for dtype in found if dtype is not None), torch.get_default_dtype())
    if isinstance(requested, str) and isinstance(getattr(torch, requested, None), torch.dtype):
        return getattr(torch, requested)
    if isinstance(requested, torch.dtype):
        return requested
    raise ValueError(f"dtype must be a torch.dtype, its name or 'auto', got {requested!r}.")


@contextlib.contextmanager
def _partitioned_without_broadcast() -> Iterator[None]:
    """Inside: `zero.Init` partitions each new parameter without first broadcasting rank 0's full initial value.

    DeepSpeed's `Init._zero_init_param` sends every parameter whole from rank 0 so that all ranks partition the same
    random init; each receiving rank then writes the full tensor (a whole MLP matrix of the 8B tower, 160 MiB in bf16)
    before keeping its slice, which puts their peak above 1/N of the tower. Only for builds whose every parameter is
    overwritten from the checkpoint next (the streamed load, which raises on any missing weight): the skipped values
    are never read. A no-op on a DeepSpeed without that hook."""
    from deepspeed.runtime.zero.partition_parameters import Init

    original = Init.__dict__.get("_zero_init_param")
    if original is None or not hasattr(Init, "_convert_to_deepspeed_param"):
        logger.debug("deepspeed.zero.Init has no _zero_init_param: building with its initial broadcast")
        yield
        return

    def _zero_init_param(self: Any, param: nn.Parameter) -> None:
        self._convert_to_deepspeed_param(param)
        param.partition()

    Init._zero_init_param = _zero_init_param
    try:
        yield
    finally:
        Init._zero_init_param = original


def _build_partitioned(model_class: Any, config: Any, dtype: torch.dtype, broadcast_init: bool = True) -> nn.Module:
    """`model_class(config)` with every parameter partitioned as it is built (never a full tower on any rank), in
    `dtype`, skipping weight initialisation (every weight is loaded next). Inside an open `zero.Init` that one is used,
    else one from transformers' live DeepSpeed config, as transformers' loader does. With `broadcast_init=False` the
    ranks do not agree on the (skipped) initial values either: the caller must overwrite every parameter."""
    import deepspeed

    try:  # transformers 5
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    contexts: list[contextlib.AbstractContextManager] = [no_init_weights()]
    if not broadcast_init:
        contexts.append(_partitioned_without_broadcast())
    if not is_zero_init_active():
        from transformers.integrations import deepspeed_config

        contexts.append(deepspeed.zero.Init(config_dict_or_path=deepspeed_config()))
    try:  # transformers >= 4.46: tells its own loaders (a nested from_pretrained) not to open another zero.Init
        from transformers.modeling_utils import set_zero3_state

        contexts.append(set_zero3_state())
    except ImportError:
        pass
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    # Buffers computed from the config (the RoPE tables) were made while zero.Init recast new floating-point tensors
    # to its dtype; compute them again, as transformers' ZeRO-3 loader does. Modules with parameters are all loaded.
    with torch.no_grad():
        for module in model.modules():
            if module._non_persistent_buffers_set and not any(True for _ in module.parameters(recurse=False)):
                model._init_weights(module)
    return model


def streamed_from_pretrained(model_class: Any, *args: Any, **kwargs: Any) -> Optional[Any]:
    """`model_class.from_pretrained` of a local safetensors directory under ZeRO-3, streamed; None when it does not
    apply (no ZeRO-3, no local safetensors, arguments it does not handle), for transformers' own path.

    transformers' ZeRO-3 loader gathers module by module, but first reads the checkpoint into one state dict (5.x
    merges every shard on rank 0), so rank 0's peak is the whole checkpoint. Here the model is built partitioned, rank 0
    checks the shards' headers against it (every rank raises the same ValueError on a missing, unexpected or mis-shaped
    weight), then reads each tensor in ~16 MB row blocks and sends every rank its slice (`_scatter_into_partitions`;
    `GatheredParameters` one parameter at a time where a slice cannot be written in place). The other ranks never open
    the files. Collective: all ranks must call it."""
    device_map = kwargs.get("device_map")
    if (
        len(args) != 1 or not is_zero3_enabled() or set(kwargs) - _STREAMABLE_KWARGS
        or (device_map is not None and device_map != "cpu") or kwargs.get("use_safetensors") is False
        or isinstance(kwargs.get("config"), (str, os.PathLike))
    ):
        return None
    (pretrained_model_name_or_path,) = args
    if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        return None
    source = os.fspath(pretrained_model_name_or_path)
    header, local_error = None, None
    if get_rank() == 0:
        try:
            files = _safetensors_files(source)
            if files is not None:
                header = _safetensors_header(files)
        except Exception as error:  # a damaged index or header (safetensors has its own error type): every rank raises
            local_error = f"Cannot read the safetensors weights of {source!r}: {' '.join(str(error).split())}"
    header, error = broadcast_object((header, local_error))
    if error:
        raise ValueError(error)
    if header is None:
        return None

    import copy  # local: main's zero.py no longer imports it at the top

    config = copy.deepcopy(kwargs["config"]) if kwargs.get("config") is not None else (
        model_class.config_class.from_pretrained(source, local_files_only=True))
    requested = kwargs.get("dtype", kwargs.get("torch_dtype"))
    dtype = _resolve_dtype(requested, config, header)
    if kwargs.get("attn_implementation") is not None:
        config._attn_implementation = kwargs["attn_implementation"]
    if _transformers_major() >= 5:
        for sub_config in [config] + [getattr(config, key, None) for key in getattr(config, "sub_configs", {})]:
            if sub_config is not None:
                sub_config.dtype = dtype
    else:
        config.torch_dtype = dtype
        # 4.x before 4.54 chooses the attention kernel (sdpa where supported) in from_pretrained, not in the model;
        # later releases choose it in the model's constructor and have no `_autoset_attn_implementation`.
        autoset = getattr(model_class, "_autoset_attn_implementation", None)
        if autoset is not None:
            config = autoset(config, torch_dtype=dtype, check_device_map=False)
    # No initial broadcast: its values would be overwritten below, as every parameter is (strict: a weight missing
    # from the checkpoint raises here on every rank), so the ranks' unsynchronised initial slices are never used.
    model = _build_partitioned(model_class, config, dtype, broadcast_init=False)

    shapes = {key: torch.empty(shape, device="meta") for key, (_, shape, _) in header.items()}
    ignore = list(getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or [])
    report = _inspect_state_dict(model, shapes, ignore)
    error = report.error_message(strict=True, source=source)
    expected = _expected_tensors(model)
    if not error and set(report.loaded_keys) != set(expected):  # the guarantee the skipped broadcast relies on
        error = f"Cannot load {source}: not loaded: {_format_keys(sorted(set(expected) - set(report.loaded_keys)))}."
    if error:
        raise ValueError(f"{error} Convert the checkpoint again (llava-evaclip convert) or point to the right directory.")

    is_source, broadcast_plain = get_rank() == 0, get_world_size() > 1
    buffers: dict[torch.dtype, torch.Tensor] = {}
    with torch.no_grad():
        for key in report.loaded_keys:
            tensor, file = expected[key], header[key][0]
            if is_partitioned(tensor) and _writable_partition(tensor):
                _scatter_into_partitions(tensor, file if is_source else None, key, buffers)
                continue
            if is_partitioned(tensor):
                with gathered_parameters([tensor], modifier_rank=0):
                    if is_source:
                        _copy_from_file(tensor.data, file, key)
                continue
            if is_source:
                _copy_from_file(tensor.data, file, key)
            if broadcast_plain:  # replicated (not partitioned) tensors: rank 0's values, sent to every rank
                value = tensor.data.detach().to(_communication_device(), copy=True).contiguous()
                torch.distributed.broadcast(value, src=0)
                if not is_source:
                    tensor.data.copy_(value)
    model.eval()
    logger.info(f"Loaded {len(report.loaded_keys)} tensors of {source} into the ZeRO-3 partitioned {model_class.__name__}")
    if kwargs.get("output_loading_info"):
        return model, {"missing_keys": [], "unexpected_keys": report.unexpected_keys, "mismatched_keys": [],
                       "error_msgs": []}
    return model


_compat.zero3_from_pretrained = streamed_from_pretrained  # the models' from_pretrained cannot import this layer

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
    "streamed_from_pretrained",
    "transformers_zero3_context",
]
