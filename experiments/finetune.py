"""Fine-tuning the zero-shot MiniLM on airline tweets, cached on disk by a hash of the settings.

A run trains one model (or several in lockstep, for the periodic merge) and saves a snapshot at
each epoch listed in ``TrainConfig.snapshots``, so "result vs training length" needs no extra
training. The learning rate warms up linearly, then stays constant: a snapshot at epoch 3 is then
an ordinary 3-epoch fine-tune of the same recipe (a decaying schedule would make early snapshots
mid-schedule points). A finished run has ``log.json``; a run directory without it is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .evaluation import Example, SplitSizes
from .textmodel import (
    LOGIT_SCALE,
    MAX_LEN,
    PROMPTS,
    WORD_EMBEDDINGS,
    collate,
    encode,
    state_dict_copy,
    token_dropout,
)

ROOT = Path(__file__).resolve().parent.parent / "runs" / "tweets"
MEGABATCH = 8  # batches per length-sorted group: less padding, order still seed-dependent


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a fine-tune (and so its cache key)."""

    seed: int = 0
    lr: float = 1e-4
    epochs: int = 10
    batch_size: int = 32
    weight_decay: float = 0.1
    warmup_steps: int = 30
    token_dropout: float = 0.1
    label_smoothing: float = 0.0
    freeze_word_embeddings: bool = True
    sizes: SplitSizes = field(default_factory=lambda: SplitSizes(n_train=1600, n_val=400,
                                                                 n_test=1000, n_ood=400))
    snapshots: tuple[int, ...] = (1, 2, 3, 5, 7, 10)
    n_layers: int | None = None

    def key(self, kind: str = "ft", **extra) -> str:
        """``<kind>-<hash>``: the hash covers this config (not the OOD eval size), the anchor's
        prompts and scale, and ``extra`` (e.g. the periodic-merge settings)."""
        d = asdict(self)
        d["sizes"].pop("n_ood")
        blob = json.dumps({"cfg": d, "prompts": PROMPTS, "scale": LOGIT_SCALE,
                           "max_len": MAX_LEN, **extra}, sort_keys=True)
        return f"{kind}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"

    def with_seed(self, seed: int) -> TrainConfig:
        return replace(self, seed=seed)

    @property
    def frozen(self) -> tuple[str, ...]:
        """Tensors no fine-tune changes: not saved, not merged (they stay the anchor's)."""
        return (WORD_EMBEDDINGS,) if self.freeze_word_embeddings else ()

    def without_frozen(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if k not in self.frozen}


def snapshot_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / f"epoch{epoch:02d}.safetensors"


def is_done(run_dir: Path) -> bool:
    return (run_dir / "log.json").exists()


def load_snapshot(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(snapshot_path(run_dir, epoch))


def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """Atomic safetensors write (a killed run never leaves a half snapshot)."""
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def epoch_batches(n: int, lengths: Sequence[int], batch_size: int,
                  rng: random.Random) -> list[list[int]]:
    """Shuffled batches of indices; within groups of `MEGABATCH` batches, similar lengths."""
    order = list(range(n))
    rng.shuffle(order)
    group = batch_size * MEGABATCH
    batches = []
    for s in range(0, n, group):
        chunk = sorted(order[s : s + group], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, steps: int):
    """AdamW on every trainable tensor; linear warm-up, then a constant rate."""
    if cfg.freeze_word_embeddings:
        model.body.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, min(cfg.warmup_steps, steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    return opt, sched


def train_lockstep(models: Sequence[torch.nn.Module], seeds: Sequence[int], cfg: TrainConfig,
                   tokenizer, train: Sequence[Example],
                   on_step: Callable[[int], None] | None = None,
                   on_epoch: Callable[[int], None] | None = None,
                   optimizers: Sequence | None = None) -> dict:
    """Train ``models`` side by side for ``cfg.epochs`` (each with its own seed: data order,
    token dropout, dropout). ``on_step(global_step)`` runs after every step of all models,
    ``on_epoch(epoch)`` after every epoch. Returns a log (loss per epoch, seconds)."""
    ids = encode(tokenizer, [x for x, _ in train])
    labels = torch.tensor([y for _, y in train])
    lengths = [len(x) for x in ids]
    steps_per_epoch = -(-len(ids) // cfg.batch_size)
    opts = list(optimizers) if optimizers is not None else [
        make_optimizer(m, cfg, steps_per_epoch * cfg.epochs) for m in models]
    rngs = [random.Random(s) for s in seeds]
    torch.manual_seed(seeds[0])
    for m in models:
        m.train()
    log = {"epochs": [], "steps_per_epoch": steps_per_epoch, "seeds": list(seeds)}
    start, step = time.perf_counter(), 0
    for epoch in range(1, cfg.epochs + 1):
        plans = [epoch_batches(len(ids), lengths, cfg.batch_size, r) for r in rngs]
        losses = [0.0] * len(models)
        for b in range(steps_per_epoch):
            for i, (m, (opt, sched)) in enumerate(zip(models, opts, strict=True)):
                idx = plans[i][b]
                batch = [token_dropout(ids[j], cfg.token_dropout, rngs[i]) for j in idx]
                logits = m(*collate(batch, tokenizer.pad_token_id))
                loss = F.cross_entropy(logits, labels[idx], label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses[i] += loss.item() / steps_per_epoch
            step += 1
            if on_step is not None:
                on_step(step)
        log["epochs"].append({"epoch": epoch, "loss": losses,
                              "seconds": round(time.perf_counter() - start, 1)})
        print(f"  epoch {epoch}/{cfg.epochs} loss {' '.join(f'{x:.4f}' for x in losses)} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        if on_epoch is not None:
            on_epoch(epoch)
    log["seconds"] = round(time.perf_counter() - start, 1)
    return log


def finetune(cfg: TrainConfig, tokenizer, make_anchor: Callable[[], torch.nn.Module],
             train: Sequence[Example], root: Path = ROOT) -> Path:
    """One seed's fine-tune from the anchor, with snapshots; skipped if already on disk."""
    run_dir = root / cfg.key()
    if is_done(run_dir):
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    print(f"fine-tune {run_dir.name} seed {cfg.seed}", flush=True)
    model = make_anchor()

    def snap(epoch: int) -> None:
        if epoch in cfg.snapshots:
            save_state(state_dict_copy(model, cfg.frozen), snapshot_path(run_dir, epoch))

    log = train_lockstep([model], [cfg.seed], cfg, tokenizer, train, on_epoch=snap)
    (run_dir / "log.json").write_text(json.dumps(log, indent=1) + "\n")
    return run_dir
