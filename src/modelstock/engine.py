"""The merge engine: stream every tensor of a `MergePlan` through its rule into a sink.

One method-agnostic scheduler serves every front end: readers in (files or in-memory state
dicts), a sink out (a streaming safetensors writer, a dict, the models being trained). A tensor
whose rule has statistics (Model Stock's Gram matrix) takes two steps, statistics then output;
when it fits in one chunk both come from one read (``sum_i d_i`` is kept between them), else it
is read twice, chunk by chunk. Every other rule is one pass. Peak memory is bounded by the
execution's ``chunk_numel``, not by the model.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import torch
from tqdm import tqdm

from . import _blocks, stock
from .checkpoint import Reader
from .errors import ModelStockError
from .plan import LayerPlan, MergePlan, plan_merge
from .recipe import DEFAULT_CHUNK_NUMEL, Execution, MergeOptions, Recipe
from .report import LayerReport, MergeReport, layer_report
from .rules import Copy, Follow, ModelStock

__all__ = ["DEFAULT_CHUNK_NUMEL", "DictSink", "Merger", "MergeOptions", "chunk_ranges",
           "merge_readers", "plan_merge", "worker_pool"]

PIECE_NUMEL = 1 << 21  # unit of work handed to a worker thread
OUT_BYTES = 16 << 20  # output goes to the sink in pieces of at most this size, from a ring of
COMPUTING = 3  # reused buffers: those the sink `holds`, plus this many pieces being computed
TOTAL_SLOTS = 3  # sum_i d_i kept for: the layer being written, the next, the one after


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

    holds = 0  # `write` copies the chunk before it returns

    def __init__(self, layers: Sequence[LayerPlan], device: str | torch.device = "cpu") -> None:
        self.tensors = {p.name: torch.empty(p.shape, dtype=p.out_dtype, device=device)
                        for p in layers}
        self._pos = dict.fromkeys(self.tensors, 0)

    def write(self, name: str, chunk: torch.Tensor) -> None:
        flat, pos = self.tensors[name].view(-1), self._pos[name]
        flat[pos : pos + chunk.numel()].copy_(chunk)
        self._pos[name] = pos + chunk.numel()


class Merger:
    """Runs a `MergePlan`: reads chunks, applies each tensor's rule, writes to ``sink``.

    A sink has ``write(name, chunk)`` and declares ``holds``: how many chunks it may keep
    referring to after `write` returns (a background writer's queue). The output ring is sized
    from it, so a buffer is never reused while the sink still reads it.
    """

    def __init__(self, anchor: Reader, models: Sequence[Reader], recipe: Recipe,
                 execution: Execution, sink, progress: Callable[[int], object] | None = None,
                 pool: Executor | None = None) -> None:
        self.anchor, self.models, self.sink = anchor, list(models), sink
        self.recipe, self.exe = recipe, execution
        self.progress = progress or (lambda n: None)
        self.n = len(self.models)
        self.pool = pool
        holds = 0 if sink is None else sink.holds
        if not isinstance(holds, int) or holds < 0:
            raise TypeError(f"sink.holds must be a non-negative int, got {holds!r}")
        self.ring = holds + COMPUTING
        self._in_flight = COMPUTING  # output pieces queued before the oldest must be handed on
        self._buffers: dict[object, torch.Tensor] = {}
        self._out_index = 0
        self._pending: list[tuple[list, Callable[[], None]]] = []
        self._total_slot = 0
        self._known: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # name: (t, gram)
        self.global_cos: float | None = None
        self.global_t: float | None = None

    # -- the worker pool ---------------------------------------------------------------------
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
        """Hand the sink the output of the last interpolated tensor, whose pieces may still be
        queued behind the next tensor's statistics pieces (so that the workers never wait for
        the main thread between the two). Every other path calls this before it writes."""
        pending, self._pending = self._pending, []
        for handles, finish in pending:
            finish(self._gather(handles))

    @staticmethod
    def _pieces(s: int, e: int, row: int | None) -> list[tuple[int, int]]:
        """Sub-ranges of [s, e) for the workers, relative to s, holding whole rows."""
        return chunk_ranges(e - s, PIECE_NUMEL, row) if e > s else [(0, 0)]

    # -- reading -----------------------------------------------------------------------------
    def _read(self, reader: Reader, name: str, s: int, e: int) -> torch.Tensor:
        return reader.read(name, s, e).to(self.exe.device)

    def _release(self, name: str, s: int = 0, e: int | None = None) -> None:
        for r in [self.anchor, *self.models]:
            if name in r.infos:
                r.release(name, s, e)

    def _compute_dtype(self, name: str) -> torch.dtype:
        return stock.compute_dtype_for(*(r.infos[name].dtype for r in [self.anchor, *self.models]
                                         if name in r.infos), self.recipe.compute_dtype)

    def _chunks(self, p: LayerPlan, s: int, e: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The anchor's and the models' elements [s, e) of tensor ``p``."""
        return (self._read(self.anchor, p.name, s, e),
                [self._read(m, p.name, s, e) for m in self.models])

    # -- checks ------------------------------------------------------------------------------
    def _nonfinite(self, p: LayerPlan, readers: Sequence[Reader]) -> ModelStockError:
        for r in readers:
            r = getattr(r, "unaligned", r)  # as stored, not in another vocabulary's rows
            numel = r.infos[p.name].numel if p.name in r.infos else 0
            for s, e in chunk_ranges(numel, self.exe.chunk_numel):
                if not _blocks.all_finite(r.read(p.name, s, e)):
                    return ModelStockError("contains NaN or Inf (pass --allow-nonfinite to "
                                           "merge anyway)", r.path, p.name)
        return ModelStockError("merged values overflow", tensor=p.name)

    def _check_output(self, p: LayerPlan, out: torch.Tensor, readers: Sequence[Reader],
                      t: float | None = None) -> None:
        if self.recipe.allow_nonfinite or _blocks.all_finite(out):
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

    # -- statistics (Model Stock's Gram matrix) ------------------------------------------------
    def start_gram(self, p: LayerPlan) -> tuple[list, torch.Tensor] | None:
        """Queue the Gram pieces of a tensor that fits in one chunk, keeping ``sum_i d_i`` in
        the next of `TOTAL_SLOTS` buffers, so that the workers can take it up while the main
        thread still finishes the tensor before; None for a tensor that does not fit."""
        row = p.row_numel(self.recipe)
        if p.stat_rows is not None or len(chunk_ranges(p.numel, self.exe.chunk_numel, row)) != 1:
            return None
        dt = self._compute_dtype(p.name)
        self._total_slot = (self._total_slot + 1) % TOTAL_SLOTS
        total = self._buffer(("total", self._total_slot), p.numel, dt)
        w0, ws = self._chunks(p, 0, p.numel)

        def piece(r: tuple[int, int]) -> torch.Tensor:
            a, b = r
            return _blocks.chunk_stats(w0[a:b], [w[a:b] for w in ws], dt, row, total[a:b],
                                       self.recipe.allow_nonfinite)

        return self._submit(piece, self._pieces(0, p.numel, row)), total

    def layer_gram(self, p: LayerPlan, keep: bool = True, count: bool = False,
                   started: tuple[list, torch.Tensor] | None = None):
        """Gram matrix of the task vectors ([N,N], or [R,N,N] per row) and, when the tensor fits
        in one chunk and ``keep``, ``sum_i d_i`` (so the output pass need not re-read inputs).
        ``started`` is what `start_gram` returned for ``p``, if it was called."""
        if keep and started is None:
            started = self.start_gram(p)
        row = p.row_numel(self.recipe)
        if started is not None:
            handles, total = started
            self._flush()  # the previous tensor's output, while the workers go on with this one
            grams = self._gather(handles)
            if count:
                self.progress(p.numel)
        else:
            self._flush()
            total, grams = None, []
            dt = self._compute_dtype(p.name)
            for s, e in self._stat_ranges(p, row):
                w0, ws = self._chunks(p, s, e)

                def piece(r: tuple[int, int], w0=w0, ws=ws) -> torch.Tensor:
                    a, b = r
                    return _blocks.chunk_stats(w0[a:b], [w[a:b] for w in ws], dt, row, None,
                                               self.recipe.allow_nonfinite)

                grams.extend(self._map(piece, self._pieces(s, e, row)))
                if count:
                    self.progress(e - s)
                self._release(p.name, s, e)
        g = torch.cat(grams) if grams[0].ndim == 3 else sum(grams[1:], grams[0])
        if not torch.isfinite(g).all():
            raise self._nonfinite(p, [self.anchor, *self.models])
        return g, total

    def _stat_ranges(self, p: LayerPlan, row: int | None) -> list[tuple[int, int]]:
        """Element ranges the statistics read: the whole tensor, or (with a tensor-level ratio)
        only its ``stat_rows``."""
        if p.stat_rows is None or row is not None:
            return chunk_ranges(p.numel, self.exe.chunk_numel, row)
        h = p.numel // p.shape[0]
        return [(a * h + s, a * h + e) for a, b in p.stat_rows
                for s, e in chunk_ranges((b - a) * h, self.exe.chunk_numel)]

    def describe(self, p: LayerPlan, g: torch.Tensor | None, t: torch.Tensor | None = None,
                 rule: str | None = None, note: str | None = None) -> LayerReport:
        """Report entry with the tensor-level geometry of Gram matrix ``g`` (if measured)."""
        if g is not None and g.ndim == 3:  # per-row Grams: the tensor's, over the rows that
            if p.stat_rows is not None:  # give statistics (aligned vocabularies)
                g = torch.cat([g[a:b] for a, b in p.stat_rows])
            g = g.sum(0)
        kw = {} if g is None else {"norms": torch.sqrt(torch.diagonal(g).clamp_min(0)),
                                   "pair_cos": stock.pair_values(stock.pairwise_cos(g))}
        return layer_report(p.name, p.shape, rule or p.rule.name, p.out_dtype, t=t,
                            note=note, **kw)

    def coefficients(self, p: LayerPlan, count: bool = False) -> torch.Tensor:
        """The ratio ``t`` of an interpolating tensor, measuring its statistics if its rule has
        any (remembered: a follower may ask before the tensor itself is written). ``count``
        advances the progress bar by the tensor's size."""
        if p.name not in self._known:
            g = self.layer_gram(p, keep=False)[0] if p.rule.has_stats else None
            self._known[p.name] = (p.rule.finalize(g, self.n), g)
        if count:
            self.progress(p.numel)
        return self._known[p.name][0]

    def known_gram(self, p: LayerPlan) -> torch.Tensor | None:
        """The Gram matrix `coefficients` measured for ``p`` (None for a rule without one)."""
        return self._known[p.name][1]

    def _measure_model(self, plan: MergePlan) -> None:
        """``granularity="model"``: one ratio from the Gram matrices of all Model Stock tensors,
        summed (a pass over them all before anything is written)."""
        grams = {p.name: self.layer_gram(p, keep=False, count=True)[0]
                 for p in plan.layers if isinstance(p.rule, ModelStock)}
        if not grams:
            return
        total = sum(grams.values(), torch.zeros(self.n, self.n, dtype=torch.float64,
                                                device=self.exe.device))
        rule = next(p.rule for p in plan.layers if isinstance(p.rule, ModelStock))
        t = rule.finalize(total, self.n)
        self.global_cos = float(stock.mean_pairwise_cos(total))
        self.global_t = float(t)
        self._known.update({name: (t, g) for name, g in grams.items()})

    # -- writing -----------------------------------------------------------------------------
    def write_interpolated(self, p: LayerPlan, t: torch.Tensor,
                           total: torch.Tensor | None = None, measured: bool = False) -> None:
        """Write ``w0 + t mean_i(d_i)``, re-reading the inputs unless ``total`` is given.

        ``measured``: a statistics pass has seen every input element (a finite Gram matrix:
        no NaN or Inf); otherwise the workers check the output as they make it, since any
        non-finite input reaches it. Output goes out in pieces of at most `OUT_BYTES`, from a
        small ring of reused buffers: fresh chunk-sized allocations each time make glibc's heap
        grow with the model."""
        row = p.row_numel(self.recipe)
        check = self._output_may_overflow(p, float(t.min()), float(t.max()))
        verify = not (measured or check or self.recipe.allow_nonfinite)
        dt = self._compute_dtype(p.name)
        scale = t / self.n
        out_numel = max(1, OUT_BYTES // p.out_dtype.itemsize)
        for s, e in chunk_ranges(p.numel, self.exe.chunk_numel, row):
            w0, ws = self._chunks(p, s, e)
            for a, b in chunk_ranges(e - s, out_numel, row):
                out = self._out_buffer(b - a, p.out_dtype)

                def piece(r: tuple[int, int], a=a, s=s, w0=w0, ws=ws, out=out) -> bool:
                    lo, hi = a + r[0], a + r[1]
                    sc = scale[(s + lo) // row : (s + hi) // row] if (row and scale.ndim) \
                        else scale
                    if total is None:  # sum_i d_i was not kept: form it again, block by block
                        _blocks.stock_output(w0[lo:hi], [w[lo:hi] for w in ws], sc,
                                             out[r[0] : r[1]], dt, row)
                    else:
                        _blocks.combine(w0[lo:hi], total[s + lo : s + hi], sc,
                                        out[r[0] : r[1]], row)
                    return not verify or _blocks.all_finite(out[r[0] : r[1]])

                def finish(finite: list[bool], out=out, n=b - a) -> None:
                    if check or not all(finite):
                        self._check_output(p, out, [self.anchor, *self.models],
                                           float(t.mean()))
                    self.sink.write(p.name, out)
                    self.progress(n)

                if len(self._pending) >= self._in_flight:  # keep the ring's slots safe
                    self._flush()
                self._pending.append((self._submit(piece, self._pieces(a, b, row)), finish))
            self._pending.append(([], lambda _, s=s, e=e: self._release(p.name, s, e)))

    def _buffer(self, key: object, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable flat buffer of ``numel`` elements of ``dtype`` (grown when needed)."""
        nbytes = numel * dtype.itemsize
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8,
                                                   device=self.exe.device)
        return buf[:nbytes].view(dtype)

    def _out_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The next buffer of the output ring: the sink may still hold the last few."""
        self._out_index = (self._out_index + 1) % self.ring
        return self._buffer(("out", self._out_index), numel, dtype)

    def write_whole(self, p: LayerPlan, rule=None, t: torch.Tensor | None = None) -> str | None:
        """Write a tensor by a rule without statistics (`Copy`, `Mean`; or, with ``t``, an
        integer tensor interpolated in float64 and rounded). Returns a note for the report."""
        rule = rule or p.rule
        self._flush()
        readers = [self.anchor] if isinstance(rule, Copy) and rule.source == "anchor" \
            else self.models
        if t is not None:
            readers = [self.anchor, *self.models]
        dt = self._compute_dtype(p.name)
        differs = False
        for s, e in chunk_ranges(p.numel, self.exe.chunk_numel):
            chunks = [self._read(r, p.name, s, e) for r in readers]
            if t is not None:
                d = stock.task_vectors(chunks[0], chunks[1:], torch.float64)
                out = stock.interpolate(chunks[0], d, t, torch.float64).round()
                out = out.to(p.out_dtype)
            elif isinstance(rule, Copy):
                # Integer widths may differ across inputs (int32 vs int64): store the anchor's.
                out = chunks[0].to(p.out_dtype)
                if not torch.equal(out.to(chunks[0].dtype), chunks[0]):
                    raise ModelStockError(f"values do not fit the anchor's {p.out_dtype}",
                                          readers[0].path, p.name)
                differs = differs or any(not torch.equal(chunks[0], c.to(chunks[0].dtype))
                                         for c in chunks[1:])
            elif p.out_dtype.is_floating_point:
                out = _blocks.weighted_mean(chunks, p.out_dtype, dt, rule.weights,
                                            rule.normalize)
            else:  # an integer follower of a linear merge: in float64, rounded
                out = _blocks.weighted_mean(chunks, torch.float64, torch.float64, rule.weights,
                                            rule.normalize).round().to(p.out_dtype)
            if p.out_dtype.is_floating_point:
                self._check_output(p, out, readers)
            self.sink.write(p.name, out)
            self.progress(e - s)
        self._release(p.name)
        if differs and not (isinstance(rule, Copy) and rule.source == "anchor"):
            return f"values differ across fine-tunes, kept the first ({self.models[0].path})"
        return None

    def _join(self, *notes: str | None) -> str | None:
        return "; ".join(x for x in notes if x) or None

    def write_follower(self, p: LayerPlan, plan: MergePlan) -> LayerReport:
        """A tensor that takes its owner's rule and coefficients."""
        owner = plan[p.rule.owner]
        if not owner.anchored:
            note = self.write_whole(p, owner.rule)
            return self.describe(p, None, rule=Follow.name, note=self._join(p.note, note))
        t = self.coefficients(owner)
        if t.ndim:  # one ratio per row of the owner: a follower is one row's worth
            t = t.mean()
        self._flush()
        if p.out_dtype.is_floating_point:
            self.write_interpolated(p, t)
        else:
            self.write_whole(p, t=t)
        return self.describe(p, None, t, rule=Follow.name, note=p.note)

    # -- the whole model ---------------------------------------------------------------------
    def run(self, plan: MergePlan) -> list[LayerReport]:
        if self.recipe.granularity == "model":
            self._measure_model(plan)

        def fresh_stats(q: LayerPlan | None) -> bool:
            return q is not None and q.rule.has_stats and q.name not in self._known

        reports: list[LayerReport] = []
        started = None  # the next tensor's statistics, queued one tensor ahead
        for i, p in enumerate(plan.layers):
            if isinstance(p.rule, Follow):
                reports.append(self.write_follower(p, plan))
                continue
            if not p.anchored:
                note = self.write_whole(p)
                reports.append(self.describe(p, None, note=self._join(p.note, note)))
                continue
            total = None
            if fresh_stats(p):
                mine = started if started is not None else self.start_gram(p)
                nxt = plan.layers[i + 1] if i + 1 < len(plan.layers) else None
                started = self.start_gram(nxt) if mine is not None and fresh_stats(nxt) \
                    else None
                g, total = self.layer_gram(p, started=mine)
                t = p.rule.finalize(g, self.n)
                self._known[p.name] = (t, g)
            else:
                t, g = self.coefficients(p), self.known_gram(p)
            note = p.rule.note(g, self.n) if self.recipe.granularity != "model" else None
            reports.append(self.describe(p, g, t, note=self._join(p.note, note)))
            self.write_interpolated(p, t, total, measured=g is not None and p.stat_rows is None)
            self._known[p.name] = (t, None)  # a follower needs t; per-row Grams would pile up
        self._flush()
        return reports


@contextlib.contextmanager
def worker_pool(execution: Execution) -> Iterator[Executor | None]:
    """Worker threads for the CPU kernels (None for one thread or a GPU), with one intra-op
    torch thread meanwhile: OpenMP teams spin-wait, which collapses on a busy machine."""
    on_cpu = str(execution.device) == "cpu"
    threads = execution.threads or min(4, os.cpu_count() or 1) if on_cpu else 1
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


def progress_bar(total: int, show: bool, desc: str) -> tqdm:
    """A progress bar on stderr counted in parameters (hidden unless ``show``)."""
    return tqdm(total=total, disable=None if show else True, unit="param", unit_scale=True,
                file=sys.stderr, desc=desc, dynamic_ncols=True)


def merge_readers(anchor: Reader, models: Sequence[Reader], recipe: Recipe,
                  execution: Execution, make_sink: Callable[[MergePlan], object],
                  progress: bool = False, notes: Sequence[str] = ()
                  ) -> tuple[object, MergeReport]:
    """Plan and run a merge; ``make_sink(plan)`` builds the destination once the plan is known.
    ``progress`` shows a bar on stderr, counted in parameters processed; ``notes`` are warnings
    decided before planning (by the caller that opened the inputs)."""
    plan = plan_merge(anchor, models, recipe)
    plan.warnings[:0] = notes
    sink = make_sink(plan)
    total = sum(p.numel for p in plan.layers)
    if recipe.granularity == "model":
        total += sum(p.numel for p in plan.layers if isinstance(p.rule, ModelStock))
    with worker_pool(execution) as pool, progress_bar(total, progress, "merging") as bar:
        merger = Merger(anchor, models, recipe, execution, sink, bar.update, pool)
        layers = merger.run(plan)
    report = MergeReport(method=recipe.method, n_models=len(models),
                         granularity=recipe.granularity, clamp=recipe.clamp, layers=layers,
                         alpha=recipe.alpha,
                         weights=None if recipe.weights is None else list(recipe.weights),
                         normalize=None if recipe.weights is None else recipe.normalize,
                         anchor=anchor.path, models=[m.path for m in models],
                         warnings=list(plan.warnings), buffers=recipe.buffers)
    report.model_cos, report.model_t = merger.global_cos, merger.global_t
    vocabulary = getattr(anchor, "vocabulary", None)
    report.vocabulary = None if vocabulary is None else vocabulary.summary()
    return sink, report

