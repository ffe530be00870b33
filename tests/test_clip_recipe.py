"""The CLIP ImageNet GPU recipe, dry-run on CPU with its tiny stand-in tower and synthetic data."""

from __future__ import annotations

import json

import torch
from experiments import clip_imagenet


def test_dry_run_every_step(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = clip_imagenet.dry_run(tmp_path, log=lambda *_: None)
    finally:
        torch.set_num_threads(before)
    names = [r["checkpoint"].rsplit("/", 1)[-1] for r in result["rows"]]
    # Periodic Model Stock (every 4 steps, seeds 0+1) included: the library has it.
    assert names == ["zeroshot", "ft-s0", "ft-s1", "model-stock", "periodic-4step-0+1"]
    for r in result["rows"]:
        assert set(r) >= {"imagenet", "shift_noise", "shift_subset", "ood"}
        assert 0.0 <= r["ood"] <= 1.0
    report = json.loads((tmp_path / "model-stock" / "modelstock_report.json").read_text())
    assert report["method"] == "model-stock" and report["n_models"] == 2
    assert json.loads((tmp_path / "evaluation.json").read_text()) == result["rows"]
