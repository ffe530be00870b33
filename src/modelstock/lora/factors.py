"""Model Stock's statistics and output in factor space: pure functions on LoRA factors, no I/O.

For one module with deltas ``dW_i = s_i L_i R_i`` (``L_i`` ``[rows, r_i]``, ``R_i``
``[r_i, cols]``, in the base weight's layout: `LoraModule.left_right`)::

    <dW_i, dW_j>            = s_i s_j sum((L_i^T L_j) * (R_i R_j^T))
    <dW_i[k], dW_j[k]>      = s_i s_j L_i[k] (R_i R_j^T) L_j[k]^T        (row k of the weight)

in float64, in ``O(K^2 (rows + cols))`` time and ``O(K (rows + cols))`` memory for
``K = sum_i r_i``: the ``rows x cols`` matrix is never formed. The ratio ``t`` then comes from
these Gram matrices exactly as for dense weights (`modelstock.stock`), and the merge
``t/N sum_i dW_i`` is again a product of factors: ``L = [c s_1 L_1, ..., c s_N L_N]`` (columns,
``c = t/N``, one value per row of ``L`` for ``granularity="row"``) and ``R = [R_1; ...; R_N]``
(rows), of rank ``K``. `compress` returns its best rank-``R`` approximation from the QR
factors of ``L`` and ``R^T`` and the SVD of the small ``K x K`` core.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adapter import LoraModule


def _present(modules: Sequence[LoraModule | None]) -> list[int]:
    return [i for i, m in enumerate(modules) if m is not None]


def _stacked(modules: Sequence[LoraModule | None], idx: Sequence[int]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L = [L_i]`` (columns), ``R = [R_i]`` (rows), the owner of each of the K columns
    (position in ``idx``), and the scalings, all float64."""
    lefts, rights, owner = [], [], []
    for k, i in enumerate(idx):
        left, right = modules[i].left_right(torch.float64)
        lefts.append(left)
        rights.append(right)
        owner += [k] * left.shape[1]
    scal = torch.tensor([modules[i].scaling for i in idx], dtype=torch.float64)
    return (torch.cat(lefts, 1), torch.cat(rights, 0), torch.tensor(owner, dtype=torch.long),
            scal)


def factor_gram(modules: Sequence[LoraModule | None], row: bool = False) -> torch.Tensor:
    """Float64 Gram matrix ``<dW_i, dW_j>`` of one module's deltas across N adapters (None: the
    adapter does not adapt this module, a zero delta), ``[N, N]``; with ``row``, one per row of
    the base weight, ``[rows, N, N]``. Equal to `modelstock.stock.gram` of the dense deltas."""
    n = len(modules)
    idx = _present(modules)
    if not idx:
        raise ValueError("no adapter has this module")
    first = modules[idx[0]]
    rows = first.shape[0]
    left, right, owner, scal = _stacked(modules, idx)
    p = len(idx)
    onehot = torch.zeros((owner.numel(), p), dtype=torch.float64)
    onehot[torch.arange(owner.numel()), owner] = 1.0
    rrt = right @ right.T  # [K, K]: R_i R_j^T blocks
    if row:
        g = torch.empty((rows, p, p), dtype=torch.float64)
        for k in range(p):
            cols = owner == k
            t = left[:, cols] @ rrt[cols]  # [rows, K]: L_i[k] (R_i R_j^T), for every j
            g[:, k, :] = (t * left) @ onehot
    else:
        g = onehot.T @ ((left.T @ left) * rrt) @ onehot
    g = g * (scal[:, None] * scal[None, :])
    full = torch.zeros((*g.shape[:-2], n, n), dtype=torch.float64)
    ii = torch.tensor(idx)
    full[..., ii[:, None], ii[None, :]] = g
    return full


def merged_factors(modules: Sequence[LoraModule | None], t: torch.Tensor | float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT factors ``(B, A)`` of ``t/N sum_i dW_i`` with scaling 1: ``A`` stacks the ``A_i``
    (rows), ``B`` concatenates ``c s_i B_i`` (columns), ``c = t/N``. A ``t`` per row of the
    base weight scales the rows of ``B`` (or, for a transposed module, the columns of ``A``).
    Each value is rounded once to ``dtype``."""
    n = len(modules)
    t = torch.as_tensor(t, dtype=torch.float64)
    c = t / n
    bs, as_ = [], []
    for m in modules:
        if m is None:
            continue
        a, b = m.A, m.B.to(torch.float64)
        if c.ndim == 0:
            b = b * (float(c) * m.scaling)
        elif m.transposed:  # rows of the weight are columns of A
            b = b * m.scaling
            a = a.to(torch.float64) * c[None, :]
        else:
            b = b * (c[:, None] * m.scaling)
        bs.append(b.to(dtype))
        as_.append(a.to(dtype))  # a copy of A, unless scaled (or dtype is narrower)
    return torch.cat(bs, 1), torch.cat(as_, 0)


@dataclass
class Compressed:
    """A rank-``rank`` approximation ``B @ A`` of a factored matrix, its singular values and
    the relative Frobenius error ``|M - B A| / |M|`` (0 for ``M = 0``)."""

    B: torch.Tensor
    A: torch.Tensor
    singular_values: torch.Tensor
    rel_error: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def compress(b: torch.Tensor, a: torch.Tensor, rank: int,
             dtype: torch.dtype | None = None) -> Compressed:
    """The best rank-``rank`` approximation (Eckart-Young, in Frobenius norm) of ``M = b @ a``
    (``b`` ``[out, K]``, ``a`` ``[K, in]``) without forming ``M``: ``b = Q_b R_b``,
    ``a^T = Q_a R_a``, ``M = Q_b (R_b R_a^T) Q_a^T``, and the SVD of the ``K x K`` core
    ``U S V^T`` gives ``B = Q_b U_r S_r^(1/2)``, ``A = S_r^(1/2) V_r^T Q_a^T``. Float64
    throughout, rounded once to ``dtype`` (default: ``a``'s). Exactly ``rank`` components are
    returned: with ``K < rank`` the factors are kept as they are, padded with zeros."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    dtype = dtype or a.dtype
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    qb, rb = torch.linalg.qr(b64)
    qa, ra = torch.linalg.qr(a64.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    total = float(torch.linalg.vector_norm(s))
    k = b.shape[1]
    if k <= rank:
        bb = torch.zeros((b.shape[0], rank), dtype=torch.float64)
        aa = torch.zeros((rank, a.shape[1]), dtype=torch.float64)
        bb[:, :k], aa[:k] = b64, a64
        return Compressed(bb.to(dtype), aa.to(dtype), s, 0.0)
    keep = min(rank, s.numel())
    root = torch.sqrt(s[:keep])
    bb = torch.zeros((b.shape[0], rank), dtype=torch.float64)
    aa = torch.zeros((rank, a.shape[1]), dtype=torch.float64)
    bb[:, :keep] = qb @ (u[:, :keep] * root)
    aa[:keep] = (root[:, None] * vh[:keep]) @ qa.T
    rest = float(torch.linalg.vector_norm(s[keep:]))
    err = rest / total if total > 0 else 0.0
    return Compressed(bb.to(dtype), aa.to(dtype), s, err if math.isfinite(err) else 0.0)
