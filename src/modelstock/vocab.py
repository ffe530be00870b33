"""Embedding rows aligned by token, for fine-tunes whose vocabularies differ from the anchor's.

Chat and instruction fine-tunes add tokens (``<|im_start|>``, a pad token) and resize the
embedding, often padded to a multiple of 64 or 128; some reuse reserved ids for new tokens. Row
``k`` of their ``embed_tokens`` / ``lm_head`` is then not the anchor's row ``k``. `align_vocab`
reads every input's tokenizer, decides the output vocabulary (``union`` of all, the anchor's
``base``, or one named model's) and presents each input's embedding tensors in the output's row
order, so that the engine merges them as ordinary tensors:

- a row of a token the anchor has is the input's own row for that token, or the anchor's when the
  input lacks the token (a zero task vector there). These rows, and only these, give the
  tensor's Model Stock statistics (`MergePlan` gets them as ``stat_rows``).
- a row of a token the anchor lacks is its own row in the fine-tunes that have it; the anchor
  and the other fine-tunes show the mean of those rows. The task vectors of that row are then
  the holders' deviations from their mean, which sum to zero, so every interpolation
  ``w0 + t mean_i(d_i)`` (Model Stock, WiSE-FT, uniform) writes the holders' mean, whatever t,
  to the storage dtype's rounding; a linear merge uses the recipe's weights for that mean.
- a padding row (no token) is the anchor's row where the anchor has one, else the anchor's mean
  token row (a neutral value no tokenizer produces).

Without tokenizer files rows are aligned by index: the anchor's rows as usual, the extra rows
of larger fine-tunes averaged over those that have them, with a warning.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Reader
from .errors import ModelStockError
from .safetensors_io import TensorInfo
from .ties import INPUT_EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING

# Tensors indexed by token along their first dimension.
OUTPUT_SUFFIXES = (OUTPUT_EMBEDDING, "lm_head.bias", "embed_out.weight")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
MAX_INFERRED_PAD = 64  # padding multiples are read off the inputs' row counts up to this
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_TEMPLATES = {"chatml": CHATML}


@dataclass
class Tokenizer:
    """What a model directory's tokenizer files say: token -> id, the added tokens' entries
    (``tokenizer.json``'s ``added_tokens``, by content) and the chat template."""

    vocab: dict[str, int]
    added: dict[str, dict] = field(default_factory=dict)
    chat_template: str | None = None


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelStockError(f"unreadable tokenizer file ({e})", path) from None


def read_tokenizer(source: object) -> Tokenizer | None:
    """The tokenizer of a model directory, read from its files (``tokenizer.json``, else
    ``vocab.json`` / ``vocab.txt`` with ``added_tokens.json``; a SentencePiece-only tokenizer
    through ``transformers`` when it is installed); None when there is none to read."""
    if not isinstance(source, str | os.PathLike) or not Path(source).is_dir():
        return None
    d = Path(source)
    vocab: dict[str, int] | None = None
    added: dict[str, dict] = {}
    if (d / "tokenizer.json").is_file():
        data = _json(d / "tokenizer.json")
        model = data.get("model", {}) if isinstance(data, dict) else {}
        raw = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(raw, dict):
            vocab = {str(k): int(v) for k, v in raw.items()}
        elif isinstance(raw, list):  # Unigram: [[piece, score], ...] in id order
            vocab = {str(p[0]): i for i, p in enumerate(raw)}
        else:
            vocab = {}
        for entry in data.get("added_tokens", []) if isinstance(data, dict) else []:
            vocab[entry["content"]] = int(entry["id"])
            added[entry["content"]] = dict(entry)
    elif (d / "vocab.json").is_file():
        vocab = {str(k): int(v) for k, v in _json(d / "vocab.json").items()}
    elif (d / "vocab.txt").is_file():
        lines = (d / "vocab.txt").read_text(encoding="utf-8").split("\n")
        vocab = {tok: i for i, tok in enumerate(lines[:-1] if lines[-1] == "" else lines)}
    elif (d / "tokenizer.model").is_file():
        try:
            from transformers import AutoTokenizer
        except ImportError:
            return None
        try:
            vocab = dict(AutoTokenizer.from_pretrained(str(d)).get_vocab())
        except Exception:  # a tokenizer transformers cannot build: no vocabulary to align by
            return None
    if vocab is None:
        return None
    if (d / "added_tokens.json").is_file():
        vocab.update({str(k): int(v) for k, v in _json(d / "added_tokens.json").items()})
    return Tokenizer(vocab, added, read_chat_template(d))


def read_chat_template(d: Path) -> str | None:
    """The chat template of a model directory (``chat_template.jinja`` or the tokenizer
    config's ``chat_template``); a list of named templates gives its ``default``."""
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if not (d / "tokenizer_config.json").is_file():
        return None
    template = _json(d / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def vocab_tensors(reader: Reader) -> tuple[int, list[str]] | None:
    """``(rows, names)``: the input embedding's row count and every tensor indexed by token
    (input and output embeddings with that many rows); None without an input embedding."""
    embeds = [k for k, v in reader.infos.items() if k.endswith(INPUT_EMBEDDING_SUFFIXES)
              and len(v.shape) == 2]
    if not embeds:
        return None
    rows = reader.infos[embeds[0]].shape[0]
    names = [k for k, v in reader.infos.items()
             if (k.endswith(INPUT_EMBEDDING_SUFFIXES) or k.endswith(OUTPUT_SUFFIXES))
             and len(v.shape) >= 1 and v.shape[0] == rows]
    return rows, names


@dataclass
class Alignment:
    """Where each output row comes from. ``index[i, r]``: input ``i``'s row for output row
    ``r`` (input 0 is the anchor), -1 where it has none; ``extra``: rows of tokens the anchor
    lacks; ``tokens``: the output's token at each row (None: padding)."""

    rows: int
    index: torch.Tensor
    extra: torch.Tensor
    tokens: list[str | None]
    by: str  # "token" or "index"
    source: str
    added: list[dict] = field(default_factory=list)  # {token, id, models} for the report
    names: list[str] = field(default_factory=list)
    anchor_rows: int = 0
    entries: dict[str, dict] = field(default_factory=dict)  # added token -> its declaration

    def stat_rows(self) -> tuple[tuple[int, int], ...]:
        """Row ranges of the anchor's tokens: where the Model Stock statistics come from."""
        keep = (self.index[0] >= 0) & ~self.extra & torch.tensor(
            [t is not None for t in self.tokens] if self.by == "token" else [True] * self.rows)
        idx = torch.nonzero(keep).flatten().tolist()
        ranges: list[tuple[int, int]] = []
        for r in idx:
            if ranges and ranges[-1][1] == r:
                ranges[-1] = (ranges[-1][0], r + 1)
            else:
                ranges.append((r, r + 1))
        return tuple(ranges)

    def summary(self) -> dict:
        return {"source": self.source, "aligned_by": self.by, "rows": self.rows,
                "anchor_rows": self.anchor_rows,
                "tokens": sum(t is not None for t in self.tokens) if self.by == "token"
                else None, "added": self.added}


def _pad(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _inferred_multiple(rows: Sequence[int], sizes: Sequence[int | None]) -> int | None:
    """The padding multiple the inputs were saved with: the largest power of two up to
    `MAX_INFERRED_PAD` that pads the vocabulary of every input padded past it to exactly its
    row count (252 tokens in 256 rows: 64; Qwen2's 151646 in 151936: none)."""
    padded = [(r, n) for r, n in zip(rows, sizes, strict=True) if n is not None and r > n]
    if not padded:
        return None
    m = MAX_INFERRED_PAD
    while m > 1 and any(_pad(n, m) != r for r, n in padded):
        m //= 2
    return m if m > 1 else None


def _vocab_size(tok: Tokenizer) -> int:
    return max(tok.vocab.values(), default=-1) + 1


def plan_alignment(rows: Sequence[int], tokenizers: Sequence[Tokenizer | None],
                   labels: Sequence[str], source: str = "union",
                   pad_to_multiple_of: int | None = None) -> Alignment | None:
    """The output vocabulary and every input's row for each output row; None when nothing
    needs aligning (same rows and same vocabularies, or no tokenizers and same rows).

    ``source``: ``union``, ``base`` or the label of one input (its vocabulary, row count and
    tokenizer files). Input 0 is the anchor."""
    n = len(rows)
    have = [t is not None for t in tokenizers]
    same_vocab = all(have) and all(t.vocab == tokenizers[0].vocab for t in tokenizers[1:])
    named = None if source in ("union", "base") else labels.index(source)
    if len(set(rows)) == 1 and (same_vocab or not all(have)) and pad_to_multiple_of is None:
        return None  # nothing to align (without every tokenizer, equal rows stay as they are)
    for i, (r, t) in enumerate(zip(rows, tokenizers, strict=True)):
        if t is not None and _vocab_size(t) > r:
            bad = max(t.vocab, key=t.vocab.get)
            raise ModelStockError(f"tokenizer has token {bad!r} at id {t.vocab[bad]} but the "
                                  f"embedding has {r} rows", labels[i])
    if not all(have):
        return _by_index(rows, labels, source, named, pad_to_multiple_of)
    anchor = tokenizers[0].vocab
    if named is not None:
        out_vocab = dict(tokenizers[named].vocab)
    else:
        out_vocab = dict(anchor)
        if source == "union":
            next_id = _vocab_size(tokenizers[0])
            for t in tokenizers[1:]:
                for tok, _ in sorted(t.vocab.items(), key=lambda kv: kv[1]):
                    if tok not in out_vocab:
                        out_vocab[tok] = next_id
                        next_id += 1
    size = max(out_vocab.values(), default=-1) + 1
    multiple = pad_to_multiple_of or _inferred_multiple(rows, [_vocab_size(t)
                                                               for t in tokenizers])
    if pad_to_multiple_of is not None:
        out_rows = _pad(size, pad_to_multiple_of)
    elif named is not None:
        out_rows = max(rows[named], size)
    elif source == "base":
        out_rows = rows[0]
    else:
        out_rows = max(rows[0], _pad(size, multiple))
    tokens: list[str | None] = [None] * out_rows
    for tok, i in out_vocab.items():
        tokens[i] = tok
    # Built as lists (a vocabulary has 10^5 tokens; element-wise tensor writes cost seconds).
    index_rows = [[-1] * out_rows for _ in range(n)]
    extra_rows = [False] * out_rows
    added: list[dict] = []
    for r, tok in enumerate(tokens):
        if tok is None:  # padding: the anchor's own row where it has one
            if r < rows[0]:
                index_rows[0][r] = r
            continue
        for i, t in enumerate(tokenizers):
            index_rows[i][r] = t.vocab.get(tok, -1)
        if index_rows[0][r] < 0:
            extra_rows[r] = True
            holders = [labels[i] for i in range(1, n) if index_rows[i][r] >= 0]
            if not holders:
                raise ModelStockError(f"token {tok!r} of the output vocabulary is in no "
                                      "fine-tune's tokenizer", labels[named or 0])
            added.append({"token": tok, "id": r, "models": holders})
    index = torch.tensor(index_rows, dtype=torch.long)
    extra = torch.tensor(extra_rows, dtype=torch.bool)
    ids_differ = any(t.vocab.get(tok, i) != i for t in tokenizers for tok, i in anchor.items())
    if not added and out_rows == rows[0] and not ids_differ and all(
            r == rows[0] for r in rows) and pad_to_multiple_of is None:
        return None
    label = source if named is None else labels[named]
    return Alignment(out_rows, index, extra, tokens, "token", label, added,
                     anchor_rows=rows[0])


def _by_index(rows: Sequence[int], labels: Sequence[str], source: str, named: int | None,
              pad_to_multiple_of: int | None) -> Alignment:
    """Alignment by row index, for inputs without tokenizer files."""
    if named is not None:
        out_rows = rows[named]
    elif source == "base":
        out_rows = rows[0]
    else:
        out_rows = max(rows)
    out_rows = _pad(out_rows, pad_to_multiple_of)
    index = torch.full((len(rows), out_rows), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        k = min(r, out_rows)
        index[i, :k] = torch.arange(k)
    extra = (index[0] < 0) & (index[1:] >= 0).any(0)  # rows no input has: padding
    return Alignment(out_rows, index, extra, [None] * out_rows, "index",
                     source if named is None else labels[named], anchor_rows=rows[0])


class AlignedReader:
    """A reader whose token-indexed tensors are presented in the output vocabulary's rows."""

    def __init__(self, inner: Reader, aligner: Aligner, i: int) -> None:
        self.path, self._inner, self._aligner, self._i = inner.path, inner, aligner, i
        self.infos = dict(inner.infos)
        for name in aligner.alignment.names:
            if name not in inner.infos:
                continue  # the plan reports the missing tensor
            info = inner.infos[name]
            self.infos[name] = TensorInfo((aligner.alignment.rows, *info.shape[1:]), info.dtype)
        if i == 0:
            self.stat_rows = dict.fromkeys(aligner.alignment.names,
                                           aligner.alignment.stat_rows())
            self.vocabulary = aligner.alignment

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if name not in self._aligner.alignment.names:
            return self._inner.read(name, start, stop)
        return self._aligner.read(self._i, name, start, stop)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        if name not in self._aligner.alignment.names:
            self._inner.release(name, start, stop)
        elif stop is None:
            self._inner.release(name)

    @property
    def unaligned(self) -> Reader:
        """The input as stored (what an error about its values should name)."""
        return self._inner

    def close(self) -> None:
        self._inner.close()


class Aligner:
    """Reads rows of token-indexed tensors in the output's order, for every input."""

    def __init__(self, readers: Sequence[Reader], alignment: Alignment,
                 weights: Sequence[float] | None = None) -> None:
        self.readers, self.alignment = list(readers), alignment
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        self._fill: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name: (slot, rows)

    def _row_numel(self, name: str) -> int:
        shape = self.readers[0].infos[name].shape
        return int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1

    def _gather(self, i: int, name: str, src: torch.Tensor, h: int) -> torch.Tensor:
        """Rows ``src`` (all >= 0) of input ``i``'s tensor, read as runs of consecutive rows."""
        if src.numel() == 0:
            return torch.empty(0, h, dtype=self.readers[i].infos[name].dtype)
        cut = (torch.nonzero(src[1:] != src[:-1] + 1).flatten() + 1).tolist()
        bounds = [0, *cut, src.numel()]
        parts = [self.readers[i].read(name, int(src[a]) * h, (int(src[a]) + b - a) * h)
                 .reshape(b - a, h) for a, b in zip(bounds, bounds[1:], strict=False)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _fill_rows(self, name: str, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For every row that the anchor does not hold: ``slot[r]`` (its index into ``values``,
        -1 elsewhere) and ``values`` in float64: the holders' (weighted) mean for a token the
        anchor lacks, the anchor's mean token row for padding past the anchor's rows."""
        if name in self._fill:
            return self._fill[name]
        a = self.alignment
        need = torch.nonzero(a.index[0] < 0).flatten()
        slot = torch.full((a.rows,), -1, dtype=torch.long)
        slot[need] = torch.arange(need.numel())
        values = torch.zeros(need.numel(), h, dtype=torch.float64)
        pad = need[~a.extra[need]]
        if pad.numel():
            values[slot[pad]] = self._anchor_mean(name, h)
        for i in range(1, len(self.readers)):
            mine = need[a.index[i, need] >= 0]
            if mine.numel():
                w = 1.0 if self.weights is None else float(self.weights[i - 1])
                values[slot[mine]] += w * self._gather(i, name, a.index[i, mine], h).double()
        held = need[a.extra[need]]
        if held.numel():
            ws = torch.ones(len(self.readers) - 1, dtype=torch.float64) if self.weights is None \
                else self.weights
            total = ((a.index[1:, held] >= 0).double() * ws[:, None]).sum(0)
            values[slot[held]] /= torch.where(total == 0, 1.0, total)[:, None]
        self._fill[name] = (slot, values)
        return slot, values

    def _anchor_mean(self, name: str, h: int) -> torch.Tensor:
        """The mean of the anchor's token rows (float64), read in blocks."""
        a = self.alignment
        rows = torch.nonzero((a.index[0] >= 0) & ~a.extra).flatten()
        total = torch.zeros(h, dtype=torch.float64)
        for s in range(0, rows.numel(), 4096):
            total += self._gather(0, name, a.index[0, rows[s:s + 4096]], h).double().sum(0)
        return total / max(1, rows.numel())

    def read(self, i: int, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        a = self.alignment
        h = self._row_numel(name)
        stop = a.rows * h if stop is None else stop
        r0, r1 = start // h, -(-stop // h)
        dtype = self.readers[i].infos[name].dtype
        out = torch.empty(r1 - r0, h, dtype=dtype)
        own = a.index[i, r0:r1]
        done = own >= 0
        if done.any():
            out[done] = self._gather(i, name, own[done], h)
        if i > 0:  # a token (or padding row) this input lacks: the anchor's row
            fallback = ~done & (a.index[0, r0:r1] >= 0)
            if fallback.any():
                out[fallback] = self._gather(0, name, a.index[0, r0:r1][fallback], h).to(dtype)
                done |= fallback
        if not done.all():
            slot, values = self._fill_rows(name, h)
            out[~done] = values[slot[r0:r1][~done]].to(dtype)
        return out.view(-1)[start - r0 * h : stop - r0 * h]


def align_vocab(anchor: Reader, models: Sequence[Reader], sources: Sequence[object],
                labels: Sequence[str], source: str = "union",
                pad_to_multiple_of: int | None = None,
                weights: Sequence[float] | None = None
                ) -> tuple[Reader, list[Reader], list[str]]:
    """Present every input's token-indexed tensors in the output vocabulary's rows (see the
    module's docstring). Returns the readers (the anchor's carries ``vocabulary``, the
    `Alignment`, and ``stat_rows``) and warnings for the report."""
    readers = [anchor, *models]
    found = [vocab_tensors(r) for r in readers]
    if source not in ("union", "base") and source not in labels:
        raise ModelStockError(f"tokenizer source {source!r} is not one of the models "
                              f"(give 'union', 'base' or a model as written)")
    if any(f is None for f in found):
        return anchor, list(models), []
    rows = [f[0] for f in found]
    tokenizers = [read_tokenizer(s) for s in sources]
    alignment = plan_alignment(rows, tokenizers, labels, source, pad_to_multiple_of)
    if alignment is None:
        return anchor, list(models), []
    names = found[0][1]
    for r, f in zip(readers[1:], found[1:], strict=True):
        odd = [k for k in names if k in r.infos and k not in f[1]]
        if odd:
            raise ModelStockError(f"has {r.infos[odd[0]].shape[0]} rows where its input "
                                  f"embedding has {f[0]}", r.path, odd[0])
    alignment.names = names
    alignment.entries = {d["token"]: _entry(d["token"], tokenizers) for d in alignment.added}
    aligner = Aligner(readers, alignment, weights)
    views = [AlignedReader(r, aligner, i) for i, r in enumerate(readers)]
    notes = []
    if alignment.by == "index":
        notes.append(f"embedding rows differ ({', '.join(map(str, rows))}) and not every input "
                     f"has tokenizer files: rows aligned by index, {alignment.rows} rows out; "
                     "rows past the anchor's are averaged over the fine-tunes that have them")
    else:
        few = ", ".join(f"{d['token']!r} ({len(d['models'])} of {len(models)})"
                        for d in alignment.added[:8])
        more = ", ..." if len(alignment.added) > 8 else ""
        notes.append(f"vocabularies differ: embedding rows aligned by token ({alignment.source}"
                     f" vocabulary, {alignment.rows} rows; the anchor has {rows[0]})"
                     + (f"; {len(alignment.added)} token(s) the anchor lacks, averaged over the "
                        f"fine-tunes that have them: {few}{more}" if alignment.added else ""))
    return views[0], views[1:], notes


def choose_chat_template(value: str | None, templates: Sequence[str | None],
                         donor: str | None, union: bool = False) -> str | None:
    """The output's chat template: ``None`` keeps the donor tokenizer's (or, for a ``union``
    vocabulary, which holds the fine-tunes' added tokens, and a donor without one: the one
    template the inputs agree on); ``auto`` the most common among the inputs; a built-in name
    (``chatml``); or a Jinja template given as text."""
    present = [t for t in templates if t]
    if value is None:
        return donor if donor or not union or len(set(present)) != 1 else present[0]
    if value == "auto":
        return Counter(present).most_common(1)[0][0] if present else donor
    check_chat_template(value)
    return CHAT_TEMPLATES.get(value, value)


def check_chat_template(value: str) -> None:
    """Refuse a chat template that is not ``auto``, a built-in name or Jinja text (before any
    merging: the template is written last)."""
    if not isinstance(value, str) or not (value == "auto" or value in CHAT_TEMPLATES
                                          or "{{" in value or "{%" in value):
        raise ModelStockError(f"unknown chat template {value!r}: give 'auto', one of "
                              f"{sorted(CHAT_TEMPLATES)} or a Jinja template (its text)")


def _dirs(sources: Sequence[object]) -> list[Path | None]:
    return [Path(s) if isinstance(s, str | os.PathLike) and Path(s).is_dir() else None
            for s in sources]


def _entry(tok: str, holders: Sequence[Tokenizer | None]) -> dict:
    """The added-token entry for ``tok`` from the first holder that declares it."""
    for t in holders:
        if t is not None and tok in t.added:
            return {k: v for k, v in t.added[tok].items() if k != "id"}
    return {"content": tok, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": False}


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _add_tokens(out_dir: Path, alignment: Alignment, specials: set[str]) -> None:
    """Declare the union's extra tokens, with their output ids, in the tokenizer files copied
    from the anchor (``tokenizer.json``, ``tokenizer_config.json``, ``added_tokens.json``)."""
    entries = [{"id": d["id"], **alignment.entries[d["token"]]} for d in alignment.added]
    fast = out_dir / "tokenizer.json"
    if fast.is_file():
        data = _json(fast)
        data.setdefault("added_tokens", []).extend(entries)
        _write_json(fast, data)
    else:
        path = out_dir / "added_tokens.json"
        table = _json(path) if path.is_file() else {}
        table.update({e["content"]: e["id"] for e in entries})
        _write_json(path, table)
    extra_special = [e["content"] for e in entries if e["content"] in specials]
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = out_dir / name
        if not path.is_file():
            continue
        data = _json(path)
        if name == "tokenizer_config.json":
            decoder = data.setdefault("added_tokens_decoder", {})
            for e in entries:
                decoder[str(e["id"])] = {k: v for k, v in e.items() if k != "id"}
        if extra_special:
            listed = data.get("additional_special_tokens") or []
            have = {x if isinstance(x, str) else x.get("content") for x in listed}
            data["additional_special_tokens"] = listed + [t for t in extra_special
                                                          if t not in have]
        _write_json(path, data)


def _specials(d: Path | None) -> set[str]:
    """Tokens a model directory lists as additional special tokens."""
    found: set[str] = set()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if d is not None and (d / name).is_file():
            data = _json(d / name)
            for x in data.get("additional_special_tokens") or []:
                found.add(x if isinstance(x, str) else x.get("content"))
    return found


def copy_tokenizer_files(src: Path, out_dir: Path) -> None:
    """Replace the tokenizer files in ``out_dir`` by those of the directory ``src``."""
    for name in TOKENIZER_FILES:
        (out_dir / name).unlink(missing_ok=True)
        if (src / name).is_file():
            (out_dir / name).write_bytes((src / name).read_bytes())


def write_tokenizer_files(out_dir: Path, sources: Sequence[object], written: Sequence[str],
                          alignment: Alignment | None, source: str,
                          chat_template: str | None) -> list[str]:
    """Make the output directory's tokenizer and config match the merged embedding: the
    tokenizer source's files (the anchor's, already copied, plus the union's extra tokens; or
    the named model's), ``vocab_size`` set to the output's rows, the chosen chat template.
    Returns notes for the report."""
    dirs = _dirs(sources)
    donor = written.index(source) if source in written else 0
    notes: list[str] = []
    if donor and dirs[donor] is not None:
        copy_tokenizer_files(dirs[donor], out_dir)
    if alignment is not None and alignment.by == "token" and alignment.added and not donor:
        specials = set().union(*(_specials(d) for d in dirs[1:]))
        _add_tokens(out_dir, alignment, specials)
    config = out_dir / "config.json"
    if alignment is not None and config.is_file():
        data = _json(config)
        text = data.get("text_config")
        target = text if isinstance(text, dict) and "vocab_size" in text else data
        if target.get("vocab_size") != alignment.rows:
            target["vocab_size"] = alignment.rows
            _write_json(config, data)
    templates = [read_chat_template(d) if d is not None else None for d in dirs]
    own = read_chat_template(out_dir)
    chosen = choose_chat_template(chat_template, templates, own, source == "union")
    if chosen != own and chosen is not None:
        if (out_dir / "chat_template.jinja").is_file():
            (out_dir / "chat_template.jinja").write_text(chosen, encoding="utf-8")
        elif (out_dir / "tokenizer_config.json").is_file():
            data = _json(out_dir / "tokenizer_config.json")
            data["chat_template"] = chosen
            _write_json(out_dir / "tokenizer_config.json", data)
        else:
            notes.append("no tokenizer_config.json in the output: the chat template was not "
                         "written")
        if chat_template is None:
            notes.append("chat template taken from the fine-tunes (the tokenizer source has "
                         "none)")
    return notes
