"""Model Stock for LoRA adapters, exactly, in factor space (PEFT's adapter format, no ``peft``).

    from modelstock.lora import merge_lora_adapters
    report = merge_lora_adapters(["lora-seed0/", "lora-seed1/"], "merged-lora/")

Each adapted module's Gram matrix, and so its Model Stock ratio ``t``, is computed from the
factors (never an ``out x in`` matrix); the merged adapter is exact (rank ``sum_i r_i`` per
module) or, with ``rank=R``, the best rank-R approximation of the exact merge.
`inspect_lora_adapters` measures without merging, as `modelstock.geometry.inspect_checkpoints`
does for dense fine-tunes (``modelstock inspect`` draws both with the same tables and plots).
"""

from .adapter import (
    LoraAdapter,
    LoraModule,
    LoraSettings,
    lora_adapter_from_state_dict,
    parse_lora_config,
    read_lora_adapter,
)
from .factors import Compressed, compress, factor_gram, merged_factors
from .inspection import inspect_lora_adapters
from .merge import (
    LoraMerge,
    MergedModule,
    adapter_config,
    inspect_lora,
    merge_lora,
    merge_lora_adapters,
)

__all__ = [
    "Compressed",
    "LoraAdapter",
    "LoraMerge",
    "LoraModule",
    "LoraSettings",
    "MergedModule",
    "adapter_config",
    "compress",
    "factor_gram",
    "inspect_lora",
    "inspect_lora_adapters",
    "lora_adapter_from_state_dict",
    "merge_lora",
    "merge_lora_adapters",
    "merged_factors",
    "parse_lora_config",
    "read_lora_adapter",
]
