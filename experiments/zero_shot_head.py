"""How the zero-shot head was chosen: prompt sets and logit scale, measured on the ID val split.

``python -m experiments.zero_shot_head`` prints, for a few prompt ensembles, the zero-shot
accuracy / balanced accuracy on val (ID) and the shifted topics, and the val cross-entropy for a
grid of logit scales (the scale does not change predictions, only how sharp the fine-tuning
starts). Writes ``experiments/results/zero_shot_head.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .evaluation import make_splits
from .finetune import TrainConfig
from .textmodel import PROMPTS, SentenceClassifier, collate, encode, load_body, load_tokenizer
from .tweets import OOD_TOPICS, load_topics

CANDIDATES = {
    "label-word": {"negative": ("negative",), "neutral": ("neutral",), "positive": ("positive",)},
    "a-label-tweet": {k: (f"a {k} tweet.",) for k in ("negative", "neutral", "positive")},
    "ensemble": PROMPTS,
}
SCALES = (5.0, 10.0, 20.0, 30.0, 50.0, 100.0)


@torch.inference_mode()
def features(model: SentenceClassifier, tokenizer, texts, batch: int = 128) -> torch.Tensor:
    ids = encode(tokenizer, texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), model.head.in_features)
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        out[idx] = model.features(*collate([ids[i] for i in idx], tokenizer.pad_token_id))
    return out


def main() -> None:
    start = time.perf_counter()
    torch.set_num_threads(1)
    tok = load_tokenizer()
    model = SentenceClassifier(load_body(), 3).eval()
    splits = make_splits(load_topics(), TrainConfig().sizes)  # the study's val and OOD sets
    sets = {k: splits[k] for k in ("val", *OOD_TOPICS)}
    feats = {k: features(model, tok, [x for x, _ in v]) for k, v in sets.items()}
    labels = {k: torch.tensor([y for _, y in v]) for k, v in sets.items()}
    out = {}
    for name, prompts in CANDIDATES.items():
        protos = F.normalize(torch.stack([
            F.normalize(features(model, tok, list(t)).mean(0), dim=0) for t in prompts.values()]),
            dim=1)
        res = {}
        for k in sets:
            pred = (feats[k] @ protos.T).argmax(1)
            y = labels[k]
            recalls = [float((pred[y == c] == c).float().mean())
                       for c in range(3) if (y == c).any()]
            res[k] = {"acc": float((pred == y).float().mean()), "bacc": float(np.mean(recalls))}
        res["ood_acc"] = float(np.mean([res[k]["acc"] for k in OOD_TOPICS]))
        res["val_nll"] = {s: float(F.cross_entropy(s * feats["val"] @ protos.T, labels["val"]))
                          for s in SCALES}
        out[name] = res
        print(f"{name:14s} val acc {res['val']['acc']:.3f} bacc {res['val']['bacc']:.3f} | "
              f"OOD acc {res['ood_acc']:.3f} | val NLL "
              + " ".join(f"s={s:g}:{v:.3f}" for s, v in res["val_nll"].items()))
    out["seconds"] = time.perf_counter() - start
    path = Path(__file__).parent / "results" / "zero_shot_head.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
