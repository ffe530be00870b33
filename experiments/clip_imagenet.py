"""GPU recipe: the paper's setting, CLIP ViT-B/32 fine-tuned on ImageNet, with open_clip.

For a user who has the CLIP weights and the ImageNet (+ shift) folders on disk; needs a GPU,
``pip install open_clip_torch torchvision`` and this project. One command per step:

    R=runs/clip; W=/path/to/ViT-B-32.pt (or an open_clip tag such as "openai"); D=/data
    python -m experiments.clip_imagenet zeroshot --pretrained $W --imagenet $D/imagenet --out $R
    python -m experiments.clip_imagenet finetune --out $R --imagenet $D/imagenet --seed 0
    python -m experiments.clip_imagenet finetune --out $R --imagenet $D/imagenet --seed 1
    modelstock merge $R/zeroshot $R/ft-s0 $R/ft-s1 -o $R/model-stock
    python -m experiments.clip_imagenet evaluate $R/zeroshot $R/ft-s0 $R/ft-s1 $R/model-stock \\
        --out $R --imagenet $D/imagenet --shift imagenet_v2=$D/imagenetv2 \\
        --shift imagenet_r=$D/imagenet-r --shift imagenet_sketch=$D/sketch \\
        --shift imagenet_a=$D/imagenet-a
    python -m experiments.clip_imagenet periodic --out $R --imagenet $D/imagenet --seeds 0 1

    python -m experiments.clip_imagenet dry-run     # CPU, tiny stand-in model, synthetic data

Folders are ``torchvision.datasets.ImageFolder`` layouts: ImageNet ``train/`` and ``val/`` with
one folder per WordNet id; ImageNet-R / -A / -Sketch likewise (R and A hold 200 of the 1000
classes: logits are restricted to the classes present); ImageNet-V2 with folders ``0..999``
(class indices). ObjectNet (the paper's fifth shift) needs its own class mapping: not wired.

Model: CLIP's image tower, L2-normalised features, and a linear zero-shot head built from the
80 OpenAI ImageNet prompt templates (logit scale folded in): the anchor ``w0``. Fine-tunes train
tower and head. Defaults follow the WiSE-FT / Model Soups CLIP ImageNet fine-tuning (AdamW,
lr 3e-5, weight decay 0.1, batch 512, 10 epochs, cosine schedule, 500 warm-up steps); the
paper's augmentation variants are not reproduced here. The dry run exercises this file's code
path (zero-shot head, training, checkpoint directories, `modelstock merge`, evaluation, periodic
merge) with a stand-in tower, because open_clip/torchvision are not installed on the CPU box.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass
class Recipe:
    model: str = "ViT-B-32"
    lr: float = 3e-5
    weight_decay: float = 0.1
    batch_size: int = 512
    epochs: int = 10
    warmup_steps: int = 500
    label_smoothing: float = 0.0
    grad_clip: float = 1.0
    workers: int = 8


class ZeroShotClassifier(nn.Module):
    """Image tower -> L2-normalised features -> linear head (the CLIP zero-shot classifier)."""

    def __init__(self, tower: nn.Module, head: torch.Tensor) -> None:
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(head.shape[1], head.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(head)
            self.head.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.tower(images), dim=-1))


@torch.no_grad()
def zero_shot_head(encode_text: Callable[[Sequence[str]], torch.Tensor],
                   classnames: Sequence[str], templates: Sequence[Callable[[str], str]],
                   logit_scale: float) -> torch.Tensor:
    """Rows = logit_scale * normalised mean of normalised prompt embeddings, one per class."""
    rows = []
    for name in classnames:
        emb = F.normalize(encode_text([t(name) for t in templates]).float(), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=0))
    return logit_scale * torch.stack(rows)


# -- the open_clip side (real runs) ---------------------------------------------------------------
def build_openclip(model_name: str, pretrained: str, device: str):
    """(zero-shot classifier, train transform, eval transform) from open_clip."""
    import open_clip
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    model, train_tf, eval_tf = open_clip.create_model_and_transforms(model_name,
                                                                     pretrained=pretrained)
    model = model.to(device).eval()
    tok = open_clip.get_tokenizer(model_name)

    def encode_text(texts):
        return model.encode_text(tok(list(texts)).to(device))

    head = zero_shot_head(encode_text, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES,
                          float(model.logit_scale.exp()))
    return ZeroShotClassifier(model.visual, head.cpu()), train_tf, eval_tf


def image_folder(root: Path, transform, imagenet_classes: Sequence[str] | None = None):
    """An ImageFolder and, for folders with a subset of the classes, their ImageNet indices."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root), transform=transform)
    if imagenet_classes is None or all(c.isdigit() for c in ds.classes):
        index = [int(c) for c in ds.classes] if all(c.isdigit() for c in ds.classes) else None
    else:
        pos = {c: i for i, c in enumerate(imagenet_classes)}
        index = [pos[c] for c in ds.classes]
    return ds, index


# -- training, checkpoints, evaluation (shared by real runs and the dry run) -----------------------
def loader(ds, batch_size: int, shuffle: bool, seed: int = 0, workers: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g,
                                       num_workers=workers, drop_last=shuffle,
                                       pin_memory=torch.cuda.is_available())


def cosine_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def save_model(model: nn.Module, directory: Path, info: dict) -> None:
    """A directory that `modelstock merge` reads: model.safetensors + info.json."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "info.json").write_text(json.dumps(info, indent=1) + "\n")


def load_model(model: nn.Module, path: Path) -> nn.Module:
    f = path / "model.safetensors" if path.is_dir() else path
    model.load_state_dict(load_file(str(f)))
    return model


def train(models: Sequence[nn.Module], seeds: Sequence[int], train_ds, recipe: Recipe,
          device: str, on_step: Callable[[], object] | None = None, optimizers=None,
          on_epoch: Callable[[], object] | None = None,
          log: Callable[[str], None] = print) -> list:
    """Fine-tune ``models`` in lockstep (one data order per seed); returns their optimizers."""
    loaders = [loader(train_ds, recipe.batch_size, True, s, recipe.workers) for s in seeds]
    steps = len(loaders[0]) * recipe.epochs
    opts = optimizers or [torch.optim.AdamW(m.parameters(), lr=recipe.lr,
                                            weight_decay=recipe.weight_decay) for m in models]
    scheds = [torch.optim.lr_scheduler.LambdaLR(
        o, lambda s: cosine_warmup(s, steps, recipe.warmup_steps)) for o in opts]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else None
    torch.manual_seed(seeds[0])
    start, step = time.perf_counter(), 0
    for epoch in range(recipe.epochs):
        for m in models:
            m.train()
        for batches in zip(*loaders, strict=True):
            for m, o, sch, (x, y) in zip(models, opts, scheds, batches, strict=True):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with amp if amp is not None else torch.enable_grad():
                    loss = F.cross_entropy(m(x), y, label_smoothing=recipe.label_smoothing)
                o.zero_grad(set_to_none=True)
                loss.backward()
                if recipe.grad_clip:
                    nn.utils.clip_grad_norm_(m.parameters(), recipe.grad_clip)
                o.step()
                sch.step()
            step += 1
            if on_step is not None:
                on_step()
        log(f"epoch {epoch + 1}/{recipe.epochs}: loss {loss.item():.4f}, step {step}/{steps}, "
            f"{time.perf_counter() - start:.0f} s")
        if on_epoch is not None:
            on_epoch()
    return opts


@torch.no_grad()
def top1(model: nn.Module, ds, index: Sequence[int] | None, device: str,
         batch_size: int = 256, workers: int = 0) -> float:
    """Top-1 accuracy; ``index`` restricts the logits to the classes a shift set has."""
    model.eval()
    correct = total = 0
    for x, y in loader(ds, batch_size, False, workers=workers):
        logits = model(x.to(device)).float()
        if index is not None:
            logits = logits[:, torch.as_tensor(index, device=logits.device)]
        correct += int((logits.argmax(-1).cpu() == y).sum())
        total += len(y)
    return correct / max(1, total)


def evaluate(model: nn.Module, checkpoints: Iterable[Path], sets: dict, device: str,
             out: Path, workers: int = 0) -> list[dict]:
    """Top-1 on ImageNet val (``id``) and each shift (``ood`` = their mean), per checkpoint."""
    rows = []
    for ckpt in checkpoints:
        load_model(model, Path(ckpt)).to(device)
        row = {"checkpoint": str(ckpt)}
        for name, (ds, index) in sets.items():
            row[name] = top1(model, ds, index, device, workers=workers)
        shifts = [v for k, v in row.items() if k not in ("checkpoint", "imagenet")]
        row["ood"] = sum(shifts) / len(shifts) if shifts else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def periodic(make_model: Callable[[], nn.Module], anchor_dir: Path, seeds: Sequence[int],
             train_ds, recipe: Recipe, device: str, period: int, unit: str,
             optimizer_state: str, out: Path) -> Path:
    """Model Stock during training (the library's `PeriodicModelStock`); saves the final merge."""
    from modelstock.training import PeriodicModelStock

    anchor = load_model(make_model(), anchor_dir).to(device)
    models = [load_model(make_model(), anchor_dir).to(device) for _ in seeds]
    opts = [torch.optim.AdamW(m.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
            for m in models]
    pms = PeriodicModelStock(models=models, anchor=anchor, period=period, unit=unit,
                             optimizers=opts, optimizer_state=optimizer_state)
    train(models, seeds, train_ds, recipe, device, optimizers=opts,
          on_step=pms.step if unit == "step" else None,
          on_epoch=pms.step if unit == "epoch" else None)
    pms.merge()  # the final merge: every model now holds it
    merged = models[0]
    target = out / f"periodic-{period}{unit}-{'+'.join(map(str, seeds))}"
    save_model(merged, target, {"seeds": list(seeds), "period": period, "unit": unit,
                                "optimizer_state": optimizer_state, "recipe": asdict(recipe)})
    return target


# -- the dry run: the same code path with a stand-in tower and synthetic data ----------------------
class TinyTower(nn.Module):
    """A 2-block ViT-shaped stand-in (patch embedding, pre-LN blocks, projection)."""

    def __init__(self, width: int = 32, out: int = 16, patch: int = 8, size: int = 32):
        super().__init__()
        self.patch = nn.Conv2d(3, width, patch, patch)
        self.pos = nn.Parameter(0.02 * torch.randn((size // patch) ** 2 + 1, width))
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        return self.proj(self.ln(self.blocks(t)[:, 0]))


def synthetic(n: int, classes: int, seed: int, noise: float = 0.5):
    """Images whose class sets a coloured stripe pattern, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    base = torch.zeros(classes, 3, 32, 32)
    for c in range(classes):
        base[c, c % 3, :, (4 * c) % 32 : (4 * c) % 32 + 4] = 1.0
    x = base[y] + noise * torch.randn(n, 3, 32, 32, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def dry_run(out: Path, classes: int = 8, log: Callable[[str], None] = print) -> dict:
    """Every step of the recipe on CPU in seconds: zero-shot, 2 fine-tunes, `modelstock merge`
    (the CLI's library call), evaluation, and periodic Model Stock when the library has it."""
    from click.testing import CliRunner

    from modelstock.cli import main as modelstock_cli

    torch.manual_seed(0)
    recipe = Recipe(model="tiny", lr=1e-3, batch_size=16, epochs=1, warmup_steps=2, workers=0)
    tower = TinyTower()
    text = nn.EmbeddingBag(1000, 16)  # stand-in text tower: prompts -> hashed tokens

    def encode_text(texts):
        ids = [[zlib.crc32(w.encode()) % 1000 for w in t.split()] for t in texts]
        width = max(map(len, ids))
        return text(torch.tensor([x + x[:1] * (width - len(x)) for x in ids]))

    names = [f"class{c}" for c in range(classes)]
    templates = [lambda c: f"a photo of a {c}.", lambda c: f"a picture of the {c}."]
    head = zero_shot_head(encode_text, names, templates, logit_scale=10.0)

    def make_model() -> nn.Module:
        return ZeroShotClassifier(TinyTower(), head)

    zs = ZeroShotClassifier(tower, head)
    save_model(zs, out / "zeroshot", {"recipe": asdict(recipe)})
    train_ds = synthetic(128, classes, seed=1)
    for seed in (0, 1):
        m = load_model(make_model(), out / "zeroshot")
        train([m], [seed], train_ds, recipe, "cpu", log=log)
        save_model(m, out / f"ft-s{seed}", {"seed": seed, "recipe": asdict(recipe)})
    res = CliRunner().invoke(modelstock_cli, ["merge", str(out / "zeroshot"), str(out / "ft-s0"),
                                              str(out / "ft-s1"), "-o", str(out / "model-stock")])
    if res.exit_code != 0:
        raise RuntimeError(f"modelstock merge failed: {res.output}")
    ckpts = [out / "zeroshot", out / "ft-s0", out / "ft-s1", out / "model-stock"]
    ckpts.append(periodic(make_model, out / "zeroshot", (0, 1), train_ds, recipe, "cpu",
                          period=4, unit="step", optimizer_state="keep", out=out))
    sets = {"imagenet": (synthetic(128, classes, seed=2), None),
            "shift_noise": (synthetic(128, classes, seed=3, noise=1.5), None),
            "shift_subset": (synthetic(128, classes // 2, seed=4), list(range(classes // 2)))}
    rows = evaluate(make_model(), ckpts, sets, "cpu", out)
    return {"rows": rows, "checkpoints": [str(c) for c in ckpts]}


# -- command line --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.clip_imagenet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("zeroshot", "finetune", "evaluate", "periodic"):
        s = sub.add_parser(name)
        s.add_argument("--out", type=Path, required=True)
        s.add_argument("--imagenet", type=Path, required=True)
        s.add_argument("--model", default=Recipe.model)
        s.add_argument("--pretrained", default="openai")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--epochs", type=int, default=Recipe.epochs)
        s.add_argument("--batch-size", type=int, default=Recipe.batch_size)
        s.add_argument("--lr", type=float, default=Recipe.lr)
        s.add_argument("--workers", type=int, default=Recipe.workers)
        if name == "finetune":
            s.add_argument("--seed", type=int, required=True)
        if name == "periodic":
            s.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
            s.add_argument("--period", type=int, default=1)
            s.add_argument("--unit", choices=("step", "epoch"), default="epoch")
            s.add_argument("--optimizer-state", choices=("keep", "reset"), default="keep")
        if name == "evaluate":
            s.add_argument("checkpoints", type=Path, nargs="+")
            s.add_argument("--shift", action="append", default=[], metavar="NAME=DIR")
    d = sub.add_parser("dry-run", help="the whole recipe on CPU with a tiny stand-in model")
    d.add_argument("--out", type=Path, default=Path("runs/clip-dry-run"))
    args = p.parse_args(argv)
    if args.cmd == "dry-run":
        result = dry_run(args.out)
        print(f"dry run ok: {len(result['rows'])} checkpoints evaluated, see {args.out}")
        return
    recipe = Recipe(model=args.model, lr=args.lr, batch_size=args.batch_size,
                    epochs=args.epochs, workers=args.workers)
    model, train_tf, eval_tf = build_openclip(args.model, args.pretrained, args.device)
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # noqa: F401 (needs open_clip)

    if args.cmd == "zeroshot":
        save_model(model, args.out / "zeroshot", {"recipe": asdict(recipe),
                                                  "pretrained": args.pretrained})
        return

    def make_model() -> nn.Module:
        return build_openclip(args.model, args.pretrained, "cpu")[0]

    if args.cmd == "finetune":
        train_ds, _ = image_folder(args.imagenet / "train", train_tf)
        m = load_model(model, args.out / "zeroshot").to(args.device)
        train([m], [args.seed], train_ds, recipe, args.device)
        save_model(m, args.out / f"ft-s{args.seed}", {"seed": args.seed, "recipe": asdict(recipe)})
    elif args.cmd == "periodic":
        train_ds, _ = image_folder(args.imagenet / "train", train_tf)
        print(periodic(make_model, args.out / "zeroshot", args.seeds, train_ds, recipe,
                       args.device, args.period, args.unit, args.optimizer_state, args.out))
    elif args.cmd == "evaluate":
        val, _ = image_folder(args.imagenet / "val", eval_tf)
        wnids = val.classes
        sets = {"imagenet": (val, None)}
        for spec in args.shift:
            name, root = spec.split("=", 1)
            sets[name] = image_folder(Path(root), eval_tf, wnids)
        evaluate(model.to(args.device), args.checkpoints, sets, args.device, args.out,
                 args.workers)


if __name__ == "__main__":
    sys.exit(main())
