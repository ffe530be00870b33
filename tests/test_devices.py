"""Device placement without a GPU: every tensor the merge code creates on its data path must be
made on the execution's device. A torch function mode records each tensor factory that
modelstock calls without a ``device`` and would therefore land on the CPU beside CUDA inputs
(as ``--granularity model --device cuda`` once did). `benchmarks/gpu_check.py` checks the real
thing where a GPU exists."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from modelstock import merge_state_dicts
from modelstock.checkpoint import StateDictReader
from modelstock.geometry import inspect_readers
from modelstock.training import PeriodicModelStock
from tests.conftest import make_finetunes

PACKAGE = str(Path(__file__).resolve().parents[1] / "src" / "modelstock")
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.eye,
             torch.arange, torch.stack, torch.cat, torch.zeros_like, torch.triu_indices}


class DeviceAudit(TorchFunctionMode):
    """Records the modelstock lines that create a multi-element tensor without saying where."""

    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES and func not in (torch.stack, torch.cat, torch.zeros_like) \
                and "device" not in kwargs and isinstance(out, torch.Tensor) and out.numel() > 1:
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(PACKAGE):
                frame = frame.f_back
            if frame is not None:
                self.found.add(f"{frame.f_code.co_filename}:{frame.f_lineno}")
        if func in (torch.stack, torch.cat) and args and len(args[0]) > 1:
            devices = {t.device for t in args[0] if isinstance(t, torch.Tensor) and t.ndim}
            assert len(devices) <= 1, f"{func.__name__} of tensors on {devices}"
        return out


RECIPES = [dict(), dict(granularity="row"), dict(granularity="model"),
           dict(method="uniform"), dict(method="wise-ft", alpha=0.3),
           dict(method="linear", weights=(1.0, 2.0, 3.0)), dict(buffers="average"),
           dict(clamp=False, granularity="model")]


@pytest.fixture(scope="module")
def models():
    sds = make_finetunes({"a.weight": (6, 5), "a.bias": (6,), "bn.weight": (6,),
                          "bn.running_mean": (6,), "bn.running_var": (6,)}, n=3)
    for sd in sds:
        sd["bn.num_batches_tracked"] = torch.tensor(5)
    return sds


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: ",".join(f"{k}={v}"
                                                                for k, v in r.items()) or "paper")
def test_merges_create_tensors_on_the_execution_device(models, recipe) -> None:
    audit = DeviceAudit()
    with audit:
        merge_state_dicts(models[0], models[1:], chunk_numel=7, **recipe)
    assert not audit.found, sorted(audit.found)


def test_inspection_and_training_create_tensors_on_the_device(models) -> None:
    audit = DeviceAudit()
    nets = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
            for _ in range(3)]
    with audit:
        inspect_readers(StateDictReader(models[0]), [StateDictReader(m) for m in models[1:]])
        PeriodicModelStock(nets[1:], nets[0]).merge()
    assert not audit.found, sorted(audit.found)


def test_the_audit_can_fail() -> None:
    audit = DeviceAudit()
    with audit:
        from modelstock import stock

        stock.gram(torch.ones(2, 3))  # fine: made on the input's device
        torch.zeros(2, 2)  # not from modelstock: not counted
    assert not audit.found
    code = compile("import torch\ntorch.zeros(3, 3)\n", f"{PACKAGE}/fake.py", "exec")
    with audit:
        exec(code, {})
    assert audit.found == {f"{PACKAGE}/fake.py:2"}
