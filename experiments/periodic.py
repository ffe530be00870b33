"""Model Stock during training: the library's `PeriodicModelStock` driven by our training loop."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

import torch

from .evaluation import Example
from .finetune import TrainConfig, make_optimizer, train_lockstep


def periodic_available() -> bool:
    """Whether this version of the library has `modelstock.training.PeriodicModelStock`."""
    if importlib.util.find_spec("modelstock.training") is None:
        return False
    from modelstock import training

    return hasattr(training, "PeriodicModelStock")


def train_periodic(cfg: TrainConfig, seeds: Sequence[int], tokenizer,
                   make_anchor: Callable[[], torch.nn.Module], anchor: dict[str, torch.Tensor],
                   train: Sequence[Example], period: int, unit: str = "step",
                   optimizer_state: str = "keep",
                   on_epoch: Callable[[int, Callable[[], dict]], None] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Train one model per seed in lockstep, merging them with Model Stock every ``period``
    steps or epochs; returns the final merge. ``on_epoch(epoch, merge)`` may take snapshots."""
    from modelstock.training import PeriodicModelStock

    models = [make_anchor() for _ in seeds]
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    opts = [make_optimizer(m, cfg, steps_per_epoch * cfg.epochs) for m in models]
    pms = PeriodicModelStock(models=models, anchor=anchor, period=period, unit=unit,
                             optimizers=[o for o, _ in opts], optimizer_state=optimizer_state)

    def merged() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pms.merge().items()}

    def epoch_end(epoch: int) -> None:
        if unit == "epoch":
            pms.epoch()
        if on_epoch is not None:
            on_epoch(epoch, merged)

    train_lockstep(models, seeds, cfg, tokenizer, train, optimizers=opts,
                   on_step=lambda s: pms.step(), on_epoch=epoch_end)
    return merged()
