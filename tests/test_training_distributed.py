"""Model Stock across processes (gloo): equals the in-process merge, follows the documented
norm-weighted rule for N > 2, and fails with a clear error when a replica dies or hangs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modelstock import ModelStockError, merge_state_dicts, stock
from modelstock.training.distributed import DistributedModelStock, norm_weighted_cos

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
sys.path.insert(0, str(WORKER.parent))
from dist_worker import tiny_net  # noqa: E402


def launch(out: Path, world: int, **flags) -> list[subprocess.CompletedProcess]:
    """Start ``world`` worker processes (gloo over a file store) and wait for all of them."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
           "OMP_NUM_THREADS": "1"}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    procs = [subprocess.Popen([sys.executable, str(WORKER), f"--store={out / 'store'}",
                               f"--rank={r}", f"--world={world}", f"--out={out}", *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    done = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=240)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def load(out: Path, kind: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"{kind}{rank}.pt", weights_only=True)


@pytest.mark.parametrize("per_replica,granularity,anchor_dtype", [
    (1, "tensor", None),
    # 4 ranks = 2 replicas of 2 ranks with DDP inside each, the anchor kept in bfloat16
    pytest.param(2, "row", "bfloat16", marks=pytest.mark.slow),
])
def test_two_replicas_merge_like_in_process_and_a_hung_replica_times_out(
        tmp_path, per_replica, granularity, anchor_dtype):
    """The merge across 2 replicas equals the in-process merge; then the last rank never
    reaches the next merge and the others must give up after the 5 s timeout."""
    world = 2 * per_replica
    flags = {"anchor_dtype": anchor_dtype} if anchor_dtype else {}
    runs = launch(tmp_path, world, per_replica=per_replica, granularity=granularity, timeout=5,
                  then="hang", **flags)
    for r in runs:
        assert r.returncode == 0, r.stdout
    pre = [load(tmp_path, "pre", r) for r in range(world)]
    post = [load(tmp_path, "post", r) for r in range(world)]
    leaders = pre[::per_replica]
    for r in range(world):  # DDP keeps a replica's parameters identical (BatchNorm statistics
        for k in pre[0]:    # are rank-local until DDP's next forward broadcasts the first rank's)
            if "running" not in k:
                assert torch.equal(pre[r][k], leaders[r // per_replica][k]), k
    assert not torch.equal(leaders[0]["0.weight"], leaders[1]["0.weight"])
    dtype = getattr(torch, anchor_dtype) if anchor_dtype else torch.float32
    anchor = {k: v.to(dtype).float() if v.is_floating_point() else v
              for k, v in tiny_net().state_dict().items()}
    expected, rep = merge_state_dicts(anchor, leaders, granularity=granularity)
    for r in range(world):
        for k, v in expected.items():
            torch.testing.assert_close(post[r][k], v, rtol=1e-6, atol=1e-7, msg=k)
            assert torch.equal(post[r][k], post[0][k]), k  # every rank ends bit-identical
    got = json.loads((tmp_path / "report0.json").read_text())["layers"]
    for mine, ref in zip(got, rep.layers, strict=True):
        assert mine["rule"] == ref.rule
        if ref.t is not None:
            assert mine["t"] == pytest.approx(ref.t, abs=1e-6)
            assert mine.get("t_min") == (None if ref.t_min is None
                                         else pytest.approx(ref.t_min, abs=1e-6))
            assert mine["cos"] == pytest.approx(ref.cos, abs=1e-6)
    for r in range(world - 1):
        seconds, message = (tmp_path / f"error{r}.txt").read_text().split("\n", 1)
        assert "merge #2" in message and "failed" in message and "timeout 5 s" in message
        assert "no weight was changed" in message


def reference_norm_weighted(w0: torch.Tensor, ws: list[torch.Tensor]) -> np.ndarray:
    """The documented N > 2 rule from pairwise float64 dot products (not from the sums)."""
    w0 = w0.double().numpy().ravel()
    ds = [w.double().numpy().ravel() - w0 for w in ws]
    dots = sum(ds[i] @ ds[j] for i in range(len(ds)) for j in range(i + 1, len(ds)))
    weights = sum(np.linalg.norm(ds[i]) * np.linalg.norm(ds[j])
                  for i in range(len(ds)) for j in range(i + 1, len(ds)))
    cos = dots / weights if weights > 0 else 0.0
    n = len(ds)
    t = min(max(n * cos / (1 + (n - 1) * cos), 0.0), 1.0)
    return w0 + t * np.mean(ds, axis=0)


def test_three_replicas_use_the_norm_weighted_cosine_and_a_dead_one_is_reported(tmp_path):
    runs = launch(tmp_path, 3, then="die", timeout=60)
    assert [r.returncode for r in runs] == [0, 0, 3], [r.stdout for r in runs]
    pre = [load(tmp_path, "pre", r) for r in range(3)]
    post = [load(tmp_path, "post", r) for r in range(3)]
    base = tiny_net().state_dict()
    report = json.loads((tmp_path / "report0.json").read_text())
    rules = {x["name"]: x for x in report["layers"]}
    weighted_differs = False
    for k, w0 in base.items():
        if rules[k]["rule"] != "model_stock":
            continue
        want = reference_norm_weighted(w0, [p[k] for p in pre])
        for r in range(3):
            np.testing.assert_allclose(post[r][k].double().numpy().ravel(), want,
                                       rtol=1e-5, atol=1e-6, err_msg=k)
        # the data make the rule matter: norms differ, so it is not the plain mean cosine
        plain = float(stock.mean_pairwise_cos(stock.gram(stock.task_vectors(
            w0.reshape(-1), [p[k].reshape(-1) for p in pre]))))
        weighted_differs |= abs(plain - rules[k]["cos"]) > 1e-3
    assert weighted_differs
    assert any("norm-weighted" in w for w in report["warnings"])
    bn = (pre[0]["1.running_mean"] + pre[1]["1.running_mean"] + pre[2]["1.running_mean"]) / 3
    torch.testing.assert_close(post[0]["1.running_mean"], bn)
    for r in range(2):
        message = (tmp_path / f"error{r}.txt").read_text()
        assert "merge #2" in message and "failed" in message


def test_norm_weighted_cos_is_the_paper_cosine_for_two_and_equal_norms():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(2, 50, generator=g, dtype=torch.float64)
    d[1] = 0.6 * d[0] + d[1]
    total = (d.sum(0) ** 2).sum()
    exact = stock.mean_pairwise_cos(stock.gram(d))
    assert float(norm_weighted_cos(total, (d**2).sum(1))) == pytest.approx(float(exact), 1e-12)
    # N = 3 with equal norms: the weighted mean is the plain mean of the pairwise cosines
    d = torch.randn(3, 40, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True) * 2.5
    got = norm_weighted_cos((d.sum(0) ** 2).sum(), (d**2).sum(1))
    assert float(got) == pytest.approx(float(stock.mean_pairwise_cos(stock.gram(d))), 1e-12)
    # per-row statistics ([N, R]) and zero vectors: no NaN, cos 0 when no pair is nonzero
    assert torch.equal(norm_weighted_cos(torch.zeros(4), torch.zeros(3, 4)),
                       torch.zeros(4, dtype=torch.float64))


def test_distributed_needs_an_initialized_process_group():
    with pytest.raises(ModelStockError, match="init_process_group"):
        DistributedModelStock(tiny_net(), tiny_net())
