"""Rows of the results table: every model (fine-tune, soup, WiSE-FT, Model Stock) evaluated once.

Merges go through the library (`modelstock.merge_state_dicts`); this module only decides which
models to merge and caches each evaluation on disk (JSON per model, keyed by the evaluation
sets), so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from modelstock import merge_state_dicts
from modelstock.stock import gram, task_vectors

StateDict = dict[str, torch.Tensor]


class Evaluator:
    """Evaluate state dicts on an `EvalSuite`, with a JSON cache per model name."""

    def __init__(self, suite, model: torch.nn.Module, cache_dir: Path | None,
                 fixed: tuple[str, ...] = ()) -> None:
        self.suite, self.model, self.fixed = suite, model, set(fixed)
        self.cache_dir = None if cache_dir is None else Path(cache_dir) / suite.key
        self.seconds = 0.0
        self.count = 0
        self._memory: dict[str, dict] = {}

    def _path(self, name: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / (name.replace("/", "__") + ".json")

    def _load(self, name: str) -> dict | None:
        path = self._path(name)
        if path is not None and path.exists():
            return json.loads(path.read_text())
        return self._memory.get(name)

    def cached(self, name: str) -> dict | None:
        """The row of an evaluated model (without predictions), or None."""
        hit = self._load(name)
        return None if hit is None else {k: v for k, v in hit.items() if k != "preds"}

    def preds(self, name: str) -> dict[str, np.ndarray]:
        """Predicted labels per evaluation set of an evaluated model."""
        return {k: np.asarray(v) for k, v in self._load(name)["preds"].items()}

    def __call__(self, name: str, state: StateDict | Callable[[], StateDict],
                 **info) -> dict:
        """Metrics of the model ``state`` (or of ``state()``, computed only on a cache miss)."""
        hit = self.cached(name)
        if hit is not None:
            return hit
        start = time.perf_counter()
        sd = state() if callable(state) else state
        load_into(self.model, sd, self.fixed)
        preds = self.suite.predict(self.model)
        row = {"name": name, **info, **self.suite.metrics(preds)}
        row["eval_seconds"] = round(time.perf_counter() - start, 1)
        self.seconds += row["eval_seconds"]
        self.count += 1
        full = row | {"preds": {k: v.tolist() for k, v in preds.items()}}
        path = self._path(name)
        if path is None:
            self._memory[name] = full
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(full) + "\n")
            os.replace(tmp, path)
        return row


def load_into(model: torch.nn.Module, state: StateDict, fixed=frozenset()) -> None:
    """Load ``state``; only the ``fixed`` tensors (never trained, kept from the anchor) may be
    absent."""
    res = model.load_state_dict(state, strict=False)
    missing = set(res.missing_keys) - set(fixed)
    if missing or res.unexpected_keys:
        raise KeyError(f"state dict mismatch: missing {sorted(missing)[:3]}, "
                       f"unexpected {res.unexpected_keys[:3]}")


def merge(anchor: StateDict, models: Sequence[StateDict], method: str,
          alpha: float | None = None):
    """The library's in-memory merge; returns (state dict, MergeReport). Uses as many threads
    as torch does (one in the study: the box is shared)."""
    kw = {"alpha": alpha} if alpha is not None else {}
    return merge_state_dicts(anchor, list(models), method=method,
                             threads=torch.get_num_threads(), **kw)


def merged(anchor: StateDict, models: Sequence[StateDict], method: str,
           alpha: float | None = None) -> Callable[[], StateDict]:
    """A lazy merge, for `Evaluator` (computed only when the row is not cached)."""
    return lambda: merge(anchor, models, method, alpha)[0]


def squared_distance(a: StateDict, b: StateDict) -> float:
    """``|a - b|^2`` over all floating tensors, with the library's task-vector/Gram functions."""
    total = 0.0
    for k, v in a.items():
        if v.is_floating_point():
            d = task_vectors(b[k].reshape(-1), [v.reshape(-1)])
            total += float(gram(d)[0, 0])
    return total


def distance(a: StateDict, b: StateDict) -> float:
    return math.sqrt(squared_distance(a, b))


def subsets(k: int, n: int, limit: int | None = None, seed: int = 0) -> list[tuple[int, ...]]:
    """All n-subsets of range(k), or ``limit`` of them drawn without replacement."""
    every = list(itertools.combinations(range(k), n))
    if limit is None or limit >= len(every):
        return every
    rng = np.random.default_rng(seed)
    return [every[i] for i in sorted(rng.choice(len(every), size=limit, replace=False))]


def summarize(rows: Sequence[Mapping], name: str, keys: Sequence[str] | None = None) -> dict:
    """Mean and std (over rows) of each metric: one table row for a family of models."""
    keys = keys or [k for k, v in rows[0].items() if isinstance(v, float) and k != "eval_seconds"]
    out: dict = {"name": name, "count": len(rows)}
    for k in keys:
        vals = np.array([r[k] for r in rows], dtype=float)
        out[k] = float(vals.mean())
        out[k + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out[k + "_min"], out[k + "_max"] = float(vals.min()), float(vals.max())
    return out
