"""The Hugging Face Trainer callback: two Trainer processes under torchrun, merged periodically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from modelstock import merge_state_dicts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two Trainer processes: ~30 s of CPU
def test_trainer_callback_merges_two_replicas(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", str(ROOT / "tests" / "hf_worker.py"),
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    runs = [json.loads((tmp_path / f"run{r}.json").read_text()) for r in range(2)]
    for r in runs:  # each process trained its own model: no DDP across the replicas
        assert r["world_size"] == 1 and r["ddp"] != "DistributedDataParallel"
        assert [m["step"] for m in r["merges"]] == [2, 4, 5]
        assert all(0 <= m["modelstock_mean_t"] <= 1 for m in r["merges"])
    pre = [torch.load(tmp_path / f"pre{r}.pt", weights_only=True) for r in range(2)]
    post = [torch.load(tmp_path / f"post{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(pre[0]["classifier.weight"], pre[1]["classifier.weight"])
    torch.manual_seed(0)
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    expected, _ = merge_state_dicts(BertForSequenceClassification(config), pre)
    for k, v in expected.items():
        torch.testing.assert_close(post[0][k], v, rtol=1e-6, atol=1e-7, msg=k)
        assert torch.equal(post[0][k], post[1][k]), k


def test_the_callback_takes_the_buffer_policy():
    from modelstock.training.hf import ModelStockCallback

    cb = ModelStockCallback(anchor=torch.nn.Linear(2, 2), buffers="anchor", bucket_numel=1024)
    assert cb._kwargs["buffers"] == "anchor" and cb._kwargs["bucket_numel"] == 1024
