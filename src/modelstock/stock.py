"""The Model Stock math: pure functions on tensors, no I/O.

For one layer with anchor ``w0`` and fine-tunes ``w1..wN`` (Jang, Yun, Han, ECCV 2024)::

    d_i = w_i - w0
    cos = mean over pairs i<j of <d_i, d_j> / (|d_i| |d_j|)
    t   = N cos / (1 + (N - 1) cos)
    w_H = w0 + t (mean_i(w_i) - w0)

Task vectors are formed in a float compute dtype (float32, or float64 for float64 inputs) and
their dot products in float64. Everything here works on flat chunks so that the same code
serves whole tensors, chunks of huge tensors, rows (``granularity="row"``) and whole models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Elements per inner block: small enough that the float64 copy of N deltas stays in cache.
BLOCK_NUMEL = 1 << 18
# |1 + (N-1) cos| below this is treated as the formula's pole (see `stock_ratio`).
SINGULAR_EPS = 1e-6


def compute_dtype_for(*dtypes: torch.dtype | None) -> torch.dtype:
    """float32, unless an input is float64 (then float64: never compute below the inputs)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def task_vectors(
    anchor: torch.Tensor, models: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Stack ``w_i - w0`` for flat chunks of equal length into an ``[N, n]`` tensor of ``dtype``."""
    w0 = anchor.to(dtype)
    out = torch.empty((len(models), anchor.numel()), dtype=dtype, device=anchor.device)
    for i, w in enumerate(models):
        torch.sub(w.to(dtype), w0, out=out[i])
    return out


def gram(deltas: torch.Tensor, row_numel: int | None = None) -> torch.Tensor:
    """Float64 Gram matrix ``<d_i, d_j>`` of ``[N, n]`` task vectors.

    With ``row_numel`` the chunk is read as rows of that many elements and one ``[N, N]`` matrix
    is returned per row (shape ``[R, N, N]``). Products are taken in float64, block by block.
    """
    n_models, numel = deltas.shape
    if row_numel is None:
        g = torch.zeros((n_models, n_models), dtype=torch.float64, device=deltas.device)
        for start in range(0, numel, BLOCK_NUMEL):
            block = deltas[:, start : start + BLOCK_NUMEL].to(torch.float64)
            g += block @ block.T
        return g
    rows = numel // row_numel
    g = torch.zeros((rows, n_models, n_models), dtype=torch.float64, device=deltas.device)
    rows_per_block = max(1, BLOCK_NUMEL // max(row_numel, 1))
    for r in range(0, rows, rows_per_block):
        r_end = min(rows, r + rows_per_block)
        block = deltas[:, r * row_numel : r_end * row_numel].to(torch.float64)
        block = block.reshape(n_models, r_end - r, row_numel).transpose(0, 1)
        g[r:r_end] = block @ block.transpose(1, 2)
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


def apply_ratio(
    anchor: torch.Tensor,
    deltas: torch.Tensor,
    t: torch.Tensor | float,
    out_dtype: torch.dtype,
    row_numel: int | None = None,
) -> torch.Tensor:
    """``w0 + t mean_i(d_i)`` (= ``w0 + t (mean_i(w_i) - w0)``) for a flat chunk.

    ``deltas`` is the ``[N, n]`` output of `task_vectors`; the arithmetic runs in its dtype.
    ``t`` is a scalar, or one value per row of ``row_numel`` elements. The result is cast to
    ``out_dtype`` once, at the very end.
    """
    w0 = anchor.to(deltas.dtype)
    total = deltas.sum(dim=0)
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.ndim == 0:
        out = torch.add(w0, total, alpha=float(t) / deltas.shape[0])
    else:
        scale = (t / deltas.shape[0]).to(deltas.dtype).to(deltas.device).unsqueeze(1)
        out = torch.addcmul(w0.view(-1, row_numel), total.view(-1, row_numel), scale).view(-1)
    return out.to(out_dtype)


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
