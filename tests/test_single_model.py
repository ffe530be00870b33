"""Model Stock's ratio needs a pair of task vectors: one fine-tune is a clear error everywhere
(never a NaN from a mean over zero pairs); the other methods take one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from modelstock import ModelStockError, merge_state_dicts, model_stock, stock
from modelstock.training import PeriodicModelStock
from tests.conftest import make_finetunes, run_cli


def test_the_tensor_function_refuses_one_model() -> None:
    w0 = torch.zeros(4)
    with pytest.raises(ModelStockError, match="at least 2"):
        model_stock(w0, [w0 + 1])
    with pytest.raises(ModelStockError, match="at least 2"):
        stock.mean_pairwise_cos(torch.ones(1, 1, dtype=torch.float64))
    with pytest.raises(ModelStockError, match="at least 2"):
        stock.stock_ratio(0.5, 1)


def test_merge_refuses_one_model_for_model_stock_only() -> None:
    anchor, ft = make_finetunes({"w": (3, 3)}, n=1)
    with pytest.raises(ModelStockError, match="model-stock needs at least 2"):
        merge_state_dicts(anchor, [ft])
    out, _ = merge_state_dicts(anchor, [ft], method="wise-ft", alpha=1.0)
    torch.testing.assert_close(out["w"], ft["w"])


def test_cli_refuses_one_model_in_one_line(tmp_path) -> None:
    paths = []
    for i, sd in enumerate(make_finetunes({"w": (3, 3)}, n=1)):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(sd, paths[-1])
    proc = run_cli("merge", *paths, "-o", str(tmp_path / "out"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "at least 2" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_training_refuses_one_model() -> None:
    net = torch.nn.Linear(2, 2)
    with pytest.raises(ModelStockError, match="at least 2"):
        PeriodicModelStock([net], net)
