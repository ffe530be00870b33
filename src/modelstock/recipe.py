"""What to compute (`Recipe`) apart from how to run it (`Execution`).

A recipe decides the output: two merges with equal recipes write the same bits whatever their
execution (chunk size, threads, device, write mode). The recipe is what the output records about
itself (`Recipe.to_dict`); `MergeOptions` is both, from flat keywords, for the public API.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .errors import ModelStockError

METHODS = ("model-stock", "uniform", "wise-ft", "linear")
GRANULARITIES = ("tensor", "row", "model")
# What BatchNorm running statistics do: take the coefficient of their own layer, stay the
# anchor's, or average the fine-tunes' (see `plan.buffer_owner`).
BUFFER_POLICIES = ("follow", "anchor", "average")
DEFAULT_CHUNK_NUMEL = 1 << 24  # 64 MiB of float32 per input per chunk


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.bfloat16`` -> ``"bfloat16"`` (None stays None): how dtypes are written out."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Recipe:
    """What a merge computes.

    ``method``: ``model-stock`` (the paper), ``uniform`` (a uniform soup: the plain mean of the
    fine-tunes), ``wise-ft`` (``w0 + alpha (mean(w_i) - w0)``) or ``linear`` (``sum_i weights[i]
    w_i``, divided by ``sum(weights)`` if ``normalize``: mergekit's linear; the anchor only gives
    the layout). ``granularity``: one Model Stock ratio per tensor, per output row, or for the
    whole model. ``clamp`` limits the ratio to [0, 1]. ``average`` and ``keep_anchor`` are glob
    patterns over tensor names that force those rules. ``buffers``: BatchNorm running statistics
    ``follow`` the coefficient of their own layer (Model Stock: the layer's t; WiSE-FT: alpha;
    linear: its weights), or stay the ``anchor``'s, or ``average`` the fine-tunes'.
    ``dtype``: output dtype of floating tensors (default: the anchor's). ``compute_dtype=
    torch.float64`` computes in float64 even for lower-precision inputs (never below float32).
    ``allow_nonfinite`` merges NaN/Inf elementwise instead of refusing them.
    ``tokenizer_source``: the output vocabulary when the inputs' differ (fine-tunes that added
    tokens): ``union`` of all, the anchor's (``base``), or one model's, named as given; rows
    are aligned by token (`modelstock.vocab`). ``pad_to_multiple_of`` pads the embedding rows
    (default: as the inputs were). ``chat_template``: ``auto``, ``chatml`` or a Jinja template
    for the output's tokenizer (default: the tokenizer source's).
    """

    method: str = "model-stock"
    granularity: str = "tensor"
    clamp: bool = True
    alpha: float | None = None
    weights: tuple[float, ...] | None = None
    normalize: bool = True
    average: tuple[str, ...] = ()
    keep_anchor: tuple[str, ...] = ()
    buffers: str = "follow"
    dtype: torch.dtype | None = None
    compute_dtype: torch.dtype | None = None
    allow_nonfinite: bool = False
    tokenizer_source: str = "union"
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ModelStockError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.granularity not in GRANULARITIES:
            raise ModelStockError(f"unknown granularity {self.granularity!r}; "
                                  f"choose from {GRANULARITIES}")
        if self.buffers not in BUFFER_POLICIES:
            raise ModelStockError(f"unknown buffer policy {self.buffers!r}; "
                                  f"choose from {BUFFER_POLICIES}")
        if (self.method == "wise-ft") != (self.alpha is not None):
            raise ModelStockError("alpha is required by, and only used by, method wise-ft")
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise ModelStockError(f"alpha must be a finite number, got {self.alpha}")
        if (self.method == "linear") != (self.weights is not None):
            raise ModelStockError("weights are required by, and only used by, method linear")
        object.__setattr__(self, "average", tuple(self.average))
        object.__setattr__(self, "keep_anchor", tuple(self.keep_anchor))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if not all(math.isfinite(w) for w in self.weights):
                raise ModelStockError(f"weights must be finite numbers, got {list(self.weights)}")
            if self.normalize and sum(self.weights) == 0:
                raise ModelStockError("weights sum to 0: cannot normalize (set normalize=False)")
        for key in ("dtype", "compute_dtype"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), torch.dtype):
                raise ModelStockError(f"{key} must be a torch dtype such as torch.bfloat16, "
                                      f"got {getattr(self, key)!r}")
        if self.compute_dtype not in (None, torch.float32, torch.float64):
            raise ModelStockError(f"compute dtype must be float32 or float64, "
                                  f"got {self.compute_dtype}")
        if self.dtype is not None and not self.dtype.is_floating_point:
            raise ModelStockError(f"--dtype must be a floating dtype, got {self.dtype}")
        if not isinstance(self.tokenizer_source, str) or not self.tokenizer_source:
            raise ModelStockError(f"tokenizer source must be 'union', 'base' or a model, got "
                                  f"{self.tokenizer_source!r}")
        if self.chat_template is not None:
            from .vocab import check_chat_template

            check_chat_template(self.chat_template)
        if self.pad_to_multiple_of is not None and (
                isinstance(self.pad_to_multiple_of, bool)
                or not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1):
            raise ModelStockError(f"pad_to_multiple_of must be a positive integer, got "
                                  f"{self.pad_to_multiple_of!r}")

    @property
    def min_models(self) -> int:
        """Model Stock's ratio needs a pair of task vectors; the other methods one model."""
        return 2 if self.method == "model-stock" else 1

    def to_dict(self) -> dict:
        """The recipe as JSON-ready values (what an output records about how it was made)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("dtype", "compute_dtype"):
            d[key] = dtype_name(d[key])
        for key in ("average", "keep_anchor", "weights"):
            d[key] = None if d[key] is None else list(d[key])
        if self.weights is None:
            del d["weights"], d["normalize"]
        return d


@dataclass(frozen=True)
class Execution:
    """How a merge runs; never changes the result. ``chunk_numel`` bounds memory (elements per
    input per chunk); ``threads``: CPU worker threads (default: one per core, at most 4)."""

    chunk_numel: int = DEFAULT_CHUNK_NUMEL
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_numel < 1:
            raise ModelStockError("chunk_numel must be positive")
        if self.threads is not None and self.threads < 1:
            raise ModelStockError("threads must be positive")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            raise ModelStockError(f"unknown device {self.device!r} (e.g. cpu, cuda, cuda:1)"
                                  ) from None
        if device.type == "meta":
            raise ModelStockError("device 'meta' holds no values to merge")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelStockError(f"device {self.device!r}: CUDA is not available to this "
                                  "torch build or machine")
        available = getattr(getattr(torch, device.type, None), "is_available", None)
        if device.type != "cpu" and callable(available) and not available():
            raise ModelStockError(f"device {self.device!r} is not available")


@dataclass(frozen=True)
class MergeOptions(Execution, Recipe):
    """A `Recipe` and an `Execution` from flat keywords: ``MergeOptions(method="wise-ft",
    alpha=0.5, chunk_numel=1 << 20)``. See those two classes for the fields."""

    def __post_init__(self) -> None:
        Recipe.__post_init__(self)
        Execution.__post_init__(self)

    @property
    def recipe(self) -> Recipe:
        return Recipe(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Recipe)})

    @property
    def execution(self) -> Execution:
        return Execution(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Execution)})

    @classmethod
    def of(cls, recipe: Recipe, execution: Execution | None = None) -> MergeOptions:
        """Join a recipe and an execution (default: `Execution()`)."""
        parts = [recipe, execution or Execution()]
        return cls(**{f.name: getattr(p, f.name) for p in parts for f in dataclasses.fields(p)})
