"""Pictures of an `Inspection`: angle, spread of pairwise angles (N >= 3), ``t`` and task-vector
norms per layer, coloured by layer kind. matplotlib is optional (``pip install modelstock[plot]``)
and imported only here, only when a picture is asked for; no pyplot global state is touched.
"""

from __future__ import annotations

import io
import math
import os

from .errors import ModelStockError
from .geometry import KIND_LABELS, KINDS, Inspection, LayerGeometry

KIND_COLOURS = dict(zip(KINDS, ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728", "#7f7f7f"),
                        strict=True))
MODEL_MARKERS = "os^vD<>ph*"
NAMED_TICKS = 48  # more measured layers than this: numbered ticks instead of names


def require() -> None:
    """Fail early, with the fix, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ModelStockError("plots need matplotlib: pip install 'modelstock[plot]'") from None


def _short(name: str) -> str:
    return ".".join(name.split(".")[-3:])


def figure(insp: Inspection):
    """A `matplotlib.figure.Figure` with one panel per quantity, layers in file order."""
    require()
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = [g for g in insp.layers if g.measured]
    many = insp.n_models >= 3
    panels = 4 if many else 3
    width = min(24.0, max(9.0, 0.2 * len(rows) + 4))
    fig = Figure(figsize=(width, 2.6 * panels + (1.6 if len(rows) <= NAMED_TICKS else 0.6)),
                 layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True)
    if not rows:
        axes[0].text(0.5, 0.5, "no layer could be measured", ha="center",
                     transform=axes[0].transAxes)
        return fig
    xs = list(range(len(rows)))
    colours = [KIND_COLOURS[g.kind] for g in rows]

    def moved(g: LayerGeometry, value: float | None) -> float:
        return value if value is not None and all(g.changed) else math.nan

    ax = axes[0]
    if many:
        for x, g, c in zip(xs, rows, colours, strict=True):
            if all(g.changed) and g.pair_angles:
                ax.vlines(x, min(g.pair_angles), max(g.pair_angles), colors=c, alpha=0.45, lw=3)
    ax.scatter(xs, [moved(g, g.layer.angle_deg) for g in rows], c=colours, s=18, zorder=3)
    ax.axhline(90, color="grey", ls="--", lw=0.8)
    ax.set_ylabel("angle (deg)")
    ax.set_title("angle between task vectors" + (" (mean of cosines; bar: min-max over pairs)"
                                                  if many else ""), loc="left", fontsize=10)
    i = 1
    if many:
        ax = axes[i]
        spread = [moved(g, max(g.pair_angles) - min(g.pair_angles) if g.pair_angles else None)
                  for g in rows]
        ax.bar(xs, spread, color=colours, width=0.8)
        ax.set_ylabel("spread (deg)")
        ax.set_title("spread of pairwise angles (max - min over pairs): small = consistent",
                     loc="left", fontsize=10)
        i += 1
    ax = axes[i]
    ax.scatter(xs, [g.layer.t if g.layer.t is not None else math.nan for g in rows], c=colours,
               s=18, zorder=3)
    ax.set_ylabel("t")
    if insp.clamp:
        ax.set_ylim(-0.05, 1.05)
    ax.set_title("ratio t towards the fine-tunes' mean (0 = anchor, 1 = mean)", loc="left",
                 fontsize=10)
    ax = axes[i + 1]
    for m in range(insp.n_models):
        ys = [g.layer.norms[m] if g.layer.norms[m] > 0 else math.nan for g in rows]
        ax.plot(xs, ys, MODEL_MARKERS[m % len(MODEL_MARKERS)], ms=4, alpha=0.8,
                label=f"|w{m + 1} - w0|")
    anchor = any(g.anchor_norm for g in rows)  # none for LoRA adapters inspected without a base
    if anchor:
        ax.plot(xs, [g.anchor_norm if g.anchor_norm else math.nan for g in rows], "-",
                color="grey", lw=0.8, label="|w0|")
    ax.set_yscale("log")
    ax.set_ylabel("norm")
    ax.set_title("task-vector norms per fine-tune" + (", and the anchor's norm" if anchor else ""),
                 loc="left", fontsize=10)
    ax.legend(fontsize=8, ncols=min(insp.n_models + 1, 6), loc="best")
    for a in axes:
        a.grid(alpha=0.3)
    kinds = [k for k in KINDS if any(g.kind == k for g in rows)]
    axes[0].legend(handles=[Line2D([], [], marker="o", ls="", color=KIND_COLOURS[k],
                                   label=KIND_LABELS[k]) for k in kinds],
                   fontsize=8, ncols=len(kinds), loc="best")
    last = axes[-1]
    if len(rows) <= NAMED_TICKS:
        last.set_xticks(xs, [_short(g.name) for g in rows], rotation=90, fontsize=7)
    else:
        last.set_xlabel("layer (file order; names in the table)")
    return fig


def png_bytes(insp: Inspection, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (for files and for embedding in HTML)."""
    buf = io.BytesIO()
    figure(insp).savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_png(insp: Inspection, path: str | os.PathLike) -> None:
    with open(path, "wb") as f:
        f.write(png_bytes(insp))
