"""The CLIP ImageNet GPU recipe, dry-run on CPU with its tiny stand-in tower and synthetic data."""

from __future__ import annotations

import json

import torch
from experiments import clip_imagenet
from experiments.periodic import periodic_available


def test_dry_run_every_step(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = clip_imagenet.dry_run(tmp_path, log=lambda *_: None)
    finally:
        torch.set_num_threads(before)
    names = [r["checkpoint"].rsplit("/", 1)[-1] for r in result["rows"]]
    assert names[:4] == ["zeroshot", "ft-s0", "ft-s1", "model-stock"]
    assert any(n.startswith("periodic-") for n in names) == periodic_available()
    for r in result["rows"]:
        assert set(r) >= {"imagenet", "shift_noise", "shift_subset", "ood"}
        assert 0.0 <= r["ood"] <= 1.0
    report = json.loads((tmp_path / "model-stock" / "modelstock_report.json").read_text())
    assert report["method"] == "model-stock" and report["n_models"] == 2
    assert json.loads((tmp_path / "evaluation.json").read_text()) == result["rows"]
