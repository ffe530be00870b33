"""Tied input/output embeddings: merged once, written the way the anchor stores them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelstock import merge_checkpoints, merge_state_dicts, model_stock
from tests.conftest import make_finetunes

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
SHAPES = {EMB: (12, 4), "model.layers.0.w": (4, 4)}


def save_dir(path: Path, sd: dict[str, torch.Tensor], tied: bool | None) -> str:
    path.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    config = {"model_type": "llama"} if tied is None else {"tie_word_embeddings": tied}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def tied_pt(path: Path, sd: dict[str, torch.Tensor]) -> str:
    """A .pt state dict holding the embedding under both names, on one storage."""
    sd = dict(sd)
    sd[HEAD] = sd[EMB]
    torch.save(sd, path)
    return str(path)


@pytest.mark.parametrize("config_tied", [True, None])  # None: transformers' default (tied)
def test_tied_anchor_and_fine_tunes_that_carry_both_names(tmp_path: Path, config_tied) -> None:
    anchor, *fts = make_finetunes(SHAPES, n=2)
    a = save_dir(tmp_path / "anchor", anchor, config_tied)
    paths = [tied_pt(tmp_path / f"ft{i}.pt", sd) for i, sd in enumerate(fts)]
    report = merge_checkpoints(a, paths, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert HEAD not in out  # stored as the anchor stores it: tied, once
    torch.testing.assert_close(out[EMB], model_stock(anchor[EMB], [f[EMB] for f in fts]))
    assert not any("averaged" in w for w in report.warnings)
    assert any("tied" in w for w in report.warnings)
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get(
        "tie_word_embeddings", True)


def test_an_untied_fine_tune_of_a_tied_anchor_is_named(tmp_path: Path) -> None:
    anchor, *fts = make_finetunes(SHAPES, n=2)
    a = save_dir(tmp_path / "anchor", anchor, True)
    untied = dict(fts[1], **{HEAD: fts[1][EMB] + 1.0})
    torch.save(untied, tmp_path / "ft1.pt")
    paths = [tied_pt(tmp_path / "ft0.pt", fts[0]), str(tmp_path / "ft1.pt")]
    report = merge_checkpoints(a, paths, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert HEAD not in out
    warning = next(w for w in report.warnings if "not used" in w)
    assert "ft1.pt" in warning and "ft0.pt" not in warning


def test_untied_anchor_and_tied_fine_tunes(tmp_path: Path) -> None:
    anchor, *fts = make_finetunes({**SHAPES, HEAD: (12, 4)}, n=2)
    a = save_dir(tmp_path / "anchor", anchor, False)
    dirs = [save_dir(tmp_path / f"ft{i}", {k: v for k, v in sd.items() if k != HEAD}, True)
            for i, sd in enumerate(fts)]
    merge_checkpoints(a, dirs, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    # the tied fine-tunes' output embedding is their input embedding
    torch.testing.assert_close(out[HEAD], model_stock(anchor[HEAD], [f[EMB] for f in fts]))
    torch.testing.assert_close(out[EMB], model_stock(anchor[EMB], [f[EMB] for f in fts]))


def test_a_missing_tensor_that_is_not_tied_is_still_an_error(tmp_path: Path) -> None:
    anchor, *fts = make_finetunes({**SHAPES, HEAD: (12, 4)}, n=2)
    a = save_dir(tmp_path / "anchor", anchor, False)
    dirs = [save_dir(tmp_path / f"ft{i}", {k: v for k, v in sd.items() if k != HEAD}, False)
            for i, sd in enumerate(fts)]
    with pytest.raises(Exception, match="lm_head"):
        merge_state_dicts(a, dirs)


def test_a_tied_transformers_model_round_trips(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    paths = []
    for i in range(2):
        ft = transformers.LlamaForCausalLM(config)
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.01 * torch.randn_like(p))
        assert ft.lm_head.weight.data_ptr() == ft.model.embed_tokens.weight.data_ptr()
        paths.append(str(tmp_path / f"ft{i}.pt"))
        torch.save(ft.state_dict(), paths[-1])
    merge_checkpoints(tmp_path / "base", paths, tmp_path / "out")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    want = model_stock(base.model.embed_tokens.weight.detach(),
                       [torch.load(p, weights_only=True)[EMB] for p in paths])
    torch.testing.assert_close(merged.model.embed_tokens.weight.detach(), want)


def test_an_anchor_tied_by_storage_keeps_both_names_equal(tmp_path: Path) -> None:
    """A .pt anchor of a tied model holds both names on one storage: one fine-tune is an HF
    directory saved tied, the other a .pt whose lm_head was untied by training."""
    anchor, *fts = make_finetunes(SHAPES, n=2)
    a = tied_pt(tmp_path / "anchor.pt", anchor)
    d = save_dir(tmp_path / "ft0", fts[0], True)
    untied = dict(fts[1], **{HEAD: fts[1][EMB] + 0.5})
    torch.save(untied, tmp_path / "ft1.pt")
    out, report = merge_state_dicts(a, [d, str(tmp_path / "ft1.pt")])
    want = model_stock(anchor[EMB], [f[EMB] for f in fts])
    torch.testing.assert_close(out[EMB], want)
    assert torch.equal(out[HEAD], out[EMB])  # written as the anchor stores it: both, equal
    assert any("both names written, equal" in w for w in report.warnings)
    assert any("not used" in w and "ft1.pt" in w for w in report.warnings)


def test_a_headless_anchor_without_config_gets_the_fine_tunes_new_head_averaged(
        tmp_path: Path) -> None:
    """No config and lm_head values unlike the embeddings: a new head, not a tie."""
    anchor, *fts = make_finetunes({**SHAPES, HEAD: (12, 4)}, n=2)
    del anchor[HEAD]
    save_file(anchor, str(tmp_path / "anchor.safetensors"))
    out, report = merge_state_dicts(str(tmp_path / "anchor.safetensors"), fts)
    torch.testing.assert_close(out[HEAD], (fts[0][HEAD] + fts[1][HEAD]) / 2)
    assert any("not in the anchor" in w for w in report.warnings)
