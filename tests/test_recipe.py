"""Recipe, Execution and MergeOptions: what is validated, and how options are given."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from modelstock import Execution, MergeOptions, ModelStockError, Recipe, merge_state_dicts
from modelstock.checkpoint import StateDictReader
from modelstock.plan import plan_merge
from tests.conftest import make_finetunes, run_cli


@pytest.mark.parametrize("device", ["meta", "nonsense", "cuda:7"])
def test_unusable_devices_are_one_line_errors(device: str, tmp_path) -> None:
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    with pytest.raises(ModelStockError, match="device"):
        Execution(device=device)
    proc = run_cli("merge", "a", "b", "c", "-o", str(tmp_path / "out"), "--device", device)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "device" in proc.stderr


def test_dtypes_must_be_torch_dtypes() -> None:
    with pytest.raises(ModelStockError, match="torch dtype"):
        MergeOptions(dtype="bfloat16")


def test_options_may_be_a_recipe_an_execution_or_both() -> None:
    anchor, *fts = make_finetunes({"w": (4, 4)}, n=2)
    _, rep = merge_state_dicts(anchor, fts, Recipe(method="wise-ft", alpha=0.25))
    assert rep.method == "wise-ft" and rep.layers[0].t == 0.25
    out, rep = merge_state_dicts(anchor, fts, Execution(chunk_numel=3, threads=1))
    want, _ = merge_state_dicts(anchor, fts)
    assert rep.method == "model-stock" and torch.equal(out["w"], want["w"])
    opts = MergeOptions.of(Recipe(granularity="row"), Execution(chunk_numel=5))
    assert opts.recipe == Recipe(granularity="row") and opts.execution.chunk_numel == 5
    assert dataclasses.replace(opts, clamp=False).recipe.clamp is False
    with pytest.raises(TypeError):
        merge_state_dicts(anchor, fts, {"method": "uniform"})


class CountingInfos(dict):
    """Counts the names iterated over: planning one tensor must not walk the whole model."""

    walked = 0

    def __iter__(self):
        for k in super().__iter__():
            CountingInfos.walked += 1
            yield k


def test_planning_one_tensor_does_not_walk_the_checkpoint() -> None:
    sds = make_finetunes({f"l{i}": (2,) for i in range(2000)}, n=2)
    readers = [StateDictReader(sd) for sd in sds]
    for r in readers:
        r.infos = CountingInfos(r.infos)
    CountingInfos.walked = 0
    plan = plan_merge(readers[0], readers[1:], Recipe(), only=["l7"])
    assert [p.name for p in plan.layers] == ["l7"]
    assert CountingInfos.walked < 50
