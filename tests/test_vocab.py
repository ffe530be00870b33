"""Embedding rows aligned by token across fine-tunes with different vocabularies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelstock import merge_checkpoints, merge_state_dicts
from modelstock.errors import ModelStockError
from modelstock.geometry import inspect_checkpoints
from modelstock.vocab import plan_alignment, read_tokenizer
from tests.conftest import merged_by_cli

H = 6
BASE = [f"w{i}" for i in range(10)]


def save_model(path: Path, sd: dict[str, torch.Tensor], vocab: dict[str, int] | None,
               added: dict[str, int] | None = None, template: str | None = None) -> str:
    """A model directory: weights, a config, and a WordLevel ``tokenizer.json``."""
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    rows = sd["model.embed_tokens.weight"].shape[0]
    (path / "config.json").write_text(json.dumps({"vocab_size": rows,
                                                  "tie_word_embeddings": False}))
    if vocab is not None:
        added = added or {}
        tok = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab,
                                           "unk_token": "w0"},
               "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True}
                                for t, i in added.items()]}
        (path / "tokenizer.json").write_text(json.dumps(tok))
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "added_tokens_decoder": {str(i): {"content": t, "special": True}
                                           for t, i in added.items()}}
        if template:
            config["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


def weights(rows: int, g: torch.Generator, base: dict | None = None,
            step: float = 0.1) -> dict[str, torch.Tensor]:
    """Embedding, lm_head and one ordinary layer; ``base`` rows are perturbed where given."""
    out = {}
    for name, shape in (("model.embed_tokens.weight", (rows, H)), ("lm_head.weight", (rows, H)),
                        ("model.layer.weight", (H, H))):
        fresh = torch.randn(shape, generator=g)
        if base is not None:
            b = base[name]
            k = min(b.shape[0], shape[0])
            fresh[:k] = b[:k] + step * torch.randn(b[:k].shape, generator=g)
        out[name] = fresh
    return out


def stock(w0: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """Model Stock of one tensor in float64, from the closed form (clamped t)."""
    d = [(w - w0).double().flatten() for w in ws]
    n = len(d)
    cos = [float(d[i] @ d[j] / (d[i].norm() * d[j].norm())) for i in range(n)
           for j in range(i + 1, n)]
    c = sum(cos) / len(cos)
    t = min(1.0, max(0.0, n * c / (1 + (n - 1) * c)))
    return (w0.double() + t * sum(d).reshape(w0.shape) / n)


@pytest.fixture
def family(tmp_path: Path):
    """Anchor (10 tokens, 10 rows); ft1 adds <x> (11 rows); ft2 adds <y>, <x> (ids 10, 11)
    and pads its embedding to 16 rows; ft2 also swaps the ids of w3 and w4."""
    g = torch.Generator().manual_seed(0)
    base_vocab = {t: i for i, t in enumerate(BASE)}
    a = weights(10, g)
    f1 = weights(11, g, a)
    f2 = weights(16, g, a)
    # ft2 stores w3's row at 4 and w4's at 3
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        f2[k][[3, 4]] = f2[k][[4, 3]].clone()
    v2 = dict(base_vocab, w3=4, w4=3)
    paths = [save_model(tmp_path / "anchor", a, base_vocab),
             save_model(tmp_path / "ft1", f1, base_vocab, {"<x>": 10}),
             save_model(tmp_path / "ft2", f2, v2, {"<y>": 10, "<x>": 11}, template="{{ x }}")]
    return paths, a, f1, f2


def test_union_vocabulary_rows_by_token(family, tmp_path: Path) -> None:
    (anchor, ft1, ft2), a, f1, f2 = family
    out = tmp_path / "out"
    report = merge_checkpoints(anchor, [ft1, ft2], out)
    got = load_file(str(out / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        e = got[k]
        assert e.shape == (16, H)  # 12 tokens, padded to 16 as ft2 was
        # anchor tokens: Model Stock with t from those rows only, ft2's rows read by token
        f2_by_token = f2[k][[0, 1, 2, 4, 3, 5, 6, 7, 8, 9]]
        ref = stock(a[k], [f1[k][:10], f2_by_token])
        torch.testing.assert_close(e[:10].double(), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(e[10], (f1[k][10] + f2[k][11]) / 2)  # <x>: both have it
        torch.testing.assert_close(e[11], f2[k][10])  # <y>: only ft2
        torch.testing.assert_close(e[12:], a[k].mean(0).expand(4, H))  # padding
    torch.testing.assert_close(got["model.layer.weight"].double(),
                               stock(a["model.layer.weight"],
                                     [f1["model.layer.weight"], f2["model.layer.weight"]]))
    assert report.vocabulary["rows"] == 16
    assert [d["token"] for d in report.vocabulary["added"]] == ["<x>", "<y>"]
    assert report.vocabulary["added"][1]["models"] == [ft2]
    tok = read_tokenizer(out)
    assert tok.vocab["<x>"] == 10 and tok.vocab["<y>"] == 11 and tok.vocab["w3"] == 3
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 16
    assert tok.chat_template == "{{ x }}"  # the anchor has none; the one fine-tune's
    assert any("aligned by token" in w for w in report.warnings)


def test_the_report_angle_comes_from_anchor_rows_only(family) -> None:
    (anchor, ft1, ft2), a, f1, f2 = family
    _, report = merge_state_dicts(anchor, [ft1, ft2])
    layer = next(x for x in report.layers if x.name == "model.embed_tokens.weight")
    k = "model.embed_tokens.weight"
    d1 = (f1[k][:10] - a[k]).double().flatten()
    d2 = (f2[k][[0, 1, 2, 4, 3, 5, 6, 7, 8, 9]] - a[k]).double().flatten()
    assert layer.cos == pytest.approx(float(d1 @ d2 / (d1.norm() * d2.norm())), abs=1e-9)


def test_base_vocabulary_keeps_the_anchors_rows(family, tmp_path: Path) -> None:
    (anchor, ft1, ft2), a, f1, f2 = family
    got = merged_by_cli(anchor, ft1, ft2, "-o", str(tmp_path / "o"), "--tokenizer-source",
                        "base")
    e = got["lm_head.weight"]
    assert e.shape == (10, H)
    ref = stock(a["lm_head.weight"], [f1["lm_head.weight"][:10],
                                       f2["lm_head.weight"][[0, 1, 2, 4, 3, 5, 6, 7, 8, 9]]])
    torch.testing.assert_close(e.double(), ref, rtol=1e-6, atol=1e-6)
    assert "<x>" not in read_tokenizer(tmp_path / "o").vocab


def test_a_named_models_vocabulary_and_tokenizer(family, tmp_path: Path) -> None:
    (anchor, ft1, ft2), a, f1, f2 = family
    out = tmp_path / "o"
    merge_checkpoints(anchor, [ft1, ft2], out, tokenizer_source=ft2)
    got = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    assert got.shape == (16, H)
    tok = read_tokenizer(out)
    assert tok.vocab == read_tokenizer(ft2).vocab
    k = "model.embed_tokens.weight"
    # row 3 is w4 in ft2's vocabulary: the anchor's row 4, ft1's row 4, ft2's row 3
    ref = stock(a[k], [f1[k][:10], f2[k][[0, 1, 2, 4, 3, 5, 6, 7, 8, 9]]])
    torch.testing.assert_close(got[3].double(), ref[4], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[11], (f1[k][10] + f2[k][11]) / 2)  # <x> at ft2's id 11
    torch.testing.assert_close(got[10], f2[k][10])


def test_without_tokenizers_rows_align_by_index_with_a_warning(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    a = weights(10, g)
    f1, f2 = weights(12, g, a), weights(10, g, a)
    paths = [save_model(tmp_path / n, sd, None) for n, sd in (("a", a), ("f1", f1), ("f2", f2))]
    merged, report = merge_state_dicts(paths[0], paths[1:])
    k = "model.embed_tokens.weight"
    assert merged[k].shape == (12, H)
    torch.testing.assert_close(merged[k][10:], f1[k][10:])
    torch.testing.assert_close(merged[k][:10].double(), stock(a[k], [f1[k][:10], f2[k]]),
                               rtol=1e-6, atol=1e-6)
    assert any("aligned by index" in w for w in report.warnings)


def test_same_vocabulary_changes_nothing(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    v = {t: i for i, t in enumerate(BASE)}
    a = weights(10, g)
    paths = [save_model(tmp_path / n, sd, v)
             for n, sd in (("a", a), ("f1", weights(10, g, a)), ("f2", weights(10, g, a)))]
    _, report = merge_state_dicts(paths[0], paths[1:])
    assert report.vocabulary is None
    assert not any("vocab" in w for w in report.warnings)


def test_explicit_padding_and_a_chat_template(family, tmp_path: Path) -> None:
    (anchor, ft1, ft2), *_ = family
    out = tmp_path / "o"
    merge_checkpoints(anchor, [ft1, ft2], out, pad_to_multiple_of=8, chat_template="chatml")
    assert load_file(str(out / "model.safetensors"))["lm_head.weight"].shape == (16, H)
    assert "<|im_start|>" in read_tokenizer(out).chat_template
    merge_checkpoints(anchor, [ft1, ft2], out, pad_to_multiple_of=5, force=True)
    assert load_file(str(out / "model.safetensors"))["lm_head.weight"].shape == (15, H)


def test_inspect_measures_the_anchor_rows(family) -> None:
    (anchor, ft1, ft2), *_ = family
    insp = inspect_checkpoints(anchor, [ft1, ft2])
    assert any(g.name == "lm_head.weight" for g in insp.layers)


def test_bad_tokenizer_source_and_token_ids_past_the_rows(family, tmp_path: Path) -> None:
    (anchor, ft1, ft2), a, *_ = family
    with pytest.raises(ModelStockError, match="tokenizer source"):
        merge_state_dicts(anchor, [ft1, ft2], tokenizer_source="nope")
    bad = save_model(tmp_path / "bad", weights(10, torch.Generator().manual_seed(3), a),
                     {t: i for i, t in enumerate(BASE)}, {"<z>": 12})
    with pytest.raises(ModelStockError, match="12 .*10 rows|id 12"):
        merge_state_dicts(anchor, [ft1, bad])


def test_plan_alignment_union_order_and_padding() -> None:
    from modelstock.vocab import Tokenizer
    base = {t: i for i, t in enumerate(BASE)}
    tk = [Tokenizer(base), Tokenizer(dict(base, a=10, b=11)), Tokenizer(dict(base, b=10, c=11))]
    al = plan_alignment([10, 12, 64], tk, ["A", "B", "C"])
    assert al.tokens[10:13] == ["a", "b", "c"]
    assert al.rows == 64  # C was padded to 64 rows
    assert al.stat_rows() == ((0, 10),)
    assert al.index[2, 11].item() == 10 and al.index[1, 12].item() == -1


def test_row_granularity_reports_the_anchor_rows_angle(family) -> None:
    (anchor, ft1, ft2), *_ = family
    cos = {}
    for g in ("tensor", "row"):
        _, report = merge_state_dicts(anchor, [ft1, ft2], granularity=g)
        cos[g] = next(x.cos for x in report.layers if x.name == "lm_head.weight")
    assert cos["row"] == pytest.approx(cos["tensor"], abs=1e-12)


def test_a_greedy_soup_needs_one_vocabulary(family) -> None:
    from modelstock.soups import greedy_soup

    (anchor, ft1, ft2), *_ = family
    seen = []

    def score(sd):
        seen.append(sd["lm_head.weight"].shape[0])
        return -float(sd["lm_head.weight"].norm())

    with pytest.raises(ModelStockError, match="vocabularies differ.*tokenizer-source base"):
        greedy_soup(anchor, [ft1, ft2], score)
    assert seen == []  # refused before any candidate
    greedy_soup(anchor, [ft1, ft2], score, tokenizer_source="base")
    assert set(seen) == {10}


def test_padding_past_every_input_by_index_holds_the_anchor_mean(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(6)
    a = weights(10, g)
    f1, f2 = weights(12, g, a), weights(10, g, a)
    paths = [save_model(tmp_path / n, sd, None) for n, sd in (("a", a), ("f1", f1), ("f2", f2))]
    merged, _ = merge_state_dicts(paths[0], paths[1:], pad_to_multiple_of=8)
    k = "model.embed_tokens.weight"
    assert merged[k].shape == (16, H)
    torch.testing.assert_close(merged[k][12:], a[k].mean(0).expand(4, H))
    torch.testing.assert_close(merged[k][10:12], f1[k][10:12])
