"""Shared fixtures: tiny synthetic fine-tunes, and running the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src"


def make_finetunes(shapes: dict[str, tuple[int, ...]], n: int = 2, dtype=torch.float32,
                   seed: int = 0, step: float = 0.05) -> list[dict[str, torch.Tensor]]:
    """Anchor + ``n`` fine-tunes sharing a direction (so cos > 0), as state dicts."""
    g = torch.Generator().manual_seed(seed)
    anchor = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    shared = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = []
    for _ in range(n):
        models.append({k: (v.float() + step * (shared[k] + torch.randn(v.shape, generator=g)))
                       .to(dtype) for k, v in anchor.items()})
    return [anchor, *models]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess:
    """``modelstock ARGS`` in a fresh interpreter, importing this checkout's code."""
    env = dict(os.environ, PYTHONPATH=str(SRC), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "modelstock", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def merged_by_cli(*args: str) -> dict[str, torch.Tensor]:
    """Run ``modelstock merge ARGS -q`` in-process; return every tensor it wrote."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from modelstock.cli import main

    result = CliRunner().invoke(main, ["merge", *args, "-q"])
    assert result.exit_code == 0, result.output
    out = Path(args[args.index("-o") + 1])
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: small models on shared cores run 5-20x slower
    with two (OpenMP teams spin-wait while the other core is busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
