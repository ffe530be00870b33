"""The Model Stock math against closed forms and an independent float64 NumPy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from modelstock import _blocks, merge_state_dicts, model_stock, stock
from modelstock.stock import stock_ratio


def numpy_model_stock(w0: np.ndarray, ws: list[np.ndarray], clamp: bool = True) -> np.ndarray:
    """Reference written from the paper's formula, in float64, sharing no code with the library."""
    w0 = np.asarray(w0, dtype=np.float64).ravel()
    ds = [np.asarray(w, dtype=np.float64).ravel() - w0 for w in ws]
    n = len(ds)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            ni, nj = np.linalg.norm(ds[i]), np.linalg.norm(ds[j])
            cosines.append(0.0 if ni == 0 or nj == 0 else float(ds[i] @ ds[j]) / (ni * nj))
    c = float(np.mean(cosines))
    den = 1 + (n - 1) * c
    t = 0.0 if den == 0 else n * c / den
    if clamp:
        t = min(max(t, 0.0), 1.0)
    return w0 + t * (np.mean([w0 + d for d in ds], axis=0) - w0)


def vectors_with_cos(n: int, cos: float, dim: int, norms=None, seed: int = 0) -> torch.Tensor:
    """``n`` vectors in R^dim whose pairwise cosines all equal ``cos`` (via a Gram factor)."""
    g = (1 - cos) * np.eye(n) + cos * np.ones((n, n))
    basis = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, n)))[0].T
    lam, q = np.linalg.eigh(g)  # g = F F^T with F = Q sqrt(L); works for singular g (cos = 1)
    v = (q * np.sqrt(np.clip(lam, 0, None))) @ basis
    if norms is not None:
        v = v * np.asarray(norms)[:, None]
    return torch.tensor(v, dtype=torch.float64)


def merge_one(w0: torch.Tensor, ws: list[torch.Tensor], **kw) -> tuple[torch.Tensor, dict]:
    out, report = merge_state_dicts({"w": w0}, [{"w": w} for w in ws], **kw)
    return out["w"], report.layers[0]


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("degrees", [0.0, 30.0, 60.0, 89.0, 90.0])
def test_closed_form_equal_angles(n: int, degrees: float) -> None:
    cos = math.cos(math.radians(degrees))
    w0 = torch.randn(64, dtype=torch.float64)
    d = vectors_with_cos(n, cos, 64, norms=np.linspace(1, 2, n))
    ws = [w0 + d[i] for i in range(n)]
    out, layer = merge_one(w0, ws)
    expected_t = max(0.0, n * cos / (1 + (n - 1) * cos))
    assert layer.cos == pytest.approx(cos, abs=1e-12)
    assert layer.angle_deg == pytest.approx(degrees, abs=1e-5)
    assert layer.t == pytest.approx(expected_t, abs=1e-12)
    expected = w0 + expected_t * d.mean(0)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_sixty_degrees_two_models_gives_two_thirds() -> None:
    assert float(stock_ratio(0.5, 2)) == pytest.approx(2 / 3)
    w0 = torch.zeros(2, dtype=torch.float64)
    w1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    w2 = torch.tensor([0.5, math.sqrt(3) / 2], dtype=torch.float64)
    out, layer = merge_one(w0, [w1, w2])
    assert layer.angle_deg == pytest.approx(60.0)
    torch.testing.assert_close(out, (2 / 3) * (w1 + w2) / 2, rtol=0, atol=1e-15)


def test_orthogonal_returns_anchor_parallel_returns_average() -> None:
    w0 = torch.tensor([1.0, 2.0, 3.0])
    out, layer = merge_one(w0, [w0 + torch.tensor([1.0, 0, 0]), w0 + torch.tensor([0, 2.0, 0])])
    assert layer.t == 0.0 and torch.equal(out, w0)
    w1, w2 = w0 + torch.tensor([1.0, 1, 1]), w0 + torch.tensor([3.0, 3, 3])
    out, layer = merge_one(w0, [w1, w2])
    assert layer.t == pytest.approx(1.0)
    torch.testing.assert_close(out, (w1 + w2) / 2)


def test_mean_of_cosines_not_of_angles() -> None:
    # Pairwise angles 0, 90, 90 degrees: mean cos = 1/3; the mean angle (60) would give cos 1/2.
    w0 = torch.zeros(2, dtype=torch.float64)
    ws = [torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])]
    _, layer = merge_one(w0, [w.double() for w in ws])
    assert layer.cos == pytest.approx(1 / 3)
    assert layer.t == pytest.approx(3 * (1 / 3) / (1 + 2 / 3))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ratio_never_infinite_or_nan(n: int) -> None:
    cos = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    pole = torch.tensor([-1 / (n - 1)], dtype=torch.float64)
    for clamp in (True, False):
        t = stock_ratio(torch.cat([cos, pole, pole + 1e-12, pole - 1e-12]), n, clamp)
        assert torch.isfinite(t).all()
        if clamp:
            assert (t >= 0).all() and (t <= 1).all()
    assert float(stock_ratio(-0.5, 2, clamp=False)) == pytest.approx(-2.0)
    assert float(stock_ratio(-1.0, 2, clamp=False)) == 0.0  # the pole


def test_no_clamp_keeps_raw_formula_for_negative_cos() -> None:
    w0 = torch.zeros(2, dtype=torch.float64)
    w1, w2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-0.5, 0.8],
                                                                         dtype=torch.float64)
    cos = float(w1 @ w2 / (w1.norm() * w2.norm()))
    out, layer = merge_one(w0, [w1, w2], clamp=False)
    assert layer.t == pytest.approx(2 * cos / (1 + cos))
    torch.testing.assert_close(out, layer.t * (w1 + w2) / 2)
    out, layer = merge_one(w0, [w1, w2])
    assert layer.t == 0.0 and torch.equal(out, w0)


def test_zero_task_vectors() -> None:
    w0 = torch.randn(10)
    out, layer = merge_one(w0, [w0.clone(), w0.clone()])
    assert torch.equal(out, w0) and layer.t == 0.0 and "zero" in layer.note
    w2 = w0 + 1.0
    out, layer = merge_one(w0, [w0.clone(), w2])  # one zero vector: its pair contributes cos 0
    assert layer.cos == 0.0 and torch.equal(out, w0)


def test_singular_no_clamp_falls_back_to_anchor() -> None:
    w0 = torch.zeros(3, dtype=torch.float64)
    d = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    out, layer = merge_one(w0, [w0 + d, w0 - d], clamp=False)
    assert layer.cos == pytest.approx(-1.0) and layer.t == 0.0 and "pole" in layer.note
    assert torch.equal(out, w0)


finite = st.floats(-10, 10, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 5), dim=st.integers(1, 40), data=st.data(),
       clamp=st.booleans())
def test_agrees_with_numpy_reference(n: int, dim: int, data, clamp: bool) -> None:
    w0 = np.array(data.draw(st.lists(finite, min_size=dim, max_size=dim)), dtype=np.float32)
    ws = [w0 + np.array(data.draw(st.lists(finite, min_size=dim, max_size=dim)),
                        dtype=np.float32) for _ in range(n)]
    expected = numpy_model_stock(w0, ws, clamp)
    ds = [w.astype(np.float64) - w0 for w in ws]
    norms = [np.linalg.norm(d) for d in ds]
    cos = np.mean([0.0 if norms[i] * norms[j] == 0 else ds[i] @ ds[j] / (norms[i] * norms[j])
                   for i in range(n) for j in range(i + 1, n)])
    # Near the pole 1 + (N-1) cos = 0 the raw formula is ill-conditioned (t -> inf): a float32
    # rounding of cos moves t arbitrarily; that region is covered by test_singular_*.
    assume(clamp or abs(1 + (n - 1) * cos) > 1e-2)
    out, _ = merge_one(torch.from_numpy(w0), [torch.from_numpy(w) for w in ws], clamp=clamp)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(out.numpy().astype(np.float64), expected, rtol=1e-5,
                               atol=1e-5 * scale)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 5), data=st.data())
def test_invariant_to_model_order(seed: int, n: int, data) -> None:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(33, generator=g)
    ws = [w0 + 0.1 * torch.randn(33, generator=g) + 0.05 for _ in range(n)]
    perm = data.draw(st.permutations(range(n)))
    a, ra = merge_one(w0, ws)
    b, rb = merge_one(w0, [ws[i] for i in perm])
    assert ra.t == pytest.approx(rb.t, abs=1e-12)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(5))
def test_identical_finetunes_return_them(dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(1000, generator=g).to(dtype)
    w = (w0.float() + 0.01 * torch.randn(1000, generator=g)).to(dtype)
    out, layer = merge_one(w0, [w.clone(), w.clone(), w.clone()])
    assert layer.t == pytest.approx(1.0)
    if dtype == torch.float32:  # w0 + (3d)/3 rounds in float32: a few ulp of the operands
        bound = 4 * torch.finfo(dtype).eps * torch.maximum(w0.abs(), w.abs())
        assert ((out - w).abs() <= bound).all()
    else:  # task vectors of 16-bit weights are exact in float32, and so is the result
        assert torch.equal(out, w)


def test_model_stock_helper_matches_engine() -> None:
    w0 = torch.randn(5, 7)
    ws = [w0 + 0.1 * torch.randn(5, 7) for _ in range(3)]
    direct = model_stock(w0, ws)
    engine, _ = merge_one(w0, ws)
    assert torch.equal(direct, engine)


def test_gram_is_float64() -> None:
    # 2^24 elements: a float32 running sum drifts by ~1e-4 relative; float64 products and sums
    # of float32 task vectors agree with an exact float64 computation to summation error (~1e-12).
    d = torch.rand((2, 1 << 24), generator=torch.Generator().manual_seed(0)) + 0.5
    g = stock.gram(d)
    exact = d.double() @ d.double().T
    assert g.dtype == torch.float64
    assert float(((g - exact).abs() / exact.abs()).max()) < 1e-11
    naive = (d @ d.T).double()
    assert float(((naive - exact).abs() / exact.abs()).max()) > 1e-9  # the test can fail


def test_chunk_stats_equals_unblocked_math() -> None:
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(300_001, generator=g).bfloat16()
    ws = [(w0.float() + 0.01 * torch.randn(300_001, generator=g)).bfloat16() for _ in range(3)]
    total = torch.empty(300_001)
    blocked = _blocks.chunk_stats(w0, ws, torch.float32, total=total)
    d = stock.task_vectors(w0, ws)
    torch.testing.assert_close(blocked, stock.gram(d), rtol=1e-13, atol=0)
    assert torch.equal(total, _blocks.sum_models(d))


@pytest.mark.parametrize("n", [2, 3])
def test_row_granularity_matches_per_row_reference(n: int) -> None:
    w0 = torch.randn(6, 9, dtype=torch.float64)
    ws = [w0 + torch.randn(6, 9, dtype=torch.float64) * 0.1 + 0.02 for _ in range(n)]
    out, layer = merge_one(w0, ws, granularity="row")
    expected = np.stack([numpy_model_stock(w0[r].numpy(), [w[r].numpy() for w in ws])
                         for r in range(6)])
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    assert layer.t_min <= layer.t <= layer.t_max


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16,
                                   torch.float32])
def test_all_finite_covers_float8(dtype: torch.dtype) -> None:
    """torch.isfinite raises on float8; the shared check must answer for every float dtype."""
    ok = torch.tensor([0.5, -1.0, 2.0]).to(dtype)
    assert _blocks.all_finite(ok)
    bad = torch.tensor([0.5, float("nan"), 2.0]).to(dtype)
    assert not _blocks.all_finite(bad)


def test_block_step_holds_whole_rows() -> None:
    assert _blocks.block_step(None) == _blocks.BLOCK_NUMEL
    assert _blocks.block_step(1000) % 1000 == 0 and _blocks.block_step(1000) <= _blocks.BLOCK_NUMEL
    big = _blocks.BLOCK_NUMEL * 3
    assert _blocks.block_step(big) == big  # at least one row


def test_all_finite_sees_nan_in_complex_and_empty_is_finite() -> None:
    z = torch.tensor([1 + 1j, complex(float("nan"), 0.0)], dtype=torch.complex64)
    assert not _blocks.all_finite(z)
    assert _blocks.all_finite(z[:1]) and _blocks.all_finite(torch.empty(0))
