"""Model Stock during training, in one process: N models trained side by side are replaced, every
``period`` steps (or epochs), by the Model Stock merge of their current weights.

The merge runs the same engine as the post-hoc merge (`modelstock.api.merge_state_dicts`), with
the models' own tensors as inputs and a sink that writes the result back into them in place.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

import torch

from ..checkpoint import StateDictReader
from ..engine import merge_readers
from ..errors import ModelStockError
from ..recipe import Execution, Recipe
from ..report import MergeReport

UNITS = ("step", "epoch")
OPTIMIZER_STATES = ("keep", "reset")
Anchor = torch.nn.Module | Mapping[str, torch.Tensor]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DistributedDataParallel / DataParallel / ``torch.compile`` wrappers, so
    that state-dict names match the anchor's."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def live_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state-dict tensors, sharing storage with its parameters and buffers (writing
    into them changes the model). A tensor that aliases an earlier one (tied weights) is listed
    once, under its first name."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, value in unwrap(model).state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        key = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if value.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = value
    return out


def copy_anchor(state: Mapping[str, torch.Tensor], names: Mapping[str, torch.Tensor],
                device: str | torch.device | None, dtype: torch.dtype | None
                ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A private copy of the anchor's tensors that the models also have (``names``), on ``device``
    (None: next to the models) and, for floating tensors, in ``dtype`` (None: as stored).

    Also returns, per tensor that ``dtype`` rounds, ``|w0 - rounded(w0)|^2`` (one value per row
    for tensors of two or more dimensions): every task vector measured against the rounded
    anchor carries that same error (see `rounding_shares`)."""
    if dtype is not None and not dtype.is_floating_point:
        raise ModelStockError(f"anchor_dtype must be a floating dtype, got {dtype}")
    out, rounding = {}, {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or name not in names:
            continue
        to_dtype = dtype if (dtype is not None and value.is_floating_point()) else value.dtype
        out[name] = value.detach().to(device=device or names[name].device, dtype=to_dtype,
                                      copy=True)
        if to_dtype != value.dtype:
            err = (value.detach().double() - out[name].to(value.device).double()).square()
            err = err.reshape(err.shape[0], -1).sum(1) if err.ndim >= 2 else err.sum()
            if bool((err > 0).any()):
                rounding[name] = err.cpu()
    return out, rounding


# The share of a task vector's squared norm that may be the anchor's rounding error before a
# merge warns: with a share r, cos moves towards 1 by about r (1 - cos).
ROUNDING_SHARE = 0.01


def rounding_shares(anchor: Mapping[str, torch.Tensor],
                    states: Sequence[Mapping[str, torch.Tensor]],
                    rounding: Mapping[str, torch.Tensor], rows: bool) -> dict[str, float]:
    """Per tensor, the largest share of a task vector's squared norm that is the anchor's
    rounding error, over the models in ``states`` (and over rows when each row has its own
    ratio, ``rows``): ``|e|^2 / |w_i - rounded(w0)|^2``."""
    shares = {}
    for name, e2 in rounding.items():
        w0 = anchor[name]
        worst = 0.0
        for state in states:
            d = state[name].detach().double() - w0.to(state[name].device).double()
            sq = d.square().reshape(d.shape[0], -1).sum(1) if d.ndim >= 2 else d.square().sum()
            err = e2.to(sq.device)
            if not rows or d.ndim < 2:
                sq, err = sq.sum().reshape(1), err.sum().reshape(1)
            moved = sq > 0
            if bool(moved.any()):
                worst = max(worst, float((err[moved] / sq[moved]).max()))
        shares[name] = worst
    return shares


def rounding_bias(report: MergeReport, shares: Mapping[str, float]) -> str | None:
    """A warning when a low-precision anchor biases the merge. Against a rounded anchor every
    task vector is ``d_i + e`` with the same rounding error ``e``, so each Gram entry gains
    ``|e|^2`` and cos drifts towards 1 by about ``r (1 - cos)``, ``r = |e|^2 / |d_i + e|^2``
    (`rounding_shares`). Names the tensors where ``r`` exceeds `ROUNDING_SHARE`, with the
    worst."""
    layers = {x.name: x for x in report.layers if x.rule == "model_stock"}
    biased = sorted((r, name) for name, r in shares.items()
                    if name in layers and r > ROUNDING_SHARE)
    if not biased:
        return None
    share, name = biased[-1]
    cos = layers[name].cos
    return (f"the anchor's rounding (anchor_dtype) is a large part of the task vectors in "
            f"{len(biased)} tensor(s), which biases their cos towards 1; worst {name}: "
            f"{min(share, 1.0):.0%} of |w_i - w0|^2 is rounding"
            + ("" if cos is None else f", cos {cos:.3f} measured")
            + ". Keep the anchor in the models' dtype (anchor_dtype=None) for this merge")


def anchor_reader(anchor: Mapping[str, torch.Tensor], models: Mapping[str, torch.Tensor]
                  ) -> StateDictReader:
    """A reader over the anchor that declares the models' storage dtypes, so that the merged
    tensors come out in the dtype they are written back in (the anchor may be kept in a lower
    precision; the engine computes in float32 either way)."""
    reader = StateDictReader(anchor, "anchor")
    for name, info in reader.infos.items():
        model = models.get(name)
        if model is not None and model.is_floating_point() and info.dtype.is_floating_point:
            reader.infos[name] = dataclasses.replace(info, dtype=model.dtype)
    return reader


class InPlaceSink:
    """An engine sink that writes each merged chunk into the same tensor of every model."""

    holds = 0  # `write` copies the chunk before it returns

    def __init__(self, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.states = states
        self._pos: dict[str, int] = {}
        self._staged: dict[str, torch.Tensor] = {}

    def write(self, name: str, chunk: torch.Tensor) -> None:
        target = self.states[0][name]
        pos = self._pos.get(name, 0)
        end = pos + chunk.numel()
        if all(s[name].is_contiguous() for s in self.states):
            for s in self.states:
                s[name].view(-1)[pos:end].copy_(chunk)
        else:  # e.g. channels_last: stage the whole tensor, copy it back once complete
            staged = self._staged.setdefault(
                name, torch.empty(target.numel(), dtype=chunk.dtype, device=chunk.device))
            staged[pos:end].copy_(chunk)
            if end == target.numel():
                for s in self.states:
                    s[name].copy_(staged.view(target.shape))
                del self._staged[name]
        self._pos[name] = end


class Periodic:
    """The schedule shared by the in-process and the distributed merger: count steps (or
    epochs), merge every ``period`` of them, then apply the optimizer-state policy."""

    def __init__(self, period: int, unit: str, optimizers: Sequence[torch.optim.Optimizer] | None,
                 optimizer_state: str) -> None:
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise ModelStockError(f"period must be a positive integer, got {period!r}")
        if unit not in UNITS:
            raise ModelStockError(f"unit must be one of {UNITS}, got {unit!r}")
        if optimizer_state not in OPTIMIZER_STATES:
            raise ModelStockError(f"optimizer_state must be one of {OPTIMIZER_STATES}, "
                                  f"got {optimizer_state!r}")
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = [optimizers]
        self.period, self.unit = period, unit
        self.optimizers = list(optimizers or [])
        self.optimizer_state = optimizer_state
        self.steps = 0  # steps (or epochs) counted so far
        self.merges = 0  # merges done so far
        self.last_report: MergeReport | None = None

    def step(self) -> MergeReport | None:
        """Count one step (or epoch, with ``unit="epoch"``); merge when the count reaches a
        multiple of ``period``. Returns the merge's report, or None when it did not merge."""
        self.steps += 1
        return self.merge() if self.steps % self.period == 0 else None

    def merge(self) -> MergeReport:
        """Merge now; every model gets the merged weights. Returns the per-layer report."""
        with torch.no_grad():
            report = self._merge()
        if self.optimizer_state == "reset":
            for opt in self.optimizers:
                opt.state.clear()
        self.merges += 1
        self.last_report = report
        return report

    def _merge(self) -> MergeReport:
        raise NotImplementedError

    def state_dict(self) -> dict[str, int]:
        """The schedule's position, for checkpoints (the anchor is rebuilt from the pretrained
        weights, not saved)."""
        return {"steps": self.steps, "merges": self.merges}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.steps, self.merges = int(state["steps"]), int(state["merges"])


class PeriodicModelStock(Periodic):
    """Model Stock during training, for N models trained side by side in one process.

    Every ``period`` calls to `step` (one per optimizer step with ``unit="step"``, one per epoch
    with ``unit="epoch"``), the floating parameters of all N models are replaced in place by the
    Model Stock merge of their current weights, anchored at ``anchor`` (the pretrained weights;
    an ``nn.Module`` or a state dict, copied once, to ``anchor_device`` and, if given,
    ``anchor_dtype``). ``buffers`` is the recipe's policy for BatchNorm running statistics
    (``follow`` their layer's t, keep the ``anchor``'s, or ``average``); integer buffers are
    copied from the first model. The result equals the post-hoc merge
    (`modelstock.merge_state_dicts`) of the same weights.

    An ``anchor_dtype`` below the models' precision saves memory but puts the same rounding
    error into every task vector, which pushes cos towards 1 when the task vectors are small;
    each merge estimates that bias and warns (and says so in its report) where it matters.

    ``optimizer_state`` says what happens to ``optimizers`` after a merge: ``"keep"`` leaves their
    state alone (AdamW's moments and step count carry over, so each model continues with its own
    moments from the merged point); ``"reset"`` clears it (moments to zero and the step count to
    0, so AdamW's bias correction restarts and its first update after a merge is about ``lr``
    per parameter, like the very first step). Learning-rate schedulers are not touched.
    """

    def __init__(self, models: Sequence[torch.nn.Module], anchor: Anchor, period: int = 1,
                 unit: str = "step", optimizers: Sequence[torch.optim.Optimizer] | None = None,
                 optimizer_state: str = "keep", granularity: str = "tensor", clamp: bool = True,
                 anchor_device: str | torch.device | None = "cpu",
                 anchor_dtype: torch.dtype | None = None, buffers: str = "follow") -> None:
        super().__init__(period, unit, optimizers, optimizer_state)
        self.models = list(models)
        self.recipe = Recipe(granularity=granularity, clamp=clamp, buffers=buffers)
        if len(self.models) < self.recipe.min_models:
            raise ModelStockError(f"Model Stock needs at least 2 models, got {len(self.models)}")
        self.anchor, self.rounding = prepare_anchor(anchor, self.models[0], anchor_device,
                                                    anchor_dtype)

    def _merge(self) -> MergeReport:
        states = [live_tensors(m) for m in self.models]
        shares = rounding_shares(self.anchor, states, self.rounding,
                                 self.recipe.granularity == "row")
        device = next(iter(states[0].values())).device
        models = [StateDictReader(s, f"model {i}") for i, s in enumerate(states)]
        sink = InPlaceSink(states)
        _, report = merge_readers(anchor_reader(self.anchor, states[0]), models, self.recipe,
                                  Execution(device=str(device)), lambda plan: sink)
        warn_rounding(report, shares)
        return report


def prepare_anchor(anchor: Anchor, model: torch.nn.Module,
                   device: str | torch.device | None, dtype: torch.dtype | None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """`copy_anchor` of the tensors ``model`` trains, after checking that the anchor has no
    tensor the model lacks (a sign of the wrong anchor)."""
    full = unwrap(anchor).state_dict() if isinstance(anchor, torch.nn.Module) else anchor
    if not isinstance(full, Mapping):
        raise ModelStockError(f"anchor must be an nn.Module or a state dict, got "
                              f"{type(anchor).__name__}")
    names = unwrap(model).state_dict()
    extra = [k for k, v in full.items() if isinstance(v, torch.Tensor) and k not in names]
    if extra:
        raise ModelStockError(f"the anchor has {len(extra)} tensor(s) that the model lacks "
                              f"(is it the right model?): {', '.join(extra[:5])}")
    return copy_anchor(full, live_tensors(model), device, dtype)


def warn_rounding(report: MergeReport, shares: Mapping[str, float]) -> None:
    """Add `rounding_bias`'s warning, if any, to the report and to Python's warnings."""
    message = rounding_bias(report, shares) if shares else None
    if message:
        report.warnings.append(message)
        warnings.warn(f"modelstock: {message}", RuntimeWarning, stacklevel=3)
