"""Figures: ID vs OOD accuracy like the paper's Figure 1, and the geometry plots of the study."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# kind -> (label, marker, colour, size); drawn in this order.
STYLE = {
    "fine-tune": ("fine-tunes", "o", "tab:gray", 40),
    "uniform-2": ("uniform average of 2", "s", "tab:blue", 40),
    "model-stock-3": ("Model Stock N=3", "^", "tab:orange", 50),
    "model-stock-4": ("Model Stock N=4", "v", "tab:orange", 50),
    "uniform-soup": ("uniform soup (all k)", "P", "tab:green", 120),
    "greedy-soup": ("greedy soup", "X", "tab:purple", 120),
    "periodic": ("periodic Model Stock", "D", "tab:brown", 70),
    "model-stock": ("Model Stock N=2", "*", "tab:red", 160),
    "zero-shot": ("zero-shot (anchor)", "*", "black", 160),
}


def figure1(rows: Sequence[Mapping], path: str | Path, title: str, metric: str = "acc",
            id_name: str = "airline tweets", ood_name: str = "4 topics") -> None:
    """ID vs mean-OOD ``metric`` (acc or bacc): models as points, WiSE-FT curve(s) as lines."""
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    x, y = f"id_{metric}", f"ood_{metric}"
    curves: dict[str, list[Mapping]] = {}
    for r in rows:
        if r.get("kind") == "wise-ft":
            curves.setdefault(r.get("curve", "WiSE-FT"), []).append(r)
    zs = next((r for r in rows if r.get("kind") == "zero-shot"), None)
    for i, pts in enumerate(curves.values()):
        pts = sorted(pts, key=lambda r: r["alpha"])
        xs, ys = [100 * r[x] for r in pts], [100 * r[y] for r in pts]
        ax.plot(xs, ys, "-", color="tab:cyan", alpha=0.9 if i == 0 else 0.4, lw=1.5,
                marker=".", label="WiSE-FT (alpha 0..1)" if i == 0 else None)
    for kind, (label, marker, colour, size) in STYLE.items():
        pts = [r for r in rows if r.get("kind") == kind]
        if pts:
            ax.scatter([100 * r[x] for r in pts], [100 * r[y] for r in pts], marker=marker,
                       c=colour, s=size, label=f"{label} ({len(pts)})" if len(pts) > 1 else label,
                       edgecolors="white" if kind != "zero-shot" else None, linewidths=0.5,
                       zorder=3)
    what = "accuracy" if metric == "acc" else "balanced accuracy"
    ax.set_xlabel(f"ID ({id_name}) {what} %")
    ax.set_ylabel(f"OOD (mean of {ood_name}) {what} %")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right" if zs is None else "best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def layer_angles(names: Sequence[str], mean_deg: Sequence[float], std_deg: Sequence[float],
                 path: str | Path, title: str) -> None:
    """Per-layer angle between task vectors (mean over seed pairs, error bar = std)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.09 * len(names)), 4.0))
    xs = range(len(names))
    ax.errorbar(xs, mean_deg, yerr=std_deg, fmt=".", ms=4, capsize=2, lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([shorten(n) for n in names], rotation=90, fontsize=4)
    ax.set_ylabel("angle between task vectors (deg)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def accuracy_vs_distance(points: Sequence[Mapping], path: str | Path, title: str) -> None:
    """ID and OOD accuracy against the distance to the centre of the k fine-tunes."""
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8))
    for ax, key, label in ((axes[0], "id_acc", "ID accuracy %"),
                           (axes[1], "ood_acc", "OOD mean accuracy %")):
        for kind, (lab, marker, colour, size) in STYLE.items():
            pts = [p for p in points if p.get("kind") == kind]
            if pts:
                ax.scatter([p["distance"] for p in pts], [100 * p[key] for p in pts],
                           marker=marker, c=colour, s=size * 0.6, label=lab, zorder=3)
        wise = sorted((p for p in points if p.get("kind") == "wise-ft"),
                      key=lambda p: p["distance"])
        if wise:
            ax.plot([p["distance"] for p in wise], [100 * p[key] for p in wise], ".-",
                    color="tab:cyan", label="WiSE-FT")
        ax.set_xlabel("distance to the centre (uniform soup of all k)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versus_epochs(series: Mapping[str, Sequence[tuple[int, float]]], path: str | Path,
                  ylabel: str, title: str) -> None:
    """One line per method: a metric against training length (epochs)."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([e for e, _ in pts], [100 * v for _, v in pts], "o-", ms=4, label=label)
    ax.set_xlabel("epochs")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shorten(name: str) -> str:
    """``body.encoder.layer.3.attention.self.query.weight`` -> ``L3.attn.q.w``."""
    for a, b in (("body.encoder.layer.", "L"), ("body.embeddings.", "emb."),
                 ("attention.self.", "attn."), ("attention.output.", "attn.out."),
                 ("intermediate.dense", "ffn1"), ("output.dense", "ffn2"),
                 ("LayerNorm", "LN"), ("query", "q"), ("key", "k"), ("value", "v"),
                 ("weight", "w"), ("bias", "b")):
        name = name.replace(a, b)
    return name
