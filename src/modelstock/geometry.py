"""The geometry of fine-tuned weights around their anchor, per layer (``modelstock inspect``).

Inspecting is a merge's Gram pass and nothing else: the same readers, the same plan and the same
per-layer math (`engine.Merger.layer_gram`, `ratio`, `describe`), with no output written. On top
of the merge report it adds what a user needs before trusting a merge, or to debug one: a kind
per layer, a summary by kind, and findings for what looks wrong (tensors that do not line up,
layers that moved in one fine-tune only, task vectors at right angles, fine-tunes that are as far
from the anchor as unrelated weights).
"""

from __future__ import annotations

import fnmatch
import math
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from .api import Source, _open_all
from .checkpoint import Reader
from .engine import Merger, chunk_ranges, progress_bar, worker_pool
from .errors import ModelStockError
from .plan import LayerPlan, plan_merge
from .recipe import DEFAULT_CHUNK_NUMEL, MergeOptions, Recipe
from .report import LayerReport, MergeReport
from .rules import Follow, Mean, ModelStock

KINDS = ("weight", "bias", "norm", "embedding", "head", "other")
KIND_LABELS = {"weight": "weight matrices", "bias": "biases", "norm": "normalisation",
               "embedding": "embeddings", "head": "head", "other": "other"}

# Thresholds of the findings (documented in README.md, "Inspecting fine-tunes").
NEAR_ORTHOGONAL_DEG = 85.0  # a pair of task vectors this close to 90 degrees barely agrees
ORTHOGONAL_EVERYWHERE_DEG = 80.0  # ... and if (nearly) every layer is past this angle,
ORTHOGONAL_EVERYWHERE_SHARE = 0.9  # the fine-tunes share no direction at all
ONE_SIDED_REL = 1e-3  # a task vector below this fraction of the largest one counts as unchanged
FAR_FROM_ANCHOR_REL = 0.5  # median |w_i - w0| / |w0| of unrelated weights of equal scale: ~1.41

_HEAD_PARTS = {"head", "heads", "classifier", "lm_head", "score", "cls"}
_NORM_PART = re.compile(r".*norm.*|ln|ln_.*|.*_ln|bn\d*|gn\d*", re.IGNORECASE)
_EMBED_PART = re.compile(r".*embed.*|wte|wpe|cls_token|dist_token|mask_token", re.IGNORECASE)
_NORM_LEAVES = {"running_mean", "running_var", "num_batches_tracked"}


def layer_kinds(shapes: dict[str, tuple[int, ...]], head: Sequence[str] = ()) -> dict[str, str]:
    """A kind for every tensor, from its name and shape (and its siblings' shapes).

    ``head``: glob patterns that mark head tensors, for models whose head has no usual name.
    A 1-D ``weight`` is a normalisation scale (LayerNorm, BatchNorm, RMSNorm), and so is the
    ``bias`` next to it; names such as ``LayerNorm``/``ln_f``/``bn1`` say so too.
    """
    kinds = {}
    for name, shape in shapes.items():
        *parts, leaf = name.split(".")
        owner = ".".join(parts)
        sibling = shapes.get(f"{owner}.weight" if owner else "weight")
        if any(fnmatch.fnmatchcase(name, p) for p in head) or _HEAD_PARTS & set(parts) \
                or (parts[:1] == ["fc"] and len(parts) == 1):
            kinds[name] = "head"
        elif leaf in _NORM_LEAVES or any(_NORM_PART.fullmatch(x) for x in parts) \
                or (leaf in ("weight", "bias") and sibling is not None and len(sibling) == 1):
            kinds[name] = "norm"
        elif any(_EMBED_PART.fullmatch(x) for x in [*parts, leaf]):
            kinds[name] = "embedding"
        elif leaf == "bias" or leaf.endswith("_bias"):
            kinds[name] = "bias"
        elif len(shape) >= 2:
            kinds[name] = "weight"
        else:
            kinds[name] = "other"
    return kinds


@dataclass
class LayerGeometry:
    """One tensor: its merge-report entry (the schema of ``modelstock_report.json``), its kind,
    and the anchor's norm ``|w0|`` (to put the task-vector norms in scale)."""

    layer: LayerReport
    kind: str
    anchor_norm: float | None = None
    in_anchor: bool = True

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def measured(self) -> bool:
        """Whether the task vectors were measured (angles and norms exist)."""
        return self.layer.norms is not None

    @property
    def pair_angles(self) -> list[float]:
        """Angle in degrees between each pair of task vectors (pairs i<j, row-major)."""
        return [math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in self.layer.pair_cos or []]

    @property
    def relative_norms(self) -> list[float] | None:
        """``|w_i - w0| / |w0|`` per fine-tune (None where the anchor is all zeros)."""
        if not self.layer.norms or not self.anchor_norm:
            return None
        return [x / self.anchor_norm for x in self.layer.norms]

    @property
    def changed(self) -> list[bool]:
        """Per fine-tune: did this layer move away from the anchor (relative to the others)?"""
        norms = self.layer.norms or []
        top = max(norms, default=0.0)
        return [top > 0 and x > ONE_SIDED_REL * top for x in norms]

    def to_dict(self) -> dict:
        """The merge report's per-layer entry plus ``kind`` and ``anchor_norm``."""
        d = {k: v for k, v in asdict(self.layer).items() if v is not None}
        d["kind"] = self.kind
        if self.anchor_norm is not None:
            d["anchor_norm"] = self.anchor_norm
        return d


@dataclass
class Finding:
    """Something that looks wrong (``level="warning"``) or worth knowing (``"info"``)."""

    code: str
    message: str
    layers: list[str] = field(default_factory=list)
    level: str = "warning"


@dataclass
class KindSummary:
    """The layers of one kind, in aggregate (angles over measured layers that moved)."""

    kind: str
    layers: int
    params: int
    measured: int
    angle_mean: float | None = None
    angle_min: float | None = None
    angle_max: float | None = None
    spread_mean: float | None = None  # N >= 3: mean over layers of (max - min) pair angle
    t_median: float | None = None
    rel_norm_median: float | None = None


@dataclass
class Inspection:
    """The result of `inspect_checkpoints`: every layer's geometry, and the findings."""

    anchor: str
    models: list[str]
    layers: list[LayerGeometry]
    findings: list[Finding] = field(default_factory=list)
    clamp: bool = True
    seconds: float | None = None

    @property
    def n_models(self) -> int:
        return len(self.models)

    def merge_report(self) -> MergeReport:
        """The same report a merge writes as ``modelstock_report.json`` (without output)."""
        return MergeReport(method="model-stock", n_models=self.n_models, granularity="tensor",
                           clamp=self.clamp, layers=[g.layer for g in self.layers],
                           anchor=self.anchor, models=list(self.models),
                           warnings=[f.message for f in self.findings if f.level == "warning"],
                           seconds=self.seconds)

    def by_kind(self) -> list[KindSummary]:
        return summarise_by_kind(self.layers)

    def to_dict(self) -> dict:
        """``modelstock_report.json``'s layout, plus per-layer kinds, a summary by kind and the
        findings with the layers they concern."""
        d = self.merge_report().to_dict()
        d["layers"] = [g.to_dict() for g in self.layers]
        d["kinds"] = [{k: v for k, v in asdict(s).items() if v is not None}
                      for s in self.by_kind()]
        d["findings"] = [asdict(f) for f in self.findings]
        return d


def _moved(g: LayerGeometry) -> bool:
    return g.measured and g.layer.cos is not None and all(g.changed)


def summarise_by_kind(layers: Sequence[LayerGeometry]) -> list[KindSummary]:
    """One `KindSummary` per kind present, in `KINDS` order."""
    out = []
    for kind in KINDS:
        rows = [g for g in layers if g.kind == kind]
        if not rows:
            continue
        s = KindSummary(kind, len(rows), sum(g.layer.numel for g in rows),
                        sum(g.measured for g in rows))
        moved = [g for g in rows if _moved(g)]
        if moved:
            angles = [g.layer.angle_deg for g in moved]
            s.angle_mean = statistics.fmean(angles)
            s.angle_min, s.angle_max = min(angles), max(angles)
            spreads = [max(a) - min(a) for a in (g.pair_angles for g in moved) if len(a) >= 2]
            s.spread_mean = statistics.fmean(spreads) if spreads else None
        ts = [g.layer.t for g in rows if g.layer.t is not None and g.measured]
        s.t_median = statistics.median(ts) if ts else None
        rel = [statistics.fmean(g.relative_norms) for g in rows if g.relative_norms]
        s.rel_norm_median = statistics.median(rel) if rel else None
        out.append(s)
    return out


def _names(layers: Sequence[LayerGeometry], limit: int = 5) -> str:
    few = ", ".join(g.name for g in layers[:limit])
    return few + (f", ... ({len(layers)} in all)" if len(layers) > limit else "")


def find_problems(layers: Sequence[LayerGeometry], n_models: int) -> list[Finding]:
    """What looks wrong in the geometry (and a few facts worth knowing), most global first."""
    found: list[Finding] = []

    def add(code: str, rows: list[LayerGeometry], text: str, level: str = "warning") -> None:
        if rows:
            found.append(Finding(code, f"{text}: {_names(rows)}", [g.name for g in rows], level))

    moved = [g for g in layers if _moved(g) and g.layer.rule == "model_stock"]
    if moved:
        wide = [g for g in moved if g.layer.angle_deg >= ORTHOGONAL_EVERYWHERE_DEG]
        if len(wide) >= ORTHOGONAL_EVERYWHERE_SHARE * len(moved):
            angle = statistics.median(g.layer.angle_deg for g in moved)
            found.append(Finding(
                "orthogonal_everywhere",
                f"task vectors are near 90 degrees in {len(wide)} of {len(moved)} layers (median "
                f"{angle:.1f}): the fine-tunes share no direction; did they start from this "
                "anchor (with the same head)?", [g.name for g in wide]))
        rel = [statistics.fmean(g.relative_norms) for g in moved if g.relative_norms]
        if rel and statistics.median(rel) >= FAR_FROM_ANCHOR_REL:
            found.append(Finding(
                "far_from_anchor",
                f"the fine-tunes are as far from the anchor as unrelated weights (median "
                f"|w_i - w0| / |w0| = {statistics.median(rel):.2f} over {len(rel)} layers; "
                "fine-tuning usually moves weights by a few percent): did they start from "
                "this anchor?", [g.name for g in moved]))
    add("shape_mismatch", [g for g in layers if g.layer.rule == "skipped"
                           and (g.layer.note or "").startswith("anchor shape")],
        "the anchor's shape differs from the fine-tunes' (a different head?), not inspected")
    add("incompatible", [g for g in layers if g.layer.rule == "skipped"
                         and not (g.layer.note or "").startswith("anchor shape")],
        "tensors that a merge would refuse (missing, mismatched or non-finite; see their note)")
    add("negative_cos", [g for g in moved if g.layer.cos < 0],
        "negative cosine (task vectors point apart; a merge keeps the anchor there)")
    add("near_orthogonal", [g for g in moved if 0 <= g.layer.cos
                            and g.layer.angle_deg >= NEAR_ORTHOGONAL_DEG],
        f"near-zero cosine (angle >= {NEAR_ORTHOGONAL_DEG:g} degrees; t close to 0)")
    anchored = [g for g in layers if g.measured and g.layer.cos is not None]
    one = [g for g in anchored if any(g.changed) and not all(g.changed)]
    if one:
        which = sorted({i + 1 for g in one for i, c in enumerate(g.changed) if c})
        add("one_sided", one, f"changed in some fine-tunes only (moved in model(s) "
                              f"{', '.join(map(str, which))} of {n_models}; a frozen layer in "
                              "one run, or a different recipe?)")
    add("unchanged", [g for g in anchored if g.layer.norms and not any(g.changed)],
        "unchanged in every fine-tune (frozen or unused)", "info")
    add("not_in_anchor", [g for g in layers if not g.in_anchor and g.layer.rule != "skipped"],
        "not in the anchor (a new head?): a merge averages them, no angle", "info")
    return found


def _natural(name: str) -> list:
    return [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"(\d+)", name)]


def layer_order(names: Sequence[str]) -> list[str]:
    """Names in file order; but where the file sorted them as text (safetensors headers do), with
    numbers compared as numbers, so that ``layer.2`` comes before ``layer.10``."""
    names = list(names)
    return sorted(names, key=_natural) if names == sorted(names) else names


def _plan_each(anchor: Reader, models: Sequence[Reader], recipe: Recipe
               ) -> list[LayerPlan | LayerReport]:
    """The merge plan, tensor by tensor: a `LayerPlan`, or a ``skipped`` report saying why."""
    extra = dict.fromkeys(k for m in models for k in m.infos if k not in anchor.infos)
    names = layer_order(anchor.infos) + layer_order(extra)
    out: list[LayerPlan | LayerReport] = []
    for name in names:
        try:
            out.append(plan_merge(anchor, models, recipe, only=[name]).layers[0])
        except ModelStockError as e:
            ref = next(r.infos[name] for r in [*models, anchor] if name in r.infos)
            shapes = {r.infos[name].shape for r in models if name in r.infos}
            if name in anchor.infos and len(shapes) == 1 and all(name in m.infos for m in models) \
                    and anchor.infos[name].shape not in shapes:
                note = (f"anchor shape {list(anchor.infos[name].shape)}, fine-tunes "
                        f"{list(ref.shape)}")
            else:
                note = str(e)
            out.append(LayerReport(name, list(ref.shape), "skipped",
                                   str(ref.dtype).removeprefix("torch."), note=note))
    return out


def _anchor_norm(anchor: Reader, p: LayerPlan, chunk_numel: int) -> float:
    """``|w0|``, streamed from the anchor chunk by chunk, in float64."""
    sq = 0.0
    for s, e in chunk_ranges(p.numel, chunk_numel):
        sq += float(torch.linalg.vector_norm(anchor.read(p.name, s, e), dtype=torch.float64)) ** 2
    return math.sqrt(sq)


def inspect_readers(anchor: Reader, models: Sequence[Reader], opts: MergeOptions | None = None,
                    head: Sequence[str] = (), progress: bool = False) -> Inspection:
    """Measure every layer of ``models`` against ``anchor`` with a merge's statistics pass."""
    opts = opts or MergeOptions()
    if opts.method != "model-stock" or opts.granularity != "tensor":
        raise ModelStockError("inspect measures the paper's rule: method model-stock, "
                              "granularity tensor")
    if len(models) < 2:
        raise ModelStockError(f"inspect needs at least 2 fine-tuned models, got {len(models)}")
    start = time.perf_counter()
    entries = _plan_each(anchor, models, opts.recipe)
    plans = {p.name: p for p in entries if isinstance(p, LayerPlan)}

    def measurable(p) -> bool:  # Model Stock, or a floating tensor the anchor has (BN stats)
        return isinstance(p, LayerPlan) and p.name in anchor.infos \
            and p.out_dtype.is_floating_point and (
            isinstance(p.rule, ModelStock | Follow)
            or (isinstance(p.rule, Mean) and p.rule.weights is None))

    total = sum(p.numel for p in entries if measurable(p))
    kinds = layer_kinds({p.name: tuple(p.shape) for p in entries}, head)
    layers: list[LayerGeometry] = []
    with worker_pool(opts.execution) as pool, \
            progress_bar(total, progress, "inspecting") as bar:
        merger = Merger(anchor, models, opts.recipe, opts.execution, sink=None,
                        progress=bar.update, pool=pool)
        for p in entries:
            if isinstance(p, LayerReport):
                layers.append(LayerGeometry(p, kinds[p.name], in_anchor=p.name in anchor.infos))
                continue
            owner = plans.get(getattr(p.rule, "owner", None))
            try:
                t = merger.coefficients(owner) if owner is not None and owner.anchored else None
            except ModelStockError:
                t = None  # the owner's own row says why
            if not measurable(p):
                layers.append(LayerGeometry(merger.describe(p, None, t, note=p.note),
                                            kinds[p.name], in_anchor=p.name in anchor.infos))
                continue
            try:
                if isinstance(p.rule, ModelStock):
                    t = merger.coefficients(p, count=True)
                    g = merger.known_gram(p)
                else:
                    g, _ = merger.layer_gram(p, keep=False, count=True)
            except ModelStockError as e:
                layers.append(LayerGeometry(LayerReport(p.name, list(p.shape), "skipped",
                                                        str(p.out_dtype).removeprefix("torch."),
                                                        note=str(e)), kinds[p.name]))
                continue
            norm = _anchor_norm(anchor, p, opts.chunk_numel)
            for r in [anchor, *models]:
                r.release(p.name)
            note = p.rule.note(g, len(models)) if isinstance(p.rule, ModelStock) else None
            rep = merger.describe(p, g, t, note="; ".join(x for x in (p.note, note) if x) or None)
            layers.append(LayerGeometry(rep, kinds[p.name], norm))
    return Inspection(anchor.path, [m.path for m in models], layers,
                      find_problems(layers, len(models)), opts.clamp,
                      time.perf_counter() - start)


def inspect_checkpoints(anchor: Source, models: Sequence[Source], *, clamp: bool = True,
                        head: Sequence[str] = (), chunk_numel: int = DEFAULT_CHUNK_NUMEL,
                        device: str = "cpu", trust_pickle: bool = False,
                        strip_prefix: str | None = None, progress: bool = False) -> Inspection:
    """Per-layer geometry of fine-tunes around their anchor: norms, pairwise angles, the ratio
    ``t`` a merge would use, by layer kind, with findings. Reads like `merge_checkpoints`
    (memory-mapped, chunk by chunk) and writes nothing.
    """
    opts = MergeOptions(clamp=clamp, chunk_numel=chunk_numel, device=device)
    a, ms, notes = _open_all(anchor, models, trust_pickle, strip_prefix, progress)
    try:
        insp = inspect_readers(a, ms, opts, head, progress)
        insp.findings[:0] = [Finding("inputs", note) for note in notes]
        return insp
    finally:
        for r in [a, *ms]:
            r.close()
