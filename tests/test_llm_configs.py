"""mergekit YAML as people write it (issue 16, item 4): the configs in tests/fixtures/mergekit are
shaped like published ``model_stock`` merges; each parses and merges, through the real CLI, tiny
Llama and Qwen2 models made here (tests/llm_models.py), by Hub id from an offline cache and by
local path, with mergekit's meaning:

- ``base_model`` listed among ``models`` is the base, not one more fine-tune;
- parameters model_stock never reads (per-model ``weight``/``density``, top-level ``normalize``,
  ``int8_mask``) warn, not fail;
- ``dtype``/``out_dtype`` give the output's dtype (``out_dtype``, else ``dtype``);
- ``tokenizer_source`` / ``tokenizer: {source, pad_to_multiple_of}``: ``union`` (our default)
  = the anchor's tokens at its ids, then tokens only fine-tunes have in order of first
  appearance; ``base``; or one model's vocabulary, by the reference as written;
- ``chat_template`` (``auto``: the most common among the inputs; ``chatml``; a Jinja string)
  lands in the output's tokenizer;
- ``model+lora``: the base with the adapter applied (PEFT's merge_and_unload), merged as a
  dense fine-tune.

Every output tensor is checked against a float64 reference computed here from the closed form
(`tests.llm_models.reference_merge`): t = N cos / (1 + (N - 1) cos), cos the mean pairwise
cosine, clamped to [0, 1]; for embeddings, t from the anchor's token rows only, rows of tokens
only fine-tunes have = the mean over those that have them, padding rows = the anchor's mean
token embedding.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from modelstock.cli import main
from modelstock.config import load_config, parse_config
from modelstock.errors import ModelStockError
from tests.llm_models import (
    CHATML,
    ORG,
    build_zoo,
    offline_hub,
    read_weights,
    reference_merge,
    union_vocab,
    vocab_of,
)

pytest.importorskip("transformers")
pytest.importorskip("peft")

FIXTURES = Path(__file__).with_name("fixtures") / "mergekit"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.yaml"))
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
L = [f"{ORG}/llama-ft-{i}" for i in range(10)]
Q = [f"{ORG}/qwen-ft-{i}" for i in range(6)]
LORA1 = f"{ORG}/llama-base+{ORG}/llama-lora-1"
LORA2 = f"{ORG}/llama-base+./loras/llama-lora-2"
HI = [{"role": "user", "content": "hi"}]

# Per fixture: the fine-tunes the merge must use (as written), the vocabulary source, the
# padding multiple of the embedding rows, the output dtype, the filter_wise flag, the chat
# template (None: not checked) and the ignored parameters that must be warned about.
EXPECT = {
    "01_llama_three_hub_ids": dict(models=[L[5], L[6], L[7]], dtype=BF16),
    "02_llama_base_listed_with_weights": dict(models=[L[5], L[6], L[8]], dtype=F32,
                                              ignored=["weight"]),
    "03_llama_chatml_union": dict(models=[L[1], L[2], L[4]], dtype=F32, template="chatml"),
    "04_llama_tokenizer_section_pad32": dict(models=[L[1], L[2], L[3], L[4]], dtype=F32,
                                             pad=32, template=CHATML),
    "05_llama_tokenizer_base": dict(models=[L[1], L[2], L[5]], dtype=F32, source="base"),
    "06_llama_tokenizer_from_model": dict(models=[L[1], L[2], L[6]], dtype=F32,
                                          source=L[2], template=CHATML),
    "07_llama_nine_models": dict(models=L[1:10], dtype=BF16, template=CHATML,
                                 ignored=["weight", "density", "normalize", "int8_mask"]),
    "08_llama_local_paths": dict(models=[f"./models/llama-ft-{i}" for i in (3, 5, 6, 7)],
                                 dtype=F16, anchor="./models/llama-base"),
    "09_llama_lora_hub": dict(models=[L[5], L[6], LORA1], dtype=F32),
    "10_llama_lora_local_mixed": dict(models=["./models/llama-ft-7", LORA2, LORA1, L[9]],
                                      dtype=F32, ignored=["weight"]),
    "11_qwen_union_chatml": dict(models=Q[1:5], dtype=BF16, pad=64, template="chatml"),
    "12_qwen_base_listed_auto": dict(models=[Q[1], Q[2], Q[4]], dtype=F32, pad=64,
                                     template=CHATML, ignored=["weight"]),
    "13_qwen_filter_wise_base_tokenizer": dict(models=[Q[3], Q[4], Q[5]], dtype=F32, pad=64,
                                               source="base", filter_wise=True),
    "14_qwen_five_inline_template": dict(
        models=[Q[1], f"{Q[2]}@main", Q[3], Q[4], f"{Q[5]}@main"], dtype=F32, pad=64,
        source=f"{Q[2]}@main",
        template="{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>\n' }}{% endfor %}"),
    "15_llama_default_union": dict(models=[L[1], L[4], L[6]], dtype=F32),
}


def expect(name: str) -> dict:
    return {"source": "union", "pad": None, "filter_wise": False, "template": None,
            "ignored": [], "anchor": f"{ORG}/{'qwen' if 'qwen' in name else 'llama'}-base",
            **EXPECT[name]}


def recorded(got: str, written: str) -> bool:
    """A report names a Hub id (or model+lora) as written, a local directory by the weights
    file it read there."""
    return got == written or (written.startswith("./") and Path(got).is_relative_to(
        Path(written)))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    z = build_zoo(tmp_path_factory.mktemp("zoo"))
    with offline_hub(z.hf_home), contextlib.chdir(z.root):
        yield z


@pytest.fixture(scope="module")
def merged(zoo, tmp_path_factory):
    """name -> the output directory of ``modelstock merge --config NAME.yaml`` (run once)."""
    outs = tmp_path_factory.mktemp("merged")
    done: dict[str, tuple[int, str]] = {}

    def run(name: str) -> Path:
        out = outs / name
        if name not in done:
            res = CliRunner().invoke(main, ["merge", "--config", str(FIXTURES / f"{name}.yaml"),
                                            "-o", str(out), "-q"])
            done[name] = (res.exit_code, res.output + (repr(res.exception)
                                                       if res.exit_code else ""))
        code, output = done[name]
        assert code == 0, output
        return out

    return run


def expected_vocab(zoo, e: dict) -> dict[str, int]:
    anchor = vocab_of(zoo.source(e["anchor"]))
    if e["source"] == "union":
        return union_vocab([anchor, *(vocab_of(zoo.source(m)) for m in e["models"])])
    if e["source"] == "base":
        return anchor
    return vocab_of(zoo.source(e["source"]))


def close(out: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    tol = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-5),
           torch.bfloat16: (1.6e-2, 1e-5)}[out.dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol[0], atol=tol[1], msg=lambda m: (
        f"{name}: {m}"))


# -- the fixtures themselves -------------------------------------------------------------------

def test_the_fixtures_cover_what_published_configs_do() -> None:
    docs = {n: yaml.safe_load((FIXTURES / f"{n}.yaml").read_text()) for n in NAMES}
    assert len(docs) >= 12 and set(docs) == set(EXPECT)
    text = "\n".join((FIXTURES / f"{n}.yaml").read_text() for n in NAMES)
    written = [e["model"] if isinstance(e["model"], str) else e["model"]["model"]["path"]
               for d in docs.values() for e in d["models"]]
    for d in docs.values():
        assert d["merge_method"] == "model_stock" and "base_model" in d
        assert 3 <= len([e for e in d["models"] if e["model"] != d["base_model"]]) <= 9
    assert any(d["base_model"] in [e["model"] for e in d["models"]] for d in docs.values())
    assert any(w.startswith("./") for w in written) and any(w.startswith(ORG) for w in written)
    assert any("+" in w for w in written)
    for key in ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template",
                "parameters"):
        assert any(key in d for d in docs.values()), key
    for needle in ("density:", "weight:", "filter_wise: true", "pad_to_multiple_of:",
                   "chat_template: auto", "chat_template: chatml", "tokenizer_source: base",
                   "tokenizer_source: union", "revision:", "@main"):
        assert needle in text, needle


@pytest.mark.parametrize("name", NAMES)
def test_fixture_parses(name) -> None:
    e = expect(name)
    cfg = load_config(FIXTURES / f"{name}.yaml")
    assert cfg.merge_method == "model_stock"
    assert (cfg.anchor, cfg.models) == (e["anchor"], e["models"])  # the base once, as base
    assert cfg.options.method == "model-stock"
    assert cfg.options.granularity == ("row" if e["filter_wise"] else "tensor")
    assert cfg.options.dtype == e["dtype"]
    warned = " ".join(cfg.warnings)
    for p in e["ignored"]:
        assert p in warned, (p, cfg.warnings)
    if not e["ignored"]:
        assert not any("no effect" in w for w in cfg.warnings), cfg.warnings


# -- each fixture merged, against the float64 reference ------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_fixture_merges_to_the_reference(name, zoo, merged) -> None:
    e = expect(name)
    out = merged(name)
    vocab = expected_vocab(zoo, e)
    ref = reference_merge(zoo.source(e["anchor"]), [zoo.source(m) for m in e["models"]],
                          vocab, e["pad"], e["filter_wise"])
    got = read_weights(out)
    assert sorted(got) == sorted(ref)  # tied stays tied (Qwen: no lm_head), untied untied
    for k, v in got.items():
        assert v.dtype == e["dtype"], (k, v.dtype)
        assert v.shape == ref[k].shape, (k, v.shape, ref[k].shape)
        close(v, ref[k], k)
    config = json.loads((out / "config.json").read_text())
    rows = got["model.embed_tokens.weight"].shape[0]
    assert config["vocab_size"] == rows
    anchor_config = json.loads((zoo.source(e["anchor"]) / "config.json").read_text())
    assert config["tie_word_embeddings"] == anchor_config["tie_word_embeddings"]
    report = json.loads((out / "modelstock_report.json").read_text())
    assert recorded(report["anchor"], e["anchor"]), report["anchor"]
    assert len(report["models"]) == len(e["models"])
    for got, written in zip(report["models"], e["models"], strict=True):
        assert recorded(got, written), (got, written)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_tokenizer_and_chat_template(name, zoo, merged) -> None:
    from transformers import AutoTokenizer

    e = expect(name)
    out = merged(name)
    vocab = expected_vocab(zoo, e)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == vocab
    for token in (t for t, i in vocab.items() if i >= 250):  # encodes to its id, alone
        assert tok.encode(token, add_special_tokens=False) == [vocab[token]], token
    if e["template"] == "chatml":  # the built-in ChatML template (not necessarily ours' text)
        text = tok.apply_chat_template(HI, tokenize=False, add_generation_prompt=True)
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    elif e["template"] is not None:
        assert tok.chat_template.strip() == e["template"].strip()
    if tok.chat_template:  # the markers a template writes are tokens of this vocabulary
        markers = set(re.findall(r"<\|[^|<>]+\|>", tok.chat_template))
        assert markers <= set(vocab), (markers - set(vocab), tok.chat_template)
    added = [t for t in vocab if t not in vocab_of(zoo.source(e["anchor"]))]
    if added:  # the report names the tokens added and the models that supplied them
        report = (out / "modelstock_report.json").read_text()
        for token in added:
            assert json.dumps(token) in report, token
            holders = [m for m in e["models"] if token in vocab_of(zoo.source(m))]
            assert any(json.dumps(m) in report for m in holders), (token, holders)


# -- mergekit's meaning, one point at a time -----------------------------------------------------

def test_added_token_rows_are_exactly_the_mean_over_the_models_that_have_them(zoo, merged
                                                                              ) -> None:
    out = read_weights(merged("03_llama_chatml_union"))
    fts = {n: read_weights(zoo.local(n)) for n in ("llama-ft-1", "llama-ft-2", "llama-ft-4")}
    vocabs = {n: vocab_of(zoo.local(n)) for n in fts}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = out[name]
        assert rows.shape[0] == 253  # 250 + <|im_start|> <|im_end|> <tool_call>, not padded
        for token, j in (("<|im_start|>", 250), ("<|im_end|>", 251), ("<tool_call>", 252)):
            holders = [fts[n][name][vocabs[n][token]].double() for n in fts
                       if token in vocabs[n]]
            torch.testing.assert_close(rows[j].double(), sum(holders) / len(holders),
                                       rtol=1e-6, atol=1e-7)
    # ft-2 holds <|im_end|> at 250 and <|im_start|> at 251: aligned by token, not by index
    assert vocabs["llama-ft-2"]["<|im_end|>"] == 250 == vocabs["llama-ft-1"]["<|im_start|>"]


def test_base_listed_among_models_is_not_a_fine_tune_twice(zoo, merged, tmp_path) -> None:
    listed = read_weights(merged("02_llama_base_listed_with_weights"))
    res = CliRunner().invoke(main, ["merge", f"{ORG}/llama-base", L[5], L[6], L[8], "-o",
                                    str(tmp_path / "plain"), "-q"])
    assert res.exit_code == 0, res.output
    plain = read_weights(tmp_path / "plain")
    for k, v in listed.items():
        torch.testing.assert_close(v, plain[k], rtol=0, atol=0)
    # with the base counted as a fourth model, every t would be N cos/(1+(N-1)cos) at N = 4
    report = json.loads((merged("02_llama_base_listed_with_weights")
                         / "modelstock_report.json").read_text())
    assert f"{ORG}/llama-base" not in report["models"]


def test_model_plus_lora_is_the_dense_model_peft_gives(zoo, merged, tmp_path) -> None:
    by_ref = read_weights(merged("09_llama_lora_hub"))
    dense = zoo.loras["llama-lora-1"][1]
    res = CliRunner().invoke(main, ["merge", f"{ORG}/llama-base", L[5], L[6], str(dense),
                                    "-o", str(tmp_path / "dense"), "-q"])
    assert res.exit_code == 0, res.output
    for k, v in read_weights(tmp_path / "dense").items():
        torch.testing.assert_close(by_ref[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_ignored_parameters_warn_in_the_report_and_the_summary(zoo, tmp_path) -> None:
    res = CliRunner().invoke(main, ["merge", "--config",
                                    str(FIXTURES / "07_llama_nine_models.yaml"), "-o",
                                    str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "modelstock_report.json").read_text())
    for p in ("weight", "density", "normalize", "int8_mask"):
        assert any(p in w for w in report["warnings"]), (p, report["warnings"])
        assert p in res.output


def test_where_we_differ_from_mergekit_is_said_in_one_line(zoo, tmp_path) -> None:
    """Issue 16 item 4: the deliberate differences (t clamped to [0, 1], float64 statistics)
    are said at run time, in one line."""
    res = CliRunner().invoke(main, ["merge", "--config",
                                    str(FIXTURES / "03_llama_chatml_union.yaml"), "-o",
                                    str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    lines = [x for x in res.output.splitlines() if "mergekit" in x and "clamp" in x]
    assert len(lines) == 1, res.output
    assert "float64" in lines[0], lines[0]


@pytest.mark.parametrize("tokenizer, message", [
    ({"source": "union", "tokens": {"<|im_start|>": {"source": "tiny-org/llama-ft-1"}}},
     "tokens"),
])
def test_tokenizer_sections_we_refuse_are_one_line(tokenizer, message) -> None:
    doc = {"merge_method": "model_stock", "base_model": "org/base",
           "models": [{"model": "org/a"}, {"model": "org/b"}], "tokenizer": tokenizer}
    with pytest.raises(ModelStockError) as err:
        parse_config(doc, "m.yml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_source_and_tokenizer_together_are_refused() -> None:
    doc = {"merge_method": "model_stock", "base_model": "org/base",
           "models": [{"model": "org/a"}, {"model": "org/b"}], "tokenizer_source": "union",
           "tokenizer": {"source": "base"}}  # mergekit: "Cannot specify both"
    with pytest.raises(ModelStockError, match="tokenizer"):
        parse_config(doc, "m.yml")


# -- vocabularies without a tokenizer, and an anchor token a fine-tune lacks ----------------------

def _copy(src: Path, dst: Path, drop=()) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in drop])
    return dst


def test_without_tokenizer_files_rows_align_by_index_with_a_warning(zoo, tmp_path) -> None:
    from tests.llm_models import vocab_rows

    drop = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja")
    names = ["llama-base", "llama-ft-1", "llama-ft-4", "llama-ft-5"]
    dirs = [_copy(zoo.local(n), tmp_path / n, drop) for n in names]
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["merge", *map(str, dirs), "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "modelstock_report.json").read_text())
    assert any("index" in w for w in report["warnings"]), report["warnings"]
    got = read_weights(out)
    ws = [read_weights(d) for d in dirs]
    by_index = [{str(i): i for i in range(w["lm_head.weight"].shape[0])} for w in ws]
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        # rows 0..249: Model Stock; 250: mean of ft-1 and ft-4; 251: ft-1's
        want = vocab_rows(ws[0][k], by_index[0], [w[k] for w in ws[1:]], by_index[1:],
                          union_vocab(by_index), None)
        assert got[k].shape == (252, 32)
        close(got[k], want, k)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 252


def test_an_anchor_token_a_fine_tune_lacks_is_a_zero_delta_there(zoo, tmp_path) -> None:
    """ft-6 with ``<|endoftext|>`` (id 3) renamed ``<|eot|>``: the anchor's row 3 sees no
    change from ft-6, and ``<|eot|>`` (only ft-6 has it) is appended with ft-6's row."""
    renamed = _copy(zoo.local("llama-ft-6"), tmp_path / "llama-ft-6-eot")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        p = renamed / f
        if p.exists():
            p.write_text(p.read_text().replace("<|endoftext|>", "<|eot|>"))
    assert vocab_of(renamed)["<|eot|>"] == 3 and "<|endoftext|>" not in vocab_of(renamed)
    dirs = [zoo.local("llama-base"), zoo.local("llama-ft-5"), renamed, zoo.local("llama-ft-7")]
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["merge", *map(str, dirs), "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    vocab = union_vocab([vocab_of(d) for d in dirs])
    assert vocab["<|eot|>"] == 250 and vocab["<|endoftext|>"] == 3
    ref = reference_merge(dirs[0], dirs[1:], vocab, None)
    got = read_weights(out)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        close(got[k], ref[k], k)
        torch.testing.assert_close(got[k][250], read_weights(renamed)[k][3], rtol=0, atol=0)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).get_vocab() == vocab
