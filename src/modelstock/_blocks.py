"""The engine's hot loops: `modelstock.stock`'s operations, cache block by cache block.

`chunk_stats` is one pass over a chunk that yields its Gram matrix and ``sum_i d_i``;
`combine` and `stock_output` write ``w0 + scale * sum_i d_i``. Each works in reused per-thread
buffers (an allocation per block costs more than the block's arithmetic) and, where they were
built, hands float32/bfloat16/float16 blocks to the C loops of `modelstock.kernels`, which round
exactly as the torch path does.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from . import kernels
from .stock import BLOCK_NUMEL, gram, task_vectors

_SCRATCH = threading.local()


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf. Through the minimum and maximum, which carry any NaN or Inf, in one
    vectorised pass: ``isfinite(t).all()`` costs an elementwise pass and a mask as well (~40x
    slower on bfloat16). torch has no isfinite for float8: those are checked in float32."""
    if t.is_complex():
        return bool(torch.isfinite(t).all())
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype.itemsize == 1:
        t = t.float()
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def block_step(row_numel: int | None) -> int:
    """Elements per cache block: `BLOCK_NUMEL`, rounded down to whole rows (at least one)."""
    return BLOCK_NUMEL if row_numel is None else max(1, BLOCK_NUMEL // row_numel) * row_numel


def _scratch(key: str, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """A reusable buffer of this thread (worker threads must not share one)."""
    cache = _SCRATCH.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buf = cache.get((key, dtype, device))
    if buf is None or buf.numel() < numel:
        buf = cache[(key, dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def sum_models(deltas: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i d_i`` of ``[N, n]`` task vectors, added in order (into ``out`` if given)."""
    if out is None:
        out = torch.empty_like(deltas[0])
    if deltas.shape[0] == 1:
        return out.copy_(deltas[0])
    torch.add(deltas[0], deltas[1], out=out)
    for d in deltas[2:]:
        out += d
    return out


def chunk_stats(anchor: torch.Tensor, models: Sequence[torch.Tensor], dtype: torch.dtype,
                row_numel: int | None = None, total: torch.Tensor | None = None,
                ignore_nonfinite: bool = False, with_gram: bool = True) -> torch.Tensor | None:
    """``gram(task_vectors(...))`` of a chunk, block by block so that the task vectors stay in
    cache; if ``total`` is given, it receives ``sum_i d_i`` (what the output needs).

    ``ignore_nonfinite`` leaves NaN/Inf elements out of the Gram matrix (not out of ``total``).
    Blocks hold whole rows when ``row_numel`` is given. ``with_gram=False`` only fills ``total``.
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
    g64 = _scratch("gram64", (n_models * width,), torch.float64, dev)
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
            g += gram(d, buffer=g64)
    if not with_gram:
        return None
    if row_numel is not None:
        return torch.cat(rows) if rows else torch.zeros((0, n_models, n_models),
                                                        dtype=torch.float64, device=dev)
    return g


def combine(anchor: torch.Tensor, total: torch.Tensor, scale: torch.Tensor | float,
            out: torch.Tensor, row_numel: int | None = None) -> torch.Tensor:
    """``out = w0 + scale * total`` in ``total``'s dtype, rounded once into ``out``'s dtype.

    With ``total = sum_i d_i`` and ``scale = t / N`` this is `stock.interpolate`. ``scale`` is
    a scalar, or one value per row. One dtype per kernel: mixed-dtype kernels are ~2x slower.
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
    ``sum_i d_i`` only ever exists for one cache block: `chunk_stats` (sum only), then
    `combine`, fused (one pass over the inputs)."""
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


def weighted_mean(models: Sequence[torch.Tensor], out_dtype: torch.dtype,
                  compute_dtype: torch.dtype = torch.float32,
                  weights: Sequence[float] | None = None, normalize: bool = True) -> torch.Tensor:
    """Plain mean of flat chunks (``weights=None``), or ``sum_i weights[i] models[i]``, divided
    by ``sum(weights)`` if ``normalize`` (mergekit's ``linear``)."""
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
