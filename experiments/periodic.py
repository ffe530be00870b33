"""Model Stock during training: the library's `PeriodicModelStock` driven by our training loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .evaluation import Example
from .finetune import TrainConfig, make_optimizer, train_lockstep
from .merges import merge
from .textmodel import state_dict_copy


def train_periodic(cfg: TrainConfig, seeds: Sequence[int], tokenizer,
                   make_anchor: Callable[[], torch.nn.Module], train: Sequence[Example],
                   period: int, unit: str = "step", optimizer_state: str = "keep",
                   on_epoch: Callable[[int, Callable[[], dict]], None] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Train one model per seed in lockstep from the anchor; every ``period`` steps (or epochs)
    the library replaces all of them by their Model Stock merge. Returns the final merge (the
    library's ``merge()`` after the last step). ``on_epoch(epoch, current)`` may save snapshots:
    ``current()`` is the Model Stock merge of the models at that moment (post hoc, through the
    library; the models themselves are left as they are)."""
    from modelstock.training import PeriodicModelStock

    anchor = make_anchor()
    models = [make_anchor() for _ in seeds]
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    opts = [make_optimizer(m, cfg, steps_per_epoch * cfg.epochs) for m in models]
    pms = PeriodicModelStock(models=models, anchor=anchor, period=period, unit=unit,
                             optimizers=[o for o, _ in opts], optimizer_state=optimizer_state)
    anchor_state = state_dict_copy(anchor, cfg.frozen)

    def current() -> dict[str, torch.Tensor]:
        states = [state_dict_copy(m, cfg.frozen) for m in models]
        return merge(anchor_state, states, "model-stock")[0]

    def epoch_end(epoch: int) -> None:
        if unit == "epoch":
            pms.step()
        if on_epoch is not None:
            on_epoch(epoch, current)

    train_lockstep(models, seeds, cfg, tokenizer, train, optimizers=opts,
                   on_step=(lambda s: pms.step()) if unit == "step" else None,
                   on_epoch=epoch_end)
    pms.merge()
    return state_dict_copy(models[0], cfg.frozen)
