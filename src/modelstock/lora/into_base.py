"""A merged LoRA written into its base model: ``w0 + delta`` for every adapted module, streamed
through the ordinary engine and writer (sharded safetensors, the base's config and tokenizer,
atomic and durable output), one chunk of rows of ``B @ A`` at a time."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..api import merge_checkpoints
from ..checkpoint import Reader, open_checkpoint
from ..errors import ModelStockError
from ..output import check_output_path
from ..report import MergeReport
from ..safetensors_io import TensorInfo
from ..ties import INPUT_EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING
from .adapter import Factors, read_lora_adapter
from .merge import LoraMerge, base_key, oriented, tied_output


class MergedIntoBase:
    """A reader over the base model that presents each adapted weight as ``w0 + delta`` (in
    float64, so that the output is rounded once) and each dense tensor the merge produced
    (``modules_to_save``, biases) as merged."""

    def __init__(self, base: Reader, merged: LoraMerge | None = None, *,
                 modules: Mapping[str, Factors] | None = None,
                 dense: Mapping[str, torch.Tensor] | None = None) -> None:
        """``merged``, or ``modules`` (factors with ``delta = B @ A``, scaling 1) and
        ``dense`` tensors keyed as the adapter stores them."""
        if merged is not None:
            modules, dense = merged.modules, merged.dense
        self.path, self._base = f"{base.path} + merged LoRA", base
        self._modules: dict[str, Factors] = {}
        for m in (modules or {}).values():
            name = f"{m.name}.weight"
            if name not in base.infos:
                why = ("; it is tied to the input embedding there, and adding the delta "
                       "would change the embedding too: write the merged adapter instead"
                       if tied_output(base, m.name) is not None else "")
                raise ModelStockError(f"the base has no weight for this adapted module{why}",
                                      base.path, name)
            if tuple(base.infos[name].shape) != tuple(m.shape):
                raise ModelStockError(f"the adapter's delta is {list(m.shape)}, the base's "
                                      f"weight {list(base.infos[name].shape)}", base.path, name)
            self._modules[name] = m
        self._dense = {}
        for key, value in (dense or {}).items():
            if ".original_module." in key:  # PEFT's copy of the base's own value
                continue
            name = base_key(key)
            if name not in base.infos:
                raise ModelStockError("the adapters save this tensor but the base lacks it",
                                      base.path, name)
            self._dense[name] = value
        self.infos = dict(base.infos)
        for name in self._modules:
            self.infos[name] = TensorInfo(base.infos[name].shape, torch.float64)
        for name, value in self._dense.items():  # a resized embedding keeps its own rows
            self.infos[name] = TensorInfo(tuple(value.shape), torch.float64)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        # A dense tensor is the merge's value; for an adapted layer PEFT saves whole (an
        # embedding's base_layer) it is the frozen base weight, under the delta like any other.
        chunk = self._dense[name].reshape(-1)[start:stop].double() if name in self._dense \
            else self._base.read(name, start, stop)
        m = self._modules.get(name)
        if m is None:
            return chunk
        stop = self.infos[name].numel if stop is None else stop
        width = m.shape[1]
        r0, r1 = start // width, math.ceil(stop / width)
        a, b = m.A.double(), m.B.double()
        rows = (a.T[r0:r1] @ b.T) if m.transposed else (b[r0:r1] @ a)  # delta rows r0..r1
        return chunk.double() + rows.reshape(-1)[start - r0 * width : stop - r0 * width]

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        self._base.release(name, start, stop)

    def close(self) -> None:
        self._base.close()  # closing twice is harmless: readers let go once


def apply_adapter(base: Reader, adapter: str | os.PathLike,
                  trust_pickle: bool = False) -> MergedIntoBase:
    """The base model with one LoRA adapter applied (what PEFT's ``merge_and_unload`` gives,
    and mergekit's ``model+lora`` means), as a reader: ``w0 + s B A`` per adapted module, the
    adapter's saved tensors (``modules_to_save``) in place of the base's."""
    ad = read_lora_adapter(adapter, trust_pickle)
    modules = {k: dataclasses.replace(m, B=m.B.double() * m.scaling, A=m.A.double(),
                                      scaling=1.0)
               for k, m in oriented(ad.modules, base, ad.path).items()}
    dense = dict(ad.dense)
    embeds = [v for k, v in dense.items() if base_key(k).endswith(INPUT_EMBEDDING_SUFFIXES)]
    for key in [k for k in dense if base_key(k) == OUTPUT_EMBEDDING]:
        # A tied base stores no lm_head; PEFT saves the tied copy of the embedding beside it.
        if OUTPUT_EMBEDDING not in base.infos and any(
                e.shape == dense[key].shape and torch.equal(e, dense[key]) for e in embeds):
            del dense[key]
    reader = MergedIntoBase(base, modules=modules, dense=dense)
    reader.path = f"{base.path}+{adapter}"
    return reader


def merge_into_base(merged: LoraMerge, base: str | os.PathLike, out: str | os.PathLike, *,
                    dtype: torch.dtype | None = None, force: bool = False,
                    trust_pickle: bool = False, progress: bool = False,
                    **kwargs) -> MergeReport:
    """Write the full model ``base + merged delta`` to ``out`` (a Hugging Face directory, or one
    ``.safetensors`` file), as `merge_checkpoints` writes a merge: every tensor in the base's
    dtype (or ``dtype``), the base's config and tokenizer beside it. The report is the LoRA
    merge's (one record per adapted module, with its ``t``)."""
    check_output_path(Path(out), merged.sources, force)  # never over an adapter
    reader = MergedIntoBase(open_checkpoint(base, trust_pickle), merged)

    def annotate(report: MergeReport) -> None:
        kept = [x for x in report.layers if x.name not in reader._modules
                and x.name not in reader._dense]
        report.method, report.weights, report.normalize = "model-stock", None, None
        report.n_models, report.models = merged.report.n_models, list(merged.sources)
        report.granularity, report.clamp = merged.report.granularity, merged.report.clamp
        report.layers = [*merged.report.layers, *kept]
        report.warnings = [*merged.report.warnings, *report.warnings]

    try:
        return merge_checkpoints(base, [reader], out, method="linear", weights=(1.0,),
                                 dtype=dtype, force=force, trust_pickle=trust_pickle,
                                 progress=progress, annotate=annotate, **kwargs)
    finally:
        reader.close()


def is_adapter(source: object) -> bool:
    """Whether ``source`` is a PEFT adapter directory (it has ``adapter_config.json``)."""
    return isinstance(source, str | os.PathLike) and os.path.isfile(
        os.path.join(source, "adapter_config.json"))


def adapters_and_base(anchor: object, models: Sequence[object]
                      ) -> tuple[object | None, list[object]] | None:
    """For the command line: ``(base or None, adapters)`` when the models are adapters (the
    anchor is the base model, or the first adapter when no base is given); None when they are
    not; an error for a mix."""
    flags = [is_adapter(m) for m in models]
    if not any(flags) and not is_adapter(anchor):
        return None
    if not all(flags):
        which = next(m for m, f in zip(models, flags, strict=True) if not f)
        raise ModelStockError("is not a LoRA adapter directory, but other inputs are: merge "
                              "adapters with adapters (and an optional base model first)", which)
    if is_adapter(anchor):
        return None, [anchor, *models]
    return anchor, list(models)
