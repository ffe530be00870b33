"""Splits, evaluation (accuracy and balanced accuracy per topic) and the results table.

One `EvalSuite` holds every evaluation set pre-tokenised and sorted by length, so a model is
evaluated in one pass with little padding. Rows of the table are plain dicts:
``{"name", "group", "id_acc", "id_bacc", "ood_acc", "ood_bacc", "<topic>_acc", ...}``.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from .textmodel import collate, encode
from .tweets import ID_TOPIC, OOD_TOPICS

Example = tuple[str, int]


@dataclass(frozen=True)
class SplitSizes:
    """How many tweets go where. ``n_ood=None`` keeps every tweet of a shifted topic."""

    n_train: int = 2000
    n_val: int = 500
    n_test: int = 1500
    n_ood: int | None = 500
    seed: int = 0


def make_splits(topics: Mapping[str, Sequence[Example]], sizes: SplitSizes
                ) -> dict[str, list[Example]]:
    """Disjoint ID train / val / test from the airline tweets, plus one set per shifted topic.

    The ID tweets are shuffled once (``sizes.seed``); test and val come first so that they do not
    move when ``n_train`` changes. Shifted topics are subsampled at random (natural class mix).
    """
    rng = random.Random(sizes.seed)
    pool = list(topics[ID_TOPIC])
    rng.shuffle(pool)
    need = sizes.n_test + sizes.n_val + sizes.n_train
    if need > len(pool):
        raise ValueError(f"asked for {need} airline tweets, only {len(pool)} exist")
    out = {"test": pool[: sizes.n_test],
           "val": pool[sizes.n_test : sizes.n_test + sizes.n_val],
           "train": pool[sizes.n_test + sizes.n_val : need]}
    for topic in OOD_TOPICS:
        items = list(topics[topic])
        rng.shuffle(items)
        out[topic] = items if sizes.n_ood is None else items[: sizes.n_ood]
    return out


class EvalSuite:
    """Evaluation sets, tokenised once; ``predict`` runs a model over all of them in one pass."""

    def __init__(self, tokenizer, sets: Mapping[str, Sequence[Example]], batch_size: int = 128):
        self.names = list(sets)
        self.labels = {k: np.array([y for _, y in v]) for k, v in sets.items()}
        ids, owner = [], []
        for k, v in sets.items():
            ids += encode(tokenizer, [x for x, _ in v])
            owner += [(k, i) for i in range(len(v))]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        self.batches = [[ids[i] for i in order[s : s + batch_size]]
                        for s in range(0, len(order), batch_size)]
        self.owner = [owner[i] for i in order]
        self.pad_id = tokenizer.pad_token_id
        digest = hashlib.sha1()
        for k in self.names:
            texts = [x for x, _ in sets[k]]
            digest.update(json.dumps([k, texts, self.labels[k].tolist()]).encode())
        self.key = digest.hexdigest()[:10]

    @torch.inference_mode()
    def predict(self, model: torch.nn.Module) -> dict[str, np.ndarray]:
        was_training = model.training
        model.eval()
        flat = []
        for batch in self.batches:
            flat.append(model(*collate(batch, self.pad_id)).argmax(-1))
        model.train(was_training)
        flat = torch.cat(flat).numpy()
        out = {k: np.empty(len(v), dtype=np.int64) for k, v in self.labels.items()}
        for (k, i), p in zip(self.owner, flat, strict=True):
            out[k][i] = p
        return out

    def metrics(self, preds: Mapping[str, np.ndarray]) -> dict[str, float]:
        return set_metrics(self.labels, preds, OOD_TOPICS)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return self.metrics(self.predict(model))


def set_metrics(labels: Mapping[str, np.ndarray], preds: Mapping[str, np.ndarray],
                ood: Sequence[str]) -> dict[str, float]:
    """``<set>_acc`` and ``<set>_bacc`` per set; ``id_*`` (the ``test`` set) and ``ood_*`` (the
    mean over the ``ood`` sets present)."""
    m: dict[str, float] = {}
    for k, y in labels.items():
        p = preds[k]
        m[f"{k}_acc"] = float((y == p).mean())
        with warnings.catch_warnings():  # a topic may lack a class the model predicts
            warnings.simplefilter("ignore", UserWarning)
            m[f"{k}_bacc"] = float(balanced_accuracy_score(y, p))
    if "test" in labels:
        m["id_acc"], m["id_bacc"] = m["test_acc"], m["test_bacc"]
    present = [k for k in ood if k in labels]
    if present:
        m["ood_acc"] = float(np.mean([m[f"{k}_acc"] for k in present]))
        m["ood_bacc"] = float(np.mean([m[f"{k}_bacc"] for k in present]))
    return m


def table_columns(row: Mapping[str, float], ood: Sequence[str] = OOD_TOPICS) -> list[str]:
    """The metric columns present in a row, in a stable order (ID, OOD mean, each shift, val)."""
    cols = ["id_acc", "id_bacc", "ood_acc", "ood_bacc"]
    cols += [f"{t}_{m}" for t in ood for m in ("acc", "bacc")]
    cols += ["val_acc"]
    return [c for c in cols if c in row]


def format_table(rows: Sequence[Mapping], extra: Sequence[str] = (),
                 ood: Sequence[str] = OOD_TOPICS) -> str:
    """A markdown table of rows (metrics in percent)."""
    cols = table_columns(rows[0], ood) if rows else []
    head = ["method", *extra, *(c.replace("self_driving", "selfdrv") for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["name"]), *(str(r.get(e, "")) for e in extra)]
        cells += [f"{100 * r[c]:.2f}" if c in r else "" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
