"""Numerically odd but valid inputs (issue 8, item 2), handled as README's "Odd inputs" says.

Zero-size tensors, scalars, non-contiguous in-memory layouts, mixed dtypes across models, float8
and NaN/Inf, each through the in-memory API and through files written and read back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from modelstock import ModelStockError, merge_checkpoints, merge_state_dicts, stock
from modelstock.cli import main
from tests.hostile_files import family, save_dir

FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                      "float8_e5m2fnuz") if hasattr(torch, n)]


def reference(w0: torch.Tensor, ws: list[torch.Tensor], out_dtype: torch.dtype | None = None,
              clamp: bool = True) -> torch.Tensor:
    """The paper's formula in float64 for one whole tensor (independent of chunking/layout)."""
    w0d = w0.double().reshape(-1)
    d = torch.stack([w.double().reshape(-1) - w0d for w in ws])
    n = len(ws)
    norms = d.norm(dim=1)
    cos = [float(d[i] @ d[j] / (norms[i] * norms[j])) if norms[i] > 0 and norms[j] > 0 else 0.0
           for i in range(n) for j in range(i + 1, n)]
    c = sum(cos) / len(cos)
    t = n * c / (1 + (n - 1) * c)
    if clamp:
        t = min(max(t, 0.0), 1.0)
    out = w0d + t * d.mean(0)
    return out.reshape(w0.shape).to(out_dtype or w0.dtype)


def roundtrip(anchor, models, tmp_path: Path, **kw) -> tuple[dict, dict]:
    """Merge in memory and through a file; return both state dicts."""
    mem, _ = merge_state_dicts(anchor, models, **kw)
    out = tmp_path / "merged.safetensors"
    merge_checkpoints(anchor, models, out, force=True, **kw)
    return mem, load_file(out)


# -- zero-size tensors and scalars ---------------------------------------------------------

@pytest.mark.parametrize("granularity", ["tensor", "row", "model"])
def test_zero_size_and_scalars(granularity: str, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    anchor = {"empty1": torch.empty(0), "empty2": torch.empty(3, 0), "empty3": torch.empty(0, 4),
              "empty_int": torch.empty(0, dtype=torch.int64), "scalar": torch.tensor(1.5),
              "w": torch.randn(4, 4, generator=g)}
    models = [{k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
               for k, v in anchor.items()} for _ in range(3)]
    mem, disk = roundtrip(anchor, models, tmp_path, granularity=granularity, chunk_numel=5)
    for out in (mem, disk):
        assert set(out) == set(anchor)
        for k in ("empty1", "empty2", "empty3", "empty_int"):
            assert out[k].shape == anchor[k].shape and out[k].dtype == anchor[k].dtype
        assert out["scalar"].shape == ()
        assert torch.equal(mem["scalar"], disk["scalar"])
        assert torch.equal(mem["w"], disk["w"])
    if granularity == "tensor":  # a scalar's task vectors are collinear: cos = +-1
        expected = reference(anchor["scalar"], [m["scalar"] for m in models])
        torch.testing.assert_close(mem["scalar"], expected)


def test_zero_size_report_says_anchor(tmp_path: Path) -> None:
    _, report = merge_state_dicts({"e": torch.empty(0, 3)}, [{"e": torch.empty(0, 3)}] * 2)
    (layer,) = report.layers
    assert layer.t == 0.0 and "zero" in layer.note


# -- non-contiguous in-memory tensors --------------------------------------------------------

def _layouts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values of a [6, 8] tensor in several non-contiguous layouts."""
    return {
        "transposed": t.T.contiguous().T,                    # column-major
        "strided": t.repeat_interleave(2, dim=1)[:, ::2],  # every other column of a wider one
        "expanded_row": t[:1].expand(6, 8),                  # stride 0 (values differ from t)
        "channels_last": t.reshape(1, 2, 3, 8).contiguous(memory_format=torch.channels_last),
        "narrowed": torch.cat([t, t], dim=0)[3:9],
    }


def test_non_contiguous_layouts_merge_like_contiguous(tmp_path: Path) -> None:
    anchor, models = {}, [{}, {}, {}]
    for k, (name, _) in enumerate(_layouts(torch.zeros(6, 8)).items()):
        g = torch.Generator().manual_seed(k)
        base = torch.randn(6, 8, generator=g)
        anchor[name] = _layouts(base)[name]
        for m in models:
            m[name] = _layouts(base + 0.1 * torch.randn(6, 8, generator=g))[name]
    assert not any(v.is_contiguous() for k, v in anchor.items() if k != "narrowed")
    contiguous = [{k: v.contiguous() for k, v in s.items()} for s in [anchor, *models]]
    expected, _ = merge_state_dicts(contiguous[0], contiguous[1:])
    for chunk in (7, 1 << 20):  # chunks that cut rows, and whole tensors
        mem, disk = roundtrip(anchor, models, tmp_path, chunk_numel=chunk)
        for k, v in expected.items():
            assert torch.equal(mem[k], v), k
            assert torch.equal(disk[k], v), k
            assert torch.equal(v, reference(contiguous[0][k], [c[k] for c in contiguous[1:]]))


# -- mixed dtypes across models --------------------------------------------------------------

def test_mixed_float_dtypes_compute_in_float32(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(32, generator=g)
    ws = [w0 + 0.1 * torch.randn(32, generator=g) for _ in range(3)]
    anchor = {"w": w0}
    models = [{"w": ws[0].bfloat16()}, {"w": ws[1].half()}, {"w": ws[2]}]
    mem, disk = roundtrip(anchor, models, tmp_path)
    upcast, _ = merge_state_dicts(anchor, [{"w": m["w"].float()} for m in models])
    assert mem["w"].dtype == disk["w"].dtype == torch.float32  # the anchor's dtype
    assert torch.equal(mem["w"], upcast["w"]) and torch.equal(disk["w"], upcast["w"])


def test_float64_anyone_means_float64_compute() -> None:
    w0 = torch.randn(16, dtype=torch.float64)
    ws = [(w0 + 1e-9 * torch.randn(16, dtype=torch.float64)) for _ in range(2)]
    out, _ = merge_state_dicts({"w": w0}, [{"w": ws[0]}, {"w": ws[1].float()}])
    assert out["w"].dtype == torch.float64
    torch.testing.assert_close(out["w"], reference(w0, [ws[0], ws[1].float()]), rtol=0,
                               atol=1e-15)


def test_integer_widths_follow_the_anchor(tmp_path: Path) -> None:
    anchor = {"ids": torch.arange(5, dtype=torch.int64), "w": torch.randn(5)}
    models = [{"ids": torch.arange(5, dtype=torch.int32), "w": torch.randn(5)},
              {"ids": torch.arange(5, dtype=torch.int16), "w": torch.randn(5)}]
    mem, disk = roundtrip(anchor, models, tmp_path)
    for out in (mem, disk):
        assert out["ids"].dtype == torch.int64 and torch.equal(out["ids"], anchor["ids"])


def test_integer_that_does_not_fit_the_anchor_is_an_error() -> None:
    anchor = {"ids": torch.zeros(2, dtype=torch.int16)}
    models = [{"ids": torch.tensor([1, 70000], dtype=torch.int32)}] * 2
    with pytest.raises(ModelStockError, match="ids.*do not fit"):
        merge_state_dicts(anchor, models)


def test_float_vs_integer_is_an_error_naming_file_and_tensor(tmp_path: Path) -> None:
    anchor, (t1, t2) = family()
    t2 = dict(t2, **{"layer.bias": t2["layer.bias"].long()})
    dirs = [save_dir(s, tmp_path / n) for s, n in [(anchor, "a"), (t1, "b"), (t2, "c")]]
    with pytest.raises(ModelStockError) as info:
        merge_checkpoints(dirs[0], dirs[1:], tmp_path / "out")
    assert str(dirs[2] / "model.safetensors") in str(info.value)
    assert "layer.bias" in str(info.value)
    assert not (tmp_path / "out").exists()


# -- float8 ----------------------------------------------------------------------------------

@pytest.mark.skipif(not FLOAT8, reason="this torch has no float8 dtypes")
@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_merges_in_float32_and_is_stored_as_float8(dtype, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(64, generator=g)
    ws = [w0 + 0.3 * torch.randn(64, generator=g) for _ in range(2)]
    anchor, models = {"w": w0.to(dtype)}, [{"w": w.to(dtype)} for w in ws]
    mem, disk = roundtrip(anchor, models, tmp_path)
    assert mem["w"].dtype == disk["w"].dtype == dtype
    # The math runs in float32 on the float8 values; one rounding to float8 at the very end.
    f32, _ = merge_state_dicts({"w": anchor["w"].float()}, [{"w": m["w"].float()} for m in models])
    expected = f32["w"].to(dtype)
    assert torch.equal(mem["w"].view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(disk["w"].view(torch.uint8), expected.view(torch.uint8))


# -- NaN and Inf -----------------------------------------------------------------------------

def _with(state: dict, name: str, index: tuple, value: float) -> dict:
    state = dict(state)
    state[name] = state[name].clone()
    state[name][index] = value
    return state


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_nonfinite_input_is_an_error_naming_file_and_tensor(value: float, where: int,
                                                            tmp_path: Path) -> None:
    anchor, tunes = family()
    states = [anchor, *tunes]
    states[where] = _with(states[where], "layer.weight", (2, 5), value)
    dirs = [save_dir(s, tmp_path / f"m{i}") for i, s in enumerate(states)]
    with pytest.raises(ModelStockError, match="NaN or Inf.*--allow-nonfinite") as info:
        merge_checkpoints(dirs[0], dirs[1:], tmp_path / "out")
    assert str(dirs[where] / "model.safetensors") in str(info.value)
    assert "layer.weight" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1", "m2"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 1])
def test_allow_nonfinite_leaves_them_out_of_the_angle(value: float, where: int) -> None:
    """Documented: non-finite elements count as zero in the task-vector statistics; in the
    output they stay non-finite at their positions; every other element merges normally."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(6, 8, generator=g)
    ws = [w0 + 0.1 * torch.randn(6, 8, generator=g) for _ in range(2)]
    states = [w0, *ws]
    bad = states[where].clone()
    bad[2, 5] = value
    states[where] = bad
    out, report = merge_state_dicts({"w": states[0]}, [{"w": w} for w in states[1:]],
                                    allow_nonfinite=True)
    finite_mask = torch.stack([torch.isfinite(s) for s in states]).all(0)
    # t from task vectors with the bad element zeroed (w0 and w_i both finite elsewhere)
    d = torch.stack([torch.nan_to_num(w.double() - states[0].double(), nan=0.0, posinf=0.0,
                                      neginf=0.0).reshape(-1) for w in states[1:]])
    t = float(stock.stock_ratio(stock.mean_pairwise_cos(d @ d.T), 2))
    assert report.layers[0].t == pytest.approx(t, abs=1e-12)
    expected = states[0].double() + t * (torch.stack(states[1:]).double().mean(0)
                                         - states[0].double())
    torch.testing.assert_close(out["w"][finite_mask], expected[finite_mask].float())
    assert not torch.isfinite(out["w"][~finite_mask]).any()


def test_allow_nonfinite_in_averaged_tensor() -> None:
    anchor = {"bn.running_var": torch.ones(4)}
    models = [{"bn.running_var": torch.tensor([1.0, float("inf"), 2.0, 3.0])},
              {"bn.running_var": torch.ones(4)}]
    with pytest.raises(ModelStockError, match="running_var"):
        merge_state_dicts(anchor, models, buffers="average")
    out, _ = merge_state_dicts(anchor, models, allow_nonfinite=True, buffers="average")
    assert torch.equal(out["bn.running_var"], torch.tensor([1.0, float("inf"), 1.5, 2.0]))


def test_overflow_of_the_output_dtype_is_an_error() -> None:
    """Finite inputs whose unclamped extrapolation leaves float16's range."""
    w0 = torch.full((4,), 60000.0, dtype=torch.float16)
    d = torch.tensor([1.0, 0.0, 0.0, 0.0])
    ws = [w0, (w0.float() + 5000 * d).half(), (w0.float() - 400 * d).half()]
    models = [{"w": w} for w in ws[1:]]
    with pytest.raises(ModelStockError, match="overflow"):
        merge_state_dicts({"w": w0}, models, method="wise-ft", alpha=50.0)


def test_cli_allow_nonfinite(tmp_path: Path) -> None:
    anchor, (t1, t2) = family()
    t2 = _with(t2, "layer.weight", (0, 0), float("nan"))
    dirs = [str(save_dir(s, tmp_path / n)) for s, n in [(anchor, "a"), (t1, "b"), (t2, "c")]]
    result = CliRunner().invoke(main, ["merge", *dirs, "-o", str(tmp_path / "o1"), "-q"])
    assert result.exit_code == 1 and "--allow-nonfinite" in result.stderr
    result = CliRunner().invoke(main, ["merge", *dirs, "-o", str(tmp_path / "o2"), "-q",
                                       "--allow-nonfinite"])
    assert result.exit_code == 0, result.output
    merged = load_file(tmp_path / "o2" / "model.safetensors")
    assert torch.isnan(merged["layer.weight"][0, 0])
    assert torch.isfinite(merged["layer.weight"].reshape(-1)[1:]).all()


def test_narrower_output_dtype_overflow_is_an_error() -> None:
    w0 = torch.full((4,), 1e5)
    models = [{"w": w0 + 1}, {"w": w0 + 2}]
    with pytest.raises(ModelStockError, match="'w'.*overflow"):
        merge_state_dicts({"w": w0}, models, dtype=torch.float16)


def test_complex64_is_copied_and_complex128_refused_before_writing(tmp_path: Path) -> None:
    c = torch.randn(3, dtype=torch.complex64)
    anchor = {"c": c, "w": torch.randn(3)}
    models = [{"c": c.clone(), "w": torch.randn(3)} for _ in range(2)]
    mem, disk = roundtrip(anchor, models, tmp_path)
    assert torch.equal(mem["c"], c) and torch.equal(disk["c"], c)
    wide = [{k: v.to(torch.complex128) if k == "c" else v for k, v in s.items()}
            for s in [anchor, *models]]
    out = tmp_path / "wide"
    with pytest.raises(ModelStockError, match="complex128 cannot be stored in safetensors") as e:
        merge_checkpoints(wide[0], wide[1:], out)
    assert str(out) in str(e.value) and "'c'" in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".wide*"))


@pytest.mark.skipif(not FLOAT8, reason="this torch has no float8 dtypes")
@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_nan_and_averaged_float8(dtype, tmp_path: Path) -> None:
    """float8 has no torch.isfinite: NaN checks and averaged float8 tensors must still work."""
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(16, generator=g)
    ws = [w0 + 0.3 * torch.randn(16, generator=g) for _ in range(2)]
    anchor = {"w": w0.to(dtype)}
    models = [{"w": w.to(dtype), "new_head": w.to(dtype)} for w in ws]  # head: averaged
    out, _ = merge_state_dicts(anchor, models)
    assert out["new_head"].dtype == dtype
    nan = ws[1].clone()
    nan[3] = float("nan")
    models[1] = {"w": nan.to(dtype), "new_head": ws[1].to(dtype)}
    with pytest.raises(ModelStockError, match="'w'.*NaN or Inf"):
        merge_checkpoints(anchor, models, tmp_path / "out")
    out, _ = merge_state_dicts(anchor, models, allow_nonfinite=True)
    assert torch.isnan(out["w"][3].float()) and torch.isfinite(out["w"].float()[:3]).all()
