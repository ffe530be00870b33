"""Tiny causal LMs for the LLM tests and benchmarks: Llama- and Qwen2-style models with random
weights, a real (BPE) tokenizer trained offline, "fine-tunes" of them, LoRA adapters, an offline
Hugging Face Hub cache holding them, and a float64 reference for what a Model Stock merge of them
must give. No tests here.

A family is an anchor and fine-tunes ``anchor + step * (shared + private_i)`` (every parameter;
``shared`` is the same for all fine-tunes of the family, so the task vectors meet at cos ~ 0.5).
Tensors matching ``no_shared`` get no shared part (cos ~ 0, sometimes < 0: where clamping
matters). A fine-tune may add special tokens (``tokenizer.add_tokens(..., special_tokens=True)``
+ ``model.resize_token_embeddings``, optionally with ``pad_to_multiple_of``); the rows of its
added tokens are ``anchor mean + shared(token) + private(token, model)`` so that a token two
fine-tunes add (at different ids, if they add in a different order) has correlated rows.

`cache_repo` lays files out as huggingface_hub's cache does (``models--org--name/{blobs,refs,
snapshots}``); tests/test_hub.py uses it too.

transformers, tokenizers and peft are imported where used: tests/test_hub.py imports this
module only for `cache_repo`.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import hashlib
import json
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

ORG = "tiny-org"
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
BASE_VOCAB = 250       # the base tokenizer's length (not a multiple of 32 or 64)
STEP = 0.01            # size of each fine-tune's shared and private perturbation
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt "
          "%}{{ '<|im_start|>assistant\n' }}{% endif %}")
PLAIN_TEMPLATE = ("{% for message in messages %}{{ message['role'] + ': ' + message['content'] "
                  "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}"
                  "{% endif %}")
CORPUS = """
The quick brown fox jumps over the lazy dog while the small cat sleeps near the warm fire.
Model soups average the weights of several fine-tuned models to improve accuracy without any
extra inference cost. Model Stock uses the geometry of the fine-tuned weights: the angle between
task vectors tells how far to move from the pretrained anchor toward their average.
Large language models are trained on many tokens of text; chat models learn special tokens that
mark the start and the end of each message, and a chat template renders a conversation.
Tokenizers split words into pieces: byte pair encoding merges the most frequent pairs first.
Every layer has attention projections, a gated feed forward block and two normalisations.
Seven bright kites drift above quiet harbours; zebras, yaks and jaguars wander far away.
Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 and 2024 appear, with punctuation: commas, colons!
"""
SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>"]


# -- the Hub cache -----------------------------------------------------------------------------

def commit_of(text: str) -> str:
    """A stable 40-hex commit hash for a name."""
    return hashlib.sha1(text.encode()).hexdigest()


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str, refs=("main",)) -> Path:
    """Put ``source``'s files into the Hub cache as ``repo_id`` at ``commit`` (blobs named by
    content, snapshot entries relative symlinks, ``refs/<ref>`` holding the commit)."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@contextlib.contextmanager
def offline_hub(hf_home: Path) -> Iterator[Path]:
    """HF_HOME=``hf_home``, its ``hub`` the cache, HF_HUB_OFFLINE=1, for this process (and the
    subprocesses it starts); huggingface_hub's import-time constants and modelstock.hub's memo
    follow. Yields the cache directory."""
    import huggingface_hub.constants as constants

    from modelstock import hub

    cache = hf_home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    saved_env = {k: os.environ.get(k) for k in [*env, "HF_TOKEN"]}
    saved = {k: getattr(constants, k) for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "ENDPOINT")}
    saved_resolved = hub._resolved
    os.environ.update(env)
    os.environ.pop("HF_TOKEN", None)
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache), True
    constants.ENDPOINT = "http://127.0.0.1:9"  # a closed port: any request fails at once
    hub._resolved = {}
    try:
        yield cache
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for k, v in saved.items():
            setattr(constants, k, v)
        hub._resolved = saved_resolved


def to_hub(cache: Path, repo_id: str, directory: Path) -> Path:
    """``directory`` as ``repo_id`` (branch main) in the offline cache."""
    return cache_repo(cache, repo_id, directory, commit_of(repo_id))


# -- tokenizer ---------------------------------------------------------------------------------

def base_tokenizer(vocab: int = BASE_VOCAB):
    """A BPE tokenizer of exactly ``vocab`` tokens (``<unk> <s> </s>`` first) trained on
    `CORPUS`, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, min_frequency=1,
                                  show_progress=False)
    tok.train_from_iterator([line for line in CORPUS.splitlines() if line] * 3, trainer)
    if tok.get_vocab_size() != vocab:
        raise RuntimeError(f"the corpus gives {tok.get_vocab_size()} tokens, not {vocab}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=128)


def vocab_of(directory: Path) -> dict[str, int]:
    """token -> id of a saved model's tokenizer.json (added tokens included)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(directory) / "tokenizer.json")).get_vocab(True)


# -- models ------------------------------------------------------------------------------------

def tiny_config(arch: str, vocab_size: int, tied: bool):
    from transformers import LlamaConfig, Qwen2Config

    common = {"hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "vocab_size": vocab_size, "max_position_embeddings": 128,
              "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(arch)


def _noise(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _seed(*parts: object) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode())


@dataclass(frozen=True)
class FineTune:
    """One fine-tune of a family: its name, special tokens it adds (in this order), the
    ``pad_to_multiple_of`` of its resize, its chat template, and max_shard_size (sharded)."""

    name: str
    added: tuple[str, ...] = ()
    pad_to: int | None = None
    chat_template: str | None = None
    shard: str | None = None


@dataclass
class Family:
    """An anchor and its fine-tunes, saved under ``root/models``; ``repo(name)`` is the Hub id."""

    arch: str
    tied: bool
    anchor: str
    dirs: dict[str, Path] = field(default_factory=dict)
    specs: dict[str, FineTune] = field(default_factory=dict)

    @staticmethod
    def repo(name: str) -> str:
        return f"{ORG}/{name}"


def save(model, tok, directory: Path, shard: str | None = None) -> Path:
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(directory, safe_serialization=True, **kw)
    tok.save_pretrained(directory)
    return directory


def make_family(root: Path, arch: str, anchor: str, finetunes: Sequence[FineTune], *,
                tied: bool, anchor_pad: int | None = None, seed: int = 0,
                step: float = STEP, no_shared: Sequence[str] = ("*layernorm*",)) -> Family:
    """Save the anchor (vocabulary `BASE_VOCAB`, its rows padded to ``anchor_pad`` if given) and
    ``finetunes`` under ``root/<name>``."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import AddedToken

    fam = Family(arch, tied, anchor)
    tok0 = base_tokenizer()
    rows = BASE_VOCAB if anchor_pad is None else math.ceil(BASE_VOCAB / anchor_pad) * anchor_pad
    torch.manual_seed(_seed(arch, anchor, seed))
    model0 = AutoModelForCausalLM.from_config(tiny_config(arch, rows, tied)).float().eval()
    with torch.no_grad():  # transformers' init: std 0.02 and norms at 1; vary the norms too
        for name, p in model0.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * _noise(p.shape, _seed(anchor, name)))
    fam.dirs[anchor] = save(model0, tok0, root / anchor)
    embed_mean = model0.get_input_embeddings().weight[:BASE_VOCAB].mean(0).detach().clone()
    for ft in finetunes:
        model = copy.deepcopy(model0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                shared = (0 if any(fnmatch.fnmatchcase(name, g) for g in no_shared)
                          else _noise(p.shape, _seed(anchor, "shared", name)))
                p.add_(step * (shared + _noise(p.shape, _seed(anchor, ft.name, name))))
        tok = PreTrainedTokenizerFast.from_pretrained(fam.dirs[anchor])
        if ft.added:
            tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ft.added],
                           special_tokens=True)
            need = len(tok)
            if ft.pad_to is not None or need > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(need, pad_to_multiple_of=ft.pad_to,
                                              mean_resizing=False)
            vocab = tok.get_vocab()
            with torch.no_grad():
                for t in ft.added:
                    row = embed_mean + 0.02 * (_noise(HIDDEN, _seed("token", t))
                                               + _noise(HIDDEN, _seed("token", t, ft.name)))
                    model.get_input_embeddings().weight[vocab[t]] = row
                    if not tied:
                        model.get_output_embeddings().weight[vocab[t]] = (
                            row + 0.01 * _noise(HIDDEN, _seed("head", t, ft.name)))
        if ft.chat_template is not None:
            tok.chat_template = ft.chat_template
        fam.dirs[ft.name] = save(model, tok, root / ft.name, ft.shard)
        fam.specs[ft.name] = ft
    return fam


def make_lora(root: Path, base_dir: Path, name: str, base_id: str, seed: int,
              targets: Sequence[str] = ("q_proj", "v_proj"), r: int = 4
              ) -> tuple[Path, Path]:
    """A PEFT LoRA adapter on ``base_dir`` (random A and B, so it changes the model) saved as
    ``root/name``, and the dense model it makes (PEFT's ``merge_and_unload``) saved as
    ``root/name-merged``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0,
                     init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # a step of the size of the fine-tunes' (STEP per weight)
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.mul_(0.3)
    peft_model.save_pretrained(root / name)
    config_path = root / name / "adapter_config.json"
    adapter_cfg = json.loads(config_path.read_text())
    adapter_cfg["base_model_name_or_path"] = base_id
    config_path.write_text(json.dumps(adapter_cfg, indent=2))
    merged = peft_model.merge_and_unload()
    save(merged, AutoTokenizer.from_pretrained(base_dir), root / f"{name}-merged")
    return root / name, root / f"{name}-merged"


# -- the zoo the tests share -------------------------------------------------------------------

LLAMA_ADDED = {"llama-ft-1": ("<|im_start|>", "<|im_end|>"),
               "llama-ft-2": ("<|im_end|>", "<|im_start|>"),   # the same tokens, other ids
               "llama-ft-4": ("<tool_call>",)}
QWEN_ADDED = {"qwen-ft-1": ("<|im_start|>", "<|im_end|>"),
              "qwen-ft-2": ("<|im_end|>", "<|im_start|>", "<think>"),
              "qwen-ft-3": ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                            "<|fim_suffix|>", "<|repo_name|>", "<|file_sep|>")}


def llama_finetunes() -> list[FineTune]:
    """Untied Llamas, rows never padded: ft-1 and ft-2 add the ChatML tokens (in either order)
    with the ChatML template, ft-3 is sharded and has another template, ft-4 adds a tool token,
    ft-5 .. ft-9 are plain."""
    fts = [FineTune("llama-ft-1", LLAMA_ADDED["llama-ft-1"], chat_template=CHATML),
           FineTune("llama-ft-2", LLAMA_ADDED["llama-ft-2"], chat_template=CHATML),
           FineTune("llama-ft-3", chat_template=PLAIN_TEMPLATE, shard="40KB"),
           FineTune("llama-ft-4", LLAMA_ADDED["llama-ft-4"])]
    return fts + [FineTune(f"llama-ft-{i}") for i in range(5, 10)]


def qwen_finetunes() -> list[FineTune]:
    """Tied Qwen2s whose rows are padded to a multiple of 64 (the anchor's too: 250 tokens,
    256 rows): ft-1 (2 tokens) and ft-2 (3) fit in the padding, ft-3 (7) grows to 320 rows."""
    return [FineTune("qwen-ft-1", QWEN_ADDED["qwen-ft-1"], 64, CHATML),
            FineTune("qwen-ft-2", QWEN_ADDED["qwen-ft-2"], 64, CHATML),
            FineTune("qwen-ft-3", QWEN_ADDED["qwen-ft-3"], 64, PLAIN_TEMPLATE, shard="60KB"),
            FineTune("qwen-ft-4"), FineTune("qwen-ft-5")]


@dataclass
class Zoo:
    root: Path          # the working directory of the merges: ./models/... exist here
    hf_home: Path
    llama: Family
    qwen: Family
    loras: dict[str, tuple[Path, Path]]   # name -> (adapter dir, dense merged dir)

    def local(self, name: str) -> Path:
        return self.root / "models" / name

    def source(self, written: str) -> Path:
        """The local directory a reference written in a config stands for (a dense directory
        for ``model+lora``)."""
        if "+" in written:
            _, lora = written.split("+", 1)
            return self.loras[Path(lora).name][1]
        name = written.removeprefix("./").split("@")[0]
        name = name.removeprefix(f"{ORG}/").removeprefix("models/").removeprefix("loras/")
        return self.local(name)


def build_zoo(root: Path) -> Zoo:
    """Both families, two LoRA adapters on llama-base, all in an offline Hub cache under
    ``root/hf`` as ``tiny-org/<name>`` and as local directories ``root/models/<name>`` (LoRA
    adapters: ``root/loras/<name>``)."""
    models = root / "models"
    models.mkdir(parents=True)
    llama = make_family(models, "llama", "llama-base", llama_finetunes(), tied=False, seed=1)
    qwen = make_family(models, "qwen2", "qwen-base", qwen_finetunes(), tied=True,
                       anchor_pad=64, seed=2)
    (root / "loras").mkdir()
    loras = {name: make_lora(root / "loras", llama.dirs["llama-base"], name,
                             f"{ORG}/llama-base", seed)
             for name, seed in (("llama-lora-1", 11), ("llama-lora-2", 12))}
    hf_home = root / "hf"
    cache = hf_home / "hub"
    cache.mkdir(parents=True)
    for fam in (llama, qwen):
        for name, d in fam.dirs.items():
            to_hub(cache, fam.repo(name), d)
    for name, (adapter, _) in loras.items():
        to_hub(cache, f"{ORG}/{name}", adapter)
    return Zoo(root, hf_home, llama, qwen, loras)


# -- reading outputs, and the float64 reference --------------------------------------------------

def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(directory).glob("*.safetensors"))
            for k, v in load_file(str(f)).items()}


def is_vocab_tensor(name: str) -> bool:
    return name in ("lm_head.weight", "model.embed_tokens.weight")


def union_vocab(vocabs: Sequence[dict[str, int]]) -> dict[str, int]:
    """The anchor's tokens at its ids, then tokens only the fine-tunes have, in order of first
    appearance (models in order, each in its own id order)."""
    out = dict(vocabs[0])
    for v in vocabs[1:]:
        for tok in sorted(v, key=v.get):
            if tok not in out:
                out[tok] = len(out)
    return out


def stock_t(deltas: Sequence[torch.Tensor], clamp: bool = True, dim=None) -> torch.Tensor:
    """t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors (over
    all their elements, or along ``dim`` per row); 0 where a task vector is zero or at the
    pole; clamped to [0, 1] unless ``clamp`` is False."""
    n = len(deltas)
    flat = [d.reshape(-1) if dim is None else d for d in deltas]
    norms = [f.norm(dim=-1) for f in flat]
    cos = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            prod = norms[i] * norms[j]
            c = (flat[i] * flat[j]).sum(-1) / torch.where(prod > 0, prod, torch.ones_like(prod))
            cos = cos + torch.where(prod > 0, c, torch.zeros_like(c))
            pairs += 1
    cos = cos / pairs
    den = 1 + (n - 1) * cos
    t = torch.where(den.abs() > 1e-12, n * cos / torch.where(den.abs() > 1e-12, den,
                                                            torch.ones_like(den)),
                    torch.zeros_like(cos))
    zero = torch.stack([nm == 0 for nm in norms]).all(0)
    t = torch.where(zero, torch.zeros_like(t), t)
    return t.clamp(0, 1) if clamp else t


def stock(w0: torch.Tensor, ws: Sequence[torch.Tensor], filter_wise: bool = False,
          clamp: bool = True) -> torch.Tensor:
    """Model Stock of one tensor in float64: w0 + t * mean(w_i - w0)."""
    w0 = w0.double()
    deltas = [w.double() - w0 for w in ws]
    mean = sum(deltas) / len(deltas)
    if filter_wise and w0.dim() >= 2:
        t = stock_t([d.reshape(d.shape[0], -1) for d in deltas], clamp, dim=-1)
        return w0 + t.reshape(-1, *([1] * (w0.dim() - 1))) * mean
    return w0 + stock_t(deltas, clamp) * mean


def padded(n: int, multiple: int | None) -> int:
    return n if not multiple else math.ceil(n / multiple) * multiple


def vocab_rows(anchor: torch.Tensor, anchor_vocab: dict[str, int], tensors: Sequence[torch.Tensor],
               vocabs: Sequence[dict[str, int]], out_vocab: dict[str, int],
               pad_to: int | None, filter_wise: bool = False, clamp: bool = True
               ) -> torch.Tensor:
    """The expected merged embedding (rows = tokens) in float64: rows of the anchor's tokens by
    Model Stock with t from those rows only (a fine-tune lacking a token: zero delta there);
    tokens only fine-tunes have: the mean over those that have them; padding rows: the
    anchor's own row where it has one, else its mean token embedding."""
    a = anchor.double()
    anchor_ids = sorted(anchor_vocab.values())
    w0 = a[anchor_ids]
    ws = []
    for t, v in zip(tensors, vocabs, strict=True):
        rows = w0.clone()
        for tok, i in anchor_vocab.items():
            if tok in v:
                rows[anchor_ids.index(i)] = t[v[tok]].double()
        ws.append(rows)
    merged_anchor = stock(w0, ws, filter_wise, clamp)
    n = len(out_vocab)
    out = torch.empty(padded(n, pad_to), a.shape[1], dtype=torch.float64)
    out[n:] = a[anchor_ids].mean(0)
    own = range(n, min(len(out), a.shape[0]))  # padding the anchor has: its own rows
    out[own.start:own.stop] = a[own.start:own.stop]
    for tok, j in out_vocab.items():
        if tok in anchor_vocab:
            out[j] = merged_anchor[anchor_ids.index(anchor_vocab[tok])]
        else:
            holders = [t[v[tok]].double() for t, v in zip(tensors, vocabs, strict=True)
                       if tok in v]
            out[j] = sum(holders) / len(holders)
    return out


def reference_merge(anchor_dir: Path, ft_dirs: Sequence[Path], out_vocab: dict[str, int],
                    pad_to: int | None, filter_wise: bool = False, clamp: bool = True
                    ) -> dict[str, torch.Tensor]:
    """Every tensor of the expected merge, float64, named as the anchor names them."""
    a = read_weights(anchor_dir)
    fts = [read_weights(d) for d in ft_dirs]
    av = vocab_of(anchor_dir)
    vocabs = [vocab_of(d) for d in ft_dirs]
    out = {}
    for name, w0 in a.items():
        if is_vocab_tensor(name):
            ws = [ft.get(name, ft.get("model.embed_tokens.weight")) for ft in fts]
            out[name] = vocab_rows(w0, av, ws, vocabs, out_vocab, pad_to, filter_wise, clamp)
        else:
            out[name] = stock(w0, [ft[name] for ft in fts], filter_wise, clamp)
    return out
