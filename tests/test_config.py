"""mergekit YAML configs: the same tensors as the flags, round trips, and a clear error naming
every key this engine cannot honour."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from modelstock import MergeOptions, ModelStockError
from modelstock.cli import main
from modelstock.config import load_config, parse_config, to_mergekit_yaml
from tests.conftest import merged_by_cli


@pytest.fixture
def paths(tmp_path: Path) -> list[str]:
    """An anchor and three fine-tunes on disk (float32), a tensor merged and a 1-D one."""
    g = torch.Generator().manual_seed(0)
    w0 = {"w": torch.randn(8, 6, generator=g), "b": torch.randn(8, generator=g)}
    out = []
    for i in range(4):
        sd = w0 if i == 0 else {k: v + 0.2 * torch.randn(v.shape, generator=g) + 0.1
                                for k, v in w0.items()}
        p = tmp_path / f"m{i}"
        p.mkdir()
        save_file(sd, str(p / "model.safetensors"))
        (p / "config.json").write_text('{"torch_dtype": "float32"}')
        out.append(str(p))
    return out


run = merged_by_cli  # run `modelstock merge ... -q`, return the tensors


def write_yaml(tmp_path: Path, doc: dict, name: str = "merge.yml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(p)


def load(path: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
                                        for k in a)


# -- the same tensors as the flags -----------------------------------------------------------


@pytest.mark.parametrize("filter_wise", [None, False, True])
@pytest.mark.parametrize("base_listed", [False, True])
def test_model_stock_yaml_is_bit_identical_to_flags(tmp_path: Path, paths: list[str],
                                                    filter_wise, base_listed: bool) -> None:
    base, *fts = paths
    doc = {"merge_method": "model_stock", "base_model": base,
           "models": ([{"model": base}] if base_listed else []) + [{"model": m} for m in fts],
           "dtype": "float32"}
    if filter_wise is not None:
        doc["parameters"] = {"filter_wise": filter_wise}
    via_yaml = run("--config", write_yaml(tmp_path, doc), "-o", str(tmp_path / "y"))
    flags = ["--granularity", "row"] if filter_wise else []
    via_flags = run(base, *fts, "-o", str(tmp_path / "f"), *flags)
    assert same(via_yaml, via_flags)
    other = run(base, *fts, "-o", str(tmp_path / "o"),
                *([] if filter_wise else ["--granularity", "row"]))
    assert not same(via_yaml, other)  # the comparison can tell the two granularities apart
    assert (tmp_path / "y" / "config.json").is_file()  # the anchor's files, as with flags


def test_out_dtype_and_dtype_set_the_output_dtype(tmp_path: Path, paths: list[str]) -> None:
    base, *fts = paths
    doc = {"merge_method": "model_stock", "base_model": base,
           "models": [{"model": m} for m in fts], "out_dtype": "bfloat16"}
    via_yaml = run("--config", write_yaml(tmp_path, doc), "-o", str(tmp_path / "y"))
    via_flags = run(base, *fts, "-o", str(tmp_path / "f"), "--dtype", "bfloat16")
    assert same(via_yaml, via_flags) and via_yaml["w"].dtype == torch.bfloat16
    # mergekit writes its compute dtype when out_dtype is absent; we compute in float32 anyway
    doc.pop("out_dtype")
    doc["dtype"] = "bfloat16"
    via_dtype = run("--config", write_yaml(tmp_path, doc, "d.yml"), "-o", str(tmp_path / "d"))
    assert same(via_dtype, via_flags)


def test_dtype_float64_computes_in_float64(tmp_path: Path, paths: list[str]) -> None:
    base, *fts = paths
    doc = {"merge_method": "model_stock", "base_model": base, "dtype": "float64",
           "out_dtype": "float32", "models": [{"model": m} for m in fts]}
    cfg = load_config(write_yaml(tmp_path, doc))
    assert cfg.options.compute_dtype == torch.float64 and cfg.options.dtype == torch.float32
    assert parse_config({**doc, "dtype": "float32"}).options.compute_dtype is None


def test_linear_yaml_is_a_weighted_mean(tmp_path: Path, paths: list[str]) -> None:
    base, *fts = paths
    weights = [0.2, 0.5, 0.3]
    doc = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}}
                                                for m, w in zip(fts, weights, strict=True)]}
    via_yaml = run("--config", write_yaml(tmp_path, doc), "-o", str(tmp_path / "y"))
    via_flags = run(fts[0], *fts, "-o", str(tmp_path / "f"), "--method", "linear",
                    "--weights", "0.2,0.5,0.3")
    assert same(via_yaml, via_flags)
    sds = [load(m) for m in fts]
    for k in sds[0]:
        expected = sum(w * sd[k].double().numpy() for w, sd in zip(weights, sds, strict=True))
        np.testing.assert_allclose(via_yaml[k].double().numpy(), expected, rtol=0, atol=1e-6)


def test_linear_normalize_false_and_a_top_level_weight(tmp_path: Path, paths: list[str]) -> None:
    base, *fts = paths
    doc = {"merge_method": "linear", "parameters": {"normalize": False, "weight": 0.5},
           "models": [{"model": fts[0], "parameters": {"weight": 2.0}}, {"model": fts[1]}]}
    out = run("--config", write_yaml(tmp_path, doc), "-o", str(tmp_path / "y"))
    a, b = load(fts[0]), load(fts[1])
    for k in a:
        torch.testing.assert_close(out[k], 2.0 * a[k] + 0.5 * b[k], rtol=0, atol=1e-6)


def test_linear_merges_an_unlisted_base_model_in_as_mergekit_does(paths: list[str]) -> None:
    base, *fts = paths
    doc = {"merge_method": "linear", "base_model": base, "parameters": {"weight": 1.0},
           "models": [{"model": fts[0]}, {"model": fts[1], "parameters": {"weight": 3.0}}]}
    cfg = parse_config(doc)
    assert cfg.models == [fts[0], fts[1], base] and cfg.options.weights == (1.0, 3.0, 1.0)
    doc["parameters"] = {}
    doc["models"][0]["parameters"] = {"weight": 1.0}
    with pytest.raises(ModelStockError, match="base_model: linear needs a weight"):
        parse_config(doc)


def test_average_is_the_plain_mean_of_the_models(tmp_path: Path, paths: list[str]) -> None:
    base, *fts = paths
    doc = {"merge_method": "average", "base_model": base, "models": [{"model": m} for m in fts]}
    out = run("--config", write_yaml(tmp_path, doc), "-o", str(tmp_path / "y"))
    sds = [load(m) for m in fts]
    for k in out:  # the base model is the layout, not an input
        expected = np.mean([sd[k].double().numpy() for sd in sds], axis=0)
        np.testing.assert_allclose(out[k].double().numpy(), expected, rtol=0, atol=1e-6)


# -- round trips -----------------------------------------------------------------------------


def unclamped(options: MergeOptions) -> MergeOptions:
    """A YAML read back is clamped (our default for model_stock); mergekit never clamps."""
    return dataclasses.replace(options, clamp=False)


@pytest.mark.parametrize("options", [
    MergeOptions(clamp=False),
    MergeOptions(granularity="row", dtype=torch.bfloat16, clamp=False),
    MergeOptions(dtype=torch.float16, compute_dtype=torch.float64, clamp=False),
    MergeOptions(method="linear", weights=(0.25, 0.75, 2.0), normalize=False),
    MergeOptions(method="linear", weights=(1.0, 1.0, 1.0), dtype=torch.float32),
])
def test_options_round_trip_through_mergekit_yaml(tmp_path: Path, paths: list[str],
                                                  options: MergeOptions) -> None:
    base, *fts = paths
    anchor = fts[0] if options.method == "linear" else base
    text = to_mergekit_yaml(anchor, fts, options)
    path = tmp_path / "rt.yml"
    path.write_text(text)
    cfg = load_config(path)
    read = unclamped(cfg.options) if options.method == "model-stock" else cfg.options
    assert (cfg.anchor, cfg.models, read) == (anchor, fts, options)
    assert to_mergekit_yaml(cfg.anchor, cfg.models, read) == text


def test_yaml_round_trips_through_options(tmp_path: Path, paths: list[str]) -> None:
    base, *fts = paths
    doc = {"merge_method": "model_stock", "base_model": base,
           "models": [{"model": m} for m in fts], "parameters": {"filter_wise": True},
           "dtype": "float64", "out_dtype": "bfloat16"}
    cfg = parse_config(doc)
    assert cfg.options.clamp  # read with our default
    assert yaml.safe_load(to_mergekit_yaml(cfg.anchor, cfg.models, unclamped(cfg.options))) \
        == doc


def test_mergekit_computes_in_float32_beside_an_output_dtype() -> None:
    """mergekit computes in `dtype` (else in the inputs' dtype): written as float32 where an
    out_dtype lets it be; without one, `dtype` would be mergekit's output dtype too."""
    doc = yaml.safe_load(to_mergekit_yaml("base", ["a", "b"], MergeOptions(
        clamp=False, dtype=torch.bfloat16)))
    assert (doc["dtype"], doc["out_dtype"]) == ("float32", "bfloat16")
    doc = yaml.safe_load(to_mergekit_yaml("base", ["a", "b"], MergeOptions(clamp=False)))
    assert "dtype" not in doc and "out_dtype" not in doc


def test_a_clamped_merge_is_refused_as_mergekit_has_no_clamp() -> None:
    with pytest.raises(ModelStockError) as e:
        to_mergekit_yaml("base", ["a", "b"], MergeOptions())
    msg = str(e.value)
    assert "\n" not in msg and "clamp" in msg and "no clamp" in msg and "--no-clamp" in msg
    # the unclamped merge is mergekit's model_stock; linear has no t to clamp
    doc = yaml.safe_load(to_mergekit_yaml("base", ["a", "b"], MergeOptions(clamp=False)))
    assert doc["merge_method"] == "model_stock" and doc["base_model"] == "base"
    for clamp in (True, False):
        doc = yaml.safe_load(to_mergekit_yaml("a", ["a", "b"], MergeOptions(
            method="linear", weights=(1.0, 2.0), clamp=clamp)))
        assert doc["merge_method"] == "linear"


def test_execution_options_do_not_stop_a_mergekit_yaml() -> None:
    plain = to_mergekit_yaml("base", ["a", "b"], MergeOptions(clamp=False))
    assert to_mergekit_yaml("base", ["a", "b"], MergeOptions(
        clamp=False, threads=2, chunk_numel=1024, device="cpu")) == plain


@pytest.mark.parametrize("options, what", [
    (MergeOptions(method="uniform"), "method uniform"),
    (MergeOptions(method="wise-ft", alpha=0.5), "method wise-ft"),
    (MergeOptions(granularity="model", clamp=False), "granularity"),
    (MergeOptions(), "clamp"),
    (MergeOptions(keep_anchor=("*.bias",), clamp=False), "keep_anchor"),
    (MergeOptions(compute_dtype=torch.float64, clamp=False), "compute_dtype without dtype"),
])
def test_inexpressible_options_are_refused(options: MergeOptions, what: str) -> None:
    with pytest.raises(ModelStockError, match=what):
        to_mergekit_yaml("base", ["a", "b"], options)


# -- what cannot be honoured -----------------------------------------------------------------

MS = {"merge_method": "model_stock", "base_model": "base", "models": [{"model": "a"},
                                                                     {"model": "b"}]}


@pytest.mark.parametrize("change, key", [
    ({"slices": [{"sources": []}]}, "slices"),
    ({"modules": {}}, "modules"),
    ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": "a"}}}},
     "tokenizer.tokens"),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
    ({"tokenizer": {"sorce": "union"}}, "tokenizer.sorce"),
    ({"tokenizer": "union"}, "tokenizer"),
    ({"tokenizer": {"source": "union"}, "tokenizer_source": "base"}, "tokenizer_source"),
    ({"chat_template": ["chatml"]}, "chat_template"),
    ({"tokenizer_source": ""}, "tokenizer_source"),
    ({"merge_method": "ties"}, "merge_method"),
    ({"lora_rank": 8}, "lora_rank"),
    ({"parameters": {"filter_wise": [True, False]}}, "parameters.filter_wise"),
    ({"parameters": {"filter_wise": [{"filter": "mlp", "value": True}]}},
     "parameters.filter_wise"),
    ({"parameters": {"filter_wise": "yes"}}, "parameters.filter_wise"),
    ({"models": [{"model": "a"}]}, "models"),
    ({"models": [{"model": "base"}, {"model": "a"}]}, "models"),
    ({"models": [{"model": "a", "parameters": [1.0]}, {"model": "b"}]}, "models[0].parameters"),
    ({"parameters": {"filter_wise": True, "weight": 1.0}, "models": [{"model": "a"}]},
     "models"),
    ({"models": [{"model": "a"}, {"model": "b", "layer_range": [0, 4]}]},
     "models[1].layer_range"),
    ({"models": [{"model": {"path": "a"}}, {"model": "b"}]}, "models[0].model"),
    ({"models": [{"model": "a"}, {"model": "a"}]}, "models[1].model"),
    ({"models": []}, "models"),
    ({"base_model": None}, "base_model"),
    ({"dtype": "int8"}, "dtype"),
    ({"out_dtype": "float8"}, "out_dtype"),
])
def test_unsupported_keys_are_named(change: dict, key: str) -> None:
    with pytest.raises(ModelStockError) as e:
        parse_config({**MS, **change}, "merge.yml")
    msg = str(e.value)
    assert msg.startswith("merge.yml: ") and key in msg and "\n" not in msg


# Shaped like model_stock configs published with merged models: a weight on every model (the
# base listed too), parameters copied from other methods. mergekit 0.1.5 never reads them.
PUBLISHED = """
base_model: base
dtype: bfloat16
merge_method: model_stock
models:
  - model: a
    parameters:
      weight: 1.0
  - model: b
    parameters:
      weight: 1.0
      density: 0.53
  - model: base
    parameters:
      weight: 1.0
parameters:
  filter_wise: false
  normalize: true
  int8_mask: true
tokenizer_source: base
"""


def test_published_model_stock_configs_are_accepted_with_one_warning_a_kind() -> None:
    cfg = parse_config(yaml.safe_load(PUBLISHED), "merge.yml")
    plain = parse_config({**MS, "dtype": "bfloat16", "tokenizer_source": "base"})
    assert (cfg.anchor, cfg.models, cfg.options) == (plain.anchor, plain.models, plain.options)
    assert plain.warnings == ()
    per_model, top = cfg.warnings
    assert "\n" not in per_model + top
    assert per_model.startswith("models[0].parameters, models[1].parameters, "
                                "models[2].parameters: ")
    assert "density, weight have no effect on merge_method model_stock" in per_model
    assert "mergekit ignores them too" in per_model
    assert top.startswith("parameters: int8_mask, normalize have no effect")


@pytest.mark.parametrize("params, names", [
    ({"weight": 0.5}, "weight has no effect"),
    ({"weight": [0.0, 0.5, 1.0]}, "weight has no effect"),  # a gradient: ignored all the same
    ({"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.7}]}, "density has no effect"),
    ({"filter_wise": True}, "counts only under the top-level parameters"),
])
def test_per_model_parameters_model_stock_ignores_are_warned_about(params: dict,
                                                                    names: str) -> None:
    doc = {**MS, "models": [{"model": "a", "parameters": params}, {"model": "b"}]}
    cfg = parse_config(doc)
    assert cfg.options == parse_config(MS).options  # per-model filter_wise: still per tensor
    (warning,) = cfg.warnings
    assert warning.startswith("models[0].parameters: ") and names in warning


def test_model_stock_needs_two_models_besides_the_base() -> None:
    for models in ([{"model": "a"}], [{"model": "base"}, {"model": "a"}]):
        with pytest.raises(ModelStockError, match="at least 2 models besides base_model, got 1"):
            parse_config({**MS, "models": models})


def test_config_warnings_go_into_the_report(tmp_path: Path, paths: list[str]) -> None:
    from modelstock import merge_checkpoints

    base, *fts = paths
    doc = {**yaml.safe_load(PUBLISHED), "base_model": base, "dtype": "float32",
           "models": [{"model": m, "parameters": {"weight": 1.0}} for m in [base, *fts]]}
    cfg = parse_config(doc)
    report = merge_checkpoints(cfg.anchor, cfg.models, tmp_path / "y", cfg.options,
                               annotate=cfg.annotate)
    assert report.warnings[:2] == list(cfg.warnings)
    written = json.loads((tmp_path / "y" / "modelstock_report.json").read_text())
    assert written["warnings"][:2] == list(cfg.warnings)
    assert all(f"warning      {w}" in report.summary() for w in cfg.warnings)


@pytest.mark.parametrize("doc, key", [
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": [0, 1]}}]},
     "models[0].parameters.weight"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": True}}]},
     "models[0].parameters.weight"),
    ({"merge_method": "linear", "models": [{"model": "a"}]}, "models[0].parameters"),
    ({"merge_method": "linear", "parameters": {"normalize": 1},
      "models": [{"model": "a", "parameters": {"weight": 1}}]}, "parameters.normalize"),
    ({"merge_method": "linear", "parameters": {"int8_mask": True},
      "models": [{"model": "a", "parameters": {"weight": 1}}]}, "parameters.int8_mask"),
    ({"merge_method": "average", "models": [{"model": "a", "parameters": {"weight": 2}}]},
     "models[0].parameters.weight"),
    ({"merge_method": "linear", "tokenizer_source": "base",
      "models": [{"model": "a", "parameters": {"weight": 1}}]}, "tokenizer_source"),
])
def test_unusable_parameters_are_named(doc: dict, key: str) -> None:
    with pytest.raises(ModelStockError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_config(doc)


def test_cli_reports_config_errors_in_one_line(tmp_path: Path, paths: list[str]) -> None:
    base, *fts = paths
    doc = {"merge_method": "model_stock", "base_model": base, "slices": [],
           "models": [{"model": m} for m in fts]}
    result = CliRunner().invoke(main, ["merge", "--config", write_yaml(tmp_path, doc),
                                       "-o", str(tmp_path / "y")])
    assert result.exit_code == 1 and "key 'slices'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "y").exists()
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: [unclosed\n")
    result = CliRunner().invoke(main, ["merge", "--config", str(bad), "-o", str(tmp_path / "z")])
    assert result.exit_code == 1 and "malformed YAML" in result.output


def test_cli_config_excludes_recipe_flags_and_models(tmp_path: Path, paths: list[str]) -> None:
    base, *fts = paths
    cfg = write_yaml(tmp_path, {"merge_method": "model_stock", "base_model": base,
                                "models": [{"model": m} for m in fts]})
    out = str(tmp_path / "y")
    for extra in (["--method", "uniform"], ["--granularity", "row"], ["--dtype", "bf16"],
                  ["--alpha", "0.5"]):
        result = CliRunner().invoke(main, ["merge", "--config", cfg, "-o", out, *extra])
        assert result.exit_code == 2 and extra[0] in result.output
    result = CliRunner().invoke(main, ["merge", base, "--config", cfg, "-o", out])
    assert result.exit_code == 2 and "ANCHOR" in result.output
    result = CliRunner().invoke(main, ["merge", "-o", out])
    assert result.exit_code == 2 and "--config" in result.output


# -- vocabularies, chat templates, LoRA references -------------------------------------------

@pytest.mark.parametrize("change, source, pad, template", [
    ({}, "union", None, None),  # mergekit: the base's, and refuses differing sizes
    ({"tokenizer_source": "union"}, "union", None, None),
    ({"tokenizer_source": "base"}, "base", None, None),
    ({"tokenizer_source": "a"}, "a", None, None),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 64}}, "union", 64, None),
    ({"tokenizer": {"pad_to_multiple_of": 8}}, "union", 8, None),  # mergekit's default source
    ({"chat_template": "chatml"}, "union", None, "chatml"),
])
def test_vocabulary_keys_map_to_options(change: dict, source: str, pad, template) -> None:
    opts = parse_config({**MS, **change}).options
    assert opts.tokenizer_source == source
    assert opts.pad_to_multiple_of == pad
    assert opts.chat_template == template


def test_lora_references_in_both_spellings() -> None:
    doc = {**MS, "models": [{"model": "org/a+org/lora-a"},
                            {"model": {"model": {"path": "org/b", "revision": "v1"},
                                       "lora": "./lora-b"}},
                            {"model": {"model": "org/c", "lora": {"path": "org/l",
                                                                  "revision": "r"}}}]}
    assert parse_config(doc).models == ["org/a+org/lora-a", "org/b@v1+./lora-b",
                                        "org/c+org/l@r"]


def test_cli_says_once_where_model_stock_differs_from_mergekit(tmp_path: Path,
                                                               paths: list[str]) -> None:
    from modelstock.config import MERGEKIT_DIFFERENCES

    base, *fts = paths
    cfg = write_yaml(tmp_path, {**MS, "base_model": base, "models": [{"model": m} for m in fts]})
    result = CliRunner().invoke(main, ["merge", "--config", cfg, "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert result.output.count(MERGEKIT_DIFFERENCES) == 1
    quiet = CliRunner().invoke(main, ["merge", "--config", cfg, "-o", str(tmp_path / "q"), "-q"])
    assert MERGEKIT_DIFFERENCES not in quiet.output
