"""Model Stock during training with PyTorch Lightning: one ``Trainer`` per replica (process),
merged across processes by `DistributedModelStock`.

Launch N processes with ``torchrun --nproc-per-node N train.py``; in ``train.py`` call
`init_replica_process_group` first, then give a single-device Trainer a `ModelStockCallback`::

    from modelstock.training.lightning import ModelStockCallback, init_replica_process_group
    replica = init_replica_process_group()          # before the Trainer is created
    pl.seed_everything(replica)                      # each replica its own seed (and data order)
    trainer = pl.Trainer(devices=1, max_steps=1000, default_root_dir=f"runs/replica{replica}",
                         callbacks=[ModelStockCallback(anchor=pretrained, period=100)])
    trainer.fit(module, train_dataloaders=loader)   # merges every 100 steps and once at the end

Under torchrun, Lightning reads the launcher's variables (its ``TorchElasticEnvironment``): with
several devices (``devices="auto"`` on a multi-GPU node) it joins all processes into one DDP
model, and even with ``devices=1`` every process but the first is a non-zero rank that does not
log. `init_replica_process_group` joins torchrun's process group for the merges, then hides the
launcher's variables (and on GPU all but the process's own device) and makes the process
Lightning's rank zero, so that each process trains, logs and checkpoints its own replica with
``Trainer(devices=1)``. The callback refuses a Trainer that runs more than one process.

``torch.distributed`` is initialized in every replica (the merges need it), so a torchmetrics
``Metric`` would sync its state across all replicas in ``compute()``: create metrics with
``sync_on_compute=False`` to keep each replica's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from ..errors import ModelStockError
from ..report import MergeReport
from .distributed import (
    DEFAULT_BUCKET_NUMEL,
    DEFAULT_TIMEOUT_S,
    DistributedModelStock,
    join_replica_group,
    merge_statistics,
)
from .periodic import UNITS, Anchor


def init_replica_process_group(backend: str | None = None,
                               timeout: float = DEFAULT_TIMEOUT_S) -> int:
    """Join torchrun's process group, then hide torchrun from Lightning so that each process
    trains its own model (a replica) instead of all processes sharing one DDP model: the
    launcher's variables are removed from the environment (`join_replica_group`) and this
    process becomes Lightning's rank zero (it logs and saves checkpoints; give each replica its
    own ``default_root_dir``). On GPU, each process is given its local GPU as its only visible
    device (call this before anything touches CUDA; then use ``Trainer(devices=1)``). Returns
    this process's replica index (its rank)."""
    rank = join_replica_group(backend, timeout)
    # Lightning set this from RANK when it was imported (above); every replica is rank zero.
    rank_zero_only.rank = 0
    return rank


class ModelStockCallback(pl.Callback):
    """Merge the replicas' models every ``period`` optimizer steps (``unit="step"``, counted as
    ``trainer.global_step``: batches that only accumulate gradients do not count) or training
    epochs (``unit="epoch"``), and once more at the end of training unless the last step just
    merged (``merge_at_end``). Options are those of `DistributedModelStock` (one rank per
    replica, so no ``ranks_per_replica`` or ``group``). The whole
    LightningModule is merged: ``anchor`` is the pretrained LightningModule (or its state dict),
    the same on every replica.

    Each merge's report is kept in ``reports`` and a summary (merge number, ``step``, mean ``t``
    and mean angle over the merged layers) in ``history``; the summary also goes to every logger
    of the Trainer (``modelstock_merge``, ``modelstock_mean_t``, ``modelstock_mean_angle``), at
    the logging step of the batch (or epoch) after which the merge ran. The schedule's position
    is saved in checkpoints (`state_dict`), so ``trainer.fit(..., ckpt_path=...)`` continues
    it. Lightning runs ``ModelCheckpoint`` after other callbacks, so a checkpoint taken at a step
    that merges holds the merged weights; the merge at the end comes after the last checkpoint
    (save the model after ``fit``). Merges are collective: every replica must run the same
    number of steps (epochs).
    """

    def __init__(self, anchor: Anchor, period: int = 1, unit: str = "step",
                 optimizer_state: str = "keep", granularity: str = "tensor", clamp: bool = True,
                 anchor_device: str | torch.device | None = "cpu",
                 anchor_dtype: torch.dtype | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 merge_at_end: bool = True, buffers: str = "follow",
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> None:
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise ModelStockError(f"period must be a positive integer, got {period!r}")
        if unit not in UNITS:
            raise ModelStockError(f"unit must be one of {UNITS}, got {unit!r}")
        self._anchor = anchor
        self._kwargs = dict(period=period, unit=unit, optimizer_state=optimizer_state,
                            granularity=granularity, clamp=clamp, anchor_device=anchor_device,
                            anchor_dtype=anchor_dtype, timeout=timeout, buffers=buffers,
                            bucket_numel=bucket_numel)
        self.period, self.unit, self.merge_at_end = period, unit, merge_at_end
        self.merger: DistributedModelStock | None = None
        self.reports: list[MergeReport] = []
        self.history: list[dict[str, float]] = []
        self._merged_at: int | None = None  # the count (steps or epochs) of the last merge
        self._restored: dict[str, int] | None = None
        self._module: pl.LightningModule | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(period=self.period, unit=self.unit)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.merger is None:
            return dict(self._restored or {})
        return {**self.merger.state_dict(), "merged_at": self._merged_at}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._restored = {k: int(v) for k, v in state_dict.items()}

    # -- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.world_size != 1:
            raise ModelStockError(
                f"the Trainer runs {trainer.world_size} processes as one model "
                f"({type(trainer.strategy).__name__}); Model Stock needs each process to train "
                "its own replica: call modelstock.training.lightning.init_replica_process_group() "
                "before creating the Trainer, and use Trainer(devices=1)")
        # A one-process Trainer is its own rank zero (it logs); Lightning took the rank from
        # the launcher's RANK when it was imported, if that was before the variables were hidden.
        rank_zero_only.rank = 0

    def _done(self, trainer: pl.Trainer) -> int:
        """Steps (or epochs) completed so far, from the Trainer's own counters (restored from a
        checkpoint when resuming)."""
        return trainer.global_step if self.unit == "step" else trainer.current_epoch

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.merger is None:  # after the strategy's setup: the model is on its device
            self.merger = DistributedModelStock(pl_module, self._anchor, **self._kwargs)
            self._anchor = None  # the merger holds its own copy
            self._module = pl_module
        elif pl_module is not self._module:
            raise ModelStockError("this ModelStockCallback already merges another "
                                  "LightningModule: create a new callback for a new model")
        # The count follows the Trainer's (restored from the checkpoint when resuming); the
        # callback's state keeps the merge count and whether the last step merged.
        done = self._done(trainer)
        restored, self._restored = self._restored or {}, None
        self.merger.load_state_dict({"steps": done,
                                     "merges": restored.get("merges", self.merger.merges)})
        self._merged_at = restored.get("merged_at", done)

    def _advance(self, trainer: pl.Trainer, done: int, in_batch: bool) -> None:
        """Move the count to ``done``; merge if it reached (or passed) a multiple of ``period``
        (a batch with several optimizer steps, in manual optimization, merges once)."""
        before = self.merger.steps
        if done <= before:  # accumulating gradients: no optimizer step in this batch
            return
        if done == before + 1:
            self._sync_optimizers(trainer)
            report = self.merger.step()
        else:  # several optimizer steps in one batch (manual optimization)
            self.merger.steps = done
            report = (self._merge(trainer) if done // self.period > before // self.period
                      else None)
        if report is not None:
            self._record(report, trainer, in_batch)

    def _sync_optimizers(self, trainer: pl.Trainer) -> None:
        self.merger.optimizers = list(trainer.optimizers)

    def _merge(self, trainer: pl.Trainer) -> MergeReport:
        self._sync_optimizers(trainer)
        return self.merger.merge()

    def _record(self, report: MergeReport, trainer: pl.Trainer, in_batch: bool) -> None:
        self.reports.append(report)
        self._merged_at = self.merger.steps
        entry: dict[str, float] = {"modelstock_merge": self.merger.merges,
                                   "step": trainer.global_step, **merge_statistics(report)}
        self.history.append(entry)
        metrics = {k: float(v) for k, v in entry.items() if k != "step"}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=_log_step(trainer, in_batch))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.unit == "step":
            self._advance(trainer, trainer.global_step, in_batch=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "epoch":  # current_epoch counts from 0 and moves on after this hook
            self._advance(trainer, trainer.current_epoch + 1, in_batch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.merge_at_end and self.merger is not None and self._merged_at != self.merger.steps:
            self._record(self._merge(trainer), trainer, in_batch=False)


def _log_step(trainer: pl.Trainer, in_batch: bool) -> int:
    """The step on Lightning's logging axis of the batch (or epoch) that just ended, so that
    loggers that need increasing steps (e.g. Weights & Biases) keep Lightning's own metrics:
    Lightning logs a batch's metrics at the count of earlier batches that stepped, and an
    epoch's at that of its last batch (as its LearningRateMonitor does, from the loop's
    counter; ``global_step`` counts each optimizer's steps and runs one ahead)."""
    stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    if stepped is None:
        stepped = trainer.global_step
    return stepped if in_batch else max(stepped - 1, 0)
