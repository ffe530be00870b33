"""One replica of the Lightning callback test (run by tests/test_training_lightning.py under
torchrun, one process per replica).

Each process trains its own tiny model (Linear, BatchNorm, Linear) with its own data, seed and
learning rate in its own single-device ``pl.Trainer``; `ModelStockCallback(period=2)` merges:

- run A, 3 optimizer steps (of 2 batches each: gradients accumulate): merges after step 2 and,
  at the end, after step 3; a checkpoint is saved after step 3, before that end merge;
- run B resumes that checkpoint with a new Trainer and a new callback up to step 6: merges after
  steps 4 and 6, and not again at the end (the last step just merged).

The weights just before and just after every merge go to ``snapshots<replica>.pt``; the Trainer's
view of the run, the callbacks' merge history and the checkpoint's callback state to
``run<replica>.json``, with whether the callback refuses a Trainer that runs several processes
as one model. ``--unit epoch``: the same in epochs (of 2 batches, one step each) instead of steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch

from modelstock import ModelStockError
from modelstock.training.lightning import ModelStockCallback, init_replica_process_group

ENV_BEFORE = {k: k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                           "TORCHELASTIC_RUN_ID")}
replica = init_replica_process_group(timeout=60)

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402
from pytorch_lightning.utilities.rank_zero import rank_zero_only  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--unit", default="step", choices=["step", "epoch"])
a = ap.parse_args()
out = Path(a.out)
torch.set_num_threads(1)
BATCHES = 2  # per epoch, with --unit epoch


class Tiny(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16),
                                       torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


torch.manual_seed(0)
pretrained = Tiny(lr=0.0)  # the same anchor on every replica
pl.seed_everything(replica, verbose=False)  # from here on, each replica its own randomness
g = torch.Generator().manual_seed(1000 + replica)
n = 8 * (BATCHES if a.unit == "epoch" else 16)
data = torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g),
                                      torch.randint(0, 3, (n,), generator=g))
snap: dict[str, dict[str, dict[str, torch.Tensor]]] = {"pre": {}, "post": {}}


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Snapshot(pl.Callback):
    """Before (``when="pre"``) or after (``"post"``) the Model Stock callback in the list."""

    def __init__(self, when: str, run: str) -> None:
        self.when, self.run, self.last = when, run, None

    def _take(self, trainer, module, end=False):
        """Keyed by run and count (steps or epochs done), e.g. ``A2``, and ``A3end``; once per
        count (a batch that only accumulates gradients does not count)."""
        if a.unit == "step":
            count = trainer.global_step
        else:  # current_epoch moves on after on_train_epoch_end
            count = trainer.current_epoch + (0 if end else 1)
        if not end and count == self.last:
            return
        self.last = count
        snap[self.when][f"{self.run}{count}{'end' if end else ''}"] = weights(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if a.unit == "step":
            self._take(trainer, module)

    def on_train_epoch_end(self, trainer, module):
        if a.unit == "epoch":
            self._take(trainer, module)

    def on_train_end(self, trainer, module):
        self._take(trainer, module, end=True)


def trainer_for(run: str, limit: int, callback: ModelStockCallback, ckpt: bool) -> pl.Trainer:
    stop = dict(max_steps=limit, accumulate_grad_batches=2) if a.unit == "step" else dict(
        max_epochs=limit, limit_train_batches=BATCHES)
    callbacks = [Snapshot("pre", run), callback, Snapshot("post", run)]
    if ckpt:
        every = dict(every_n_train_steps=limit) if a.unit == "step" else dict(
            every_n_epochs=limit, save_on_train_epoch_end=True)
        callbacks.append(ModelCheckpoint(dirpath=out / f"ckpt{replica}", filename="last",
                                         save_top_k=-1, **every))
    return pl.Trainer(accelerator="cpu", devices=1, **stop, callbacks=callbacks,
                      logger=CSVLogger(out, name=f"logs{replica}", version=run),
                      log_every_n_steps=1, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=out / f"replica{replica}")


def loader():
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)


model = copy.deepcopy(pretrained)
model.lr = 0.01 * (1 + replica)
first = ModelStockCallback(anchor=pretrained, period=2, unit=a.unit)
trainer_a = trainer_for("A", 3, first, ckpt=True)
trainer_a.fit(model, train_dataloaders=loader())
report = {"env_before": ENV_BEFORE, "env_after": {k: k in os.environ for k in ENV_BEFORE},
          "world_size": trainer_a.world_size, "global_rank": trainer_a.global_rank,
          "strategy": type(trainer_a.strategy).__name__, "rank_zero": rank_zero_only.rank,
          "steps_a": trainer_a.global_step, "history_a": first.history,
          "layers": {x.name: x.rule for x in first.reports[0].layers}}

ckpt_path = out / f"ckpt{replica}" / "last.ckpt"
saved = torch.load(ckpt_path, weights_only=False)
report["ckpt_callbacks"] = {k: v for k, v in saved["callbacks"].items()
                            if k.startswith("ModelStockCallback")}
snap["ckpt"] = {"A": saved["state_dict"]}

resumed = copy.deepcopy(pretrained)
resumed.lr = 0.01 * (1 + replica)
second = ModelStockCallback(anchor=pretrained, period=2, unit=a.unit)
trainer_b = trainer_for("B", 6, second, ckpt=False)
trainer_b.fit(resumed, train_dataloaders=loader(), ckpt_path=ckpt_path)
report.update(steps_b=trainer_b.global_step, epochs_b=trainer_b.current_epoch,
              history_b=second.history, merges_b=second.merger.merges)


class MultiProcessTrainer:  # what a Trainer that joined the processes into one DDP model reports
    world_size, strategy = 2, None


try:
    ModelStockCallback(anchor=pretrained).setup(MultiProcessTrainer(), model, "fit")
except ModelStockError as e:
    report["refused_ddp"] = str(e)
torch.save({"anchor": weights(pretrained), **snap}, out / f"snapshots{replica}.pt")
(out / f"run{replica}.json").write_text(json.dumps(report))
