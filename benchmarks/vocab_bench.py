"""What aligning a large vocabulary costs: Model Stock of 3 fine-tunes of a Qwen2-sized
vocabulary (151,646 tokens in 151,936 rows) whose tokenizers agree, against the same merge where
each fine-tune added 2-4 tokens (rows aligned by token, union output). The embedding is narrow
(``--hidden``, default 64) so that the tokenizer and row bookkeeping shows, not the arithmetic.

    python benchmarks/vocab_bench.py [--hidden 64] [--rounds 3] [--workdir DIR]

Prints each round's seconds and the median ratio aligned / same, measured in one run."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelstock import merge_checkpoints

TOKENS, ROWS = 151_646, 151_936


def save(root: Path, name: str, hidden: int, added: dict[str, int], seed: int) -> str:
    """A model directory with a WordLevel tokenizer.json of the base tokens plus ``added``."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"model.embed_tokens.weight": torch.randn(ROWS, hidden, generator=g),
               "lm_head.weight": torch.randn(ROWS, hidden, generator=g),
               "model.layers.0.mlp.weight": torch.randn(hidden, hidden, generator=g)},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"vocab_size": ROWS,
                                               "tie_word_embeddings": False}))
    vocab = {f"t{i}": i for i in range(TOKENS)}
    tok = {"model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
           "added_tokens": [{"id": i, "content": t, "special": True, "single_word": False,
                             "lstrip": False, "rstrip": False, "normalized": False}
                            for t, i in added.items()]}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    (d / "tokenizer_config.json").write_text("{}")
    return str(d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="vocab-bench-"))
    anchor = save(root, "anchor", args.hidden, {}, 0)
    same = [save(root, f"same{i}", args.hidden, {}, i + 1) for i in range(3)]
    added = [save(root, f"added{i}", args.hidden,
                  {f"<x{j}>": TOKENS + j for j in range(i + 2)}, i + 1) for i in range(3)]
    times: dict[str, list[float]] = {"same": [], "aligned": []}
    for r in range(args.rounds):  # alternate, so that machine noise hits both alike
        for name, models in (("same", same), ("aligned", added)):
            start = time.perf_counter()
            report = merge_checkpoints(anchor, models, root / f"out-{name}", force=True)
            times[name].append(time.perf_counter() - start)
            if r == 0 and name == "aligned":
                print(f"aligned: {report.vocabulary['rows']} rows, "
                      f"{len(report.vocabulary['added'])} added tokens")
    for name, ts in times.items():
        print(f"{name:8s} " + " ".join(f"{t:.2f}" for t in ts) + " s")
    ratio = statistics.median(a / s for a, s in zip(times["aligned"], times["same"], strict=True))
    print(f"aligned / same vocabulary: {ratio:.2f}x (median over {args.rounds} rounds)")


if __name__ == "__main__":
    main()
