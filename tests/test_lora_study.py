"""The LoRA seed study's pure pieces on toy factors: cache keys, dense weights, geometry."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

pytest.importorskip("sklearn")  # experiments.evaluation needs it (dev extra)
lora_study = pytest.importorskip("experiments.lora_study")

from modelstock import merge_state_dicts  # noqa: E402
from modelstock.lora import inspect_lora, lora_adapter_from_state_dict, merge_lora  # noqa: E402

PREFIX = "base_model.model."
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q", "k"],
          "modules_to_save": ["head"]}


def toy(seed: int, base: dict[str, torch.Tensor]):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in ("layer.q", "layer.k"):
        out, inp = base[name + ".weight"].shape
        state[f"{PREFIX}{name}.lora_A.weight"] = torch.randn(2, inp, generator=g)
        state[f"{PREFIX}{name}.lora_B.weight"] = torch.randn(out, 2, generator=g)
    state[f"{PREFIX}head.weight"] = (  # as PEFT saves modules_to_save
        base["head.weight"] + 0.1 * torch.randn(base["head.weight"].shape, generator=g))
    return lora_adapter_from_state_dict(state, CONFIG, f"toy{seed}")


@pytest.fixture
def base():
    g = torch.Generator().manual_seed(100)
    return {"layer.q.weight": torch.randn(6, 5, generator=g),
            "layer.k.weight": torch.randn(7, 5, generator=g),
            "layer.norm.weight": torch.ones(5),
            "head.weight": torch.randn(3, 5, generator=g)}


def test_keys_cover_settings_and_seed():
    r = lora_study.RECIPES["lr1e-3"]
    assert r.key(0) == r.key(0) and r.key(0).startswith("lora-")
    keys = {r.key(0), r.key(1), r.key(), lora_study.RECIPES["lr3e-3"].key(0),
            replace(r, lora=replace(r.lora, r=16)).key(0)}
    assert len(keys) == 5
    assert r.with_seed(3).key(3) == r.key(3)
    shared = lora_study.RECIPES["lr1e-3-shared-init"]
    assert shared.key(1) != r.key(1) and shared.key(1) != shared.key(2)


def test_dense_weights_and_factor_route_equals_dense_route(base):
    ads = [toy(s, base) for s in (0, 1)]
    dense = [lora_study.dense_weights(base, a) for a in ads]
    m = ads[0].modules["layer.q"]
    assert torch.allclose(dense[0]["layer.q.weight"],
                          base["layer.q.weight"] + 2.0 * m.B @ m.A, atol=1e-5)
    assert dense[0]["layer.norm.weight"] is base["layer.norm.weight"]  # untouched: shared
    fac = lora_study.dense_weights(base, merge_lora(ads, base=base))
    den, _ = merge_state_dicts(base, dense, method="model-stock")
    for k, v in den.items():
        assert torch.allclose(fac[k], v, rtol=1e-5, atol=1e-5), k


def test_geometry_from_factors(base):
    ads = [toy(s, base) for s in range(4)]
    geo = lora_study.lora_geometry(ads, [0, 1, 2, 3], base)
    assert len(geo["pairs"]) == 6
    recs = {r["name"]: r for r in geo["layers"]}
    assert {r["kind"] for r in recs.values()} == {"lora", "head"}
    # the angle of one pair, by hand from the dense deltas
    d = [a.modules["layer.q"].delta() for a in ads[:2]]
    cos = float((d[0] * d[1]).sum() / (d[0].norm() * d[1].norm()))
    pair = lora_study.lora_layers(inspect_lora(ads[:2]), {"layer.q", "layer.k"})
    q = next(r for r in pair if r["name"] == "layer.q")
    assert math.isclose(q["angle_mean"], math.degrees(math.acos(cos)), abs_tol=1e-6)
    # mean / std over the 6 pairs, and the per-kind summary
    r = recs["layer.q"]
    angs = []
    for i, j in itertools.combinations(range(4), 2):
        a, b = ads[i].modules["layer.q"].delta(), ads[j].modules["layer.q"].delta()
        angs.append(math.degrees(math.acos(float((a * b).sum() / (a.norm() * b.norm())))))
    assert math.isclose(r["angle_mean"], sum(angs) / 6, abs_tol=1e-6)
    s = geo["summary"]["lora"]
    assert s["layers"] == 2 and s["angle_range"][0] <= s["angle_mean"] <= s["angle_range"][1]
    assert 0 <= geo["pairs"][0]["t_median"] <= 1
