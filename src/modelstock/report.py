"""The per-layer merge report: what was decided for every tensor, and why."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class LayerReport:
    """One tensor's record. ``rule`` is one of ``model_stock``, ``average``, ``wise_ft``,
    ``linear``, ``anchor``, ``copy``, ``follow`` (a running statistic that took its layer's
    coefficient). ``cos`` is the mean pairwise cosine of the task vectors,
    ``t`` the ratio applied (for ``granularity="row"``: the mean over rows, with
    ``t_min``/``t_max``)."""

    name: str
    shape: list[int]
    rule: str
    dtype: str = ""
    cos: float | None = None
    angle_deg: float | None = None
    t: float | None = None
    norms: list[float] | None = None
    pair_cos: list[float] | None = None
    t_min: float | None = None
    t_max: float | None = None
    rel_error: float | None = None  # a LoRA module compressed to rank R: |merge - kept| / |merge|
    note: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def layer_report(name: str, shape: Sequence[int], rule: str, dtype: torch.dtype, *,
                 norms: torch.Tensor | None = None, pair_cos: torch.Tensor | None = None,
                 cos: float | None = None, t: torch.Tensor | None = None,
                 note: str | None = None, who: str = "model") -> LayerReport:
    """A tensor's record from its measurements: the task vectors' ``norms``, their pairwise
    cosines (``cos`` defaults to their mean), the ratio ``t`` applied (a tensor of one value per
    row gives the mean with ``t_min``/``t_max``). Zero task vectors get a note."""
    rep = LayerReport(name, list(shape), rule, str(dtype).removeprefix("torch."), note=note)
    if pair_cos is not None:
        rep.pair_cos = [float(x) for x in pair_cos]
        if cos is None and rep.pair_cos:
            cos = sum(rep.pair_cos) / len(rep.pair_cos)
    if cos is not None:
        rep.cos = float(cos)
        rep.angle_deg = math.degrees(math.acos(max(-1.0, min(1.0, rep.cos))))
    if t is not None:
        t = torch.as_tensor(t)
        rep.t = float(t.mean())
        if t.ndim:
            rep.t_min, rep.t_max = float(t.min()), float(t.max())
    if norms is not None:
        rep.norms = [float(x) for x in norms]
        zero = [i for i, x in enumerate(rep.norms) if x == 0]
        if len(zero) == len(rep.norms):
            extra = "every task vector is zero: output equals the anchor"
        elif zero:
            extra = f"task vector of {who}(s) {zero} is zero (pair cos = 0)"
        else:
            extra = None
        if extra:
            rep.note = f"{rep.note}; {extra}" if rep.note else extra
    return rep


@dataclass
class MergeReport:
    """Everything a merge decided, JSON-ready (``modelstock_report.json``). ``greedy`` records a
    greedy soup's selection (see `modelstock.soups.greedy_soup`)."""

    method: str
    n_models: int
    granularity: str
    clamp: bool
    layers: list[LayerReport] = field(default_factory=list)
    alpha: float | None = None
    weights: list[float] | None = None
    normalize: bool | None = None
    greedy: dict | None = None
    anchor: str | None = None
    models: list[str] = field(default_factory=list)
    model_cos: float | None = None
    model_t: float | None = None
    buffers: str | None = None
    vocabulary: dict | None = None  # how embedding rows were aligned (`vocab.Alignment`)
    warnings: list[str] = field(default_factory=list)
    seconds: float | None = None
    output_bytes: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [{k: v for k, v in asdict(layer).items() if v is not None}
                       for layer in self.layers]
        return {k: v for k, v in d.items() if v is not None}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """A one-screen, human-readable summary of the merge."""
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.rule] = counts.get(layer.rule, 0) + 1
        merged = [x for x in self.layers if x.t is not None]
        angles = [x.angle_deg for x in self.layers if x.angle_deg is not None]
        lines = [f"method       {self.method} (N={self.n_models}, granularity={self.granularity}"
                 f"{', clamp' if self.clamp else ', no clamp'}"
                 f"{'' if self.alpha is None else f', alpha={self.alpha:g}'}"
                 f"{'' if self.weights is None else f', weights={self.weights}'}"
                 f"{'' if not self.weights or self.normalize else ', not normalized'})",
                 "layers       " + ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))]
        if merged:
            ts = [x.t for x in merged]
            lines.append(f"t            mean {sum(ts) / len(ts):.4f}, min {min(ts):.4f}, "
                         f"max {max(ts):.4f}")
        if angles:
            lines.append(f"angle (deg)  min {min(angles):.2f}, max {max(angles):.2f}")
        if self.output_bytes is not None:
            lines.append(f"output       {self.output_bytes / 1e9:.3f} GB")
        if self.seconds is not None:
            lines.append(f"time         {self.seconds:.1f} s")
        if self.greedy:
            for step in self.greedy["steps"]:
                lines.append(f"greedy       {'kept' if step['kept'] else 'left'} "
                             f"{step['model']}: soup score {step['score']:.6g}")
        lines += [f"warning      {w}" for w in self.warnings]
        return "\n".join(lines)
