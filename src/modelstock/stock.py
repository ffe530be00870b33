"""The Model Stock math: pure functions on tensors, no I/O.

For one layer with anchor ``w0`` and fine-tunes ``w1..wN`` (Jang, Yun, Han, ECCV 2024)::

    d_i = w_i - w0
    cos = mean over pairs i<j of <d_i, d_j> / (|d_i| |d_j|)
    t   = N cos / (1 + (N - 1) cos)
    w_H = w0 + t (mean_i(w_i) - w0)

Task vectors are formed in a float compute dtype (float32, or float64 for float64 inputs) and
their dot products accumulated in float64. Everything here works on flat chunks so that the same
code serves whole tensors, chunks of huge tensors, rows (``granularity="row"``), whole models,
post-hoc merging and merging during training. Where they were built, the C loops of
`modelstock.kernels` run the block loops of `chunk_stats`, `combine` and `stock_output` for
float32, bfloat16 and float16 weights, to the same rounding.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from . import kernels

# Elements per cache block in `chunk_stats`: the N task vectors of a block stay in cache.
BLOCK_NUMEL = 1 << 18
_SCRATCH = threading.local()
# |1 + (N-1) cos| below this is treated as the formula's pole (see `stock_ratio`).
SINGULAR_EPS = 1e-6


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf (torch has no isfinite for float8: check those in float32)."""
    if t.is_floating_point() and t.dtype.itemsize == 1:
        t = t.float()
    return bool(torch.isfinite(t).all())


def block_step(row_numel: int | None) -> int:
    """Elements per cache block: `BLOCK_NUMEL`, rounded down to whole rows (at least one)."""
    return BLOCK_NUMEL if row_numel is None else max(1, BLOCK_NUMEL // row_numel) * row_numel


def compute_dtype_for(*dtypes: torch.dtype | None) -> torch.dtype:
    """float32, unless an input is float64 (then float64: never compute below the inputs)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def task_vectors(anchor: torch.Tensor, models: Sequence[torch.Tensor],
                 dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
                 anchor_buf: torch.Tensor | None = None) -> torch.Tensor:
    """``w_i - w0`` for flat chunks of equal length, as an ``[N, n]`` tensor of ``dtype``.

    Inputs are converted exactly (16-bit floats widen without rounding), so for 16-bit weights
    the task vectors themselves are exact in float32. ``anchor_buf`` (``n`` elements of
    ``dtype``) receives the converted anchor instead of a fresh tensor.
    """
    if anchor.dtype == dtype:
        w0 = anchor
    else:
        w0 = anchor.to(dtype) if anchor_buf is None else anchor_buf.copy_(anchor)
    if out is None:
        out = torch.empty((len(models), anchor.numel()), dtype=dtype, device=anchor.device)
    for i, w in enumerate(models):
        if w.dtype == dtype:
            torch.sub(w, w0, out=out[i])
        else:  # convert, then subtract in one dtype: faster than a mixed-dtype sub
            out[i].copy_(w).sub_(w0)
    return out


def gram(deltas: torch.Tensor, row_numel: int | None = None) -> torch.Tensor:
    """Float64 Gram matrix ``<d_i, d_j>`` of ``[N, n]`` task vectors.

    Products and sums are taken in float64 (a product of two float32 values is exact there),
    block by block so that the float64 copy stays in cache. With ``row_numel`` the chunk is read
    as rows of that many elements and one ``[N, N]`` matrix is returned per row: ``[R, N, N]``.
    """
    n_models, numel = deltas.shape
    if row_numel is not None:
        rows = deltas.to(torch.float64).view(n_models, -1, row_numel).transpose(0, 1)
        return rows @ rows.transpose(1, 2)
    g = torch.zeros((n_models, n_models), dtype=torch.float64, device=deltas.device)
    for start in range(0, numel, BLOCK_NUMEL):
        block = deltas[:, start : start + BLOCK_NUMEL]
        if block.dtype != torch.float64:  # into a reused buffer: an allocation costs more
            block = _scratch("gram64", tuple(block.shape), torch.float64,
                             deltas.device).copy_(block)
        g += block @ block.T
    return g


def sum_models(deltas: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i d_i`` of ``[N, n]`` task vectors (into ``out`` if given)."""
    if out is None:
        out = torch.empty_like(deltas[0])
    if deltas.shape[0] == 1:
        return out.copy_(deltas[0])
    torch.add(deltas[0], deltas[1], out=out)
    for d in deltas[2:]:
        out += d
    return out


def _scratch(key: str, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """A reusable buffer of this thread: a fresh allocation per cache block costs more than the
    block's arithmetic, and worker threads must not share one."""
    cache = _SCRATCH.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buf = cache.get((key, dtype, device))
    if buf is None or buf.numel() < numel:
        buf = cache[(key, dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def chunk_stats(anchor: torch.Tensor, models: Sequence[torch.Tensor], dtype: torch.dtype,
                row_numel: int | None = None, total: torch.Tensor | None = None,
                ignore_nonfinite: bool = False, with_gram: bool = True) -> torch.Tensor | None:
    """Gram matrix of a chunk's task vectors, computed block by block so that they stay in
    cache; if ``total`` is given, it receives ``sum_i d_i`` (what the output needs).

    ``ignore_nonfinite`` leaves NaN/Inf elements out of the Gram matrix (not out of ``total``).
    Blocks hold whole rows when ``row_numel`` is given. ``with_gram=False`` only fills ``total``.
    ``gram(task_vectors(...))`` block by block, in reused per-thread buffers.
    """
    numel, n_models, dev = anchor.numel(), len(models), anchor.device
    g = torch.zeros((n_models, n_models), dtype=torch.float64, device=dev)
    if (row_numel is None and not ignore_nonfinite and dtype == torch.float32
            and kernels.stats(anchor, models, total, g if with_gram else None)):
        return g if with_gram else None
    step = block_step(row_numel)
    width = min(step, numel)
    d_buf = _scratch("deltas", (n_models, width), dtype, dev)
    w0_buf = _scratch("anchor", (width,), dtype, dev)
    rows = []
    for s in range(0, numel, step):
        e = min(numel, s + step)
        d = task_vectors(anchor[s:e], [w[s:e] for w in models], dtype, out=d_buf[:, : e - s],
                         anchor_buf=w0_buf[: e - s])
        if total is not None:
            sum_models(d, out=total[s:e])
        if not with_gram:
            continue
        if ignore_nonfinite:
            d = torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)
        if row_numel is not None:
            rows.append(gram(d, row_numel))
        else:
            g += gram(d)
    if not with_gram:
        return None
    if row_numel is not None:
        return torch.cat(rows) if rows else torch.zeros((0, n_models, n_models),
                                                        dtype=torch.float64, device=dev)
    return g


def pairwise_cos(g: torch.Tensor) -> torch.Tensor:
    """Cosine matrix from a Gram matrix ``[..., N, N]``; a pair with a zero vector has cos 0."""
    sq = torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(0)
    denom = torch.sqrt(sq.unsqueeze(-1) * sq.unsqueeze(-2))
    cos = torch.where(denom > 0, g / torch.where(denom > 0, denom, 1.0), 0.0)
    return cos.clamp(-1.0, 1.0)


def pair_values(m: torch.Tensor) -> torch.Tensor:
    """Upper-triangle entries ``i < j`` of ``[..., N, N]`` in row-major pair order."""
    n = m.shape[-1]
    i, j = torch.triu_indices(n, n, offset=1, device=m.device)
    return m[..., i, j]


def mean_pairwise_cos(g: torch.Tensor) -> torch.Tensor:
    """Mean over pairs ``i < j`` of the cosine between task vectors (the paper's rule for N > 2)."""
    return pair_values(pairwise_cos(g)).mean(dim=-1)


def stock_ratio(cos: torch.Tensor | float, n: int, clamp: bool = True) -> torch.Tensor:
    """Interpolation ratio ``t = N cos / (1 + (N-1) cos)``, always finite.

    ``clamp=True`` (the default) limits ``t`` to ``[0, 1]``: a layer whose task vectors do not
    agree (cos <= 0) falls back to the anchor. ``clamp=False`` keeps the raw formula, except at
    its pole ``1 + (N-1) cos = 0`` (cos = -1/(N-1)), where ``t`` is set to 0 instead of +-inf.
    """
    cos = torch.as_tensor(cos, dtype=torch.float64)
    den = 1.0 + (n - 1) * cos
    singular = den.abs() < SINGULAR_EPS
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, den))
    return t.clamp(0.0, 1.0) if clamp else t


def is_singular(cos: torch.Tensor | float, n: int) -> torch.Tensor:
    """Where ``stock_ratio`` hit the formula's pole and returned 0."""
    cos = torch.as_tensor(cos, dtype=torch.float64)
    return (1.0 + (n - 1) * cos).abs() < SINGULAR_EPS


def combine(anchor: torch.Tensor, total: torch.Tensor, scale: torch.Tensor | float,
            out: torch.Tensor, row_numel: int | None = None) -> torch.Tensor:
    """``out = w0 + scale * total`` in ``total``'s dtype, rounded once into ``out``'s dtype.

    With ``total = sum_i d_i`` and ``scale = t / N`` this is the Model Stock output
    ``w0 + t (mean_i(w_i) - w0)``. ``scale`` is a scalar, or one value per row. Works block by
    block in a buffer of ``total``'s dtype (one dtype per kernel: mixed-dtype kernels are ~2x
    slower on CPU).
    """
    scale = torch.as_tensor(scale, dtype=torch.float64)
    if scale.ndim == 0 and kernels.combine(anchor, total, float(scale), out):
        return out
    numel = anchor.numel()
    step = block_step(row_numel)
    buf = _scratch("combine", (min(step, numel),), total.dtype, total.device)
    if scale.ndim:
        scale = scale.to(total.dtype).to(total.device)
    for s in range(0, numel, step):
        e = min(numel, s + step)
        b = buf[: e - s]
        b.copy_(anchor[s:e])
        if scale.ndim == 0:
            b.add_(total[s:e], alpha=float(scale))
        else:
            rows = scale[s // row_numel : e // row_numel].unsqueeze(1)
            b.view(-1, row_numel).addcmul_(total[s:e].view(-1, row_numel), rows)
        out[s:e].copy_(b)
    return out


def stock_output(anchor: torch.Tensor, models: Sequence[torch.Tensor],
                 scale: torch.Tensor | float, out: torch.Tensor, dtype: torch.dtype,
                 row_numel: int | None = None) -> torch.Tensor:
    """``out = w0 + scale * sum_i d_i`` straight from the weights, block by block, so that
    ``sum_i d_i`` only ever exists for one cache block (for chunks whose sum was not kept from
    the Gram pass). The same operations as `chunk_stats` then `combine`."""
    scale = torch.as_tensor(scale, dtype=torch.float64)
    if (scale.ndim == 0 and dtype == torch.float32
            and kernels.output(anchor, models, float(scale), out)):
        return out
    numel = anchor.numel()
    step = block_step(row_numel)
    tot = _scratch("output total", (min(step, numel),), dtype, anchor.device)
    for s in range(0, numel, step):
        e = min(numel, s + step)
        chunk_stats(anchor[s:e], [w[s:e] for w in models], dtype, row_numel, tot[: e - s],
                    with_gram=False)
        sc = scale[s // row_numel : e // row_numel] if scale.ndim else scale
        combine(anchor[s:e], tot[: e - s], sc, out[s:e], row_numel)
    return out


def apply_ratio(anchor: torch.Tensor, deltas: torch.Tensor, t: torch.Tensor | float,
                out_dtype: torch.dtype, row_numel: int | None = None) -> torch.Tensor:
    """``w0 + t mean_i(d_i)`` (= ``w0 + t (mean_i(w_i) - w0)``) for a flat chunk of ``[N, n]``
    task vectors; ``t`` is a scalar or one value per row of ``row_numel`` elements."""
    out = torch.empty(anchor.numel(), dtype=out_dtype, device=deltas.device)
    t = torch.as_tensor(t, dtype=torch.float64)
    return combine(anchor, sum_models(deltas), t / deltas.shape[0], out, row_numel)


def average(models: Sequence[torch.Tensor], out_dtype: torch.dtype,
            compute_dtype: torch.dtype = torch.float32, weights: Sequence[float] | None = None,
            normalize: bool = True) -> torch.Tensor:
    """Plain mean of flat chunks (a uniform soup; BatchNorm statistics; keys with no anchor).

    With ``weights``: ``sum_i weights[i] models[i]``, divided by ``sum(weights)`` if
    ``normalize`` (mergekit's ``linear``).
    """
    if weights is None:
        acc = models[0].to(compute_dtype, copy=True)
        for w in models[1:]:
            acc += w.to(compute_dtype)
        acc /= len(models)
        return acc.to(out_dtype)
    acc = torch.mul(models[0].to(compute_dtype), weights[0])
    for x, w in zip(models[1:], weights[1:], strict=True):
        acc.add_(x.to(compute_dtype), alpha=w)
    if normalize:
        acc /= sum(weights)
    return acc.to(out_dtype)


def model_stock(
    anchor: torch.Tensor, models: Sequence[torch.Tensor], clamp: bool = True
) -> torch.Tensor:
    """Model Stock merge of one whole tensor (convenience for small, in-memory use)."""
    dt = compute_dtype_for(anchor.dtype, *(m.dtype for m in models))
    flat = [m.reshape(-1) for m in models]
    deltas = task_vectors(anchor.reshape(-1), flat, dt)
    t = stock_ratio(mean_pairwise_cos(gram(deltas)), len(models), clamp)
    return apply_ratio(anchor.reshape(-1), deltas, t, anchor.dtype).view(anchor.shape)
