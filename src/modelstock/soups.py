"""Greedy soup (Wortsman et al., "Model soups", ICML 2022), on the merge engine.

Rank the fine-tunes by their own held-out score, start the soup with the best one, then try the
others in that order, keeping each only if the soup's score does not drop. Every soup is the plain
mean of the kept models, made by the engine (``method="linear"`` with equal weights: no anchor
arithmetic, so a one-model soup is the model itself, and faster than ``uniform``, which also
computes each layer's angles; see benchmarks/bench_greedy.py), so the state dict that was scored
is, bit for bit, the one returned or written. The anchor only gives the layout (and the config
files on disk).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .api import DEFAULT_SHARD_BYTES, Source, _open_all, merge_checkpoints, merge_state_dicts
from .engine import MergeOptions
from .errors import ModelStockError
from .report import MergeReport

Score = Callable[[dict[str, torch.Tensor]], float]


@dataclass
class _Selection:
    """The outcome of a greedy selection: indices kept, the report's record, the last soup."""

    kept: list[int]
    record: dict
    soup: dict[str, torch.Tensor] | None = None
    report: MergeReport | None = None


def _name(src: Source, i: int) -> str:
    return os.fspath(src) if isinstance(src, str | os.PathLike) else f"models[{i}]"


def _options(kwargs: dict) -> MergeOptions:
    if {"method", "options", "weights", "normalize"} & kwargs.keys():
        raise TypeError("a greedy soup is always the plain mean of the kept models; pass "
                        "MergeOptions fields such as dtype or device as keywords")
    return MergeOptions(method="linear", weights=(1.0,), **kwargs)


def _mean_of(opts: MergeOptions, k: int) -> MergeOptions:
    return dataclasses.replace(opts, weights=(1.0,) * k)


def _evaluate(score: Score, soup: dict[str, torch.Tensor], what: str) -> float:
    value = score(soup)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ModelStockError(f"score returned {type(value).__name__}, not a number, "
                              f"for {what}") from None
    if not math.isfinite(value):
        raise ModelStockError(f"score returned {value} for {what}")
    return value


def _check_one_vocabulary(anchor: Source, models: Sequence[Source], opts: MergeOptions,
                          open_kw: dict) -> None:
    """Refuse a selection whose candidates would each have their own vocabulary (a union, or a
    model some candidates lack): the score function would see other rows and ids each time."""
    a, ms, _ = _open_all(anchor, models, open_kw["trust_pickle"], open_kw["strip_prefix"],
                         progress=False, recipe=opts.recipe)
    try:
        if getattr(a, "vocabulary", None) is not None:
            raise ModelStockError("the models' vocabularies differ, so each candidate soup would "
                                  "have its own; pass tokenizer_source='base' "
                                  "(--tokenizer-source base) to score them all in the anchor's")
    finally:
        for r in [a, *ms]:
            r.close()


def _select(anchor: Source, models: Sequence[Source], score: Score, opts: MergeOptions,
            keep_soup: bool, open_kw: dict) -> _Selection:
    """Run the greedy selection; every candidate soup is built by the engine."""
    if not models:
        raise ModelStockError("greedy soup needs at least one fine-tuned model")
    names = [_name(m, i) for i, m in enumerate(models)]
    if opts.tokenizer_source != "base":
        _check_one_vocabulary(anchor, models, opts, open_kw)

    def soup_of(idx: list[int]) -> tuple[dict[str, torch.Tensor], MergeReport]:
        return merge_state_dicts(anchor, [models[i] for i in idx], _mean_of(opts, len(idx)),
                                 **open_kw)

    # Individual scores are those of the one-model soups: the models themselves (x * 1 / 1).
    individual: list[float] = []
    soup, report = None, None
    for i in range(len(models)):
        sd, rep = soup_of([i])
        individual.append(_evaluate(score, sd, names[i]))
        if report is None or individual[i] > max(individual[:-1]):
            soup, report = (sd if keep_soup else None), rep  # the best single soup so far
        del sd
    order = sorted(range(len(models)), key=lambda i: -individual[i])  # stable on ties
    best = order[0]
    kept, current = [best], individual[best]
    steps = [{"model": names[best], "score": current, "kept": True}]
    for i in order[1:]:
        candidate, cand_report = soup_of([*kept, i])
        value = _evaluate(score, candidate, f"the soup of {[names[k] for k in [*kept, i]]}")
        keep = value >= current
        steps.append({"model": names[i], "score": value, "kept": keep})
        if keep:
            kept.append(i)
            current = value
            soup, report = (candidate if keep_soup else None), cand_report
        del candidate
    record = {
        "individual": [{"model": n, "score": s} for n, s in zip(names, individual, strict=True)],
        "order": [names[i] for i in order],
        "steps": steps,
        "kept": [names[i] for i in kept],
        "score": current,
    }
    return _Selection(kept, record, soup, report)


def _annotate(report: MergeReport, record: dict) -> None:
    report.method = "greedy"
    report.greedy = record


def greedy_soup(anchor: Source, models: Sequence[Source], score: Score, *,
                trust_pickle: bool = False, strip_prefix: str | None = None,
                **kwargs) -> tuple[dict[str, torch.Tensor], MergeReport]:
    """Greedy soup of ``models`` in memory: returns the mean of the kept models and its report.

    ``score(state_dict) -> float`` is the held-out score to maximise (higher is better); it must
    not modify the state dict. The report's ``greedy`` entry records each model's own score, the
    order tried, the soup's score after each try and which models were kept. Keyword options are
    `MergeOptions` fields (``dtype``, ``device``, ``keep_anchor``, ...).
    """
    opts = _options(kwargs)
    sel = _select(anchor, models, score, opts, True,
                  {"trust_pickle": trust_pickle, "strip_prefix": strip_prefix})
    _annotate(sel.report, sel.record)
    return sel.soup, sel.report


def greedy_soup_checkpoints(anchor: Source, models: Sequence[Source], out: str | os.PathLike,
                            score: Score, *, force: bool = False, trust_pickle: bool = False,
                            strip_prefix: str | None = None, progress: bool = False,
                            shard_size: int | None = DEFAULT_SHARD_BYTES,
                            direct_io: bool = True, **kwargs) -> MergeReport:
    """Greedy soup written to ``out`` like `merge_checkpoints` (weights, anchor files, card,
    report with the ``greedy`` record). The selection runs in memory, one soup at a time."""
    opts = _options(kwargs)
    open_kw = {"trust_pickle": trust_pickle, "strip_prefix": strip_prefix}
    sel = _select(anchor, models, score, opts, False, open_kw)
    return merge_checkpoints(anchor, [models[i] for i in sel.kept], out,
                             _mean_of(opts, len(sel.kept)), force=force,
                             shard_size=shard_size, progress=progress, direct_io=direct_io,
                             annotate=lambda r: _annotate(r, sel.record), **open_kw)


def load_score(spec: str) -> Score:
    """Import ``module:function`` (or ``path/to/file.py:function``) and return the callable."""
    import importlib
    import importlib.util
    import sys

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ModelStockError(f"--score {spec!r}: expected module:function")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ModelStockError("no such file", module_name)
            mod_id = f"_modelstock_score_{abs(hash(os.path.abspath(module_name)))}"
            spec_obj = importlib.util.spec_from_file_location(mod_id, module_name)
            module = importlib.util.module_from_spec(spec_obj)
            spec_obj.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the cwd import
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelStockError(f"--score {spec!r}: cannot import {module_name!r} ({e})") from None
    fn: object = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ModelStockError(f"--score {spec!r}: {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ModelStockError(f"--score {spec!r}: {attr!r} is not callable")
    return fn


__all__ = ["Score", "greedy_soup", "greedy_soup_checkpoints", "load_score"]
