"""The per-tensor rules (README, "What a merge does"; docs/design.md §1): which tensors are
Model-Stocked, averaged, copied or kept."""

from __future__ import annotations

import pytest
import torch

from modelstock import ModelStockError, merge_state_dicts
from tests.conftest import make_finetunes


def by_name(report):
    return {layer.name: layer for layer in report.layers}


def test_batchnorm_statistics_averaged_on_request_and_integers_copied() -> None:
    sds = make_finetunes({"bn.weight": (6,), "bn.running_mean": (6,), "bn.running_var": (6,)})
    for i, sd in enumerate(sds):
        sd["bn.num_batches_tracked"] = torch.tensor(100 + 10 * i)
    out, report = merge_state_dicts(sds[0], sds[1:], buffers="average")
    rules = {k: v.rule for k, v in by_name(report).items()}
    assert rules == {"bn.weight": "model_stock", "bn.running_mean": "average",
                     "bn.running_var": "average", "bn.num_batches_tracked": "copy"}
    for k in ("bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(out[k], (sds[1][k] + sds[2][k]) / 2)
    assert int(out["bn.num_batches_tracked"]) == 110  # the first fine-tune's value
    assert "differ" in by_name(report)["bn.num_batches_tracked"].note


def test_integer_tensors_that_agree_are_copied_silently() -> None:
    sds = make_finetunes({"w": (3, 3)})
    for sd in sds:
        sd["position_ids"] = torch.arange(5)
    out, report = merge_state_dicts(sds[0], sds[1:])
    assert torch.equal(out["position_ids"], torch.arange(5))
    assert "differ" not in (by_name(report)["position_ids"].note or "")


def test_new_head_not_in_anchor_is_averaged_with_a_warning() -> None:
    sds = make_finetunes({"body": (4, 4)})
    heads = [torch.randn(3, 4), torch.randn(3, 4)]
    sds[1]["head"], sds[2]["head"] = heads
    out, report = merge_state_dicts(sds[0], sds[1:])
    torch.testing.assert_close(out["head"], (heads[0] + heads[1]) / 2)
    assert by_name(report)["head"].rule == "average"
    assert any("not in the anchor" in w and "head" in w for w in report.warnings)


def test_user_patterns_force_average_or_anchor() -> None:
    sds = make_finetunes({"enc.0.w": (4, 4), "enc.1.w": (4, 4), "cls.w": (2, 4)})
    out, report = merge_state_dicts(sds[0], sds[1:], average=("cls.*",),
                                    keep_anchor=("enc.1.*",))
    rules = {k: v.rule for k, v in by_name(report).items()}
    assert rules == {"enc.0.w": "model_stock", "enc.1.w": "anchor", "cls.w": "average"}
    assert torch.equal(out["enc.1.w"], sds[0]["enc.1.w"])
    torch.testing.assert_close(out["cls.w"], (sds[1]["cls.w"] + sds[2]["cls.w"]) / 2)


def test_pattern_conflicts_and_bad_inputs_are_errors() -> None:
    sds = make_finetunes({"w": (4, 4)})
    with pytest.raises(ModelStockError, match="both"):
        merge_state_dicts(sds[0], sds[1:], average=("w",), keep_anchor=("*",))
    with pytest.raises(ModelStockError, match="at least 2"):
        merge_state_dicts(sds[0], sds[1:2])
    bad = dict(sds[2], w=torch.randn(4, 5))
    with pytest.raises(ModelStockError, match=r"shape \[4, 5\].*\[4, 4\]"):
        merge_state_dicts(sds[0], [sds[1], bad])
    with pytest.raises(ModelStockError, match="missing 1 tensor"):
        merge_state_dicts(dict(sds[0], extra=torch.ones(2)), sds[1:])


@pytest.mark.parametrize("where", ["anchor", "model"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_inputs_are_refused_unless_allowed(where: str, value: float) -> None:
    sds = make_finetunes({"w": (8, 8), "b": (8,)})
    target = sds[0] if where == "anchor" else sds[2]
    target["w"][3, 4] = value
    with pytest.raises(ModelStockError, match="NaN or Inf") as err:
        merge_state_dicts(sds[0], sds[1:])
    assert err.value.tensor == "w"
    out, report = merge_state_dicts(sds[0], sds[1:], allow_nonfinite=True)
    assert not torch.isfinite(out["w"][3, 4])  # passes through elementwise
    assert torch.isfinite(out["w"]).sum() == 63
    assert 0 <= by_name(report)["w"].t <= 1


def test_narrower_output_dtype_overflow_is_an_error() -> None:
    sds = make_finetunes({"w": (4,)})
    for sd in sds:
        sd["w"] = sd["w"] + 1e6  # fits float32, not float16
    with pytest.raises(ModelStockError, match="overflow"):
        merge_state_dicts(sds[0], sds[1:], dtype=torch.float16)


@pytest.mark.parametrize("granularity", ["tensor", "row", "model"])
def test_no_input_yields_nonfinite_output(granularity: str) -> None:
    # Opposite, orthogonal, zero and tiny task vectors, with and without clamping.
    w0 = torch.zeros(4, 3)
    w1 = torch.tensor([[1.0, 0, 0], [0, 0, 0], [1e-30, 0, 0], [1, 2, 3]])
    w2 = torch.tensor([[-1.0, 0, 0], [0, 0, 0], [0, 1e-30, 0], [-1, -2, -3]])
    for clamp in (True, False):
        out, report = merge_state_dicts({"w": w0}, [{"w": w1}, {"w": w2}],
                                        granularity=granularity, clamp=clamp)
        assert torch.isfinite(out["w"]).all()
        assert all(v is None or torch.isfinite(torch.tensor(v)) for layer in report.layers
                   for v in (layer.t, layer.cos))


def test_integer_buffer_only_in_anchor_is_taken_from_it() -> None:
    # transformers 5 does not save BERT's position_ids; the packaged MiniLM has them.
    sds = make_finetunes({"w": (4, 4)})
    sds[0]["embeddings.position_ids"] = torch.arange(8).unsqueeze(0)
    out, report = merge_state_dicts(sds[0], sds[1:])
    assert torch.equal(out["embeddings.position_ids"], torch.arange(8).unsqueeze(0))
    assert by_name(report)["embeddings.position_ids"].rule == "copy"
    assert any("position_ids" in w for w in report.warnings)
    sds[0]["float_only_in_anchor"] = torch.ones(3)
    with pytest.raises(ModelStockError, match="float_only_in_anchor"):
        merge_state_dicts(sds[0], sds[1:])
