"""NaN or Inf in any input is refused (naming the file and tensor) by every rule, also those
without a statistics pass (WiSE-FT, uniform soups, BatchNorm statistics that follow their
layer), and in periodic training; ``allow_nonfinite`` lets them through."""

from __future__ import annotations

import copy

import pytest
import torch

from modelstock import ModelStockError, merge_state_dicts
from modelstock.training import PeriodicModelStock
from tests.conftest import make_finetunes

SHAPES = {"conv.weight": (4, 3), "bn.weight": (4,), "bn.running_mean": (4,),
          "bn.running_var": (4,)}
METHODS = [dict(), dict(method="uniform"), dict(method="wise-ft", alpha=0.5),
           dict(method="linear", weights=(1.0, 2.0)), dict(granularity="model")]


@pytest.mark.parametrize("bad", ["conv.weight", "bn.running_var", "bn.running_mean"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("recipe", METHODS, ids=lambda r: str(r) or "model-stock")
def test_every_rule_refuses_nonfinite_inputs(bad: str, value: float, recipe: dict) -> None:
    anchor, *fts = make_finetunes(SHAPES, n=2)
    fts[1][bad][1] = value
    with pytest.raises(ModelStockError, match=f"model 1|{bad}.*NaN or Inf|NaN or Inf"):
        merge_state_dicts(anchor, fts, **recipe)
    out, _ = merge_state_dicts(anchor, fts, allow_nonfinite=True, **recipe)
    assert not torch.isfinite(out[bad]).all()


def test_periodic_training_refuses_a_diverged_model() -> None:
    base = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    models = [copy.deepcopy(base) for _ in range(2)]
    with torch.no_grad():
        for m in models:
            m[0].weight.add_(0.01 * torch.randn(4, 3))
        models[0][1].running_var[0] = float("nan")
    with pytest.raises(ModelStockError, match="running_var"):
        PeriodicModelStock(models, base).merge()
    assert torch.isfinite(models[1][1].running_var).all()  # nothing spread to the other
