"""Streaming: chunked == unchunked, threads change nothing, and memory does not grow with size."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelstock import merge_checkpoints, merge_state_dicts
from modelstock.engine import chunk_ranges
from tests.conftest import SRC, make_finetunes

SHAPES = {"emb": (1000, 37), "w": (64, 64), "b": (64,), "scalar": ()}


def max_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of the dtype's spacing at the larger operand."""
    a64, b64 = a.double(), b.double()
    spacing = torch.finfo(a.dtype).eps * torch.maximum(a64.abs(), b64.abs()).clamp_min(
        torch.finfo(a.dtype).tiny)
    return float(((a64 - b64).abs() / spacing).max())


@pytest.mark.parametrize("granularity", ["tensor", "row", "model"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [2, 3])
def test_chunked_equals_unchunked(granularity: str, dtype: torch.dtype, n: int) -> None:
    sds = make_finetunes(SHAPES, n=n, dtype=dtype)
    whole, rep_whole = merge_state_dicts(sds[0], sds[1:], granularity=granularity)
    for chunk in (1000, 4097, 37 * 3):
        chunked, rep = merge_state_dicts(sds[0], sds[1:], granularity=granularity,
                                         chunk_numel=chunk)
        for k in whole:
            assert max_ulps(whole[k], chunked[k]) <= 1.0, (k, chunk)
        for a, b in zip(rep_whole.layers, rep.layers, strict=True):
            assert a.t == pytest.approx(b.t, rel=1e-12, abs=1e-15)


def test_threads_do_not_change_the_result() -> None:
    sds = make_finetunes({"big": (3000, 700), "b": (700,)}, n=2, dtype=torch.bfloat16)
    one, _ = merge_state_dicts(sds[0], sds[1:], threads=1)
    many, _ = merge_state_dicts(sds[0], sds[1:], threads=4)
    assert all(torch.equal(one[k], many[k]) for k in one)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_pipelined_output_on_disk_equals_one_thread(tmp_path: Path, monkeypatch,
                                                    dtype: torch.dtype) -> None:
    """Many output pieces per layer from the reused ring, a slow writer holding its share, layers
    that fit a chunk (output deferred behind the next Gram pass) mixed with ones that do not."""
    from modelstock import engine, output

    sds = make_finetunes({"a": (90, 40), "small": (7,), "b": (300, 40), "c": (40, 90),
                          "d": (5, 5)}, n=3, dtype=dtype)
    for i, sd in enumerate(sds):
        save_file(sd, tmp_path / f"m{i}.safetensors")
    paths = [tmp_path / f"m{i}.safetensors" for i in range(4)]
    monkeypatch.setattr(engine, "OUT_BYTES", 256)
    monkeypatch.setattr(engine, "PIECE_NUMEL", 100)
    expected, _ = merge_state_dicts(sds[0], sds[1:], threads=1, chunk_numel=4000)
    write_now = output.SafetensorsSink._write_now

    def slow(self, name, chunk):
        time.sleep(0.002)
        write_now(self, name, chunk)

    monkeypatch.setattr(output.SafetensorsSink, "_write_now", slow)
    merge_checkpoints(paths[0], paths[1:], tmp_path / "out", chunk_numel=4000, threads=4)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_chunk_ranges_cover_and_align() -> None:
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_ranges(0, 4) == [(0, 0)]
    assert chunk_ranges(12, 5, row_numel=3) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert chunk_ranges(12, 2, row_numel=3) == [(0, 3), (3, 6), (6, 9), (9, 12)]


def test_on_disk_chunked_equals_in_memory(tmp_path: Path) -> None:
    sds = make_finetunes(SHAPES, n=2, dtype=torch.bfloat16)
    for i, sd in enumerate(sds):
        save_file(sd, tmp_path / f"m{i}.safetensors")
    paths = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    merge_checkpoints(paths[0], paths[1:], tmp_path / "out", chunk_numel=777)
    expected, _ = merge_state_dicts(sds[0], sds[1:])
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert all(max_ulps(merged[k], expected[k]) <= 1.0 for k in expected)


PEAK_RSS = r"""
import runpy, sys
sys.argv = ["modelstock", *sys.argv[1:]]
try:
    runpy.run_module("modelstock", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert not e.code, e.code
with open("/proc/self/status") as f:
    print(next(int(l.split()[1]) for l in f if l.startswith("VmHWM")))
"""


def peak_rss_mib(tmp_path: Path, rows: int, chunk: int, threads: int = 2) -> float:
    """Peak RSS of ``modelstock merge`` in a fresh process on a (rows x 1024) float32 model."""
    d = tmp_path / f"r{rows}-t{threads}"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, 1024, generator=g)
    for i in range(3):
        w = base if i == 0 else base + 0.01 * torch.randn(rows, 1024, generator=g)
        save_file({"big": w, "small": w[:4].clone()}, d / f"m{i}.safetensors")
    del base, w
    args = ["merge", *(str(d / f"m{i}.safetensors") for i in range(3)), "-o", str(d / "out"),
            "-q", "--chunk-size", str(chunk), "--threads", str(threads)]
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *args],
                          env=dict(os.environ, PYTHONPATH=str(SRC)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1]) / 1024


def test_peak_memory_does_not_grow_with_model_size(tmp_path: Path) -> None:
    """A 4x larger model (each input 4x the chunk budget and more) costs no more memory: inputs
    are streamed chunk by chunk and their pages released, outputs written as they are made."""
    chunk = 1 << 20  # 4 MiB of float32 per input per chunk
    small = peak_rss_mib(tmp_path, rows=4096, chunk=chunk)  # 16 MiB per input, 4x the chunk
    large = peak_rss_mib(tmp_path, rows=16384, chunk=chunk)  # 64 MiB per input, 16x
    growth = large - small
    model_growth = 3 * (16384 - 4096) * 1024 * 4 / 2**20  # 144 MiB more input data
    print(f"peak RSS: {small:.0f} MiB (48 MiB of inputs), {large:.0f} MiB (192 MiB of inputs)")
    assert growth < 0.25 * model_growth, (small, large)
