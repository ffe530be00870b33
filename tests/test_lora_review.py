"""LoRA inputs that an outside read found mishandled: one module spelled two ways, a square
Conv1D under a contradicted fan_in_fan_out, PEFT's original_module copies, a tied lm_head, a base
without a saved tensor, model+lora on GPT-2. Each against PEFT's own merge_and_unload."""

from __future__ import annotations

import copy

import pytest
import torch

from modelstock.checkpoint import open_checkpoint
from modelstock.errors import ModelStockError

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def adapter(base, cfg, path, seed, scale=0.05):
    """A PEFT adapter of ``base`` with every trainable tensor moved (so each seed differs)."""
    torch.manual_seed(seed)
    m = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    m.save_pretrained(path)
    return path


def unloaded(base, path) -> dict[str, torch.Tensor]:
    m = peft.PeftModel.from_pretrained(copy.deepcopy(base), path)
    return {k: v.detach().double() for k, v in m.merge_and_unload().state_dict().items()}


def reference(base, paths) -> dict[str, torch.Tensor]:
    """Model Stock (clamped) of the merge_and_unload() models, in float64, from the formula."""
    w0 = {k: v.detach().double() for k, v in base.state_dict().items()}
    ws = [unloaded(base, p) for p in paths]
    out = {}
    for k, a in w0.items():
        d = [w[k] - a for w in ws]
        if all(float(x.abs().max()) == 0 for x in d):
            out[k] = a
            continue
        n = len(d)
        cos = [float(d[i].flatten() @ d[j].flatten() / (d[i].norm() * d[j].norm()))
               for i in range(n) for j in range(i + 1, n)]
        c = sum(cos) / len(cos)
        t = min(1.0, max(0.0, n * c / (1 + (n - 1) * c)))
        out[k] = a + t / n * sum(d)
    return out


def gpt2_classifier():
    torch.manual_seed(0)
    return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64, num_labels=5,
        pad_token_id=0)).eval()


def test_one_module_spelled_two_ways_is_refused(tmp_path) -> None:
    from modelstock.lora import merge_lora

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    base.save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    full = adapter(base, cfg, tmp_path / "full", 0)
    bare = adapter(base.model, cfg, tmp_path / "bare", 0)  # the body alone: 'layers.0...'
    with pytest.raises(ModelStockError, match="'layers.0.self_attn.q_proj' here is "
                                              "'model.layers.0.self_attn.q_proj'"):
        merge_lora([full, bare])
    with pytest.raises(ModelStockError, match="no weight for the adapted module 'layers.0"):
        merge_lora([full, bare], base=tmp_path / "base")


def test_a_square_conv1d_under_a_contradicted_config_goes_into_the_base(tmp_path) -> None:
    """GPT-2 Conv1D blocks and a Linear head: PEFT saves fan_in_fan_out=false; attn.c_proj is
    square, so its shape cannot tell; mlp.c_proj (same name, not square) does."""
    from modelstock.lora import merge_lora
    from modelstock.lora.into_base import MergedIntoBase

    base = gpt2_classifier()
    base.save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=2, target_modules=["c_attn", "c_proj", "score"])
    paths = [adapter(base, cfg, tmp_path / f"a{i}", i) for i in range(2)]
    merged = merge_lora(paths, base=tmp_path / "base")
    assert merged.modules["transformer.h.0.attn.c_proj"].fan_in_fan_out is True
    reader = MergedIntoBase(open_checkpoint(tmp_path / "base"), merged)
    ref = reference(base, paths)
    for name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight",
                 "score.weight"):
        got = reader.read(name).view(reader.infos[name].shape)
        torch.testing.assert_close(got, ref[name], rtol=1e-6, atol=1e-7, msg=name)
    reader.close()


def test_into_the_base_takes_the_trained_bias_not_peft_s_copy_of_the_base(tmp_path) -> None:
    from modelstock.lora.into_base import apply_adapter

    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=48, num_labels=3)).eval()
    base.save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=2, target_modules=["query", "value"], bias="all",
                          modules_to_save=["classifier"])
    path = adapter(base, cfg, tmp_path / "a", 0)
    want = unloaded(base, path)["classifier.bias"]
    reader = apply_adapter(open_checkpoint(tmp_path / "base"), path)
    torch.testing.assert_close(reader.read("classifier.bias"), want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(want, base.classifier.bias.double())
    reader.close()


def test_a_tied_lm_head_lora_merges_as_an_adapter_and_is_refused_into_the_base(tmp_path):
    from modelstock.lora import merge_lora
    from modelstock.lora.into_base import merge_into_base

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    base.save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    paths = [adapter(base, cfg, tmp_path / f"a{i}", i) for i in range(2)]
    merged = merge_lora(paths, base=tmp_path / "base")
    assert "lm_head" in merged.modules
    with pytest.raises(ModelStockError, match="tied to the input embedding"):
        merge_into_base(merged, tmp_path / "base", tmp_path / "full")
    assert not (tmp_path / "full").exists()


def test_a_base_without_a_saved_tensor_is_refused(tmp_path) -> None:
    from modelstock.lora import merge_lora

    base = gpt2_classifier()
    cfg = peft.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["score"])
    paths = [adapter(base, cfg, tmp_path / f"a{i}", i) for i in range(2)]
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("score")}
    with pytest.raises(ModelStockError, match="base lacks it .'score.weight'"):
        merge_lora(paths, base=state)


def test_model_plus_lora_on_gpt2_orients_conv1d_by_the_base(tmp_path) -> None:
    from modelstock.lora.into_base import apply_adapter

    base = gpt2_classifier()
    base.save_pretrained(tmp_path / "base")
    path = adapter(base, peft.LoraConfig(r=2, target_modules=["c_attn", "score"]),
                   tmp_path / "a", 0)
    want = unloaded(base, path)
    reader = apply_adapter(open_checkpoint(tmp_path / "base"), path)
    for name in ("transformer.h.0.attn.c_attn.weight", "score.weight"):
        got = reader.read(name).view(reader.infos[name].shape)
        torch.testing.assert_close(got, want[name], rtol=1e-6, atol=1e-7, msg=name)
    reader.close()
