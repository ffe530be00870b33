"""Tied input and output embeddings (``tie_word_embeddings``) across the inputs of one merge.

Hugging Face saves a tied model without its output embedding (``lm_head.weight``): the file holds
the input embedding once and ``config.json`` says the two are tied. A ``.pt`` state dict or a
module holds both names on one storage. Fine-tunes saved either way must merge the tensor once,
and the output must store it the way the anchor does: tied (one name) when the anchor is tied,
both names when the anchor is untied. `align_ties` makes every input present the anchor's names
before planning, so the engine never sees a tie.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .checkpoint import Reader

OUTPUT_EMBEDDING = "lm_head.weight"
# Input embeddings an output embedding is tied to, by the names transformers' models use.
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
                            "embed_in.weight", "tok_embeddings.weight")
COMPARE_NUMEL = 1 << 22


class TiedView:
    """A reader with an output embedding hidden (the anchor stores it tied) or supplied from the
    input embedding (this input stores it tied, the anchor does not)."""

    def __init__(self, inner: Reader, hide: str | None = None,
                 alias: tuple[str, str] | None = None) -> None:
        self.path, self._inner, self._alias = inner.path, inner, dict([alias] if alias else [])
        self.infos = {k: v for k, v in inner.infos.items() if k != hide}
        if alias:
            self.infos[alias[0]] = inner.infos[alias[1]]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._inner.read(self._alias.get(name, name), start, stop)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        self._inner.release(self._alias.get(name, name), start, stop)

    def close(self) -> None:
        self._inner.close()


def config_ties(source: object) -> bool | None:
    """``tie_word_embeddings`` from a model directory's ``config.json`` (transformers' default,
    True, when the key is absent); None when the source has no config to ask."""
    if not isinstance(source, str | os.PathLike) or not Path(source).is_dir():
        return None
    try:
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config")
    tie = config.get("tie_word_embeddings",
                     text.get("tie_word_embeddings") if isinstance(text, dict) else None)
    return True if tie is None else bool(tie)


def input_embedding(reader: Reader, shape: tuple[int, ...]) -> str | None:
    """The one input embedding of ``reader`` shaped like the output embedding, if exactly one."""
    found = [k for k, v in reader.infos.items()
             if k.endswith(INPUT_EMBEDDING_SUFFIXES) and tuple(v.shape) == tuple(shape)]
    return found[0] if len(found) == 1 else None


def same_values(reader: Reader, a: str, b: str) -> bool:
    """Whether two tensors of ``reader`` hold the same values (read in chunks)."""
    n = reader.infos[a].numel
    for s in range(0, n, COMPARE_NUMEL):
        e = min(n, s + COMPARE_NUMEL)
        if not torch.equal(reader.read(a, s, e), reader.read(b, s, e)):
            return False
    return True


def align_ties(anchor: Reader, models: Sequence[Reader], sources: Sequence[object]
               ) -> tuple[list[Reader], list[str]]:
    """Present every fine-tune with the anchor's choice of tied or untied embeddings.

    An input without ``lm_head.weight`` whose config does not say ``tie_word_embeddings:
    false`` stores it tied to its input embedding. With a tied anchor, fine-tunes' own
    ``lm_head.weight`` is set aside (the output stays tied); one that differs from the
    fine-tune's input embedding is named in a warning, since its values are not merged. With
    an untied anchor, a tied fine-tune's ``lm_head.weight`` is its input embedding. Returns
    the fine-tunes' readers and what was decided, for the merge report's warnings.
    """
    readers = [anchor, *models]
    holders = [r for r in readers if OUTPUT_EMBEDDING in r.infos]
    if not holders or len(holders) == len(readers):
        return list(models), []
    shape = holders[0].infos[OUTPUT_EMBEDDING].shape
    embed = input_embedding(holders[0], shape)
    if embed is None:
        return list(models), []
    tied = [OUTPUT_EMBEDDING not in r.infos and embed in r.infos
            and config_ties(src) is not False for r, src in zip(readers, sources, strict=True)]
    if not any(tied):
        return list(models), []
    warnings: list[str] = []
    out: list[Reader] = []
    if tied[0]:
        untied = []
        for m in models:
            if OUTPUT_EMBEDDING in m.infos:
                if not same_values(m, OUTPUT_EMBEDDING, embed):
                    untied.append(m.path)
                m = TiedView(m, hide=OUTPUT_EMBEDDING)
            out.append(m)
        warnings.append(f"{OUTPUT_EMBEDDING} is tied to {embed} in the anchor: merged once, "
                        "written tied")
        if untied:
            warnings.append(f"{OUTPUT_EMBEDDING} differs from {embed} in {', '.join(untied)} "
                            f"(untied there); the output follows the anchor and stays tied, so "
                            f"those {OUTPUT_EMBEDDING} values are not used")
    else:
        aliased = []
        for m, t in zip(models, tied[1:], strict=True):
            if t:
                aliased.append(m.path)
                m = TiedView(m, alias=(OUTPUT_EMBEDDING, embed))
            out.append(m)
        warnings.append(f"{OUTPUT_EMBEDDING} is tied to {embed} in {', '.join(aliased)}; the "
                        "anchor stores both, so the output does too (untied, like the anchor)")
    return out, warnings
