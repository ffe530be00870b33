"""Our merges against mergekit's own ``mergekit-yaml`` on the same YAML files, where mergekit is
installed (its virtualenv: ``$MERGEKIT_VENV``, default /work/mergekit-venv, made by
``benchmarks/make_mergekit_venv.sh``); skipped elsewhere.

This pins what mergekit 0.1.5 actually computes, not our reading of its source:
- where both are defined the results agree to rounding (a few ulps: mergekit writes
  ``t avg + (1 - t) w0`` and computes its statistics in float32, we ``w0 + t (avg - w0)`` with
  float64 statistics);
- (a) mergekit divides by ``max(|d_i||d_j|, 1e-6)``: a pair of task vectors whose norm product
  is below 1e-6 gets a smaller cosine, hence a smaller ``t``, than the paper's (and ours);
- (b) cos <= 0: mergekit extrapolates (``t < 0``); we clamp to the anchor by default and agree
  with ``clamp=False``; at the pole (cos = -1 for N = 2) and for zero task vectors both give
  the anchor exactly;
- (c) mergekit computes in the configured ``dtype`` (without one, in the inputs' dtype), so
  ``dtype: bfloat16`` means bfloat16 arithmetic; we compute in float32 whatever it says;
- per-model ``parameters`` (``weight``, ``density``, ``filter_wise``) and top-level ones other
  than ``filter_wise`` change nothing in mergekit (we accept them with a warning).

All mergekit merges run in one process (``tests/mergekit_runner.py``): its start-up is ~6 s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from modelstock import MergeOptions, merge_checkpoints
from modelstock.config import load_config, to_mergekit_yaml

VENV = Path(os.environ.get("MERGEKIT_VENV", "/work/mergekit-venv"))
RUNNER = Path(__file__).with_name("mergekit_runner.py")
pytestmark = pytest.mark.skipif(not (VENV / "bin" / "mergekit-yaml").is_file(),
                                reason=f"mergekit is not installed in {VENV} "
                                       "(benchmarks/make_mergekit_venv.sh; or set MERGEKIT_VENV)")

# A Llama of one layer, small enough to merge in milliseconds; mergekit needs its config.json.
H, INTER, VOCAB = 8, 16, 16
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
          "intermediate_size": INTER, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 64,
          "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False}
L0 = "model.layers.0."
SHAPES = {"model.embed_tokens.weight": (VOCAB, H),
          **{L0 + f"self_attn.{n}_proj.weight": (H, H) for n in "qkvo"},
          L0 + "mlp.gate_proj.weight": (INTER, H), L0 + "mlp.up_proj.weight": (INTER, H),
          L0 + "mlp.down_proj.weight": (H, INTER), L0 + "input_layernorm.weight": (H,),
          L0 + "post_attention_layernorm.weight": (H,), "model.norm.weight": (H,),
          "lm_head.weight": (VOCAB, H)}
# The tensors that probe a difference; every other tensor is an ordinary fine-tune (cos ~ 0.5).
TINY = L0 + "self_attn.k_proj.weight"        # |d_i| = 1e-4: norm product 1e-8 < 1e-6
NEG = L0 + "self_attn.v_proj.weight"         # cos = -0.3 (each row's too)
ZERO = L0 + "self_attn.o_proj.weight"        # the second fine-tune left it unchanged
POLE = L0 + "input_layernorm.weight"         # d_2 = -d_1: cos = -1, t's pole for N = 2
ROWS = "lm_head.weight"                       # rows |d_i| = 5e-4 (product 2.5e-7), tensor 2e-3
UNCHANGED = "model.norm.weight"              # no fine-tune moved it
SPECIAL = {TINY, NEG, ZERO, POLE, ROWS, UNCHANGED}
EPS = 1e-6  # mergekit's floor under |d_i||d_j| (mergekit/merge_methods/model_stock.py)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def _rows_unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def build_weights(n: int = 3) -> list[dict[str, torch.Tensor]]:
    """Anchor and ``n`` fine-tunes (float64, cast when saved)."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda shape: torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    w0 = {k: rnd(s) for k, s in SHAPES.items()}
    w0[TINY] *= 1e-4  # so that float32 resolves the tiny steps (its spacing ~1e-11 here)
    shared = {k: rnd(s) for k, s in SHAPES.items()}
    deltas: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for i in range(n):
        for k, s in SHAPES.items():
            deltas[i][k] = 0.05 * (shared[k] + rnd(s))
        deltas[i][TINY] = 1e-4 * _unit(_unit(rnd(SHAPES[TINY])) + 0.8 * _unit(shared[TINY]))
        deltas[i][ROWS] = 5e-4 * _rows_unit(shared[ROWS] + rnd(SHAPES[ROWS]))
        deltas[i][UNCHANGED] = torch.zeros(SHAPES[UNCHANGED], dtype=torch.float64)
    # cos = -0.3 between the first two fine-tunes, for the tensor and for each of its rows
    a, b = _rows_unit(rnd(SHAPES[NEG])), rnd(SHAPES[NEG])
    b = _rows_unit(b - (a * b).sum(dim=-1, keepdim=True) * a)
    deltas[0][NEG] = 0.05 * a
    deltas[1][NEG] = 0.05 * (-0.3 * a + math.sqrt(1 - 0.09) * b)
    deltas[1][ZERO] = torch.zeros(SHAPES[ZERO], dtype=torch.float64)
    deltas[1][POLE] = -deltas[0][POLE]
    return [w0, *({k: w0[k] + d[k] for k in w0} for d in deltas)]


def save_models(root: Path, weights: list[dict[str, torch.Tensor]], dtype: torch.dtype
                ) -> list[str]:
    paths = []
    for i, sd in enumerate(weights):
        d = root / f"{str(dtype)[6:]}-{'base' if i == 0 else f'ft{i}'}"
        d.mkdir()
        save_file({k: v.to(dtype).contiguous() for k, v in sd.items()},
                  str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**CONFIG, "torch_dtype": str(dtype)[6:]}))
        paths.append(str(d))  # absolute: mergekit would look a relative path up on the Hub
    return paths


def model_stock_doc(base: str, fts: list[str], **top) -> dict:
    return {"merge_method": "model_stock", "base_model": base,
            "models": [{"model": m} for m in fts], **top}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every config, merged once by mergekit (one process) and once by us, clamp=False."""
    root = tmp_path_factory.mktemp("parity")
    weights = build_weights()
    f32 = save_models(root, weights, torch.float32)
    bf16 = save_models(root, weights, torch.bfloat16)
    base, fts = f32[0], f32[1:3]
    docs = {
        # as published configs are written: base listed too, a weight on every model
        "tensor": {"merge_method": "model_stock", "base_model": base, "dtype": "float32",
                   "models": [{"model": base, "parameters": {"weight": 1.0}},
                              *({"model": m, "parameters": {"weight": 1.0}} for m in fts)]},
        "tensor-plain": model_stock_doc(base, fts, dtype="float32"),
        "tensor-density": {**model_stock_doc(base, fts, dtype="float32", parameters={
                               "filter_wise": False, "int8_mask": True, "normalize": True}),
                           "models": [{"model": fts[0], "parameters": {"density": 0.5,
                                                                       "weight": 0.3}},
                                      {"model": fts[1], "parameters": {"filter_wise": True}}]},
        "rows": model_stock_doc(base, fts, dtype="float32", parameters={"filter_wise": True}),
        "n3": model_stock_doc(base, f32[1:], dtype="float32"),
        "float64": model_stock_doc(base, fts, dtype="float64", out_dtype="float32"),
        "bf16": model_stock_doc(bf16[0], bf16[1:3], dtype="bfloat16"),
        # what to_mergekit_yaml writes for a clamp=False bfloat16 merge (dtype: float32)
        "bf16-f32": yaml.safe_load(to_mergekit_yaml(
            bf16[0], bf16[1:3], MergeOptions(clamp=False, dtype=torch.bfloat16))),
    }
    argv = []
    for name, doc in docs.items():
        (root / f"{name}.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
        argv += [str(root / f"{name}.yml"), str(root / f"mergekit-{name}")]
    # mergekit starts (~6 s of imports) while we merge
    proc = subprocess.Popen([str(VENV / "bin" / "python"), str(RUNNER), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        out: dict = {"weights": weights, "f32": f32, "bf16": bf16, "docs": docs, "mergekit": {},
                     "ours": {}, "clamped": {}, "reports": {}, "warnings": {}}
        for name in docs:
            cfg = load_config(root / f"{name}.yml")
            out["warnings"][name] = cfg.warnings
            opts = dataclasses.replace(cfg.options, clamp=False)
            report = merge_checkpoints(cfg.anchor, cfg.models, root / f"ours-{name}", opts,
                                       annotate=cfg.annotate)
            assert report.warnings[:len(cfg.warnings)] == list(cfg.warnings)
            out["ours"][name] = load_file(str(root / f"ours-{name}" / "model.safetensors"))
            out["reports"][name] = json.loads(
                (root / f"ours-{name}" / "modelstock_report.json").read_text())
        for name in ("tensor", "rows"):  # our default: clamped
            cfg = load_config(root / f"{name}.yml")
            merge_checkpoints(cfg.anchor, cfg.models, root / f"clamped-{name}", cfg.options)
            out["clamped"][name] = load_file(str(root / f"clamped-{name}" / "model.safetensors"))
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    for name in docs:
        out["mergekit"][name] = load_file(str(root / f"mergekit-{name}" / "model.safetensors"))
    return out


# -- helpers ---------------------------------------------------------------------------------


def ulps(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """|a - b| in units in the last place of ``a``'s dtype, at the larger of their magnitudes
    and ``scale``'s (the inputs': where the merge cancels to near 0, rounding the operands
    still costs an ulp of the operands)."""
    b = b.to(a.dtype)
    info = torch.finfo(a.dtype)
    x, y = a.double(), b.double()
    mag = torch.maximum(x.abs(), y.abs())
    if scale is not None:
        mag = torch.maximum(mag, scale.double().abs())
    mag = mag.clamp_min(info.tiny)
    spacing = torch.exp2(torch.floor(torch.log2(mag))) * info.eps
    return (x - y).abs() / spacing


def scale(w: list[dict[str, torch.Tensor]], name: str, n: int = 2,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elementwise the largest magnitude among the stored anchor and first ``n`` fine-tunes."""
    return torch.stack([sd[name].to(dtype).abs() for sd in w[:n + 1]]).amax(0)


def stock_parts(w: list[dict[str, torch.Tensor]], name: str, *, rows: bool = False,
                eps: float = 0.0, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, ...]:
    """Model Stock in float64 from the stored inputs (``w``: the anchor and the fine-tunes),
    unclamped: the paper's rule with ``eps = 0``, mergekit's (norm product floored at ``eps``)
    with ``eps = EPS``. Returns ``w0``, ``mean(w_i)``, ``t`` and ``dt/dcos``, shaped [rows, -1]
    (one row for the whole tensor unless ``rows``)."""
    w0, *ws = (sd[name].to(dtype).double() for sd in w)
    if not rows or w0.dim() == 1:
        w0, ws = w0.reshape(1, -1), [x.reshape(1, -1) for x in ws]
    else:
        w0, ws = w0.reshape(w0.shape[0], -1), [x.reshape(x.shape[0], -1) for x in ws]
    d = [x - w0 for x in ws]
    cos = []
    for i in range(len(d)):
        for j in range(i + 1, len(d)):
            prod = d[i].norm(dim=-1) * d[j].norm(dim=-1)
            dot = (d[i] * d[j]).sum(dim=-1)
            c = torch.where(prod > 0, dot / prod.clamp_min(max(eps, 1e-300)), 0.0)
            cos.append(c.clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * c
    pole = den.abs() < 1e-6
    safe = torch.where(pole, 1.0, den)
    t = torch.where(pole, 0.0, n * c / safe)
    return w0, sum(ws) / n, t, torch.where(pole, 0.0, n / safe**2)


def stock_reference(w: list[dict[str, torch.Tensor]], name: str, **kw) -> torch.Tensor:
    w0, avg, t, _ = stock_parts(w, name, **kw)
    return (w0 + t * (avg - w0)).reshape(w[0][name].shape)


def rounding_bound(w: list[dict[str, torch.Tensor]], name: str, **kw) -> torch.Tensor:
    """How far two correct float32 implementations may be apart, elementwise: 4 ulps of the
    inputs' magnitude for the output's arithmetic (measured: up to 2, 4 row-wise), plus the
    effect on ``t`` of a cosine off by 1e-6 (8 float32 epsilons: mergekit sums its dot
    products in float32), which the formula magnifies by ``dt/dcos = N / (1 + (N-1) cos)^2``
    where t is large."""
    w0, avg, _, sens = stock_parts(w, name, **kw)
    n = len(w) - 1
    spacing = torch.exp2(torch.floor(torch.log2(scale(w, name, n).double().clamp_min(1e-30))))
    return (4 * spacing * torch.finfo(torch.float32).eps
            + (sens * 1e-6 * (avg - w0).abs()).reshape(w[0][name].shape))


def within_rounding(a: torch.Tensor, b: torch.Tensor, w: list[dict[str, torch.Tensor]],
                    name: str, **kw) -> bool:
    """``a`` and ``b`` (one a float64 reference, say) are `rounding_bound` apart at most."""
    return bool(((a.double() - b.double()).abs() <= rounding_bound(w, name, **kw)).all())


def effective_t(w: list[dict[str, torch.Tensor]], name: str, out: torch.Tensor,
                n: int = 2) -> float:
    """The ratio t that maps the anchor to ``out`` along ``mean(w_i) - w0`` (least squares)."""
    w0 = w[0][name].float().double()
    step = sum(sd[name].float().double() for sd in w[1:n + 1]) / n - w0
    return float(((out.double() - w0) * step).sum() / (step * step).sum())


# -- where both are defined: agreement to rounding --------------------------------------------


@pytest.mark.parametrize("name", ["tensor", "n3", "rows", "float64"])
def test_agrees_with_mergekit_to_rounding_where_both_are_defined(runs, name: str) -> None:
    mk, ours = runs["mergekit"][name], runs["ours"][name]
    assert mk.keys() == ours.keys() == set(SHAPES)
    differs = {TINY} | ({ROWS} if name == "rows" else set())
    w = runs["weights"][:4 if name == "n3" else 3]
    for k in SHAPES:
        assert mk[k].dtype == ours[k].dtype == torch.float32, k
        if k in differs:
            continue
        gap = (mk[k].double() - ours[k].double()).abs()
        bound = rounding_bound(w, k, rows=name == "rows")
        assert (gap <= bound).all(), f"{name} {k}: {float((gap / bound).max()):.2f}x the bound"


def test_per_model_parameters_change_nothing_in_mergekit(runs) -> None:
    """The published-config shape (base listed, weights), weight/density/filter_wise per
    model and other methods' parameters at the top: mergekit's output is bit-identical to the
    plain config's, and so is ours."""
    mk, ours = runs["mergekit"], runs["ours"]
    for name in ("tensor", "tensor-density"):
        for k in SHAPES:
            assert torch.equal(mk[name][k], mk["tensor-plain"][k]), (name, k)
            assert torch.equal(ours[name][k], ours["tensor-plain"][k]), (name, k)
    assert runs["warnings"]["tensor-plain"] == ()
    assert len(runs["warnings"]["tensor"]) == 1 and "weight" in runs["warnings"]["tensor"][0]
    per_model, top = runs["warnings"]["tensor-density"]
    assert all(p in per_model for p in ("density", "weight", "filter_wise"))
    assert all(p in top for p in ("int8_mask", "normalize")) and "filter_wise" not in top
    assert runs["reports"]["tensor-density"]["warnings"][:2] == [per_model, top]


# -- (a) tiny task vectors --------------------------------------------------------------------


def test_tiny_task_vectors_mergekit_floors_the_norm_product(runs) -> None:
    w = runs["weights"]
    d1, d2 = (w[i][TINY].float().double() - w[0][TINY].float().double() for i in (1, 2))
    prod = float(d1.norm() * d2.norm())
    cos = float((d1 * d2).sum()) / prod
    assert prod < EPS and cos > 0.3
    mk, ours = runs["mergekit"]["tensor"][TINY], runs["ours"]["tensor"][TINY]
    # ours: the paper's t; mergekit: t from cos * prod / 1e-6
    assert within_rounding(ours, stock_reference(w[:3], TINY), w[:3], TINY)
    assert within_rounding(mk, stock_reference(w[:3], TINY, eps=EPS), w[:3], TINY, eps=EPS)
    t_ours = runs["reports"]["tensor"]["layers"]
    t_ours = next(x["t"] for x in t_ours if x["name"] == TINY)
    assert t_ours == pytest.approx(2 * cos / (1 + cos), rel=1e-6)
    t_mk = effective_t(w, TINY, mk)
    cos_mk = cos * prod / EPS
    assert t_mk == pytest.approx(2 * cos_mk / (1 + cos_mk), rel=1e-3)
    assert t_mk < 0.05 < 0.5 < t_ours
    # rows: in filter_wise mode each row's norm product (2.5e-7) is below the floor, the
    # tensor's (4e-6) is not: only the row-wise merge differs
    mk, ours = runs["mergekit"], runs["ours"]
    assert within_rounding(mk["tensor"][ROWS], ours["tensor"][ROWS], w[:3], ROWS)
    assert within_rounding(mk["rows"][ROWS], stock_reference(w[:3], ROWS, rows=True, eps=EPS),
                           w[:3], ROWS, rows=True, eps=EPS)
    assert within_rounding(ours["rows"][ROWS], stock_reference(w[:3], ROWS, rows=True),
                           w[:3], ROWS, rows=True)
    assert ulps(mk["rows"][ROWS], ours["rows"][ROWS], scale(w, ROWS)).max() > 100


# -- (b) cos <= 0 -----------------------------------------------------------------------------


def test_negative_cos_mergekit_extrapolates_we_clamp_by_default(runs) -> None:
    w = runs["weights"]
    anchor = w[0][NEG].float()
    for name in ("tensor", "rows"):
        mk, ours = runs["mergekit"][name][NEG], runs["ours"][name][NEG]
        assert within_rounding(mk, ours, w[:3], NEG, rows=name == "rows")  # clamp=False
        assert torch.equal(runs["clamped"][name][NEG], anchor)  # default: the anchor
        assert not torch.allclose(mk, anchor)
    t_mk = effective_t(w, NEG, runs["mergekit"]["tensor"][NEG])
    layer = next(x for x in runs["reports"]["tensor"]["layers"] if x["name"] == NEG)
    assert layer["cos"] < 0 and t_mk == pytest.approx(layer["t"], rel=1e-5) and t_mk < -0.5


def test_pole_and_zero_task_vectors_give_the_anchor_in_both(runs) -> None:
    w = runs["weights"]
    for name in ("tensor", "rows", "float64"):
        for k in (POLE, ZERO, UNCHANGED):
            anchor = w[0][k].float()
            assert torch.equal(runs["mergekit"][name][k], anchor), (name, k)
            assert torch.equal(runs["ours"][name][k], anchor), (name, k)


# -- (c) the compute dtype --------------------------------------------------------------------


def test_mergekit_computes_in_the_configured_dtype(runs) -> None:
    """``dtype: bfloat16``: mergekit's arithmetic is bfloat16, ours float32; with ``dtype:
    float32`` (what to_mergekit_yaml writes beside out_dtype) both round once to bfloat16."""
    w = runs["weights"]
    assert runs["docs"]["bf16-f32"]["dtype"] == "float32"
    worst = {"mergekit": 0.0, "ours": 0.0, "mergekit-f32": 0.0}
    off = {key: 0 for key in worst}
    total = 0
    for k in SHAPES:
        if k in SPECIAL:
            continue
        ref = stock_reference(w[:3], k, dtype=torch.bfloat16).to(torch.bfloat16)
        total += ref.numel()
        for key, out in (("mergekit", runs["mergekit"]["bf16"][k]),
                         ("ours", runs["ours"]["bf16"][k]),
                         ("mergekit-f32", runs["mergekit"]["bf16-f32"][k])):
            assert out.dtype == torch.bfloat16
            u = ulps(out, ref, scale(w, k, dtype=torch.bfloat16))
            worst[key] = max(worst[key], float(u.max()))
            off[key] += int((u > 0).sum())
        assert torch.equal(runs["ours"]["bf16"][k], runs["ours"]["bf16-f32"][k])
    # measured: mergekit's bfloat16 arithmetic leaves 192 of 584 elements 1 ulp off the
    # correctly rounded result, ours none (float32 arithmetic, one rounding)
    assert worst["ours"] <= 1 and worst["mergekit-f32"] <= 1 and worst["mergekit"] <= 2
    assert off["ours"] <= total // 100 and off["mergekit-f32"] <= total // 100
    assert off["mergekit"] >= total // 10


def test_measured_differences(runs) -> None:
    """Prints the measured figures that the README quotes (``pytest -s`` shows them)."""
    w = runs["weights"]
    lines = []
    for name in ("tensor", "n3", "rows", "float64"):
        n = 3 if name == "n3" else 2
        u = max(float(ulps(runs["mergekit"][name][k], runs["ours"][name][k],
                           scale(w, k, n)).max())
                for k in SHAPES if k not in {TINY, ROWS})
        lines.append(f"{name}: max {u:g} float32 ulps apart outside the tiny tensors")
    t_ours = next(x["t"] for x in runs["reports"]["tensor"]["layers"] if x["name"] == TINY)
    lines.append(f"tiny: t ours {t_ours:.6f}, mergekit "
                 f"{effective_t(w, TINY, runs['mergekit']['tensor'][TINY]):.6f}")
    neg = next(x for x in runs["reports"]["tensor"]["layers"] if x["name"] == NEG)
    lines.append(f"negative: cos {neg['cos']:.4f}, t ours(no clamp) {neg['t']:.6f}, mergekit "
                 f"{effective_t(w, NEG, runs['mergekit']['tensor'][NEG]):.6f}, ours(clamp) 0")
    for key in ("bf16", "bf16-f32"):
        us = [ulps(runs["mergekit"][key][k], runs["ours"][key][k],
                   scale(w, k, dtype=torch.bfloat16)) for k in SHAPES if k not in SPECIAL]
        n = sum(x.numel() for x in us)
        lines.append(f"{key}: mergekit vs ours: {sum(int((x > 0).sum()) for x in us)}/{n} "
                     f"elements differ, max {max(float(x.max()) for x in us):g} bf16 ulps")
    print("\n" + "\n".join(lines))
    assert math.isfinite(t_ours)
