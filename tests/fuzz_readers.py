"""Fuzzing the checkpoint readers (issue 8, item 4): hypothesis strategies and the property.

The property, for any bytes: opening the file as a checkpoint (a safetensors file, an index JSON
with shards beside it, or a ``.bin``/``.pt`` pickle) and reading every tensor either works or
raises `ModelStockError`; anything else (another exception, a hang, a read outside the file, a
pickle that runs code) is a crash. Files that open are also merged with themselves, in memory
and into a safetensors file, so the planner and the writer meet the odd dtypes and shapes too.

Used by tests/test_fuzz.py (small budget) and benchmarks/fuzz_readers.py (large budget, counts).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import signal
import struct
from pathlib import Path

import torch
from hypothesis import strategies as st
from safetensors.torch import save_file

from modelstock import ModelStockError, merge_checkpoints, merge_state_dicts, open_checkpoint
from modelstock.safetensors_io import DTYPES, SafetensorsReader

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=6), st.lists(st.integers(-3, 2**64), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(-1, 9), max_size=2),
)
BAD_DTYPES = ["F128", "f32", "", "Q4_0", "F8_E8M0", "C128", "F32 ", "BOOL\0"]
ODD_DIMS = [0, 1, 2**31, 2**32, 2**62, 2**63, 2**64, -1]


def _itemsize(dtype_name: str) -> int:
    return DTYPES[dtype_name].itemsize if dtype_name in DTYPES else 4


@st.composite
def mutated(draw, blob: bytes) -> bytes:
    """Up to three byte-level edits: overwrite, truncate, insert or duplicate a range."""
    data = bytearray(blob)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["set", "truncate", "insert", "duplicate"]))
        pos = draw(st.integers(0, max(0, len(data))))
        if op == "set" and data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(max_size=8))
        elif op == "duplicate":
            end = draw(st.integers(pos, min(len(data), pos + 64)))
            data[pos:pos] = data[pos:end]
    return bytes(data)


@st.composite
def safetensors_bytes(draw) -> bytes:
    """Mostly well-formed headers with a few fields perturbed, then maybe byte-level edits."""
    entries: dict = {}
    offset = 0
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(["a", "b", "c"]) | st.text(max_size=5))
        dtype = draw(st.sampled_from(sorted(DTYPES) if likely(draw) else BAD_DTYPES))
        if likely(draw):
            shape = draw(st.lists(st.integers(0, 4), max_size=3))
        else:  # zero elements allow any other dimension: do they fit torch?
            shape = draw(st.lists(st.sampled_from(ODD_DIMS), min_size=1, max_size=3))
            shape.insert(draw(st.integers(0, len(shape))), 0)
        numel = math.prod(shape)
        size = numel * _itemsize(dtype) if 0 <= numel < 64 else 0
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):  # perturb a field, entry or metadata
        if not entries:
            break
        name = draw(st.sampled_from(sorted(entries)))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "drop",
                                      "metadata", "offset"]))
        if field == "entry":
            entries[name] = draw(JUNK)
        elif field == "drop" and isinstance(entries[name], dict):
            entries[name].pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif field == "metadata":
            entries["__metadata__"] = draw(JUNK | st.dictionaries(st.text(max_size=3),
                                                                   st.text(max_size=3)))
        elif field == "offset" and isinstance(entries[name], dict):
            entries[name]["data_offsets"] = [draw(st.integers(-2, offset + 8)),
                                             draw(st.integers(-2, offset + 8))]
        elif isinstance(entries[name], dict):
            entries[name][field] = draw(JUNK)
    text = json.dumps(entries).encode()
    if entries and not likely(draw):  # a duplicate name, textually
        first = json.dumps(dict([next(iter(entries.items()))]))[1:-1].encode()
        text = b"{" + first + b", " + text[1:] if len(text) > 2 else text
    text += b" " * draw(st.integers(0, 8))
    # Mostly consistent framing (so that the header's contents are what gets tested).
    length = len(text) if likely(draw) else draw(st.integers(0, 2**64 - 1) | st.integers(
        max(0, len(text) - 4), len(text) + 4))
    data = draw(st.binary(min_size=offset, max_size=offset) if likely(draw)
                else st.binary(max_size=offset + 16))
    blob = struct.pack("<Q", length) + text + data
    return blob if likely(draw) else draw(mutated(blob))


def likely(draw) -> bool:
    """True four times in five."""
    return draw(st.integers(0, 4)) > 0


# -- index files -----------------------------------------------------------------------------

SHARD_NAMES = ["a.safetensors", "b.safetensors", "bad.safetensors", "sub/c.safetensors",
               "folder.safetensors", "link_out.safetensors", "link_in.safetensors",
               "model.safetensors.index.json", "other.index.json", "p.bin", "missing.safetensors",
               "../outside.safetensors", "/etc/passwd", "", ".", "sub/../a.safetensors",
               "a\0.safetensors", "./a.safetensors", "sub//c.safetensors", "fifo",
               "a\udd00.safetensors"]
TENSOR_NAMES = ["w", "x", "y", "z", "q"]


def make_index_dir(root: Path) -> Path:
    """A model directory with valid, broken and tricky shards for index fuzzing."""
    d = root / "model"
    (d / "sub").mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.ones(2), "x": torch.zeros(3)}, d / "a.safetensors")
    save_file({"y": torch.ones(1, dtype=torch.float16)}, d / "b.safetensors")
    save_file({"z": torch.arange(4)}, d / "sub" / "c.safetensors")
    (d / "bad.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json}      ")
    (d / "folder.safetensors").mkdir(exist_ok=True)
    save_file({"w": torch.ones(2)}, root / "outside.safetensors")
    for link, target in [("link_out.safetensors", root / "outside.safetensors"),
                         ("link_in.safetensors", d / "a.safetensors")]:
        if not (d / link).is_symlink():
            os.symlink(target, d / link)
    torch.save({"q": torch.ones(2)}, d / "p.bin")
    (d / "other.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    if not (d / "fifo").exists():
        os.mkfifo(d / "fifo")
    return d


@st.composite
def index_bytes(draw) -> bytes:
    weight_map = draw(st.dictionaries(st.sampled_from(TENSOR_NAMES) | st.text(max_size=3),
                                      st.sampled_from(SHARD_NAMES) | st.text(max_size=6),
                                      min_size=1, max_size=4))
    top = draw(st.sampled_from(["full", "full", "bare", "bare", "junk map", "junk"]))
    if top == "full":
        doc = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    elif top == "bare":
        doc = {"weight_map": weight_map}
    else:
        doc = {"weight_map": draw(JUNK)} if top == "junk map" else draw(JUNK)
    blob = json.dumps(doc).encode()
    return draw(mutated(blob)) if draw(st.integers(0, 3)) == 0 else blob


# -- pickles ---------------------------------------------------------------------------------

class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_seeds(marker: Path) -> list[bytes]:
    """Valid checkpoints in torch's zip and legacy formats, plain pickles, and code-running ones."""
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(3, dtype=torch.float16),
             "n": torch.tensor(7)}
    seeds = []
    for zipped in (True, False):
        evil = {"w": torch.ones(2), "evil": _Marker(str(marker))}
        for obj in (state, {"state_dict": state}, evil):
            buf = io.BytesIO()
            torch.save(obj, buf, _use_new_zipfile_serialization=zipped)
            seeds.append(buf.getvalue())
    seeds.append(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    seeds.append(pickle.dumps(_Marker(str(marker)), protocol=4))
    return seeds


OPCODES = [pickle.MARK, pickle.STOP, pickle.POP, pickle.DUP, pickle.NONE, pickle.EMPTY_DICT,
           pickle.EMPTY_LIST, pickle.APPEND, pickle.SETITEM, pickle.SETITEMS, pickle.TUPLE,
           pickle.REDUCE, pickle.BUILD, pickle.BINPUT + b"\0", pickle.BINGET + b"\0",
           pickle.BININT1 + b"\7", pickle.SHORT_BINUNICODE + b"\1w", pickle.PROTO + b"\2",
           b"cbuiltins\nopen\n", b"ctorch._utils\n_rebuild_tensor_v2\n", b"cos\nsystem\n",
           pickle.BINPERSID, pickle.EMPTY_TUPLE, pickle.NEWOBJ,
           pickle.LONG1 + b"\x08" + b"\xff" * 8]


@st.composite
def pickle_bytes(draw, seeds: list[bytes]) -> bytes:
    kind = draw(st.sampled_from(["seed", "opcodes", "random"]))
    if kind == "seed":
        return draw(mutated(draw(st.sampled_from(seeds))))
    if kind == "opcodes":
        return b"".join(draw(st.lists(st.sampled_from(OPCODES), max_size=30)))
    return draw(st.binary(max_size=200))


# -- the property ----------------------------------------------------------------------------

class Hang(Exception):
    """An input took longer than the allowed seconds."""


def _expire(signum, frame):
    raise Hang("no answer within the time limit")


def classify(path: Path, out: Path, marker: Path | None = None, seconds: float = 10.0
             ) -> tuple[str, str]:
    """Open ``path``, read every tensor, merge it with itself into ``out``: ("ok", ""),
    ("error", the clean one-line message) or ("crash", what went wrong)."""
    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        _open_read_merge(path, out)
        result = ("ok", "")
    except ModelStockError as e:
        text = str(e)
        result = ("error", text) if "\n" not in text else ("crash", f"multi-line: {text!r}")
    except BaseException as e:  # noqa: BLE001 - that is what we are looking for
        if isinstance(e, KeyboardInterrupt):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        result = ("crash", f"{type(e).__name__}: {first}"[:300])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if marker is not None and marker.exists():
        marker.unlink()
        result = ("crash", "the pickle ran code")
    return result


def check(path: Path, out: Path, marker: Path | None = None) -> str | None:
    """None if ``path`` opens and merges or fails cleanly; else what crashed."""
    status, detail = classify(path, out, marker)
    return detail if status == "crash" else None


def _open_read_merge(path: Path, out: Path) -> None:
    reader = open_checkpoint(path)
    try:
        raw = path.read_bytes() if isinstance(reader, SafetensorsReader) else None
        total = 0
        for name, info in reader.infos.items():
            t = reader.read(name)
            assert t.numel() == info.numel and t.dtype == info.dtype, name
            t.view(info.shape)  # the declared shape is one torch can hold
            total += info.numel
            if raw is not None:  # no read outside the file, and exactly the declared bytes
                got = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
                assert got == raw[info.offset : info.offset + info.nbytes], name
    finally:
        reader.close()
    if total <= 100_000:
        merge_state_dicts(path, [path, path])
        if path.stat().st_size % 2:  # one .safetensors file
            merge_checkpoints(path, [path, path], out.with_suffix(".safetensors"), force=True)
        else:  # a directory: tiny shards, an index, the report and the model card
            merge_checkpoints(path, [path, path], out.with_suffix(""), force=True,
                              shard_size=64)
