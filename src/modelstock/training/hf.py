"""Model Stock during training with the Hugging Face ``Trainer``: one Trainer per replica
(process), merged across processes by `DistributedModelStock`.

Launch N processes with ``torchrun --nproc-per-node N train.py``; in ``train.py`` call
`init_replica_process_group` first, then give the Trainer a `ModelStockCallback`::

    from modelstock.training.hf import ModelStockCallback, init_replica_process_group
    replica = init_replica_process_group()          # before TrainingArguments
    trainer = Trainer(model=model, args=args, train_dataset=shard_or_seed_by(replica),
                      callbacks=[ModelStockCallback(anchor=pretrained, period=100)])
    trainer.train()
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .distributed import (
    DEFAULT_BUCKET_NUMEL,
    DEFAULT_TIMEOUT_S,
    DistributedModelStock,
    join_replica_group,
    merge_statistics,
)
from .periodic import Anchor


def init_replica_process_group(backend: str | None = None,
                               timeout: float = DEFAULT_TIMEOUT_S) -> int:
    """Join torchrun's process group, then hide torchrun's variables from the ``Trainer`` so that
    each process trains its own model (a replica) instead of all processes sharing one DDP model
    (`join_replica_group`). On GPU, each process is given its local GPU as its only visible
    device (call this before anything touches CUDA). Returns this process's replica index (its
    rank)."""
    return join_replica_group(backend, timeout)


class ModelStockCallback(TrainerCallback):
    """Merge the replicas' models every ``period`` optimizer steps (``unit="step"``) or epochs
    (``unit="epoch"``), and once more at the end of training unless the last step just merged
    (``merge_at_end``). Options are those of `DistributedModelStock` (one rank per
    replica, so no ``ranks_per_replica`` or ``group``). Each merge's report is kept
    in ``reports``; its mean ``t`` and angle go to the Trainer's log history."""

    def __init__(self, anchor: Anchor, period: int = 1, unit: str = "step",
                 optimizer_state: str = "keep", granularity: str = "tensor", clamp: bool = True,
                 anchor_device: str | torch.device | None = "cpu",
                 anchor_dtype: torch.dtype | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 merge_at_end: bool = True, buffers: str = "follow",
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> None:
        self._anchor = anchor
        self._kwargs = dict(period=period, unit=unit, optimizer_state=optimizer_state,
                            granularity=granularity, clamp=clamp, anchor_device=anchor_device,
                            anchor_dtype=anchor_dtype, timeout=timeout, buffers=buffers,
                            bucket_numel=bucket_numel)
        self.unit, self.merge_at_end = unit, merge_at_end
        self.merger: DistributedModelStock | None = None
        self.reports: list = []
        self._merged_at: int | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.merger is None:
            self.merger = DistributedModelStock(model, self._anchor, **self._kwargs)
            self._anchor = None  # the merger holds its own copy
        done = state.global_step if self.unit == "step" else int(state.epoch or 0)
        self.merger.steps = done  # resuming from a checkpoint keeps the schedule
        self._merged_at = done

    def _count(self, state, optimizer) -> None:
        self.merger.optimizers = [optimizer] if optimizer is not None else []
        report = self.merger.step()
        if report is not None:
            self._record(report, state)

    def _record(self, report, state) -> None:
        self.reports.append(report)
        self._merged_at = self.merger.steps
        stats = merge_statistics(report)
        if stats:
            state.log_history.append({"modelstock_merge": self.merger.merges,
                                      "step": state.global_step, **stats})

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.unit == "step":
            self._count(state, optimizer)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        if self.unit == "epoch":
            self._count(state, optimizer)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if self.merge_at_end and self.merger is not None and self._merged_at != self.merger.steps:
            self.merger.optimizers = [optimizer] if optimizer is not None else []
            self._record(self.merger.merge(), state)
