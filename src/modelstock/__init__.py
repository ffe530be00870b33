"""Model Stock (Jang, Yun, Han, ECCV 2024): merge a few fine-tuned models with their pretrained
anchor, layer by layer, with a ratio derived from the angle between their task vectors."""

__version__ = "0.1.0"

from .api import merge_checkpoints, merge_state_dicts  # noqa: E402
from .batchnorm import update_bn  # noqa: E402
from .checkpoint import open_checkpoint  # noqa: E402
from .errors import ModelStockError  # noqa: E402
from .recipe import Execution, MergeOptions, Recipe  # noqa: E402
from .report import LayerReport, MergeReport  # noqa: E402
from .soups import greedy_soup  # noqa: E402
from .stock import model_stock, stock_ratio  # noqa: E402

__all__ = [
    "Execution",
    "LayerReport",
    "MergeOptions",
    "MergeReport",
    "ModelStockError",
    "Recipe",
    "greedy_soup",
    "merge_checkpoints",
    "merge_state_dicts",
    "model_stock",
    "open_checkpoint",
    "stock_ratio",
    "update_bn",
]
