"""``modelstock inspect`` on LoRA adapters: the same tables, CSV, JSON, plots and HTML page as for
dense fine-tunes, with numbers from the factors; and the per-module ``modelstock_report.json``
of a merged adapter, entry for entry like a dense merge's.

Planted adapters (hand-written factors with known angles, norms and kinds) are checked against
the closed forms; PEFT's own adapters on a tiny Llama against the dense inspection and the dense
merge of their materialised fine-tunes (``merge_and_unload``). Everything runs through the real
command line (click's runner)."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from modelstock import merge_state_dicts
from modelstock.cli import main
from modelstock.geometry import inspect_checkpoints
from modelstock.lora import inspect_lora, inspect_lora_adapters
from modelstock.report import LayerReport
from tests.test_lora import PEFT_QUIET, llama  # noqa: F401  (the module-scoped fixture)

P = "base_model.model."
FIELDS = set(LayerReport.__dataclass_fields__) | {"kind", "anchor_norm"}
Q, K, UP, DOWN = (f"layers.0.{m}" for m in ("attn.q_proj", "attn.k_proj", "mlp.up_proj",
                                             "mlp.down_proj"))
EMB, HEAD = "embed_tokens", "lm_head.modules_to_save.weight"
HEAD_ANGLE = 30.0


def stock_t(cos: float, n: int) -> float:
    return min(1.0, max(0.0, n * cos / (1 + (n - 1) * cos)))


def unit(deg: float, dim: int) -> torch.Tensor:
    v = torch.zeros(dim)
    v[0], v[1] = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return v


def planted(tmp_path: Path) -> tuple[Path, list[Path], dict[str, torch.Tensor]]:
    """A base and two rank-1 adapters (scaling 1) whose deltas have planted geometry:

    - ``Q``: ``e1 e1^T`` and ``2 e1 u60^T``: 60 degrees, norms 1 and 2;
    - ``K``: ``e1 e1^T`` and ``e1 u120^T``: 120 degrees (negative cosine, t = 0);
    - ``UP``: B = 0 in both (unchanged); ``DOWN``: adapter 0 only (one-sided);
    - ``EMB``: an Embedding LoRA, the same delta in both (0 degrees, t = 1);
    - the head, saved whole (``modules_to_save``): base + deltas 30 degrees apart.
    """
    g = torch.Generator().manual_seed(0)
    base = {f"{m}.weight": torch.randn(4, 4, generator=g) for m in (Q, K, UP, DOWN)}
    base["embed_tokens.weight"] = torch.randn(6, 4, generator=g)  # [num_embeddings, dim]
    base["lm_head.weight"] = torch.randn(2, 3, generator=g)
    base["norm.weight"] = torch.ones(4)
    save_file(base, str(tmp_path / "base.safetensors"))
    e1 = unit(0, 4)
    paths = []
    for i in range(2):
        state = {
            f"{P}{Q}.lora_A.weight": unit(60 * i, 4)[None], f"{P}{Q}.lora_B.weight":
                (1 + i) * e1[:, None],
            f"{P}{K}.lora_A.weight": unit(120 * i, 4)[None], f"{P}{K}.lora_B.weight": e1[:, None],
            f"{P}{UP}.lora_A.weight": e1[None], f"{P}{UP}.lora_B.weight": torch.zeros(4, 1),
            f"{P}{EMB}.lora_embedding_A": unit(0, 6)[None],
            f"{P}{EMB}.lora_embedding_B": unit(0, 4)[:, None],
            f"{P}{HEAD}": base["lm_head.weight"] + 0.1 * unit(HEAD_ANGLE * i, 6).view(2, 3),
        }
        if i == 0:
            state[f"{P}{DOWN}.lora_A.weight"] = e1[None]
            state[f"{P}{DOWN}.lora_B.weight"] = e1[:, None]
        cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "modules_to_save": ["lm_head"],
               "target_modules": ["q_proj", "k_proj", "up_proj", "down_proj", "embed_tokens"]}
        path = tmp_path / f"ad{i}"
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        save_file({k: v.clone().contiguous() for k, v in state.items()},
                  str(path / "adapter_model.safetensors"))
        paths.append(path)
    return tmp_path / "base.safetensors", paths, base


def inspect(*args: str):
    res = CliRunner().invoke(main, ["inspect", *args])
    assert res.exit_code == 0, res.output
    return res.output


def reports(tmp_path: Path) -> tuple[list[str], dict[str, Path]]:
    out = {k: tmp_path / f"r.{k}" for k in ("json", "csv", "png", "html")}
    return ["--json", str(out["json"]), "--csv", str(out["csv"]), "--plot", str(out["png"]),
            "--html", str(out["html"])], out


def check_files(out: dict[str, Path], names: list[str]) -> dict:
    """The JSON report's layers in the given order, with the dense schema; the CSV, PNG and
    HTML written from the same inspection. Returns the JSON."""
    report = json.loads(out["json"].read_text())
    assert [x["name"] for x in report["layers"]] == names
    assert all(set(x) <= FIELDS for x in report["layers"])
    rows = list(csv.DictReader(io.StringIO(out["csv"].read_text())))
    assert [r["name"] for r in rows] == names
    for r, x in zip(rows, report["layers"], strict=True):
        if "angle_deg" in x:
            assert float(r["angle_deg"]) == pytest.approx(x["angle_deg"], rel=1e-12)
            assert json.loads(r["norms"]) == pytest.approx(x["norms"], rel=1e-12)
    assert out["png"].read_bytes().startswith(b"\x89PNG")
    page = out["html"].read_text()
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)).startswith(b"\x89PNG")
    assert all(name in page for name in names) and "<table>" in page
    assert not re.search(r'(src|href)="https?:', page)
    return report


def test_planted_geometry_through_every_report(tmp_path) -> None:
    base_path, paths, base = planted(tmp_path)
    flags, out = reports(tmp_path)
    text = inspect(str(base_path), *map(str, paths), "-q", *flags)
    names = [EMB, K, Q, DOWN, UP, HEAD]  # as stored (sorted), the dense tensors last
    report = check_files(out, names)
    assert report["n_models"] == 2 and report["anchor"] == str(base_path)
    rows = {x["name"]: x for x in report["layers"]}
    q = rows[Q]
    assert q["norms"] == pytest.approx([1.0, 2.0]) and q["angle_deg"] == pytest.approx(60.0)
    assert q["t"] == pytest.approx(stock_t(0.5, 2)) and q["kind"] == "weight"
    assert q["anchor_norm"] == pytest.approx(float(base[f"{Q}.weight"].double().norm()))
    assert rows[K]["angle_deg"] == pytest.approx(120.0) and rows[K]["t"] == 0.0
    assert rows[EMB]["kind"] == "embedding" and rows[EMB]["shape"] == [6, 4]
    assert rows[EMB]["angle_deg"] == pytest.approx(0.0, abs=1e-5) and rows[EMB]["t"] == 1.0
    head = rows[HEAD]
    assert head["kind"] == "head" and head["rule"] == "model_stock"
    assert head["angle_deg"] == pytest.approx(HEAD_ANGLE, abs=1e-4)
    assert head["t"] == pytest.approx(stock_t(math.cos(math.radians(HEAD_ANGLE)), 2), abs=1e-6)
    assert head["anchor_norm"] == pytest.approx(float(base["lm_head.weight"].double().norm()))
    found = {f["code"]: f for f in report["findings"]}
    assert set(found) == {"negative_cos", "one_sided", "unchanged"}
    assert found["negative_cos"]["layers"] == [K] and found["unchanged"]["layers"] == [UP]
    assert found["one_sided"]["layers"] == [DOWN]
    kinds = {k["kind"]: k for k in report["kinds"]}
    assert set(kinds) == {"weight", "embedding", "head"} and kinds["weight"]["layers"] == 4
    # the terminal: the dense inspect's table, summary by kind and findings, then the summary
    for line in (Q, "By layer kind", "weight matrices", "embeddings", "head",
                 "warning: negative cosine", "warning: changed in some fine-tunes only",
                 "info: unchanged in every fine-tune", "model-stock (N=2"):
        assert line in text, line
    row = next(x for x in text.splitlines() if x.startswith(Q))
    rel = statistics.fmean([1.0, 2.0]) / q["anchor_norm"]
    assert re.search(rf"1, 2\s+{rel:.3g}\s+60\.0\s+0\.667\s+model_stock$", row), row


def test_planted_without_base(tmp_path) -> None:
    """No base: no |w0| (rel '-'), the head is averaged (no value to anchor it), the plots and
    the page still come out."""
    _, paths, _ = planted(tmp_path)
    flags, out = reports(tmp_path)
    text = inspect(*map(str, paths), *flags)
    report = check_files(out, [EMB, K, Q, DOWN, UP, HEAD])
    assert all("anchor_norm" not in x for x in report["layers"])
    rows = {x["name"]: x for x in report["layers"]}
    assert rows[HEAD]["rule"] == "average" and "norms" not in rows[HEAD]
    assert rows[Q]["t"] == pytest.approx(stock_t(0.5, 2))
    codes = {f["code"]: f for f in report["findings"]}
    assert codes["not_in_anchor"]["layers"] == [HEAD] and codes["not_in_anchor"]["level"] == "info"
    assert any("averaged" in f["message"] for f in report["findings"] if f["code"] == "inputs")
    assert any("averaged" in w for w in report["warnings"])
    assert "no base model given" in text and "no base model given" in out["html"].read_text()
    from modelstock.plots import figure

    norms_panel = figure(inspect_lora_adapters(paths)).axes[-1]
    assert norms_panel.get_legend_handles_labels()[1] == ["|w1 - w0|", "|w2 - w0|"]  # no |w0|
    row = next(x for x in text.splitlines() if x.startswith(Q))
    assert re.search(r"1, 2\s+-\s+60\.0\s+0\.667\s+model_stock$", row), row  # rel: no |w0|


def test_strip_prefix_and_errors_are_one_line(tmp_path) -> None:
    _, paths, _ = planted(tmp_path)
    res = CliRunner().invoke(main, ["inspect", *map(str, paths), "--strip-prefix", "x."])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "--strip-prefix does not apply to LoRA" in res.output
    res = CliRunner().invoke(main, ["inspect", str(paths[0]), str(tmp_path / "base.safetensors")])
    assert res.exit_code == 1 and "not a LoRA adapter" in res.output


@PEFT_QUIET
def test_peft_adapters_inspect_like_their_dense_fine_tunes(llama, tmp_path) -> None:  # noqa: F811
    """PEFT's adapters on a tiny Llama (three, ranks 4/2/3, rsLoRA, an embedding LoRA, partly
    overlapping targets): each module's norms, angles, t, |w0| and kind are the dense
    inspection's of its weight in the materialised fine-tunes; the files come out, with the
    spread panel for N = 3."""
    from modelstock.plots import figure

    base, state0, paths, finetunes, root = llama
    dense = {g.name: g for g in inspect_checkpoints(state0, finetunes).layers}
    insp = inspect_lora_adapters(paths, base=root / "base")
    assert insp.n_models == 3 and len(figure(insp).axes) == 4
    modules = [g for g in insp.layers if f"{g.name}.weight" in dense]
    assert len(modules) == 2 * 6 + 1  # q, k, v, o, up, down per layer, and embed_tokens
    for g in modules:
        d = dense[f"{g.name}.weight"]
        assert g.kind == d.kind, g.name
        assert g.layer.norms == pytest.approx(d.layer.norms, rel=1e-5, abs=1e-6), g.name
        assert g.layer.pair_cos == pytest.approx(d.layer.pair_cos, abs=1e-5), g.name
        assert g.layer.t == pytest.approx(d.layer.t, abs=1e-5), g.name
        assert g.anchor_norm == pytest.approx(d.anchor_norm, rel=1e-6), g.name
        assert g.changed == d.changed, g.name
    one_sided = {f.code: f for f in insp.findings}["one_sided"].layers
    assert "model.layers.0.self_attn.k_proj" in one_sided  # adapter 1 alone targets k_proj
    # the same numbers as inspect_lora's report, and through the command line
    assert [x.t for x in inspect_lora(paths, base=root / "base").layers] == \
        [g.layer.t for g in insp.layers]
    flags, out = reports(tmp_path)
    text = inspect(str(root / "base"), *map(str, paths), "-q", *flags)
    report = check_files(out, [g.name for g in insp.layers])
    assert report["layers"] == [g.to_dict() for g in insp.layers]
    assert "spread" in text and "model.layers.1.mlp.down_proj" in text


@PEFT_QUIET
def test_merged_adapter_report_is_per_module_like_a_dense_merge(llama, tmp_path) -> None:  # noqa: F811
    """``modelstock_report.json`` beside a merged adapter: the dense merge report's layout,
    one entry per adapted module (named by the module) with the fields, rule, dtype and
    numbers of the dense merge's entry for its weight."""
    base, state0, paths, finetunes, root = llama
    res = CliRunner().invoke(main, ["merge", str(root / "base"), *map(str, paths), "-o",
                                    str(tmp_path / "m"), "-q"])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "m" / "modelstock_report.json").read_text())
    _, dense_report = merge_state_dicts(state0, finetunes)
    want = dense_report.to_dict()
    assert set(got) - {"anchor", "models", "output_bytes", "seconds", "warnings"} <= set(want)
    assert (got["method"], got["n_models"], got["granularity"], got["clamp"]) == \
        (want["method"], want["n_models"], want["granularity"], want["clamp"])
    dense = {x["name"]: x for x in want["layers"]}
    modules = [x for x in got["layers"] if f"{x['name']}.weight" in dense]
    assert len(modules) == 2 * 6 + 1 and len({x["name"] for x in modules}) == len(modules)
    for x in modules:
        d = dense[f"{x['name']}.weight"]
        assert set(x) - {"note"} == set(d) - {"note"}, x["name"]
        assert (x["shape"], x["rule"], x["dtype"]) == (d["shape"], d["rule"], d["dtype"])
        assert x["t"] == pytest.approx(d["t"], abs=1e-5), x["name"]
        assert x["angle_deg"] == pytest.approx(d["angle_deg"], abs=1e-3), x["name"]
        assert x["norms"] == pytest.approx(d["norms"], rel=1e-5, abs=1e-6), x["name"]
    # ... which the inspection of the same adapters reproduces, entry for entry
    insp = inspect_lora_adapters(paths, base=root / "base")
    measured = {g.name: g.layer for g in insp.layers}
    for x in modules:
        assert x["t"] == measured[x["name"]].t and x["norms"] == measured[x["name"]].norms
