"""The merge engine: decide a rule per tensor, stream chunks through the math, hand results on.

One engine serves every front end: readers in (files or in-memory state dicts), a sink out (a
streaming safetensors writer or a dict of tensors). Peak memory is bounded by ``chunk_numel``:
a tensor that fits is read once (Gram and output from the same task vectors); a larger one is
read twice, chunk by chunk (a Gram pass, then an output pass).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from . import stock
from .checkpoint import Reader
from .errors import ModelStockError
from .report import LayerReport, MergeReport

METHODS = ("model-stock", "uniform", "wise-ft", "linear")
GRANULARITIES = ("tensor", "row", "model")
BATCHNORM_STATS = ("running_mean", "running_var")
DEFAULT_CHUNK_NUMEL = 1 << 24  # 64 MiB of float32 per input per chunk
PIECE_NUMEL = 1 << 21  # unit of work handed to a worker thread
OUT_BYTES = 16 << 20  # output is handed to the sink in pieces of at most this size ...
OUT_RING = 6  # ... from this many reused buffers: a sink may hold SINK_HOLDS of them, and the
SINK_HOLDS = 3  # rest are pieces still being computed
TOTAL_SLOTS = 3  # sum_i d_i kept for: the layer being written, the next, the one after


@dataclass(frozen=True)
class MergeOptions:
    """How to merge. ``method``: ``model-stock`` (the paper), ``uniform`` (a uniform soup: plain
    mean of the fine-tunes), ``wise-ft`` (``w0 + alpha (mean(w_i) - w0)``) or ``linear``
    (``sum_i weights[i] w_i``, divided by ``sum(weights)`` if ``normalize``: mergekit's linear; the
    anchor only gives the layout). ``average`` and ``keep_anchor`` are glob patterns over tensor
    names that force those rules. ``compute_dtype=torch.float64`` runs the arithmetic in float64
    even for lower-precision inputs (it is never below float32)."""

    method: str = "model-stock"
    granularity: str = "tensor"
    clamp: bool = True
    alpha: float | None = None
    weights: tuple[float, ...] | None = None
    normalize: bool = True
    average: tuple[str, ...] = ()
    keep_anchor: tuple[str, ...] = ()
    dtype: torch.dtype | None = None
    compute_dtype: torch.dtype | None = None
    chunk_numel: int = DEFAULT_CHUNK_NUMEL
    allow_nonfinite: bool = False
    device: str = "cpu"
    threads: int | None = None  # worker threads on CPU (default: up to 4, one per core)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ModelStockError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.granularity not in GRANULARITIES:
            raise ModelStockError(f"unknown granularity {self.granularity!r}; "
                                  f"choose from {GRANULARITIES}")
        if (self.method == "wise-ft") != (self.alpha is not None):
            raise ModelStockError("alpha is required by, and only used by, method wise-ft")
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise ModelStockError(f"alpha must be a finite number, got {self.alpha}")
        if (self.method == "linear") != (self.weights is not None):
            raise ModelStockError("weights are required by, and only used by, method linear")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if not all(math.isfinite(w) for w in self.weights):
                raise ModelStockError(f"weights must be finite numbers, got {list(self.weights)}")
            if self.normalize and sum(self.weights) == 0:
                raise ModelStockError("weights sum to 0: cannot normalize (set normalize=False)")
        if self.compute_dtype not in (None, torch.float32, torch.float64):
            raise ModelStockError(f"compute dtype must be float32 or float64, "
                                  f"got {self.compute_dtype}")
        if self.chunk_numel < 1:
            raise ModelStockError("chunk_numel must be positive")
        if self.dtype is not None and not self.dtype.is_floating_point:
            raise ModelStockError(f"--dtype must be a floating dtype, got {self.dtype}")


@dataclass
class LayerPlan:
    """What happens to one output tensor."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    rule: str
    anchored: bool = False  # merged towards the anchor by the method's ratio t
    from_anchor: bool = False  # a copy taken from the anchor rather than the fine-tunes
    note: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class MergePlan:
    layers: list[LayerPlan]
    warnings: list[str] = field(default_factory=list)


def _matches(name: str, patterns: Sequence[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def plan_merge(anchor: Reader, models: Sequence[Reader], opts: MergeOptions) -> MergePlan:
    """Check that the checkpoints fit together and choose a rule for every tensor."""
    minimum = 2 if opts.method == "model-stock" else 1
    if len(models) < minimum:
        raise ModelStockError(f"{opts.method} needs at least {minimum} fine-tuned models, "
                              f"got {len(models)}")
    if opts.weights is not None and len(opts.weights) != len(models):
        raise ModelStockError(f"{len(opts.weights)} weights for {len(models)} models")
    buffers_from_anchor = []
    for m in models:
        missing = [k for k in anchor.infos if k not in m.infos]
        # An integer buffer only the anchor has (e.g. position_ids, which some versions of
        # transformers do not save) is carried over from the anchor; a weight is an error.
        buffers = [k for k in missing if not anchor.infos[k].dtype.is_floating_point]
        buffers_from_anchor += [k for k in buffers if k not in buffers_from_anchor]
        missing = [k for k in missing if k not in buffers]
        if missing:
            few = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ModelStockError(f"missing {len(missing)} tensor(s) that the anchor "
                                  f"{anchor.path} has: {few}", m.path)
    names = list(anchor.infos)
    extra = [k for k in models[0].infos if k not in anchor.infos]
    names += extra
    for m in models[1:]:
        for k in m.infos:
            if k not in anchor.infos and k not in models[0].infos:
                raise ModelStockError(f"tensor is not in the anchor nor in {models[0].path}",
                                      m.path, k)
        for k in extra:
            if k not in m.infos:
                raise ModelStockError(f"tensor is in {models[0].path} but not here (and not "
                                      "in the anchor)", m.path, k)
    plan = MergePlan([])
    if extra:
        few = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
        plan.warnings.append(f"{len(extra)} tensor(s) are not in the anchor and were averaged "
                             f"(no anchor to merge towards): {few}")
    if buffers_from_anchor:
        plan.warnings.append(f"{len(buffers_from_anchor)} integer buffer(s) missing from some "
                             f"fine-tunes were taken from the anchor: "
                             f"{', '.join(buffers_from_anchor[:5])}")
    for name in names:
        if name in buffers_from_anchor:
            info = anchor.infos[name]
            plan.layers.append(LayerPlan(name, info.shape, info.dtype, "copy",
                                         from_anchor=True, note="missing from a fine-tune; "
                                         "taken from the anchor"))
        else:
            plan.layers.append(_plan_layer(name, anchor, models, opts))
    return plan


def _plan_layer(name: str, anchor: Reader, models: Sequence[Reader],
                opts: MergeOptions) -> LayerPlan:
    ref = anchor.infos.get(name) or models[0].infos[name]
    for m in models:
        info = m.infos[name]
        if info.shape != ref.shape:
            raise ModelStockError(f"shape {list(info.shape)} does not match "
                                  f"{list(ref.shape)} in {anchor.path}", m.path, name)
        if info.dtype.is_floating_point != ref.dtype.is_floating_point:
            raise ModelStockError(f"dtype {info.dtype} does not match {ref.dtype} "
                                  f"in {anchor.path}", m.path, name)
    floating = ref.dtype.is_floating_point
    out_dtype = opts.dtype if (opts.dtype is not None and floating) else ref.dtype
    in_anchor = name in anchor.infos
    plan = LayerPlan(name, ref.shape, out_dtype, "")
    keep, avg = _matches(name, opts.keep_anchor), _matches(name, opts.average)
    if keep and avg:
        raise ModelStockError(f"matches both --keep-anchor {keep!r} and --average {avg!r}",
                              tensor=name)
    if keep:
        if not in_anchor:
            raise ModelStockError(f"--keep-anchor {keep!r} matches a tensor the anchor lacks",
                                  anchor.path, name)
        plan.rule, plan.note = "anchor", f"--keep-anchor {keep}"
    elif not floating:
        plan.rule, plan.note = "copy", f"{ref.dtype} tensor"
    elif avg:
        plan.rule, plan.note = "average", f"--average {avg}"
    elif not in_anchor:
        plan.rule, plan.note = "average", "not in the anchor"
    elif name.rsplit(".", 1)[-1] in BATCHNORM_STATS:
        plan.rule, plan.note = "average", "BatchNorm running statistic"
    elif opts.method == "linear":
        plan.rule = "linear"
    else:
        plan.rule = {"model-stock": "model_stock", "uniform": "average",
                     "wise-ft": "wise_ft"}[opts.method]
        plan.anchored = True
    return plan


def chunk_ranges(numel: int, chunk_numel: int, row_numel: int | None = None
                 ) -> list[tuple[int, int]]:
    """Element ranges covering ``numel``; with rows, each range holds whole rows (at least one)."""
    step = chunk_numel if row_numel is None else max(1, chunk_numel // row_numel) * row_numel
    return [(s, min(numel, s + step)) for s in range(0, numel, step)] or [(0, 0)]


def _done(value: object) -> Future:
    """A future that already holds ``value`` (work run at once, without a pool)."""
    f: Future = Future()
    f.set_result(value)
    return f


class DictSink:
    """Collect the merged tensors in memory."""

    def __init__(self, layers: Sequence[LayerPlan], device: str | torch.device = "cpu") -> None:
        self.tensors = {p.name: torch.empty(p.shape, dtype=p.out_dtype, device=device)
                        for p in layers}
        self._pos = dict.fromkeys(self.tensors, 0)

    def write(self, name: str, chunk: torch.Tensor) -> None:
        flat, pos = self.tensors[name].view(-1), self._pos[name]
        flat[pos : pos + chunk.numel()].copy_(chunk)
        self._pos[name] = pos + chunk.numel()


class Merger:
    """Runs a `MergePlan`: reads chunks, applies each layer's rule, writes to ``sink``."""

    def __init__(self, anchor: Reader, models: Sequence[Reader], opts: MergeOptions,
                 sink, progress: Callable[[int], object] | None = None,
                 pool: Executor | None = None) -> None:
        self.anchor, self.models, self.opts, self.sink = anchor, list(models), opts, sink
        self.progress = progress or (lambda n: None)
        self.n = len(self.models)
        self.pool = pool
        self._buffers: dict[object, torch.Tensor] = {}
        self._out_index = 0
        self._pending: list[tuple[list, Callable[[], None]]] = []
        self._total_slot = 0

    def _map(self, fn: Callable, items: Sequence) -> list:
        """Run ``fn`` over ``items`` on the worker threads (torch releases the GIL), in order."""
        return self._gather(self._submit(fn, items))

    def _submit(self, fn: Callable, items: Sequence) -> list:
        """Queue ``fn`` over ``items`` on the workers (first in, first out); with no pool, run
        it now. `_gather` the handles for the results."""
        if self.pool is None or len(items) < 2:
            return [_done(fn(x)) for x in items]
        return [self.pool.submit(fn, x) for x in items]

    @staticmethod
    def _gather(handles: Sequence) -> list:
        return [h.result() for h in handles]

    def _flush(self) -> None:
        """Hand the sink the output of the last anchored layer, whose pieces may still be
        queued behind the next layer's Gram pieces (so that the workers never wait for the main
        thread between the two). Every other path calls this before it writes or reads."""
        pending, self._pending = self._pending, []
        for handles, finish in pending:
            self._gather(handles)
            finish()

    @staticmethod
    def _pieces(s: int, e: int, row: int | None) -> list[tuple[int, int]]:
        """Sub-ranges of [s, e) for the workers, relative to s, holding whole rows."""
        return chunk_ranges(e - s, PIECE_NUMEL, row) if e > s else [(0, 0)]

    # -- reading -----------------------------------------------------------------------------
    def _read(self, reader: Reader, name: str, s: int, e: int) -> torch.Tensor:
        return reader.read(name, s, e).to(self.opts.device)

    def _release(self, name: str, s: int = 0, e: int | None = None) -> None:
        for r in [self.anchor, *self.models]:
            if name in r.infos:
                r.release(name, s, e)

    def _compute_dtype(self, name: str) -> torch.dtype:
        return stock.compute_dtype_for(*(r.infos[name].dtype for r in [self.anchor, *self.models]
                                         if name in r.infos), self.opts.compute_dtype)

    def _chunks(self, p: LayerPlan, s: int, e: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The anchor's and the models' elements [s, e) of tensor ``p``."""
        return (self._read(self.anchor, p.name, s, e),
                [self._read(m, p.name, s, e) for m in self.models])

    def _row_numel(self, p: LayerPlan) -> int | None:
        if self.opts.granularity != "row" or self.opts.method != "model-stock":
            return None
        if len(p.shape) < 2 or p.numel == 0:
            return None
        return p.numel // p.shape[0]

    # -- checks ------------------------------------------------------------------------------
    def _nonfinite(self, p: LayerPlan, readers: Sequence[Reader]) -> ModelStockError:
        for r in readers:
            for s, e in chunk_ranges(p.numel, self.opts.chunk_numel):
                if not stock.all_finite(r.read(p.name, s, e)):
                    return ModelStockError("contains NaN or Inf (pass --allow-nonfinite to "
                                           "merge anyway)", r.path, p.name)
        return ModelStockError("merged values overflow", tensor=p.name)

    def _check_output(self, p: LayerPlan, out: torch.Tensor, readers: Sequence[Reader],
                      t: float | None = None) -> None:
        if self.opts.allow_nonfinite or stock.all_finite(out):
            return
        err = self._nonfinite(p, readers)
        if err.path is None:
            err = ModelStockError(f"merged values overflow {p.out_dtype}"
                                  + ("" if t is None else f" (t={t:.4g})"), tensor=p.name)
        raise err

    def _output_may_overflow(self, p: LayerPlan, t_lo: float, t_hi: float) -> bool:
        """Whether a finite merge can still leave the output dtype's range (extrapolation, or a
        narrower output dtype than an input's)."""
        if t_lo < 0 or t_hi > 1:
            return True
        widest = max(torch.finfo(r.infos[p.name].dtype).max for r in [self.anchor, *self.models]
                     if p.name in r.infos and r.infos[p.name].dtype.is_floating_point)
        return torch.finfo(p.out_dtype).max < widest

    # -- anchored layers (model_stock, wise_ft, average of a uniform soup) ----------------------
    def start_gram(self, p: LayerPlan) -> tuple[list, torch.Tensor] | None:
        """Queue the Gram pieces of a layer that fits in one chunk, keeping ``sum_i d_i`` in the
        next of `TOTAL_SLOTS` buffers, so that the workers can take it up while the main thread
        still finishes the layer before; None for a layer that does not fit."""
        row = self._row_numel(p)
        if len(chunk_ranges(p.numel, self.opts.chunk_numel, row)) != 1:
            return None
        dt = self._compute_dtype(p.name)
        self._total_slot = (self._total_slot + 1) % TOTAL_SLOTS
        total = self._buffer(("total", self._total_slot), p.numel, dt)
        w0, ws = self._chunks(p, 0, p.numel)

        def piece(r: tuple[int, int]) -> torch.Tensor:
            a, b = r
            return stock.chunk_stats(w0[a:b], [w[a:b] for w in ws], dt, row, total[a:b],
                                     self.opts.allow_nonfinite)

        return self._submit(piece, self._pieces(0, p.numel, row)), total

    def layer_gram(self, p: LayerPlan, keep: bool = True, count: bool = False,
                   started: tuple[list, torch.Tensor] | None = None):
        """Gram matrix of the task vectors ([N,N], or [R,N,N] per row) and, when the tensor fits
        in one chunk and ``keep``, ``sum_i d_i`` (so the output pass need not re-read inputs).
        ``started`` is what `start_gram` returned for ``p``, if it was called."""
        if keep and started is None:
            started = self.start_gram(p)
        if started is not None:
            handles, total = started
            self._flush()  # the previous layer's output, while the workers go on with this one
            grams = self._gather(handles)
            if count:
                self.progress(p.numel)
        else:
            self._flush()
            total, grams = None, []
            row = self._row_numel(p)
            dt = self._compute_dtype(p.name)
            for s, e in chunk_ranges(p.numel, self.opts.chunk_numel, row):
                w0, ws = self._chunks(p, s, e)

                def piece(r: tuple[int, int], w0=w0, ws=ws) -> torch.Tensor:
                    a, b = r
                    return stock.chunk_stats(w0[a:b], [w[a:b] for w in ws], dt, row, None,
                                             self.opts.allow_nonfinite)

                grams.extend(self._map(piece, self._pieces(s, e, row)))
                if count:
                    self.progress(e - s)
                self._release(p.name, s, e)
        g = torch.cat(grams) if grams[0].ndim == 3 else sum(grams[1:], grams[0])
        if not torch.isfinite(g).all():
            raise self._nonfinite(p, [self.anchor, *self.models])
        return g, total

    def ratio(self, p: LayerPlan, g: torch.Tensor) -> tuple[torch.Tensor, LayerReport]:
        """The ratio ``t`` for a layer (scalar or per row) and its report entry."""
        g_tensor = g.sum(0) if g.ndim == 3 else g
        rep = self.describe(p, g_tensor)
        if self.opts.method == "model-stock":
            cos = stock.mean_pairwise_cos(g)
            t = stock.stock_ratio(cos, self.n, self.opts.clamp)
            if not self.opts.clamp and bool(stock.is_singular(cos, self.n).any()):
                rep.note = "cos at the formula's pole 1+(N-1)cos=0: t set to 0 (anchor)"
        else:
            t = torch.tensor(1.0 if self.opts.method == "uniform" else self.opts.alpha,
                             dtype=torch.float64)
        self.set_t(rep, t)
        return t, rep

    @staticmethod
    def set_t(rep: LayerReport, t: torch.Tensor) -> None:
        rep.t = float(t.mean())
        if t.ndim:
            rep.t_min, rep.t_max = float(t.min()), float(t.max())

    def describe(self, p: LayerPlan, g: torch.Tensor) -> LayerReport:
        """Report entry with the tensor-level geometry: norms, pairwise and mean cosine, angle."""
        rep = LayerReport(p.name, list(p.shape), p.rule, str(p.out_dtype).removeprefix("torch."))
        norms = torch.sqrt(torch.diagonal(g).clamp_min(0))
        rep.norms = [float(x) for x in norms]
        if self.n >= 2:
            pc = stock.pair_values(stock.pairwise_cos(g))
            rep.pair_cos = [float(x) for x in pc]
            rep.cos = float(pc.mean())
            rep.angle_deg = math.degrees(math.acos(max(-1.0, min(1.0, rep.cos))))
        if not bool((norms > 0).any()):
            rep.note = "every task vector is zero: output equals the anchor"
        elif not bool((norms > 0).all()):
            zero = [i for i, x in enumerate(rep.norms) if x == 0]
            rep.note = f"task vector of model(s) {zero} is zero (pair cos = 0)"
        return rep

    def write_anchored(self, p: LayerPlan, t: torch.Tensor,
                       total: torch.Tensor | None = None) -> None:
        """Write ``w0 + t mean_i(d_i)``, re-reading the inputs unless ``total`` is given.

        Output goes out in pieces of at most `OUT_BYTES`, from a small ring of reused buffers:
        fresh chunk-sized allocations each time make glibc's heap grow with the model."""
        row = self._row_numel(p)
        check = self._output_may_overflow(p, float(t.min()), float(t.max()))
        dt = self._compute_dtype(p.name)
        scale = t / self.n
        out_numel = max(1, OUT_BYTES // p.out_dtype.itemsize)
        for s, e in chunk_ranges(p.numel, self.opts.chunk_numel, row):
            w0, ws = self._chunks(p, s, e)
            for a, b in chunk_ranges(e - s, out_numel, row):
                out = self._out_buffer(b - a, p.out_dtype)

                def piece(r: tuple[int, int], a=a, s=s, w0=w0, ws=ws, out=out) -> None:
                    lo, hi = a + r[0], a + r[1]
                    sc = scale[(s + lo) // row : (s + hi) // row] if (row and scale.ndim) \
                        else scale
                    if total is None:  # sum_i d_i was not kept: form it again, block by block
                        stock.stock_output(w0[lo:hi], [w[lo:hi] for w in ws], sc,
                                           out[r[0] : r[1]], dt, row)
                    else:
                        stock.combine(w0[lo:hi], total[s + lo : s + hi], sc, out[r[0] : r[1]],
                                      row)

                def finish(out=out, n=b - a) -> None:
                    if check:
                        self._check_output(p, out, [self.anchor, *self.models],
                                           float(t.mean()))
                    self.sink.write(p.name, out)
                    self.progress(n)

                if len(self._pending) >= OUT_RING - SINK_HOLDS:  # keep the ring's slots safe
                    self._flush()
                self._pending.append((self._submit(piece, self._pieces(a, b, row)), finish))
            self._pending.append(([], lambda s=s, e=e: self._release(p.name, s, e)))

    def _buffer(self, key: object, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable flat buffer of ``numel`` elements of ``dtype`` (grown when needed)."""
        nbytes = numel * dtype.itemsize
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8,
                                                   device=self.opts.device)
        return buf[:nbytes].view(dtype)

    def _out_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The next buffer of the output ring: the sink may still be writing the last few."""
        self._out_index = (self._out_index + 1) % OUT_RING
        return self._buffer(("out", self._out_index), numel, dtype)

    # -- other rules -------------------------------------------------------------------------
    def write_simple(self, p: LayerPlan) -> LayerReport:
        self._flush()
        rep = LayerReport(p.name, list(p.shape), p.rule, str(p.out_dtype).removeprefix("torch."),
                          note=p.note)
        readers = [self.anchor] if (p.rule == "anchor" or p.from_anchor) else self.models
        dt = self._compute_dtype(p.name)
        differs = False
        for s, e in chunk_ranges(p.numel, self.opts.chunk_numel):
            chunks = [self._read(r, p.name, s, e) for r in readers]
            if p.rule == "copy":
                # Integer widths may differ across inputs (int32 vs int64): store the anchor's.
                out = chunks[0].to(p.out_dtype)
                if not torch.equal(out.to(chunks[0].dtype), chunks[0]):
                    raise ModelStockError(f"values do not fit the anchor's {p.out_dtype}",
                                          readers[0].path, p.name)
                differs = differs or any(not torch.equal(chunks[0], c.to(chunks[0].dtype))
                                         for c in chunks[1:])
            elif p.rule == "anchor":
                out = chunks[0].to(p.out_dtype)
            else:  # average or linear; with weights (method linear) a weighted mean
                out = stock.average(chunks, p.out_dtype, dt, self.opts.weights,
                                    self.opts.normalize)
            if p.out_dtype.is_floating_point:
                self._check_output(p, out, readers)
            self.sink.write(p.name, out)
            self.progress(e - s)
        if differs:
            rep.note = (f"{p.note}; values differ across fine-tunes, kept the first "
                        f"({self.models[0].path})")
        self._release(p.name)
        return rep

    # -- the whole model ---------------------------------------------------------------------
    def run(self, plan: MergePlan) -> list[LayerReport]:
        if self.opts.granularity == "model" and self.opts.method == "model-stock":
            return self._run_model_granularity(plan)
        reports: list[LayerReport] = []
        started = None  # the next layer's Gram pass, queued one layer ahead
        for i, p in enumerate(plan.layers):
            if not p.anchored:
                reports.append(self.write_simple(p))
                continue
            mine = started if started is not None else self.start_gram(p)
            nxt = plan.layers[i + 1] if i + 1 < len(plan.layers) else None
            started = self.start_gram(nxt) if (mine is not None and nxt is not None
                                               and nxt.anchored) else None
            g, total = self.layer_gram(p, started=mine)
            t, rep = self.ratio(p, g)
            self.write_anchored(p, t, total)
            reports.append(rep)
        self._flush()
        return reports

    def _run_model_granularity(self, plan: MergePlan) -> list[LayerReport]:
        grams = {p.name: self.layer_gram(p, keep=False, count=True)[0]
                 for p in plan.layers if p.anchored}
        total = sum(grams.values(), torch.zeros(self.n, self.n, dtype=torch.float64))
        self.global_cos = float(stock.mean_pairwise_cos(total))
        t = stock.stock_ratio(self.global_cos, self.n, self.opts.clamp)
        self.global_t = float(t)
        reports = []
        for p in plan.layers:
            if p.anchored:
                rep = self.describe(p, grams[p.name])
                self.set_t(rep, t)
                self.write_anchored(p, t)
                reports.append(rep)
            else:
                reports.append(self.write_simple(p))
        self._flush()
        return reports


@contextlib.contextmanager
def worker_pool(opts: MergeOptions) -> Iterator[Executor | None]:
    """Worker threads for the CPU kernels (None for one thread or a GPU), with one intra-op
    torch thread meanwhile: OpenMP teams spin-wait, which collapses on a busy machine."""
    on_cpu = str(opts.device) == "cpu"
    threads = opts.threads or min(4, os.cpu_count() or 1) if on_cpu else 1
    before = torch.get_num_threads()
    if on_cpu:
        torch.set_num_threads(1)
    try:
        if threads > 1:
            with ThreadPoolExecutor(threads, thread_name_prefix="modelstock") as pool:
                yield pool
        else:
            yield None
    finally:
        torch.set_num_threads(before)


def merge_readers(anchor: Reader, models: Sequence[Reader], opts: MergeOptions,
                  make_sink: Callable[[MergePlan], object],
                  progress: bool = False) -> tuple[object, MergeReport]:
    """Plan and run a merge; ``make_sink(plan)`` builds the destination once the plan is known.
    ``progress`` shows a bar on stderr, counted in parameters processed."""
    plan = plan_merge(anchor, models, opts)
    sink = make_sink(plan)
    total = sum(p.numel for p in plan.layers)
    if opts.granularity == "model" and opts.method == "model-stock":
        total += sum(p.numel for p in plan.layers if p.anchored)
    with worker_pool(opts) as pool, \
            tqdm(total=total, disable=None if progress else True, unit="param",
                 unit_scale=True, file=sys.stderr, desc="merging", dynamic_ncols=True) as bar:
        merger = Merger(anchor, models, opts, sink, bar.update, pool)
        layers = merger.run(plan)
    report = MergeReport(method=opts.method, n_models=len(models), granularity=opts.granularity,
                         clamp=opts.clamp, layers=layers, alpha=opts.alpha,
                         weights=None if opts.weights is None else list(opts.weights),
                         normalize=None if opts.weights is None else opts.normalize,
                         anchor=anchor.path, models=[m.path for m in models],
                         warnings=list(plan.warnings))
    report.model_cos = getattr(merger, "global_cos", None)
    report.model_t = getattr(merger, "global_t", None)
    return sink, report
