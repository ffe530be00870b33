"""Model Stock during training, in one process: the periodic merge equals the post-hoc merge."""

from __future__ import annotations

import copy

import pytest
import torch

from modelstock import ModelStockError, merge_state_dicts
from modelstock.training import PeriodicModelStock


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))


def train_steps(models, optimizers, steps: int, seeds=None, pms=None):
    """Train each model on its own random batches (seed i), calling ``pms.step()`` each step."""
    gens = [torch.Generator().manual_seed(s) for s in (seeds or range(len(models)))]
    reports = []
    for _ in range(steps):
        for m, opt, g in zip(models, optimizers, gens, strict=True):
            x = torch.randn(32, 6, generator=g)
            y = torch.randint(0, 3, (32,), generator=g)
            loss = torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if pms is not None:
            reports.append(pms.step())
    return reports


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("granularity", ["tensor", "row", "model"])
def test_merge_equals_post_hoc_merge(n, granularity):
    base = tiny_net()
    models = [copy.deepcopy(base) for _ in range(n)]
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-2) for m in models]
    train_steps(models, opts, 5)
    before = [snapshot(m) for m in models]
    expected, expected_report = merge_state_dicts(base, before, granularity=granularity)
    report = PeriodicModelStock(models, base, granularity=granularity).merge()
    for m in models:
        got = m.state_dict()
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(got[k], v), k
    assert [x.t for x in report.layers] == [x.t for x in expected_report.layers]
    assert [x.rule for x in report.layers] == [x.rule for x in expected_report.layers]
    rules = {x.name: x.rule for x in report.layers}
    assert rules["1.running_mean"] == "follow" and rules["1.num_batches_tracked"] == "follow"
    assert rules["0.weight"] == "model_stock"
    # the merge really moved the weights (it is not the identity on diverged models)
    assert not torch.equal(before[0]["0.weight"], models[0].state_dict()["0.weight"])


def test_step_merges_every_period_and_counts_epochs():
    base = tiny_net()
    models = [copy.deepcopy(base) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    pms = PeriodicModelStock(models, base, period=3, unit="epoch", optimizers=opts)
    reports = train_steps(models, opts, 7, pms=pms)
    assert [r is not None for r in reports] == [False, False, True, False, False, True, False]
    assert pms.state_dict() == {"steps": 7, "merges": 2}
    assert pms.last_report is reports[5]
    # after a merge the models are identical
    train_steps(models, opts, 2, pms=pms)  # steps 8, 9: merges at 9
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_period_one_on_identical_replicas_is_a_no_op():
    """Identical replicas (same data) merged after every step follow a lone model's trajectory.
    (SGD: Adam would amplify the merge's rounding on the bias before BatchNorm, whose gradient is
    zero up to rounding, into steps of size lr.)"""
    base = tiny_net()
    alone = copy.deepcopy(base)
    train_steps([alone], [torch.optim.SGD(alone.parameters(), lr=0.1, momentum=0.9)], 6,
                seeds=[7])
    models = [copy.deepcopy(base) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    pms = PeriodicModelStock(models, base, period=1, optimizers=opts)
    reports = train_steps(models, opts, 6, seeds=[7, 7], pms=pms)
    assert len([r for r in reports if r is not None]) == 6
    for r in reports:
        for layer in r.layers:
            if layer.rule == "model_stock" and max(layer.norms) > 0:
                assert layer.t == pytest.approx(1.0, abs=1e-6), layer.name
    ref = alone.state_dict()
    for m in models:
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6)


def adam_pair(lr=1e-2):
    base = tiny_net()
    models = [copy.deepcopy(base) for _ in range(2)]
    opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in models]
    return base, models, opts


def test_optimizer_state_keep_carries_moments_over():
    base, models, opts = adam_pair()
    train_steps(models, opts, 3)
    moments = [{id(p): (s["exp_avg"].clone(), s["exp_avg_sq"].clone(), float(s["step"]))
                for p, s in o.state.items()} for o in opts]
    PeriodicModelStock(models, base, optimizers=opts, optimizer_state="keep").merge()
    for o, before in zip(opts, moments, strict=True):
        assert len(o.state) == len(before)
        for p, s in o.state.items():
            m, v, step = before[id(p)]
            assert torch.equal(s["exp_avg"], m) and torch.equal(s["exp_avg_sq"], v)
            assert float(s["step"]) == step == 3
    train_steps(models, opts, 1)
    assert all(float(s["step"]) == 4 for o in opts for s in o.state.values())


def test_optimizer_state_reset_restarts_adam():
    lr = 1e-2
    base, models, opts = adam_pair(lr)
    train_steps(models, opts, 3)
    PeriodicModelStock(models, base, optimizers=opts, optimizer_state="reset").merge()
    assert all(len(o.state) == 0 for o in opts)
    merged = snapshot(models[0])
    train_steps(models, opts, 1)
    assert all(float(s["step"]) == 1 for o in opts for s in o.state.values())
    # Adam's first step after a reset is lr * g / (|g| + eps): about lr per element, as documented
    step = (models[0].state_dict()["0.weight"] - merged["0.weight"]).abs()
    assert step.max() <= lr * (1 + 1e-5)
    assert (step > 0.9 * lr).float().mean() > 0.9


def test_anchor_is_copied_and_may_be_kept_in_lower_precision():
    base = tiny_net()
    models = [copy.deepcopy(base) for _ in range(2)]
    train_steps(models, [torch.optim.AdamW(m.parameters(), lr=3e-2) for m in models], 4)
    before = [snapshot(m) for m in models]
    rounded = {k: (v.to(torch.bfloat16).float() if v.is_floating_point() else v)
               for k, v in base.state_dict().items()}
    pms = PeriodicModelStock(models, base, anchor_dtype=torch.bfloat16)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(1.0)  # the anchor was copied: changing the pretrained module changes nothing
    assert pms.anchor["0.weight"].dtype == torch.bfloat16
    expected, _ = merge_state_dicts(rounded, before)
    pms.merge()
    for k, v in models[0].state_dict().items():
        assert v.dtype == before[0][k].dtype
        assert torch.equal(v, expected[k]), k


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.conv = torch.nn.Conv2d(4, 4, 3)
        self.out = torch.nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight


def test_tied_and_channels_last_weights():
    torch.manual_seed(0)
    base = Tied().to(memory_format=torch.channels_last)
    assert not base.conv.weight.is_contiguous()
    models = [copy.deepcopy(base) for _ in range(2)]
    with torch.no_grad():
        for i, m in enumerate(models):
            g = torch.Generator().manual_seed(i)
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    before = [snapshot(m) for m in models]
    expected, _ = merge_state_dicts(base, before)
    report = PeriodicModelStock(models, base).merge()
    assert [x.name for x in report.layers].count("emb.weight") == 1
    assert "out.weight" not in [x.name for x in report.layers]
    for m in models:
        assert m.out.weight is m.emb.weight
        assert not m.conv.weight.is_contiguous()
        for k, v in m.state_dict().items():
            assert torch.equal(v, expected[k]), k


def test_bad_arguments_are_user_errors():
    base = tiny_net()
    two = [copy.deepcopy(base) for _ in range(2)]
    with pytest.raises(ModelStockError, match="at least 2"):
        PeriodicModelStock(two[:1], base)
    with pytest.raises(ModelStockError, match="period"):
        PeriodicModelStock(two, base, period=0)
    with pytest.raises(ModelStockError, match="unit"):
        PeriodicModelStock(two, base, unit="batch")
    with pytest.raises(ModelStockError, match="optimizer_state"):
        PeriodicModelStock(two, base, optimizer_state="average")
    with pytest.raises(ModelStockError, match="granularity"):
        PeriodicModelStock(two, base, granularity="layer")
    with pytest.raises(ModelStockError, match="lack"):
        PeriodicModelStock(two, {**base.state_dict(), "head.weight": torch.zeros(2)})


def test_a_rounded_anchor_biasing_small_task_vectors_is_warned_about():
    """float32 models whose task vectors are ~1e-5 per element: a bfloat16 anchor's rounding
    error (~1e-3) is the same in every task vector and drags cos towards 1."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4096, generator=g)
    shared = torch.randn(4096, generator=g)
    base = torch.nn.Linear(4096, 1, bias=False)
    models = [copy.deepcopy(base) for _ in range(2)]
    with torch.no_grad():
        base.weight.copy_(w0)
        for m in models:
            m.weight.copy_(w0 + 1e-5 * (0.6 * shared + torch.randn(4096, generator=g)))
    before = [snapshot(m) for m in models]
    _, exact = merge_state_dicts(base, before)
    exact_cos = exact.layers[0].cos
    assert 0.2 < exact_cos < 0.4
    with pytest.warns(RuntimeWarning, match="rounding"):
        report = PeriodicModelStock([copy.deepcopy(m) for m in models], base,
                                    anchor_dtype=torch.bfloat16).merge()
    assert report.layers[0].cos > 0.8  # the bias itself
    message = next(w for w in report.warnings if "rounding" in w)
    assert "worst weight: 100% of" in message and "anchor_dtype=None" in message
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = PeriodicModelStock(models, base).merge()  # an exact anchor: no warning
    assert report.layers[0].cos == pytest.approx(exact_cos, abs=1e-9)


def test_the_rounding_warning_looks_at_rows_when_each_row_has_its_own_ratio():
    """One row barely moves: its task vectors are mostly the anchor's rounding, which biases
    that row's t (granularity row), not the whole tensor's (granularity tensor)."""
    import warnings

    g = torch.Generator().manual_seed(1)
    base = torch.nn.Linear(512, 8, bias=False)
    models = [copy.deepcopy(base) for _ in range(2)]
    with torch.no_grad():
        base.weight.copy_(torch.randn(8, 512, generator=g))
        for m in models:
            step = torch.randn(8, 512, generator=g) * 0.1
            step[0] *= 1e-3  # row 0: ~1e-4 per element, about bfloat16's rounding of w0
            m.weight.copy_(base.weight + step)
    with pytest.warns(RuntimeWarning, match="rounding"):
        PeriodicModelStock([copy.deepcopy(m) for m in models], base, granularity="row",
                           anchor_dtype=torch.bfloat16).merge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeriodicModelStock([copy.deepcopy(m) for m in models], base, granularity="tensor",
                           anchor_dtype=torch.bfloat16).merge()
