"""The full study on tweets: fine-tunes of k seeds, every merge, geometry, tables and plots.

    python -m experiments.study train --regime noisy --seeds 0 1 2 3   # cached, resumable
    python -m experiments.study pilot --regimes conventional noisy      # regime comparison
    python -m experiments.study analyze --regime noisy --seeds 0 1 2 3 4 5 6 7

Training uses one CPU thread per process (on a shared 2-core machine two 1-thread processes
do far more work than one 2-thread process); run several ``train`` commands side by side.
Every fine-tune and every evaluation is cached under ``runs/tweets`` (git-ignored); results
(JSON, markdown tables, PNGs) go to ``experiments/results/tweets/<regime>/``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from modelstock.geometry import inspect_checkpoints
from modelstock.soups import greedy_soup

from . import geometry, plots
from .evaluation import EvalSuite, format_table, make_splits
from .finetune import ROOT, TrainConfig, finetune, load_snapshot, snapshot_path
from .merges import Evaluator, distance, load_into, merge, merged, subsets, summarize
from .periodic import train_periodic
from .textmodel import load_tokenizer, state_dict_copy, zero_shot_model
from .tweets import OOD_TOPICS, load_topics

RESULTS = Path(__file__).resolve().parent / "results" / "tweets"
# The pilot's regimes (see RESULTS.md): conventional, noisy, very noisy.
REGIMES: dict[str, TrainConfig] = {
    "conventional": TrainConfig(lr=2e-5, token_dropout=0.0),
    "noisy": TrainConfig(lr=1e-4, token_dropout=0.1),
    "very-noisy": TrainConfig(lr=3e-4, token_dropout=0.2),
}
WISE_ALPHAS = (0.2, 0.4, 0.5, 0.7, 0.9)
N_SUBSETS = 3  # Model Stock / uniform average of N = 3 and 4: this many random subsets each
EPOCH_SEEDS = 4  # result vs training length: the first 4 seeds at every snapshot
# Periodic Model Stock: (period, unit) pairs; the paper merges every epoch.
PERIODS = ((1, "epoch"), (10, "step"))


def tag(seeds: Sequence[int]) -> str:
    return "+".join(f"s{s}" for s in seeds)


class Context:
    """Tokenizer, splits, evaluation suites, anchor and cached evaluators for one regime.
    (`experiments.digits.DigitsContext` has the same interface for the second domain.)"""

    id_name, ood_name = "airline tweets", "4 topics"
    ood = OOD_TOPICS

    def __init__(self, cfg: TrainConfig, root: Path = ROOT, topics=None) -> None:
        self.cfg, self.root = cfg, root
        self.tok = load_tokenizer()
        self.splits = make_splits(topics or load_topics(), cfg.sizes)
        sets = {k: self.splits[k] for k in ("test", *OOD_TOPICS)}  # val: greedy soup only
        self.suite = EvalSuite(self.tok, sets)
        self.val_suite = EvalSuite(self.tok, {"val": self.splits["val"]})
        self.anchor_model = zero_shot_model(self.tok, cfg.n_layers)
        self.anchor = state_dict_copy(self.anchor_model, cfg.frozen)
        self.regime_key = replace(cfg, seed=-1).key("regime")
        cache = root / "evals" / self.regime_key
        self.evaluate = Evaluator(self.suite, copy.deepcopy(self.anchor_model), cache,
                                  cfg.frozen)
        self.val_score = Evaluator(self.val_suite, copy.deepcopy(self.anchor_model), cache,
                                   cfg.frozen)

    @staticmethod
    def finished(cfg: TrainConfig, root: Path, seed: int) -> bool:
        """Whether a run has at least its first snapshot (cheap: no Context needed)."""
        run = root / cfg.with_seed(seed).key()
        return any(snapshot_path(run, e).exists() for e in cfg.snapshots)

    def run_dir(self, seed: int) -> Path:
        return self.root / self.cfg.with_seed(seed).key()

    def has(self, seed: int, epoch: int) -> bool:
        return snapshot_path(self.run_dir(seed), epoch).exists()

    def ft(self, seed: int, epoch: int) -> dict[str, torch.Tensor]:
        return self.cfg.without_frozen(load_snapshot(self.run_dir(seed), epoch))

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.anchor_model)


# -- training ---------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> None:
    cfg = regime(args)
    tok = load_tokenizer()
    splits = make_splits(load_topics(), cfg.sizes)
    anchor = zero_shot_model(tok, cfg.n_layers)
    for seed in args.seeds:
        run = finetune(cfg.with_seed(seed), tok, lambda: copy.deepcopy(anchor), splits["train"],
                       ROOT)
        print(f"done {run}", flush=True)


def periodic_dir(ctx: Context, seeds: Sequence[int], period: int, unit: str,
                 optimizer_state: str) -> Path:
    key = ctx.cfg.with_seed(seeds[0]).key("periodic", seeds=list(seeds), period=period,
                                           unit=unit, optimizer_state=optimizer_state)
    return ctx.root / key


def cmd_periodic(args: argparse.Namespace) -> None:
    """Train the periodic Model Stock runs (2 models in lockstep, merged every period)."""
    from .finetune import is_done, save_state

    ctx = Context(regime(args))
    seeds = tuple(args.seeds)
    for period, unit in [(p, u) for p, u in PERIODS if args.only is None or f"{p}{u}" in args.only]:
        run = periodic_dir(ctx, seeds, period, unit, args.optimizer_state)
        if is_done(run):
            continue
        run.mkdir(parents=True, exist_ok=True)
        print(f"periodic {run.name}: seeds {seeds}, every {period} {unit}(s)", flush=True)
        start = time.perf_counter()

        def snap(epoch: int, merged_now, run=run) -> None:
            if epoch in ctx.cfg.snapshots:
                save_state(merged_now(), snapshot_path(run, epoch))

        train_periodic(ctx.cfg, seeds, ctx.tok, ctx.fresh, ctx.splits["train"], period=period,
                       unit=unit, optimizer_state=args.optimizer_state, on_epoch=snap)
        log = {"seeds": list(seeds), "period": period, "unit": unit,
               "optimizer_state": args.optimizer_state,
               "seconds": round(time.perf_counter() - start, 1)}
        (run / "log.json").write_text(json.dumps(log, indent=1) + "\n")


# -- rows ---------------------------------------------------------------------------------------
def disagreement(ctx: Context, a: str, b: str) -> float:
    """Fraction of evaluation tweets (test and shifted topics) where two models disagree."""
    pa, pb = ctx.evaluate.preds(a), ctx.evaluate.preds(b)
    keys = ["test", *ctx.ood]
    return float(np.mean(np.concatenate([pa[k] != pb[k] for k in keys])))


def epoch_rows(ctx: Context, epoch: int, seeds: Sequence[int], full: bool,
               reverse: bool = False) -> list[dict]:
    """Every model at one training length. ``full``: all pairs, N=3/4, WiSE-FT, greedy soup;
    otherwise disjoint pairs and the uniform soup only. ``reverse`` evaluates in the opposite
    order (a second process then meets the first half way; rows come back in the usual order)."""
    e = f"e{epoch:02d}"
    A = ctx.anchor
    cache: dict[int, dict] = {}

    def ft(s: int):
        if s not in cache:
            cache[s] = ctx.ft(s, epoch)
        return cache[s]

    def of(group, method, alpha=None):
        return lambda: merged(A, [ft(s) for s in group], method, alpha)()

    specs = [("zero-shot", A, {"kind": "zero-shot", "alpha": 0.0, "epoch": 0})]
    for s in seeds:
        specs.append((f"{e}/ft/s{s}", lambda s=s: ft(s),
                      {"kind": "fine-tune", "seed": s, "epoch": epoch}))
    pairs = (list(itertools.combinations(seeds, 2)) if full
             else [tuple(seeds[i : i + 2]) for i in range(0, len(seeds) - 1, 2)])
    for p in pairs:
        specs.append((f"{e}/ms/{tag(p)}", of(p, "model-stock"),
                      {"kind": "model-stock", "seeds": list(p), "epoch": epoch}))
        specs.append((f"{e}/uni/{tag(p)}", of(p, "uniform"),
                      {"kind": "uniform-2", "seeds": list(p), "epoch": epoch}))
    if len(seeds) > 2:
        specs.append((f"{e}/soup/{tag(seeds)}", of(seeds, "uniform"),
                      {"kind": "uniform-soup", "seeds": list(seeds), "epoch": epoch}))
    if full:
        for n, limit in ((3, N_SUBSETS), (4, N_SUBSETS)):
            for idx in subsets(len(seeds), n, limit, seed=n):
                grp = [seeds[i] for i in idx]
                specs.append((f"{e}/ms{n}/{tag(grp)}", of(grp, "model-stock"),
                              {"kind": f"model-stock-{n}", "seeds": grp, "epoch": epoch}))
                specs.append((f"{e}/uni{n}/{tag(grp)}", of(grp, "uniform"),
                              {"kind": f"uniform-{n}", "seeds": grp, "epoch": epoch}))
        s0 = seeds[0]
        for a in WISE_ALPHAS:
            specs.append((f"{e}/wise{a:.2f}/s{s0}", of([s0], "wise-ft", a),
                          {"kind": "wise-ft", "alpha": a, "seeds": [s0], "epoch": epoch,
                           "curve": f"s{s0}"}))
    order = range(len(specs) - 1, -1, -1) if reverse else range(len(specs))
    done = {i: ctx.evaluate(specs[i][0], specs[i][1], **specs[i][2]) for i in order}
    rows = [done[i] for i in range(len(specs))]
    if full:
        rows.append(greedy_row(ctx, epoch, seeds, ft))
    return rows


def greedy_row(ctx: Context, epoch: int, seeds: Sequence[int], ft) -> dict:
    """Greedy soup (Wortsman et al.) scored on the ID val split, via the library."""
    name = f"e{epoch:02d}/greedy/{tag(seeds)}"
    hit = ctx.evaluate.cached(name)
    if hit is not None:
        return hit

    def score(sd) -> float:
        load_into(ctx.val_score.model, sd, ctx.val_score.fixed)
        return ctx.val_suite.evaluate(ctx.val_score.model)["val_acc"]

    sd, report = greedy_soup(ctx.anchor, [ft(s) for s in seeds], score=score,
                             threads=torch.get_num_threads())
    label = {f"models[{i}]": f"s{s}" for i, s in enumerate(seeds)}
    rec = report.greedy
    return ctx.evaluate(name, sd, kind="greedy-soup", seeds=list(seeds), epoch=epoch,
                        kept=[label[k] for k in rec["kept"]], greedy_val=rec["score"],
                        greedy_order=[label[k] for k in rec["order"]])


def periodic_rows(ctx: Context, seeds: Sequence[int], epochs: Sequence[int],
                  optimizer_state: str = "keep") -> list[dict]:
    rows = []
    for period, unit in PERIODS:
        run = periodic_dir(ctx, seeds, period, unit, optimizer_state)
        for epoch in epochs:
            path = snapshot_path(run, epoch)
            if path.exists():
                rows.append(ctx.evaluate(
                    f"e{epoch:02d}/periodic/{period}{unit}-{optimizer_state}/{tag(seeds)}",
                    lambda path=path, epoch=epoch: ctx.cfg.without_frozen(
                        load_snapshot(path.parent, epoch)),
                    kind="periodic",
                    period=period, unit=unit, optimizer_state=optimizer_state,
                    seeds=list(seeds), epoch=epoch))
    return rows


# -- summaries ----------------------------------------------------------------------------------
def metric_names(ood: Sequence[str]) -> list[str]:
    return ["id_acc", "id_bacc", "ood_acc", "ood_bacc",
            *(f"{t}_{m}" for t in ood for m in ("acc", "bacc"))]


FAMILIES = [  # (kind, label, number of fine-tunes it costs)
    ("zero-shot", "zero-shot (anchor)", "0"),
    ("fine-tune", "fine-tune, mean over seeds", "1"),
    ("wise-ft", "WiSE-FT alpha 0.5 (seed 0)", "1"),
    ("uniform-2", "uniform average of 2, mean over pairs", "2"),
    ("model-stock", "Model Stock N=2, mean over pairs", "2"),
    ("uniform-3", "uniform average of 3, mean", "3"),
    ("model-stock-3", "Model Stock N=3, mean", "3"),
    ("uniform-4", "uniform average of 4, mean", "4"),
    ("model-stock-4", "Model Stock N=4, mean", "4"),
    ("uniform-soup", "uniform soup of all k", "k"),
    ("greedy-soup", "greedy soup (val-scored)", "k"),
]


def family_table(rows: Sequence[dict], ood: Sequence[str] = OOD_TOPICS) -> list[dict]:
    """One row per family of models (mean over its members; std/min/max beside)."""
    metrics = metric_names(ood)
    out = []
    for kind, label, cost in FAMILIES:
        rs = [r for r in rows if r.get("kind") == kind]
        if kind == "wise-ft":
            rs = [r for r in rs if abs(r["alpha"] - 0.5) < 1e-9]
        if rs:
            out.append(summarize(rs, label, metrics) | {"cost": cost, "kind": kind})
    for r in rows:
        if r.get("kind") == "periodic":
            out.append(summarize([r], f"periodic Model Stock, every {r['period']} {r['unit']}"
                                      f" ({r['optimizer_state']} opt. state)", metrics)
                       | {"cost": "2",
                          "kind": f"periodic-{r['period']}{r['unit']}-{r['optimizer_state']}"})
    return out


def pair_comparison(rows: Sequence[dict]) -> dict:
    """Paired: Model Stock of a pair vs that pair's uniform average and its two fine-tunes."""
    by = {r["name"]: r for r in rows}
    fts = {r["seed"]: r for r in rows if r.get("kind") == "fine-tune"}
    soup = next((r for r in rows if r.get("kind") == "uniform-soup"), None)
    out: dict = {}
    for metric in ("id_acc", "ood_acc", "id_bacc", "ood_bacc"):
        d_uni, d_ft, d_best, d_soup = [], [], [], []
        for r in rows:
            if r.get("kind") != "model-stock":
                continue
            uni = by[r["name"].replace("/ms/", "/uni/")]
            pair = [fts[s][metric] for s in r["seeds"]]
            d_uni.append(r[metric] - uni[metric])
            d_ft.append(r[metric] - float(np.mean(pair)))
            d_best.append(r[metric] - max(pair))
            if soup is not None:
                d_soup.append(r[metric] - soup[metric])
        if not d_uni:
            continue
        out[metric] = {
            "pairs": len(d_uni),
            "ms_minus_uniform2": stats(d_uni), "ms_minus_pair_mean": stats(d_ft),
            "ms_minus_pair_best": stats(d_best),
            **({"ms_minus_uniform_soup": stats(d_soup)} if d_soup else {})}
    return out


def stats(d: Sequence[float]) -> dict:
    d = np.asarray(d)
    return {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
            "wins": int((d > 0).sum()), "ties": int((d == 0).sum()), "losses": int((d < 0).sum())}


def geometry_of(ctx: Context, epoch: int, seeds: Sequence[int]) -> dict:
    """Per-layer angles across all seed pairs, norms, t (from one k-model merge report)."""
    sds = [ctx.ft(s, epoch) for s in seeds]
    insp = inspect_checkpoints(ctx.anchor, sds)
    recs = geometry.layers(insp)
    pair_t = []
    for i, j in itertools.combinations(range(len(seeds)), 2):
        _, rep2 = merge(ctx.anchor, [sds[i], sds[j]], "model-stock")
        ts = [x.t for x in rep2.layers if x.rule == "model_stock" and x.t is not None
              and x.norms and any(x.norms)]
        pair_t.append({"seeds": [seeds[i], seeds[j]], "t_mean": float(np.mean(ts)),
                       "t_median": float(np.median(ts)),
                       "model_angle": geometry.model_angle(rep2)})
    return {"epoch": epoch, "seeds": list(seeds), "layers": recs,
            "summary": geometry.summary(insp, recs), "pairs": pair_t}


def distance_points(ctx: Context, rows: Sequence[dict], epoch: int,
                    seeds: Sequence[int]) -> list[dict]:
    """Every evaluated model's distance to the centre (uniform soup of all k fine-tunes)."""
    fts = {s: ctx.ft(s, epoch) for s in seeds}
    centre = merge(ctx.anchor, list(fts.values()), "uniform")[0]
    out = []
    for r in rows:
        kind = r.get("kind")
        if kind == "zero-shot":
            sd = ctx.anchor
        elif kind == "fine-tune":
            sd = fts[r["seed"]]
        elif kind in ("model-stock", "model-stock-3", "model-stock-4"):
            sd = merge(ctx.anchor, [fts[s] for s in r["seeds"]], "model-stock")[0]
        elif kind in ("uniform-2", "uniform-3", "uniform-4", "uniform-soup"):
            sd = merge(ctx.anchor, [fts[s] for s in r["seeds"]], "uniform")[0]
        elif kind == "wise-ft":
            sd = merge(ctx.anchor, [fts[r["seeds"][0]]], "wise-ft", alpha=r["alpha"])[0]
        else:
            continue
        out.append({"name": r["name"], "kind": kind, "distance": distance(sd, centre),
                    "id_acc": r["id_acc"], "ood_acc": r["ood_acc"]})
    return out


# -- commands -----------------------------------------------------------------------------------
def regime(args: argparse.Namespace) -> TrainConfig:
    cfg = REGIMES[args.regime]
    return replace(cfg, epochs=args.epochs) if getattr(args, "epochs", None) else cfg


def cmd_pilot(args: argparse.Namespace) -> None:
    """Two seeds per regime: how much do the fine-tunes disagree, and does merging help?"""
    out = {}
    lines = ["| regime | epoch | FT ID acc (s0, s1) | FT OOD acc | uniform-2 ID / OOD | "
             "MS ID / OOD | pred. disagreement | model angle (deg) | median t |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in args.regimes:
        full = REGIMES[name]
        variants = [full] + ([replace(full, epochs=args.epochs_cap)] if args.epochs_cap else [])
        ctx = next((Context(c) for c in variants
                    if Context.finished(c, ROOT, 0) and Context.finished(c, ROOT, 1)), None)
        if ctx is None:
            continue
        for epoch in [e for e in ctx.cfg.snapshots if e <= ctx.cfg.epochs]:
            if not (ctx.has(0, epoch) and ctx.has(1, epoch)):
                continue
            rows = epoch_rows(ctx, epoch, [0, 1], full=False)
            by = {r["kind"]: r for r in rows if r["kind"] != "fine-tune"}
            fts = [r for r in rows if r["kind"] == "fine-tune"]
            geo = geometry_of(ctx, epoch, [0, 1])
            e = f"e{epoch:02d}"
            dis = disagreement(ctx, f"{e}/ft/s0", f"{e}/ft/s1")
            out[f"{name}/{e}"] = {"rows": rows, "disagreement": dis, "pairs": geo["pairs"],
                                  "summary": geo["summary"]}
            p = geo["pairs"][0]
            lines.append(
                f"| {name} | {epoch} | {100 * fts[0]['id_acc']:.1f}, {100 * fts[1]['id_acc']:.1f}"
                f" | {100 * fts[0]['ood_acc']:.1f}, {100 * fts[1]['ood_acc']:.1f} | "
                f"{pair_cells(by, dis)} | {p['model_angle']:.1f} | {p['t_median']:.3f} |")
    write_pilot(RESULTS, out, lines)


def pair_cells(by: dict, dis: float) -> str:
    """A pilot table's merge columns: uniform-2 and Model Stock ID / OOD, and disagreement."""
    return (f"{100 * by['uniform-2']['id_acc']:.1f} / {100 * by['uniform-2']['ood_acc']:.1f}"
            f" | {100 * by['model-stock']['id_acc']:.1f} / "
            f"{100 * by['model-stock']['ood_acc']:.1f} | {100 * dis:.1f}%")


def write_pilot(results: Path, out: dict, lines: list[str]) -> None:
    """Write a pilot's JSON and table, and print the table."""
    results.mkdir(parents=True, exist_ok=True)
    (results / "pilot.json").write_text(json.dumps(out, indent=1) + "\n")
    (results / "pilot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cmd_rows(args: argparse.Namespace) -> None:
    """Evaluate (and cache) the rows of some epochs, so several processes can share the work;
    ``analyze`` then finds them cached."""
    ctx = Context(regime(args))
    for epoch in args.at:
        final = epoch == ctx.cfg.epochs
        pool = args.seeds if final else args.seeds[:EPOCH_SEEDS]
        seeds = [s for s in pool if ctx.has(s, epoch)]
        print(f"rows of epoch {epoch}: seeds {seeds}", flush=True)
        if len(seeds) >= 2:
            epoch_rows(ctx, epoch, seeds, full=final, reverse=args.reverse)
        print(f"  {ctx.evaluate.count} evaluations so far ({ctx.evaluate.seconds:.0f} s)",
              flush=True)


def cmd_analyze(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    ctx = Context(regime(args))
    seeds = [s for s in args.seeds if ctx.has(s, ctx.cfg.epochs)]
    if len(seeds) < 2:
        sys.exit(f"need >= 2 finished fine-tunes, have {seeds}")
    print(f"analyze {args.regime}: seeds {seeds}, final epoch {ctx.cfg.epochs}", flush=True)
    result = analyze(ctx, seeds, RESULTS / args.regime, args.regime)
    print(format_table(result["table"], extra=("cost", "count")), flush=True)
    print(f"evaluations this run: {ctx.evaluate.count} ({ctx.evaluate.seconds:.0f} s); "
          f"analyze took {time.perf_counter() - start:.0f} s")


def analyze(ctx: Context, seeds: Sequence[int], out_dir: Path, name: str,
            length_epochs: Sequence[int] | None = None) -> dict:
    """Every row, the summaries, geometry and plots for finished fine-tunes ``seeds``
    (result vs training length at ``length_epochs``, default every snapshot)."""
    cfg, final = ctx.cfg, ctx.cfg.epochs
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = epoch_rows(ctx, final, seeds, full=True)
    rows += periodic_rows(ctx, seeds[:2], sorted({1, 3, 5, final} & set(cfg.snapshots)))
    final_rows = [r for r in rows if r.get("epoch") in (0, final)]
    table = family_table(final_rows, ctx.ood)
    comparison = pair_comparison(final_rows)
    by_epoch = {}
    for epoch in [e for e in (length_epochs or cfg.snapshots) if e <= final]:
        have = [s for s in seeds[:EPOCH_SEEDS] if ctx.has(s, epoch)]
        if len(have) >= 2 and epoch != final:
            rows += epoch_rows(ctx, epoch, have, full=False)
        ep_rows = [r for r in rows if r.get("epoch") == epoch]
        by_epoch[epoch] = {f["kind"]: {m: f[m] for m in ("id_acc", "ood_acc", "id_bacc",
                                                           "ood_bacc")}
                           for f in family_table(ep_rows, ctx.ood)}
    geo = geometry_of(ctx, final, seeds)
    dist = distance_points(ctx, final_rows, final, seeds)
    fts = [r for r in final_rows if r.get("kind") == "fine-tune"]
    dis = [disagreement(ctx, a["name"], b["name"]) for a, b in itertools.combinations(fts, 2)]
    result = {"config": asdict(cfg), "regime": name, "ood": list(ctx.ood), "seeds": list(seeds),
              "table": table,
              "pair_comparison": comparison, "by_epoch": by_epoch,
              "geometry": {k: v for k, v in geo.items() if k != "layers"},
              "prediction_disagreement": {"mean": float(np.mean(dis)), "min": float(min(dis)),
                                          "max": float(max(dis))},
              "eval_sizes": {k: len(v) for k, v in ctx.suite.labels.items()},
              "train_seconds": train_seconds(ctx, seeds), "rows": rows}
    (out_dir / "study.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "geometry_layers.json").write_text(json.dumps(geo["layers"], indent=1) + "\n")
    (out_dir / "distance.json").write_text(json.dumps(dist, indent=1) + "\n")
    write_tables(out_dir, result)
    plot_rows = [r for r in final_rows if r.get("kind") not in ("uniform-3", "uniform-4")]
    plot_rows += [dict(r, kind="wise-ft", alpha=1.0, curve=f"s{seeds[0]}")
                  for r in fts if r["seed"] == seeds[0]]
    title = f"{ctx.id_name}: {name}, {final} epochs, k={len(seeds)}"
    names = {"id_name": ctx.id_name, "ood_name": ctx.ood_name}
    plots.figure1(plot_rows, out_dir / "figure1.png", title, **names)
    plots.figure1(plot_rows, out_dir / "figure1_bacc.png", title, metric="bacc", **names)
    recs = geo["layers"]
    plots.layer_angles([r["name"] for r in recs], [r["angle_mean"] for r in recs],
                       [r["angle_std"] for r in recs], out_dir / "layer_angles.png",
                       f"angle between task vectors per layer, mean +- std over "
                       f"{len(seeds) * (len(seeds) - 1) // 2} seed pairs (epoch {final})")
    plots.accuracy_vs_distance(dist, out_dir / "distance.png",
                               f"accuracy vs distance to the centre of {len(seeds)} fine-tunes")
    for metric in ("id_acc", "ood_acc"):
        series: dict[str, list] = {}
        for epoch, fam in by_epoch.items():
            for kind, vals in fam.items():
                if kind != "zero-shot":
                    series.setdefault(kind, []).append((epoch, vals[metric]))
        plots.versus_epochs(series, out_dir / f"epochs_{metric}.png",
                            f"{'ID' if metric == 'id_acc' else 'OOD mean'} accuracy %",
                            "result vs training length (snapshots of the same runs)")
    return result


def train_seconds(ctx: Context, seeds: Sequence[int]) -> dict:
    out = {}
    for s in seeds:
        log = ctx.run_dir(s) / "log.json"
        if log.exists():
            out[f"s{s}"] = json.loads(log.read_text())["seconds"]
    return out


def write_tables(out_dir: Path, result: dict) -> None:
    table = result["table"]
    lines = [f"# {result['regime']}: k = {len(result['seeds'])} seeds "
             f"{result['seeds']}, {result['config']['epochs']} epochs", "",
             "Metrics in %, mean over the family (std over its members in the JSON).", "",
             format_table(table, extra=("cost", "count"), ood=result["ood"]), "",
             "## Std over members (ID acc / OOD acc, points)", ""]
    for r in table:
        if r["count"] > 1:
            lines.append(f"- {r['name']}: {100 * r['id_acc_std']:.2f} / "
                         f"{100 * r['ood_acc_std']:.2f} (min-max ID "
                         f"{100 * r['id_acc_min']:.2f}-{100 * r['id_acc_max']:.2f}, OOD "
                         f"{100 * r['ood_acc_min']:.2f}-{100 * r['ood_acc_max']:.2f})")
    lines += ["", "## Model Stock of a pair, paired differences (points)", ""]
    for metric, c in result["pair_comparison"].items():
        parts = [f"{k.replace('ms_minus_', 'vs ')}: {100 * v['mean']:+.2f} +- "
                 f"{100 * v['std']:.2f} (wins {v['wins']}/{c['pairs']})"
                 for k, v in c.items() if k != "pairs"]
        lines.append(f"- {metric}: " + "; ".join(parts))
    lines += ["", "## Result vs training length (mean over family; ID / OOD acc %)", ""]
    kinds = sorted({k for fam in result["by_epoch"].values() for k in fam})
    lines.append("| epoch | " + " | ".join(kinds) + " |")
    lines.append("|---|" + "---|" * len(kinds))
    for epoch, fam in sorted(result["by_epoch"].items(), key=lambda x: int(x[0])):
        cells = [f"{100 * fam[k]['id_acc']:.2f} / {100 * fam[k]['ood_acc']:.2f}" if k in fam
                 else "" for k in kinds]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    lines += ["", "## Geometry (final epoch, all k fine-tunes; `modelstock.geometry`)", "",
              "| layer kind | layers | angle mean (deg) | angle range over layers | "
              "std over pairs (deg) | norm rel. std over seeds | median \\|d\\|/\\|w0\\| | "
              "median t (N=k) |",
              "|---|---|---|---|---|---|---|---|"]
    for kind, g in result["geometry"]["summary"].items():
        lo, hi = g["angle_range"]
        rng = "" if lo is None else f"{lo:.1f}-{hi:.1f}"
        mean = "" if g["angle_mean"] is None else f"{g['angle_mean']:.1f}"
        rel = "" if g["rel_norm_median"] is None else f"{g['rel_norm_median']:.4f}"
        lines.append(f"| {kind} | {g['layers']} | {mean} | {rng} | "
                     f"{g['angle_std_across_pairs']:.2f} | {g['norm_rel_std_across_seeds']:.3f}"
                     f" | {rel} | {g['t_median']:.3f} |")
    pairs = result["geometry"]["pairs"]
    lines += ["", f"Pairs (N=2): whole-model angle {min(p['model_angle'] for p in pairs):.1f}-"
              f"{max(p['model_angle'] for p in pairs):.1f} deg; median per-layer t "
              f"{min(p['t_median'] for p in pairs):.3f}-{max(p['t_median'] for p in pairs):.3f}."
              f" Prediction disagreement between fine-tunes: "
              f"{100 * result['prediction_disagreement']['mean']:.1f}% "
              f"({100 * result['prediction_disagreement']['min']:.1f}-"
              f"{100 * result['prediction_disagreement']['max']:.1f})."]
    (out_dir / "tables.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fine-tune seeds of a regime (cached by settings)")
    t.add_argument("--regime", choices=REGIMES, default="noisy")
    t.add_argument("--seeds", type=int, nargs="+", required=True)
    t.add_argument("--epochs", type=int, default=None, help="shorter run (pilot)")
    t.set_defaults(func=cmd_train)
    q = sub.add_parser("periodic", help="train periodic Model Stock runs")
    q.add_argument("--regime", choices=REGIMES, default="noisy")
    q.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    q.add_argument("--optimizer-state", choices=("keep", "reset"), default="keep")
    q.add_argument("--only", nargs="*", default=None, help="e.g. 1epoch 10step")
    q.set_defaults(func=cmd_periodic)
    o = sub.add_parser("pilot", help="compare regimes on seeds 0 and 1")
    o.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    o.add_argument("--epochs-cap", type=int, default=None,
                   help="also look for runs trained with --epochs N (short pilot runs)")
    o.set_defaults(func=cmd_pilot)
    r = sub.add_parser("rows", help="evaluate the rows of some epochs (to split the work)")
    r.add_argument("--regime", choices=REGIMES, default="noisy")
    r.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    r.add_argument("--at", type=int, nargs="+", required=True, help="snapshot epochs")
    r.add_argument("--reverse", action="store_true", help="evaluate in reverse order")
    r.set_defaults(func=cmd_rows)
    a = sub.add_parser("analyze", help="merges, geometry, tables, plots for a regime")
    a.add_argument("--regime", choices=REGIMES, default="noisy")
    a.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    a.set_defaults(func=cmd_analyze)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
