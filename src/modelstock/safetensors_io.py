"""A strict, streaming safetensors reader and writer.

Reading memory-maps the file and hands out zero-copy views of any element range of a tensor, so a
chunk of a huge tensor costs only its own pages; every header is validated before any data is
touched (bounds, overlaps, sizes, dtypes, duplicate names). Writing streams: the header is known
ahead from the tensors' shapes and dtypes, and data is appended chunk by chunk, never buffered.
Format: https://github.com/huggingface/safetensors (8-byte little-endian header length, JSON
header, raw little-endian data).
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .direct_io import OutputFile
from .errors import ModelStockError

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
PAGE = mmap.PAGESIZE

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in [("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
                     ("C64", "complex64"), ("U16", "uint16"), ("U32", "uint32"),
                     ("U64", "uint64")]:
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor; ``offset`` is its byte offset in the file."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _no_duplicates(path: str):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ModelStockError("malformed safetensors header: duplicate tensor name",
                                      path, key)
            seen.add(key)
        return dict(pairs)
    return hook


def parse_header(path: str, head: bytes, file_size: int) -> tuple[dict[str, TensorInfo],
                                                                   dict[str, str]]:
    """Validate a safetensors header; return tensor infos (absolute offsets) and metadata."""
    if file_size < 8 or len(head) < 8:
        raise ModelStockError("not a safetensors file: shorter than its 8-byte header length",
                              path)
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise ModelStockError(f"truncated or corrupt safetensors file: header length {n} "
                              f"exceeds the file size {file_size}", path)
    try:
        header = json.loads(head[8 : 8 + n].decode("utf-8"),
                            object_pairs_hook=_no_duplicates(path))
    except ModelStockError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelStockError(f"malformed safetensors header JSON ({e})", path) from None
    if not isinstance(header, dict):
        raise ModelStockError("malformed safetensors header: not a JSON object", path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ModelStockError("malformed safetensors header: __metadata__ must map str to str",
                              path)
    data_start, data_len = 8 + n, file_size - 8 - n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        infos[name] = info = _parse_entry(path, name, entry, data_start, data_len)
        spans.append((info.offset, info.offset + info.nbytes, name))
    max_end, owner = 0, None
    for begin, end, name in sorted(spans):
        if end > begin:  # empty tensors occupy no bytes and overlap nothing
            if begin < max_end:
                raise ModelStockError(f"corrupt safetensors file: its data overlaps '{owner}'",
                                      path, name)
            max_end, owner = end, name
    return infos, metadata


def _parse_entry(path: str, name: str, entry, data_start: int, data_len: int) -> TensorInfo:
    def bad(why: str) -> ModelStockError:
        return ModelStockError(f"corrupt safetensors header: {why}", path, name)

    if not isinstance(entry, dict):
        raise bad("entry is not an object")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype_name, str):
        raise bad("missing dtype")
    if dtype_name not in DTYPES:
        raise bad(f"unknown or unsupported dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad(f"invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
        isinstance(o, int) and not isinstance(o, bool) for o in offsets
    )):
        raise bad(f"invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise bad(f"data_offsets {offsets} run past the end of the data ({data_len} bytes); "
                  "the file is truncated or corrupt")
    info = TensorInfo(tuple(shape), DTYPES[dtype_name], data_start + begin)
    if math.prod(max(d, 1) for d in shape) * info.dtype.itemsize >= 2**63:
        # Zero elements allow any other dimension; torch's int64 strides do not.
        raise bad(f"shape {shape} is too large for any tensor")
    if end - begin != info.nbytes:
        raise bad(f"data_offsets span {end - begin} bytes but shape {shape} x {dtype_name} "
                  f"needs {info.nbytes}")
    return info


def _libc_madvise():
    """libc's madvise as a ctypes function, or None. ``mmap.madvise`` holds the GIL for the
    whole call, and dropping the pages of a large tensor takes milliseconds."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


class SafetensorsReader:
    """Memory-mapped, validated view of one ``.safetensors`` file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) == 8:
                    (n,) = struct.unpack("<Q", head)
                    if n <= MAX_HEADER_BYTES and 8 + n <= size:
                        head += f.read(n)
                self.infos, self.metadata = parse_header(self.path, head, size)
                # ACCESS_COPY: private, writable pages, so torch gets a writable buffer without
                # copying; nothing is ever written back to the file.
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
                self._base = None if self._mm is None else \
                    torch.frombuffer(self._mm, dtype=torch.uint8, count=1).data_ptr()
        except OSError as e:
            raise ModelStockError(f"cannot read ({e.strerror})", self.path) from None

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor, as a zero-copy view."""
        info = self.infos[name]
        stop = info.numel if stop is None else stop
        if stop <= start:
            return torch.empty(0, dtype=info.dtype)
        size = info.dtype.itemsize
        buf = torch.frombuffer(self._mm, dtype=torch.uint8, count=(stop - start) * size,
                               offset=info.offset + start * size)
        return buf.view(info.dtype)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Drop this range's pages from the process (they stay in the page cache)."""
        info = self.infos[name]
        stop = info.numel if stop is None else stop
        lo = (info.offset + start * info.dtype.itemsize) // PAGE * PAGE
        hi = info.offset + stop * info.dtype.itemsize
        if self._mm is not None and hi > lo and hasattr(mmap, "MADV_DONTNEED"):
            length = min(hi, len(self._mm)) - lo
            if _madvise is None:
                self._mm.madvise(mmap.MADV_DONTNEED, lo, length)
            else:  # through ctypes, which lets go of the GIL: workers go on meanwhile
                _madvise(self._base + lo, length, mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive somewhere; let the GC unmap it
                pass
            self._mm = None


def header_bytes(entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header (space-padded to 8 bytes) for tensors in order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, chunk by chunk, in the declared order.

    ``direct`` bypasses the page cache where the file system allows (see `direct_io`): much less
    CPU for a large output that is not read back at once."""

    def __init__(self, path: str | os.PathLike,
                 entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, direct: bool = False) -> None:
        self.path = str(path)
        self._entries = [(n, d, tuple(s)) for n, d, s in entries]
        self._remaining = [math.prod(s) * d.itemsize for _, d, s in self._entries]
        self._index = 0
        self._file = OutputFile(self.path, direct)
        self._file.write(header_bytes(self._entries, metadata))
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._entries) and self._remaining[self._index] == 0:
            self._index += 1

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next chunk of tensor ``name`` (flat, the declared dtype, in order)."""
        if chunk.numel() == 0:  # nothing to place (zero-size tensors are skipped on declaration)
            return
        if self._index >= len(self._entries) or self._entries[self._index][0] != name:
            expected = self._entries[self._index][0] if self._index < len(self._entries) else None
            raise RuntimeError(f"{self.path}: wrote '{name}' but '{expected}' comes next")
        dtype = self._entries[self._index][1]
        if chunk.dtype != dtype:
            raise RuntimeError(f"{self.path}: '{name}' is {dtype}, got a {chunk.dtype} chunk")
        data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        if data.numel() > self._remaining[self._index]:
            raise RuntimeError(f"{self.path}: too much data for '{name}'")
        if data.numel():
            self._file.write(memoryview(data.numpy()))
        self._remaining[self._index] -= data.numel()
        if self._remaining[self._index] == 0:
            self._index += 1
            self._skip_empty()

    def close(self) -> None:
        """Close; raises if any declared tensor was not written in full."""
        if self._file.closed:
            return
        self._file.close()
        if self._index < len(self._entries):
            raise RuntimeError(f"{self.path}: '{self._entries[self._index][0]}' was not written")

    def abort(self) -> None:
        """Close without checks or a final flush (the file is being discarded)."""
        self._file.abort()
