"""The fused C loops (modelstock/_kernels.c) against a NumPy reference and the pure-torch path."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelstock import _blocks, kernels, merge_state_dicts, stock
from tests.conftest import SRC, make_finetunes

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="C loops not built (no C compiler at install time)")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def as_f32(t: torch.Tensor) -> np.ndarray:
    """Exact float32 values of a tensor: bfloat16 widened by bit shifting, float16 by NumPy."""
    if t.dtype == torch.float32:
        return t.numpy().copy()
    if t.dtype == torch.float16:
        return t.numpy().astype(np.float32)
    bits = t.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32)


def reference_stats(w0: torch.Tensor, ws: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray,
                                                                        np.ndarray]:
    """Float32 task vectors and their sum in model order; exactly rounded float64 dot
    products (math.fsum), with the sum of |products| that bounds their rounding error."""
    a = as_f32(w0)
    d = [as_f32(w) - a for w in ws]
    total = d[0].copy()
    for x in d[1:]:
        total += x
    n = len(d)
    g, mag = np.zeros((n, n)), np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            p = d[i].astype(np.float64) * d[j].astype(np.float64)  # exact
            g[i, j], mag[i, j] = math.fsum(p), math.fsum(np.abs(p))
    return total, g, mag


def weights(numel: int, n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, list]:
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(numel, generator=gen) * 0.05
    ws = [(w0 + torch.randn(numel, generator=gen) * 1e-2 + 3e-3).to(dtype) for _ in range(n)]
    return w0.to(dtype), ws


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(0, 3000), n=st.integers(1, 5), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_stats_match_an_exact_reference(numel: int, n: int, dtype: torch.dtype,
                                        seed: int) -> None:
    w0, ws = weights(numel, n, dtype, seed)
    total, g = torch.empty(numel), torch.zeros((n, n), dtype=torch.float64)
    assert kernels.stats(w0, ws, total, g)
    ref_total, ref_g, mag = reference_stats(w0, ws)
    assert np.array_equal(total.numpy(), ref_total)  # same float32 operations, same order
    # float64 accumulation: within a few ulps of float64 of the sum of |products|; a float32
    # product anywhere would be ~1e-8 off
    assert np.all(np.abs(g.numpy() - ref_g) <= 1e-13 * mag + 1e-300)
    assert torch.equal(g, g.T)


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(0, 3000), n=st.integers(1, 5), dtype=st.sampled_from(DTYPES),
       out_dtype=st.sampled_from(DTYPES), scale=st.floats(-2, 2), seed=st.integers(0, 2**31 - 1))
def test_combine_and_output_round_once_to_float32(numel: int, n: int, dtype: torch.dtype,
                                                  out_dtype: torch.dtype, scale: float,
                                                  seed: int) -> None:
    """out = w0 + scale * total, exact product and sum in float64, rounded to float32 and then
    by torch's own conversion to the output dtype; `output` equals `stats` + `combine`."""
    w0, ws = weights(numel, n, dtype, seed)
    total = torch.empty(numel)
    assert kernels.stats(w0, ws, total, None)
    s32 = float(np.float32(scale))
    r = (as_f32(w0).astype(np.float64) + s32 * total.numpy().astype(np.float64))
    expected = torch.from_numpy(r.astype(np.float32)).to(out_dtype)
    out, fused = torch.empty(numel, dtype=out_dtype), torch.empty(numel, dtype=out_dtype)
    assert kernels.combine(w0, total, scale, out)
    assert kernels.output(w0, ws, scale, fused)
    assert torch.equal(out, expected)
    assert torch.equal(fused, expected)


def test_bfloat16_rounding_of_special_values_matches_torch() -> None:
    """Halfway cases (to even, both signs), overflow to inf, subnormals, inf and NaN."""
    one = 1.0
    specials = [0.0, -0.0, 1.0, one + 2**-8, one + 3 * 2**-8, one + 2**-8 + 2**-20,
                -(one + 2**-8), -(one + 3 * 2**-8), 3.3895e38, -3.3895e38, 3.4028235e38,
                1e-40, -1e-40, 2**-133, 1e-45, float("inf"), float("-inf"), float("nan"),
                1 / 3, -2 / 3, 65504.0, 1e-8]
    w0 = torch.tensor(specials, dtype=torch.float32)
    zero = torch.zeros_like(w0)
    out = torch.empty(len(specials), dtype=torch.bfloat16)
    assert kernels.combine(w0, zero, 0.0, out)
    expected = (w0 + 0.0).to(torch.bfloat16)  # -0.0 + 0.0 is +0.0 in both
    nan = torch.isnan(expected)  # torch's own NaN bits differ between its vector and scalar loops
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(params=["f16c", "portable"])
def conversions(request):
    """float16 conversions with the F16C instructions (where the CPU has them) and without."""
    kernels._LIB.ms_use_f16c(request.param == "f16c")
    yield request.param
    kernels._LIB.ms_use_f16c(1)


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """All 65536 bit patterns of a 16-bit float dtype."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_widening_is_exact_for_every_16_bit_pattern(dtype: torch.dtype, conversions) -> None:
    """d = w - 0 for every value of the dtype: torch's widening, bit for bit (NaN as NaN)."""
    w = every_value(dtype)
    total = torch.empty(w.numel())
    assert kernels.stats(torch.zeros_like(w), [w], total, None)
    expected = w.float() - 0.0
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(total), nan)
    assert torch.equal(total[~nan].view(torch.int32), expected[~nan].view(torch.int32))


def halfway_cases(dtype: torch.dtype) -> torch.Tensor:
    """float32 values at and next to every rounding decision of ``dtype``: each finite value,
    the halfway point to the next one up, and the float32 neighbours of that point."""
    v = every_value(dtype)
    v = v[torch.isfinite(v)]
    up = torch.nextafter(v, torch.full_like(v, float("inf")))
    mid = ((v.double() + up.double()) / 2).float()  # exact: a few more bits than dtype
    inf, ninf = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    cases = [v.float(), mid, torch.nextafter(mid, inf), torch.nextafter(mid, ninf),
             torch.tensor([3.4028235e38, -3.4028235e38, 1e-45, -1e-45, 2.0**-25, 2.0**-26,
                           float("inf"), float("-inf"), float("nan")])]
    return torch.cat([c.float() for c in cases])


@pytest.mark.parametrize("dtype", HALF)
def test_narrowing_rounds_like_torch_at_every_halfway_point(dtype: torch.dtype,
                                                            conversions) -> None:
    """Round to nearest even at each of the dtype's ties, overflow to infinity, subnormals."""
    x = halfway_cases(dtype)
    out = torch.empty(x.numel(), dtype=dtype)
    assert kernels.combine(x, torch.zeros_like(x), 0.0, out)
    expected = (x + 0.0).to(dtype)  # -0.0 + 0.0 is +0.0 in both
    nan = torch.isnan(expected)  # torch's own NaN bits differ between its vector and scalar loops
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("granularity", ["tensor", "model"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [None, 777])
def test_merge_with_and_without_the_loops_agree(monkeypatch, granularity: str,
                                                dtype: torch.dtype, chunk: int | None) -> None:
    """Whole merges, including layers bigger than a chunk (the one-pass output), agree with
    the pure-torch path: ratios to 1e-12, weights to 1 ulp of the output dtype."""
    sds = make_finetunes({"emb": (300, 37), "w": (40, 40), "b": (40,)}, n=3, dtype=dtype)
    kw = {"granularity": granularity} | ({} if chunk is None else {"chunk_numel": chunk})
    fast, rep_fast = merge_state_dicts(sds[0], sds[1:], **kw)
    monkeypatch.setattr(kernels, "_LIB", None)
    slow, rep_slow = merge_state_dicts(sds[0], sds[1:], **kw)
    for a, b in zip(rep_fast.layers, rep_slow.layers, strict=True):
        assert a.t == pytest.approx(b.t, rel=1e-12, abs=1e-15)
    for k in slow:
        assert fast[k].dtype == slow[k].dtype
        diff = (fast[k].double() - slow[k].double()).abs()
        assert bool((diff <= torch.finfo(dtype).eps * slow[k].double().abs()).all()), k


def test_cases_the_loops_do_not_take_fall_back_to_torch() -> None:
    w0, ws = weights(100, 2, torch.float32, 0)
    g = torch.zeros((2, 2), dtype=torch.float64)
    assert not kernels.stats(w0.double(), [w.double() for w in ws], None, g)  # float64
    assert not kernels.stats(w0, [ws[0], ws[1].bfloat16()], None, g)  # mixed dtypes
    assert not kernels.stats(w0[::2], [w[::2] for w in ws], None, g)  # not contiguous
    assert not kernels.stats(w0, ws * 9, None, torch.zeros((18, 18), dtype=torch.float64))
    assert not kernels.stats(w0, ws, torch.empty(100, dtype=torch.float64), None)
    assert not kernels.combine(w0, torch.empty(100), 0.5, torch.empty(100, dtype=torch.double))
    assert not kernels.output(w0, ws, 0.5, torch.empty(99))
    assert torch.equal(g, torch.zeros((2, 2), dtype=torch.float64))  # nothing written
    # ... and stock.py then takes its torch path to the same figures
    mixed = [ws[0], ws[1].bfloat16()]
    ref = stock.gram(stock.task_vectors(w0, mixed))
    assert torch.allclose(_blocks.chunk_stats(w0, mixed, torch.float32), ref, rtol=1e-12)


def test_environment_switch_turns_the_loops_off() -> None:
    code = "import modelstock.kernels as k; print(k.available())"
    env = dict(os.environ, PYTHONPATH=str(SRC), MODELSTOCK_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_the_library_is_an_importable_module_of_the_expected_version() -> None:
    import modelstock._kernels as built  # what a module scan (docs, coverage) would do

    assert "ctypes" in built.__doc__
    assert kernels._LIB.ms_version() == kernels.VERSION


@pytest.mark.parametrize("version", [None, kernels.VERSION + 1])
def test_a_build_of_another_version_is_left_unused(monkeypatch, version: int | None) -> None:
    """A library built from an older _kernels.c (source edited, no reinstall) must not be
    called with this module's arguments."""
    class OldBuild:
        if version is not None:
            def ms_version(self) -> int:
                return version

    monkeypatch.setattr(kernels.ctypes, "CDLL", lambda path: OldBuild())
    assert kernels._load() is None
