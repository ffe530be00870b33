"""The Model Stock math: pure functions on tensors, no I/O.

For one layer with anchor ``w0`` and fine-tunes ``w1..wN`` (Jang, Yun, Han, ECCV 2024)::

    d_i = w_i - w0
    cos = mean over pairs i<j of <d_i, d_j> / (|d_i| |d_j|)
    t   = N cos / (1 + (N - 1) cos)
    w_H = w0 + t (mean_i(w_i) - w0)

Task vectors are formed in a float compute dtype (float32, or float64 for float64 inputs) and
their dot products accumulated in float64. A pair with a zero task vector counts as cos = 0.
These functions work on flat tensors, so the same code serves whole tensors, chunks, rows, whole
models, merging after and during training. The engine's cache-blocked (and C) versions of the
same operations are in `modelstock._blocks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import ModelStockError

# |1 + (N-1) cos| below this is treated as the formula's pole (see `stock_ratio`).
SINGULAR_EPS = 1e-6
# Gram matrices are summed over blocks of this many elements, so that a float64 copy of the
# block's task vectors stays in cache.
BLOCK_NUMEL = 1 << 18


def compute_dtype_for(*dtypes: torch.dtype | None) -> torch.dtype:
    """float32, unless an input is float64 (then float64: never compute below the inputs)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def task_vectors(anchor: torch.Tensor, models: Sequence[torch.Tensor],
                 dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
                 anchor_buf: torch.Tensor | None = None) -> torch.Tensor:
    """``w_i - w0`` for flat chunks of equal length, as an ``[N, n]`` tensor of ``dtype``.

    Inputs are converted exactly (16-bit floats widen without rounding), so for 16-bit weights
    the task vectors themselves are exact in float32. ``out`` and ``anchor_buf`` (``n``
    elements of ``dtype``, for the converted anchor) are optional reused buffers.
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


def gram(deltas: torch.Tensor, row_numel: int | None = None,
         buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 Gram matrix ``<d_i, d_j>`` of ``[N, n]`` task vectors.

    Products and sums are taken in float64 (a product of two float32 values is exact there),
    `BLOCK_NUMEL` elements at a time (in ``buffer``, a reused float64 tensor, if given). With
    ``row_numel`` the chunk is read as rows of that many elements and one ``[N, N]`` matrix is
    returned per row: ``[R, N, N]``.
    """
    n_models, numel = deltas.shape
    if row_numel is not None:
        rows = deltas.to(torch.float64).view(n_models, -1, row_numel).transpose(0, 1)
        return rows @ rows.transpose(1, 2)
    g = torch.zeros((n_models, n_models), dtype=torch.float64, device=deltas.device)
    for start in range(0, numel, BLOCK_NUMEL):
        block = deltas[:, start : start + BLOCK_NUMEL]
        if block.dtype != torch.float64:
            block = (block.to(torch.float64) if buffer is None
                     else buffer[: block.numel()].view(block.shape).copy_(block))
        g += block @ block.T
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


def _require_pairs(n: int) -> None:
    if n < 2:
        raise ModelStockError(f"Model Stock needs at least 2 fine-tuned models (the ratio "
                              f"comes from the angle between two task vectors), got {n}")


def mean_pairwise_cos(g: torch.Tensor) -> torch.Tensor:
    """Mean over pairs ``i < j`` of the cosine between task vectors (the paper's rule for N > 2)."""
    _require_pairs(g.shape[-1])
    return pair_values(pairwise_cos(g)).mean(dim=-1)


def mean_cos_from_units(unit_sum_sq: torch.Tensor, nonzero: torch.Tensor | int,
                        n: int) -> torch.Tensor:
    """The same mean from ``|sum_i u_i|^2``, where ``u_i = d_i / |d_i|`` (0 for a zero vector)
    and ``nonzero`` counts the nonzero ``d_i``: ``sum_{i<j} cos_ij = (|sum u_i|^2 - nonzero)/2``.
    What a distributed merge can compute without gathering any replica's weights."""
    _require_pairs(n)
    pairs = n * (n - 1) / 2
    total = (unit_sum_sq.to(torch.float64) - torch.as_tensor(nonzero, dtype=torch.float64)) / 2
    return (total / pairs).clamp(-1.0, 1.0)


def stock_ratio(cos: torch.Tensor | float, n: int, clamp: bool = True) -> torch.Tensor:
    """Interpolation ratio ``t = N cos / (1 + (N-1) cos)``, always finite.

    ``clamp=True`` (the default) limits ``t`` to ``[0, 1]``: a layer whose task vectors do not
    agree (cos <= 0) falls back to the anchor. ``clamp=False`` keeps the raw formula, except at
    its pole ``1 + (N-1) cos = 0`` (cos = -1/(N-1)), where ``t`` is set to 0 instead of +-inf.
    """
    _require_pairs(n)
    cos = torch.as_tensor(cos, dtype=torch.float64)
    den = 1.0 + (n - 1) * cos
    singular = den.abs() < SINGULAR_EPS
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, den))
    return t.clamp(0.0, 1.0) if clamp else t


def is_singular(cos: torch.Tensor | float, n: int) -> torch.Tensor:
    """Where `stock_ratio` hit the formula's pole and returned 0."""
    cos = torch.as_tensor(cos, dtype=torch.float64)
    return (1.0 + (n - 1) * cos).abs() < SINGULAR_EPS


def interpolate(anchor: torch.Tensor, deltas: torch.Tensor, t: torch.Tensor | float,
                out_dtype: torch.dtype, row_numel: int | None = None) -> torch.Tensor:
    """``w0 + t mean_i(d_i)`` (= ``w0 + t (mean_i(w_i) - w0)``) for a flat chunk of ``[N, n]``
    task vectors, in the task vectors' dtype, rounded once to ``out_dtype``; ``t`` is a scalar
    or one value per row of ``row_numel`` elements."""
    t = torch.as_tensor(t, dtype=torch.float64)
    scale = (t / deltas.shape[0]).to(deltas.dtype).to(deltas.device)
    total = deltas[0].clone()
    for d in deltas[1:]:  # in order: the engine's sums round the same way
        total += d
    out = anchor.to(deltas.dtype)
    if scale.ndim:
        out = out.view(-1, row_numel).addcmul(total.view(-1, row_numel), scale.unsqueeze(1))
    else:
        out = out.add(total, alpha=float(scale))
    return out.reshape(-1).to(out_dtype)


def model_stock(anchor: torch.Tensor, models: Sequence[torch.Tensor],
                clamp: bool = True) -> torch.Tensor:
    """Model Stock merge of one whole tensor (for small, in-memory use); needs N >= 2."""
    _require_pairs(len(models))
    dt = compute_dtype_for(anchor.dtype, *(m.dtype for m in models))
    deltas = task_vectors(anchor.reshape(-1), [m.reshape(-1) for m in models], dt)
    t = stock_ratio(mean_pairwise_cos(gram(deltas)), len(models), clamp)
    return interpolate(anchor.reshape(-1), deltas, t, anchor.dtype).view(anchor.shape)
