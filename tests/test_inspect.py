"""`modelstock inspect` on synthetic checkpoints with planted geometry: known angles and norms per
layer, a head whose shape differs in the anchor, a layer moved by one fine-tune only, unrelated
"fine-tunes". The numbers are checked against the planted values and closed forms."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from modelstock import merge_state_dicts
from modelstock.cli import main
from modelstock.geometry import inspect_checkpoints, layer_kinds
from modelstock.report import LayerReport


def planted(gram: np.ndarray, dim: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """Vectors in R^dim whose Gram matrix is exactly ``gram`` (up to float64 rounding)."""
    basis = np.linalg.qr(rng.standard_normal((dim, len(gram))))[0].T
    lam, q = np.linalg.eigh(gram)
    v = (q * np.sqrt(np.clip(lam, 0, None))) @ basis
    return [torch.tensor(x) for x in v]


def pair_gram(angles_deg: list[float], norms: list[float]) -> np.ndarray:
    """Gram of N vectors with given norms and pair angles (pairs i<j, row-major)."""
    n = len(norms)
    g = np.diag(np.square(norms)).astype(float)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    for (i, j), a in zip(pairs, angles_deg, strict=True):
        g[i, j] = g[j, i] = norms[i] * norms[j] * math.cos(math.radians(a))
    return g


def stock_t(cos: float, n: int) -> float:
    """The paper's ratio, clamped, written out independently of the library."""
    return min(1.0, max(0.0, n * cos / (1 + (n - 1) * cos)))


# name: (shape, pair angle in degrees or None, task-vector norms)
LAYERS = {
    "embeddings.word_embeddings.weight": ((40, 8), 20.0, [1.0, 2.0]),
    "encoder.layer.0.attention.query.weight": ((16, 16), 60.0, [0.5, 0.6]),
    "encoder.layer.0.attention.query.bias": ((16,), 30.0, [0.1, 0.1]),
    "encoder.layer.0.LayerNorm.weight": ((16,), 10.0, [0.05, 0.04]),
    "encoder.layer.0.LayerNorm.bias": ((16,), 15.0, [0.03, 0.03]),
    "encoder.layer.1.attention.query.weight": ((16, 16), 120.0, [0.5, 0.5]),
    "encoder.layer.1.output.dense.weight": ((16, 16), 88.0, [0.5, 0.5]),
    "encoder.layer.1.intermediate.dense.weight": ((16, 16), None, [0.7, 0.0]),
    "encoder.layer.1.frozen.weight": ((16, 16), None, [0.0, 0.0]),
    "bn.running_mean": ((16,), 40.0, [0.2, 0.3]),
}
HEAD = "classifier.weight"
NEW = "pooler.new.weight"


def make_planted(seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    anchor, models = {}, [{}, {}]
    for name, (shape, angle, norms) in LAYERS.items():
        w0 = torch.tensor(rng.standard_normal(shape))
        anchor[name] = w0.float()
        numel = math.prod(shape)
        if angle is None:  # one or no fine-tune moves this layer
            d = [torch.tensor(rng.standard_normal(numel)) for _ in norms]
            d = [x / x.norm() * s for x, s in zip(d, norms, strict=True)]
        else:
            d = planted(pair_gram([angle], norms), numel, rng)
        for m, di in zip(models, d, strict=True):
            m[name] = (w0 + di.view(shape)).float()
    anchor["bn.num_batches_tracked"] = torch.tensor(7)
    anchor[HEAD] = torch.randn(3, 16)
    for m in models:
        m["bn.num_batches_tracked"] = torch.tensor(9)
        m[HEAD] = torch.randn(4, 16)
        m[NEW] = torch.randn(2, 16)
    return anchor, models


@pytest.fixture
def files(tmp_path) -> list[str]:
    anchor, models = make_planted()
    paths = []
    for i, sd in enumerate([anchor, *models]):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(sd, paths[-1])
    return paths


def by_name(insp) -> dict:
    return {g.name: g for g in insp.layers}


def test_planted_angles_norms_and_t(files) -> None:
    insp = inspect_checkpoints(files[0], files[1:])
    rows = by_name(insp)
    anchor, _ = make_planted()
    for name, (_, angle, norms) in LAYERS.items():
        g = rows[name]
        assert g.layer.norms == pytest.approx(norms, rel=1e-5, abs=1e-6), name
        assert g.anchor_norm == pytest.approx(float(anchor[name].double().norm()), rel=1e-6)
        if angle is None:
            continue
        assert g.layer.angle_deg == pytest.approx(angle, abs=1e-3), name
        assert g.pair_angles == pytest.approx([angle], abs=1e-3)
        # bn.running_mean has no bn.weight to follow: merged (and measured) by its own angle
        assert g.layer.rule == "model_stock"
        assert g.layer.t == pytest.approx(stock_t(math.cos(math.radians(angle)), 2), abs=1e-6)
    assert "without a layer weight" in rows["bn.running_mean"].layer.note
    assert rows["encoder.layer.1.attention.query.weight"].layer.t == 0.0  # cos < 0: clamped
    assert rows[HEAD].layer.rule == "skipped" and rows[HEAD].layer.shape == [4, 16]
    assert rows[NEW].layer.rule == "average" and not rows[NEW].in_anchor
    assert rows["bn.num_batches_tracked"].layer.rule == "follow"  # the counter follows the stats


def test_planted_findings(files) -> None:
    found = {f.code: f for f in inspect_checkpoints(files[0], files[1:]).findings}
    assert set(found) == {"shape_mismatch", "negative_cos", "near_orthogonal", "one_sided",
                          "unchanged", "not_in_anchor"}
    assert found["shape_mismatch"].layers == [HEAD]
    assert "[3, 16]" in str(by_name(inspect_checkpoints(files[0], files[1:]))[HEAD].layer.note)
    assert found["negative_cos"].layers == ["encoder.layer.1.attention.query.weight"]
    assert found["near_orthogonal"].layers == ["encoder.layer.1.output.dense.weight"]
    assert found["one_sided"].layers == ["encoder.layer.1.intermediate.dense.weight"]
    assert "model(s) 1 of 2" in found["one_sided"].message
    assert found["unchanged"].layers == ["encoder.layer.1.frozen.weight"]
    assert found["unchanged"].level == "info"
    assert found["not_in_anchor"].layers == [NEW]


def test_kinds() -> None:
    anchor, models = make_planted()
    shapes = {k: tuple(v.shape) for k, v in {**models[0], **anchor}.items()}
    shapes.update({"fc.weight": (10, 4), "layer1.0.bn1.weight": (4,), "layer1.0.bn1.bias": (4,),
                   "downsample.1.weight": (4,), "downsample.1.bias": (4,),
                   "transformer.ln_f.weight": (8,), "lm_head.weight": (50, 8),
                   "transformer.wte.weight": (50, 8), "mlp.fc1.weight": (8, 8),
                   "logit_scale": ()})
    kinds = layer_kinds(shapes, head=["pooler.new.*"])
    expect = {
        "embeddings.word_embeddings.weight": "embedding",
        "encoder.layer.0.attention.query.weight": "weight",
        "encoder.layer.0.attention.query.bias": "bias",
        "encoder.layer.0.LayerNorm.weight": "norm", "encoder.layer.0.LayerNorm.bias": "norm",
        "bn.running_mean": "norm", "bn.num_batches_tracked": "norm",
        HEAD: "head", NEW: "head", "fc.weight": "head", "lm_head.weight": "head",
        "layer1.0.bn1.weight": "norm", "layer1.0.bn1.bias": "norm",
        "downsample.1.weight": "norm", "downsample.1.bias": "norm",
        "transformer.ln_f.weight": "norm", "transformer.wte.weight": "embedding",
        "mlp.fc1.weight": "weight", "logit_scale": "other",
    }
    assert {k: kinds[k] for k in expect} == expect


def test_same_numbers_and_schema_as_a_merge(files) -> None:
    insp = inspect_checkpoints(files[0], files[1:])
    anchor, models = make_planted()
    del anchor[HEAD]  # a merge refuses the mismatched head; inspect reports it
    for m in models:
        del m[HEAD]
    _, report = merge_state_dicts(anchor, models)
    merged = {layer["name"]: layer for layer in report.to_dict()["layers"]}
    ours = {layer["name"]: layer for layer in insp.to_dict()["layers"]}
    for name, layer in merged.items():
        mine = {k: v for k, v in ours[name].items() if k not in ("kind", "anchor_norm")}
        if layer["rule"] == "model_stock":
            assert mine == layer, name
        else:  # inspect also measures what a merge only averages (BatchNorm statistics)
            assert {k: mine[k] for k in layer} == layer, name
    assert "angle_deg" in ours["bn.running_mean"]
    assert set(ours) == set(merged) | {HEAD}


def test_three_models_pair_spread(tmp_path) -> None:
    rng = np.random.default_rng(1)
    w0 = torch.tensor(rng.standard_normal(400))
    d = planted(pair_gram([30.0, 50.0, 70.0], [1.0, 1.1, 0.9]), 400, rng)
    insp = inspect_checkpoints({"blocks.0.mlp.weight": w0.view(20, 20)},
                               [{"blocks.0.mlp.weight": (w0 + x).view(20, 20)} for x in d])
    g = insp.layers[0]
    assert g.pair_angles == pytest.approx([30.0, 50.0, 70.0], abs=1e-6)
    cos = np.mean(np.cos(np.radians([30.0, 50.0, 70.0])))
    assert g.layer.cos == pytest.approx(cos, abs=1e-12)
    assert g.layer.t == pytest.approx(stock_t(cos, 3), abs=1e-12)
    (kind,) = insp.by_kind()
    assert kind.spread_mean == pytest.approx(40.0, abs=1e-6)
    assert insp.findings == []


def test_small_chunks_give_the_same_numbers(files) -> None:
    whole = inspect_checkpoints(files[0], files[1:])
    chunked = inspect_checkpoints(files[0], files[1:], chunk_numel=50)  # every weight re-read
    for a, b in zip(whole.layers, chunked.layers, strict=True):
        if a.layer.norms is None:
            assert b.layer.norms is None and a.layer.rule == b.layer.rule, a.name
            continue
        assert a.layer.norms == pytest.approx(b.layer.norms, rel=1e-9), a.name
        assert a.layer.cos == pytest.approx(b.layer.cos, rel=1e-9, abs=1e-12), a.name
        assert a.anchor_norm == pytest.approx(b.anchor_norm, rel=1e-6), a.name  # float32 sum


def test_nonfinite_layer_is_reported_not_fatal() -> None:
    anchor = {"a.weight": torch.randn(4, 4), "b.weight": torch.randn(4, 4)}
    models = [{k: v + 0.1 * torch.randn_like(v) for k, v in anchor.items()} for _ in range(2)]
    models[1]["a.weight"][0, 0] = float("nan")
    insp = inspect_checkpoints(anchor, models)
    rows = by_name(insp)
    assert rows["a.weight"].layer.rule == "skipped" and "NaN" in rows["a.weight"].layer.note
    assert rows["b.weight"].layer.angle_deg is not None
    incompatible = [f for f in insp.findings if f.code == "incompatible"]
    assert incompatible and incompatible[0].layers == ["a.weight"]


def _unrelated(anchor_scale: float, shared_base: bool, seed: int = 2):
    """Three 'fine-tunes' that are not fine-tunes of the anchor."""
    g = torch.Generator().manual_seed(seed)
    names = [f"blocks.{i}.mlp.weight" for i in range(6)]
    anchor = {k: anchor_scale * torch.randn(64, 64, generator=g) for k in names}
    base = {k: torch.randn(64, 64, generator=g) for k in names}
    models = []
    for _ in range(3):
        models.append({k: (base[k] + 0.05 * torch.randn(64, 64, generator=g)) if shared_base
                       else torch.randn(64, 64, generator=g) for k in names})
    return inspect_checkpoints(anchor, models)


def test_unrelated_models_of_equal_scale_sit_at_60_degrees() -> None:
    # d_i = w_i - w0 share -w0, so independent models give cos = 1/2, not 0: the angle alone
    # does not reveal them; their distance from the anchor does.
    insp = _unrelated(1.0, shared_base=False)
    assert all(57 < g.layer.angle_deg < 63 for g in insp.layers)
    assert {f.code for f in insp.findings} == {"far_from_anchor"}


def test_models_trained_from_other_inits_are_orthogonal_everywhere() -> None:
    insp = _unrelated(0.01, shared_base=False)  # the anchor is near zero next to the models
    assert all(g.layer.angle_deg > 85 for g in insp.layers)
    codes = {f.code for f in insp.findings}
    assert {"orthogonal_everywhere", "far_from_anchor"} <= codes


def test_fine_tunes_of_another_base_are_far_from_the_anchor() -> None:
    insp = _unrelated(1.0, shared_base=True)  # small angles, but 1.4 |w0| away
    assert all(g.layer.angle_deg < 10 for g in insp.layers)
    far = [f for f in insp.findings if f.code == "far_from_anchor"]
    assert far and re.search(r"= 1\.4\d", far[0].message)


def test_fine_tunes_of_this_anchor_raise_no_warning() -> None:
    g = torch.Generator().manual_seed(3)
    anchor = {f"blocks.{i}.mlp.weight": torch.randn(32, 32, generator=g) for i in range(4)}
    shared = {k: 0.03 * torch.randn(32, 32, generator=g) for k in anchor}
    models = [{k: v + shared[k] + 0.03 * torch.randn(32, 32, generator=g)
               for k, v in anchor.items()} for _ in range(2)]
    insp = inspect_checkpoints(anchor, models)
    assert insp.findings == []
    assert all(50 < x.layer.angle_deg < 70 for x in insp.layers)  # cos ~ 1/2 by construction


def test_cli_writes_every_report(files, tmp_path) -> None:
    out = {k: tmp_path / f"r.{k}" for k in ("json", "csv", "png", "html")}
    res = CliRunner().invoke(main, ["inspect", *files, "-q", "--json", str(out["json"]),
                                    "--csv", str(out["csv"]), "--plot", str(out["png"]),
                                    "--html", str(out["html"])])
    assert res.exit_code == 0, res.output
    assert "encoder.layer.0.attention.query.weight" in res.output
    assert "By layer kind" in res.output and "weight matrices" in res.output
    assert "warning: the anchor's shape differs" in res.output
    report = json.loads(out["json"].read_text())
    assert report["n_models"] == 2 and len(report["layers"]) == len(LAYERS) + 3
    fields = set(LayerReport.__dataclass_fields__) | {"kind", "anchor_norm"}
    assert all(set(layer) <= fields for layer in report["layers"])
    assert {f["code"] for f in report["findings"]} >= {"shape_mismatch", "one_sided"}
    rows = list(csv.DictReader(io.StringIO(out["csv"].read_text())))
    assert [r["name"] for r in rows] == [x["name"] for x in report["layers"]]
    q = next(r for r in rows if r["name"] == "encoder.layer.0.attention.query.weight")
    assert float(q["angle_deg"]) == pytest.approx(60.0, abs=1e-3)
    assert json.loads(q["norms"]) == pytest.approx([0.5, 0.6], rel=1e-5)
    png = out["png"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    page = out["html"].read_text()
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)).startswith(b"\x89PNG")
    assert "classifier.weight" in page and "<table>" in page
    assert not re.search(r'(src|href)="https?:', page)  # self-contained


def test_cli_long_models_print_a_truncated_table(tmp_path) -> None:
    g = torch.Generator().manual_seed(4)
    anchor = {f"blocks.{i}.mlp.weight": torch.randn(4, 4, generator=g) for i in range(60)}
    paths = []
    for i in range(3):
        sd = anchor if i == 0 else {k: v + 0.1 * torch.randn(4, 4, generator=g)
                                    for k, v in anchor.items()}
        paths.append(str(tmp_path / f"{i}.safetensors"))
        save_file(sd, paths[-1])
    short = CliRunner().invoke(main, ["inspect", *paths, "-q"])
    assert short.exit_code == 0, short.output
    assert "30 more layers" in short.output and "blocks.59.mlp.weight" in short.output
    assert "blocks.30.mlp.weight" not in short.output
    assert "blocks.9.mlp.weight\n" not in short.output  # natural order: 0..19 then 50..59
    full = CliRunner().invoke(main, ["inspect", *paths, "-q", "--all"])
    assert "more layers" not in full.output and "blocks.30.mlp.weight" in full.output
    order = re.findall(r"^blocks\.(\d+)\.", full.output, re.M)
    assert order == [str(i) for i in range(60)]


def test_plot_panels(files) -> None:
    from modelstock.plots import figure

    insp = inspect_checkpoints(files[0], files[1:])
    assert len(figure(insp).axes) == 3
    rng = np.random.default_rng(5)
    w0 = torch.tensor(rng.standard_normal(64))
    three = inspect_checkpoints({"w": w0}, [{"w": w0 + 0.1 * torch.tensor(
        rng.standard_normal(64))} for _ in range(3)])
    assert len(figure(three).axes) == 4  # + spread of pairwise angles


def test_cli_user_errors_are_one_line(files, tmp_path) -> None:
    res = CliRunner().invoke(main, ["inspect", files[0], files[1], "-q"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "modelstock: error: inspect needs at least 2 fine-tuned models, got 1"]
    res = CliRunner().invoke(main, ["inspect", files[0], files[1], str(tmp_path / "nope"), "-q"])
    assert res.exit_code == 1 and "no such file" in res.output
