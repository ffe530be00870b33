"""An end-to-end LLM merge (issue 16, item 5): tiny Llama- and Qwen2-style models made with
transformers (random weights, save_pretrained; Llamas untied, Qwen2s tied with rows padded to a
multiple of 64; some fine-tunes add the ChatML tokens, at different ids, and carry a chat
template), 3 to 5 fine-tunes of each (anchor + a shared + a private perturbation), merged by Hub
id from an offline cache through the CLI. The output must load with
``AutoModelForCausalLM.from_pretrained`` and ``generate``; ``AutoTokenizer.from_pretrained``
must load, encode the added tokens to the ids their merged embedding rows were built for, and
apply the chat template.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from click.testing import CliRunner

from modelstock.cli import main
from tests.llm_models import (
    CHATML,
    ORG,
    build_zoo,
    offline_hub,
    read_weights,
    vocab_of,
)

pytest.importorskip("transformers")
pytest.importorskip("peft")

HI = [{"role": "user", "content": "the quick brown fox"}]
CHATML_TEXT = "<|im_start|>user\nthe quick brown fox<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    z = build_zoo(tmp_path_factory.mktemp("zoo"))
    with offline_hub(z.hf_home), contextlib.chdir(z.root):
        yield z


def cli_merge(*args: str) -> None:
    res = CliRunner().invoke(main, ["merge", *args, "-q"])
    assert res.exit_code == 0, res.output + (repr(res.exception) if res.exception else "")


def load(out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(out)


def generates(model, tok) -> torch.Tensor:
    """Greedy generation from the chat template's prompt: new tokens, all in the vocabulary."""
    ids = tok.apply_chat_template(HI, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    assert torch.isfinite(logits).all()
    assert logits.shape[-1] == model.config.vocab_size
    assert out.shape == (1, ids.shape[1] + 6) or out.shape[1] > ids.shape[1]
    assert torch.equal(out[0, :ids.shape[1]], ids[0])
    assert (out < model.config.vocab_size).all()
    tok.decode(out[0, ids.shape[1]:])
    return out


def mean_of_holders(zoo, names, token: str, tensor: str) -> torch.Tensor:
    rows = []
    for n in names:
        v = vocab_of(zoo.local(n))
        if token in v:
            w = read_weights(zoo.local(n))
            rows.append(w.get(tensor, w["model.embed_tokens.weight"])[v[token]].double())
    return sum(rows) / len(rows)


def test_llama_chat_finetunes_merged_by_hub_id_load_and_generate(zoo, tmp_path) -> None:
    names = ["llama-ft-1", "llama-ft-2", "llama-ft-3", "llama-ft-4"]
    out = tmp_path / "llama"
    cli_merge(f"{ORG}/llama-base", *(f"{ORG}/{n}" for n in names), "-o", str(out),
              "--chat-template", "auto")
    model, tok = load(out)
    # the union vocabulary: the anchor's 250 tokens, then ft-1's two, then ft-4's one
    want = {"<|im_start|>": 250, "<|im_end|>": 251, "<tool_call>": 252}
    assert model.config.vocab_size == 253 == len(tok)
    assert model.get_input_embeddings().weight.shape == (253, 32)
    assert not model.config.tie_word_embeddings
    for token, i in want.items():
        assert tok.convert_tokens_to_ids(token) == i
        assert tok.encode(token, add_special_tokens=False) == [i]
        for tensor, param in (("model.embed_tokens.weight", model.get_input_embeddings()),
                              ("lm_head.weight", model.get_output_embeddings())):
            torch.testing.assert_close(param.weight[i].double(),
                                       mean_of_holders(zoo, names, token, tensor),
                                       rtol=1e-6, atol=1e-7)
    # auto: ChatML, the template of two of the four fine-tunes (one has another, one none)
    assert tok.chat_template.strip() == CHATML.strip()
    assert tok.apply_chat_template(HI, tokenize=False, add_generation_prompt=True) == CHATML_TEXT
    ids = tok.apply_chat_template(HI, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(250) == 2 and ids.count(251) == 1
    generates(model, tok)


def test_qwen_tied_padded_finetunes_merged_by_hub_id_load_and_generate(zoo, tmp_path) -> None:
    names = [f"qwen-ft-{i}" for i in range(1, 6)]  # N = 5
    out = tmp_path / "qwen"
    cli_merge(f"{ORG}/qwen-base", *(f"{ORG}/{n}" for n in names), "-o", str(out),
              "--tokenizer-source", "union", "--chat-template", "chatml")
    model, tok = load(out)
    assert len(tok) == 260 and model.config.vocab_size == 320  # padded to 64, as the inputs
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == \
        model.get_input_embeddings().weight.data_ptr()
    assert "lm_head.weight" not in read_weights(out)
    emb = model.get_input_embeddings().weight.double()
    anchor = read_weights(zoo.local("qwen-base"))["model.embed_tokens.weight"].double()
    torch.testing.assert_close(emb[260:], anchor[:250].mean(0).expand(60, -1), rtol=1e-6,
                               atol=1e-7)  # padding rows: the anchor's mean token embedding
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("<|im_start|>", "<|im_end|>", "<think>", "<tool_call>",
                               "<|file_sep|>")] == [250, 251, 252, 253, 259]
    for token in ("<|im_start|>", "<|im_end|>", "<think>", "<|file_sep|>"):
        assert tok.encode(token, add_special_tokens=False) == [vocab[token]]
        torch.testing.assert_close(emb[vocab[token]], mean_of_holders(
            zoo, names, token, "model.embed_tokens.weight"), rtol=1e-6, atol=1e-7)
    assert tok.apply_chat_template(HI, tokenize=False, add_generation_prompt=True) == CHATML_TEXT
    generates(model, tok)
    report = json.loads((out / "modelstock_report.json").read_text())
    assert report["models"] == [f"{ORG}/{n}" for n in names]


def test_python_api_base_vocabulary_and_a_chat_template(zoo, tmp_path) -> None:
    from modelstock import merge_checkpoints

    out = tmp_path / "api"
    merge_checkpoints(f"{ORG}/llama-base", [f"{ORG}/llama-ft-{i}" for i in (1, 2, 5)], out,
                      tokenizer_source="base", chat_template="chatml")
    model, tok = load(out)
    assert model.config.vocab_size == 250 == len(tok)
    assert "<|im_start|>" not in tok.get_vocab()
    assert "<|im_start|>" in tok.chat_template
    generates(model, tok)


def test_cli_vocabulary_of_one_model_by_its_id(zoo, tmp_path) -> None:
    out = tmp_path / "from-ft2"
    names = ["llama-ft-1", "llama-ft-2", "llama-ft-6"]
    cli_merge(f"{ORG}/llama-base", *(f"{ORG}/{n}" for n in names), "-o", str(out),
              "--tokenizer-source", f"{ORG}/llama-ft-2")
    model, tok = load(out)
    assert tok.get_vocab() == vocab_of(zoo.local("llama-ft-2"))
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"]) == [250, 251]
    w = model.get_input_embeddings().weight.double()
    for token in ("<|im_end|>", "<|im_start|>"):  # ft-1 holds them the other way round
        torch.testing.assert_close(w[tok.convert_tokens_to_ids(token)], mean_of_holders(
            zoo, names, token, "model.embed_tokens.weight"), rtol=1e-6, atol=1e-7)
    generates(model, tok)
    # the same model spelled with its revision names the same vocabulary
    again = tmp_path / "from-ft2-main"
    cli_merge(f"{ORG}/llama-base", *(f"{ORG}/{n}" for n in names), "-o", str(again),
              "--tokenizer-source", f"{ORG}/llama-ft-2@main")
    assert read_weights(again).keys() == read_weights(out).keys()
    for k, v in read_weights(out).items():
        assert torch.equal(read_weights(again)[k], v), k


def test_a_yaml_with_a_lora_reference_loads_and_generates(zoo, tmp_path) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: model_stock\nbase_model: {ORG}/llama-base\nmodels:\n"
                      f"  - model: {ORG}/llama-ft-1\n  - model: {ORG}/llama-ft-2\n"
                      f"  - model: {ORG}/llama-base+{ORG}/llama-lora-1\n"
                      "tokenizer_source: union\nchat_template: auto\ndtype: bfloat16\n")
    out = tmp_path / "lora"
    cli_merge("--config", str(config), "-o", str(out))
    model, tok = load(out)
    assert read_weights(out)["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert model.config.vocab_size == 252 and tok.convert_tokens_to_ids("<|im_end|>") == 251
    generates(model, tok)
