"""`make demo`: the paper's claim in miniature, end to end on CPU in a few minutes.

Zero-shot MiniLM (label-prompt head) -> two fine-tunes on airline tweets with different seeds ->
their uniform average, WiSE-FT (alpha 0.5), Model Stock (post hoc, and during training when
`modelstock.training` is available). Prints one table (ID and OOD accuracy / balanced accuracy,
per shifted topic and their mean) and writes ``demo.json`` and ``demo.png`` (ID vs OOD, like the
paper's Figure 1) to ``--out``. Small subsets keep it short; `experiments.study` is the full run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from .evaluation import EvalSuite, SplitSizes, format_table, make_splits
from .finetune import TrainConfig, train_lockstep
from .merges import Evaluator, merge
from .periodic import train_periodic
from .plots import figure1
from .textmodel import load_tokenizer, state_dict_copy, zero_shot_model
from .tweets import OOD_TOPICS, load_topics

DEMO = TrainConfig(lr=1e-4, token_dropout=0.1, epochs=3, snapshots=(),
                   sizes=SplitSizes(n_train=640, n_val=200, n_test=600, n_ood=200))
WISE_ALPHAS = (0.25, 0.5, 0.75)
PERIOD_STEPS = 10


def run(cfg: TrainConfig = DEMO, out: Path = Path("runs/demo"), seeds: tuple[int, int] = (0, 1),
        topics=None, log=print) -> dict:
    """Train, merge, evaluate; returns ``{"rows", "curve", "seconds", "config"}``."""
    start = time.perf_counter()
    tok = load_tokenizer()
    splits = make_splits(topics or load_topics(), cfg.sizes)
    suite = EvalSuite(tok, {k: splits[k] for k in ("test", *OOD_TOPICS)})
    anchor_model = zero_shot_model(tok, cfg.n_layers)
    anchor = state_dict_copy(anchor_model, cfg.frozen)
    evaluate = Evaluator(suite, copy.deepcopy(anchor_model), cache_dir=None, fixed=cfg.frozen)
    timings: dict[str, float] = {}

    def fresh() -> torch.nn.Module:
        return copy.deepcopy(anchor_model)

    rows = [evaluate("zero-shot", anchor, kind="zero-shot", alpha=0.0, curve="WiSE-FT")]
    fts = []
    for seed in seeds:
        t = time.perf_counter()
        model = fresh()
        log(f"fine-tune seed {seed} ({len(splits['train'])} tweets, {cfg.epochs} epochs)")
        train_lockstep([model], [seed], cfg, tok, splits["train"])
        timings[f"fine-tune seed {seed}"] = round(time.perf_counter() - t, 1)
        fts.append(state_dict_copy(model, cfg.frozen))
        rows.append(evaluate(f"fine-tune (seed {seed})", fts[-1], kind="fine-tune", seed=seed))
    rows.append(evaluate("uniform average of 2", merge(anchor, fts, "uniform")[0],
                         kind="uniform-2"))
    curve = []
    for a in WISE_ALPHAS:
        r = evaluate(f"WiSE-FT alpha {a:g} (seed {seeds[0]})",
                     merge(anchor, fts[:1], "wise-ft", alpha=a)[0], kind="wise-ft", alpha=a,
                     curve="WiSE-FT")
        curve.append(r)
        if a == 0.5:
            rows.append(r)
    sd, report = merge(anchor, fts, "model-stock")
    ts = [x.t for x in report.layers if x.t is not None and x.rule == "model_stock"]
    rows.append(evaluate("Model Stock (post hoc, N=2)", sd, kind="model-stock",
                         t_mean=sum(ts) / len(ts)))
    t = time.perf_counter()
    log(f"periodic Model Stock: 2 models in lockstep, merged every {PERIOD_STEPS} steps")
    sd = train_periodic(cfg, seeds, tok, fresh, splits["train"], period=PERIOD_STEPS, unit="step")
    timings["periodic training"] = round(time.perf_counter() - t, 1)
    rows.append(evaluate(f"Model Stock (periodic, every {PERIOD_STEPS} steps)", sd,
                         kind="periodic", period=PERIOD_STEPS))
    timings["total"] = round(time.perf_counter() - start, 1)
    ft_row = rows[1]
    curve_rows = [rows[0], *curve, ft_row | {"kind": "fine-tune", "alpha": 1.0}]
    out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "curve": curve, "seconds": timings,
              "config": {"lr": cfg.lr, "epochs": cfg.epochs, "token_dropout": cfg.token_dropout,
                         "batch_size": cfg.batch_size, "sizes": vars(cfg.sizes),
                         "n_layers": cfg.n_layers, "threads": torch.get_num_threads()}}
    (out / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_rows = [r for r in rows if r.get("kind") != "wise-ft"]
    plot_rows += [dict(r, kind="wise-ft") for r in curve_rows]
    figure1(plot_rows, out / "demo.png",
            f"demo: MiniLM, {len(splits['train'])} airline tweets, {cfg.epochs} epochs, 2 seeds")
    return result


def default_threads() -> int:
    """On a busy machine one thread per process does more work: measured here, a training
    step cost 1.5 CPU-s with 1 thread and 5.2 CPU-s with 2 while other jobs ran (spinning)."""
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] >= cores else torch.get_num_threads()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 when the load average is at least the "
                        "number of cores, else torch's choice)")
    p.add_argument("--epochs", type=int, default=DEMO.epochs)
    p.add_argument("--n-train", type=int, default=DEMO.sizes.n_train)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or default_threads())
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    cfg = replace(DEMO, epochs=args.epochs, sizes=replace(DEMO.sizes, n_train=args.n_train))
    result = run(cfg, args.out)
    print()
    print(format_table(result["rows"]))
    print()
    print("seconds: " + ", ".join(f"{k} {v:g}" for k, v in result["seconds"].items()))
    print(f"wrote {args.out / 'demo.json'} and {args.out / 'demo.png'}")


if __name__ == "__main__":
    sys.exit(main())
