"""The Lightning callback: two single-device Trainer processes under torchrun, merged periodically,
one of them resumed from a checkpoint (tests/lightning_worker.py is one replica).

Lightning itself is only imported by the replicas: importing it here would cost the test
process seconds, and one run of the replicas (about 12 s on 2 cores) serves all the checks.
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelstock import merge_state_dicts

ROOT = Path(__file__).resolve().parents[1]
needs_lightning = pytest.mark.skipif(importlib.util.find_spec("pytorch_lightning") is None,
                                     reason="pytorch_lightning is not installed")
# Merges, by snapshot key (run A, then run B resumed from A's checkpoint; counts of steps or
# epochs): A merges every 2 and at its end (3), B every 2 and not again at its end (6).
MERGES = ["A2", "A3end", "B4", "B6"]


def run_replicas(out: Path, unit: str) -> tuple[list[dict], list[dict]]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", str(ROOT / "tests" / "lightning_worker.py"),
                          str(out), "--unit", unit], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    runs = [json.loads((out / f"run{r}.json").read_text()) for r in range(2)]
    snaps = [torch.load(out / f"snapshots{r}.pt", weights_only=True) for r in range(2)]
    return runs, snaps


@pytest.fixture(scope="module")
def by_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning_steps")
    return out, *run_replicas(out, "step")


def check_merges(snaps: list[dict]) -> None:
    """After every merge both replicas hold bit-identical weights, the post-hoc Model Stock merge
    of their weights just before it; training moves them apart again until the next one."""
    anchor = snaps[0]["anchor"]
    assert all(torch.equal(anchor[k], snaps[1]["anchor"][k]) for k in anchor)
    for key in MERGES:
        pre = [s["pre"][key] for s in snaps]
        post = [s["post"][key] for s in snaps]
        assert not torch.equal(pre[0]["net.0.weight"], pre[1]["net.0.weight"]), key
        expected, _ = merge_state_dicts(anchor, pre)
        assert expected.keys() == post[0].keys()
        for k, v in expected.items():
            torch.testing.assert_close(post[0][k], v, rtol=1e-6, atol=1e-7, msg=f"{key} {k}")
            assert torch.equal(post[0][k], post[1][k]), f"{key} {k}"
    for s in snaps:  # training went on from each merge (the replicas diverge again, above)
        for merged, later in [("A2", "A3end"), ("B4", "B6")]:
            assert not torch.equal(s["post"][merged]["net.3.weight"],
                                   s["pre"][later]["net.3.weight"])
        # run B continued from the checkpoint taken after step 3, before run A's end merge
        assert all(torch.equal(v, s["pre"]["A3end"][k]) for k, v in s["ckpt"]["A"].items())
        # B's last step merged, so B's end did not merge again
        assert all(torch.equal(v, s["pre"]["B6end"][k]) for k, v in s["post"]["B6"].items())
        assert all(torch.equal(v, s["post"]["B6end"][k]) for k, v in s["post"]["B6"].items())


def check_schedule(runs: list[dict], per_count: int) -> None:
    """Merges at the right counts and with the right numbers, across a resume; the checkpoint
    carries the callback's position; every replica records the same statistics."""
    for r in runs:
        assert r["steps_a"] == 3 * per_count and r["steps_b"] == 6 * per_count
        assert [h["step"] for h in r["history_a"]] == [2 * per_count, 3 * per_count]
        assert [h["modelstock_merge"] for h in r["history_a"]] == [1, 2]
        assert [h["step"] for h in r["history_b"]] == [4 * per_count, 6 * per_count]
        assert [h["modelstock_merge"] for h in r["history_b"]] == [2, 3]
        assert r["merges_b"] == 3
        [state] = r["ckpt_callbacks"].values()
        assert state == {"steps": 3, "merges": 1, "merged_at": 2}
        for h in r["history_a"] + r["history_b"]:
            assert 0 <= h["modelstock_mean_t"] <= 1 and 0 <= h["modelstock_mean_angle"] <= 180
    histories = [r["history_a"] + r["history_b"] for r in runs]
    assert histories[0] == histories[1]


@needs_lightning
def test_each_process_trains_its_own_replica(by_steps):
    _, runs, _ = by_steps
    for r in runs:
        assert all(r["env_before"].values()) and not any(r["env_after"].values())
        # no DDP across the replicas: each Trainer is one process on one device, rank zero
        assert r["world_size"] == 1 and r["global_rank"] == 0 and r["rank_zero"] == 0
        assert r["strategy"] == "SingleDeviceStrategy"
        assert "init_replica_process_group" in r["refused_ddp"]
        assert r["layers"]["net.0.weight"] == "model_stock"


@needs_lightning
def test_merges_every_period_steps_equal_the_post_hoc_merge(by_steps):
    _, _, snaps = by_steps
    check_merges(snaps)


@needs_lightning
def test_resume_keeps_the_schedule_and_every_replica_logs_it(by_steps):
    out, runs, _ = by_steps
    check_schedule(runs, per_count=1)
    for r, run in enumerate(runs):  # replica 1 logs too: every replica is its own rank zero
        history = run["history_a"] + run["history_b"]
        logged = []
        for name in ("A", "B"):
            with open(out / f"logs{r}" / name / "metrics.csv") as f:
                logged += [row for row in csv.DictReader(f) if row["modelstock_merge"]]
        assert [float(row["modelstock_merge"]) for row in logged] == [1, 2, 2, 3]
        assert [float(row["modelstock_mean_t"]) for row in logged] == pytest.approx(
            [h["modelstock_mean_t"] for h in history])
        # on Lightning's step axis: that of the batch after which the merge ran
        assert [int(row["step"]) for row in logged] == [1, 2, 3, 5]


@pytest.mark.slow  # the same with unit="epoch" (epochs of 2 batches): another ~12 s
@needs_lightning
def test_merges_every_period_epochs(tmp_path):
    _, runs, snaps = (tmp_path, *run_replicas(tmp_path, "epoch"))
    check_merges(snaps)
    check_schedule(runs, per_count=2)


def test_only_the_lightning_module_imports_lightning():
    """Lightning stays optional: no other module of the package imports it."""
    src = ROOT / "src" / "modelstock"
    own = src / "training" / "lightning.py"
    for path in sorted(src.rglob("*.py")):
        if path == own:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names), \
                f"{path.relative_to(ROOT)} imports {names}"
