"""The paper's geometric observations, read off the library's merge reports (no math of our own).

A Model Stock merge of all k fine-tunes reports, per layer, the cosine for every pair of task
vectors and every task vector's norm: enough for "the angle between fine-tunes is about the
same for every pair (small spread)" and "the norms are about the same" (the paper's Sec. 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from modelstock import MergeReport


def layer_kind(name: str) -> str:
    """Coarse group of a tensor, for summaries."""
    if name.startswith("head."):
        return "head"
    if "LayerNorm" in name:
        return "layernorm"
    if "embeddings" in name:
        return "embedding"
    if name.endswith(".bias"):
        return "bias"
    return "weight matrix"


def layers(report: MergeReport) -> list[dict]:
    """One record per merged layer: angle per pair (deg), mean/std over pairs, norms, t."""
    out = []
    for layer in report.layers:
        if layer.pair_cos is None or layer.norms is None or not any(layer.norms):
            continue
        ang = [math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in layer.pair_cos]
        norms = np.array(layer.norms)
        out.append({"name": layer.name, "kind": layer_kind(layer.name), "numel": layer.numel,
                    "angle_mean": float(np.mean(ang)),
                    "angle_std": float(np.std(ang, ddof=1)) if len(ang) > 1 else 0.0,
                    "angle_min": float(np.min(ang)), "angle_max": float(np.max(ang)),
                    "norm_mean": float(norms.mean()),
                    "norm_rel_std": float(norms.std(ddof=1) / norms.mean()) if len(norms) > 1
                    else 0.0,
                    "t": layer.t})
    return out


def summary(records: Sequence[dict]) -> dict[str, dict]:
    """Per kind of layer: how many, angle mean (and the mean over layers of the spread across
    pairs), relative spread of norms across seeds, and t."""
    out: dict[str, dict] = {}
    for kind in sorted({r["kind"] for r in records}):
        rs = [r for r in records if r["kind"] == kind]
        out[kind] = {"layers": len(rs),
                     "angle_mean": float(np.mean([r["angle_mean"] for r in rs])),
                     "angle_range": [float(min(r["angle_mean"] for r in rs)),
                                     float(max(r["angle_mean"] for r in rs))],
                     "angle_std_across_pairs": float(np.mean([r["angle_std"] for r in rs])),
                     "norm_rel_std_across_seeds": float(np.mean([r["norm_rel_std"] for r in rs])),
                     "t_mean": float(np.mean([r["t"] for r in rs if r["t"] is not None]))}
    return out


def model_angle(report: MergeReport) -> float:
    """Angle (deg) between whole-model task vectors of a 2-model merge, from per-layer Gram
    entries (<d1,d2> = cos |d1| |d2| summed over layers)."""
    dot = sq1 = sq2 = 0.0
    for layer in report.layers:
        if layer.pair_cos is None or layer.norms is None or len(layer.norms) != 2:
            continue
        n1, n2 = layer.norms
        dot += layer.pair_cos[0] * n1 * n2
        sq1, sq2 = sq1 + n1 * n1, sq2 + n2 * n2
    if sq1 == 0 or sq2 == 0:
        return 0.0
    return math.degrees(math.acos(max(-1.0, min(1.0, dot / math.sqrt(sq1 * sq2)))))
