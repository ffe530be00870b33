"""Inspecting costs no more than a merge's Gram pass (it is that pass).

Writes a synthetic transformer-shaped model (anchor + N fine-tunes, safetensors) to a temporary
directory, then times, alternately and ``--repeat`` times each: a full merge to disk, a merge's
Gram pass alone (plan, then `Merger.coefficients` per Model Stock tensor), and `inspect`.
Prints the median and the minimum of wall time and of process CPU time (steadier on a shared
machine), and their ratios against the baselines measured in the same run.

    python benchmarks/bench_inspect.py [--blocks 12] [--width 512] [--n 2] [--repeat 5]
                                       [--threads T]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelstock import merge_checkpoints, open_checkpoint
from modelstock.engine import Merger
from modelstock.geometry import inspect_checkpoints
from modelstock.plan import plan_merge
from modelstock.recipe import Execution, Recipe


def synthetic(blocks: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"embeddings.word_embeddings.weight": torch.randn(4 * width, width, generator=g)}
    for i in range(blocks):
        p = f"encoder.layer.{i}."
        for m in ("attention.query", "attention.key", "attention.value", "output.dense"):
            sd[p + m + ".weight"] = torch.randn(width, width, generator=g) / width**0.5
            sd[p + m + ".bias"] = torch.randn(width, generator=g) * 0.02
        sd[p + "LayerNorm.weight"] = torch.ones(width)
        sd[p + "LayerNorm.bias"] = torch.zeros(width)
    return sd


def gram_pass(anchor: str, models: list[str]) -> None:
    """What a merge does before writing: plan, then the Gram statistics and t of every layer."""
    readers = [open_checkpoint(p) for p in [anchor, *models]]
    try:
        plan = plan_merge(readers[0], readers[1:], Recipe())
        merger = Merger(readers[0], readers[1:], Recipe(), Execution(), sink=None)
        for p in plan.layers:
            if p.rule.has_stats:
                merger.coefficients(p)
    finally:
        for r in readers:
            r.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--n", type=int, default=2, help="fine-tunes")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        anchor = synthetic(args.blocks, args.width)
        save_file(anchor, root / "anchor.safetensors")
        models = []
        for i in range(args.n):
            g = torch.Generator().manual_seed(100 + i)
            ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in anchor.items()}
            models.append(str(root / f"ft{i}.safetensors"))
            save_file(ft, models[-1])
        a = str(root / "anchor.safetensors")
        params = sum(v.numel() for v in anchor.values())
        print(f"model: {len(anchor)} tensors, {params / 1e6:.1f} M params, float32, "
              f"N={args.n}, torch threads={torch.get_num_threads()}")
        jobs = {
            "merge (to disk)": lambda i: merge_checkpoints(a, models, root / f"out{i}"),
            "merge's Gram pass": lambda i: gram_pass(a, models),
            "inspect": lambda i: inspect_checkpoints(a, models),
        }
        wall: dict[str, list[float]] = {k: [] for k in jobs}
        cpu: dict[str, list[float]] = {k: [] for k in jobs}
        for job in jobs.values():  # warm-up: page cache, allocator, imports
            job("warm")
        for i in range(args.repeat):
            for name, job in jobs.items():
                w, c = time.perf_counter(), time.process_time()
                job(i)
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
        for clock, runs in (("wall", wall), ("cpu", cpu)):
            med = {k: statistics.median(v) for k, v in runs.items()}
            low = {k: min(v) for k, v in runs.items()}
            for k in jobs:
                print(f"{clock:4s} {k:18s} median {med[k]:.3f} s  min {low[k]:.3f} s")
            for base in ("merge's Gram pass", "merge (to disk)"):
                print(f"{clock:4s} inspect / {base:18s} median {med['inspect'] / med[base]:.2f}"
                      f"  min {low['inspect'] / low[base]:.2f}")

if __name__ == "__main__":
    main()
