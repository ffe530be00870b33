"""Model Stock of LoRA adapters in factor space (`modelstock.lora`).

The references are dense: every delta is materialised in float64 (``s B A``, transposed for an
embedding or ``fan_in_fan_out``, written here from PEFT's formulas, not from `modelstock.lora`)
and merged by the project's dense engine (`merge_state_dicts`, anchor = base, ``w_i = base +
dW_i``). With real ``peft``, adapters are made by PEFT itself, merged, loaded back with
``PeftModel.from_pretrained`` and compared with the dense merge of ``merge_and_unload()``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from modelstock import ModelStockError, merge_state_dicts, stock
from modelstock.lora import (
    compress,
    factor_gram,
    inspect_lora,
    lora_adapter_from_state_dict,
    merge_lora,
    merge_lora_adapters,
    read_lora_adapter,
)

P = "base_model.model."
FAST = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


# -- building adapters by hand, in PEFT's layout ------------------------------------------------

def lora_config(**kw) -> dict:
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": False,
           "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
           "target_modules": None, "bias": "none", "use_dora": False}
    cfg.update(kw)
    return cfg


def peft_scaling(cfg: dict, name: str) -> float:
    """PEFT's scaling, written out: exact-name patterns only (what these tests generate)."""
    r = cfg["rank_pattern"].get(name, cfg["r"])
    alpha = cfg["alpha_pattern"].get(name, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r


def dense_delta(state: dict, cfg: dict, name: str, kind: str) -> torch.Tensor:
    """PEFT's get_delta_weight in float64: Linear ``transpose(B @ A, fan_in_fan_out) * s``,
    Embedding ``(B @ A).T * s``."""
    if kind == "embedding":
        a, b = state[f"{P}{name}.lora_embedding_A"], state[f"{P}{name}.lora_embedding_B"]
        return (b.double() @ a.double()).T * peft_scaling(cfg, name)
    a, b = state[f"{P}{name}.lora_A.weight"], state[f"{P}{name}.lora_B.weight"]
    d = b.double() @ a.double()
    return (d.T if cfg["fan_in_fan_out"] else d) * peft_scaling(cfg, name)


def factors(kind: str, out: int, inp: int, r: int, shared: tuple, g: torch.Generator,
            noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as PEFT stores them, near shared factors (so adapters agree and t > 0)."""
    a0, b0 = shared
    a = a0[:r] + noise * torch.randn(a0[:r].shape, generator=g, dtype=torch.float64)
    b = b0[:, :r] + noise * torch.randn(b0[:, :r].shape, generator=g, dtype=torch.float64)
    return a, b


@st.composite
def scenarios(draw):
    """N adapters over a few modules (Linear or Embedding), with per-adapter r, alpha, rsLoRA,
    per-module rank/alpha patterns, fan_in_fan_out, and partial target overlap."""
    n = draw(st.integers(2, 4))
    fifo = draw(st.booleans())
    specs = []
    for j in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["linear", "linear", "embedding"]))
        specs.append((f"layers.{j}.{'emb' if kind == 'embedding' else 'proj'}", kind,
                      draw(st.integers(1, 7)), draw(st.integers(1, 7))))
    adapters = []
    for _ in range(n):
        present = draw(st.lists(st.booleans(), min_size=len(specs), max_size=len(specs)))
        if not any(present):
            present[0] = True
        cfg = lora_config(r=draw(st.integers(1, 4)),
                          lora_alpha=draw(st.sampled_from([1, 4, 16, 2.5])),
                          use_rslora=draw(st.booleans()), fan_in_fan_out=fifo)
        for (name, _, _, _), here in zip(specs, present, strict=True):
            if here and draw(st.booleans()):
                cfg["rank_pattern"][name] = draw(st.integers(1, 5))
            if here and draw(st.booleans()):
                cfg["alpha_pattern"][name] = draw(st.sampled_from([3, 7.5]))
        adapters.append((cfg, present))
    return {"n": n, "specs": specs, "adapters": adapters,
            "noise": draw(st.sampled_from([0.05, 0.5, 3.0])),
            "seed": draw(st.integers(0, 2**31 - 1)),
            "granularity": draw(st.sampled_from(["tensor", "row", "model"])),
            "clamp": draw(st.booleans())}


def build(sc: dict):
    """The adapters (state dicts + configs), the float64 base and the dense fine-tunes."""
    g = torch.Generator().manual_seed(sc["seed"])
    base, shared = {}, {}
    fifo = sc["adapters"][0][0]["fan_in_fan_out"]
    for name, kind, out, inp in sc["specs"]:
        transposed = kind == "embedding" or fifo
        shape = (inp, out) if transposed else (out, inp)
        base[f"{name}.weight"] = torch.randn(shape, generator=g, dtype=torch.float64)
        shared[name] = (torch.randn(5, inp, generator=g, dtype=torch.float64),
                        torch.randn(out, 5, generator=g, dtype=torch.float64))
    states, finetunes = [], []
    for cfg, present in sc["adapters"]:
        state, w = {}, dict(base)
        for (name, kind, out, inp), here in zip(sc["specs"], present, strict=True):
            if not here:
                continue
            r = cfg["rank_pattern"].get(name, cfg["r"])
            a, b = factors(kind, out, inp, r, shared[name], g, sc["noise"])
            if kind == "embedding":
                state[f"{P}{name}.lora_embedding_A"] = a
                state[f"{P}{name}.lora_embedding_B"] = b
            else:
                state[f"{P}{name}.lora_A.weight"] = a
                state[f"{P}{name}.lora_B.weight"] = b
            w[f"{name}.weight"] = base[f"{name}.weight"] + dense_delta(state, cfg, name, kind)
        states.append(state)
        finetunes.append(w)
    ads = [lora_adapter_from_state_dict(s, c, f"adapter{i}")
           for i, (s, (c, _)) in enumerate(zip(states, sc["adapters"], strict=True))]
    return ads, base, finetunes, states


def rel_close(x: torch.Tensor, ref: torch.Tensor, scale: float, tol: float = 1e-10) -> None:
    err = float((x - ref).abs().max()) if x.numel() else 0.0
    assert err <= tol * max(scale, 1e-300) + 1e-300, (err, scale)


# -- exactness against the dense computation -----------------------------------------------------

@FAST
@given(sc=scenarios())
def test_factor_gram_equals_dense_gram(sc):
    """<dW_i, dW_j> (and per row) from the factors equal stock.gram of the dense deltas."""
    ads, base, _, states = build(sc)
    for name, kind, _, _ in sc["specs"]:
        mods = [a.modules.get(name) for a in ads]
        if all(m is None for m in mods):
            continue
        key = f"{name}.weight"
        exact = torch.stack([(dense_delta(st_, cfg, name, kind) if m is not None
                              else torch.zeros_like(base[key])).reshape(-1)
                             for m, st_, (cfg, _) in zip(mods, states, sc["adapters"],
                                                         strict=True)])
        scale = float((exact.norm(dim=1) ** 2).max())
        rel_close(factor_gram(mods), stock.gram(exact), scale, 1e-9)
        rows = base[key].shape[0]
        rel_close(factor_gram(mods, row=True),
                  stock.gram(exact, row_numel=exact.shape[1] // rows), scale, 1e-9)


@FAST
@given(sc=scenarios())
def test_merge_equals_dense_model_stock(sc):
    """t per module and the merged delta equal the dense engine's merge of w_i = base + dW_i,
    to float64 rounding: plain, rsLoRA, fan_in_fan_out, embeddings, ranks differing per
    adapter and per module, modules only some adapters adapt; granularity tensor/row/model."""
    ads, base, finetunes, _ = build(sc)
    kw = {"granularity": sc["granularity"], "clamp": sc["clamp"]}
    merged = merge_lora(ads, base=base, dtype=torch.float64, **kw)
    ref, report = merge_state_dicts(base, finetunes, **kw)
    ref_t = {x.name: x for x in report.layers}
    for name, m in merged.modules.items():
        key = f"{name}.weight"
        want = ref[key] - base[key]
        scale = sum(float((w[key] - base[key]).abs().max()) for w in finetunes)
        t_max = max(1.0, float(m.t.abs().max()))
        rel_close(merged.delta(name), want, scale * t_max, 1e-8)
        layer = next(x for x in merged.report.layers if x.name == name)
        assert layer.t == pytest.approx(ref_t[key].t, rel=1e-8, abs=1e-9)
        assert layer.cos == pytest.approx(ref_t[key].cos, rel=1e-8, abs=1e-9)
        assert m.rank == sum(a.modules[name].rank for a in ads if name in a.modules)
        assert layer.shape == list(base[key].shape)
    if sc["granularity"] == "model":
        assert merged.report.model_t == pytest.approx(report.model_t, rel=1e-8, abs=1e-9)


@FAST
@given(sc=scenarios(), rank=st.integers(1, 6))
def test_rank_r_equals_svd_truncation(sc, rank):
    """rank=R is the SVD truncation of the dense merged delta, with its relative error."""
    sc = {**sc, "granularity": "tensor"}
    ads, base, _, _ = build(sc)
    exact = merge_lora(ads, base=base, dtype=torch.float64)
    small = merge_lora(ads, base=base, dtype=torch.float64, rank=rank)
    for name, m in small.modules.items():
        full = exact.modules[name]
        d = full.B @ full.A  # PEFT's layout: [out, in]
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        k = min(rank, s.numel())
        want = (u[:, :k] * s[:k]) @ vh[:k]
        got = m.B @ m.A
        norm = float(s.norm())
        assert m.rank == rank
        rel_close(got, want, max(norm, float(s[0]) if s.numel() else 0.0), 1e-8)
        err = float(s[k:].norm()) / norm if norm > 0 else 0.0
        assert m.rel_error == pytest.approx(err, abs=1e-8)
        if full.rank <= rank:
            assert m.rel_error == 0.0


def test_compress_never_forms_the_matrix_and_pads():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(50, 3, generator=g), torch.randn(3, 40, generator=g)
    c = compress(b, a, 5)
    assert c.rank == 5 and c.rel_error == 0.0
    assert torch.equal(c.B[:, :3], b) and not c.B[:, 3:].any() and not c.A[3:].any()
    c = compress(b, a, 2)
    s = torch.linalg.svdvals((b @ a).double())
    assert c.rel_error == pytest.approx(float(s[2] / s.norm()), rel=1e-6)


def test_no_base_equals_base_for_factor_modules():
    sc = {"n": 3, "specs": [("a.proj", "linear", 6, 5), ("a.emb", "embedding", 4, 9)],
          "adapters": [(lora_config(r=2), [True, True]), (lora_config(r=3), [True, False]),
                       (lora_config(r=1, use_rslora=True), [False, True])],
          "noise": 0.3, "seed": 1, "granularity": "row", "clamp": True}
    ads, base, _, _ = build(sc)
    with_base = merge_lora(ads, base=base, granularity="row")
    without = merge_lora(ads, granularity="row")
    for name in with_base.modules:
        assert torch.equal(with_base.modules[name].B, without.modules[name].B)
        assert torch.equal(with_base.modules[name].A, without.modules[name].A)


def test_threads_do_not_change_the_result():
    sc = {"n": 3, "specs": [(f"l.{j}", "linear", 9, 8) for j in range(6)],
          "adapters": [(lora_config(r=2 + i), [True] * 6) for i in range(3)],
          "noise": 0.3, "seed": 5, "granularity": "tensor", "clamp": True}
    ads, _, _, _ = build(sc)
    one, many = merge_lora(ads, threads=1, rank=3), merge_lora(ads, threads=3, rank=3)
    for name in one.modules:
        assert torch.equal(one.modules[name].B, many.modules[name].B)
        assert torch.equal(one.modules[name].A, many.modules[name].A)


# -- files: reading, writing, refusing ------------------------------------------------------------

def write_adapter(path: Path, state: dict, cfg: dict, bin_file: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    state = {k: v.float().contiguous() for k, v in state.items()}
    if bin_file:
        torch.save(state, path / "adapter_model.bin")
    else:
        save_file(state, str(path / "adapter_model.safetensors"))
    return path


def two_adapters(tmp_path: Path, bin_file: bool = False) -> list[Path]:
    sc = {"n": 2, "specs": [("m.q", "linear", 6, 5), ("m.emb", "embedding", 4, 7)],
          "adapters": [(lora_config(r=2), [True, True]), (lora_config(r=3), [True, True])],
          "noise": 0.2, "seed": 3, "granularity": "tensor", "clamp": True}
    g = torch.Generator().manual_seed(0)
    paths = []
    for i, (cfg, _) in enumerate(sc["adapters"]):
        state = {f"{P}m.q.lora_A.weight": torch.randn(cfg["r"], 5, generator=g),
                 f"{P}m.q.lora_B.weight": torch.randn(6, cfg["r"], generator=g),
                 f"{P}m.emb.lora_embedding_A": torch.randn(cfg["r"], 7, generator=g),
                 f"{P}m.emb.lora_embedding_B": torch.randn(4, cfg["r"], generator=g)}
        state[f"{P}m.q.lora_B.weight"] += 2.0  # the adapters agree: t > 0
        paths.append(write_adapter(tmp_path / f"ad{i}", state, cfg, bin_file))
    return paths


def test_written_adapter_round_trips(tmp_path):
    paths = two_adapters(tmp_path)
    report = merge_lora_adapters(paths, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors",
                                                     "modelstock_report.json"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 5 and cfg["use_rslora"] is False
    assert sorted(cfg["target_modules"]) == ["m.emb", "m.q"] and cfg["rank_pattern"] == {}
    again = read_lora_adapter(out)
    merged = merge_lora(paths)
    for name, m in merged.modules.items():
        assert again.modules[name].scaling == 1.0
        assert torch.equal(again.modules[name].delta(), m.delta())
    assert json.loads((out / "modelstock_report.json").read_text())["n_models"] == 2
    assert report.layers[0].t is not None and 0 < report.layers[0].t <= 1
    with pytest.raises(ModelStockError, match="already exists"):
        merge_lora_adapters(paths, out)
    merge_lora_adapters(paths, out, force=True, rank=2)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    with pytest.raises(ModelStockError, match="replace an input"):
        merge_lora_adapters(paths, paths[0], force=True)


def test_bin_adapter_reads_like_safetensors(tmp_path):
    st_paths = two_adapters(tmp_path / "st")
    bin_paths = two_adapters(tmp_path / "bin", bin_file=True)
    a, b = merge_lora(st_paths), merge_lora(bin_paths)
    for name in a.modules:
        assert torch.equal(a.modules[name].B, b.modules[name].B)


def test_different_ranks_use_rank_and_alpha_patterns(tmp_path):
    """Per-module ranks in PEFT's pattern semantics ((.*\\.)?(key)$, first key that matches):
    'y.x.proj' ends with 'x.proj', which a bare 'x.proj' key would also give rank 2."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for i, r in enumerate([2, 4]):
        cfg = lora_config(r=r, rank_pattern={"^x.proj": 1}, alpha_pattern={"^x.proj": 3})
        state = {}
        for name, rr in [("x.proj", 1), ("y.x.proj", r), ("z", r)]:
            state[f"{P}{name}.lora_A.weight"] = torch.randn(rr, 3, generator=g)
            state[f"{P}{name}.lora_B.weight"] = torch.randn(3, rr, generator=g) + 1
        paths.append(write_adapter(tmp_path / f"a{i}", state, cfg))
    ads = [read_lora_adapter(p) for p in paths]
    assert ads[1].modules["x.proj"].scaling == 3.0 and ads[1].modules["z"].scaling == 2.0
    merged = merge_lora(paths)
    cfg = merged.config
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 6
    assert cfg["rank_pattern"] == {r"^x\.proj": 2}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    merged.save(tmp_path / "out")
    again = read_lora_adapter(tmp_path / "out")
    assert {m.name: (m.rank, m.scaling) for m in again.modules.values()} == \
        {"x.proj": (2, 1.0), "y.x.proj": (6, 1.0), "z": (6, 1.0)}
    inspect = inspect_lora(paths)
    assert [x.t for x in inspect.layers] == [x.t for x in merged.report.layers]


def one_line(e: pytest.ExceptionInfo, *parts: str) -> None:
    text = str(e.value)
    assert "\n" not in text
    for p in parts:
        assert p in text, (p, text)


class Unpicklable:  # a class a weights_only unpickler refuses
    pass


def corrupt(kind: str, path: Path) -> str | None:
    """Damage the adapter at ``path``; return the module name the error must give, if any."""
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    weights = path / "adapter_model.safetensors"
    state = load_file(str(weights))
    if kind == "no_config":
        cfg_path.unlink()
    elif kind == "bad_json":
        cfg_path.write_text("{r: 2")
    elif kind == "not_object":
        cfg_path.write_text("[1, 2]")
    elif kind == "no_peft_type":
        cfg.pop("peft_type")
        cfg_path.write_text(json.dumps(cfg))
    elif kind in ("LOHA", "IA3", "LOKR", "ADALORA"):
        cfg["peft_type"] = kind
        cfg_path.write_text(json.dumps(cfg))
    elif kind == "dora":
        cfg["use_dora"] = True
        cfg_path.write_text(json.dumps(cfg))
    elif kind == "pissa":
        cfg["init_lora_weights"] = "pissa_niter_4"
        cfg_path.write_text(json.dumps(cfg))
    elif kind == "unknown_option":
        cfg["use_fancy_variant"] = {"x": 1}
        cfg_path.write_text(json.dumps(cfg))
    elif kind == "bad_r":
        cfg["r"] = "two"
        cfg_path.write_text(json.dumps(cfg))
    elif kind == "no_weights":
        weights.unlink()
    elif kind == "rank_mismatch":
        state[f"{P}m.q.lora_B.weight"] = torch.zeros(6, 1)
        save_file(state, str(weights))
        return "m.q"
    elif kind == "config_rank":
        cfg["rank_pattern"] = {"^m.q": 7}
        cfg_path.write_text(json.dumps(cfg))
        return "m.q"
    elif kind == "no_B":
        del state[f"{P}m.emb.lora_embedding_B"]
        save_file(state, str(weights))
        return "m.emb"
    elif kind == "conv":
        state[f"{P}m.q.lora_A.weight"] = torch.zeros(2, 5, 1, 1)
        save_file(state, str(weights))
        return "m.q"
    elif kind == "nan":
        state[f"{P}m.q.lora_A.weight"][0, 0] = float("nan")
        save_file(state, str(weights))
        return "m.q"
    elif kind == "magnitude":
        state[f"{P}m.q.lora_magnitude_vector"] = torch.ones(6)
        save_file(state, str(weights))
        return "m.q"
    elif kind == "no_prefix":
        state["m.q.lora_A.weight"] = state.pop(f"{P}m.q.lora_A.weight")
        save_file(state, str(weights))
        return "m.q"
    elif kind == "pickle":
        weights.unlink()
        torch.save({f"{P}m.q.lora_A.weight": Unpicklable()}, path / "adapter_model.bin")
    return None


BAD = ["no_config", "bad_json", "not_object", "no_peft_type", "LOHA", "IA3", "LOKR", "ADALORA",
       "dora", "pissa", "unknown_option", "bad_r", "no_weights", "rank_mismatch",
       "config_rank", "no_B", "conv", "nan", "magnitude", "no_prefix", "pickle"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_adapter_is_one_line_error_naming_file_and_module(tmp_path, kind):
    paths = two_adapters(tmp_path)
    module = corrupt(kind, paths[1])
    with pytest.raises(ModelStockError) as e:
        merge_lora(paths)
    one_line(e, str(paths[1]), *([module] if module else []))
    # the same through the command line: one line on stderr, exit 1, nothing written
    from click.testing import CliRunner

    from modelstock.cli import main

    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", *map(str, paths), "-o", str(out), "-q"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert str(paths[1]) in lines[0] and (module is None or module in lines[0]), lines[0]
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


def test_mismatched_adapters_and_base_are_refused(tmp_path):
    paths = two_adapters(tmp_path)
    with pytest.raises(ModelStockError) as e:
        merge_lora(paths[:1])
    one_line(e, "at least 2")
    # the same module with another shape in another adapter
    state = load_file(str(paths[1] / "adapter_model.safetensors"))
    state[f"{P}m.q.lora_A.weight"] = torch.zeros(3, 9)
    save_file(state, str(paths[1] / "adapter_model.safetensors"))
    with pytest.raises(ModelStockError) as e:
        merge_lora(paths)
    one_line(e, str(paths[1]), "'m.q'", str(paths[0]))
    # a base whose weight has another shape
    paths = two_adapters(tmp_path / "again")
    base = {"m.q.weight": torch.zeros(6, 6), "m.emb.weight": torch.zeros(7, 4)}
    with pytest.raises(ModelStockError) as e:
        merge_lora(paths, base=base)
    one_line(e, "'m.q'", "base")
    del base["m.emb.weight"]  # a base without an adapted module: not their base
    base["m.q.weight"] = torch.zeros(6, 5)
    with pytest.raises(ModelStockError) as e:
        merge_lora(paths, base=base)
    one_line(e, "'m.emb'", "base")
    with pytest.raises(ModelStockError, match="granularity"):
        merge_lora(paths, granularity="layer")
    with pytest.raises(ModelStockError, match="rank"):
        merge_lora(paths, rank=0)


def test_dense_tensors_copy_anchor_average_or_refuse(tmp_path):
    paths = two_adapters(tmp_path)
    for i, p in enumerate(paths):
        state = load_file(str(p / "adapter_model.safetensors"))
        state[f"{P}head.modules_to_save.weight"] = torch.full((2, 3), float(i + 1))
        state[f"{P}emb.base_layer.weight"] = torch.ones(4, 2)  # saved whole, untrained
        save_file(state, str(p / "adapter_model.safetensors"))
    merged = merge_lora(paths)
    assert torch.equal(merged.dense[f"{P}emb.base_layer.weight"], torch.ones(4, 2))
    assert torch.equal(merged.dense[f"{P}head.modules_to_save.weight"], torch.full((2, 3), 1.5))
    assert any("averaged" in w for w in merged.report.warnings)
    base = {"head.weight": torch.zeros(2, 3),  # deltas 1 and 2: parallel, t = 1
            "m.q.weight": torch.zeros(6, 5), "m.emb.weight": torch.zeros(7, 4)}
    merged = merge_lora(paths, base=base)
    torch.testing.assert_close(merged.dense[f"{P}head.modules_to_save.weight"],
                               torch.full((2, 3), 1.5))
    layer = next(x for x in merged.report.layers if x.name == "head.modules_to_save.weight")
    assert layer.rule == "model_stock" and layer.t == pytest.approx(1.0)
    state = load_file(str(paths[0] / "adapter_model.safetensors"))
    del state[f"{P}head.modules_to_save.weight"]
    save_file(state, str(paths[0] / "adapter_model.safetensors"))
    with pytest.raises(ModelStockError) as e:
        merge_lora(paths)
    one_line(e, str(paths[1]), "head.modules_to_save.weight", "base")
    merged = merge_lora(paths, base=base)  # absent from adapter 0: the base's value there
    layer = next(x for x in merged.report.layers if x.name == "head.modules_to_save.weight")
    assert layer.t == 0.0 and "zero" in layer.note


def test_row_granularity_of_fan_in_fan_out_needs_base(tmp_path):
    paths = two_adapters(tmp_path)
    for p in paths:
        cfg = json.loads((p / "adapter_config.json").read_text())
        cfg["fan_in_fan_out"] = True
        (p / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelStockError) as e:
        merge_lora(paths, granularity="row")
    one_line(e, "base", "'m.q'")
    # the base tells a Conv1D ([in, out]) from an nn.Linear ([out, in]), as PEFT does
    emb = {"m.emb.weight": torch.zeros(7, 4)}
    merged = merge_lora(paths, granularity="row", base={"m.q.weight": torch.zeros(6, 5), **emb})
    assert merged.modules["m.q"].fan_in_fan_out is False
    merged = merge_lora(paths, granularity="row", base={"m.q.weight": torch.zeros(5, 6), **emb})
    assert merged.modules["m.q"].fan_in_fan_out is True


# -- with real PEFT ------------------------------------------------------------------------------

# PEFT and transformers warn about their own deprecations and about saving embedding layers.
PEFT_QUIET = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    base = transformers.LlamaForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("llama")
    base.save_pretrained(root / "base")
    state0 = {k: v.clone() for k, v in base.state_dict().items()}
    configs = [
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj",
                                                      "embed_tokens"]),
        LoraConfig(r=2, lora_alpha=16, use_rslora=True,
                   target_modules=["q_proj", "k_proj", "up_proj", "embed_tokens"]),
        LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj"],
                   rank_pattern={"layers.1.self_attn.q_proj": 5},
                   alpha_pattern={"v_proj": 2}),
    ]
    g = torch.Generator().manual_seed(1)
    shared = {}
    paths, finetunes = [], []
    for i, lc in enumerate(configs):
        model = get_peft_model(copy.deepcopy(base), lc)
        for name, p in model.named_parameters():
            if "lora_" in name:  # near a value shared by the adapters: they agree, t > 0
                s = shared.setdefault(name.replace(".default", ""),
                                      torch.randn(64, 64, generator=g) * 0.3)
                with torch.no_grad():
                    p.copy_(s[: p.shape[0], : p.shape[1]]
                            + 0.1 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / f"ad{i}")
        finetunes.append({k: v.clone() for k, v in model.merge_and_unload().state_dict().items()})
        paths.append(root / f"ad{i}")
    return base, state0, paths, finetunes, root


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@PEFT_QUIET
def test_peft_loads_the_merge_with_dense_merge_logits(llama):
    """PEFT's own adapters (ranks 4/2/3 with a rank_pattern, rsLoRA, an embedding LoRA, partly
    overlapping targets), merged in factor space, saved, loaded with PeftModel.from_pretrained:
    the logits are the dense Model Stock merge's (of merge_and_unload()) to float32 rounding."""
    from peft import PeftModel

    base, state0, paths, finetunes, root = llama
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    out = root / "merged"
    shutil.rmtree(out, ignore_errors=True)
    report = merge_lora_adapters(paths, out)
    assert {x.rule for x in report.layers} == {"model_stock", "copy"}  # embed_tokens saved whole
    for x in report.layers:  # a module one adapter adapts: cos 0 with the zero deltas, t 0
        if x.rule == "model_stock":
            alone = sum(n > 0 for n in x.norms) == 1
            assert x.t == 0 if alone else 0 < x.t < 1, (x.name, x.t, x.norms)
    dense, dense_report = merge_state_dicts(state0, finetunes)
    ref = copy.deepcopy(base)
    ref.load_state_dict(dense)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    want = _logits(ref, ids)
    got = _logits(loaded, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert not torch.allclose(_logits(base, ids), want)  # the merge changed something
    by_name = {x.name: x for x in dense_report.layers}
    for x in report.layers:
        if x.rule == "model_stock":
            assert x.t == pytest.approx(by_name[f"{x.name}.weight"].t, rel=1e-4, abs=1e-5)


@PEFT_QUIET
def test_peft_loads_the_rank_r_merge(llama):
    from peft import PeftModel

    base, state0, paths, _, root = llama
    out = root / "merged_r4"
    shutil.rmtree(out, ignore_errors=True)
    merged = merge_lora(paths, rank=4, base=root / "base")
    merged.save(out)
    assert merged.config["r"] == 4 and merged.config["rank_pattern"] == {}
    errs = [m.rel_error for m in merged.modules.values()]
    assert all(0 <= e < 1 for e in errs) and max(errs) > 0
    dense = {k: v.clone() for k, v in state0.items()}
    for name, m in merged.modules.items():
        dense[f"{name}.weight"] = (dense[f"{name}.weight"].double() + m.delta()).float()
    ref = copy.deepcopy(base)
    ref.load_state_dict(dense)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    want = _logits(ref, ids)
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=1e-4,
                               atol=1e-4 * float(want.abs().max()))


@PEFT_QUIET
def test_peft_conv1d_modules_to_save_and_biases(tmp_path):
    """GPT-2-style Conv1D (fan_in_fan_out), modules_to_save and bias='all', with the base as
    the anchor of the dense tensors: PEFT's loaded merge equals the dense merge."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers.pytorch_utils import Conv1D

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 8)
            self.c = Conv1D(5, 8)  # weight [8, 5]: [in, out]
            self.head = torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.c(torch.tanh(self.fc(x)))))

    torch.manual_seed(0)
    base = Net()
    state0 = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    shared = {}
    paths, finetunes = [], []
    for i in range(3):
        lc = LoraConfig(r=2 + i, lora_alpha=4, target_modules=["fc", "c"],
                        modules_to_save=["head"], bias="all")
        model = get_peft_model(copy.deepcopy(base), lc)
        for name, p in model.named_parameters():
            if p.requires_grad:
                s = shared.setdefault(name.replace(".default", ""),
                                      torch.randn((8,) * p.dim(), generator=g))
                s = s[tuple(slice(0, d) for d in p.shape)]
                with torch.no_grad():
                    p.copy_((p if "head" in name or "bias" in name else 0) + 0.3 * s
                            + 0.1 * torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp_path / f"ad{i}")
        finetunes.append({k: v.clone() for k, v in model.merge_and_unload().state_dict().items()})
        paths.append(tmp_path / f"ad{i}")
    merged = merge_lora(paths, base=state0)
    assert merged.modules["c"].fan_in_fan_out and not merged.modules["fc"].fan_in_fan_out
    merged.save(tmp_path / "out")
    dense, _ = merge_state_dicts(state0, finetunes)
    ref = copy.deepcopy(base)
    ref.load_state_dict(dense)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    x = torch.randn(4, 6, generator=g)
    with torch.no_grad():
        want, got = ref(x), loaded(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base(x), want)


@PEFT_QUIET
def test_model_plus_lora_references_are_the_merged_and_unloaded_models(llama, tmp_path):
    """mergekit's ``model+lora``: each input is the base with one adapter applied; the merge
    equals the merge of PEFT's merge_and_unload() state dicts (to float32 rounding), from the
    Python API and from a YAML through the CLI."""
    import yaml

    from tests.conftest import merged_by_cli

    base, state0, paths, finetunes, root = llama
    refs = [f"{root / 'base'}+{p}" for p in paths]
    got, report = merge_state_dicts(str(root / "base"), refs)
    want, _ = merge_state_dicts(state0, finetunes)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert report.models == refs
    doc = {"merge_method": "model_stock", "base_model": str(root / "base"),
           "models": [{"model": refs[0]}, {"model": {"model": {"path": str(root / "base")},
                                  "lora": {"path": str(paths[1])}}},
                      {"model": refs[2], "parameters": {"weight": 1.0}}]}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(doc))
    out = merged_by_cli("--config", str(tmp_path / "m.yml"), "-o", str(tmp_path / "out"),
                        "--no-clamp")
    clamped_off, _ = merge_state_dicts(state0, finetunes, clamp=False)
    for k, v in clamped_off.items():
        torch.testing.assert_close(out[k], v, rtol=1e-5, atol=1e-6, msg=k)
