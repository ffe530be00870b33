"""``--device cuda`` against the CPU: same output, and how much faster. For the day a GPU is lent.

One short, self-contained run (about a minute on a GPU machine, most of it building the models):
builds small Llama-shaped checkpoints, merges them on the CPU and on CUDA with every recipe
that places tensors differently (tensor/row/model granularity, the one-pass methods, BatchNorm
followers), checks that the CUDA outputs equal the CPU ones (bit for bit, or to float32
rounding where CUDA's reductions sum in another order), then times one larger merge on each
device in alternating rounds and prints the ratio.

    python benchmarks/gpu_check.py --workdir /tmp/gpu-check --layers 4 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import build_models  # noqa: E402

from modelstock import merge_checkpoints, merge_state_dicts  # noqa: E402

RECIPES = [dict(), dict(granularity="row"), dict(granularity="model"), dict(clamp=False),
           dict(method="uniform"), dict(method="wise-ft", alpha=0.4),
           dict(method="linear", weights=(1.0, 3.0))]


def bn_models() -> list[dict[str, torch.Tensor]]:
    """A conv + BatchNorm anchor and two fine-tunes (running statistics follow their layer)."""
    g = torch.Generator().manual_seed(0)
    anchor = {"c.weight": torch.randn(8, 4, 3, 3, generator=g), "bn.weight": torch.ones(8),
              "bn.bias": torch.zeros(8), "bn.running_mean": torch.zeros(8),
              "bn.running_var": torch.ones(8), "bn.num_batches_tracked": torch.tensor(0)}
    fts = []
    for _ in range(2):
        ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point()
              else v + 10 for k, v in anchor.items()}
        fts.append(ft)
    return [anchor, *fts]


def compare(cpu: dict[str, torch.Tensor], gpu: dict[str, torch.Tensor], what: str) -> bool:
    ok = True
    for k, v in cpu.items():
        w = gpu[k].cpu()
        if torch.equal(v, w):
            continue
        close = torch.allclose(v.double(), w.double(), rtol=1e-6, atol=1e-7)
        print(f"  {what}: {k} {'within float32 rounding' if close else 'DIFFERS'} "
              f"(max |diff| {float((v.double() - w.double()).abs().max()):.3g})")
        ok &= close
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/modelstock-gpu-check"))
    ap.add_argument("--layers", type=int, default=4, help="layers of the timed model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="the device to check against the CPU "
                                                     "(cpu: a dry run of this script)")
    a = ap.parse_args()
    dev = a.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else dev
    print(f"device: {name}, torch {torch.__version__}")
    small = build_models(a.workdir, 1, 2, torch.bfloat16)
    ok = True
    for recipe in RECIPES:
        cpu, _ = merge_state_dicts(small[0], small[1:], **recipe)
        gpu, _ = merge_state_dicts(small[0], small[1:], device=dev, **recipe)
        ok &= compare(cpu, gpu, str(recipe or "model-stock"))
    bn = bn_models()
    for buffers in ("follow", "anchor", "average"):
        cpu, _ = merge_state_dicts(bn[0], bn[1:], buffers=buffers)
        gpu, _ = merge_state_dicts(bn[0], bn[1:], buffers=buffers, device=dev)
        ok &= compare(cpu, gpu, f"buffers={buffers}")
    print(f"outputs: {f'{dev} matches the CPU' if ok else 'MISMATCH'}")

    big = build_models(a.workdir, a.layers, 2, torch.bfloat16)
    times: dict[str, list[float]] = {"cpu": [], dev: []}
    for _ in range(a.rounds):
        for device in times:
            start = time.perf_counter()
            merge_checkpoints(big[0], big[1:], a.workdir / "out", device=device, force=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[device].append(time.perf_counter() - start)
    for device, ts in times.items():
        print(f"{device:5s} merge of {a.layers} layers: " + " ".join(f"{t:.2f}s" for t in ts))
    ratios = [g / c for g, c in zip(times[dev], times["cpu"], strict=True)]
    print(f"{dev}/cpu per round: " + " ".join(f"{x:.2f}x" for x in ratios))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
