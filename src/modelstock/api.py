"""The two entry points: merge checkpoints on disk into a model directory, or merge in memory."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, hub
from .checkpoint import Reader, open_checkpoint
from .engine import DictSink, merge_readers
from .errors import ModelStockError
from .output import (
    REPORT_NAME,
    SafetensorsSink,
    atomic_output,
    check_output_path,
    copy_anchor_files,
    model_card,
)
from .recipe import Execution, MergeOptions, Recipe
from .report import MergeReport
from .ties import align_ties
from .vocab import TOKENIZER_FILES, align_vocab, copy_tokenizer_files, write_tokenizer_files

Source = str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module
DEFAULT_SHARD_BYTES = 5 * 10**9


def _options(options: Recipe | Execution | None, kwargs: dict) -> MergeOptions:
    """Options from a `MergeOptions`, a `Recipe` (run with the default `Execution`), an
    `Execution` (of the default recipe) or keywords."""
    if options is not None and kwargs:
        raise TypeError("pass either options or keyword options, not both")
    if options is None:
        return MergeOptions(**kwargs)
    if isinstance(options, MergeOptions):
        return options
    if isinstance(options, Recipe):
        return MergeOptions.of(options)
    if isinstance(options, Execution):
        return MergeOptions.of(Recipe(), options)
    raise TypeError(f"options must be a Recipe, an Execution or MergeOptions, got "
                    f"{type(options).__name__}")


@dataclass(frozen=True)
class LoraReference:
    """mergekit's ``model+lora``: a model with one LoRA adapter applied (PEFT's
    ``merge_and_unload``), both local once located."""

    model: Path
    adapter: Path

    @property
    def tokenizer(self) -> Path:
        """Where its tokenizer is: the adapter's directory if it saved one (a fine-tune that
        added tokens), else the model's. Its config is always the model's."""
        return self.adapter if any((self.adapter / f).is_file() for f in TOKENIZER_FILES[:2]) \
            else self.model


def lora_reference(source: object) -> tuple[str, str] | None:
    """``(model, adapter)`` for a ``model+adapter`` string that names nothing on disk."""
    if not isinstance(source, str) or "+" not in source or os.path.lexists(source):
        return None
    model, _, adapter = source.partition("+")
    return (model, adapter) if model and adapter else None


def _locate(sources: Sequence[Source], progress: bool = True
            ) -> tuple[list[Source], list[str | None]]:
    """Hub ids (``org/name[@revision]``, see `hub.resolve`) become local snapshot directories,
    fetched first if need be, and ``model+lora`` references a `LoraReference`; every other
    input is kept. Also returns, per input, the reference as written (``None`` for the rest):
    what the report and the model card record."""
    def place(src: str) -> Path:
        return hub.resolve(src, progress=progress) if hub.is_hub_id(src) else Path(src)

    local: list[Source] = []
    labels: list[str | None] = []
    for src in sources:
        ref = lora_reference(src)
        if ref is not None:
            local.append(LoraReference(place(ref[0]), place(ref[1])))
        elif hub.is_hub_id(src):
            local.append(place(src))  # type: ignore[arg-type]
        else:
            local.append(src)
        labels.append(src if ref is not None or hub.is_hub_id(src) else None)  # type: ignore[arg-type]
    return local, labels


def _config_of(src: Source) -> Source:
    """Where an input's config files are (a `LoraReference`'s model, or itself)."""
    return src.model if isinstance(src, LoraReference) else src


def _tokenizer_of(src: Source) -> Source:
    """Where an input's tokenizer files are (see `LoraReference.tokenizer`)."""
    return src.tokenizer if isinstance(src, LoraReference) else src


def _open(src: Source, trust_pickle: bool, strip_prefix: str | None) -> Reader:
    if not isinstance(src, LoraReference):
        return open_checkpoint(src, trust_pickle, strip_prefix)
    from .lora.into_base import apply_adapter

    base = open_checkpoint(src.model, trust_pickle, strip_prefix)
    try:
        return apply_adapter(base, src.adapter, trust_pickle)
    except BaseException:
        base.close()
        raise


def _written(src: Source, label: str | None) -> str:
    """How an input is named to the user: the Hub id or path as written."""
    if label is not None:
        return label
    return os.fspath(src) if isinstance(src, str | os.PathLike) else "<state dict>"


def _tokenizer_source(value: str, written: Sequence[str], local: Sequence[Source]) -> str:
    """``union``, ``base``, or the input ``value`` names: as written, or the same directory
    (another spelling of a path, or of a Hub id: ``org/a@main`` for ``org/a``)."""
    if value in ("union", "base") or value in written:
        return value
    where = value
    if hub.is_hub_id(value):  # the inputs are fetched already: the cache is enough
        snapshot = hub.cached_snapshot(*hub.parse_id(value))
        where = value if snapshot is None else os.fspath(snapshot)
    for w, src in zip(written, local, strict=True):
        src = _config_of(src)
        if isinstance(src, str | os.PathLike) and os.path.exists(src) \
                and os.path.exists(where) and os.path.samefile(src, where):
            return w
    raise ModelStockError(f"tokenizer source {value!r} is not one of the models; give 'union', "
                          f"'base' or a model as written: {', '.join(written)}")


def _open_all(anchor: Source, models: Sequence[Source], trust_pickle: bool,
              strip_prefix: str | None, progress: bool = True,
              labels: Sequence[str | None] | None = None, recipe: Recipe | None = None
              ) -> tuple[Reader, list[Reader], list[str]]:
    """Open every input; the fine-tunes are presented with the anchor's tied embeddings
    (`ties.align_ties`) and every input's embedding rows in the output vocabulary's order
    (`vocab.align_vocab`, by the ``recipe``'s tokenizer source); their decisions come back as
    warnings for the report.

    Hub ids are resolved first (`_locate`; ``progress``: the download bars) and their readers
    named by the id as written. A caller that resolved already passes the local sources and
    their ``labels``."""
    recipe = recipe or Recipe()
    sources = [anchor, *models]
    if labels is None:
        sources, labels = _locate(sources, progress)
    written = [_written(s, w) for s, w in zip(sources, labels, strict=True)]
    source = _tokenizer_source(recipe.tokenizer_source, written, sources)
    opened: list[Reader] = []
    try:
        for src, label in zip(sources, labels, strict=True):
            opened.append(_open(src, trust_pickle, strip_prefix))
            if label is not None:
                opened[-1].path = label
        aligned, notes = align_ties(opened[0], opened[1:], [_config_of(s) for s in sources])
        notes = [w for r in opened for w in getattr(r, "warnings", ())] + notes
        a, aligned, more = align_vocab(opened[0], aligned, [_tokenizer_of(s) for s in sources],
                                       written, source,
                                       recipe.pad_to_multiple_of, recipe.weights)
        notes += more
    except BaseException:
        for r in opened:
            r.close()
        raise
    return a, aligned, notes


def merge_state_dicts(anchor: Source, models: Sequence[Source],
                      options: Recipe | Execution | None = None, *, trust_pickle: bool = False,
                      strip_prefix: str | None = None, progress: bool = False,
                      **kwargs) -> tuple[dict[str, torch.Tensor], MergeReport]:
    """Merge in memory; returns the merged state dict and the per-layer report.

    ``anchor`` and each of ``models`` may be a state dict, an ``nn.Module``, a checkpoint path
    or a Hugging Face Hub id (``org/name`` or ``org/name@revision``; see `modelstock.hub`).
    Keyword options are those of `MergeOptions` (method, granularity, clamp, alpha, ...).
    """
    opts = _options(options, kwargs)
    a, ms, notes = _open_all(anchor, models, trust_pickle, strip_prefix, progress,
                             recipe=opts.recipe)
    try:
        sink, report = merge_readers(a, ms, opts.recipe, opts.execution,
                                     lambda plan: DictSink(plan.layers, opts.device), progress,
                                     notes)
    finally:
        for r in [a, *ms]:
            r.close()
    return sink.tensors, report


def merge_checkpoints(anchor: Source, models: Sequence[Source], out: str | os.PathLike,
                      options: Recipe | Execution | None = None, *,
                      shard_size: int | None = DEFAULT_SHARD_BYTES, force: bool = False,
                      trust_pickle: bool = False, strip_prefix: str | None = None,
                      progress: bool = False, direct_io: bool = True,
                      annotate: Callable[[MergeReport], None] | None = None,
                      **kwargs) -> MergeReport:
    """Merge checkpoints into ``out``: a directory that Hugging Face ``from_pretrained`` and
    ``safetensors.torch.load_file`` read (or one ``.safetensors`` file if ``out`` ends so).

    Inputs are as for `merge_state_dicts`; a Hub id is fetched into the Hugging Face cache
    (only what a merge needs) and recorded in the report and the model card as written.
    The directory gets the (sharded) weights, the anchor's config and tokenizer files, a model
    card and ``modelstock_report.json``. It is built in a temporary sibling and renamed into
    place when complete; an existing ``out`` is replaced only with ``force=True``.
    ``direct_io`` writes the weights around the page cache (``O_DIRECT``) where the file system
    allows: far less CPU for a large output; ``False`` writes through the page cache.
    ``annotate(report)`` may add to the report before it is written (a greedy soup records its
    selection there).
    """
    opts = _options(options, kwargs)
    out = Path(out)
    sources = [anchor, *models]
    # Before any download: an existing output is refused at once.
    check_output_path(out, [s for s in sources if not hub.is_hub_id(s)], force)
    local, labels = _locate(sources, progress)
    if any(labels):  # nor may the output be a fetched snapshot
        check_output_path(out, [p for s in local for p in (
            [s.model, s.adapter] if isinstance(s, LoraReference) else [s])], force)
    a, ms, notes = _open_all(local[0], local[1:], trust_pickle, strip_prefix, labels=labels,
                             recipe=opts.recipe)
    names = [a.path, *(m.path for m in ms)]
    recipe = {**opts.recipe.to_dict(), "anchor": names[0], "models": names[1:],
              "modelstock_version": __version__}
    metadata = {"format": "pt", "modelstock": json.dumps(recipe)}
    start = time.perf_counter()
    try:
        with atomic_output(out, force) as tmp:
            sink = None

            def make_sink(plan):
                nonlocal sink
                sink = SafetensorsSink(tmp, plan.layers, shard_size, metadata,
                                       single_file=out.suffix == ".safetensors",
                                       direct=direct_io)
                return sink

            try:
                _, report = merge_readers(a, ms, opts.recipe, opts.execution, make_sink,
                                          progress, notes)
                sink.close()
            except BaseException:
                if sink is not None:
                    sink.abort()
                raise
            report.output_bytes = sink.total_bytes
            report.seconds = time.perf_counter() - start
            if annotate is not None:
                annotate(report)
            if not sink.single_file:
                config = _config_of(local[0])
                if isinstance(config, str | os.PathLike) and Path(config).is_dir():
                    copy_anchor_files(Path(config), tmp, opts.dtype)
                files = [_tokenizer_of(s) for s in local]
                if files[0] != config:  # an adapter that saved the anchor's tokenizer
                    copy_tokenizer_files(Path(files[0]), tmp)
                written = [_written(s, w) for s, w in zip(local, labels, strict=True)]
                report.warnings += write_tokenizer_files(
                    tmp, files, written, getattr(a, "vocabulary", None),
                    _tokenizer_source(opts.tokenizer_source, written, local), opts.chat_template)
                (tmp / REPORT_NAME).write_text(report.to_json() + "\n")
                (tmp / "README.md").write_text(model_card(names[0], names[1:], recipe,
                                                          report.summary()))
    finally:
        for r in [a, *ms]:
            r.close()
    return report
