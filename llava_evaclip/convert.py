"""Lossless, streaming conversion of released EVA-CLIP checkpoints into this package's Hugging Face format.

Source kinds, detected from the state-dict keys:

- ``baai``: BAAI's release files (``EVA02_CLIP_L_336_psz14_s6B.pt`` ...), in either of BAAI's layouts: ``CLIP`` (text
  tower at the top level: ``transformer.resblocks.*``, ``token_embedding``, ...) or ``CustomCLIP`` (the same under
  ``text.``); vision under ``visual.`` with a fused ``qkv`` plus ``q_bias``/``v_bias`` (EVA01, bigE) or separate
  ``q_proj``/``k_proj``/``v_proj`` (EVA02).
- ``open_clip``: open_clip's EVA models: a timm trunk under ``visual.trunk.`` (its ``head`` is the image projection)
  and the text tower under ``text.``.
- ``timm``: a timm ``Eva`` vision state dict (``eva02_*_clip_*``, ``eva_giant_patch14_clip_224``) or a bare BAAI
  ``visual`` state dict; always converted to a vision tower.
- ``hf``: a Hugging Face dir of InternVL's port (``model_type`` "clip") or of this package, rewritten in our format.

Every source weight must land on exactly one model weight and every model weight must come from the source: anything
left over on either side, or any shape that differs, is a `ConversionError` that lists the keys — never a silent
random init. ``.pt``/``.bin`` files are read with ``torch.load(weights_only=True, mmap=True)`` (a checkpoint cannot run
code), every zip member's CRC is checked and every converted tensor must be finite.

Conversion streams, so checkpoints larger than memory convert: the key mapping and all shape checks run on shapes
only (meta tensors); then each output tensor is read from the memory-mapped source, cast to the output dtype and
written into its safetensors shard, and the source pages are handed back to the OS, so the resident memory is a few
tensors, not the checkpoint. Output goes to a staging dir beside OUT (named after the writing process and its host, so
a later run on the same host can remove it once that process is gone) that is renamed to OUT only when complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import inspect
import json
import mmap
import os
import pickle
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import struct
import sys
import threading
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from transformers.utils import logging

from ._processes import TERMINATING_SIGNALS, process_exists
from ._safetensors import read_safetensors_header
from .configuration_evaclip import EvaCLIPConfig, EvaCLIPTextConfig, EvaCLIPVisionConfig, resolve_arch
from .modeling_evaclip import (
    EvaCLIPModel,
    EvaCLIPPreTrainedModel,
    EvaCLIPRotaryEmbedding,
    EvaCLIPVisionModel,
    EvaCLIPVisionModelWithProjection,
)
from .processing import build_image_processor
from .tokenization import PAD_TOKEN_ID, VOCAB_SIZE, build_tokenizer, write_bpe_files

logger = logging.get_logger(__name__)

SOURCE_KINDS = ("baai", "open_clip", "timm", "hf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Shards above this size are split (save_pretrained's max_shard_size): one file for B/L models, several for g/bigE/8B.
DEFAULT_MAX_SHARD_SIZE = "5GB"
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# What a previous `convert` output holds: only such a dir may be replaced with --overwrite.
CONVERTED_MODEL_TYPES = ("evaclip", "evaclip_vision_model")
_CONVERTED_FILES = re.compile(
    r"(config\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors|preprocessor_config\.json"
    r"|processor_config\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|vocab\.json"
    r"|merges\.txt|added_tokens\.json|chat_template\.jinja|README\.md)"
)
# `.OUT.converting-<pid>@<host>-<tag>` (a staging dir) and `...-replaced` (the previous OUT while it is swapped out);
# names without `@<host>` are those of older versions.
_STAGING_NAME = re.compile(
    r"\.(?P<name>.+)\.converting-(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9_]+))?-[0-9a-f]+(?P<replaced>-replaced)?"
)
_STATE_DICT_WRAPPERS = ("state_dict", "module", "model")
# Tensor dicts beside `module` in DeepSpeed's mp_rank_*_model_states.pt that are no other version of the weights
# (ZeRO-1/2: the frozen parameters, also in `module`): not named as "not converted".
_DEEPSPEED_COPIES = ("frozen_param_fragments",)
_MAX_LISTED_KEYS = 25
# fp16 release files store the rotary tables in half precision; a wrong grid or frequency is off by far more.
_ROPE_TABLE_ATOL = 2e-3
_READ_CHUNK = 8 << 20
_SERIAL_ELEMENTS = 1 << 15  # at::internal::GRAIN_SIZE: torch splits no op this small across threads
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted losslessly; the message says what is wrong and what is expected."""


class _ValueError(ConversionError):
    """A refusal based on tensor values (not names or shapes), which a corrupted file could also explain."""


# Signals deferred over renames; TERMINATING_SIGNALS end a conversion through `ConversionTerminated` (cleanup first).
DEFERRED_SIGNALS = {signal.SIGINT, *TERMINATING_SIGNALS}


class ConversionTerminated(BaseException):
    """SIGTERM arrived while converting: raised so that the staging dir is removed and OUT restored (not an
    `Exception`, so no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@dataclass
class ConversionResult:
    """What `convert_checkpoint` wrote."""

    output_dir: str
    source_kind: str
    model_class: str
    num_parameters: int
    dtype: str
    files: list[str] = field(default_factory=list)


def _list_keys(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    return shown + (f", ... ({len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else "")


# ----------------------------------------------------------------------------------------------------------------------
# Reading sources: shapes first, each tensor's data only when it is written
# ----------------------------------------------------------------------------------------------------------------------


def _refusal_reason(message: str) -> str:
    """The part of torch's weights_only error that names what was refused, on one line, without its advice to load
    the file with weights_only=False (not advice a converter of untrusted downloads should pass on). torch writes the
    advice and the refusal in one paragraph (2.6 on) or on one line (2.1-2.5), the refusal after "WeightsUnpickler
    error:"; other refusals stand in paragraphs of their own, or (2.5) on a line after the advice."""
    _, marker, refusal = message.rpartition("WeightsUnpickler error:")
    paragraphs = [part.strip() for part in (refusal if marker else message).split("\n\n") if part.strip()]
    useful = []
    for part in paragraphs:
        advice, _, rest = part.partition("\n")
        if advice.startswith("Weights only load failed") and advice.endswith("trusted source.") and rest.strip():
            useful.append(rest)  # torch 2.5: the refusal on the line after its one-line advice
        elif not part.startswith(("Weights only load failed", "Check the documentation")):
            useful.append(part)
    reason = " ".join((useful or paragraphs or ["unknown"])[0].split())
    # torch's advice to allowlist the global (add_safe_globals) is for code that loads the file, not a CLI user.
    return reason.split(" Please use `torch.serialization.add_safe_globals", 1)[0]


def weights_only_refusal(what: str, error: pickle.UnpicklingError, expected: str = "") -> str:
    """One line for a file torch.load(weights_only=True) refused, naming what it refused (`_refusal_reason`)."""
    return (f"{what} because it holds Python objects other than tensors and plain containers (loading them could run "
            f"arbitrary code, so nothing was executed).{expected} Refused: {_refusal_reason(str(error))}")


def _torch_load(path: str, mmap_file: bool) -> Any:
    """torch.load that never unpickles code; memory-mapped for zip checkpoints, so no tensor is read until used."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_file)
    except pickle.UnpicklingError as error:
        raise ConversionError(weights_only_refusal(
            f"{path}: torch.load(weights_only=True) refused this file", error,
            " Expected a state dict of tensors as BAAI, timm and open_clip release them.")) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error}).") from None


def _holds_weights(value: Any, depth: int = len(_STATE_DICT_WRAPPERS)) -> bool:
    """A mapping with a tensor, directly or under a wrapper key: a candidate state dict. A config dict or an empty
    one beside the state dict (`{"state_dict": ..., "model": {"arch": ...}}`) is not one."""
    return isinstance(value, Mapping) and (any(isinstance(item, torch.Tensor) for item in value.values()) or (
        depth > 0 and any(_holds_weights(value.get(key), depth - 1) for key in _STATE_DICT_WRAPPERS)))


def _same_weights(first: Mapping, second: Mapping) -> bool:
    """The same tensors under the same names (`{"state_dict": sd, "model": sd}`, or two `model.state_dict()` calls,
    whose tensors torch.save stores once): no choice to make between the two."""
    return first is second or (first.keys() == second.keys() and all(
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        and a.stride() == b.stride() and a.data_ptr() == b.data_ptr() for a, b in
        ((first[key], second[key]) for key in first)))


def _unwrap_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """The flat name -> tensor dict inside a checkpoint: unwraps {"state_dict"/"module"/"model": ...} and strips
    DistributedDataParallel's `module.` prefixes."""
    for _ in range(len(_STATE_DICT_WRAPPERS) + 1):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
            break
        wrappers = [key for key in _STATE_DICT_WRAPPERS if isinstance(obj.get(key), Mapping)]
        if len(wrappers) > 1:  # e.g. {"module": ..., "model": ...}: which one is the model is not ours to guess
            wrappers = [key for key in wrappers if _holds_weights(obj[key])] or wrappers
            if not all(_same_weights(obj[wrappers[0]], obj[key]) for key in wrappers[1:]):
                raise ConversionError(
                    f"{path}: the checkpoint holds several different state dicts ({', '.join(map(repr, wrappers))}); "
                    f"expected one. Save the one to convert alone, e.g. torch.save(checkpoint[{wrappers[0]!r}], "
                    "'weights.pt').")
        if not wrappers:
            break
        others = sorted(str(key) for key, value in obj.items() if key != wrappers[0] and isinstance(value, Mapping)
                        and value and all(isinstance(item, torch.Tensor) for item in value.values())
                        and not _same_weights(obj[wrappers[0]], value)
                        and not (wrappers[0] == "module" and key in _DEEPSPEED_COPIES))
        if others:  # e.g. timm's / open_clip's `state_dict_ema` beside `state_dict`: say which one is converted
            logger.warning(f"{path}: converting the weights under {wrappers[0]!r}; not converted: "
                           f"{', '.join(map(repr, others))}.")
        obj = obj[wrappers[0]]
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(
            f"{path}: expected a state dict (a mapping of names to tensors, optionally under 'state_dict', 'module' "
            f"or 'model'), found {type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''}."
        )
    not_tensors = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ConversionError(
            f"{path}: the state dict holds entries that are not tensors: {_list_keys(map(str, not_tensors))}."
        )
    _check_tensor_kinds(obj, path)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name in tensors:  # `module.K` and `K`: keeping either would silently drop the other's values
            raise ConversionError(
                f"{path}: the state dict holds both {'module.' + name!r} and {name!r}, the same weight twice once "
                "DistributedDataParallel's 'module.' prefix is removed; expected each weight once (keep one of the "
                "two, e.g. re-save the checkpoint from the unwrapped model)."
            )
        tensors[name] = value
    return tensors


def _check_tensor_kinds(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    """Only dense real tensors are weights: a sparse, quantized or complex tensor would be densified, dequantized or
    cast by the copy into the model, which is not the lossless conversion promised; refused, naming the keys."""
    kinds = {
        "sparse or otherwise non-dense (layout other than torch.strided)": [
            key for key, value in tensors.items() if value.layout != torch.strided],
        "quantized": [key for key, value in tensors.items() if value.layout == torch.strided and value.is_quantized],
        "complex": [key for key, value in tensors.items() if value.layout == torch.strided and value.is_complex()],
    }
    problems = [f"{kind}: {_list_keys(map(str, keys))}" for kind, keys in kinds.items() if keys]
    if problems:
        raise ConversionError(
            f"{path}: the state dict holds tensors that are not dense real tensors ({'; '.join(problems)}); expected "
            "dense floating-point weights as EVA-CLIP releases store them."
        )


def _madvise() -> Optional[Callable[..., int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_MADVISE = _madvise()
_MADV_DONTNEED = 4


class _TorchFile:
    """A torch checkpoint, memory-mapped when it is a zip (every checkpoint torch.save wrote since 1.6)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.is_zip = zipfile.is_zipfile(path)
        self.tensors = _unwrap_state_dict(_torch_load(path, mmap_file=self.is_zip), path)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self, key: str) -> torch.Tensor:
        return torch.empty_like(self.tensors[key], device="meta")

    def load(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def release(self, tensor: torch.Tensor) -> None:
        """Hand the pages of a memory-mapped tensor back to the OS (they stay in the page cache; a later read maps
        them again), so reading the whole checkpoint never makes it all resident. Only whole pages inside the
        tensor's own storage, which lies in the read-only file mapping, are released."""
        if not self.is_zip or _MADVISE is None:
            return
        storage = tensor.untyped_storage()
        start = -(-storage.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (storage.data_ptr() + storage.nbytes()) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            _MADVISE(start, end - start, _MADV_DONTNEED)

    @functools.cached_property
    def _members(self) -> dict[int, tuple[str, int]]:
        """Storage data pointer -> (zip member, file offset of its data). The storages of a mapped file lie in file
        order, so sorting both by position pairs them (checked by size); {} when they cannot be paired."""
        if not self.is_zip:
            return {}
        with zipfile.ZipFile(self.path) as archive:
            members = sorted((m for m in _member_ranges(archive) if "/data/" in m[0]), key=lambda item: item[1])
        sizes = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
                 for tensor in self.tensors.values()}
        pointers = sorted(sizes)
        if len(pointers) != len(members) or any(sizes[p] != m[2] for p, m in zip(pointers, members)):
            return {}
        return {pointer: (member[0], member[1]) for pointer, member in zip(pointers, members)}

    def keys_by_member(self) -> dict[str, list[str]]:
        """Zip member name -> the keys whose data it holds."""
        keys: dict[str, list[str]] = {}
        for key, tensor in self.tensors.items():
            member = self._members.get(tensor.untyped_storage().data_ptr())
            if member is not None:
                keys.setdefault(member[0], []).append(key)
        return keys

    def file_offset(self, tensor: torch.Tensor) -> Optional[int]:
        """Where a contiguous view of a loaded tensor starts in the file (None if unknown)."""
        storage = tensor.untyped_storage()
        member = self._members.get(storage.data_ptr())
        return None if member is None else member[1] + tensor.data_ptr() - storage.data_ptr()


class _SafetensorsFile:
    """A safetensors file: the header is validated by the safetensors library, tensors are read one at a time with
    plain reads (no mapping of the whole file)."""

    def __init__(self, path: str) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            with safe_open(path, framework="pt", device="cpu"):
                pass
            header, _, self.data_start = read_safetensors_header(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ConversionError(f"{path}: not a readable safetensors file ({error}).") from None
        self.entries = {}
        for key, entry in header.items():
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ConversionError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, which EVA-CLIP does not "
                                      "use.")
            self.entries[key] = (dtype, tuple(entry["shape"]), tuple(entry["data_offsets"]))

    def keys(self) -> list[str]:
        return list(self.entries)

    def meta(self, key: str) -> torch.Tensor:
        dtype, shape, _ = self.entries[key]
        return torch.empty(shape, dtype=dtype, device="meta")

    def load(self, key: str) -> torch.Tensor:
        dtype, shape, (begin, end) = self.entries[key]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        data = bytearray(end - begin)
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + begin)
            handle.readinto(data)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def release(self, tensor: torch.Tensor) -> None:
        pass

    def file_offset(self, tensor: torch.Tensor) -> Optional[int]:
        return None  # tensors are read into memory


def _looks_like_safetensors(path: str) -> bool:
    """Whether the file starts as safetensors does (an 8-byte header length that fits in the file, then a JSON
    object): release files get renamed, and the extension alone would send a safetensors `.bin` to torch.load."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(9)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return False
    return len(start) == 9 and 8 + struct.unpack("<Q", start[:8])[0] <= size and start[8:9] == b"{"


def _open_weights(path: Union[str, os.PathLike]) -> Union[_TorchFile, _SafetensorsFile]:
    """The reader the file's contents call for (a zip is torch.save's format, a JSON header safetensors'), whatever
    its extension; a file that is neither is read by the format its extension names, for that format's error."""
    path = str(path)
    if zipfile.is_zipfile(path):
        if path.endswith(".safetensors"):  # recent torch.load hands any *.safetensors path to safetensors
            raise ConversionError(f"{path} is named .safetensors but holds a PyTorch checkpoint (torch.save's zip "
                                  "format); rename it to .pt or .bin and convert that.")
        return _TorchFile(path)
    if _looks_like_safetensors(path) or path.endswith(".safetensors"):
        return _SafetensorsFile(path)
    return _TorchFile(path)


def _member_ranges(archive: zipfile.ZipFile) -> Iterator[tuple[str, int, int, int, int]]:
    """(name, data offset, size, CRC, compression) of every member, from the local headers."""
    handle = archive.fp
    for info in archive.infolist():
        handle.seek(info.header_offset)
        local = handle.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise ConversionError(f"{archive.filename}: damaged zip archive (member {info.filename!r} has no header).")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        yield (info.filename, info.header_offset + 30 + name_length + extra_length, info.compress_size, info.CRC,
               info.compress_type)


def _scan_file(path: str, stop: Optional[threading.Event] = None) -> tuple[str, list[str]]:
    """One streaming pass over a file: its sha256 and, for a zip, the members whose data fails its CRC (plain reads
    through the page cache, so nothing stays resident). hashlib and zlib release the GIL on large buffers, so the
    pass runs beside the conversion."""
    digest = hashlib.sha256()
    members: list[tuple[str, int, int, int, int]] = []
    bad: list[str] = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = sorted(_member_ranges(archive), key=lambda item: item[1])
            compressed = [m for m in members if m[4] != zipfile.ZIP_STORED]
            if compressed:  # not written by torch.save; let zipfile decompress and check those members
                bad += [name for name in [archive.testzip()] if name]
            members = [m for m in members if m[4] == zipfile.ZIP_STORED]
    crcs = [0] * len(members)
    first = 0  # members before this one are complete
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    position = 0
    with open(path, "rb") as handle:
        while stop is None or not stop.is_set():
            count = handle.readinto(buffer)
            if not count:
                break
            chunk_end = position + count
            digest.update(view[:count])
            index = first
            while index < len(members) and members[index][1] < chunk_end:
                _, begin, size, _, _ = members[index]
                low, high = max(begin, position), min(begin + size, chunk_end)
                if high > low:
                    crcs[index] = zlib.crc32(view[low - position : high - position], crcs[index])
                if begin + size <= chunk_end and index == first:
                    first += 1
                index += 1
            position = chunk_end
    if stop is not None and stop.is_set():
        return digest.hexdigest(), []  # cancelled: no verdict
    bad += [member[0] for member, crc in zip(members, crcs) if crc != member[3]]
    return digest.hexdigest(), bad


@dataclass
class SourceCheckpoint:
    """A source opened for streaming: its kind, the weight files and which file holds each key, and, for Hugging Face
    dirs, the config.json it came with. Tensors are read with `load` only when needed."""

    path: str
    kind: str
    readers: dict[str, Any]
    hf_config: Optional[dict[str, Any]] = None
    files: list[Any] = field(default_factory=list)
    _last: Optional[tuple[str, torch.Tensor]] = field(default=None, repr=False)

    def keys(self) -> list[str]:
        return list(self.readers)

    def meta(self, key: str) -> torch.Tensor:
        return self.readers[key].meta(key)

    def load(self, key: str) -> torch.Tensor:
        if self._last is None or self._last[0] != key:  # a fused q/k/v is read once for its three targets
            self._last = (key, self.readers[key].load(key))
        return self._last[1]

    def release(self, key: str) -> None:
        """Hand back the pages of `key`'s tensor once it is written (a memory-mapped source; a no-op otherwise)."""
        if self._last is not None and self._last[0] == key:
            self.readers[key].release(self._last[1])

    def file_range(self, key: str, view: torch.Tensor) -> Optional[tuple[str, int]]:
        """(file, offset) of the bytes of `view`, a contiguous view of `key`'s loaded tensor, when known."""
        offset = self.readers[key].file_offset(view)
        return None if offset is None else (self.readers[key].path, offset)

    @property
    def text_prefix(self) -> Optional[str]:
        """Where the CLIP-layout text tower lives: "" (BAAI `CLIP`), "text." (`CustomCLIP`, open_clip) or None."""
        if self.kind not in ("baai", "open_clip"):
            return None
        if any(key.startswith("text.") for key in self.readers):
            return "text."
        if any(key.startswith(("transformer.resblocks.", "token_embedding.")) for key in self.readers):
            return ""
        return None

    def verify(self, stop: Optional[threading.Event] = None) -> dict[str, str]:
        """sha256 of each weight file; a zip member whose CRC does not match its data is refused, naming the keys
        stored in it."""
        digests, problems = {}, []
        for reader in self.files:
            digest, bad = _scan_file(reader.path, stop)
            digests[reader.path] = digest
            if bad:
                by_member = reader.keys_by_member() if isinstance(reader, _TorchFile) else {}
                keys = [key for member in bad for key in by_member.get(member, [])]
                problems.append(f"{reader.path}: " + (f"the data of {_list_keys(keys)}" if keys else
                                                      f"archive members {_list_keys(bad)}"))
        if problems:
            raise ConversionError(
                "The checkpoint is corrupted (zip CRC mismatch: the bytes differ from what was saved): "
                + "; ".join(problems) + ". Download or copy it again; nothing was written."
            )
        return digests


class _BackgroundVerification:
    """`SourceCheckpoint.verify` in a thread, overlapping the conversion: its verdict is awaited before OUT appears,
    and a corrupted file outranks a refusal based on tensor values (damaged bytes explain those)."""

    def __init__(self, source: SourceCheckpoint) -> None:
        self.stop = threading.Event()
        self.digests: dict[str, str] = {}
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, args=(source,), name="evaclip-verify", daemon=True)
        self.thread.start()

    def _run(self, source: SourceCheckpoint) -> None:
        if hasattr(signal, "pthread_sigmask"):  # signals go to the main thread, which may be deferring them
            signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
        try:
            self.digests = source.verify(self.stop)
        except BaseException as error:  # handed to the main thread by `result`
            self.error = error

    def result(self) -> dict[str, str]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.digests

    def corruption(self) -> Optional[ConversionError]:
        """After another failure: the corruption found, if any (waits only when the scan can still finish)."""
        self.thread.join()
        return self.error if isinstance(self.error, ConversionError) and not self.stop.is_set() else None

    def cancel(self) -> None:
        self.stop.set()
        self.thread.join()


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: cannot read {what} ({error}).") from None


def _open_index(directory: Path, index_name: str) -> list[Any]:
    """The shards an index names; a weight found in a shard other than the one the index names for it is refused (a
    stale or edited index would otherwise take a weight from wherever it is found). One found in no shard is left to
    the key mapping: safetensors' convert script (Hugging Face's SFconvertbot) keeps the index entries of the shared
    tensors it drops from the shards."""
    index = _read_json(directory / index_name, "the shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        found = type(index).__name__ if not isinstance(index, dict) else f"an object with keys {_list_keys(index)}"
        raise ConversionError(f"{directory / index_name}: expected a JSON object whose 'weight_map' maps weight names "
                              f"to shard file names, found {found}.")
    readers = []
    holders: dict[str, set[str]] = {}  # key -> the shards holding it (two: refused by `load_source`)
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:  # an index must name files in its own dir, never elsewhere on disk
            raise ConversionError(f"{directory / index_name}: shard {shard!r} is not a file name in that directory.")
        if not (directory / shard).is_file():
            raise ConversionError(f"{directory / index_name}: shard {shard!r} does not exist.")
        reader = _open_weights(directory / shard)
        for key in reader.keys():
            holders.setdefault(key, set()).add(shard)
        readers.append(reader)
    if not readers:
        raise ConversionError(f"{directory / index_name} lists no weight files.")
    misplaced = []
    for key, name in weight_map.items():
        held = holders.get(key) or holders.get(key.removeprefix("module."))  # a .bin shard's keys lose DDP's `module.`
        if held and name not in held:
            misplaced.append(f"{key} (in {', '.join(map(repr, sorted(held)))}, not {name!r})")
    misplaced.sort()
    if misplaced:
        raise ConversionError(f"{directory / index_name} places weights in shards that do not hold them: "
                              f"{_list_keys(misplaced)}; the index and its shards do not match (copy the folder "
                              "again).")
    return readers


def detect_source_kind(keys: Iterable[str]) -> str:
    """One of `SOURCE_KINDS`, from the key names alone."""
    keys = list(keys)
    if any(key.startswith(("vision_model.", "text_model.")) for key in keys):
        return "hf"
    if any(key.startswith("visual.trunk.") for key in keys):
        return "open_clip"
    if any(key.startswith("visual.") for key in keys):
        return "baai"
    if any(key.startswith("blocks.") for key in keys) or "cls_token" in keys or "patch_embed.proj.weight" in keys:
        return "timm"
    raise ConversionError(
        "Unrecognised checkpoint layout: expected BAAI EVA-CLIP keys ('visual.blocks.*'), open_clip "
        "('visual.trunk.*'), timm ('blocks.*', 'cls_token') or Hugging Face ('vision_model.*'); "
        f"found {_list_keys(keys)}."
    )


def load_source(src: Union[str, os.PathLike]) -> SourceCheckpoint:
    """Open SRC (a checkpoint file or a Hugging Face / open_clip dir) and detect its kind; no tensor data is read."""
    path = Path(src)
    hf_config = None
    if path.is_dir():
        config_file = path / "config.json"
        hf_files = [name for name in HF_WEIGHT_FILES if (path / name).is_file()]
        open_clip_files = [name for name in OPEN_CLIP_WEIGHT_FILES if (path / name).is_file()]
        if config_file.is_file() and hf_files:
            hf_config = _read_json(config_file, "config.json")
            if not isinstance(hf_config, dict):
                raise ConversionError(f"{config_file}: expected a JSON object, found {type(hf_config).__name__}.")
            name = hf_files[0]
            files = _open_index(path, name) if name.endswith(".index.json") else [_open_weights(path / name)]
        elif open_clip_files:
            files = [_open_weights(path / open_clip_files[0])]
        else:
            raise ConversionError(
                f"{path} is a directory without a checkpoint: expected a Hugging Face dir (config.json with "
                f"{' or '.join(HF_WEIGHT_FILES)}) or an open_clip dir ({' or '.join(OPEN_CLIP_WEIGHT_FILES)})."
            )
    elif path.is_file():
        files = [_open_weights(path)]
    elif path.exists():
        raise ConversionError(f"SRC {str(path)!r} is not a regular file (a named pipe, socket or device); expected a "
                              "checkpoint file (.pt, .bin, .pth, .safetensors) or a Hugging Face checkpoint dir.")
    else:
        raise ConversionError(f"SRC {str(path)!r} does not exist; expected a checkpoint file (.pt, .bin, .pth, "
                              ".safetensors) or a Hugging Face checkpoint dir.")
    readers: dict[str, Any] = {}
    twice = []
    for reader in files:
        for key in reader.keys():
            if key in readers:  # two values for one weight: neither can be chosen silently
                twice.append(f"{key} ({Path(readers[key].path).name} and {Path(reader.path).name})")
            readers[key] = reader
    if twice:
        raise ConversionError(f"{path}: weights stored in two shards, possibly with different values: "
                              f"{_list_keys(twice)}. Expected each weight in one shard; nothing was written.")
    if not readers:
        raise ConversionError(f"{path} holds no tensors.")
    kind = detect_source_kind(readers)
    if hf_config is not None and kind != "hf":
        raise ConversionError(f"{path}: config.json is present but the weights are not in Hugging Face layout "
                              f"(they look like a {kind} state dict); pass the weights file itself as SRC.")
    return SourceCheckpoint(path=str(path), kind=kind, readers=readers, hf_config=hf_config, files=files)


# ----------------------------------------------------------------------------------------------------------------------
# Key mapping (on shapes: each target is a source key plus a view to take of it)
# ----------------------------------------------------------------------------------------------------------------------

# Sub-modules of one vision block: BAAI names, timm names -> ours (under vision_model.encoder.layers.N.).
_VISION_BLOCK_MODULES = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.proj": "self_attn.out_proj",
    "attn.inner_attn_ln": "self_attn.inner_attn_ln",  # BAAI sub-LN
    "attn.norm": "self_attn.inner_attn_ln",  # timm scale_attn_inner
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w1": "mlp.fc1",  # BAAI SwiGLU: silu(w1 x) * w2 x -> w3
    "mlp.w2": "mlp.fc1_up",
    "mlp.w3": "mlp.fc2",
    "mlp.fc1_g": "mlp.fc1",  # timm SwiGLU: silu(fc1_g x) * fc1_x x -> fc2
    "mlp.fc1_x": "mlp.fc1_up",
    "mlp.ffn_ln": "mlp.ffn_ln",  # BAAI sub-LN
    "mlp.norm": "mlp.ffn_ln",  # timm scale_mlp
}
_VISION_BLOCK_PARAMS = {
    "gamma_1": "layer_scale1",
    "gamma_2": "layer_scale2",
    "attn.q_bias": "self_attn.q_proj.bias",
    "attn.v_bias": "self_attn.v_proj.bias",
}
_TEXT_BLOCK_MODULES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TEXT_BLOCK_PARAMS = {"ls_1.gamma": "layer_scale1", "ls_2.gamma": "layer_scale2"}
_BLOCK_PATTERN = re.compile(r"(\d+)\.(.+)")


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class _Target:
    """One output tensor: the source key it comes from, the view that turns the source tensor into it, and its
    shape and dtype before casting (from the view applied to a meta tensor)."""

    source_key: str
    view: Callable[[torch.Tensor], torch.Tensor]
    meta: torch.Tensor


class _Mapper:
    """Collects the targets with the source key each comes from, the source keys it could not place, and the rotary
    tables and zero k-bias buffers whose values are checked once the shapes are known to fit."""

    def __init__(self, source: SourceCheckpoint) -> None:
        self.source = source
        self.targets: dict[str, _Target] = {}
        self.unexpected: list[str] = []
        self.rope_tables: list[str] = []
        self.zero_buffers: list[str] = []

    def put(self, source_key: str, target_key: str, meta: torch.Tensor,
            view: Callable[[torch.Tensor], torch.Tensor] = _identity) -> None:
        if target_key in self.targets:
            raise ConversionError(
                f"Both {self.targets[target_key].source_key!r} and {source_key!r} map to {target_key!r}; the "
                "checkpoint mixes two layouts of the same weight."
            )
        self.targets[target_key] = _Target(source_key, view, view(meta))

    def put_fused(self, source_key: str, targets: list[str], meta: torch.Tensor) -> None:
        """q, k, v of a fused projection (rows in that order)."""
        if meta.ndim == 0 or meta.shape[0] % 3:
            raise ConversionError(f"{source_key!r} is a fused q/k/v tensor, so its first dim must be divisible by 3; "
                                  f"got {list(meta.shape)}.")
        for index, target in enumerate(targets):
            self.put(source_key, target, meta, lambda tensor, index=index: tensor.chunk(3, dim=0)[index])

    # -- vision --------------------------------------------------------------------------------------------------------

    def map_vision(self, source_key: str, name: str, meta: torch.Tensor) -> None:
        """`name` is relative to the vision tower (timm / BAAI `visual` naming)."""
        prefix = "vision_model."
        if name == "cls_token":
            self.put(source_key, prefix + "embeddings.class_embedding", meta, lambda tensor: tensor.reshape(-1))
        elif name == "pos_embed":
            self.put(source_key, prefix + "embeddings.position_embedding.weight", meta,
                     lambda tensor: tensor[0] if tensor.ndim == 3 else tensor)
        elif name in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
            self.put(source_key, prefix + "embeddings.patch_embedding." + name.rsplit(".", 1)[1], meta)
        elif name in ("norm.weight", "norm.bias"):
            self.put(source_key, prefix + "post_layernorm." + name.rsplit(".", 1)[1], meta)
        elif name in ("head.weight", "head.bias"):
            self.put(source_key, "visual_projection." + name.rsplit(".", 1)[1], meta)
        elif name in ("rope.freqs_cos", "rope.freqs_sin"):
            self.rope_tables.append(source_key)
        elif name.startswith("blocks."):
            self._map_vision_block(source_key, name[len("blocks."):], meta)
        else:
            self.unexpected.append(source_key)

    def _map_vision_block(self, source_key: str, name: str, meta: torch.Tensor) -> None:
        match = _BLOCK_PATTERN.fullmatch(name)
        if match is None:
            self.unexpected.append(source_key)
            return
        index, rest = match.groups()
        prefix = f"vision_model.encoder.layers.{index}."
        module, _, leaf = rest.rpartition(".")
        if rest in _VISION_BLOCK_PARAMS:
            self.put(source_key, prefix + _VISION_BLOCK_PARAMS[rest], meta)
        elif rest == "attn.qkv.weight":
            self.put_fused(source_key, [prefix + f"self_attn.{part}_proj.weight" for part in "qkv"], meta)
        elif rest in ("attn.rope.freqs_cos", "attn.rope.freqs_sin"):
            self.rope_tables.append(source_key)
        elif rest == "attn.k_bias":  # timm keeps a zero k bias buffer next to q_bias / v_bias
            self.zero_buffers.append(source_key)
        elif module in _VISION_BLOCK_MODULES and leaf in ("weight", "bias"):
            self.put(source_key, prefix + f"{_VISION_BLOCK_MODULES[module]}.{leaf}", meta)
        else:
            self.unexpected.append(source_key)

    # -- text ----------------------------------------------------------------------------------------------------------

    def map_text(self, source_key: str, name: str, meta: torch.Tensor) -> None:
        """`name` is relative to the CLIP-layout text tower."""
        prefix = "text_model."
        if name == "token_embedding.weight":
            self.put(source_key, prefix + "embeddings.token_embedding.weight", meta)
        elif name == "positional_embedding":
            self.put(source_key, prefix + "embeddings.position_embedding.weight", meta)
        elif name in ("ln_final.weight", "ln_final.bias"):
            self.put(source_key, prefix + "final_layer_norm." + name.rsplit(".", 1)[1], meta)
        elif name == "text_projection":  # a [width, embed_dim] matrix used as `x @ proj`
            self.put(source_key, "text_projection.weight", meta, lambda tensor: tensor.t())
        elif name == "text_projection.weight":  # open_clip's nn.Linear variant
            self.put(source_key, "text_projection.weight", meta)
        elif name == "logit_scale":
            self.put(source_key, "logit_scale", meta)
        elif name == "attn_mask":  # the causal mask buffer; ours is built on the fly
            return
        elif name.startswith("transformer.resblocks."):
            self._map_text_block(source_key, name[len("transformer.resblocks."):], meta)
        else:
            self.unexpected.append(source_key)

    def _map_text_block(self, source_key: str, name: str, meta: torch.Tensor) -> None:
        match = _BLOCK_PATTERN.fullmatch(name)
        if match is None:
            self.unexpected.append(source_key)
            return
        index, rest = match.groups()
        prefix = f"text_model.encoder.layers.{index}."
        module, _, leaf = rest.rpartition(".")
        if rest in _TEXT_BLOCK_PARAMS:
            self.put(source_key, prefix + _TEXT_BLOCK_PARAMS[rest], meta)
        elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            leaf = "weight" if rest.endswith("weight") else "bias"
            self.put_fused(source_key, [prefix + f"self_attn.{part}_proj.{leaf}" for part in "qkv"], meta)
        elif module in _TEXT_BLOCK_MODULES and leaf in ("weight", "bias"):
            self.put(source_key, prefix + f"{_TEXT_BLOCK_MODULES[module]}.{leaf}", meta)
        else:
            self.unexpected.append(source_key)


def _is_text_key(key: str, text_prefix: Optional[str]) -> bool:
    if key in ("logit_scale", "text.logit_scale"):
        return True
    if text_prefix is None:
        return False
    if text_prefix:
        return key.startswith(text_prefix)
    return not key.startswith("visual.")


def plan_state_dict(source: SourceCheckpoint, vision_only: bool) -> _Mapper:
    """Where every source tensor goes in our key names (views only: fused q/k/v split, text projection
    transposed), from shapes alone. Text weights are skipped when `vision_only`."""
    mapper = _Mapper(source)
    kind = source.kind
    if kind == "hf":
        for key in source.keys():
            if key.endswith("position_ids"):  # an index buffer older transformers versions saved
                continue
            if vision_only and key.startswith(("text_model.", "text_projection.", "logit_scale")):
                continue
            mapper.put(key, key, source.meta(key))
        return mapper
    text_prefix = source.text_prefix
    vision_prefix = {"baai": "visual.", "open_clip": "visual.trunk.", "timm": ""}[kind]
    for key in source.keys():
        if kind != "timm" and _is_text_key(key, text_prefix):
            if vision_only:
                continue
            name = "logit_scale" if key in ("logit_scale", "text.logit_scale") else key[len(text_prefix or ""):]
            mapper.map_text(key, name, source.meta(key))
        elif key.startswith(vision_prefix):
            mapper.map_vision(key, key[len(vision_prefix):], source.meta(key))
        else:
            mapper.unexpected.append(key)
    return mapper


def _raise_unexpected(mapper: _Mapper, kind: str) -> None:
    if mapper.unexpected:
        raise ConversionError(
            f"The {kind} checkpoint has weights this converter does not know where to put (unexpected keys): "
            f"{_list_keys(mapper.unexpected)}. They belong to an architecture EVA-CLIP does not use (e.g. mean pooling "
            "'fc_norm', relative position bias, an MLP text projection); nothing was written."
        )


def _check_buffers(source: SourceCheckpoint, mapper: _Mapper, vision_config: EvaCLIPVisionConfig) -> None:
    """The buffers that are not converted must hold what our model computes: timm's k bias is zero, and BAAI's 2D
    RoPE tables (which its loader restores) equal ours, or the --arch config (image_size, pt_hw_seq_len, intp_freq,
    head width) is not the checkpoint's."""
    for source_key in mapper.zero_buffers:
        if source.load(source_key).count_nonzero().item():
            raise _ValueError(f"{source_key!r} is a non-zero k bias; EVA-CLIP attention has no k bias.")
    if not mapper.rope_tables:
        return
    if not vision_config.use_rope:
        raise ConversionError(
            f"{mapper.rope_tables[0]!r} is a rotary position table, but the --arch config has no RoPE "
            "(vision_cfg.rope); this checkpoint is an EVA-02 model, pick an EVA02 preset."
        )
    rotary = EvaCLIPRotaryEmbedding(vision_config)
    cos, sin = rotary.compute_table(rotary.grid_size, rotary.grid_size)
    for source_key in mapper.rope_tables:
        expected = (cos if source_key.endswith("cos") else sin)[1:]  # row 0 is our identity row for CLS
        tensor = source.load(source_key)
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ConversionError(
                f"Shape mismatch for {source_key!r}: checkpoint {list(tensor.shape)} vs --arch {list(expected.shape)} "
                "(patch grid x head_dim); check image_size, patch_size and head_width."
            )
        error = (tensor.float() - expected).abs().max().item()
        if error > _ROPE_TABLE_ATOL:
            raise _ValueError(
                f"The rotary table {source_key!r} differs from the one the --arch config defines (max abs diff "
                f"{error:.3g}); check vision_cfg.pt_hw_seq_len and intp_freq."
            )


def _materialize_target(source: SourceCheckpoint, target: _Target, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A target's own contiguous tensor (a copy of the source bytes where the dtype or layout changes)."""
    tensor = target.view(source.load(target.source_key))
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def map_state_dict(
    source: SourceCheckpoint, vision_config: EvaCLIPVisionConfig, vision_only: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every source tensor in our key names, in memory (for loaders that need the whole state dict, e.g. ZeRO-3's
    rank-0 load), and for each new key the source key it came from."""
    mapper = plan_state_dict(source, vision_only)
    _raise_unexpected(mapper, source.kind)
    _check_dtypes(mapper, {})
    # The integrity checks `convert` runs: a damaged file is refused here too, before any value is used (and first,
    # as in convert, where a corrupted file outranks the value checks it would explain).
    source.verify()
    _check_buffers(source, mapper, vision_config)
    state_dict, not_finite = {}, []
    for key, target in mapper.targets.items():
        tensor = _materialize_target(source, target, None).clone()
        if tensor.is_floating_point() and not _all_finite(tensor):
            not_finite.append(_target_label(target.source_key, key))
        state_dict[key] = tensor
    if not_finite:
        raise _non_finite_error(not_finite, torch.float32)
    return state_dict, {key: target.source_key for key, target in mapper.targets.items()}


def _check_dtypes(mapper: _Mapper, floating: Mapping[str, bool]) -> None:
    """A weight the model holds in floating point must come from a floating-point tensor: an integer or bool tensor
    in its place (a quantized export, a buffer saved under the wrong name) would be cast into meaningless values.
    `floating` says, per target key, whether the model's tensor is floating point (a key it lacks: yes)."""
    wrong = [f"{_target_label(target.source_key, key)} ({str(target.meta.dtype).split('.')[-1]})"
             for key, target in mapper.targets.items()
             if floating.get(key, True) and not target.meta.is_floating_point()]
    if wrong:
        raise ConversionError(
            f"The checkpoint holds tensors that are not floating point where the model has floating-point weights: "
            f"{_list_keys(wrong)}. Expected float32, float16 or bfloat16 weights as EVA-CLIP releases store them; "
            "nothing was written."
        )


def _target_label(source_key: str, key: str) -> str:
    return f"{source_key} -> {key}" if source_key != key else key


def _non_finite_error(keys: list[str], dtype: torch.dtype) -> _ValueError:
    cast = f" after casting to {str(dtype).split('.')[-1]}" if dtype != torch.float32 else ""
    return _ValueError(
        f"The checkpoint holds non-finite values (NaN or inf{cast}) in: {_list_keys(keys)}. A released "
        "checkpoint has none: the file is damaged (download it again) or the values overflow the chosen --dtype. "
        "Nothing was written."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Configs and architecture checks
# ----------------------------------------------------------------------------------------------------------------------


def _config_fields(config_class: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a foreign config dict that our config class takes (its constructor's own arguments)."""
    accepted = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    return {key: value for key, value in values.items() if key in accepted}


_VISION_MODEL_TYPES = ("evaclip_vision_model", "clip_vision_model")
_TEXT_MODEL_TYPES = ("evaclip_text_model", "clip_text_model")


def config_from_hf_dict(config_dict: Mapping[str, Any]) -> Union[EvaCLIPConfig, EvaCLIPVisionConfig]:
    """Our config from a config.json of the InternVL port (model_type "clip" / "clip_vision_model") or of this
    package, keeping only the fields our configs define (the port's generic transformers fields are dropped)."""
    model_type = config_dict.get("model_type")
    try:
        if model_type in _VISION_MODEL_TYPES:
            return EvaCLIPVisionConfig(**_config_fields(EvaCLIPVisionConfig, config_dict))
        if model_type in _TEXT_MODEL_TYPES:
            raise ConversionError(f"config.json describes a text tower only (model_type {model_type!r}); the "
                                  "converter writes full models or vision towers.")
        if model_type not in ("evaclip", "clip") or not isinstance(config_dict.get("vision_config"), Mapping):
            raise ConversionError(f"config.json has model_type {model_type!r}; expected an EVA-CLIP config "
                                  "('evaclip', or 'clip' from the InternVL port) with vision_config and text_config.")
        projection_dim = config_dict.get("projection_dim", 512)
        towers = {}
        for key, config_class in (("vision_config", EvaCLIPVisionConfig), ("text_config", EvaCLIPTextConfig)):
            values = config_dict.get(key) or {}
            if not isinstance(values, Mapping):
                raise ConversionError(f"config.json: {key} must be a JSON object, found {type(values).__name__}.")
            fields = _config_fields(config_class, values)
            fields.setdefault("projection_dim", projection_dim)
            towers[key] = config_class(**fields).to_dict()
        top = _config_fields(EvaCLIPConfig, config_dict)
        top.pop("text_config", None)
        top.pop("vision_config", None)
        return EvaCLIPConfig(**towers, **top)
    except ConversionError:
        raise
    except (TypeError, ValueError, ZeroDivisionError) as error:  # e.g. a string where a number belongs
        raise ConversionError(f"config.json is not a valid EVA-CLIP config: {' '.join(str(error).split())}") from None


def _check_arch(arch: Optional[str]) -> None:
    """--arch, before anything is read or written: a path must be UTF-8 (the model card records it, and would fail
    to be written only after the whole conversion), and the architecture must resolve (a malformed BAAI model config
    is refused naming the file and the field)."""
    if not arch:
        return
    try:
        str(arch).encode("utf-8")
    except UnicodeEncodeError:
        raise ConversionError(f"--arch {str(arch)!r} is not a UTF-8 path, which the model card cannot record; rename "
                              "it (or a folder above it).") from None
    try:
        resolve_arch(arch)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as error:
        message = " ".join(str(error).split())
        if str(arch) not in message:
            message = f"--arch {str(arch)!r} does not give a valid EVA-CLIP architecture: {message}"
        raise ConversionError(message) from None


def _resolve_config(source: SourceCheckpoint, arch: Optional[str]) -> Union[EvaCLIPConfig, EvaCLIPVisionConfig]:
    if arch:
        return resolve_arch(arch)
    if source.hf_config is not None:
        try:
            return config_from_hf_dict(source.hf_config)
        except ConversionError as error:
            raise ConversionError(f"{Path(source.path) / 'config.json'}: {error}") from None
    raise ConversionError(
        f"--arch is required for a {source.kind} checkpoint (its file does not record the architecture): pass a preset "
        "name (see `llava-evaclip presets`) or the path of a BAAI model-config JSON (embed_dim, vision_cfg, text_cfg)."
    )


_LAYER = re.compile(r"(vision|text)_model\.encoder\.layers\.(\d+)\.")


def _dimensions(shapes: Mapping[str, tuple[int, ...]], head_dim: Optional[int]) -> dict[str, tuple[Any, str]]:
    """The architecture a set of weight shapes (our key names) implies: name -> (value, the key it was read from)."""
    dims: dict[str, tuple[Any, str]] = {}

    def take(name: str, key: str, read: Callable[[tuple[int, ...]], Any]) -> None:
        if key in shapes and len(shapes[key]) > 0:
            dims[name] = (read(shapes[key]), key)

    patch = "vision_model.embeddings.patch_embedding.weight"
    take("vision width", patch, lambda shape: shape[0])
    take("patch size", patch, lambda shape: shape[-1])
    positions = "vision_model.embeddings.position_embedding.weight"
    if positions in shapes and "patch size" in dims:
        grid = round((shapes[positions][0] - 1) ** 0.5)
        if grid * grid == shapes[positions][0] - 1:
            dims["image size"] = (grid * dims["patch size"][0], positions)
    take("vision MLP width", "vision_model.encoder.layers.0.mlp.fc1.weight", lambda shape: shape[0])
    take("image projection dim", "visual_projection.weight", lambda shape: shape[0])
    take("text width", "text_model.embeddings.token_embedding.weight", lambda shape: shape[-1])
    take("text vocabulary", "text_model.embeddings.token_embedding.weight", lambda shape: shape[0])
    take("text context length", "text_model.embeddings.position_embedding.weight", lambda shape: shape[0])
    take("text MLP width", "text_model.encoder.layers.0.mlp.fc1.weight", lambda shape: shape[0])
    take("text projection dim", "text_projection.weight", lambda shape: shape[0])
    if head_dim and "vision width" in dims:
        dims["vision heads"] = (dims["vision width"][0] // head_dim, f"head width {head_dim}")
    for tower in ("vision", "text"):
        layers = [int(match.group(2)) for key in shapes for match in [_LAYER.match(key)]
                  if match and match.group(1) == tower]
        if layers:
            dims[f"{tower} depth"] = (max(layers) + 1, f"{tower}_model.encoder.layers.{max(layers)}")
    for feature, suffix in (("SwiGLU MLP", "mlp.fc1_up.weight"), ("sub-LayerNorm", "mlp.ffn_ln.weight"),
                            ("layer scale", "layer_scale1")):
        found = any(key.startswith("vision_model.") and key.endswith(suffix) for key in shapes)
        dims[feature] = ("yes" if found else "no", suffix)
    if any(key.startswith("vision_model.") and key.endswith("layer_norm1.weight") for key in shapes):
        # EVA-CLIP-8B / 18B's norms have no bias; told apart here rather than as a list of missing bias keys
        biased = any(key.startswith("vision_model.") and key.endswith("layer_norm1.bias") for key in shapes)
        dims["RMSNorm"] = ("no" if biased else "yes", "the norms' biases")
    return dims


def _check_dimensions(mapper: _Mapper, model_shapes: Mapping[str, tuple[int, ...]],
                      vision_config: EvaCLIPVisionConfig, arch_name: str) -> None:
    """Every architectural dimension the checkpoint's shapes imply against `arch`'s, all in one message, before any
    per-key comparison (a wrong --arch otherwise surfaces as one puzzling key)."""
    source_shapes = {key: tuple(target.meta.shape) for key, target in mapper.targets.items()}
    rope_head_dim = None
    if mapper.rope_tables:
        table = mapper.source.meta(mapper.rope_tables[0])
        rope_head_dim = table.shape[-1] if table.ndim else None
    found = _dimensions(source_shapes, rope_head_dim)
    expected = _dimensions(model_shapes, vision_config.head_dim if rope_head_dim else None)
    differences = []
    for name, (value, key) in found.items():
        if name in expected and expected[name][0] != value:
            where = mapper.targets[key].source_key if key in mapper.targets else key
            shape = f" {list(source_shapes[key])}" if key in source_shapes else ""
            differences.append(f"{name} {value} (from {where}{shape}) vs {expected[name][0]}")
    if mapper.rope_tables and not vision_config.use_rope:
        differences.append(f"rotary position tables (EVA-02) present ({mapper.rope_tables[0]}) vs none")
    if "text width" in expected and "text width" not in found:
        differences.append("no text tower vs a text tower (pass --vision-only for a vision-only checkpoint)")
    if differences:
        raise ConversionError(
            f"The checkpoint's architecture differs from {arch_name} (checkpoint vs architecture): "
            + "; ".join(differences) + ". Nothing was written; pick the --arch that matches (see `llava-evaclip "
            "presets -v`) or pass a BAAI model-config JSON."
        )


def _check_keys(mapper: _Mapper, model_shapes: Mapping[str, tuple[int, ...]], arch_name: str) -> None:
    targets = mapper.targets
    missing = sorted(set(model_shapes) - set(targets))
    unexpected = sorted(set(targets) - set(model_shapes))
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint (the model needs them): {_list_keys(missing)}")
    if unexpected:
        problems.append("in the checkpoint but not in the model: "
                        + _list_keys(f"{targets[key].source_key} -> {key}" for key in unexpected))
    if problems:
        raise ConversionError(f"The checkpoint does not match {arch_name}: " + "; ".join(problems) + ". Nothing was "
                              "written; check --arch (and --vision-only for vision-only checkpoints).")
    mismatched = [
        f"{targets[key].source_key} -> {key}: checkpoint {list(targets[key].meta.shape)} vs {arch_name} {list(shape)}"
        for key, shape in model_shapes.items()
        if tuple(targets[key].meta.shape) != shape
    ]
    if mismatched:
        raise ConversionError(f"Shape mismatch between the checkpoint and {arch_name}: " + "; ".join(mismatched[:10])
                              + (f" (and {len(mismatched) - 10} more)" if len(mismatched) > 10 else "")
                              + ". Check --arch.")


@dataclass
class ConversionPlan:
    """A checked conversion: the model (on the meta device: config and expected weights) and where each of its
    weights comes from."""

    source: SourceCheckpoint
    model: EvaCLIPPreTrainedModel
    targets: dict[str, _Target]

    @property
    def num_parameters(self) -> int:
        return sum(target.meta.numel() for target in self.targets.values())


def plan_conversion(source: SourceCheckpoint, arch: Optional[str] = None,
                    vision_only: bool = False) -> ConversionPlan:
    """Resolve the architecture and check the checkpoint against it: every differing dimension and unplaceable keys
    (shapes only), then the rotary tables and other buffers (small reads), then every key and shape."""
    config = _resolve_config(source, arch)
    if source.kind == "timm" or isinstance(config, EvaCLIPVisionConfig):
        vision_only = True  # a timm state dict or a vision config holds no text tower
    vision_config = config if isinstance(config, EvaCLIPVisionConfig) else config.vision_config
    mapper = plan_state_dict(source, vision_only)
    if vision_only:
        if isinstance(config, EvaCLIPConfig):  # the image projection in the weights is the two-tower model's
            vision_config.projection_dim = config.projection_dim
        config = vision_config
        model_class = (EvaCLIPVisionModelWithProjection if "visual_projection.weight" in mapper.targets
                       else EvaCLIPVisionModel)
    else:
        model_class = EvaCLIPModel
    with torch.device("meta"):  # no memory and no random init
        model = model_class(config)
    model_shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    arch_name = f"--arch {arch!r}" if arch else "the source config.json"
    _check_dimensions(mapper, model_shapes, vision_config, arch_name)
    _raise_unexpected(mapper, source.kind)
    if source.kind in ("baai", "open_clip") and source.text_prefix is None and not vision_only:
        raise ConversionError(
            f"{source.path} holds only a vision tower (no text weights); pass --vision-only to convert it."
        )
    _check_buffers(source, mapper, vision_config)
    _check_keys(mapper, model_shapes, arch_name)
    _check_dtypes(mapper, {key: tensor.is_floating_point() for key, tensor in model.state_dict().items()})
    model.eval()
    return ConversionPlan(source=source, model=model, targets={key: mapper.targets[key] for key in model_shapes})


# ----------------------------------------------------------------------------------------------------------------------
# Output paths: what --overwrite may replace, staging dirs, signals
# ----------------------------------------------------------------------------------------------------------------------


def _previous_output_problem(directory: Path) -> Optional[str]:
    """Why `directory` is not a previous `convert` output (None when it is one)."""
    if not directory.is_dir():
        return "it is not a directory"
    try:
        with open(directory / "config.json", encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return "it has no readable config.json"
    if model_type not in CONVERTED_MODEL_TYPES:
        return (f"its config.json has model_type {model_type!r}, not one convert writes "
                f"({', '.join(CONVERTED_MODEL_TYPES)})")
    names = sorted(os.listdir(directory))
    if not any(name.startswith("model") and name.endswith(".safetensors") for name in names):
        return "it holds no model*.safetensors weights"
    foreign = [name for name in names if not _CONVERTED_FILES.fullmatch(name) or (directory / name).is_dir()]
    if foreign:
        return f"it holds entries convert does not write ({_list_keys(foreign)})"
    return None


def _check_paths(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse, before anything is read, an OUT that cannot be written or whose replacement could lose user data:
    --overwrite replaces only a previous convert output, never SRC or a folder holding it, the current directory or
    an ancestor of it, or the home directory. Symlinks and `.` are resolved first."""
    for role, path in (("SRC", src), ("OUT", out)):
        try:  # torch.load, safetensors and the tokenizers backend all refuse, deep inside, names that are not UTF-8
            os.path.realpath(path).encode("utf-8")
        except UnicodeEncodeError:
            raise ConversionError(f"{role} {str(path)!r} is not a UTF-8 path, which torch, safetensors and "
                                  "transformers cannot read or write; rename it (or a folder above it).") from None
    out_abs = Path(os.path.abspath(out))
    ancestor = out_abs.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConversionError(f"OUT {str(out)!r} cannot be created: {str(ancestor)!r} is a file, not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConversionError(f"OUT {str(out)!r} cannot be created: {str(ancestor)!r} is not writable.")
    src_real, out_real = Path(os.path.realpath(src)), Path(os.path.realpath(out))
    if out_real == src_real:
        raise ConversionError(f"OUT {str(out)!r} is SRC; write the converted model to a new directory.")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise ConversionError(f"OUT {str(out)!r} already exists; choose a new directory or pass --overwrite to "
                              "replace a previous convert output.")
    refuse = f"--overwrite refused: OUT {str(out)!r}"
    if out_real in src_real.parents:
        raise ConversionError(f"{refuse} contains SRC {str(src)!r}; nothing was removed.")
    cwd = Path(os.path.realpath(os.getcwd()))
    if out_real == cwd or out_real in cwd.parents:
        raise ConversionError(f"{refuse} is the current directory or one of its ancestors; nothing was removed.")
    if out_real == Path(os.path.realpath(os.path.expanduser("~"))):
        raise ConversionError(f"{refuse} is the home directory; nothing was removed.")
    problem = _previous_output_problem(out_real)
    if problem is not None:
        raise ConversionError(f"{refuse} is not a previous convert output ({problem}); only such a directory is "
                              "replaced. Choose a new OUT; nothing was removed.")


@functools.lru_cache(maxsize=None)
def _host_id() -> str:
    """Who can check a staging dir's pid: the hostname plus, where /proc shows it, the pid namespace (two containers
    on one host, e.g. with host networking, share the hostname but not their pids), as 12 hex digits so that the
    staging name stays short whatever the hostname (OUT's own name must still fit in 255 bytes beside it). A pid
    means nothing to a process with another host id."""
    host = socket.gethostname()
    try:
        host += f"/ns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        pass
    return hashlib.sha256(host.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _staging_name(out_name: str) -> str:
    return f".{out_name}.converting-{os.getpid()}@{_host_id()}-{secrets.token_hex(4)}"


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why `path` is not a complete safetensors file (None when it is): missing, unreadable header, or a length
    other than the one its header describes (a file cut short or still being written)."""
    try:
        read_safetensors_header(path)
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"not readable ({error.strerror or error})"
    except ValueError as error:
        return str(error)
    return None


def _weights_problem(directory: Path) -> Optional[str]:
    """Why `directory` does not hold complete weights (None when it does): model.safetensors, or
    model.safetensors.index.json and every shard it names, each as long as its header says."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            with open(index, encoding="utf-8") as handle:
                names = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is not a readable shard index"
        if not names or not all(isinstance(name, str) and Path(name).name == name for name in names):
            return f"{index.name} names no shard files in the directory"
        files = [directory / name for name in names]
    else:
        return "it holds neither model.safetensors nor model.safetensors.index.json"
    for file in files:
        problem = _safetensors_problem(file)
        if problem is not None:
            return f"{file.name}: {problem}"
    return None


def remove_stale_staging(parent: Union[str, os.PathLike]) -> list[str]:
    """Remove the staging dirs (`.OUT.converting-<pid>@<host>-*`) that conversions killed in `parent` left behind,
    once their process no longer exists; a swapped-out previous OUT (`...-replaced`) goes back to OUT if OUT is
    missing and it is complete, else it is removed (OUT exists) or left in place (incomplete). Only dirs made on this
    host are touched: on shared storage another host's pid cannot be checked from here, and removing the dir of a
    live conversion loses its output; those (and dirs named by older versions, without a host) are left alone with a
    warning. Returns what was removed or restored."""
    parent = Path(parent)
    cleaned: list[str] = []
    foreign: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return cleaned
    for name in sorted(names):
        match = _STAGING_NAME.fullmatch(name)
        path = parent / name
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        if match.group("host") != _host_id():
            foreign.append(name)
            continue
        if process_exists(int(match.group("pid"))):
            continue
        out = parent / match.group("name")
        try:
            if match.group("replaced") and not (out.exists() or out.is_symlink()):
                problem = _previous_output_problem(path) or _weights_problem(path)
                if problem is not None:
                    logger.warning(
                        f"Left {path} in place: it is the previous {out.name} of a conversion killed while replacing "
                        f"it, but incomplete ({problem}), so it was not restored as {out}. Copy what you need from it, "
                        "then remove it."
                    )
                    continue
                os.rename(path, out)
                logger.warning(f"Restored {out} from {name}, left by a conversion that was killed while replacing it.")
            else:
                shutil.rmtree(path)
                logger.info(f"Removed {path}, left by a conversion that was killed.")
            cleaned.append(str(path))
        except OSError as error:
            logger.warning(f"Could not remove the stale staging dir {path}: {error}")
    if foreign:
        logger.warning(
            f"Left {len(foreign)} staging dir(s) in {parent} alone: {_list_keys(foreign)}. They were made on another "
            f"host or container than this one ({socket.gethostname()}, id {_host_id()}), or by an older llava-evaclip "
            "whose names record no host, so whether their conversion still runs cannot be checked from here; remove "
            "them by hand once it has ended."
        )
    return cleaned


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While converting, SIGTERM and SIGHUP (a closed terminal or ssh session) raise `ConversionTerminated` (as SIGINT
    raises KeyboardInterrupt), so the staging dir is removed and OUT restored; a SIGHUP the parent ignores (`nohup`)
    stays ignored, and the previous handlers are put back afterwards. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise ConversionTerminated(signum)

    previous = {signum: signal.signal(signum, terminate) for signum in TERMINATING_SIGNALS
                if signal.getsignal(signum) != signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block ends (renames and cleanup are not cut in half)."""
    signals = DEFERRED_SIGNALS
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _move_into_place(staging: Path, out: Path, src: Path, overwrite: bool) -> None:
    """Rename the finished staging dir to OUT once it holds complete weights; an existing OUT (with `overwrite`,
    checked again now) is swapped out, then removed."""
    problem = _weights_problem(staging)
    if problem is not None:  # every write succeeded, so something else removed or changed the staging dir
        raise ConversionError(
            f"The converted model in {staging} is incomplete ({problem}) although every write succeeded: another "
            f"process removed or changed it (a conversion on another host or container sharing {staging.parent}?). "
            f"Convert again; OUT {str(out)!r} was left as it was."
        )
    _check_paths(src, out, overwrite)
    if not (out.exists() or out.is_symlink()):
        os.rename(staging, out)
        return
    _keep_access(out, staging)
    backup = staging.with_name(staging.name + "-replaced")
    os.rename(out, backup)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(backup, out)
        raise
    try:
        _remove(backup)
    except OSError as error:  # OUT is replaced: a backup that cannot go (read-only, EIO) must not say otherwise
        logger.warning(
            f"Replaced {out}, but its previous contents could not be removed ({error.strerror or error}: "
            f"{error.filename}); they are kept in {backup}. Remove that folder by hand (a later convert into "
            f"{backup.parent} removes it once it can)."
        )


def _keep_access(previous: Path, staging: Path) -> None:
    """The replacement of a previous OUT keeps its mode and group (a folder made private with `chmod 700` must not
    come back readable by everyone under the umask's 755); best effort for the group, which only its members may
    set."""
    info = os.stat(previous)
    os.chmod(staging, stat.S_IMODE(info.st_mode))
    if info.st_gid != os.stat(staging).st_gid:
        with contextlib.suppress(OSError):
            os.chown(staging, -1, info.st_gid)


# ----------------------------------------------------------------------------------------------------------------------
# Writing: safetensors shards streamed tensor by tensor
# ----------------------------------------------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30, "TIB": 2**40}


def _parse_size(size: Union[int, str]) -> int:
    """`max_shard_size` as transformers reads it: an int or "5GB" (10^9) / "5GiB" (2^30)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    if match is None or match.group(2).upper() not in _SIZE_UNITS:
        raise ConversionError(f"max_shard_size {size!r} is not a size such as 5GB or 500MB.")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _shards(entries: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Keys grouped into shards in order, a new shard whenever the next tensor would exceed the limit (as
    transformers shards; a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, nbytes in entries:
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


@dataclass(frozen=True)
class _FileSlice:
    """Output tensor whose values are a contiguous byte range of the source file, in `source_dtype`: copied by the
    kernel when the dtype stays, else read, cast and written block by block."""

    path: str
    offset: int
    source_dtype: torch.dtype
    dtype: torch.dtype
    shape: tuple[int, ...]


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:
        data = data[os.write(fd, data):]


def _read_blocks(source: Any, piece: _FileSlice, nbytes: int) -> Iterator[memoryview]:
    """The range's bytes in blocks of whole elements, read into one reused buffer (plain reads: no mapping)."""
    buffer = memoryview(bytearray(min(nbytes, _READ_CHUNK)))
    done = 0
    while done < nbytes:
        count = os.preadv(source.fileno(), [buffer[: min(len(buffer), nbytes - done)]], piece.offset + done)
        if count <= 0:
            raise ConversionError(f"{piece.path}: the file ends inside a tensor (truncated?).")
        yield buffer[:count]
        done += count


def _cast_slice(source: Any, piece: _FileSlice, nbytes: int, fd: int) -> bool:
    """Read, cast and write a source byte range block by block through two buffers allocated once per tensor (a new
    output tensor per block costs fresh pages, and their page faults, every time); returns whether all cast values
    are finite. Cast and check run in pieces of `_SERIAL_ELEMENTS`, which torch runs on the calling thread: the
    checksum pass keeps a core busy beside them, and a team of intra-op threads then spends most of each op waiting
    for a member the OS has descheduled (on 2 cores, cast + check took ~7x longer; setting torch's thread count
    instead would change it for the whole process, and can hang a forked one)."""
    element = torch.empty(0, dtype=piece.source_dtype).element_size()
    capacity = max(1, min(nbytes, _READ_CHUNK) // element)
    read = torch.empty(capacity, dtype=piece.source_dtype)
    cast = torch.empty(capacity, dtype=piece.dtype)
    read_view, cast_view = memoryview(read.view(torch.uint8).numpy()), memoryview(cast.view(torch.uint8).numpy())
    cast_element = cast.element_size()
    finite, done = True, 0
    while done < nbytes:
        count = min(capacity, (nbytes - done) // element)
        filled = 0
        while filled < count * element:  # whole elements only: a short read is continued, not cast in halves
            got = os.preadv(source.fileno(), [read_view[filled: count * element]], piece.offset + done + filled)
            if got <= 0:
                raise ConversionError(f"{piece.path}: the file ends inside a tensor (truncated?).")
            filled += got
        for start in range(0, count, _SERIAL_ELEMENTS):  # each op below torch's grain size: one thread, no team
            values = cast[start: min(start + _SERIAL_ELEMENTS, count)]
            values.copy_(read[start: start + values.numel()])
            finite = finite and _all_finite(values)
        _write_all(fd, cast_view[: count * cast_element])
        done += filled
    return finite


def _copy_slice(piece: _FileSlice, fd: int) -> bool:
    """Write a source byte range into `fd`, checking that its values are finite (returned). Same dtype: read once
    for the check and copied with copy_file_range (in the kernel, like `cp`); another dtype: cast block by block."""
    element = torch.empty(0, dtype=piece.source_dtype).element_size()
    nbytes = torch.Size(piece.shape).numel() * element
    finite = True
    with open(piece.path, "rb", buffering=0) as source:
        if piece.source_dtype != piece.dtype:
            return _cast_slice(source, piece, nbytes, fd)
        if piece.dtype.is_floating_point:
            for block in _read_blocks(source, piece, nbytes):
                finite = finite and _all_finite(torch.frombuffer(block, dtype=piece.dtype))
        done = 0
        try:
            while done < nbytes:
                count = os.copy_file_range(source.fileno(), fd, nbytes - done, piece.offset + done)
                if count <= 0:
                    raise OSError("copy_file_range copied nothing")
                done += count
        except (OSError, AttributeError):  # no copy_file_range here (other OS, old kernel, other file system)
            for block in _read_blocks(source, _FileSlice(piece.path, piece.offset + done, piece.source_dtype,
                                                         piece.dtype, (nbytes - done,)), nbytes - done):
                _write_all(fd, block)
    return finite


@contextlib.contextmanager
def _naming_path(path: Path) -> Iterator[None]:
    """An OSError raised by a write to a file descriptor (ENOSPC, EFBIG, EIO...) names no file; give it `path`, so
    that "No space left on device" says where."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error


def _write_safetensors(path: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                       produce: Callable[[str], Union[torch.Tensor, _FileSlice]],
                       written: Callable[[str, bool], None]) -> None:
    """A safetensors file written one tensor at a time: the header comes from the shapes, then each tensor produced
    is written and dropped (or, for a byte range of the source, copied by the kernel); `written(key, finite)` follows
    each. Larger elements first keeps every tensor aligned."""
    tensors = sorted(tensors, key=lambda item: -torch.empty(0, dtype=item[1]).element_size())
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    sizes = {}
    for key, dtype, shape in tensors:
        sizes[key] = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": _SAFETENSORS_CODES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + sizes[key]]}
        offset += sizes[key]
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with _naming_path(path), open(path, "wb", buffering=0) as handle:
        fd = handle.fileno()
        _write_all(fd, memoryview(struct.pack("<Q", len(encoded)) + encoded))
        for key, dtype, shape in tensors:
            piece = produce(key)
            if piece.dtype != dtype or tuple(piece.shape) != tuple(shape):
                raise RuntimeError(f"{key}: produced {piece.dtype} {list(piece.shape)}, planned {dtype} {list(shape)}"
                                   " (a converter bug).")
            if isinstance(piece, _FileSlice):
                finite = _copy_slice(piece, fd)
            else:
                finite = not piece.is_floating_point() or _all_finite(piece)
                if piece.numel():
                    _write_all(fd, memoryview(piece.reshape(-1).view(torch.uint8).numpy()))
            del piece
            written(key, finite)


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one pass without temporaries: a sum is finite unless some value is NaN or
    inf, or the values are huge enough to overflow it; only then are the values checked one by one, in blocks."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[start : start + (1 << 22)]).all()) for start in range(0, flat.numel(), 1 << 22))


def write_weights(plan: ConversionPlan, directory: Path, dtype: torch.dtype,
                  max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    """The weights as transformers writes them (`model.safetensors`, or `model-0000X-of-0000N.safetensors` plus
    `model.safetensors.index.json`), streamed: each tensor is read, cast, checked to be finite, written and dropped;
    one whose bytes are unchanged is copied from the source file by the kernel. Raises a `ConversionError` naming
    every non-finite tensor."""
    source = plan.source

    def out_dtype(target: _Target) -> torch.dtype:
        return dtype if target.meta.is_floating_point() else target.meta.dtype

    entries = [(key, target.meta.numel() * torch.empty(0, dtype=out_dtype(target)).element_size())
               for key, target in plan.targets.items()]
    shards = _shards(entries, _parse_size(max_shard_size))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors" for index in range(len(shards))])
    not_finite: list[str] = []

    def produce(key: str) -> Union[torch.Tensor, _FileSlice]:
        target = plan.targets[key]
        view = target.view(source.load(target.source_key))
        if view.is_contiguous() and (where := source.file_range(target.source_key, view)) is not None:
            return _FileSlice(where[0], where[1], view.dtype, out_dtype(target), tuple(view.shape))
        return _materialize_target(source, target, dtype)

    def written(key: str, finite: bool) -> None:
        target = plan.targets[key]
        if not finite:
            not_finite.append(_target_label(target.source_key, key))
        source.release(target.source_key)

    for name, keys in zip(names, shards):
        _write_safetensors(directory / name, [(key, out_dtype(plan.targets[key]), tuple(plan.targets[key].meta.shape))
                                              for key in keys], produce, written)
    if not_finite:
        raise _non_finite_error(not_finite, dtype)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes for _, nbytes in entries)},
                 "weight_map": {key: name for name, keys in zip(names, shards) for key in keys}}
        with open(directory / "model.safetensors.index.json", "w", encoding="utf-8") as handle:
            handle.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _set_dtype(config: Any, dtype: torch.dtype) -> None:
    name = str(dtype).split(".")[-1]
    if isinstance(getattr(type(config), "torch_dtype", None), property):  # transformers 5: `dtype` is the field
        config.dtype = name
    else:
        config.torch_dtype = name


def write_processor(config: Union[EvaCLIPConfig, EvaCLIPVisionConfig], directory: Path) -> None:
    """For a full model, what `CLIPProcessor.save_pretrained` writes (image processor and fast tokenizer, so
    `AutoProcessor` gives a CLIPProcessor), in the layout every transformers line reads; for a vision tower, the image
    processor alone (what `AutoProcessor` then gives)."""
    from transformers import CLIPProcessor

    image_processor = build_image_processor(config)
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config.vocab_size != VOCAB_SIZE:
        logger.warning(
            f"The text tower has {text_config.vocab_size} tokens, not CLIP's {VOCAB_SIZE}: no tokenizer files are "
            "written (the CLIP BPE vocabulary would not match its embeddings)."
        )
        text_config = None
    if text_config is not None:
        tokenizer = build_tokenizer(use_fast=True, model_max_length=text_config.max_position_embeddings)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
        # transformers 5 nests the image processor in processor_config.json, whose fields 4.x (LLaVA's pin) passes to
        # CLIPProcessor as duplicate arguments; the flat layout (preprocessor_config.json below, processor_class in
        # tokenizer_config.json) loads as a CLIPProcessor on both lines.
        (directory / "processor_config.json").unlink(missing_ok=True)
        _legacy_merges(directory / "tokenizer.json")
        if not (directory / "vocab.json").is_file() or not (directory / "merges.txt").is_file():
            write_bpe_files(directory)  # for the slow tokenizer (use_fast=False) of a 4.x that loads this dir
    image_processor.save_pretrained(directory)


def _legacy_merges(path: Path) -> None:
    """tokenizers >= 0.20 writes BPE merges as pairs, which the tokenizers of transformers 4.37 cannot parse; CLIP's
    byte-level symbols hold no space, so the "a b" strings both read are the same merges."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    merges = data.get("model", {}).get("merges")
    if merges and isinstance(merges[0], list):
        data["model"]["merges"] = [" ".join(pair) for pair in merges]
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(data, handle, ensure_ascii=False, indent=2)


def _model_card(plan: ConversionPlan, src: Path, digests: Mapping[str, str], arch: Optional[str], dtype: str,
                out: Path, vision_only: bool) -> str:
    """README.md for the converted dir: what it is, where it came from, how to check and load it."""
    from . import __version__

    config = plan.model.config
    vision = config if isinstance(config, EvaCLIPVisionConfig) else config.vision_config
    text = getattr(config, "text_config", None)
    model_class = type(plan.model).__name__
    flags = [name for name, on in (("RoPE", vision.use_rope), ("SwiGLU", vision.use_swiglu),
                                   ("sub-LN", vision.use_sub_layernorm), ("post-norm", vision.post_layernorm),
                                   ("layer scale", vision.layer_scale_init_value is not None)) if on]
    arch_is_file = bool(arch) and os.path.isfile(arch)
    arch_label = Path(arch).name if arch_is_file else (arch or "from the source config.json")
    command = ["llava-evaclip", "convert", src.name, out.name]
    if arch:
        command += ["--arch", arch_label]
    if vision_only:
        command.append("--vision-only")
    if dtype != "float32":
        command += ["--dtype", dtype]
    sources = "\n".join(f"- `{Path(path).name}`: sha256 `{digest}`" for path, digest in digests.items())
    if arch_is_file:  # a JSON model config is an input too: which one, exactly
        with open(arch, "rb") as handle:
            sources += f"\n- `--arch {arch_label}`: sha256 `{hashlib.sha256(handle.read()).hexdigest()}`"
    lines = [
        "---", "library_name: transformers", "tags:", "- eva-clip", "- clip", "- llava-evaclip", "---", "",
        f"# {out.name}", "",
        f"EVA-CLIP ({arch_label}) converted to Hugging Face format by llava-evaclip {__version__}: `{model_class}`, "
        f"{plan.num_parameters / 1e6:.1f}M parameters, {dtype}.", "",
        "## Architecture", "",
        f"- Vision: width {vision.hidden_size}, {vision.num_hidden_layers} layers, {vision.num_attention_heads} heads, "
        f"patch {vision.patch_size}, image {vision.image_size} px, MLP {vision.intermediate_size}"
        + (f", {', '.join(flags)}" if flags else "") + ".",
    ]
    if text is not None:
        lines.append(f"- Text: width {text.hidden_size}, {text.num_hidden_layers} layers, {text.num_attention_heads} "
                     f"heads, vocabulary {text.vocab_size}, context {text.max_position_embeddings}.")
    lines += [
        "", "## Source", "", f"Converted from a {plan.source.kind} checkpoint:", "", sources, "",
        "Reproduce: `" + shlex.join(command) + "`. Every weight was checked against the architecture (names, shapes, "
        "rotary tables), the archive CRCs and finiteness. The conversion's parity with BAAI's original code (every "
        "hidden state within 2e-5) is tested by `python -m pytest tests/test_convert.py` in llava-evaclip's "
        "repository.", "",
        "## Load", "", "With llava-evaclip installed (`pip install llava-evaclip`), which registers the EVA-CLIP "
        "model types with transformers' Auto classes:", "", "```python", "import llava_evaclip  # noqa: F401",
        "from transformers import AutoModel, AutoProcessor", "",
        f"model = AutoModel.from_pretrained({out.name!r})",  # repr: a name with quotes or backslashes stays one string
        f"processor = AutoProcessor.from_pretrained({out.name!r})", "```", "",
        "With transformers alone, `AutoProcessor` / `AutoImageProcessor`"
        + (" / `AutoTokenizer`" if text is not None else "") + " load from this folder unchanged, and the weights are "
        "plain safetensors. The model class needs one line first: `pip install llava-evaclip`, then "
        "`import llava_evaclip` before `from_pretrained`. The folder ships no modeling code (no `auto_map`), so "
        "nothing here ever needs `trust_remote_code=True`.", "",
    ]
    return "\n".join(lines)


_LIBRARY_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _library_os_error(error: BaseException) -> Optional[int]:
    """The errno of a system error that a Rust library (tokenizers' `Tokenizer.save`) raised as a plain `Exception`
    whose message ends "(os error 28)", or None: a full disk while writing tokenizer.json is the system's refusal,
    to be reported as such, not a converter bug with a traceback."""
    if type(error) is not Exception:
        return None
    match = _LIBRARY_OS_ERROR.search(str(error))
    return int(match.group(1)) if match else None


def convert_checkpoint(
    src: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    arch: Optional[str] = None,
    vision_only: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
) -> ConversionResult:
    """Convert SRC (BAAI .pt/.bin, timm or open_clip state dict, InternVL-port dir) into a Hugging Face dir OUT.

    `arch` is a preset name or a BAAI model-config JSON path (optional only for Hugging Face dirs, whose config.json
    is used). Raises `ConversionError` (a ValueError) for anything that would not be a lossless conversion, and
    `ConversionTerminated` on SIGTERM (main thread), after removing what it had written.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")
    src_path, out_path = Path(src), Path(out)
    _check_paths(src_path, out_path, overwrite)  # before anything is read, and again before the rename
    _check_arch(arch)
    out_abs = Path(os.path.abspath(out_path))
    if out_abs.parent.is_dir():
        remove_stale_staging(out_abs.parent)
        _check_paths(src_path, out_path, overwrite)  # the cleanup may have restored a killed run's previous OUT
    with _sigterm_raises():
        source = load_source(src_path)
        verification = _BackgroundVerification(source)  # CRCs and sha256, one pass beside the conversion
        staging = out_abs.parent / _staging_name(out_abs.name)
        try:
            plan = plan_conversion(source, arch=arch, vision_only=vision_only)
            out_abs.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(staging)  # mode from the umask, like every file written below
            config = plan.model.config
            text_config = getattr(config, "text_config", None)
            if text_config is not None and text_config.vocab_size == VOCAB_SIZE:
                text_config.pad_token_id = PAD_TOKEN_ID  # what the written tokenizer pads with
            config.architectures = [type(plan.model).__name__]
            _set_dtype(config, DTYPES[dtype])
            write_weights(plan, staging, DTYPES[dtype], max_shard_size)
            config.save_pretrained(staging)
            write_processor(config, staging)
            digests = verification.result()
            (staging / "README.md").write_text(
                _model_card(plan, src_path, digests, arch, dtype, out_abs, vision_only), encoding="utf-8")
            files = sorted(path.name for path in staging.iterdir())
            with _signals_deferred():
                _move_into_place(staging, out_path, src_path, overwrite)
        except BaseException as error:
            with _signals_deferred():
                shutil.rmtree(staging, ignore_errors=True)
            if not isinstance(error, _ValueError):  # names and shapes: the data was not read
                verification.cancel()
                system_error = _library_os_error(error)
                if system_error is not None:  # the tokenizers library's `Exception: ... (os error 28)`
                    raise OSError(system_error, os.strerror(system_error), str(staging)) from error
                if isinstance(error, OSError) and error.filename is None:  # a write that names no file: say where
                    raise OSError(error.errno, error.strerror or str(error), str(staging)) from error
                raise
            corruption = verification.corruption()
            if corruption is not None and corruption is not error:
                raise corruption from None
            raise
    return ConversionResult(
        output_dir=str(out_abs),
        source_kind=source.kind,
        model_class=type(plan.model).__name__,
        num_parameters=plan.num_parameters,
        dtype=dtype,
        files=[str(out_abs / name) for name in files],
    )


__all__ = [
    "CONVERTED_MODEL_TYPES",
    "ConversionError",
    "ConversionPlan",
    "ConversionResult",
    "ConversionTerminated",
    "DEFAULT_MAX_SHARD_SIZE",
    "DTYPES",
    "SOURCE_KINDS",
    "SourceCheckpoint",
    "config_from_hf_dict",
    "convert_checkpoint",
    "detect_source_kind",
    "load_source",
    "map_state_dict",
    "plan_conversion",
    "plan_state_dict",
    "remove_stale_staging",
    "write_processor",
    "write_weights",
]
