"""A .safetensors file's header read with Python's own file functions: one open and one or two reads.

The safetensors library refuses paths that are not valid UTF-8 and opens and maps a file twice to give its metadata;
a resume over a 600K-image feature store, `inspect` and the converter's completeness checks only need the header. The
checks are the library's: an 8-byte little-endian length within its 100 MB limit, a JSON object, tensor data that
runs contiguously from the header to the exact end of the file."""

from __future__ import annotations

import json
import os
import stat
from typing import Any, Union

# safetensors' own limit on a header's length; how much of a file the first read takes (a features file's header is
# ~0.5 KB, a shard's grows with its tensor count).
MAX_HEADER_BYTES = 100_000_000
FIRST_READ_BYTES = 1 << 16


def read_safetensors_header(path: Union[str, os.PathLike]) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(tensors: {name: {"dtype", "shape", "data_offsets"}}, metadata, data start) of a complete safetensors file.
    A file that is not one, or whose size is not what its header describes (cut short, still being written, data
    appended), raises ValueError saying which; the file system's errors (missing, unreadable) are OSError."""
    # O_NONBLOCK: opening a named pipe (a FIFO given a weights file's name) would wait for a writer forever
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    with open(os.open(path, flags), "rb", buffering=0) as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a safetensors file (not a regular file: a named pipe, socket or device)")
        size = info.st_size
        head = handle.read(FIRST_READ_BYTES)
        if len(head) < 8:
            raise ValueError(f"not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        length = int.from_bytes(head[:8], "little")
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise ValueError(f"not a safetensors file, or one cut short (a header of {length} bytes in a file of "
                             f"{size})")
        while len(head) < 8 + length:
            more = handle.read(8 + length - len(head))
            if not more:
                raise ValueError("file cut short in its header")
            head += more
    try:
        header = json.loads(head[8: 8 + length])
    except ValueError as error:  # not UTF-8, or not JSON
        raise ValueError(f"not a safetensors file (its header is not JSON: {error})") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError("not a safetensors file (its metadata is not a JSON object)")
    try:
        spans = sorted((int(entry["data_offsets"][0]), int(entry["data_offsets"][1])) for entry in header.values())
        for entry in header.values():
            if not isinstance(entry["dtype"], str) or not isinstance(entry["shape"], list):
                raise TypeError
    except (TypeError, KeyError, IndexError, ValueError):
        raise ValueError("not a safetensors file (a tensor without dtype, shape or data offsets)") from None
    end = 0
    for start, stop in spans:  # contiguous from the header to the end of the file, as the library requires
        if start != end or stop < start:
            raise ValueError("damaged safetensors file (tensor data overlap or leave a gap)")
        end = stop
    if 8 + length + end != size:
        raise ValueError(f"{size} bytes where its header describes {8 + length + end} (a file cut short or still "
                         "being written)")
    return header, metadata, 8 + length
