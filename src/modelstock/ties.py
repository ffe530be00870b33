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


def _stores_both_as_one(reader: Reader, embed: str) -> bool:
    """Whether ``reader`` holds both names on one storage (a state dict of a tied model)."""
    shares = getattr(reader, "shares_storage", None)
    return shares is not None and shares(OUTPUT_EMBEDDING, embed)


def align_ties(anchor: Reader, models: Sequence[Reader], sources: Sequence[object]
               ) -> tuple[list[Reader], list[str]]:
    """Present every fine-tune with the anchor's choice of tied or untied embeddings.

    An input is tied when it holds ``lm_head.weight`` and its input embedding on one storage,
    or when it lacks ``lm_head.weight`` and its config says ``tie_word_embeddings`` (or, with no
    config to ask, when every input that holds both names holds them equal). With a tied anchor
    the output is tied: a fine-tune's own ``lm_head.weight`` is read as its input embedding, and
    one that differs from it is named in a warning, since its values are not merged; the output
    stores the tensor as the anchor does (once, or under both names). With an untied anchor, a
    tied fine-tune's ``lm_head.weight`` is its input embedding. Returns the fine-tunes' readers
    and what was decided, for the merge report's warnings.
    """
    readers = [anchor, *models]
    holders = [r for r in readers if OUTPUT_EMBEDDING in r.infos]
    if not holders:
        return list(models), []
    shape = holders[0].infos[OUTPUT_EMBEDDING].shape
    embed = input_embedding(holders[0], shape)
    if embed is None or any(embed not in r.infos for r in readers):
        return list(models), []
    evidence: list[bool] = []  # computed once, if an input without config needs it

    def tied(r: Reader, src: object) -> bool:
        if OUTPUT_EMBEDDING in r.infos:
            return _stores_both_as_one(r, embed)
        config = config_ties(src)
        if config is not None:
            return config
        if not evidence:
            evidence.append(all(same_values(h, OUTPUT_EMBEDDING, embed) for h in holders))
        return evidence[0]

    flags = [tied(r, src) for r, src in zip(readers, sources, strict=True)]
    anchor_holds = OUTPUT_EMBEDDING in anchor.infos
    if not flags[0] and (not anchor_holds or not any(flags[1:])):
        return list(models), []  # nothing tied to align (a headless anchor keeps the old rules)
    warnings: list[str] = []
    out: list[Reader] = []
    if flags[0]:
        untied = []
        for m in models:
            if OUTPUT_EMBEDDING in m.infos and not _stores_both_as_one(m, embed):
                if not same_values(m, OUTPUT_EMBEDDING, embed):
                    untied.append(m.path)
            if anchor_holds:  # both names out, as the anchor stores them: equal values
                m = TiedView(m, alias=(OUTPUT_EMBEDDING, embed))
            elif OUTPUT_EMBEDDING in m.infos:
                m = TiedView(m, hide=OUTPUT_EMBEDDING)
            out.append(m)
        warnings.append(f"{OUTPUT_EMBEDDING} is tied to {embed} in the anchor: merged as one "
                        "tensor, " + ("both names written, equal" if anchor_holds
                                      else "written tied"))
        if untied:
            warnings.append(f"{OUTPUT_EMBEDDING} differs from {embed} in {', '.join(untied)} "
                            f"(untied there); the output follows the anchor and stays tied, so "
                            f"those {OUTPUT_EMBEDDING} values are not used")
    else:
        aliased = []
        for m, t in zip(models, flags[1:], strict=True):
            if t and OUTPUT_EMBEDDING not in m.infos:
                aliased.append(m.path)
                m = TiedView(m, alias=(OUTPUT_EMBEDDING, embed))
            out.append(m)
        if aliased:
            warnings.append(f"{OUTPUT_EMBEDDING} is tied to {embed} in {', '.join(aliased)}; "
                            "the anchor stores both, untied, so the output does too")
    return out, warnings
