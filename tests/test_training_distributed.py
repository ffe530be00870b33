"""Model Stock across processes (gloo): equals the post-hoc merge for every N (the paper's mean
of pairwise cosines, also with a replica that did not move), and fails with a clear error when a
replica dies or hangs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelstock import ModelStockError, merge_state_dicts, stock
from modelstock.training.distributed import DistributedModelStock

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
        if ref.cos is not None:
            assert mine["cos"] == pytest.approx(ref.cos, abs=1e-6)
    for r in range(world - 1):
        seconds, message = (tmp_path / f"error{r}.txt").read_text().split("\n", 1)
        assert "merge #2" in message and "failed" in message and "timeout 5 s" in message
        assert "no weight was changed" in message


def assert_equals_post_hoc(tmp_path: Path, world: int, granularity: str = "tensor") -> dict:
    """Every rank's merged weights equal `merge_state_dicts` of the replicas' weights, and the
    report's cos and t equal the post-hoc report's; returns rank 0's report."""
    pre = [load(tmp_path, "pre", r) for r in range(world)]
    post = [load(tmp_path, "post", r) for r in range(world)]
    expected, rep = merge_state_dicts(tiny_net().state_dict(), pre, granularity=granularity)
    for r in range(world):
        for k, v in expected.items():
            torch.testing.assert_close(post[r][k], v, rtol=1e-5, atol=1e-6, msg=k)
            assert torch.equal(post[r][k], post[0][k]), k
    report = json.loads((tmp_path / "report0.json").read_text())
    for mine, ref in zip(report["layers"], rep.layers, strict=True):
        assert mine["rule"] == ref.rule, ref.name
        if ref.t is not None:
            assert mine["t"] == pytest.approx(ref.t, abs=1e-5), ref.name
        if ref.cos is not None and ref.rule == "model_stock" and granularity == "tensor":
            assert mine["cos"] == pytest.approx(ref.cos, abs=1e-5), ref.name
    return report


def test_three_replicas_with_a_frozen_one_equal_post_hoc_and_a_dead_one_is_reported(tmp_path):
    """Replica 2 does not train: its task vectors are zero, so each pair with it has cos 0 and
    the mean of the three pairwise cosines is a third of the other pair's (a norm-weighted
    mean would give the other pair's cosine)."""
    runs = launch(tmp_path, 3, then="die", timeout=60, frozen=2)
    assert [r.returncode for r in runs] == [0, 0, 3], [r.stdout for r in runs]
    report = assert_equals_post_hoc(tmp_path, 3)
    pre = [load(tmp_path, "pre", r) for r in range(3)]
    base = tiny_net().state_dict()
    layer = next(x for x in report["layers"] if x["name"] == "0.weight")
    d = stock.task_vectors(base["0.weight"].reshape(-1), [p["0.weight"].reshape(-1)
                                                         for p in pre[:2]], torch.float64)
    pair = float(stock.mean_pairwise_cos(stock.gram(d)))
    assert layer["norms"][2] == 0 and pair > 0.05
    assert layer["cos"] == pytest.approx(pair / 3, abs=1e-6)
    for r in range(2):
        message = (tmp_path / f"error{r}.txt").read_text()
        assert "merge #2" in message and "failed" in message


@pytest.mark.slow
def test_four_replicas_equal_post_hoc(tmp_path):
    runs = launch(tmp_path, 4, then="stop", timeout=60, frozen=3)
    assert all(r.returncode == 0 for r in runs), [r.stdout for r in runs]
    assert_equals_post_hoc(tmp_path, 4)


def test_four_replicas_per_row_equal_post_hoc(tmp_path):
    runs = launch(tmp_path, 4, then="stop", timeout=60, granularity="row")
    assert all(r.returncode == 0 for r in runs), [r.stdout for r in runs]
    assert_equals_post_hoc(tmp_path, 4, "row")


def test_mean_cos_from_units_is_the_mean_of_pairwise_cosines():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 5):
        d = torch.randn(n, 60, generator=g, dtype=torch.float64)
        d[1] = 0.6 * d[0] + d[1]
        d[1] *= 7.0  # unequal norms: a norm-weighted mean would differ
        d[-1] = 0.0 if n > 2 else d[-1]  # a zero task vector counts as cos 0
        norms = d.norm(dim=1, keepdim=True)
        u = torch.where(norms > 0, d / torch.where(norms > 0, norms, 1.0), 0.0)
        got = stock.mean_cos_from_units((u.sum(0) ** 2).sum(), int((norms > 0).sum()), n)
        assert float(got) == pytest.approx(float(stock.mean_pairwise_cos(stock.gram(d))),
                                           abs=1e-12)


def test_distributed_needs_an_initialized_process_group():
    with pytest.raises(ModelStockError, match="init_process_group"):
        DistributedModelStock(tiny_net(), tiny_net())
