"""LoRA adapters through the command line: the merged adapter, --rank, --merge-into-base (the
full model through the streaming engine), inspect, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from modelstock import merge_state_dicts
from modelstock.lora import merge_lora
from tests.conftest import run_cli
from tests.test_lora import PEFT_QUIET, llama  # noqa: F401  (the module-scoped fixture)


def _merged_adapter(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


@PEFT_QUIET
def test_cli_writes_the_adapter_the_api_makes(llama, tmp_path) -> None:  # noqa: F811
    base, _, paths, _, root = llama
    proc = run_cli("merge", str(root / "base"), *map(str, paths), "-o", str(tmp_path / "m"), "-q")
    assert proc.returncode == 0, proc.stderr
    want = merge_lora(paths, base=str(root / "base")).state_dict()
    got = _merged_adapter(tmp_path / "m")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    report = json.loads((tmp_path / "m" / "modelstock_report.json").read_text())
    assert report["n_models"] == 3 and all("t" in x for x in report["layers"] if "cos" in x)
    # no base: the adapter output needs none
    proc = run_cli("merge", *map(str, paths), "-o", str(tmp_path / "r2"), "--rank", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    assert all(v.shape[0] == 2 for k, v in _merged_adapter(tmp_path / "r2").items()
               if "lora_A" in k)


@PEFT_QUIET
def test_merge_into_base_is_the_dense_merge(llama, tmp_path) -> None:  # noqa: F811
    transformers = pytest.importorskip("transformers")
    base, state0, paths, finetunes, root = llama
    out = tmp_path / "full"
    proc = run_cli("merge", str(root / "base"), *map(str, paths), "-o", str(out),
                   "--merge-into-base", "--chunk-size", "100", "-q")
    assert proc.returncode == 0, proc.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    dense, _ = merge_state_dicts(state0, finetunes)
    got = merged.state_dict()
    for k, v in dense.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # the written weights are exactly base + the factor-space merge's delta, rounded once
    m = merge_lora(paths, base=str(root / "base"))
    name = "model.layers.1.self_attn.q_proj"
    want = (state0[f"{name}.weight"].double() + m.delta(name)).float()
    assert torch.equal(got[f"{name}.weight"], want)
    report = json.loads((out / "modelstock_report.json").read_text())
    assert report["method"] == "model-stock" and report["n_models"] == 3
    assert any(x["name"] == name and "t" in x for x in report["layers"])


@PEFT_QUIET
def test_inspect_and_errors(llama, tmp_path) -> None:  # noqa: F811
    base, _, paths, _, root = llama
    proc = run_cli("inspect", str(root / "base"), *map(str, paths), "--json",
                   str(tmp_path / "i.json"))
    assert proc.returncode == 0, proc.stderr
    assert "model-stock (N=3" in proc.stdout
    assert json.loads((tmp_path / "i.json").read_text())["n_models"] == 3
    proc = run_cli("merge", *map(str, paths), "-o", str(tmp_path / "x"), "--merge-into-base")
    assert proc.returncode == 2 and "base model as ANCHOR" in proc.stderr
    proc = run_cli("merge", str(root / "base"), str(paths[0]), str(root / "base"), "-o",
                   str(tmp_path / "x"))
    assert proc.returncode == 1 and "not a LoRA adapter" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("merge", str(root / "base"), *map(str, paths), "-o", str(tmp_path / "x"),
                   "--method", "uniform")
    assert proc.returncode == 2 and "does not apply to LoRA" in proc.stderr
    assert not (tmp_path / "x").exists()


@PEFT_QUIET
def test_adapter_output_refuses_full_model_flags_and_a_foreign_base(llama, tmp_path) -> None:  # noqa: F811
    transformers = pytest.importorskip("transformers")
    base, _, paths, _, root = llama
    proc = run_cli("merge", *map(str, paths), "-o", str(tmp_path / "x"), "--device", "meta")
    assert proc.returncode == 2 and "--merge-into-base" in proc.stderr
    other = transformers.LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=12,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1)
    transformers.LlamaForCausalLM(other).save_pretrained(tmp_path / "other")
    proc = run_cli("merge", str(tmp_path / "other"), *map(str, paths), "-o", str(tmp_path / "x"))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "delta is" in proc.stderr and not (tmp_path / "x").exists()
