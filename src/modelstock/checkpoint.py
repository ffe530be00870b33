"""Open checkpoints in every common form behind one small interface.

A reader exposes ``infos`` (name -> shape, dtype, in file order), ``read(name, start, stop)`` (a
flat element range, zero-copy where the format allows), ``release`` (let go of pages already
processed) and ``close``. Readers never load a whole checkpoint: safetensors are memory-mapped,
``.pt/.bin`` files are loaded with ``mmap=True`` where their format allows it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from .errors import ModelStockError
from .safetensors_io import SafetensorsReader, TensorInfo

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Keys under which training frameworks nest the state dict (Lightning, DeepSpeed, timm, ...).
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")


class Reader(Protocol):
    path: str
    infos: dict[str, TensorInfo]
    # A reader may also have ``warnings``: what it decided while opening, for the merge report.

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor: ...
    def release(self, name: str, start: int = 0, stop: int | None = None) -> None: ...
    def close(self) -> None: ...


class StateDictReader:
    """A reader over tensors already in memory (a state dict or an ``nn.Module``)."""

    def __init__(self, state: Mapping[str, torch.Tensor] | torch.nn.Module,
                 path: str = "<state dict>") -> None:
        if isinstance(state, torch.nn.Module):
            state = state.state_dict()
        self.path = path
        self._tensors: dict[str, torch.Tensor] = {}
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                self._tensors[str(name)] = value.detach()
        self.infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._tensors.items()}

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        t = self._tensors[name]
        flat = t.view(-1) if t.is_contiguous() else t.reshape(-1)
        return flat[start:stop]

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass

    def shares_storage(self, a: str, b: str) -> bool:
        """Whether two names are one tensor (tied weights: same storage, offset and layout)."""
        x, y = self._tensors[a], self._tensors[b]
        return (x.numel() > 0 and x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
                and x.storage_offset() == y.storage_offset() and x.shape == y.shape
                and x.stride() == y.stride() and x.dtype == y.dtype)


class TorchFileReader(StateDictReader):
    """A ``.pt/.bin/.pth/.ckpt`` state dict, loaded with ``weights_only=True`` unless trusted."""

    def __init__(self, path: str | os.PathLike, trust_pickle: bool = False) -> None:
        path = str(path)
        super().__init__(_state_dict_of(path, _load_pickle(path, trust_pickle)), path)
        if not self.infos:
            raise ModelStockError("no tensors found in this checkpoint", path)


# torch.load(weights_only=True) could still run code before 2.6 (CVE-2025-32434).
SAFE_WEIGHTS_ONLY = "2.6"


def _load_pickle(path: str, trust: bool):
    if os.path.getsize(path) == 0:
        raise ModelStockError("empty file", path)
    if not trust and torch.__version__ < SAFE_WEIGHTS_ONLY:
        raise ModelStockError(f"refusing to unpickle with torch {torch.__version__}: its "
                              "weights_only loader is not safe before 2.6 (CVE-2025-32434); "
                              "upgrade torch, convert to safetensors, or pass --trust-pickle",
                              path)
    try:
        is_zip = zipfile.is_zipfile(path)
        with warnings.catch_warnings():  # torch's warnings would break the one-line error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust, mmap=is_zip)
    except pickle.UnpicklingError as e:
        if not trust and "weights_only" in str(e).replace(" ", "_").lower():
            raise ModelStockError(
                "refusing to unpickle: this file needs code execution, not just tensors "
                f"({_refusal_reason(e)}); pass --trust-pickle only if you trust its source", path,
            ) from None
        raise ModelStockError(f"corrupt pickle ({_first_line(e)})", path) from None
    except MemoryError:
        raise ModelStockError("corrupt checkpoint: it asks for more memory than exists",
                              path) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError, ... on bad files
        raise ModelStockError(f"corrupt or truncated checkpoint ({_first_line(e)})",
                              path) from None


def _refusal_reason(e: BaseException) -> str:
    """The one useful line of torch's weights_only refusal: which global it would have called."""
    m = re.search(r"(Unsupported [^\n]*?)(?: was not an allowed global|\. |\n|$)", str(e))
    return m.group(1) if m else _first_line(e)


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _state_dict_of(path: str, obj) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}``-style nesting (or a pickled module) to a flat state dict."""
    for _ in range(4):
        if isinstance(obj, torch.nn.Module):
            return obj.state_dict()
        if not isinstance(obj, Mapping):
            raise ModelStockError(f"expected a state dict, found {type(obj).__name__}", path)
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        inner = next((obj[k] for k in WRAPPER_KEYS
                      if isinstance(obj.get(k), Mapping | torch.nn.Module)), None)
        if inner is None:
            break
        obj = inner
    raise ModelStockError("no tensors found in this checkpoint", path)


class ShardedReader:
    """A Hugging Face sharded checkpoint described by an index JSON (``weight_map``).

    The checkpoint is every tensor in the shard files the index names, as ``from_pretrained``
    loads it (transformers reads whole shards and uses the index only to list them): a tensor
    a shard holds but ``weight_map`` leaves out is included, after the indexed ones. A tensor
    found in two shards is refused, naming both: transformers would silently keep whichever
    shard it loads last, even against the index.
    """

    def __init__(self, index_path: str | os.PathLike, trust_pickle: bool = False) -> None:
        self.path = str(index_path)
        try:
            with _open_regular(self.path) as f:
                weight_map = json.loads(f.read().decode("utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise ValueError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise ModelStockError(f"malformed index ({_first_line(e)})", self.path) from None
        # Not resolved: in a Hugging Face cache the index itself is a symlink into blobs/.
        root = Path(os.path.abspath(self.path)).parent
        self._shards: dict[str, Reader] = {}
        self._where: dict[str, Reader] = {}
        opened: dict[Path, tuple[str, Reader]] = {}  # by file: two names may reach one file
        try:
            for name, shard in weight_map.items():
                if shard not in self._shards:
                    target = _inside(root, shard, self.path, name)
                    if target not in opened:
                        opened[target] = (shard, _open_file(target, trust_pickle,
                                                            index_ok=False))
                    self._shards[shard] = opened[target][1]
                reader = self._shards[shard]
                if name not in reader.infos:
                    raise ModelStockError(f"the index places this tensor in {shard}, which "
                                          "lacks it", self.path, name)
                self._where[name] = reader
            # What the shards hold beyond weight_map is part of the checkpoint, as it is for
            # from_pretrained; only a tensor in two shards is ambiguous.
            shard_name = {id(r): s for s, r in opened.values()}
            for shard, reader in opened.values():
                for name in reader.infos:
                    first = self._where.setdefault(name, reader)
                    if first is reader:
                        continue
                    if name in weight_map:
                        raise ModelStockError(f"tensor is in {shard} as well as in "
                                              f"{weight_map[name]}, where the index places it; "
                                              "refusing to choose", self.path, name)
                    raise ModelStockError(f"tensor is in two shards, {shard_name[id(first)]} "
                                          f"and {shard}, and the index names neither; "
                                          "refusing to choose", self.path, name)
        except BaseException:
            self.close()
            raise
        self.infos = {name: self._where[name].infos[name] for name in self._where}
        unindexed = [k for k in self.infos if k not in weight_map]
        self.warnings = [] if not unindexed else [
            f"{self.path}: {len(unindexed)} tensor(s) in its shards are not in its weight_map "
            f"and were read as from_pretrained reads them: {', '.join(unindexed[:5])}"]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._where[name].read(name, start, stop)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        self._where[name].release(name, start, stop)

    def close(self) -> None:
        for r in {id(r): r for r in self._shards.values()}.values():
            r.close()


def _inside(root: Path, shard: str, index: str, name: str) -> Path:
    """Resolve a shard name from an index, refusing anything outside the model directory.

    Symlinks are followed only when they stay in the directory, or, for a Hugging Face cache
    snapshot (``<repo>/snapshots/<rev>/``), in that repository's ``blobs/``.
    """
    if "\0" in shard:
        raise ModelStockError(f"refusing shard path {shard!r}: it contains a NUL byte", index,
                              name)
    try:
        os.fsencode(shard)
    except UnicodeError:  # e.g. a lone surrogate from a JSON "\udd00" escape
        raise ModelStockError(f"refusing shard path {shard!r}: not a valid file name", index,
                              name) from None
    if os.path.isabs(shard) or ".." in Path(shard).parts:
        raise ModelStockError(f"refusing shard path {shard!r}: it points outside the model "
                              "directory", index, name)
    target = (root / shard).resolve()
    allowed = [root.resolve()]
    if root.parent.name == "snapshots":
        allowed.append((root.parent.parent / "blobs").resolve())
    if not any(a in target.parents for a in allowed):
        raise ModelStockError(f"refusing shard path {shard!r}: it resolves outside the model "
                              "directory", index, name)
    if not target.is_file():
        raise ModelStockError(f"missing shard {shard}", index, name)
    return target


class RenamedReader:
    """Present a reader's tensors under new names (e.g. with a ``module.`` prefix stripped)."""

    def __init__(self, inner: Reader, prefix: str) -> None:
        self.path, self._inner = inner.path, inner
        self._orig: dict[str, str] = {}
        for name in inner.infos:
            new = name[len(prefix):] if name.startswith(prefix) else name
            if new in self._orig:
                raise ModelStockError(f"stripping {prefix!r} makes two tensors '{new}'",
                                      inner.path, name)
            self._orig[new] = name
        self.infos = {new: inner.infos[old] for new, old in self._orig.items()}

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._inner.read(self._orig[name], start, stop)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        self._inner.release(self._orig[name], start, stop)

    def close(self) -> None:
        self._inner.close()

    def shares_storage(self, a: str, b: str) -> bool:
        inner = getattr(self._inner, "shares_storage", None)
        return inner is not None and inner(self._orig[a], self._orig[b])

    @property
    def warnings(self) -> list[str]:
        return getattr(self._inner, "warnings", [])


def _open_regular(path: str | os.PathLike):
    """Open for reading, refusing anything but a regular file: a FIFO or a device would block
    or never end. (O_NONBLOCK so that opening a FIFO does not wait for a writer.)"""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ModelStockError(f"cannot read ({e.strerror or e})", path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelStockError("not a regular file", path)
    return os.fdopen(fd, "rb")


def _open_file(path: Path, trust_pickle: bool, index_ok: bool = True) -> Reader:
    if path.name.endswith(".index.json"):
        if not index_ok:  # an index naming an index: a loop, or a maze to walk
            raise ModelStockError("an index may name weight files only, not another index",
                                  path)
        return ShardedReader(path, trust_pickle)
    with _open_regular(path) as f:
        magic = f.read(9)
    if path.suffix == ".safetensors" or (len(magic) == 9 and magic[8:9] == b"{"):
        return SafetensorsReader(path)
    return TorchFileReader(path, trust_pickle)


def find_weights(directory: Path) -> Path:
    """The weights file (or index) of a model directory, in Hugging Face's order of preference."""
    for name in (SAFETENSORS_INDEX, "model.safetensors", PICKLE_INDEX, "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    for suffixes in ((".safetensors",), PICKLE_SUFFIXES):
        found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in suffixes)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ModelStockError("several weight files and no index; name the file to use",
                                  directory)
    adapters = sorted(p.name for p in Path(directory).iterdir()
                      if (p / "adapter_config.json").is_file()) if Path(directory).is_dir() else []
    hint = f"; {adapters[0]}/ inside is a LoRA adapter: pass that folder" if adapters else ""
    raise ModelStockError(f"no weights found (no *.safetensors, *.bin, *.pt or index){hint}",
                          directory)


def open_checkpoint(source: str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module,
                    trust_pickle: bool = False, strip_prefix: str | None = None) -> Reader:
    """Open a model directory, a weights file, an index JSON, a state dict or a module (an
    object that is already a reader, with ``infos`` and ``read``, is taken as it is)."""
    if hasattr(source, "infos") and hasattr(source, "read"):
        reader: Reader = source  # type: ignore[assignment]
    elif isinstance(source, Mapping | torch.nn.Module):
        reader = StateDictReader(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ModelStockError("no such file or directory", path)
        reader = _open_file(find_weights(path) if path.is_dir() else path, trust_pickle)
    if strip_prefix:
        reader = RenamedReader(reader, strip_prefix)
    return reader
