"""Every input format merges to the same tensors, and the output loads in safetensors and HF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelstock import merge_checkpoints, merge_state_dicts, open_checkpoint
from modelstock.checkpoint import SAFETENSORS_INDEX
from modelstock.geometry import inspect_checkpoints
from tests.conftest import make_finetunes

SHAPES = {"embed.weight": (50, 8), "layer.0.weight": (8, 8), "layer.0.bias": (8,),
          "norm.weight": (8,), "head.weight": (3, 8)}


def save_sharded_safetensors(sd: dict, directory: Path, per_shard: int = 2) -> None:
    directory.mkdir(parents=True)
    names = list(sd)
    shards = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in group}, directory / fname)
        weight_map.update(dict.fromkeys(group, fname))
    (directory / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": weight_map}))


def save_sharded_bin(sd: dict, directory: Path) -> None:
    directory.mkdir(parents=True)
    names = list(sd)
    half = len(names) // 2
    weight_map = {}
    for fname, group in [("pytorch_model-00001-of-00002.bin", names[:half]),
                         ("pytorch_model-00002-of-00002.bin", names[half:])]:
        torch.save({k: sd[k] for k in group}, directory / fname)
        weight_map.update(dict.fromkeys(group, fname))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map":
                                                                         weight_map}))


WRITERS = {
    "hf_safetensors": lambda sd, p: (p.mkdir(), save_file(sd, p / "model.safetensors")),
    "hf_sharded_safetensors": save_sharded_safetensors,
    "hf_bin": lambda sd, p: (p.mkdir(), torch.save(sd, p / "pytorch_model.bin")),
    "hf_sharded_bin": save_sharded_bin,
    "file_safetensors": lambda sd, p: save_file(sd, p.with_suffix(".safetensors")),
    "file_pt": lambda sd, p: torch.save(sd, p.with_suffix(".pt")),
    "file_ckpt_state_dict": lambda sd, p: torch.save({"state_dict": sd, "epoch": 3},
                                                     p.with_suffix(".ckpt")),
    "file_bin_model": lambda sd, p: torch.save({"model": sd}, p.with_suffix(".bin")),
}


def written_path(kind: str, p: Path) -> Path:
    suffix = {"file_safetensors": ".safetensors", "file_pt": ".pt",
              "file_ckpt_state_dict": ".ckpt", "file_bin_model": ".bin"}.get(kind)
    return p.with_suffix(suffix) if suffix else p


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_format_merges_like_in_memory(tmp_path: Path, kind: str) -> None:
    sds = make_finetunes(SHAPES, n=2, dtype=torch.bfloat16)
    expected, _ = merge_state_dicts(sds[0], sds[1:])
    paths = []
    for i, sd in enumerate(sds):
        WRITERS[kind](sd, tmp_path / f"m{i}")
        paths.append(written_path(kind, tmp_path / f"m{i}"))
    report = merge_checkpoints(paths[0], paths[1:], tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged.keys() == expected.keys()
    for k in expected:
        assert merged[k].dtype == torch.bfloat16
        assert torch.equal(merged[k], expected[k]), k
    assert report.n_models == 2


def test_strip_prefix_and_mixed_formats(tmp_path: Path) -> None:
    sds = make_finetunes(SHAPES, n=2)
    expected, _ = merge_state_dicts(sds[0], sds[1:])
    save_file(sds[0], tmp_path / "anchor.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sds[1].items()}}, tmp_path / "a.pt")
    torch.save({f"module.{k}": v for k, v in sds[2].items()}, tmp_path / "b.bin")
    merge_checkpoints(tmp_path / "anchor.safetensors", [tmp_path / "a.pt", tmp_path / "b.bin"],
                      tmp_path / "out", strip_prefix="module.")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_sharded_output_round_trips(tmp_path: Path) -> None:
    sds = make_finetunes(SHAPES, n=2)
    expected, _ = merge_state_dicts(sds[0], sds[1:])
    for i, sd in enumerate(sds):
        save_file(sd, tmp_path / f"m{i}.safetensors")
    merge_checkpoints(tmp_path / "m0.safetensors", [tmp_path / "m1.safetensors",
                                                    tmp_path / "m2.safetensors"],
                      tmp_path / "out", shard_size=1000)
    index = json.loads((tmp_path / "out" / SAFETENSORS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in expected.values())
    reread = open_checkpoint(tmp_path / "out")
    for k in expected:
        assert torch.equal(reread.read(k).view(expected[k].shape), expected[k])


def test_single_file_output(tmp_path: Path) -> None:
    sds = make_finetunes(SHAPES, n=2)
    for i, sd in enumerate(sds):
        torch.save(sd, tmp_path / f"m{i}.pt")
    merge_checkpoints(tmp_path / "m0.pt", [tmp_path / "m1.pt", tmp_path / "m2.pt"],
                      tmp_path / "merged.safetensors")
    expected, _ = merge_state_dicts(sds[0], sds[1:])
    merged = load_file(tmp_path / "merged.safetensors")
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_recipe_in_safetensors_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    sds = make_finetunes(SHAPES, n=3)
    for i, sd in enumerate(sds):
        save_file(sd, tmp_path / f"m{i}.safetensors")
    merge_checkpoints(tmp_path / "m0.safetensors", [tmp_path / f"m{i}.safetensors"
                                                    for i in (1, 2, 3)],
                      tmp_path / "out", granularity="row", clamp=False)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        recipe = json.loads(f.metadata()["modelstock"])
    assert recipe["method"] == "model-stock" and recipe["granularity"] == "row"
    assert recipe["clamp"] is False and len(recipe["models"]) == 3


def test_hugging_face_directory_round_trip(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.BertModel(config).eval()
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(64)))
    (tmp_path / "base" / "tokenizer_config.json").write_text("{}")
    for i in range(2):
        ft = transformers.BertModel(config)
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.01 * torch.randn_like(p) + 0.01)
        ft.save_pretrained(tmp_path / f"ft{i}")
    report = merge_checkpoints(tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"],
                               tmp_path / "merged", dtype=torch.bfloat16)
    out = tmp_path / "merged"
    assert {"config.json", "vocab.txt", "tokenizer_config.json", "README.md",
            "modelstock_report.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    config_out = json.loads((out / "config.json").read_text())
    assert config_out.get("torch_dtype", config_out.get("dtype")) == "bfloat16"
    loaded = transformers.BertModel.from_pretrained(out, dtype=torch.bfloat16)
    merged = load_file(out / "model.safetensors")
    state = loaded.state_dict()
    assert merged.keys() <= state.keys()  # every merged tensor was loaded, none skipped
    for k in merged:
        assert torch.equal(state[k], merged[k]), k
    saved = json.loads((out / "modelstock_report.json").read_text())
    assert saved["method"] == "model-stock" and saved["n_models"] == 2
    assert len(saved["layers"]) == len(report.layers)
    layer = next(x for x in saved["layers"] if x["rule"] == "model_stock")
    assert {"name", "shape", "rule", "cos", "angle_deg", "t", "norms", "pair_cos"} <= set(layer)
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "ft0" in card and "Model Stock" in card


def test_dtype_preserved_per_tensor(tmp_path: Path) -> None:
    sds = make_finetunes({"a": (4, 4), "b": (4,)}, n=2)
    for sd in sds:
        sd["a"] = sd["a"].half()
        sd["steps"] = torch.tensor([7], dtype=torch.int32)
        sd["mask"] = torch.tensor([True, False])
    for i, sd in enumerate(sds):
        save_file(sd, tmp_path / f"m{i}.safetensors")
    merge_checkpoints(tmp_path / "m0.safetensors", [tmp_path / "m1.safetensors",
                                                    tmp_path / "m2.safetensors"],
                      tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged["a"].dtype == torch.float16 and merged["b"].dtype == torch.float32
    assert merged["steps"].dtype == torch.int32 and torch.equal(merged["steps"], sds[1]["steps"])
    assert torch.equal(merged["mask"], sds[1]["mask"])


# -- what the shards hold beyond the index (issue: nothing may be dropped silently) ----------
SHARDED = {"safetensors": (save_sharded_safetensors, SAFETENSORS_INDEX),
           "bin": (save_sharded_bin, "pytorch_model.bin.index.json")}


def unindex(directory: Path, index_name: str, name: str) -> str:
    """Leave ``name`` out of the index's weight_map (its shard still holds it); its shard."""
    path = directory / index_name
    index = json.loads(path.read_text())
    shard = index["weight_map"].pop(name)
    index.setdefault("metadata", {})  # transformers' from_pretrained wants the key
    path.write_text(json.dumps(index))
    return shard


@pytest.mark.parametrize("fmt", list(SHARDED))
def test_tensor_in_a_shard_but_not_in_the_index_is_merged(tmp_path: Path, fmt: str) -> None:
    """Such a tensor is part of the checkpoint (``from_pretrained`` loads it too: see the next
    test): it is read, and merged like any other, in every input (anchor and fine-tunes)."""
    save, index_name = SHARDED[fmt]
    sds = make_finetunes(SHAPES, n=2)
    expected, _ = merge_state_dicts(sds[0], sds[1:])
    for i, sd in enumerate(sds):
        save(sd, tmp_path / f"m{i}")
        unindex(tmp_path / f"m{i}", index_name, "layer.0.bias")
    reader = open_checkpoint(tmp_path / "m1")
    try:
        assert set(reader.infos) == set(SHAPES)
        assert torch.equal(reader.read("layer.0.bias"), sds[1]["layer.0.bias"])
    finally:
        reader.close()
    report = merge_checkpoints(tmp_path / "m0", [tmp_path / "m1", tmp_path / "m2"],
                               tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    named = [w for w in report.warnings if "not in its weight_map" in w]
    assert len(named) == 3 and all("layer.0.bias" in w for w in named)  # said, not silent
    _, report = merge_state_dicts(tmp_path / "m0", [tmp_path / "m1", tmp_path / "m2"],
                                  strip_prefix="layer.")  # through the renaming reader too
    assert sum("not in its weight_map" in w for w in report.warnings) == 3
    insp = inspect_checkpoints(tmp_path / "m0", [tmp_path / "m1", tmp_path / "m2"])
    assert sum("not in its weight_map" in f.message for f in insp.findings) == 3


@pytest.mark.parametrize("fmt", list(SHARDED))
def test_unindexed_tensor_read_as_from_pretrained_reads_it(tmp_path: Path, fmt: str) -> None:
    """The reference for the rule above: transformers loads every tensor of the shards an index
    names, listed or not (an unknown name is an "unexpected key"); we read the same set."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    sd = {k: v.clone() for k, v in transformers.BertModel(config).state_dict().items()}
    sd["pooler.dense.weight"].fill_(7.0)
    sd["extra.tensor"] = torch.ones(3)
    save, index_name = SHARDED[fmt]
    if fmt == "safetensors":
        save(sd, tmp_path / "m", per_shard=8)
    else:
        save(sd, tmp_path / "m")
    config.save_pretrained(tmp_path / "m")
    unindex(tmp_path / "m", index_name, "pooler.dense.weight")
    unindex(tmp_path / "m", index_name, "extra.tensor")
    model, info = transformers.BertModel.from_pretrained(tmp_path / "m",
                                                         output_loading_info=True)
    assert not info["missing_keys"] and info["unexpected_keys"] == {"extra.tensor"}
    assert torch.equal(model.pooler.dense.weight, sd["pooler.dense.weight"])
    reader = open_checkpoint(tmp_path / "m")
    try:
        assert set(reader.infos) == set(sd)
        assert torch.equal(reader.read("pooler.dense.weight").view(16, 16),
                           sd["pooler.dense.weight"])
    finally:
        reader.close()


def test_two_index_names_for_one_shard_file_are_not_a_duplicate(tmp_path: Path) -> None:
    """``a.safetensors`` and ``./a.safetensors`` are one file, read once: its tensors are not
    "in two shards"."""
    sds = make_finetunes({"a": (4,), "b": (4,)}, n=1)
    (tmp_path / "m").mkdir()
    save_file(sds[0], tmp_path / "m" / "a.safetensors")
    (tmp_path / "m" / SAFETENSORS_INDEX).write_text(json.dumps(
        {"weight_map": {"a": "a.safetensors", "b": "./a.safetensors"}}))
    reader = open_checkpoint(tmp_path / "m")
    try:
        assert list(reader.infos) == ["a", "b"]
        assert torch.equal(reader.read("b"), sds[0]["b"])
    finally:
        reader.close()
