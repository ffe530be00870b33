"""``modelstock inspect`` for LoRA adapters: the factor-space measurements as an `Inspection`,
so that the dense checkpoints' renderers (`modelstock.render`, `modelstock.plots`: the terminal
tables, CSV, JSON, plots and HTML page) and findings (`modelstock.geometry.find_problems`) serve
adapters unchanged.

Each adapted module is one layer, named as in the merge report (the module's name) but kinded
as its base weight ``<module>.weight``; a dense tensor saved beside the factors
(``modules_to_save``, trained biases) is kinded by its base model name. ``anchor_norm`` is the
base weight's ``|w0|`` when a base is given (so ``rel = |dW_i| / |w0|``), absent without one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..checkpoint import Reader
from ..engine import chunk_ranges
from ..geometry import Finding, Inspection, LayerGeometry, find_problems, layer_kinds
from ..recipe import DEFAULT_CHUNK_NUMEL
from .merge import AdapterSource, BaseSource, _run, base_key


def _norm(reader: Reader, name: str) -> float:
    """``|w0|`` of one base tensor, streamed chunk by chunk, in float64."""
    numel = reader.infos[name].numel
    sq = 0.0
    for s, e in chunk_ranges(numel, DEFAULT_CHUNK_NUMEL):
        sq += float(torch.linalg.vector_norm(reader.read(name, s, e), dtype=torch.float64)) ** 2
    reader.release(name)
    return math.sqrt(sq)


def inspect_lora_adapters(adapters: Sequence[AdapterSource], *, base: BaseSource = None,
                          head: Sequence[str] = (), clamp: bool = True,
                          trust_pickle: bool = False, threads: int | None = None) -> Inspection:
    """Per-module geometry of N >= 2 LoRA adapters of one base: the deltas' norms, pairwise
    angles and the ratio ``t`` a merge would use (all from the factors, `inspect_lora`), with
    a kind per module, a summary by kind and the findings, as `inspect_checkpoints` gives
    them for dense fine-tunes. ``base`` (optional) adds each weight's ``|w0|``, and anchors
    the dense tensors; ``head``: glob patterns of base-model names counted as the head."""
    seen: dict[str, tuple[str, float | None, bool]] = {}

    def observe(layers, reader: Reader | None) -> None:
        for layer in layers:
            name = f"{layer.name}.weight" if layer.mods is not None else base_key(layer.key)
            norm = None
            if reader is not None and layer.gram is not None and name in reader.infos:
                norm = _norm(reader, name)
            # without a value in the base a dense tensor is averaged, as a new head would be
            seen[layer.name] = (name, norm, layer.rule != "average")

    report = _run(adapters, base, "tensor", clamp, None, None, trust_pickle, threads,
                  merge=False, observe=observe)
    names = {x.name: seen[x.name][0] for x in report.layers}
    kinds = layer_kinds({names[x.name]: tuple(x.shape) for x in report.layers}, head)
    layers = [LayerGeometry(x, kinds[names[x.name]], seen[x.name][1], seen[x.name][2])
              for x in report.layers]
    if base is not None:
        anchor = str(report.anchor)
    elif report.anchor:
        anchor = f"{report.anchor} (named by the adapters; not read)"
    else:
        anchor = "(no base model given: the deltas are the adapters' own)"
    findings = [Finding("inputs", w) for w in report.warnings]
    return Inspection(anchor, list(report.models), layers,
                      findings + find_problems(layers, len(report.models)),
                      clamp, report.seconds)
