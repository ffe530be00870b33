"""Model Stock for LoRA adapters: LoRA fine-tunes of the zero-shot MiniLM on airline tweets.

    python -m experiments.lora_study train --recipe lr1e-3 --seeds 0 1     # cached, resumable
    python -m experiments.lora_study pilot --recipes lr1e-3 lr3e-3          # seeds 0 and 1
    python -m experiments.lora_study rows --recipe lr1e-3 --seeds 0 1 2 3 4 5 [--reverse]
    python -m experiments.lora_study analyze --recipe lr1e-3 --seeds 0 1 2 3 4 5
    # ablation (every seed starts from the same LoRA factors), results in lora/shared-init:
    python -m experiments.lora_study analyze --recipe lr1e-3-shared-init --seeds 0 1 2 3
        --pairs-only --out experiments/results/tweets/lora/shared-init

The anchor is the full study's zero-shot model (`experiments.textmodel.zero_shot_model`). PEFT
puts LoRA factors on every attention (query, key, value, output) and MLP (intermediate, output)
projection of the MiniLM encoder; the classification head is trained as a full tensor
(``modules_to_save``). Each epoch listed in the recipe's snapshots is saved as a PEFT adapter
directory (``adapter_config.json`` + ``adapter_model.safetensors``) under
``runs/lora/<key>/epochNN``, the key a hash of the settings; a run with ``log.json`` is skipped.

Model Stock of adapters is the library's factor-space merge (`modelstock.lora.merge_lora`, the
base being the anchor's state dict, so the head is merged with Model Stock around the zero-shot
head); the other merges (uniform averages, soups, WiSE-FT) are `modelstock.merge_state_dicts` /
`modelstock.soups.greedy_soup` of the adapters' materialised dense weights. `analyze` checks once,
on one pair, that the factor-space Model Stock equals the dense one to float32 rounding.
Evaluations are cached by name (`experiments.merges.Evaluator`), as in `experiments.study`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from modelstock.lora import LoraAdapter, inspect_lora, merge_lora, read_lora_adapter
from modelstock.lora.merge import base_key

from . import geometry, plots
from .evaluation import format_table, make_splits
from .finetune import ROOT as FULL_ROOT
from .finetune import TrainConfig, train_lockstep
from .merges import merge, subsets
from .study import (
    RESULTS as FULL_RESULTS,
)
from .study import (
    Context,
    disagreement,
    family_table,
    greedy_row,
    pair_cells,
    pair_comparison,
    stats,
    tag,
    write_pilot,
)
from .textmodel import load_tokenizer, zero_shot_model
from .tweets import load_topics

ROOT = FULL_ROOT.parent / "lora"
RESULTS = FULL_RESULTS / "lora"
TARGETS = ("query", "key", "value", "dense")  # attention q/k/v/output, MLP intermediate/output
WISE_ALPHAS = (0.3, 0.5, 0.7)
N_SUBSETS = 3
PILOT_SEEDS = (0, 1)


@dataclass(frozen=True)
class LoraSpec:
    """The adapter's shape: rank, alpha (PEFT scaling alpha / r), dropout, target modules, the
    modules trained whole."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    targets: tuple[str, ...] = TARGETS
    modules_to_save: tuple[str, ...] = ("head",)
    init_seed: int | None = None  # the factors' init: the run's seed unless set (ablation)


@dataclass(frozen=True)
class Recipe:
    """A training recipe (`TrainConfig`: optimiser, data, seed) and the adapter's shape."""

    train: TrainConfig
    lora: LoraSpec = field(default_factory=LoraSpec)

    def key(self, seed: int | None = None) -> str:
        """``lora-<hash>`` of the settings (the seed's run with ``seed``, the recipe without)."""
        cfg = self.train if seed is None else self.train.with_seed(seed)
        if seed is None:
            cfg = replace(cfg, seed=-1)
        lora = asdict(self.lora)
        if lora["init_seed"] is None:  # the keys of runs made before the field existed
            del lora["init_seed"]
        return cfg.key("lora", lora=lora)

    def with_seed(self, seed: int) -> Recipe:
        return replace(self, train=self.train.with_seed(seed))


_BASE = TrainConfig(token_dropout=0.1, epochs=3, snapshots=(1, 2, 3))
RECIPES: dict[str, Recipe] = {
    "lr1e-3": Recipe(replace(_BASE, lr=1e-3)),
    "lr3e-3": Recipe(replace(_BASE, lr=3e-3)),
    # ablation: every seed starts from the same LoRA factors (seed 0's); data order, token
    # dropout and LoRA dropout still differ by seed
    "lr1e-3-shared-init": Recipe(replace(_BASE, lr=1e-3), LoraSpec(init_seed=0)),
}


def snapshot_dir(run_dir: Path, epoch: int) -> Path:
    return run_dir / f"epoch{epoch:02d}"


# -- training ---------------------------------------------------------------------------------
def lora_model(anchor: torch.nn.Module, spec: LoraSpec, seed: int) -> torch.nn.Module:
    """A PEFT LoRA model around a copy of the anchor (the seed, or ``spec.init_seed``, sets
    the factors' init)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed if spec.init_seed is None else spec.init_seed)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.targets),
                        modules_to_save=list(spec.modules_to_save), bias="none")
    return get_peft_model(copy.deepcopy(anchor), config)


def save_adapter(model: torch.nn.Module, out: Path) -> None:
    """PEFT's ``save_pretrained``, into a temporary sibling renamed into place."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def train_lora(recipe: Recipe, tokenizer, anchor: torch.nn.Module, train,
               root: Path | None = None) -> Path:
    """One seed's LoRA fine-tune from the anchor, adapters saved at the snapshot epochs."""
    cfg = recipe.train
    root = ROOT if root is None else root
    run_dir = root / recipe.key(cfg.seed)
    if (run_dir / "log.json").exists():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(recipe), indent=1) + "\n")
    print(f"LoRA fine-tune {run_dir.name} seed {cfg.seed}", flush=True)
    model = lora_model(anchor, recipe.lora, cfg.seed)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def snap(epoch: int) -> None:
        if epoch in cfg.snapshots:
            save_adapter(model, snapshot_dir(run_dir, epoch))

    log = train_lockstep([model], [cfg.seed], cfg, tokenizer, train, on_epoch=snap)
    log["trainable_parameters"] = n_train
    (run_dir / "log.json").write_text(json.dumps(log, indent=1) + "\n")
    return run_dir


def cmd_train(args: argparse.Namespace) -> None:
    recipe = RECIPES[args.recipe]
    tok = load_tokenizer()
    splits = make_splits(load_topics(), recipe.train.sizes)
    anchor = zero_shot_model(tok, recipe.train.n_layers)
    for seed in args.seeds:
        run = train_lora(recipe.with_seed(seed), tok, anchor, splits["train"])
        print(f"done {run}", flush=True)


# -- adapters as dense weights ------------------------------------------------------------------
def dense_weights(anchor: dict[str, torch.Tensor], adapter) -> dict[str, torch.Tensor]:
    """The fine-tuned model's state dict: the anchor plus each module's LoRA delta (summed in
    float64, rounded once), the whole tensors (``modules_to_save``) as saved. ``adapter``: a
    `LoraAdapter` or a merged adapter (`modelstock.lora.LoraMerge`); tensors the adapter does
    not touch are the anchor's own (shared, not copied)."""
    out = dict(anchor)
    for name, m in adapter.modules.items():
        w0 = anchor[name + ".weight"]
        out[name + ".weight"] = (w0.to(torch.float64) + m.delta(torch.float64)).to(w0.dtype)
    for key, v in adapter.dense.items():
        k = base_key(key)
        if k not in anchor:
            raise KeyError(f"{key}: the anchor has no {k}")
        out[k] = v.to(anchor[k].dtype)
    return out


class LoraContext(Context):
    """`experiments.study.Context` (tokenizer, splits, suites, anchor, cached evaluators) for
    a LoRA recipe: a seed's model at an epoch is its adapter's dense weights."""

    def __init__(self, recipe: Recipe, root: Path | None = None) -> None:
        root = ROOT if root is None else root
        super().__init__(recipe.train, root)
        self.recipe = recipe
        self.regime_key = recipe.key()
        for ev in (self.evaluate, self.val_score):
            ev.cache_dir = root / "evals" / self.regime_key / ev.suite.key
        self._adapters: dict[tuple[int, int], LoraAdapter] = {}
        self._dense: dict[tuple[int, int], dict] = {}

    def run_dir(self, seed: int) -> Path:
        return self.root / self.recipe.key(seed)

    def has(self, seed: int, epoch: int) -> bool:
        return (snapshot_dir(self.run_dir(seed), epoch) / "adapter_model.safetensors").exists()

    def adapter(self, seed: int, epoch: int) -> LoraAdapter:
        if (seed, epoch) not in self._adapters:
            self._adapters[seed, epoch] = read_lora_adapter(
                snapshot_dir(self.run_dir(seed), epoch))
        return self._adapters[seed, epoch]

    def ft(self, seed: int, epoch: int) -> dict[str, torch.Tensor]:
        if (seed, epoch) not in self._dense:
            self._dense[seed, epoch] = dense_weights(self.anchor, self.adapter(seed, epoch))
        return self._dense[seed, epoch]

    def model_stock(self, seeds: Sequence[int], epoch: int):
        """Model Stock of the seeds' adapters in factor space (the library's `merge_lora`,
        base = the anchor, so the head is merged around the zero-shot head)."""
        return merge_lora([self.adapter(s, epoch) for s in seeds], base=self.anchor,
                          threads=1)

    def model_stock_dense(self, seeds: Sequence[int], epoch: int) -> dict[str, torch.Tensor]:
        return dense_weights(self.anchor, self.model_stock(seeds, epoch))


def factor_vs_dense(ctx: LoraContext, seeds: Sequence[int], epoch: int) -> dict:
    """Model Stock of two adapters in factor space vs `merge_state_dicts` of their dense
    weights: the largest difference, relative to float32 rounding of the weight."""
    fac = ctx.model_stock_dense(seeds, epoch)
    den = merge(ctx.anchor, [ctx.ft(s, epoch) for s in seeds], "model-stock")[0]
    worst, worst_ulps, name = 0.0, 0.0, None
    for k, v in den.items():
        if not v.is_floating_point():
            continue
        d = float((fac[k].to(torch.float64) - v.to(torch.float64)).abs().max())
        ulp = float(torch.finfo(v.dtype).eps) * max(float(v.abs().max()), 1e-30)
        if d / ulp > worst_ulps:
            worst, worst_ulps, name = d, d / ulp, k
    ok = worst_ulps <= 4.0
    assert ok, f"factor-space and dense Model Stock differ by {worst_ulps:.1f} ulps ({name})"
    return {"seeds": list(seeds), "epoch": epoch, "max_abs_diff": worst,
            "max_diff_in_float32_ulps_of_tensor_max": worst_ulps, "tensor": name,
            "equal_to_float32_rounding": ok}


# -- rows --------------------------------------------------------------------------------------
def lora_rows(ctx: LoraContext, epoch: int, seeds: Sequence[int], full: bool = True,
              reverse: bool = False, max_pairs: int | None = None,
              greedy: bool = True) -> list[dict]:
    """Every model of the study at one epoch (names as in `experiments.study.epoch_rows`):
    zero-shot, fine-tunes, every pair (Model Stock in factor space, uniform average dense);
    with ``full`` also N = 3 / 4 subsets, the uniform soup, WiSE-FT of the first seed and the
    greedy soup (unless not ``greedy``)."""
    e = f"e{epoch:02d}"
    A = ctx.anchor

    def uni(group):
        return lambda: merge(A, [ctx.ft(s, epoch) for s in group], "uniform")[0]

    def ms(group):
        return lambda: ctx.model_stock_dense(group, epoch)

    specs = [("zero-shot", A, {"kind": "zero-shot", "alpha": 0.0, "epoch": 0})]
    for s in seeds:
        specs.append((f"{e}/ft/s{s}", lambda s=s: ctx.ft(s, epoch),
                      {"kind": "fine-tune", "seed": s, "epoch": epoch}))
    pairs = list(itertools.combinations(seeds, 2))[:max_pairs]
    for p in pairs:
        specs.append((f"{e}/ms/{tag(p)}", ms(p),
                      {"kind": "model-stock", "seeds": list(p), "epoch": epoch}))
        specs.append((f"{e}/uni/{tag(p)}", uni(p),
                      {"kind": "uniform-2", "seeds": list(p), "epoch": epoch}))
    if full and len(seeds) > 2:
        specs.append((f"{e}/soup/{tag(seeds)}", uni(seeds),
                      {"kind": "uniform-soup", "seeds": list(seeds), "epoch": epoch}))
        for n in (3, 4):
            for idx in subsets(len(seeds), n, N_SUBSETS, seed=n):
                grp = [seeds[i] for i in idx]
                specs.append((f"{e}/ms{n}/{tag(grp)}", ms(grp),
                              {"kind": f"model-stock-{n}", "seeds": grp, "epoch": epoch}))
                specs.append((f"{e}/uni{n}/{tag(grp)}", uni(grp),
                              {"kind": f"uniform-{n}", "seeds": grp, "epoch": epoch}))
        s0 = seeds[0]
        for a in WISE_ALPHAS:
            specs.append((f"{e}/wise{a:.2f}/s{s0}",
                          lambda a=a: merge(A, [ctx.ft(s0, epoch)], "wise-ft", alpha=a)[0],
                          {"kind": "wise-ft", "alpha": a, "seeds": [s0], "epoch": epoch,
                           "curve": f"s{s0}"}))
    order = range(len(specs) - 1, -1, -1) if reverse else range(len(specs))
    done = {}
    for i in order:
        done[i] = ctx.evaluate(specs[i][0], specs[i][1], **specs[i][2])
        print(f"  {specs[i][0]}: ID {100 * done[i]['id_acc']:.2f} OOD "
              f"{100 * done[i]['ood_acc']:.2f}", flush=True)
    rows = [done[i] for i in range(len(specs))]
    if full and greedy and len(seeds) > 2:
        rows.append(greedy_row(ctx, epoch, seeds, lambda s: ctx.ft(s, epoch)))
    return rows


# -- geometry ----------------------------------------------------------------------------------
def _deg(c: float) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def lora_layers(report, modules: set[str], base: dict[str, torch.Tensor] | None = None
                ) -> list[dict]:
    """Per layer of a k-adapter `inspect_lora` report (LoRA modules: kind ``lora``; tensors
    trained whole: ``head``): angle per pair (deg) and its mean / std over pairs, norms (mean,
    relative std over seeds, relative to the base weight's norm) and the k-model t."""
    out = []
    for x in report.layers:
        if x.rule != "model_stock" or not x.norms or not any(x.norms) or not x.pair_cos:
            continue
        ang, n = np.array([_deg(c) for c in x.pair_cos]), np.array(x.norms)
        name = x.name.removeprefix("base_model.model.")
        w0 = None
        if base is not None:
            key = name + ".weight" if x.name in modules else base_key(x.name)
            w0 = base.get(key)
        w0n = None if w0 is None else float(w0.double().norm())
        rel = float(n.mean() / w0n) if w0n else None
        out.append({"name": x.name, "kind": "lora" if x.name in modules else "head",
                    "angle_mean": float(ang.mean()),
                    "angle_std": float(ang.std(ddof=1)) if len(ang) > 1 else 0.0,
                    "angle_min": float(ang.min()), "angle_max": float(ang.max()),
                    "norm_mean": float(n.mean()),
                    "norm_rel_std": float(n.std(ddof=1) / n.mean()) if len(n) > 1 else 0.0,
                    "rel_norm": rel, "t": x.t})
    return out


def layer_summary(records: Sequence[dict]) -> dict[str, dict]:
    """Per kind: the fields `experiments.study.write_tables` prints for the full study."""
    out = {}
    for kind in dict.fromkeys(r["kind"] for r in records):
        rs = [r for r in records if r["kind"] == kind]
        means = [r["angle_mean"] for r in rs]
        rels = [r["rel_norm"] for r in rs if r["rel_norm"] is not None]
        out[kind] = {"layers": len(rs), "angle_mean": float(np.mean(means)),
                     "angle_range": [float(min(means)), float(max(means))],
                     "angle_std_across_pairs": float(np.mean([r["angle_std"] for r in rs])),
                     "norm_rel_std_across_seeds": float(np.mean([r["norm_rel_std"]
                                                                 for r in rs])),
                     "rel_norm_median": float(np.median(rels)) if rels else None,
                     "t_median": float(np.median([r["t"] for r in rs]))}
    return out


def lora_geometry(adapters: Sequence[LoraAdapter], labels: Sequence[int],
                  base: dict[str, torch.Tensor] | None = None) -> dict:
    """Angles, norms and t of k adapters, from their factors (`modelstock.lora.inspect_lora`):
    per layer over all pairs, per kind, and per pair (N = 2: median t over LoRA modules, the
    head's t, the whole-model angle)."""
    modules = set(adapters[0].modules)
    rep = inspect_lora(list(adapters), base=base, threads=1)
    recs = lora_layers(rep, modules, base)
    pairs = []
    for i, j in itertools.combinations(range(len(adapters)), 2):
        rep2 = inspect_lora([adapters[i], adapters[j]], base=base, threads=1)
        lay = lora_layers(rep2, modules, base)
        ts = [r["t"] for r in lay if r["kind"] == "lora"]
        head = [r["t"] for r in lay if r["kind"] == "head"]
        pairs.append({"seeds": [labels[i], labels[j]], "t_mean": float(np.mean(ts)),
                      "t_median": float(np.median(ts)),
                      "t_head": [float(t) for t in head],
                      "lora_angle_mean": float(np.mean([r["angle_mean"] for r in lay
                                                        if r["kind"] == "lora"])),
                      "model_angle": geometry.model_angle(rep2)})
    return {"seeds": list(labels), "layers": recs, "summary": layer_summary(recs),
            "pairs": pairs}


def full_reference(lora_layers_: Sequence[dict]) -> dict | None:
    """The full fine-tune study's numbers on the same 36 weight matrices (its JSON files), and
    how the per-module angles of the two studies relate."""
    path = FULL_RESULTS / "noisy"
    if not (path / "study.json").exists():
        return None
    full = json.loads((path / "study.json").read_text())
    layers = {r["name"]: r for r in json.loads((path / "geometry_layers.json").read_text())}
    both = [(r, layers[r["name"].removeprefix("base_model.model.") + ".weight"])
            for r in lora_layers_ if r["kind"] == "lora"
            and r["name"].removeprefix("base_model.model.") + ".weight" in layers]
    pairs = full["geometry"]["pairs"]
    out = {"source": str(path.relative_to(FULL_RESULTS.parent.parent)),
           "seeds": full["seeds"], "epochs": full["config"]["epochs"],
           "summary": full["geometry"]["summary"],
           "pair_model_angle": [min(p["model_angle"] for p in pairs),
                                max(p["model_angle"] for p in pairs)],
           "pair_t_median": [min(p["t_median"] for p in pairs),
                             max(p["t_median"] for p in pairs)],
           "prediction_disagreement": full["prediction_disagreement"],
           "by_epoch": {e: full["by_epoch"][e] for e in ("3", "10") if e in full["by_epoch"]}}
    pilot = FULL_RESULTS / "pilot.json"
    e3 = json.loads(pilot.read_text()).get("noisy/e03") if pilot.exists() else None
    if e3 is not None:  # the full study's pilot: seeds 0 and 1 of its recipe after 3 epochs
        out["full_pilot_epoch3"] = {"seeds": [0, 1], "weight": e3["summary"]["weight"],
                                    "pair": e3["pairs"][0], "disagreement": e3["disagreement"]}
    if len(both) > 2:
        a = np.array([x["angle_mean"] for x, _ in both])
        b = np.array([y["angle_mean"] for _, y in both])
        out["same_modules"] = {
            "modules": len(both),
            "full_angle_mean": float(b.mean()), "full_angle_range": [float(b.min()),
                                                                     float(b.max())],
            "full_angle_std_across_pairs": float(np.mean([y["angle_std"] for _, y in both])),
            "full_norm_rel_std": float(np.mean([y["norm_rel_std"] for _, y in both])),
            "full_t_median_k": float(np.median([y["t"] for _, y in both])),
            "angle_correlation_lora_vs_full": float(np.corrcoef(a, b)[0, 1])}
    return out


# -- pilot -------------------------------------------------------------------------------------
def cmd_pilot(args: argparse.Namespace) -> None:
    """Seeds 0 and 1 of each recipe at each snapshot: accuracy, disagreement, angle, t."""
    out, seeds = {}, list(PILOT_SEEDS)
    lines = ["| recipe | lr | epoch | FT ID acc (s0, s1) | FT OOD acc | uniform-2 ID / OOD | "
             "MS ID / OOD | pred. disagreement | model angle (deg) | LoRA module angle, mean "
             "(deg) | median t (LoRA modules) | head t |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.recipes:
        ctx = LoraContext(RECIPES[name])
        epochs = [e for e in ctx.cfg.snapshots if e in (args.epochs or ctx.cfg.snapshots)]
        for epoch in epochs:
            if not all(ctx.has(s, epoch) for s in seeds):
                continue
            rows = lora_rows(ctx, epoch, seeds, full=False)
            by = {r["kind"]: r for r in rows if r["kind"] != "fine-tune"}
            fts = [r for r in rows if r["kind"] == "fine-tune"]
            geo = lora_geometry([ctx.adapter(s, epoch) for s in seeds], seeds, ctx.anchor)
            e = f"e{epoch:02d}"
            dis = disagreement(ctx, f"{e}/ft/s0", f"{e}/ft/s1")
            p = geo["pairs"][0]
            out[f"{name}/{e}"] = {"recipe": name, "epoch": epoch, "lr": ctx.cfg.lr,
                                  "rows": rows, "disagreement": dis, "pair": p,
                                  "summary": geo["summary"],
                                  "train_seconds": train_seconds(ctx, seeds)}
            pct = [f"{100 * r['id_acc']:.1f}" for r in fts]
            ood = [f"{100 * r['ood_acc']:.1f}" for r in fts]
            lines.append(
                f"| {name} | {ctx.cfg.lr:g} | {epoch} | {', '.join(pct)} | {', '.join(ood)} | "
                f"{pair_cells(by, dis)} | {p['model_angle']:.1f} | {p['lora_angle_mean']:.1f} | "
                f"{p['t_median']:.3f} | {', '.join(f'{t:.3f}' for t in p['t_head'])} |")
    write_pilot(RESULTS, out, lines)


def train_seconds(ctx: LoraContext, seeds: Sequence[int]) -> dict:
    out = {}
    for s in seeds:
        log = ctx.run_dir(s) / "log.json"
        if log.exists():
            out[f"s{s}"] = json.loads(log.read_text())["seconds"]
    return out


# -- the study ---------------------------------------------------------------------------------
def finished_seeds(ctx: LoraContext, seeds: Sequence[int], epoch: int) -> list[int]:
    return [s for s in seeds if ctx.has(s, epoch)]


def cmd_rows(args: argparse.Namespace) -> None:
    """Evaluate (and cache) the study's rows, so two processes can share the work."""
    ctx = LoraContext(RECIPES[args.recipe])
    epoch = ctx.cfg.epochs
    seeds = finished_seeds(ctx, args.seeds, epoch)
    print(f"rows of epoch {epoch}: seeds {seeds}", flush=True)
    lora_rows(ctx, epoch, seeds, full=not args.pairs_only, reverse=args.reverse,
              max_pairs=args.max_pairs,
              greedy=not args.reverse)  # the greedy soup once, in the forward process
    print(f"{ctx.evaluate.count} evaluations ({ctx.evaluate.seconds:.0f} s)", flush=True)


def greedy_comparison(rows: Sequence[dict]) -> dict:
    """Model Stock of each pair minus the greedy soup (paired over the pairs)."""
    greedy = next((r for r in rows if r.get("kind") == "greedy-soup"), None)
    if greedy is None:
        return {}
    ms = [r for r in rows if r.get("kind") == "model-stock"]
    return {m: stats([r[m] - greedy[m] for r in ms])
            for m in ("id_acc", "ood_acc", "id_bacc", "ood_bacc")}


def cmd_analyze(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    name = args.recipe
    ctx = LoraContext(RECIPES[name])
    epoch = ctx.cfg.epochs
    seeds = finished_seeds(ctx, args.seeds, epoch)
    if len(seeds) < 2:
        sys.exit(f"need >= 2 finished LoRA fine-tunes, have {seeds}")
    print(f"analyze {name}: seeds {seeds}, epoch {epoch}", flush=True)
    check = factor_vs_dense(ctx, seeds[:2], epoch)
    print(f"factor-space vs dense Model Stock: {check}", flush=True)
    rows = lora_rows(ctx, epoch, seeds, full=not args.pairs_only, max_pairs=args.max_pairs)
    table = family_table(rows, ctx.ood)
    geo = lora_geometry([ctx.adapter(s, epoch) for s in seeds], seeds, ctx.anchor)
    fts = [r for r in rows if r.get("kind") == "fine-tune"]
    dis = [disagreement(ctx, a["name"], b["name"]) for a, b in itertools.combinations(fts, 2)]
    log = json.loads((ctx.run_dir(seeds[0]) / "log.json").read_text())
    result = {"config": asdict(ctx.cfg), "lora": asdict(ctx.recipe.lora), "regime": f"LoRA {name}",
              "recipe": name, "run_key": ctx.regime_key, "ood": list(ctx.ood),
              "seeds": list(seeds),
              "trainable_parameters": log.get("trainable_parameters"),
              "pairs_evaluated": sum(r.get("kind") == "model-stock" for r in rows),
              "table": table, "pair_comparison": pair_comparison(rows),
              "ms_minus_greedy_soup": greedy_comparison(rows),
              "by_epoch": {epoch: {f["kind"]: {m: f[m] for m in ("id_acc", "ood_acc", "id_bacc",
                                                                   "ood_bacc")}
                                   for f in table}},
              "geometry": {k: v for k, v in geo.items() if k != "layers"},
              "full_finetune_reference": full_reference(geo["layers"]),
              "factor_vs_dense_check": check,
              "prediction_disagreement": {"mean": float(np.mean(dis)), "min": float(min(dis)),
                                          "max": float(max(dis))},
              "eval_sizes": {k: len(v) for k, v in ctx.suite.labels.items()},
              "train_seconds": train_seconds(ctx, seeds), "rows": rows}
    result["analyze_seconds"] = round(time.perf_counter() - start, 1)
    out_dir = Path(args.out) if args.out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "study.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "geometry_layers.json").write_text(json.dumps(geo["layers"], indent=1) + "\n")
    write_tables(out_dir, result)
    plot_rows = [r for r in rows if r.get("kind") not in ("uniform-3", "uniform-4")]
    plot_rows += [dict(r, kind="wise-ft", alpha=1.0, curve=f"s{seeds[0]}")
                  for r in fts if r["seed"] == seeds[0]]
    plot_rows += [dict(r, kind="wise-ft", curve=f"s{seeds[0]}")
                  for r in rows if r.get("kind") == "zero-shot"]
    plots.figure1(plot_rows, out_dir / "figure1.png",
                  f"LoRA ({name}), {epoch} epochs, k={len(seeds)}", id_name=ctx.id_name,
                  ood_name=ctx.ood_name)
    print(format_table(table, extra=("cost", "count")), flush=True)
    print(f"evaluations this run: {ctx.evaluate.count} ({ctx.evaluate.seconds:.0f} s); "
          f"analyze took {time.perf_counter() - start:.0f} s")


def write_tables(out_dir: Path, result: dict) -> None:
    """`experiments.study.write_tables` (the same layout as the full study's tables.md), then
    the greedy-soup comparison, the full fine-tune reference and the factor/dense check."""
    from .study import write_tables as study_tables

    study_tables(out_dir, result)
    lines = ["", "## Model Stock of a pair minus the greedy soup (points)", ""]
    for metric, v in result["ms_minus_greedy_soup"].items():
        lines.append(f"- {metric}: {100 * v['mean']:+.2f} +- {100 * v['std']:.2f} "
                     f"(wins {v['wins']}/{result['pairs_evaluated']})")
    ref = result["full_finetune_reference"]
    if ref and "same_modules" in ref:
        g, s = result["geometry"]["summary"]["lora"], ref["same_modules"]
        lines += ["", "## LoRA deltas vs full fine-tunes, the same 36 weight matrices", "",
                  "| | LoRA (this study) | full fine-tunes (`results/tweets/noisy`) |",
                  "|---|---|---|",
                  f"| mean angle between seeds (deg) | {g['angle_mean']:.1f} | "
                  f"{s['full_angle_mean']:.1f} |",
                  f"| range over modules (deg) | {g['angle_range'][0]:.1f}-"
                  f"{g['angle_range'][1]:.1f} | {s['full_angle_range'][0]:.1f}-"
                  f"{s['full_angle_range'][1]:.1f} |",
                  f"| std of a module's angle over seed pairs (deg) | "
                  f"{g['angle_std_across_pairs']:.2f} | {s['full_angle_std_across_pairs']:.2f} |",
                  f"| relative std of a module's delta norm over seeds | "
                  f"{g['norm_rel_std_across_seeds']:.3f} | {s['full_norm_rel_std']:.3f} |",
                  f"| median t of a module, N = k | {g['t_median']:.3f} | "
                  f"{s['full_t_median_k']:.3f} |",
                  "", f"Correlation of the per-module mean angle, LoRA vs full: "
                  f"{s['angle_correlation_lora_vs_full']:.2f} ({s['modules']} modules). "
                  f"Full fine-tunes: epoch {ref['epochs']}, seeds {ref['seeds']}."]
        e3 = ref.get("full_pilot_epoch3")
        if e3 is not None:
            w = e3["weight"]
            lines += ["", f"At 3 epochs (the full study's pilot, seeds 0 and 1 only): weight "
                      f"matrices {w['angle_mean']:.1f} deg on average ({w['angle_range'][0]:.1f}-"
                      f"{w['angle_range'][1]:.1f}), median t of a weight matrix (N = 2) "
                      f"{w['t_median']:.3f}, whole-model angle {e3['pair']['model_angle']:.1f} "
                      f"deg, prediction disagreement {100 * e3['disagreement']:.1f}%."]
    c = result["factor_vs_dense_check"]
    lines += ["", f"Check: Model Stock of {tag(c['seeds'])} in factor space "
              f"(`modelstock.lora.merge_lora`) vs `merge_state_dicts` of the dense weights: "
              f"max abs difference {c['max_abs_diff']:.3g} "
              f"({c['max_diff_in_float32_ulps_of_tensor_max']:.2f} float32 ulps of the "
              f"tensor's largest entry, {c['tensor']})."]
    with open(out_dir / "tables.md", "a") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.lora_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="LoRA fine-tunes of a recipe (cached by settings)")
    t.add_argument("--recipe", choices=RECIPES, required=True)
    t.add_argument("--seeds", type=int, nargs="+", required=True)
    t.set_defaults(func=cmd_train)
    o = sub.add_parser("pilot", help="compare recipes on seeds 0 and 1")
    o.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    o.add_argument("--epochs", type=int, nargs="*", default=None, help="snapshots to show")
    o.set_defaults(func=cmd_pilot)
    for cmd, fn, text in (("rows", cmd_rows, "evaluate the study's rows (to split the work)"),
                          ("analyze", cmd_analyze, "merges, geometry, tables for a recipe")):
        a = sub.add_parser(cmd, help=text)
        a.add_argument("--recipe", choices=RECIPES, required=True)
        a.add_argument("--seeds", type=int, nargs="+", default=list(range(6)))
        a.add_argument("--max-pairs", type=int, default=None,
                       help="evaluate only the first N seed pairs (CPU budget)")
        a.add_argument("--pairs-only", action="store_true",
                       help="fine-tunes and pairs only (no soups, N = 3 / 4, WiSE-FT)")
        if cmd == "rows":
            a.add_argument("--reverse", action="store_true", help="evaluate in reverse order")
        else:
            a.add_argument("--out", default=None, help=f"output folder (default {RESULTS})")
        a.set_defaults(func=fn)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
