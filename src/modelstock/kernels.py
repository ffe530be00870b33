"""Fused CPU loops for the hot path of a merge (``_kernels.c``), called through ctypes.

The C loops do in one pass per cache block what `modelstock.stock` does in about ten torch
calls, to the same rounding (see ``_kernels.c``), and ctypes releases the GIL while they run.
They are built at install time where a C compiler is present; without them, or with
``MODELSTOCK_KERNELS=0`` in the environment, every function here returns False and the caller
takes its pure-torch path. They only take float32, bfloat16 or float16 weights of one dtype,
contiguous on the CPU, with float32 arithmetic; anything else is left to torch.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Sequence

import torch

MAX_MODELS = 16  # as in _kernels.c
VERSION = 3  # _kernels.c's ms_version(): an older build is left unused
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ptr, _i64, _f64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int


def _load() -> ctypes.CDLL | None:
    """The built ``modelstock._kernels`` library, or None (not built, or turned off)."""
    if os.environ.get("MODELSTOCK_KERNELS", "1") == "0":
        return None
    spec = importlib.util.find_spec("modelstock._kernels")
    if spec is None or spec.origin is None:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    version = getattr(lib, "ms_version", None)  # builds before the version check lack it
    if version is None or version() != VERSION:
        return None
    lib.ms_stats.argtypes = [_ptr, ctypes.POINTER(_ptr), _int, _i64, _int, _ptr, _ptr]
    lib.ms_combine.argtypes = [_ptr, _ptr, _f64, _ptr, _i64, _int, _int]
    lib.ms_output.argtypes = [_ptr, ctypes.POINTER(_ptr), _int, _i64, _int, _f64, _ptr, _int]
    return lib


_LIB = _load()


def available() -> bool:
    """Whether the fused loops are built and switched on."""
    return _LIB is not None


def _fits(tensors: Sequence[torch.Tensor | None], dtypes: Sequence[torch.dtype]) -> bool:
    """Contiguous CPU tensors (None allowed) of the given dtypes, in order."""
    return all(t is None or (t.dtype == d and t.device.type == "cpu" and t.is_contiguous())
               for t, d in zip(tensors, dtypes, strict=True))


def _weights(anchor: torch.Tensor, models: Sequence[torch.Tensor]):
    """Pointers to the models' data for the C loops, or None if the loops cannot take these
    weights (not built, another dtype, not contiguous on the CPU, lengths differ)."""
    dt = anchor.dtype
    if _LIB is None or dt not in _CODES or not 1 <= len(models) <= MAX_MODELS:
        return None
    if not _fits([anchor, *models], [dt] * (len(models) + 1)):
        return None
    if any(m.numel() != anchor.numel() for m in models):
        return None
    return (_ptr * len(models))(*(m.data_ptr() for m in models))


def stats(anchor: torch.Tensor, models: Sequence[torch.Tensor], total: torch.Tensor | None,
          gram: torch.Tensor | None) -> bool:
    """``total = sum_i (w_i - w0)`` (float32) and ``gram += <d_i, d_j>`` (float64, ``[N, N]``)
    for flat chunks, each optional; False, with nothing written, if the loops cannot take it."""
    ptrs = _weights(anchor, models)
    if ptrs is None or not _fits([total, gram], [torch.float32, torch.float64]):
        return False
    if gram is not None and gram.shape != (len(models),) * 2:
        return False
    if total is not None and total.numel() != anchor.numel():
        return False
    rc = _LIB.ms_stats(anchor.data_ptr(), ptrs, len(models), anchor.numel(),
                       _CODES[anchor.dtype], None if total is None else total.data_ptr(),
                       None if gram is None else gram.data_ptr())
    return rc == 0


def combine(anchor: torch.Tensor, total: torch.Tensor, scale: float, out: torch.Tensor) -> bool:
    """``out = w0 + scale * total`` rounded once to float32, then to ``out``'s dtype."""
    if _LIB is None or anchor.dtype not in _CODES or out.dtype not in _CODES:
        return False
    if not _fits([anchor, total, out], [anchor.dtype, torch.float32, out.dtype]):
        return False
    if not anchor.numel() == total.numel() == out.numel():
        return False
    rc = _LIB.ms_combine(anchor.data_ptr(), total.data_ptr(), scale, out.data_ptr(),
                         anchor.numel(), _CODES[anchor.dtype], _CODES[out.dtype])
    return rc == 0


def output(anchor: torch.Tensor, models: Sequence[torch.Tensor], scale: float,
           out: torch.Tensor) -> bool:
    """``out = w0 + scale * sum_i (w_i - w0)`` straight from the weights (`stats` + `combine`
    for one cache block at a time)."""
    ptrs = _weights(anchor, models)
    if ptrs is None or out.dtype not in _CODES or not _fits([out], [out.dtype]):
        return False
    if out.numel() != anchor.numel():
        return False
    rc = _LIB.ms_output(anchor.data_ptr(), ptrs, len(models), anchor.numel(),
                        _CODES[anchor.dtype], scale, out.data_ptr(), _CODES[out.dtype])
    return rc == 0
