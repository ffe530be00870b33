"""model+lora inputs whose adapters resized the vocabulary or saved a tokenizer, and the
regressions an outside read of the vocabulary work found."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelstock import MergeOptions, merge_checkpoints
from modelstock.errors import ModelStockError
from modelstock.vocab import Tokenizer, plan_alignment
from tests.llm_models import CHATML, FineTune, make_family, make_lora, read_weights
from tests.test_vocab import BASE, save_model, weights

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("lv")
    return root, make_family(root / "m", "llama", "base", [
        FineTune("ftA", ("<|im_start|>", "<|im_end|>"), chat_template=CHATML), FineTune("ftB"),
        FineTune("ftC")], tied=True)


def test_a_lora_that_added_tokens_is_merged_by_token(family) -> None:
    """PEFT's chat-LoRA recipe: tokens added, embedding resized, embed_tokens and lm_head in
    modules_to_save, the tokenizer saved with the adapter. ``base+adapter`` gives what its
    merge_and_unload() gives."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.tokenization_utils_base import AddedToken

    root, fam = family
    base = fam.dirs["base"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens([AddedToken("<x>", special=True), AddedToken("<y>", special=True)],
                   special_tokens=True)
    model.resize_token_embeddings(len(tok))
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                          modules_to_save=["embed_tokens"],
                                          init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.01 * torch.randn_like(p))
    pm.save_pretrained(root / "adapter")
    tok.save_pretrained(root / "adapter")
    pm.merge_and_unload().save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    a = merge_checkpoints(base, [f"{base}+{root / 'adapter'}", fam.dirs["ftB"]], root / "o1")
    b = merge_checkpoints(base, [root / "dense", fam.dirs["ftB"]], root / "o2")
    wa, wb = read_weights(root / "o1"), read_weights(root / "o2")
    assert wa["model.embed_tokens.weight"].shape[0] == len(tok)
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-6, msg=k)
    assert [(d["token"], d["id"]) for d in a.vocabulary["added"]] \
        == [(d["token"], d["id"]) for d in b.vocabulary["added"]] == [("<x>", 250), ("<y>", 251)]


def test_a_lora_anchor_whose_adapter_saved_the_tokenizer(family, tmp_path: Path) -> None:
    """The anchor ``base+lora`` (TRL saves the tokenizer beside the adapter): the output takes
    the model's config, the adapter's tokenizer, and loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, fam = family
    lora, _ = make_lora(tmp_path, fam.dirs["base"], "lora1", "org/base", 3)
    AutoTokenizer.from_pretrained(fam.dirs["base"]).save_pretrained(lora)
    out = tmp_path / "out"
    merge_checkpoints(f"{fam.dirs['base']}+{lora}", [fam.dirs["ftA"], fam.dirs["ftB"]], out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json"} <= names and "adapter_config.json" not in names
    AutoModelForCausalLM.from_pretrained(out)


def test_the_padding_multiple_is_read_off_the_padded_inputs() -> None:
    base = {t: i for i, t in enumerate(BASE)}
    a = Tokenizer(dict(base, x=10, y=11))  # 12 tokens in 64 rows: 64 (not 8: 8 gives 16)
    b = Tokenizer(dict(base, **{f"z{i}": 10 + i for i in range(8)}))  # 18 tokens, unpadded
    al = plan_alignment([10, 64, 18], [Tokenizer(base), a, b], ["A", "B", "C"])
    assert al.rows == 64  # 20 tokens padded to 64, not to a larger power of two
    qwen = plan_alignment([256, 290], [Tokenizer(base), Tokenizer(dict(base, q=10))],
                          ["A", "B"])  # 290 rows for 11 tokens: no power of two gives that
    assert qwen.rows == 256


def test_equal_rows_without_every_tokenizer_change_nothing(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(4)
    a = weights(10, g)
    v = {t: i for i, t in enumerate(BASE)}
    paths = [save_model(tmp_path / "a", a, v), save_model(tmp_path / "b", weights(10, g, a),
                                                          None),
             save_model(tmp_path / "c", weights(10, g, a), v)]
    report = merge_checkpoints(paths[0], paths[1:], tmp_path / "o")
    assert report.vocabulary is None and not any("align" in w for w in report.warnings)


def test_an_unknown_chat_template_is_refused_before_merging() -> None:
    with pytest.raises(ModelStockError, match="unknown chat template 'llama3'"):
        MergeOptions(chat_template="llama3")


def test_nan_in_an_added_row_names_the_fine_tune(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    a = weights(10, g)
    v = {t: i for i, t in enumerate(BASE)}
    f1 = weights(11, g, a)
    f1["model.embed_tokens.weight"][10, 0] = float("nan")
    paths = [save_model(tmp_path / "a", a, v), save_model(tmp_path / "f1", f1, v, {"<x>": 10}),
             save_model(tmp_path / "f2", weights(10, g, a), v)]
    with pytest.raises(ModelStockError, match="f1/model.safetensors.*NaN"):
        merge_checkpoints(paths[0], paths[1:], tmp_path / "o")
    assert not (tmp_path / "o").exists()
