"""The paper's geometric observations, read off the library's inspection (no math of our own).

`modelstock.geometry.inspect_checkpoints` on all k fine-tunes gives, per layer, the angle of
every pair of task vectors and every task vector's norm: enough for "the angle between fine-tunes
is about the same for every pair" and "the norms are about the same" (the paper's Sec. 3). This
module only condenses those fields into records, per-kind summaries and plots' inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from modelstock import MergeReport
from modelstock.geometry import Inspection


def layers(insp: Inspection) -> list[dict]:
    """One record per layer that the fine-tunes moved: angle per pair (deg) with its mean/std
    over pairs, norms (mean, relative std over seeds, relative to |w0|), the k-model t."""
    out = []
    for g in insp.layers:
        norms = g.layer.norms
        if not g.measured or not norms or not any(norms) or not g.layer.pair_cos:
            continue
        ang, n = np.array(g.pair_angles), np.array(norms)
        rel = g.relative_norms
        out.append({"name": g.name, "kind": g.kind, "numel": g.layer.numel,
                    "angle_mean": float(ang.mean()),
                    "angle_std": float(ang.std(ddof=1)) if len(ang) > 1 else 0.0,
                    "angle_min": float(ang.min()), "angle_max": float(ang.max()),
                    "norm_mean": float(n.mean()),
                    "norm_rel_std": float(n.std(ddof=1) / n.mean()) if len(n) > 1 else 0.0,
                    "rel_norm": float(np.mean(rel)) if rel else None,
                    "t": g.layer.t})
    return out


def summary(insp: Inspection, records: Sequence[dict]) -> dict[str, dict]:
    """Per kind of layer: the library's summary (angle mean / range over layers, mean pairwise
    spread, median t, median |w_i - w0| / |w0|) plus the mean std of the angle over pairs and of
    the norms over seeds."""
    out: dict[str, dict] = {}
    for s in insp.by_kind():
        rs = [r for r in records if r["kind"] == s.kind]
        if not rs:
            continue
        out[s.kind] = {"layers": len(rs), "angle_mean": s.angle_mean,
                       "angle_range": [s.angle_min, s.angle_max],
                       "angle_spread_mean": s.spread_mean, "t_median": s.t_median,
                       "rel_norm_median": s.rel_norm_median,
                       "angle_std_across_pairs": float(np.mean([r["angle_std"] for r in rs])),
                       "norm_rel_std_across_seeds": float(np.mean([r["norm_rel_std"]
                                                                   for r in rs]))}
    return out


def model_angle(report: MergeReport) -> float:
    """Angle (deg) between the whole-model task vectors of a 2-model merge, from its report's
    per-layer fields (<d1,d2> = cos |d1| |d2|, summed over layers)."""
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
