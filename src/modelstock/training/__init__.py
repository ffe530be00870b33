"""Model Stock during training ("applicable during or after training"): N runs fine-tune from
the same pretrained weights and are periodically replaced by their Model Stock merge.

`PeriodicModelStock` merges N models held by one process; `DistributedModelStock` merges one
model per replica across processes with torch.distributed (an all-reduce, no gathering).
"""

from .distributed import DistributedModelStock, replica_group
from .periodic import PeriodicModelStock

__all__ = ["DistributedModelStock", "PeriodicModelStock", "replica_group"]
