"""Valid and hostile checkpoints, shared by the reliability, interruption and fuzz tests.

Every hostile builder writes one broken input under a directory and returns its path; the tests
check that opening or merging it gives one clean `ModelStockError` naming that path.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def cli_env() -> dict[str, str]:
    """Environment for ``python -m modelstock`` in a subprocess: this worktree's code first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def tiny_state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A small model: two weight matrices, a bias, a LayerNorm and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8, generator=g) * scale,
        "layer.weight": torch.randn(8, 8, generator=g) * scale,
        "layer.bias": torch.randn(8, generator=g) * scale,
        "norm.weight": 1 + 0.1 * torch.randn(8, generator=g) * scale,
        "position_ids": torch.arange(16).unsqueeze(0),
    }


def family(seed: int = 0, n: int = 2) -> tuple[dict, list[dict]]:
    """An anchor and ``n`` fine-tunes of it (anchor plus small random task vectors)."""
    anchor = tiny_state(seed)
    tunes = []
    for i in range(n):
        noise = tiny_state(seed + 100 + i, scale=0.05)
        tunes.append({k: v + noise[k] if v.is_floating_point() else v.clone()
                      for k, v in anchor.items()})
    return anchor, tunes


def save_dir(state: dict[str, torch.Tensor], directory: Path) -> Path:
    """A Hugging Face-style model directory with one ``model.safetensors`` and a config."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    (directory / "config.json").write_text('{"model_type": "tiny"}\n')
    return directory


def valid_models(root: Path) -> tuple[Path, Path, Path]:
    """Anchor and two fine-tune directories under ``root``."""
    anchor, (t1, t2) = family()
    return (save_dir(anchor, root / "anchor"), save_dir(t1, root / "ft1"),
            save_dir(t2, root / "ft2"))


# -- raw safetensors bytes -------------------------------------------------------------------

def st_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file from a header (dict, or raw bytes) and data; ``length`` overrides
    the 8-byte header length."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def valid_st_bytes() -> bytes:
    """Two float32 tensors, 16 and 8 bytes."""
    return st_bytes({"a": entry("F32", [2, 2], 0, 16), "b": entry("F32", [2], 16, 24)},
                    bytes(range(24)))


# -- hostile builders: each writes a broken input in ``d`` and returns its path ---------------

def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def truncated_safetensors(d: Path) -> Path:
    good = valid_st_bytes()
    return _write(d / "model.safetensors", good[:-5])


def truncated_in_header(d: Path) -> Path:
    good = valid_st_bytes()
    return _write(d / "model.safetensors", good[:20])


def header_length_past_file(d: Path) -> Path:
    good = valid_st_bytes()
    return _write(d / "model.safetensors", struct.pack("<Q", len(good)) + good[8:])


def header_length_huge(d: Path) -> Path:
    return _write(d / "model.safetensors", struct.pack("<Q", 2**63 + 5) + valid_st_bytes()[8:])


def malformed_json(d: Path) -> Path:
    header = b'{"a": {"dtype": "F32", "shape": [2'
    return _write(d / "model.safetensors", st_bytes(header, b"\0" * 8))


def header_not_object(d: Path) -> Path:
    return _write(d / "model.safetensors", st_bytes(b"[1, 2, 3]"))


def header_not_utf8(d: Path) -> Path:
    return _write(d / "model.safetensors", st_bytes(b'{"\xff\xfe": 1}'))


def overlapping_offsets(d: Path) -> Path:
    return _write(d / "model.safetensors",
                  st_bytes({"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 8, 24)},
                           bytes(24)))


def offsets_past_end(d: Path) -> Path:
    return _write(d / "model.safetensors",
                  st_bytes({"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 16, 32)},
                           bytes(24)))


def offsets_disagree_with_shape(d: Path) -> Path:
    return _write(d / "model.safetensors",
                  st_bytes({"a": entry("F32", [2, 2], 0, 12)}, bytes(12)))


def offsets_reversed(d: Path) -> Path:
    return _write(d / "model.safetensors",
                  st_bytes({"a": entry("F32", [0], 16, 8)}, bytes(16)))


def unknown_dtype(d: Path) -> Path:
    return _write(d / "model.safetensors", st_bytes({"a": entry("F128", [1], 0, 16)}, bytes(16)))


def duplicate_names(d: Path) -> Path:
    header = (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
              b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    return _write(d / "model.safetensors", st_bytes(header, bytes(8)))


def shape_overflows(d: Path) -> Path:
    """Zero elements, but a shape whose strides overflow int64."""
    return _write(d / "model.safetensors",
                  st_bytes({"a": entry("F32", [0, 2**62, 2**62], 0, 0)}))


def empty_safetensors(d: Path) -> Path:
    return _write(d / "model.safetensors", b"")


def empty_bin(d: Path) -> Path:
    return _write(d / "pytorch_model.bin", b"")


def garbage_bin(d: Path) -> Path:
    return _write(d / "pytorch_model.bin", b"\x80\x04this is not a pickle at all" * 3)


def not_a_state_dict(d: Path) -> Path:
    path = d / "model.pt"
    d.mkdir(parents=True, exist_ok=True)
    torch.save([1, 2, 3], path)
    return path


def truncated_zip_pt(d: Path) -> Path:
    buf = io.BytesIO()
    torch.save(tiny_state(0), buf)
    return _write(d / "model.pt", buf.getvalue()[: len(buf.getvalue()) // 2])


class _RunsCode:
    """Unpickling this runs ``open(marker, 'w')`` (a harmless stand-in for os.system)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def code_exec_pickle(d: Path) -> Path:
    """A legacy (non-zip) torch file whose loading would create ``d / "PWNED"``."""
    path = d / "pytorch_model.bin"
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2), "evil": _RunsCode(str(d / "PWNED"))}, path,
               _use_new_zipfile_serialization=False)
    return path


def code_exec_raw_pickle(d: Path) -> Path:
    """A plain pickle (no torch framing at all) whose loading would create ``d / "PWNED"``."""
    return _write(d / "pytorch_model.bin", pickle.dumps(_RunsCode(str(d / "PWNED")), protocol=2))


def code_exec_zip(d: Path) -> Path:
    """The same payload in torch's zip format (``torch.save``)."""
    path = d / "model.pt"
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2), "evil": _RunsCode(str(d / "PWNED"))}, path)
    return path


def _index(d: Path, weight_map: dict[str, str], shards: dict[str, dict] | None = None) -> Path:
    """An index and its shards: ``.safetensors`` files (and the safetensors index), or, where
    the shards are named ``*.bin``, ``torch.save`` files and ``pytorch_model.bin.index.json``."""
    d.mkdir(parents=True, exist_ok=True)
    for name, state in (shards or {}).items():
        if name.endswith(".bin"):
            torch.save(state, d / name)
        else:
            save_file(state, d / name)
    bins = shards and all(name.endswith(".bin") for name in shards)
    path = d / ("pytorch_model.bin.index.json" if bins else "model.safetensors.index.json")
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _outside(d: Path) -> Path:
    """A valid safetensors file next to (outside) the model directory ``d``."""
    d.parent.mkdir(parents=True, exist_ok=True)
    outside = d.parent / "outside.safetensors"
    save_file({"w": torch.zeros(2)}, outside)
    return outside


def index_absolute_path(d: Path) -> Path:
    outside = _outside(d)
    return _index(d, {"w": str(outside.resolve())})


def index_dotdot(d: Path) -> Path:
    _outside(d)
    return _index(d, {"w": "../outside.safetensors"})


def index_symlink_outside(d: Path) -> Path:
    outside = _outside(d)
    d.mkdir(parents=True, exist_ok=True)
    os.symlink(outside.resolve(), d / "shard.safetensors")
    return _index(d, {"w": "shard.safetensors"})


def index_missing_shard(d: Path) -> Path:
    return _index(d, {"w": "model-00001-of-00002.safetensors"})


def index_names_itself(d: Path) -> Path:
    return _index(d, {"w": "model.safetensors.index.json"})


def index_shard_lacks_tensor(d: Path) -> Path:
    return _index(d, {"w": "a.safetensors"}, {"a.safetensors": {"other": torch.zeros(2)}})


def index_tensor_in_two_shards(d: Path, fmt: str = "safetensors") -> Path:
    """``w`` is where the index places it (a) and also in another shard it names (b)."""
    return _index(d, {"w": f"a.{fmt}", "v": f"b.{fmt}"},
                  {f"a.{fmt}": {"w": torch.zeros(2)},
                   f"b.{fmt}": {"v": torch.zeros(2), "w": torch.ones(2)}})


def index_unlisted_tensor_in_two_shards(d: Path, fmt: str = "safetensors") -> Path:
    """``w`` is in both shards and the index names neither."""
    return _index(d, {"u": f"a.{fmt}", "v": f"b.{fmt}"},
                  {f"a.{fmt}": {"u": torch.zeros(2), "w": torch.zeros(2)},
                   f"b.{fmt}": {"v": torch.zeros(2), "w": torch.ones(2)}})


def index_malformed(d: Path) -> Path:
    return _write(d / "model.safetensors.index.json", b'{"weight_map": ["not", "a", "map"]}')


def index_null_byte(d: Path) -> Path:
    return _index(d, {"w": "a\0b.safetensors"})


def index_lone_surrogate(d: Path) -> Path:
    """JSON's "\\udd00" escape decodes to a string no file system can name."""
    return _index(d, {"w": "a\udd00.safetensors"})


def empty_index(d: Path) -> Path:
    return _write(d / "model.safetensors.index.json", b"")


def dir_without_weights(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text("{}")
    return d


def empty_dir(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def fifo(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / "weights.safetensors"
    os.mkfifo(path)
    return path


HOSTILE: dict[str, Callable[[Path], Path]] = {f.__name__: f for f in [
    truncated_safetensors, truncated_in_header, header_length_past_file, header_length_huge,
    malformed_json, header_not_object, header_not_utf8, overlapping_offsets, offsets_past_end,
    offsets_disagree_with_shape, offsets_reversed, unknown_dtype, duplicate_names,
    shape_overflows, empty_safetensors, empty_bin, garbage_bin, not_a_state_dict,
    truncated_zip_pt, code_exec_pickle, code_exec_raw_pickle, code_exec_zip, index_absolute_path,
    index_dotdot, index_symlink_outside, index_missing_shard, index_names_itself,
    index_shard_lacks_tensor, index_tensor_in_two_shards, index_unlisted_tensor_in_two_shards,
    index_malformed, index_null_byte, index_lone_surrogate,
    empty_index, dir_without_weights, empty_dir, fifo,
]}
# Builders whose payload would run code (creating ``d / "PWNED"``) if it were unpickled.
CODE_EXEC = {"code_exec_pickle", "code_exec_raw_pickle", "code_exec_zip"}
