"""Per-tensor merge rules: small values the engine applies, never branches inside it.

A rule that *interpolates* writes ``w0 + t (mean_i(w_i) - w0)``; it has a ``finalize`` step that
turns the tensor's statistics into ``t`` (one value, or one per row). Only Model Stock has
statistics (the Gram matrix of the task vectors, which adds across chunks and processes), so only
its tensors cost the engine a statistics pass; a fixed ratio (WiSE-FT, a uniform soup) is a
single pass. The other rules take a tensor whole (`Mean`, `Copy`) or borrow another tensor's
rule and coefficients (`Follow`, for BatchNorm running statistics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import stock


@dataclass(frozen=True)
class ModelStock:
    """The paper's rule: ``t = N cos / (1 + (N-1) cos)`` from the mean pairwise cosine."""

    clamp: bool = True
    name: ClassVar[str] = "model_stock"
    interpolates: ClassVar[bool] = True
    has_stats: ClassVar[bool] = True

    def finalize(self, gram: torch.Tensor, n: int) -> torch.Tensor:
        """``t`` from a Gram matrix ``[N, N]`` (or ``[R, N, N]``, one per row)."""
        return self.ratio(stock.mean_pairwise_cos(gram), n)

    def ratio(self, cos: torch.Tensor, n: int) -> torch.Tensor:
        """``t`` from the mean pairwise cosine (however it was reduced)."""
        return stock.stock_ratio(cos, n, self.clamp)

    def note(self, gram: torch.Tensor, n: int) -> str | None:
        """What the report should say about an unusual ratio."""
        return self.note_for_cos(stock.mean_pairwise_cos(gram), n)

    def note_for_cos(self, cos: torch.Tensor, n: int) -> str | None:
        if not self.clamp and bool(stock.is_singular(cos, n).any()):
            return "cos at the formula's pole 1+(N-1)cos=0: t set to 0 (anchor)"
        return None


@dataclass(frozen=True)
class FixedRatio:
    """A ratio known in advance: WiSE-FT's ``alpha``, or 1 for a uniform soup (``w0 + mean_i
    (w_i - w0)`` is the plain mean, computed around the anchor)."""

    t: float
    name: str = "wise_ft"
    interpolates: ClassVar[bool] = True
    has_stats: ClassVar[bool] = False

    def finalize(self, gram: torch.Tensor | None, n: int) -> torch.Tensor:
        return torch.tensor(self.t, dtype=torch.float64)

    def note(self, gram: torch.Tensor | None, n: int) -> str | None:
        return None


@dataclass(frozen=True)
class Mean:
    """``sum_i weights[i] w_i`` (divided by ``sum(weights)`` if ``normalize``), or the plain mean
    with ``weights=None``; no anchor arithmetic (mergekit's ``linear``, tensors without anchor)."""

    weights: tuple[float, ...] | None = None
    normalize: bool = True
    name: str = "average"
    interpolates: ClassVar[bool] = False
    has_stats: ClassVar[bool] = False


@dataclass(frozen=True)
class Copy:
    """The tensor as one input holds it: the ``anchor``'s (``--keep-anchor``; an integer buffer
    only the anchor has) or the ``first`` fine-tune's (integer and bool tensors)."""

    source: str = "first"
    name: str = "copy"
    interpolates: ClassVar[bool] = False
    has_stats: ClassVar[bool] = False


@dataclass(frozen=True)
class Follow:
    """Take another tensor's rule and coefficients (a BatchNorm running statistic follows its
    layer's ``weight``): what was computed for ``owner`` is applied to this tensor's values."""

    owner: str
    name: ClassVar[str] = "follow"
    interpolates: ClassVar[bool] = False
    has_stats: ClassVar[bool] = False


Rule = ModelStock | FixedRatio | Mean | Copy | Follow
