"""BatchNorm running statistics follow the coefficient of their own layer (or the recipe's
explicit buffer policy), and `update_bn` re-estimates them from data."""

from __future__ import annotations

import copy

import pytest
import torch

from modelstock import MergeOptions, ModelStockError, merge_state_dicts, update_bn


def conv_bn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))


def trained(base: torch.nn.Module, seed: int, steps: int = 3) -> dict[str, torch.Tensor]:
    """A fine-tune of ``base``: weights and BatchNorm statistics both move."""
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=g) * (1 + seed) + seed
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def nets():
    base = conv_bn()
    base(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    anchor = {k: v.detach().clone() for k, v in base.state_dict().items()}
    anchor["1.running_var"] = torch.ones(4)  # a known value, so interpolation is checkable
    anchor["1.num_batches_tracked"] = torch.tensor(0)
    base.load_state_dict(anchor)
    fts = [trained(base, s) for s in (1, 2)]
    for i, ft in enumerate(fts):
        ft["1.running_var"] = torch.full((4,), 2.0 + i)  # 2 and 3
    return anchor, fts


STATS = ("1.running_mean", "1.running_var")


def test_wise_ft_alpha_zero_is_the_anchor_everywhere(nets) -> None:
    anchor, fts = nets
    out, report = merge_state_dicts(anchor, fts, method="wise-ft", alpha=0.0)
    for k, v in anchor.items():
        assert torch.equal(out[k], v), k  # weights *and* running statistics and the counter


def test_classic_wise_ft_interpolates_running_statistics(nets) -> None:
    anchor, fts = nets
    out, report = merge_state_dicts(anchor, fts[:1], method="wise-ft", alpha=0.5)
    torch.testing.assert_close(out["1.running_var"], torch.full((4,), 1.5))
    layer = next(x for x in report.layers if x.name == "1.running_var")
    assert layer.rule == "follow" and layer.t == 0.5 and "1.weight" in layer.note
    n = int(fts[0]["1.num_batches_tracked"])
    assert int(out["1.num_batches_tracked"]) == round(0.5 * n)


def test_model_stock_statistics_take_their_layers_t(nets) -> None:
    anchor, fts = nets
    out, report = merge_state_dicts(anchor, fts)
    layers = {x.name: x for x in report.layers}
    t = layers["1.weight"].t
    assert 0 < t < 1 and layers["1.running_var"].t == t
    for k in STATS:
        want = anchor[k] + t * ((fts[0][k] + fts[1][k]) / 2 - anchor[k])
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-7)


def test_model_stock_at_t_zero_keeps_the_anchors_statistics(nets) -> None:
    anchor, fts = nets
    opposite = copy.deepcopy(fts)
    for k in ("1.weight",):  # task vectors pointing apart: cos < 0, t = 0
        opposite[1][k] = 2 * anchor[k] - opposite[0][k]
    out, report = merge_state_dicts(anchor, opposite)
    assert next(x for x in report.layers if x.name == "1.weight").t == 0.0
    for k in (*STATS, "1.num_batches_tracked"):
        assert torch.equal(out[k], anchor[k]), k


def test_explicit_policies(nets) -> None:
    anchor, fts = nets
    out, _ = merge_state_dicts(anchor, fts, buffers="anchor")
    for k in (*STATS, "1.num_batches_tracked"):
        assert torch.equal(out[k], anchor[k]), k
    out, _ = merge_state_dicts(anchor, fts, buffers="average")
    for k in STATS:
        torch.testing.assert_close(out[k], (fts[0][k] + fts[1][k]) / 2)
    assert torch.equal(out["1.num_batches_tracked"], fts[0]["1.num_batches_tracked"])
    with pytest.raises(ModelStockError, match="buffer policy"):
        MergeOptions(buffers="first")


def test_statistics_follow_a_linear_merges_weights(nets) -> None:
    anchor, fts = nets
    out, _ = merge_state_dicts(anchor, fts, method="linear", weights=(3.0, 1.0))
    torch.testing.assert_close(out["1.running_var"], torch.full((4,), 0.75 * 2 + 0.25 * 3))


def test_keep_anchor_on_the_layer_keeps_its_statistics(nets) -> None:
    anchor, fts = nets
    out, _ = merge_state_dicts(anchor, fts, keep_anchor=("1.weight",))
    for k in STATS:
        assert torch.equal(out[k], anchor[k]), k


def test_update_bn_reestimates_statistics_from_data() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5, momentum=0.3))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, generator=g) * 2 + 1 for _ in range(4)]
    model.eval()
    update_bn([(x, None) for x in batches], model)
    with torch.no_grad():
        h = model[0](torch.cat(batches))
    torch.testing.assert_close(model[1].running_mean, h.mean(0), rtol=1e-5, atol=1e-6)
    # unbiased variance per batch, averaged over the batches (cumulative average)
    var = torch.stack([model[0](x).var(0) for x in batches]).mean(0).detach()
    torch.testing.assert_close(model[1].running_var, var, rtol=1e-5, atol=1e-6)
    assert not model.training and model[1].momentum == 0.3  # restored
    # dict batches (Hugging Face loaders) are passed as keywords
    calls = []
    update_bn([{"x": batches[0]}], model, forward=lambda m, b: calls.append(sorted(b)))
    assert calls == [["x"]]


def test_the_counter_of_a_layer_without_weight_follows_its_statistics() -> None:
    """BatchNorm(affine=False): no weight to follow; the counter goes where running_var goes."""
    anchor = {"bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3),
              "bn.num_batches_tracked": torch.tensor(0)}
    fts = [{"bn.running_mean": torch.full((3,), 0.5 + i), "bn.running_var": torch.full((3,), 2.0),
            "bn.num_batches_tracked": torch.tensor(3)} for i in range(2)]
    out, _ = merge_state_dicts(anchor, fts, method="wise-ft", alpha=0.0)
    for k, v in anchor.items():
        assert torch.equal(out[k], v), k
    out, _ = merge_state_dicts(anchor, fts, method="wise-ft", alpha=1.0)
    assert int(out["bn.num_batches_tracked"]) == 3


def test_integer_counters_of_a_linear_merge_are_rounded_exactly() -> None:
    anchor = {"bn.weight": torch.ones(2), "bn.num_batches_tracked": torch.tensor(0)}
    fts = [{"bn.weight": torch.ones(2) * 2, "bn.num_batches_tracked": torch.tensor(n)}
           for n in (100, 103)]
    out, _ = merge_state_dicts(anchor, fts, method="linear", weights=(3.0, 1.0))
    assert int(out["bn.num_batches_tracked"]) == 101  # 100.75, rounded (not truncated)
    big = [{"bn.weight": torch.ones(2) * 2, "bn.num_batches_tracked": torch.tensor(n)}
           for n in (33554433, 33554435)]  # beyond float32's integers
    out, _ = merge_state_dicts(anchor, big, method="linear", weights=(1.0, 1.0))
    assert int(out["bn.num_batches_tracked"]) == 33554434
