"""The engine reuses output buffers; a sink declares (``holds``) how many chunks it may still
read after `write` returns, and the engine must not overwrite those."""

from __future__ import annotations

import collections

import pytest
import torch

from modelstock import engine
from modelstock.checkpoint import StateDictReader
from modelstock.engine import Merger, worker_pool
from modelstock.plan import plan_merge
from modelstock.recipe import Execution, Recipe
from tests.conftest import make_finetunes


class HoldingSink:
    """Keeps the last ``holds`` chunks it was given (as a background writer would) and checks,
    at every write, that none of them changed since it got it."""

    def __init__(self, holds: int) -> None:
        self.holds = holds
        self.kept: collections.deque = collections.deque(maxlen=holds)
        self.writes = 0

    def write(self, name: str, chunk: torch.Tensor) -> None:
        for old, copy in self.kept:
            assert torch.equal(old, copy), "a chunk the sink still holds was overwritten"
        if self.holds:
            self.kept.append((chunk, chunk.clone()))
        self.writes += 1


@pytest.mark.parametrize("holds", [0, 1, 3, 6])
def test_the_engine_never_overwrites_what_the_sink_holds(monkeypatch, holds: int) -> None:
    monkeypatch.setattr(engine, "OUT_BYTES", 64)  # many small output pieces per tensor
    sds = make_finetunes({f"l{i}.weight": (40, 8) for i in range(6)}, n=2)
    readers = [StateDictReader(sd) for sd in sds]
    recipe, execution = Recipe(), Execution(threads=2)
    plan = plan_merge(readers[0], readers[1:], recipe)
    sink = HoldingSink(holds)
    with worker_pool(execution) as pool:
        Merger(readers[0], readers[1:], recipe, execution, sink, pool=pool).run(plan)
    assert sink.writes > 6 * (holds + engine.COMPUTING)  # the ring wrapped around many times


def test_a_sink_must_declare_what_it_holds() -> None:
    sds = make_finetunes({"w": (3, 3)}, n=2)
    readers = [StateDictReader(sd) for sd in sds]

    class Undeclared:
        def write(self, name, chunk):
            pass

    with pytest.raises(AttributeError):
        Merger(readers[0], readers[1:], Recipe(), Execution(), Undeclared())
    bad = HoldingSink(0)
    bad.holds = -1
    with pytest.raises(TypeError, match="holds"):
        Merger(readers[0], readers[1:], Recipe(), Execution(), bad)
