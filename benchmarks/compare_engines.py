"""Bit-for-bit comparison of this checkout's merges with another checkout's (an engine refactor
must not change outputs): same inputs, a list of recipes, one subprocess per merge.

    git worktree add /tmp/ms-old <commit> && (cd /tmp/ms-old && python setup.py build_ext --inplace)
    python benchmarks/compare_engines.py --baseline-src /tmp/ms-old/src

Prints, per recipe, the tensors whose bytes differ (none is the goal).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parents[1] / "src"
RECIPES = {
    "model-stock": [],
    "row": ["--granularity", "row"],
    "model": ["--granularity", "model"],
    "no-clamp": ["--no-clamp"],
    "uniform": ["--method", "uniform"],
    "wise-ft": ["--method", "wise-ft", "--alpha", "0.3"],
    "linear": ["--method", "linear", "--weights", "1,2,0.5"],
    "float32 out": ["--dtype", "float32"],
    "small chunks": ["--chunk-size", "1000"],
    "keep/average": ["--keep-anchor", "*.bias", "--average", "*norm*"],
}


def build(root: Path, dtype: torch.dtype) -> list[str]:
    """An anchor and 3 fine-tunes: matrices, biases, norms, an embedding, an integer buffer."""
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (500, 64), "norm.weight": (64,), "head.bias": (10,),
              **{f"layers.{i}.{n}.weight": (64 * (1 + i % 3), 64) for i in range(6)
                 for n in ("q", "mlp")}, "layers.0.q.bias": (64,)}
    anchor = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    shared = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    paths = []
    for i in range(4):
        sd = {k: (v + (0.0 if i == 0 else 2e-3 * (shared[k] + torch.randn(v.shape, generator=g))))
              .to(dtype) for k, v in anchor.items()}
        sd["position_ids"] = torch.arange(16)
        paths.append(str(root / f"m{i}.safetensors"))
        save_file(sd, paths[-1])
    return paths


def merge(src: Path, paths: list[str], out: Path, flags: list[str]) -> dict[str, torch.Tensor]:
    env = dict(os.environ, PYTHONPATH=str(src))
    subprocess.run([sys.executable, "-m", "modelstock", "merge", *paths, "-o", str(out), "-q",
                    *flags], env=env, check=True)
    return load_file(str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-src", type=Path, required=True)
    a = ap.parse_args()
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for dtype in (torch.bfloat16, torch.float32):
            paths = build(root, dtype)
            for name, flags in RECIPES.items():
                ours = merge(HERE, paths, root / "ours.safetensors", flags)
                theirs = merge(a.baseline_src, paths, root / "theirs.safetensors", flags)
                differ = [k for k in theirs if k not in ours or not torch.equal(
                    ours[k].view(torch.uint8) if ours[k].is_floating_point() else ours[k],
                    theirs[k].view(torch.uint8) if theirs[k].is_floating_point() else theirs[k])]
                differ += [k for k in ours if k not in theirs]
                same &= not differ
                print(f"{str(dtype)[6:]:9s} {name:13s} "
                      f"{'identical' if not differ else 'DIFFERS: ' + ', '.join(differ)}")
                for f in ("ours.safetensors", "theirs.safetensors"):
                    (root / f).unlink()
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
