"""One rank of the distributed tests (started by tests/test_training_distributed.py).

Trains a tiny model for a few steps (each replica on its own data and learning rate, so that the
replicas' task vectors differ in direction and norm; ``--frozen R`` keeps replica R's weights
at the anchor, with BatchNorm statistics still moving), saves its weights before and after one
`DistributedModelStock.merge`, and the merge report. Then, with ``--then die`` or ``--then hang``,
the last rank leaves (exits, or never reaches the next merge) and the others try a second merge,
which must fail with a clear error: they write it to ``error<rank>.txt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from modelstock import ModelStockError
from modelstock.training.distributed import DistributedModelStock, replica_group


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--per-replica", type=int, default=1)
    ap.add_argument("--then", default="stop", choices=["stop", "die", "hang"])
    ap.add_argument("--granularity", default="tensor")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--anchor-dtype", default=None, help="e.g. bfloat16")
    ap.add_argument("--frozen", type=int, default=-1, help="a replica that does not train")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{a.store}", rank=a.rank,
                            world_size=a.world, timeout=timedelta(seconds=60))
    replica, local = divmod(a.rank, a.per_replica)
    base = tiny_net()
    model = tiny_net()
    if a.per_replica > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, process_group=replica_group(a.per_replica))
    lr = 0.0 if replica == a.frozen else 0.01 * (1 + replica)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1000 * replica + local)
    for _ in range(4):
        x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dms = DistributedModelStock(model, base, optimizers=[opt], granularity=a.granularity,
                                ranks_per_replica=a.per_replica, timeout=a.timeout,
                                anchor_dtype=a.anchor_dtype and getattr(torch, a.anchor_dtype))
    inner = model.module if a.per_replica > 1 else model
    torch.save({k: v.clone() for k, v in inner.state_dict().items()}, f"{a.out}/pre{a.rank}.pt")
    dist.barrier()  # line the ranks up, so that only a real failure meets the merge's timeout
    report = dms.merge()
    torch.save(inner.state_dict(), f"{a.out}/post{a.rank}.pt")
    with open(f"{a.out}/report{a.rank}.json", "w") as f:
        f.write(report.to_json())
    if a.then == "stop":
        dist.destroy_process_group()
        sys.exit(0)
    dist.barrier()
    if a.rank == a.world - 1:
        if a.then == "die":
            os._exit(3)
        deadline = time.monotonic() + 120  # "hang": stay alive but never merge
        while not os.path.exists(f"{a.out}/error0.txt") and time.monotonic() < deadline:
            time.sleep(0.2)
        os._exit(0)
    start = time.perf_counter()
    try:
        dms.merge()
    except ModelStockError as e:
        with open(f"{a.out}/error{a.rank}.txt.tmp", "w") as f:
            f.write(f"{time.perf_counter() - start:.3f}\n{e}\n")
        os.replace(f"{a.out}/error{a.rank}.txt.tmp", f"{a.out}/error{a.rank}.txt")
    os._exit(0)  # the process group is broken: skip its teardown


if __name__ == "__main__":
    main()
