"""Recompute BatchNorm running statistics of a merged model from data (`update_bn`).

A merge interpolates weights; the running statistics it writes (by the recipe's ``buffers``
policy) are an estimate for the merged weights. A user with data can replace the estimate with
the real thing, as `torch.optim.swa_utils.update_bn` does for averaged models. This version
also takes the batches of Hugging Face style loaders (dicts of tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

_NORMS = (torch.nn.modules.batchnorm._BatchNorm,)


def _default_forward(model: torch.nn.Module, batch: object) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, list | tuple):
        model(batch[0])
    else:
        model(batch)


def _to(batch: object, device: torch.device | str | None) -> object:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to(v, device) for v in batch)
    return batch


@torch.no_grad()
def update_bn(loader: Iterable, model: torch.nn.Module, device: torch.device | str | None = None,
              forward: Callable[[torch.nn.Module, object], object] | None = None) -> None:
    """Reset every BatchNorm layer's running statistics and re-estimate them with one pass over
    ``loader`` (a cumulative average over all its batches). ``forward(model, batch)`` runs one
    batch; by default a tensor is the input, a tuple or list gives its first item and a dict is
    passed as keywords. The model's training mode and each layer's momentum are restored."""
    norms = [m for m in model.modules() if isinstance(m, _NORMS) and m.track_running_stats]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
    was_training = model.training
    model.train()
    run = forward or _default_forward
    try:
        for batch in loader:
            run(model, _to(batch, device))
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
