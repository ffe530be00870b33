"""Model Stock of LoRA adapters, exactly, in factor space: measure, merge, write a PEFT adapter.

Every adapted module is one Model Stock layer whose task vectors are the adapters' deltas
``dW_i = s_i B_i A_i`` (anchor: the base weight, ``w_i = w0 + dW_i``): the Gram matrix comes from
the factors (`factors.factor_gram`), ``t`` from it as for dense weights (`modelstock.stock`), and
the merged delta ``t/N sum_i dW_i`` is itself a LoRA of rank ``sum_i r_i`` with PEFT scaling 1
(or its best rank-R approximation). A module that only some adapters adapt is a zero delta for
the others. Dense tensors saved beside the factors (``modules_to_save``, trained biases) are
merged with Model Stock around the base model's values when a ``base`` is given; without one,
identical values are kept and differing ones averaged (with a warning), as the dense merge does
for tensors that the anchor lacks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__, stock
from ..checkpoint import Reader, open_checkpoint
from ..engine import worker_pool
from ..errors import ModelStockError
from ..output import REPORT_NAME, atomic_output, check_output_path
from ..recipe import Execution
from ..report import LayerReport, MergeReport, layer_report
from ..rules import ModelStock
from ..safetensors_io import SafetensorsWriter, TensorInfo
from ..ties import INPUT_EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING
from .adapter import (
    CONFIG_NAME,
    FACTOR_SUFFIXES,
    PREFIX,
    Factors,
    LoraAdapter,
    LoraModule,
    LoraSettings,
    read_lora_adapter,
)
from .factors import compress, factor_gram, merged_factors

GRANULARITIES = ("tensor", "row", "model")
WEIGHTS_NAME = "adapter_model.safetensors"
# Segments PEFT inserts into a wrapped module's names (LoRA's base_layer, ModulesToSaveWrapper).
WRAPPER_SEGMENTS = {"base_layer", "modules_to_save", "original_module"}
# Files of an adapter directory copied to the output: the tokenizer a Trainer saves beside it.
TOKENIZER_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|"
                             r"vocab\..*|merges\.txt|.*\.model|chat_template\..*)")
BIAS_ORDER = ("none", "lora_only", "all")

AdapterSource = str | os.PathLike | LoraAdapter
BaseSource = str | os.PathLike | dict | torch.nn.Module | None


@dataclass
class MergedModule(Factors):
    """One module of the merged adapter: PEFT factors with scaling 1 (``delta = B @ A``,
    transposed for an embedding or ``fan_in_fan_out``), the ratio ``t`` applied (a scalar, or
    one per row of the base weight), the rank before compression and, after compression, its
    relative Frobenius error."""

    name: str
    kind: str
    fan_in_fan_out: bool
    shape: tuple[int, int]
    B: torch.Tensor
    A: torch.Tensor
    t: torch.Tensor
    merged_rank: int
    rel_error: float | None = None

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense merged delta (for checks: it is ``out x in``)."""
        d = self.B.to(dtype) @ self.A.to(dtype)
        return d.T if self.transposed else d

    def keys(self) -> tuple[str, str]:
        sa, sb = FACTOR_SUFFIXES[self.kind]
        return PREFIX + self.name + sa, PREFIX + self.name + sb


@dataclass
class LoraMerge:
    """A merged adapter in memory: `state_dict` and `config` are what PEFT loads; `save` writes
    them (and the report) as an adapter directory."""

    modules: dict[str, MergedModule]
    dense: dict[str, torch.Tensor]
    config: dict
    report: MergeReport
    sources: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for m in self.modules.values():
            ka, kb = m.keys()
            out[ka], out[kb] = m.A, m.B
        out.update(self.dense)
        return out

    def delta(self, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.modules[name].delta(dtype)

    def save(self, out: str | os.PathLike, force: bool = False) -> Path:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and the report into the
        directory ``out``, built in a temporary sibling and renamed into place when complete
        (`modelstock.output.atomic_output`); an existing ``out`` is replaced only with
        ``force``, never when it is one of the inputs. Tokenizer files beside the first
        adapter are copied."""
        out = Path(out)
        if out.suffix == ".safetensors":
            raise ModelStockError("a merged adapter is a directory (adapter_config.json and "
                                  "adapter_model.safetensors); choose a directory name", out)
        check_output_path(out, self.sources, force)
        state = self.state_dict()
        start = time.perf_counter()
        with atomic_output(out, force) as tmp:
            writer = SafetensorsWriter(tmp / WEIGHTS_NAME, [(k, v.dtype, tuple(v.shape))
                                                           for k, v in state.items()],
                                       self.metadata)
            try:
                for k, v in state.items():
                    writer.write(k, v.contiguous().reshape(-1))
                writer.close()
            except BaseException:
                writer.abort()
                raise
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config, indent=2)
                                           + "\n")
            first = Path(self.sources[0]) if self.sources else None
            if first is not None and first.is_dir():
                for f in sorted(first.iterdir()):
                    if f.is_file() and TOKENIZER_FILES.fullmatch(f.name):
                        shutil.copy2(f, tmp / f.name)
            self.report.output_bytes = (tmp / WEIGHTS_NAME).stat().st_size
            if self.report.seconds is not None:
                self.report.seconds += time.perf_counter() - start
            (tmp / REPORT_NAME).write_text(self.report.to_json() + "\n")
        return out


def base_key(key: str) -> str:
    """The base model's name for a dense adapter tensor: ``base_model.model.`` and PEFT's
    wrapper segments (``base_layer``, ``modules_to_save``, ``original_module``) removed."""
    name = key.removeprefix(PREFIX)
    return ".".join(p for p in name.split(".") if p not in WRAPPER_SEGMENTS)


def _map(pool: Executor | None, fn, items) -> list:
    """``fn`` over ``items``, on the worker threads if any (torch lets go of the GIL)."""
    return list(map(fn, items) if pool is None else pool.map(fn, items))


def _load(adapters: Sequence[AdapterSource], trust_pickle: bool,
          pool: Executor | None = None) -> list[LoraAdapter]:
    if isinstance(adapters, str | os.PathLike | LoraAdapter):
        raise TypeError("adapters must be a sequence of adapter directories or LoraAdapters")
    loaded = _map(pool, lambda a: a if isinstance(a, LoraAdapter)
                  else read_lora_adapter(a, trust_pickle), list(adapters))
    if len(loaded) < 2:
        raise ModelStockError(f"Model Stock needs at least 2 adapters (the ratio comes from the "
                              f"angle between two task vectors), got {len(loaded)}")
    return loaded


def _union(keys_per_adapter: Sequence[Sequence[str]]) -> list[str]:
    return list(dict.fromkeys(k for keys in keys_per_adapter for k in keys))


@dataclass
class _Layer:
    """One layer of the merge: a LoRA module (``mods``) or a dense tensor (``values``)."""

    name: str
    shape: tuple[int, ...]
    rule: str  # model_stock, copy or average
    mods: list[LoraModule | None] | None = None
    key: str | None = None
    values: list[torch.Tensor | None] | None = None
    anchor: torch.Tensor | None = None
    out_dtype: torch.dtype | None = None
    gram: torch.Tensor | None = None  # [N, N], or [rows, N, N] for granularity row
    t: torch.Tensor | None = None
    note: str | None = None


def _natural(m: LoraModule) -> tuple[int, int]:
    return (m.B.shape[0], m.A.shape[1])


def oriented(modules: dict[str, LoraModule], base: Reader, path: str) -> dict[str, LoraModule]:
    """Each linear module with ``fan_in_fan_out`` as its base layer is, not as the config says.

    PEFT decides it by the layer's type whatever the config says: a Conv1D weight is
    ``[in, out]``, an ``nn.Linear``'s ``[out, in]`` (peft/tuners/lora/layer.py,
    dispatch_default), and a config written for a model mixing the two (GPT-2's Conv1D
    blocks and a Linear head) is right for one kind only. The base's shape tells which a module
    is, unless it is square: then a non-square module of the same name (``mlp.c_proj`` for
    ``attn.c_proj``) tells, and where the config was contradicted and nothing tells, refuse."""
    out = dict(modules)
    evidence: dict[str, bool] = {}  # leaf name -> fan_in_fan_out, from non-square modules
    contradicted = False
    for name, m in modules.items():
        key = f"{name}.weight"
        if m.kind != "linear" or key not in base.infos:
            continue
        natural, bshape = _natural(m), tuple(base.infos[key].shape)
        if natural != natural[::-1] and bshape in (natural, natural[::-1]):
            fifo = bshape != natural
            evidence.setdefault(name.rpartition(".")[2], fifo)
            contradicted |= fifo != m.fan_in_fan_out
            out[name] = dataclasses.replace(m, fan_in_fan_out=fifo)
    for name, m in modules.items():
        if m.kind != "linear" or f"{name}.weight" not in base.infos:
            continue
        natural = _natural(m)
        if natural == natural[::-1] and contradicted:
            leaf = name.rpartition(".")[2]
            if leaf not in evidence:
                raise ModelStockError(
                    f"module '{name}' is square, and fan_in_fan_out in adapter_config.json is "
                    "contradicted by the base's shapes of other modules, so neither tells "
                    "whether this one is a Conv1D or a Linear layer; set fan_in_fan_out to what "
                    "it is", path)
            out[name] = dataclasses.replace(m, fan_in_fan_out=evidence[leaf])
    return out


def _same_module_twice(names: Sequence[str], ads: Sequence[LoraAdapter]) -> None:
    """Refuse one module spelled two ways (adapters trained on different wrappers of one
    model: ``model.layers.0.q_proj`` and ``layers.0.q_proj``), which would merge as two modules,
    each a zero delta for the other adapters. Without a base only the names tell: two names,
    one ending the other, that no adapter holds together. (A base's weight names settle it.)"""
    by_suffix = set(names)
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts)):
            short = ".".join(parts[k:])
            if short in by_suffix and not any(short in a.modules and name in a.modules
                                              for a in ads):
                holder = next(a for a in ads if short in a.modules)
                other = next(a for a in ads if name in a.modules)
                raise ModelStockError(f"module '{short}' here is '{name}' in {other.path}: the "
                                      "same module named from different model classes; save "
                                      "the adapters from the same class", holder.path)


def _modules(ads: Sequence[LoraAdapter], base: Reader | None) -> list[_Layer]:
    """Check that the adapters' modules fit together (and the base, if given)."""
    layers = []
    if base is not None:
        ads = [dataclasses.replace(a, modules=oriented(a.modules, base, a.path)) for a in ads]
    names = _union([list(a.modules) for a in ads])
    if base is None:
        _same_module_twice(names, ads)
    for name in names:
        mods = [a.modules.get(name) for a in ads]
        first = next(i for i, m in enumerate(mods) if m is not None)
        ref = mods[first]
        for i, m in enumerate(mods):
            if m is None:
                continue
            if (m.kind, m.shape, m.transposed) != (ref.kind, ref.shape, ref.transposed):
                raise ModelStockError(
                    f"module '{name}' is a {m.kind} delta of shape {list(m.shape)} here but a "
                    f"{ref.kind} delta of shape {list(ref.shape)} in {ads[first].path}",
                    ads[i].path)
        if base is not None:
            info = base.infos.get(f"{name}.weight") or tied_output(base, name)
            if info is None:
                raise ModelStockError(f"the base has no weight for the adapted module '{name}': "
                                      "not these adapters' base model", base.path,
                                      f"{name}.weight")
            if tuple(info.shape) != tuple(ref.shape):
                raise ModelStockError(
                    f"module '{name}': the base weight is {list(info.shape)} but the "
                    f"adapter's delta is {list(ref.shape)}: not this adapter's base",
                    base.path)
        ranks = "+".join(str(m.rank) if m is not None else "0" for m in mods)
        layers.append(_Layer(name, ref.shape, "model_stock", mods=mods,
                             note=f"LoRA rank {ranks}"))
    return layers


def tied_output(base: Reader, name: str) -> TensorInfo | None:
    """For ``lm_head`` of a base that stores it tied (not in the file): its input embedding."""
    if f"{name}.weight" != OUTPUT_EMBEDDING:
        return None
    embeds = [v for k, v in base.infos.items() if k.endswith(INPUT_EMBEDDING_SUFFIXES)]
    return embeds[0] if len(embeds) == 1 else None


def _dense_groups(ads: Sequence[LoraAdapter], module_names: set[str]
                  ) -> list[tuple[str, list[str | None]]]:
    """The adapters' dense tensors as the merged adapter keys them: ``(key, each adapter's key
    or None)``. With ``bias="all"`` PEFT saves the bias of a module it adapts as
    ``X.base_layer.bias`` and of one it does not as ``X.bias``: adapters with different
    targets save one tensor of the base under two keys, which is one tensor to merge, under
    the key PEFT loads into the merged adapter (which adapts ``X``: ``X.bias`` would be an
    unexpected key there, silently dropped). Other keys stay as saved (``original_module``
    holds the base's value beside the trained ``modules_to_save`` copy)."""
    groups: dict[str, list[str | None]] = {}
    for i, a in enumerate(ads):
        for key in a.dense:
            owner, _, leaf = key.removeprefix(PREFIX).rpartition(".")
            out = f"{PREFIX}{owner}.base_layer.{leaf}" if owner in module_names else key
            keys = groups.setdefault(out, [None] * len(ads))
            if keys[i] is not None:
                raise ModelStockError(f"'{keys[i]}' and '{key}' are the same tensor of the "
                                      f"base model ('{base_key(key)}')", a.path)
            keys[i] = key
    return list(groups.items())


def _dense(ads: Sequence[LoraAdapter], base: Reader | None, module_names: set[str],
           warnings: list[str]) -> list[_Layer]:
    """Plan the dense tensors: copy (identical everywhere), Model Stock around the base's
    value, or average (no base value)."""
    layers = []
    for key, keys in _dense_groups(ads, module_names):
        vals = [None if k is None else a.dense[k] for a, k in zip(ads, keys, strict=True)]
        present = [i for i, v in enumerate(vals) if v is not None]
        ref = vals[present[0]]
        name = key.removeprefix(PREFIX)
        bkey = base_key(key)
        owner, _, leaf = bkey.rpartition(".")
        mixed = owner in module_names and leaf == "weight"  # e.g. an embedding saved whole
        # a bias saved by bias="all"/"lora_only" was trained: never a frozen base layer
        trained = leaf == "bias" and any(ads[i].settings.bias != "none" for i in present)
        for i in present:
            if vals[i].shape != ref.shape:
                raise ModelStockError(f"is {list(vals[i].shape)} here but {list(ref.shape)} in "
                                      f"{ads[present[0]].path}", ads[i].path, keys[i])
        anchor = None
        if base is not None and bkey in base.infos:
            info = base.infos[bkey]
            if tuple(info.shape) != tuple(ref.shape):
                raise ModelStockError(f"the base's '{bkey}' is {list(info.shape)} but the "
                                      f"adapter's is {list(ref.shape)}", base.path, key)
            anchor = base.read(bkey).view(info.shape)
        shape = tuple(ref.shape)
        same = all(vals[i].dtype == ref.dtype and torch.equal(vals[i], ref) for i in present)
        everywhere = len(present) == len(ads)
        others = [i for i in range(len(ads)) if i not in present]
        frozen = not trained and all(".base_layer." in keys[i] for i in present)
        if not ref.dtype.is_floating_point:
            layers.append(_Layer(name, shape, "copy", key=key, values=vals,
                                 note="not floating point: the first adapter's values"))
        elif same and (everywhere or (anchor is None and frozen)
                       or (anchor is not None and torch.equal(anchor.to(ref.dtype), ref))):
            # a frozen base layer PEFT saved whole (an adapted embedding), or equal values
            note = "identical in every adapter" if everywhere else \
                f"identical where saved (not by adapter(s) {others}): a frozen base layer"
            layers.append(_Layer(name, shape, "copy", key=key, values=vals, note=note))
        elif mixed:
            raise ModelStockError(f"'{owner}' is LoRA-adapted and its weight is also saved "
                                  "whole, with values that differ between the adapters: the "
                                  "two parts would get separate ratios; refusing",
                                  ads[present[-1]].path, keys[present[-1]])
        elif anchor is not None:
            if not anchor.dtype.is_floating_point:
                raise ModelStockError(f"the base's '{bkey}' is {anchor.dtype}, the adapters' "
                                      f"{ref.dtype}", base.path, key)
            layers.append(_Layer(name, shape, "model_stock", key=key, values=vals,
                                 anchor=anchor, out_dtype=anchor.dtype,
                                 note=f"dense, anchored at the base's '{bkey}'"))
        elif base is not None:
            raise ModelStockError("the adapters save this tensor whole but the base lacks it "
                                  f"('{bkey}'): not these adapters' base model", base.path, key)
        elif len(present) == len(ads):
            # As for a dense tensor the anchor lacks: no value to move from, so the mean.
            warnings.append(f"{name}: saved whole by the adapters and no base given to anchor "
                            "it: averaged (pass the base model for Model Stock)")
            layers.append(_Layer(name, shape, "average", key=key, values=vals,
                                 note="no base value: averaged"))
        else:
            missing = [i for i, v in enumerate(vals) if v is None]
            raise ModelStockError(f"saved by some adapters only (not by adapter(s) {missing}), "
                                  "and without a base there is no value for the others: pass "
                                  "the base model", ads[present[0]].path, keys[present[0]])
    return layers


def _compute_dtype(vals: Sequence[torch.Tensor | None], anchor: torch.Tensor) -> torch.dtype:
    return stock.compute_dtype_for(anchor.dtype, *(v.dtype for v in vals if v is not None))


def _dense_deltas(layer: _Layer) -> torch.Tensor:
    w0 = layer.anchor.reshape(-1)
    ws = [w0 if v is None else v.reshape(-1) for v in layer.values]
    return stock.task_vectors(w0, ws, _compute_dtype(layer.values, layer.anchor))


def _measure(layers: Sequence[_Layer], n: int, granularity: str, rule: ModelStock,
             pool: Executor | None = None) -> tuple[float | None, float | None]:
    """Gram matrices and ratios of every Model Stock layer; ``(model_cos, model_t)`` for
    ``granularity="model"``."""
    def measure(layer: _Layer) -> None:
        row = granularity == "row" and len(layer.shape) >= 2 and layer.shape[0] > 0
        if layer.mods is not None:
            layer.gram = factor_gram(layer.mods, row=row)
        else:
            numel = 1
            for d in layer.shape:
                numel *= d
            layer.gram = stock.gram(_dense_deltas(layer),
                                    row_numel=numel // layer.shape[0] if row else None)
        layer.t = rule.finalize(layer.gram, n)

    _map(pool, measure, [x for x in layers if x.rule == "model_stock"])
    if granularity != "model":
        return None, None
    grams = [x.gram for x in layers if x.rule == "model_stock"]
    if not grams:
        return None, None
    total = sum(grams, torch.zeros((n, n), dtype=torch.float64))
    t = rule.finalize(total, n)
    for layer in layers:
        if layer.rule == "model_stock":
            layer.t = t
    return float(stock.mean_pairwise_cos(total)), float(t)


def _describe(layer: _Layer, dtype: torch.dtype, n: int, rule: ModelStock, granularity: str,
              extra: str | None = None) -> LayerReport:
    notes = [x for x in (layer.note, extra) if x]
    if layer.gram is None:
        return layer_report(layer.name, layer.shape, layer.rule, dtype,
                            note="; ".join(notes) or None)
    g = layer.gram.sum(0) if layer.gram.ndim == 3 else layer.gram
    if granularity != "model":
        why = rule.note(layer.gram, n)
        if why:
            notes.append(why)
    return layer_report(layer.name, layer.shape, "model_stock", dtype,
                        norms=torch.sqrt(torch.diagonal(g).clamp_min(0)),
                        pair_cos=stock.pair_values(stock.pairwise_cos(g)), t=layer.t,
                        note="; ".join(notes) or None, who="adapter")


def _open_base(base: BaseSource, trust_pickle: bool) -> Reader | None:
    return None if base is None else open_checkpoint(base, trust_pickle)


def _check(granularity: str, rank: int | None) -> None:
    if granularity not in GRANULARITIES:
        raise ModelStockError(f"unknown granularity {granularity!r}; choose from "
                              f"{GRANULARITIES}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ModelStockError(f"rank must be a positive integer, got {rank!r}")


def _plan(ads, base, granularity, clamp, pool=None):
    warnings: list[str] = []
    names = {a.settings.base_model_name_or_path for a in ads} - {None}
    if len(names) > 1:
        warnings.append(f"the adapters name different base models: {sorted(names)}")
    layers = _modules(ads, base)
    fifo = [x.name for x in layers if any(m is not None and m.fan_in_fan_out for m in x.mods)]
    if fifo and base is None:
        # PEFT transposes Conv1D layers only; the files do not say which layers those are.
        if granularity == "row":
            raise ModelStockError(f"granularity 'row' of a fan_in_fan_out adapter needs the "
                                  f"base model, to tell Conv1D layers ([in, out]) from "
                                  f"nn.Linear ones (e.g. '{fifo[0]}'); pass base=",
                                  ads[0].path)
        warnings.append("fan_in_fan_out: without a base model every Linear LoRA module is "
                        "taken to be a Conv1D ([in, out]) in the report's shapes; t does not "
                        "depend on it")
    layers += _dense(ads, base, {x.name for x in layers}, warnings)
    rule = ModelStock(clamp)
    model_cos, model_t = _measure(layers, len(ads), granularity, rule, pool)
    return layers, warnings, rule, model_cos, model_t


def _new_report(ads, base_name, granularity, clamp, warnings, model_cos, model_t
                ) -> MergeReport:
    return MergeReport(method="model-stock", n_models=len(ads), granularity=granularity,
                       clamp=clamp, anchor=base_name, models=[a.path for a in ads],
                       warnings=warnings, model_cos=model_cos, model_t=model_t)


def _base_name(ads: Sequence[LoraAdapter], base: Reader | None) -> str | None:
    if base is not None:
        return base.path
    return next((a.settings.base_model_name_or_path for a in ads
                 if a.settings.base_model_name_or_path), None)


def inspect_lora(adapters: Sequence[AdapterSource], *, base: BaseSource = None,
                 granularity: str = "tensor", clamp: bool = True, trust_pickle: bool = False,
                 threads: int | None = None) -> MergeReport:
    """Measure without merging: every module's norms, pairwise cosines, angle and ``t``
    (the keywords are `merge_lora`'s)."""
    return _run(adapters, base, granularity, clamp, None, None, trust_pickle, threads,
                merge=False)


def merge_lora(adapters: Sequence[AdapterSource], *, base: BaseSource = None,
               granularity: str = "tensor", clamp: bool = True, rank: int | None = None,
               dtype: torch.dtype | None = None, trust_pickle: bool = False,
               threads: int | None = None) -> LoraMerge:
    """Model Stock of N >= 2 LoRA adapters of one base model, exactly, in factor space.

    ``adapters``: PEFT adapter directories or `LoraAdapter`s. ``granularity``: one ratio per
    module (``tensor``, the paper's), per row of the base weight (``row``), or one for all
    (``model``). ``clamp`` limits ``t`` to [0, 1]. ``rank``: compress every module to its best
    rank-``rank`` approximation (zero-padded where the merged rank is lower), recording the
    relative Frobenius error; by default the merge is exact, of rank ``sum_i r_i`` per module.
    ``dtype``: of the merged factors (default float32, float64 for float64 inputs). ``base``:
    the base model (a checkpoint path, state dict or module), needed only to merge dense
    tensors (``modules_to_save``, biases) with Model Stock; it also checks the modules'
    shapes and tells ``Conv1D`` from ``nn.Linear`` layers for ``fan_in_fan_out``.
    ``threads``: worker threads, one module each (default one per core, at most 4); the
    result does not depend on it.
    """
    return _run(adapters, base, granularity, clamp, rank, dtype, trust_pickle, threads,
                merge=True)


def _run(adapters, base, granularity, clamp, rank, dtype, trust_pickle, threads, merge,
         observe=None):
    """The merge (``merge``) or its measurements only; ``observe(layers, base_reader)`` is
    called with the measured plan while the base is open (`inspection` reads its norms)."""
    _check(granularity, rank)
    with worker_pool(Execution(threads=threads)) as pool:
        ads = _load(adapters, trust_pickle, pool)
        reader = _open_base(base, trust_pickle)
        try:
            start = time.perf_counter()
            layers, warnings, rule, model_cos, model_t = _plan(ads, reader, granularity,
                                                               clamp, pool)
            report = _new_report(ads, _base_name(ads, reader), granularity, clamp, warnings,
                                 model_cos, model_t)
            n = len(ads)
            fdtype = dtype or stock.compute_dtype_for(
                *(t.dtype for a in ads for m in a.modules.values() for t in (m.A, m.B)))
            if not merge:
                for layer in layers:
                    vdtype = fdtype if layer.mods is not None else \
                        next(v.dtype for v in layer.values if v is not None)
                    report.layers.append(_describe(layer, vdtype, n, rule, granularity))
                if observe is not None:
                    observe(layers, reader)
                report.seconds = time.perf_counter() - start
                return report
            merged = _map(pool, lambda x: _merge_module(x, fdtype, rank)
                          if x.mods is not None else _merge_dense(x, n), layers)
            modules: dict[str, MergedModule] = {}
            dense: dict[str, torch.Tensor] = {}
            for layer, value in zip(layers, merged, strict=True):
                if layer.mods is not None:
                    modules[layer.name] = value
                    extra = None if value.rel_error is None else \
                        f"rank-{rank} approximation: relative Frobenius error " \
                        f"{value.rel_error:.3g}"
                    report.layers.append(_describe(layer, fdtype, n, rule, granularity, extra))
                    report.layers[-1].rel_error = value.rel_error
                else:
                    dense[layer.key] = value
                    report.layers.append(_describe(layer, value.dtype, n, rule, granularity))
            config = adapter_config(ads, modules)
            report.seconds = time.perf_counter() - start
        finally:
            if reader is not None:
                reader.close()
    recipe = {"method": "model-stock", "granularity": granularity, "clamp": clamp,
              "rank": rank, "dtype": str(fdtype).removeprefix("torch."),
              "base": report.anchor, "adapters": [a.path for a in ads],
              "modelstock_version": __version__}
    return LoraMerge(modules, dense, config, report, [a.path for a in ads],
                     {"format": "pt", "modelstock": json.dumps(recipe)})


def merge_lora_adapters(adapters: Sequence[AdapterSource], out: str | os.PathLike, *,
                        force: bool = False, **kwargs) -> MergeReport:
    """`merge_lora`, then write the merged adapter directory ``out`` (`LoraMerge.save`)."""
    sources = [a.path if isinstance(a, LoraAdapter) else a for a in adapters]
    check_output_path(Path(out), sources, force)  # before the work, not only after it
    merged = merge_lora(adapters, **kwargs)
    merged.save(out, force)
    return merged.report


def _merge_module(layer: _Layer, dtype: torch.dtype, rank: int | None) -> MergedModule:
    ref = next(m for m in layer.mods if m is not None)
    b, a = merged_factors(layer.mods, layer.t, torch.float64 if rank else dtype)
    merged_rank = a.shape[0]
    err = None
    if rank is not None:
        c = compress(b, a, rank, dtype)
        b, a, err = c.B, c.A, c.rel_error
    return MergedModule(layer.name, ref.kind, ref.fan_in_fan_out, tuple(ref.shape), b, a,
                        layer.t, merged_rank, err)


def _merge_dense(layer: _Layer, n: int) -> torch.Tensor:
    present = [v for v in layer.values if v is not None]
    if layer.rule == "copy":
        return present[0].clone()
    if layer.rule == "average":
        dt = stock.compute_dtype_for(*(v.dtype for v in present))
        total = present[0].to(dt).clone()
        for v in present[1:]:
            total += v.to(dt)
        return (total / len(present)).to(present[0].dtype)
    deltas = _dense_deltas(layer)
    row = layer.t.ndim > 0
    numel = deltas.shape[1]
    out = stock.interpolate(layer.anchor.reshape(-1), deltas, layer.t, layer.out_dtype,
                            numel // layer.shape[0] if row else None)
    return out.view(layer.shape)


def _pattern(names_ranks: dict[str, int], default: int) -> dict[str, int]:
    """``rank_pattern`` for the modules whose rank is not ``default``, one exact key each:
    PEFT matches ``(.*\\.)?(key)$`` and takes the first key that does, so a bare name would
    also catch every module whose name ends with ``.name``; ``^`` + the escaped name matches
    that module alone, whatever the order of the keys."""
    return {"^" + re.escape(k): r for k, r in names_ranks.items() if r != default}


def _agreed(values: Sequence) -> object:
    vals = [v for v in values if v is not None]
    return vals[0] if vals and all(v == vals[0] for v in vals) else None


def adapter_config(ads: Sequence[LoraAdapter], modules: dict[str, MergedModule]) -> dict:
    """The merged adapter's ``adapter_config.json``: scaling exactly 1 for every module
    (``lora_alpha = r``, per module through ``rank_pattern``/``alpha_pattern`` where ranks
    differ; no rsLoRA), the modules listed by their full names."""
    ranks = {name: m.rank for name, m in modules.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    pattern = _pattern(ranks, r0)
    settings = [a.settings for a in ads]
    to_save = _union([s.modules_to_save or [] for s in settings]) or None
    bias = max((s.bias for s in settings), key=BIAS_ORDER.index)
    config = {
        "peft_type": "LORA",
        "task_type": _agreed([s.task_type for s in settings]),
        "base_model_name_or_path": _agreed([s.base_model_name_or_path for s in settings]),
        "revision": _agreed([a.config.get("revision") for a in ads]),
        "r": r0,
        "lora_alpha": r0,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": any(s.fan_in_fan_out for s in settings),
        "target_modules": list(modules),
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "modules_to_save": to_save,
        "bias": bias,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
    check = LoraSettings(r=r0, lora_alpha=r0, rank_pattern=pattern, alpha_pattern=pattern)
    for name, m in modules.items():  # what PEFT will compute from this config
        if check.rank_for(name) != m.rank or check.scaling_for(name) != 1.0:
            raise AssertionError(f"adapter_config would not give '{name}' rank {m.rank} and "
                                 "scaling 1")
    return config
