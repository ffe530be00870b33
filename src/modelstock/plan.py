"""Check that checkpoints fit together and choose a rule for every tensor (`plan_merge`).

The plan depends on names, shapes and dtypes only, never on values, so every front end (files,
in-memory merges, inspection, training, distributed replicas) plans the same way.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .checkpoint import Reader
from .errors import ModelStockError
from .recipe import Recipe
from .rules import Copy, FixedRatio, Follow, Mean, ModelStock, Rule

# BatchNorm's running statistics: buffers whose treatment is the recipe's ``buffers`` policy.
# Checkpoint files do not say which tensors are buffers; these names are BatchNorm's own.
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class LayerPlan:
    """What happens to one output tensor."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    rule: Rule
    note: str | None = None
    # Row ranges that alone give the statistics (embedding rows of the anchor's tokens, when
    # vocabularies were aligned: `modelstock.vocab`); None: the whole tensor.
    stat_rows: tuple[tuple[int, int], ...] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def anchored(self) -> bool:
        """Merged towards the anchor by a ratio ``t`` (Model Stock, WiSE-FT, uniform soup)."""
        return self.rule.interpolates

    def row_numel(self, recipe: Recipe) -> int | None:
        """Elements per row when each output row gets its own ratio (``granularity="row"``, for
        a Model Stock tensor of two or more dimensions); None otherwise."""
        if (recipe.granularity != "row" or not isinstance(self.rule, ModelStock)
                or len(self.shape) < 2 or self.numel == 0):
            return None
        return self.numel // self.shape[0]


@dataclass
class MergePlan:
    layers: list[LayerPlan]
    warnings: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> LayerPlan:
        if len(getattr(self, "_by_name", ())) != len(self.layers):
            self._by_name = {p.name: p for p in self.layers}
        return self._by_name[name]


def method_rule(recipe: Recipe) -> Rule:
    """The rule the recipe's method gives an ordinary floating tensor of the anchor."""
    if recipe.method == "model-stock":
        return ModelStock(recipe.clamp)
    if recipe.method == "wise-ft":
        return FixedRatio(recipe.alpha, "wise_ft")
    if recipe.method == "uniform":
        return FixedRatio(1.0, "average")
    return Mean(recipe.weights, recipe.normalize, "linear")


def buffer_owner(name: str, names: Sequence[str] | dict) -> str | None:
    """The tensor whose coefficients a running statistic follows: its layer's ``weight``; for
    the batch counter of a layer without one (``affine=False``), its ``running_var``, so that
    the counter goes where the statistics go."""
    owner, _, leaf = name.rpartition(".")
    if leaf not in RUNNING_STATS:
        return None
    prefix = f"{owner}." if owner else ""
    candidates = ["weight"] + (["running_var", "running_mean"]
                               if leaf == "num_batches_tracked" else [])
    return next((prefix + c for c in candidates if prefix + c in names), None)


def _matches(name: str, patterns: Sequence[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def plan_merge(anchor: Reader, models: Sequence[Reader], recipe: Recipe,
               only: Sequence[str] | None = None) -> MergePlan:
    """Check that the checkpoints fit together and choose a rule for every tensor (or for the
    tensors named in ``only``, checking just those: how inspection judges one at a time, so
    the work is in proportion to ``only``, not to the checkpoint)."""
    def names_of(r: Reader) -> list[str]:
        return list(r.infos) if only is None else [k for k in only if k in r.infos]

    if len(models) < recipe.min_models:
        raise ModelStockError(f"{recipe.method} needs at least {recipe.min_models} fine-tuned "
                              f"models, got {len(models)}")
    if recipe.weights is not None and len(recipe.weights) != len(models):
        raise ModelStockError(f"{len(recipe.weights)} weights for {len(models)} models")
    buffers_from_anchor = []
    for m in models:
        missing = [k for k in names_of(anchor) if k not in m.infos]
        # An integer buffer only the anchor has (e.g. position_ids, which some versions of
        # transformers do not save) is carried over from the anchor; a weight is an error.
        buffers = [k for k in missing if not anchor.infos[k].dtype.is_floating_point]
        buffers_from_anchor += [k for k in buffers if k not in buffers_from_anchor]
        missing = [k for k in missing if k not in buffers]
        if missing:
            few = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ModelStockError(f"missing {len(missing)} tensor(s) that the anchor "
                                  f"{anchor.path} has: {few}", m.path)
    extra = [k for k in names_of(models[0]) if k not in anchor.infos]
    names = names_of(anchor) + extra
    for m in models[1:]:
        for k in names_of(m):
            if k not in anchor.infos and k not in models[0].infos:
                raise ModelStockError(f"tensor is not in the anchor nor in {models[0].path}",
                                      m.path, k)
        for k in extra:
            if k not in m.infos:
                raise ModelStockError(f"tensor is in {models[0].path} but not here (and not "
                                      "in the anchor)", m.path, k)
    plan = MergePlan([])
    if extra:
        few = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
        plan.warnings.append(f"{len(extra)} tensor(s) are not in the anchor and were averaged "
                             f"(no anchor to merge towards): {few}")
    if buffers_from_anchor:
        plan.warnings.append(f"{len(buffers_from_anchor)} integer buffer(s) missing from some "
                             f"fine-tunes were taken from the anchor: "
                             f"{', '.join(buffers_from_anchor[:5])}")
    stat_rows = getattr(anchor, "stat_rows", {})
    for name in names:
        if name in buffers_from_anchor:
            info = anchor.infos[name]
            plan.layers.append(LayerPlan(name, info.shape, info.dtype, Copy("anchor"),
                                         note="missing from a fine-tune; taken from the anchor"))
        else:
            plan.layers.append(_plan_layer(name, anchor, models, recipe))
            if name in stat_rows and plan.layers[-1].rule.has_stats:
                plan.layers[-1].stat_rows = stat_rows[name]
                by = getattr(getattr(anchor, "vocabulary", None), "by", "token")
                plan.layers[-1].note = (f"rows aligned by {by}; statistics from the anchor's "
                                        + ("tokens" if by == "token" else "rows"))
    return plan


def _plan_layer(name: str, anchor: Reader, models: Sequence[Reader],
                recipe: Recipe) -> LayerPlan:
    ref = anchor.infos.get(name) or models[0].infos[name]
    for m in models:
        info = m.infos[name]
        if info.shape != ref.shape:
            raise ModelStockError(f"shape {list(info.shape)} does not match "
                                  f"{list(ref.shape)} in {anchor.path}", m.path, name)
        if info.dtype.is_floating_point != ref.dtype.is_floating_point:
            raise ModelStockError(f"dtype {info.dtype} does not match {ref.dtype} "
                                  f"in {anchor.path}", m.path, name)
    floating = ref.dtype.is_floating_point
    out_dtype = recipe.dtype if (recipe.dtype is not None and floating) else ref.dtype
    in_anchor = name in anchor.infos
    keep, avg = _matches(name, recipe.keep_anchor), _matches(name, recipe.average)
    if keep and avg:
        raise ModelStockError(f"matches both --keep-anchor {keep!r} and --average {avg!r}",
                              tensor=name)
    owner = buffer_owner(name, anchor.infos) if in_anchor else None
    if keep:
        if not in_anchor:
            raise ModelStockError(f"--keep-anchor {keep!r} matches a tensor the anchor lacks",
                                  anchor.path, name)
        return LayerPlan(name, ref.shape, out_dtype, Copy("anchor", "anchor"),
                         f"--keep-anchor {keep}")
    if avg and floating:
        return LayerPlan(name, ref.shape, out_dtype, Mean(), f"--average {avg}")
    if not in_anchor:
        rule = Mean() if floating else Copy("first")
        return LayerPlan(name, ref.shape, out_dtype, rule, "not in the anchor")
    if name.rpartition(".")[2] in RUNNING_STATS:
        return _plan_buffer(name, ref.shape, out_dtype, floating, owner, recipe)
    if not floating:
        return LayerPlan(name, ref.shape, out_dtype, Copy("first"), f"{ref.dtype} tensor")
    return LayerPlan(name, ref.shape, out_dtype, method_rule(recipe))


def _plan_buffer(name: str, shape: tuple[int, ...], out_dtype: torch.dtype, floating: bool,
                 owner: str | None, recipe: Recipe) -> LayerPlan:
    """A BatchNorm running statistic, by the recipe's ``buffers`` policy."""
    if recipe.buffers == "anchor":
        return LayerPlan(name, shape, out_dtype, Copy("anchor", "anchor"),
                         "running statistic: --buffers anchor")
    if recipe.buffers == "follow" and owner is not None:
        return LayerPlan(name, shape, out_dtype, Follow(owner), f"running statistic: follows "
                         f"{owner}")
    if not floating:
        return LayerPlan(name, shape, out_dtype, Copy("first"), "running statistic (integer)")
    if recipe.buffers == "average":
        return LayerPlan(name, shape, out_dtype, Mean(), "running statistic: --buffers average")
    return LayerPlan(name, shape, out_dtype, method_rule(recipe),
                     "running statistic without a layer weight: merged by its own values")
