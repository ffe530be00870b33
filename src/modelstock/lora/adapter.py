"""Reading PEFT LoRA adapters without ``peft``: ``adapter_config.json`` and
``adapter_model.safetensors`` (or ``adapter_model.bin``), into factors and their scalings.

The conventions are PEFT's (``peft/tuners/lora/layer.py``, checked against peft 0.21):

- a Linear LoRA stores ``lora_A.weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]``; its delta
  is ``s B A`` (``Linear.get_delta_weight``), transposed to ``[in, out]`` for ``fan_in_fan_out``
  (a ``Conv1D`` weight, GPT-2 style: PEFT forces the flag on for ``Conv1D`` and off for
  ``nn.Linear``, whatever the config says, ``dispatch_default``);
- an Embedding LoRA stores ``lora_embedding_A`` ``[r, num_embeddings]`` and ``lora_embedding_B``
  ``[embedding_dim, r]``; its delta is ``s (B A)^T`` (``Embedding.get_delta_weight``);
- ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora`` (``update_layer``),
  with ``r`` and ``lora_alpha`` taken from ``rank_pattern`` / ``alpha_pattern`` where a key
  matches the module's name (``peft.utils.other.get_pattern_key``: the first key ``k`` in order
  with ``re.match(rf"(.*\\.)?({k})$", name)``);
- keys are ``base_model.model.<module>.<tensor>`` with the adapter's name removed
  (``get_peft_model_state_dict``); every other tensor (``modules_to_save``, biases trained with
  ``bias="all"``/``"lora_only"``, embedding layers saved whole) is a dense value, loaded over
  the base model's as it is.

Anything whose weights are not exactly such a delta (DoRA, other PEFT types, LoRA variants,
initialisations that modify the base weights) is refused with a one-line `ModelStockError`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import open_checkpoint
from ..errors import ModelStockError

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# Suffixes of a module's factors: (A, B) for each kind of layer.
FACTOR_SUFFIXES = {
    "linear": (".lora_A.weight", ".lora_B.weight"),
    "embedding": (".lora_embedding_A", ".lora_embedding_B"),
}

# Options that change what the stored weights mean: refused unless unset (None/False/empty).
VARIANTS = {
    "use_dora": "DoRA (use_dora) rescales every column of the merged weight by a learned "
                "magnitude: its delta is not the low-rank product",
    "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens) acts only after its "
                               "invocation tokens: not a weight delta",
    "use_qalora": "QA-LoRA (use_qalora) pools the input before lora_A: not a weight delta of "
                  "this shape",
    "velora_config": "VeLoRA (velora_config) is a LoRA variant this merge does not model",
    "monteclora_config": "MonteCLoRA (monteclora_config) samples its factors: not one delta",
    "layer_replication": "layer_replication changes the model's layers: not a weight delta",
    "lora_bias": "lora_bias adds a trained bias to lora_B, which this merge does not model yet",
    "target_parameters": "target_parameters (LoRA on bare nn.Parameters, e.g. MoE experts) is "
                         "not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) mixes adapters per token: not one delta",
    "kasa_config": "KaSA (kasa_config) is a LoRA variant this merge does not model",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) store a sparse "
                               "embedding delta, which this merge does not model yet",
    "ensure_weight_tying": "ensure_weight_tying ties lm_head's LoRA to the embedding's, which "
                           "this merge does not model",
    "enable_lora": "a merged-QKV LoRA (enable_lora, PEFT < 0.4) is not supported",
}
# Initialisations after which the adapter is relative to modified base weights, unless it was
# converted with save_pretrained(path_initial_model_for_weight_conversion=...), which saves
# init_lora_weights=True (peft_model.py, PeftModel.save_pretrained).
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
# Options that do not change the stored delta (or only how training ran).
HARMLESS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
    "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "qalora_group_size", "runtime_config",
}


def _is_set(value) -> bool:
    return value not in (None, False, 0, "", [], {})


@dataclass(frozen=True)
class LoraSettings:
    """What ``adapter_config.json`` says about the math: ranks, alphas, scaling rule."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    bias: str = "none"
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    peft_type: str = "LORA"
    use_dora: bool = False

    @staticmethod
    def _pattern_key(patterns: Mapping[str, object], name: str) -> str | None:
        """PEFT's ``get_pattern_key``: the first key ``k`` with ``(.*\\.)?(k)$`` matching."""
        for key in patterns:
            if re.match(rf"(.*\.)?({key})$", name):
                return key
        return None

    def rank_for(self, module: str) -> int:
        key = self._pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module: str) -> float:
        key = self._pattern_key(self.alpha_pattern, module)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scaling_for(self, module: str) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (PEFT's ``update_layer``)."""
        r, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def parse_lora_config(config: object, path: str | os.PathLike = CONFIG_NAME) -> LoraSettings:
    """Validate an adapter config (the parsed JSON); refuse what is not a plain LoRA delta."""
    path = str(path)

    def bad(why: str) -> ModelStockError:
        return ModelStockError(why, path)

    if not isinstance(config, dict):
        raise bad("malformed adapter config: not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise bad("malformed adapter config: no peft_type")
    if str(peft_type).upper() != "LORA":
        raise bad(f"peft_type {peft_type!r} is not LoRA: only plain LoRA adapters are merged "
                  "in factor space (LoHa, LoKr, IA3, AdaLoRA, ... are other products)")
    for key, why in VARIANTS.items():
        if _is_set(config.get(key)):
            raise bad(f"{why}; refusing")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        raise bad(f"init_lora_weights={init!r} moved the base weights, so the adapter is not a "
                  "delta from the base model; convert it first (PEFT's save_pretrained with "
                  "path_initial_model_for_weight_conversion)")
    for key, value in config.items():
        if key not in HARMLESS and key not in VARIANTS and _is_set(value):
            raise bad(f"unrecognised option {key}={json.dumps(value)[:60]} (a newer PEFT's LoRA "
                      "variant?): refusing rather than merging what may not be a low-rank delta")

    def number(key: str, default=None, integer: bool = False):
        v = config.get(key, default)
        ok = isinstance(v, int) if integer else isinstance(v, int | float)
        if not ok or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            kind = "a positive integer" if integer else "a positive number"
            raise bad(f"malformed adapter config: {key} must be {kind}, got {v!r}")
        return v

    def flag(key: str) -> bool:
        v = config.get(key, False)
        if v is None:
            return False
        if not isinstance(v, bool):
            raise bad(f"malformed adapter config: {key} must be true or false, got {v!r}")
        return v

    def pattern(key: str, integer: bool) -> dict:
        v = config.get(key) or {}
        if not isinstance(v, dict):
            raise bad(f"malformed adapter config: {key} must be an object")
        for k, x in v.items():
            ok = isinstance(x, int) if integer else isinstance(x, int | float)
            if not ok or isinstance(x, bool) or not math.isfinite(x) or x <= 0:
                raise bad(f"malformed adapter config: {key}[{k!r}] must be positive, got {x!r}")
            try:
                re.compile(k)
            except re.error as e:
                raise bad(f"malformed adapter config: {key} key {k!r} is not a regular "
                          f"expression ({e})") from None
        return dict(v)

    target = config.get("target_modules")
    if target is not None and not isinstance(target, str | list):
        raise bad("malformed adapter config: target_modules must be a list or a string")
    to_save = config.get("modules_to_save")
    if to_save is not None and not (isinstance(to_save, list)
                                    and all(isinstance(m, str) for m in to_save)):
        raise bad("malformed adapter config: modules_to_save must be a list of names")
    bias = config.get("bias", "none") or "none"
    if bias not in ("none", "all", "lora_only"):
        raise bad(f"malformed adapter config: bias must be none, all or lora_only, got {bias!r}")
    base = config.get("base_model_name_or_path")
    task = config.get("task_type")
    return LoraSettings(
        r=number("r", 8, integer=True), lora_alpha=number("lora_alpha", 8),
        use_rslora=flag("use_rslora"), fan_in_fan_out=flag("fan_in_fan_out"),
        rank_pattern=pattern("rank_pattern", True), alpha_pattern=pattern("alpha_pattern", False),
        target_modules=target, modules_to_save=to_save, bias=bias,
        base_model_name_or_path=base if isinstance(base, str) else None,
        task_type=task if isinstance(task, str) else None, peft_type="LORA", use_dora=False)


class Factors:
    """What follows from a pair of LoRA factors ``A`` (``[r, ...]``) and a layer ``kind``: the
    rank, and whether the delta ``B @ A`` is transposed against the base weight."""

    A: torch.Tensor
    kind: str
    fan_in_fan_out: bool

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def transposed(self) -> bool:
        """Whether the base weight is ``(B A)^T``-shaped: an embedding, or ``fan_in_fan_out``."""
        return self.kind == "embedding" or self.fan_in_fan_out


@dataclass
class LoraModule(Factors):
    """One module's LoRA factors in PEFT's layout, and its scaling.

    ``A`` is ``[r, in]`` and ``B`` ``[out, r]`` (an embedding: ``[r, num_embeddings]`` and
    ``[embedding_dim, r]``). The delta to the base weight is ``scaling * B @ A``, transposed
    for an embedding and for ``fan_in_fan_out``: `shape` is the base weight's shape."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    kind: str = "linear"
    fan_in_fan_out: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        out, inp = self.B.shape[0], self.A.shape[1]
        return (inp, out) if self.transposed else (out, inp)

    def left_right(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, R)`` with ``delta = scaling * L @ R`` in the base weight's layout: ``(B, A)``,
        or ``(A^T, B^T)`` when transposed. Rows of ``L`` are the rows of the weight."""
        a, b = self.A.to(dtype), self.B.to(dtype)
        return (a.T, b.T) if self.transposed else (b, a)

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense delta (for checks and small modules: it is ``out x in``)."""
        left, right = self.left_right(dtype)
        return (left @ right) * self.scaling


@dataclass
class LoraAdapter:
    """A LoRA adapter: its modules' factors and the dense tensors saved beside them (keys as
    stored, ``base_model.model.<name>``)."""

    path: str
    settings: LoraSettings
    modules: dict[str, LoraModule]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def _classify(key: str) -> tuple[str, str, str] | None:
    """``(module, kind, "A"|"B")`` for a factor key, None for a dense tensor."""
    for kind, (sa, sb) in FACTOR_SUFFIXES.items():
        for which, suffix in (("A", sa), ("B", sb)):
            if key.endswith(suffix):
                return key[len(PREFIX) : -len(suffix)], kind, which
    return None


LORA_PART = re.compile(r"\.(lora_[A-Za-z_]+|lora_magnitude_vector)(\.|$)")


def lora_adapter_from_state_dict(state: Mapping[str, torch.Tensor], config: Mapping | LoraSettings,
                                 path: str = "<state dict>",
                                 weights_path: str | None = None) -> LoraAdapter:
    """An adapter from a PEFT state dict (as ``get_peft_model_state_dict`` returns it, or as
    saved) and its config (the parsed ``adapter_config.json``, or `LoraSettings`)."""
    wpath = weights_path or path
    settings = config if isinstance(config, LoraSettings) else \
        parse_lora_config(dict(config), os.path.join(path, CONFIG_NAME)
                          if os.path.isdir(path) else path)
    raw = dict(config) if isinstance(config, Mapping) else {}
    factors: dict[str, dict[str, object]] = {}
    dense: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if not key.startswith(PREFIX):
            raise ModelStockError(f"key does not start with {PREFIX!r}: not PEFT's LoRA layout",
                                  wpath, key)
        found = _classify(key)
        if found is None:
            m = LORA_PART.search(key)
            if m is not None:
                what = "DoRA's magnitude vector" if "magnitude" in m.group(1) else \
                    f"{m.group(1)} is not a plain LoRA factor"
                raise ModelStockError(f"module '{key[len(PREFIX) : m.start()]}': {what} "
                                      f"({key}); refusing", wpath)
            dense[key] = value
            continue
        name, kind, which = found
        entry = factors.setdefault(name, {"kind": kind})
        if entry["kind"] != kind:
            raise ModelStockError(f"module '{name}' has both Linear and Embedding LoRA factors",
                                  wpath)
        entry[which] = value
    modules: dict[str, LoraModule] = {}
    for name, entry in factors.items():
        modules[name] = _module(name, entry, settings, wpath)
    if not modules:
        raise ModelStockError("no LoRA factors (lora_A/lora_B) found", wpath)
    return LoraAdapter(path, settings, modules, dense, raw)


def _module(name: str, entry: dict, settings: LoraSettings, path: str) -> LoraModule:
    kind = entry["kind"]
    sa, sb = FACTOR_SUFFIXES[kind]
    if "A" not in entry or "B" not in entry:
        have, lack = (sa, sb) if "A" in entry else (sb, sa)
        raise ModelStockError(f"module '{name}' has {have.lstrip('.')} but no "
                              f"{lack.lstrip('.')}", path)
    a, b = entry["A"], entry["B"]
    for label, t in (("A", a), ("B", b)):
        if t.dim() != 2:
            raise ModelStockError(f"module '{name}': lora_{label} is {list(t.shape)}: only "
                                  "Linear and Embedding LoRA (2-D factors) are supported, not "
                                  "convolutions", path)
        if not t.dtype.is_floating_point:
            raise ModelStockError(f"module '{name}': lora_{label} has dtype {t.dtype}, not a "
                                  "float", path)
    if a.shape[0] != b.shape[1]:
        raise ModelStockError(f"module '{name}': A/B shape mismatch: lora_A is {list(a.shape)} "
                              f"(rank {a.shape[0]}) but lora_B is {list(b.shape)} (rank "
                              f"{b.shape[1]})", path)
    r = settings.rank_for(name)
    if a.shape[0] != r:
        raise ModelStockError(f"module '{name}': its factors have rank {a.shape[0]} but "
                              f"adapter_config.json gives r={r} for it", path)
    for label, t in (("A", a), ("B", b)):
        if not bool(torch.isfinite(t).all()):
            raise ModelStockError(f"module '{name}': lora_{label} holds NaN or Inf", path)
    return LoraModule(name, a, b, settings.scaling_for(name), kind,
                      settings.fan_in_fan_out and kind == "linear")


def read_lora_adapter(path: str | os.PathLike, trust_pickle: bool = False) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (``adapter_config.json`` and
    ``adapter_model.safetensors``, or ``adapter_model.bin``, unpickled with
    ``weights_only=True`` unless ``trust_pickle``)."""
    root = Path(path)
    if not root.is_dir():
        raise ModelStockError("not an adapter directory (expected adapter_config.json and "
                              "adapter_model.safetensors in it)", root)
    cfg_path = root / CONFIG_NAME
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelStockError("missing: not a PEFT adapter directory", cfg_path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelStockError(f"cannot read ({getattr(e, 'strerror', None) or e})",
                              cfg_path) from None
    try:
        config = json.loads(text)
    except ValueError as e:
        raise ModelStockError(f"malformed JSON ({e})", cfg_path) from None
    settings = parse_lora_config(config, cfg_path)
    weights = next((root / n for n in WEIGHTS_NAMES if (root / n).is_file()), None)
    if weights is None:
        raise ModelStockError(f"no {' or '.join(WEIGHTS_NAMES)} beside {CONFIG_NAME}", root)
    # Zero-copy views of the memory-mapped file, which they keep alive (torch.frombuffer holds
    # a reference to the map): the reader is not closed, the map goes with the last view.
    reader = open_checkpoint(weights, trust_pickle)
    state = {k: reader.read(k).view(info.shape) for k, info in reader.infos.items()}
    adapter = lora_adapter_from_state_dict(state, settings, str(root), str(weights))
    adapter.config = config
    return adapter
