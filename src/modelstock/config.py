"""mergekit YAML configs: the subset that maps onto this engine, and a clear error for the rest.

Supported (with mergekit's meaning, see README): ``merge_method`` ``model_stock`` (parameter
``filter_wise``), ``linear`` (per-model ``weight``, top-level ``weight`` and ``normalize``) and
``average`` (our name for a plain mean of the ``models``); ``base_model``; ``models`` (each
``model: PATH`` and optional ``parameters``); ``dtype``; ``out_dtype``; ``tokenizer_source``
(``union``, ``base`` or a model) or a ``tokenizer:`` section (``source``,
``pad_to_multiple_of``); ``chat_template``. Without either the vocabulary is the union (mergekit
takes the base's, and stops on embeddings of different sizes). A model is a local path
(relative to the working directory, as in mergekit) or a
Hugging Face Hub id, ``org/name`` or ``org/name@revision`` (mergekit's spelling; also its
mapping ``{model: {path: org/name, revision: REV}}``), fetched when the merge opens it
(`modelstock.hub`); a local path of the same spelling wins. ``model+lora`` (or ``{model: ...,
lora: ...}``) is that model with the LoRA adapter applied, as PEFT's ``merge_and_unload``
gives it.

mergekit 0.1.5's ``model_stock`` (``mergekit/merge_methods/model_stock.py``) declares one
parameter, ``filter_wise``, read from the top-level ``parameters`` only; every other parameter,
and every per-model one (``weight``, ``density``, even a per-model ``filter_wise``), is never
looked up (``mergekit/parameter_resolver.py`` resolves the method's declared parameters only),
so it has no effect. Published configs often carry them: they are accepted here with a warning
(`MergeConfig.warnings`), not refused.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .engine import MergeOptions
from .errors import ModelStockError
from .report import MergeReport
from .vocab import check_chat_template

CONFIG_METHODS = ("model_stock", "linear", "average")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
TOP_KEYS = ("merge_method", "base_model", "models", "dtype", "out_dtype", "parameters",
            "tokenizer_source", "tokenizer", "chat_template")
UNSUPPORTED_KEYS = {
    "slices": "layer slices (frankenmerges) are not supported; list whole models under models",
    "modules": "per-module merges are not supported; list whole models under models",
}
TOKENIZER_KEYS = ("source", "pad_to_multiple_of")
GLOBAL_PARAMETERS = {"model_stock": ("filter_wise",), "linear": ("normalize", "weight"),
                     "average": ()}
MODEL_PARAMETERS = {"model_stock": (), "linear": ("weight",), "average": ()}
# Methods whose undeclared parameters mergekit never reads: accepted with a warning, not refused.
IGNORES_OTHER_PARAMETERS = ("model_stock",)
# Said once at run time for a model_stock config (and in the README): where this engine
# deliberately computes something other than mergekit 0.1.5 from the same YAML.
MERGEKIT_DIFFERENCES = (
    "model_stock here differs from mergekit on purpose: t is clamped to [0, 1] (mergekit "
    "extrapolates where cos < 0; --no-clamp for its rule), angles are accumulated in float64 "
    "and arithmetic is float32 or wider (mergekit computes in `dtype`), and an embedding's t "
    "comes from the rows of the base's tokens only")
# MergeOptions fields a mergekit YAML does without: how a merge runs, and allow_nonfinite (which
# only matters for inputs holding NaN or Inf).
EXECUTION_FIELDS = ("chunk_numel", "device", "threads", "allow_nonfinite")


@dataclass(frozen=True)
class MergeConfig:
    """A config resolved to the engine's terms: the anchor, the models, the options, and
    ``warnings`` (one line each) about keys that were accepted but have no effect. They belong
    in the merge's report: ``merge_checkpoints(..., annotate=cfg.annotate)``."""

    anchor: str
    models: list[str]
    options: MergeOptions
    merge_method: str
    warnings: tuple[str, ...] = ()

    def annotate(self, report: MergeReport) -> None:
        """Put this config's warnings first among ``report.warnings`` (a `MergeReport`)."""
        report.warnings[:0] = [w for w in self.warnings if w not in report.warnings]


def _fail(source: str, message: str) -> ModelStockError:
    return ModelStockError(message, source)


def _path(value: object, key: str, source: str) -> str:
    """A model reference: a local path or a Hub id (``org/name[@revision]``), as a string;
    mergekit's mapping form ``{model: {path: P, revision: R}}`` becomes ``P@R``."""
    if isinstance(value, Mapping):
        value = _reference(value, key, source)
    if isinstance(value, str) and value.strip():
        return value
    raise _fail(source, f"{key}: expected a local path or a Hub id (org/name[@revision]), got "
                        f"{value!r}")


def _reference(ref: Mapping, key: str, source: str) -> str:
    """mergekit's ``ModelReference`` mapping (``model: {path, revision}``, ``lora``)."""
    lora = ref.get("lora")
    if lora is not None:
        inner = dict(ref)
        del inner["lora"]
        if isinstance(lora, Mapping):  # a ModelPath: {path, revision}
            lora = _reference({"model": lora}, f"{key}.lora", source)
        return f"{_reference(inner, key, source)}+{_path(lora, f'{key}.lora', source)}"
    extra = [k for k in ref if k not in ("model", "lora")]
    if extra:
        raise _fail(source, f"{key}.{extra[0]}: not supported (supported: model: {{path, "
                            "revision}})")
    inner = ref.get("model")
    if isinstance(inner, str):
        return inner
    if not isinstance(inner, Mapping) or not isinstance(inner.get("path"), str):
        raise _fail(source, f"{key}.model: expected a path or {{path: ..., revision: ...}}")
    extra = [k for k in inner if k not in ("path", "revision")]
    if extra:
        raise _fail(source, f"{key}.model.{extra[0]}: unknown key (supported: path, revision)")
    revision = inner.get("revision")
    if revision is None:
        return inner["path"]
    if not isinstance(revision, str) or not revision.strip():
        raise _fail(source, f"{key}.model.revision: expected a branch, tag or commit, got "
                            f"{revision!r}")
    return f"{inner['path']}@{revision}"


def _same(a: str, b: str) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _scalar(value: object, key: str, source: str, kind: type) -> object:
    if isinstance(value, list | dict):
        raise _fail(source, f"{key}: gradients (lists) and per-tensor filters are not "
                            "supported; give one value")
    if kind is bool:
        if not isinstance(value, bool):
            raise _fail(source, f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(source, f"{key}: expected a number, got {value!r}")
    return float(value)


def _dtype(value: object, key: str, source: str) -> torch.dtype | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise _fail(source, f"{key}: {value!r} is not supported; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def _parameters(value: object, key: str, allowed: Sequence[str], method: str,
                source: str, ignored: dict[str, list[str]] | None = None) -> dict:
    """The ``allowed`` parameters of a ``parameters:`` mapping. Any other name is an error, or,
    where mergekit ignores it (``ignored`` given), left out and recorded there: name -> keys."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(source, f"{key}: expected a mapping")
    kept = {}
    for name in value:
        if name in allowed:
            kept[name] = value[name]
        elif ignored is not None and isinstance(name, str):
            ignored.setdefault(name, []).append(key)
        else:
            raise _fail(source, f"{key}.{name}: not a parameter of merge_method {method} here"
                                f"{' (allowed: ' + ', '.join(allowed) + ')' if allowed else ''}")
    return kept


def _ignored_warning(method: str, where: str, ignored: dict[str, list[str]]) -> str:
    """One line naming parameters that ``method`` never reads (name -> the keys holding it)."""
    names = ", ".join(sorted(ignored))
    keys = sorted({k for ks in ignored.values() for k in ks}, key=lambda k: (len(k), k))
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    hint = (" (filter_wise counts only under the top-level parameters)"
            if where == "models" and "filter_wise" in ignored else "")
    return (f"{shown}: {names} ha{'s' if len(ignored) == 1 else 've'} no effect on "
            f"merge_method {method} (mergekit ignores {'it' if len(ignored) == 1 else 'them'} "
            f"too){hint}")


def _vocabulary(data: Mapping, base: str | None, source: str) -> dict:
    """``tokenizer_source``, the ``tokenizer`` section and ``chat_template`` as options.
    Without either key the vocabulary is the union (mergekit takes the base's tokenizer then,
    and refuses embeddings of different sizes: the two agree wherever mergekit runs, unless
    ids were reassigned at equal sizes)."""
    section = data.get("tokenizer")
    if section is not None and "tokenizer_source" in data:
        raise _fail(source, "give tokenizer_source or a tokenizer section, not both")
    if section is not None:
        if not isinstance(section, Mapping):
            raise _fail(source, "tokenizer: expected a mapping (source, pad_to_multiple_of)")
        if "tokens" in section:
            raise _fail(source, "tokenizer.tokens: per-token embedding sources are not "
                                "supported (rows of tokens the base lacks are averaged over "
                                "the models that have them)")
        extra = [k for k in section if k not in TOKENIZER_KEYS]
        if extra:
            raise _fail(source, f"tokenizer.{extra[0]}: unknown key (supported: "
                                f"{', '.join(TOKENIZER_KEYS)})")
        value, key = section.get("source", "union"), "tokenizer.source"
    else:
        value, key = data.get("tokenizer_source", "union"), "tokenizer_source"
    if isinstance(value, Mapping):
        value = _reference(value, key, source)
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, f"{key}: expected union, base or a model, got {value!r}")
    if value == "base" and base is None:
        raise _fail(source, f"{key}: 'base' needs base_model")
    if value == "base":  # the base model's vocabulary, whichever input is the anchor
        value = base
    pad = (section or {}).get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise _fail(source, f"tokenizer.pad_to_multiple_of: expected a positive integer, got "
                            f"{pad!r}")
    template = data.get("chat_template")
    if template is not None:
        try:
            check_chat_template(template)
        except ModelStockError as e:
            raise _fail(source, f"chat_template: {e}") from None
    return {"tokenizer_source": value, "pad_to_multiple_of": pad, "chat_template": template}


def parse_config(data: object, source: str = "<config>") -> MergeConfig:
    """Turn a loaded mergekit YAML document into a `MergeConfig`; any key this engine cannot
    honour raises a `ModelStockError` naming it."""
    if not isinstance(data, Mapping):
        raise _fail(source, "expected a mapping of mergekit keys at the top level")
    for key in data:
        if key in UNSUPPORTED_KEYS:
            raise _fail(source, f"key '{key}': {UNSUPPORTED_KEYS[key]}")
        if key not in TOP_KEYS:
            raise _fail(source, f"unknown key '{key}' (supported: {', '.join(TOP_KEYS)})")
    method = data.get("merge_method")
    if method not in CONFIG_METHODS:
        raise _fail(source, f"merge_method: {method!r} is not supported "
                            f"(supported: {', '.join(CONFIG_METHODS)})")
    base = data.get("base_model")
    base = None if base is None else _path(base, "base_model", source)
    lenient = method in IGNORES_OTHER_PARAMETERS
    ignored_top: dict[str, list[str]] = {}
    ignored_models: dict[str, list[str]] = {}
    params = _parameters(data.get("parameters"), "parameters", GLOBAL_PARAMETERS[method],
                         method, source, ignored_top if lenient else None)
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise _fail(source, "models: expected a non-empty list of {model: PATH} entries")
    models: list[str] = []
    weights: list[float | None] = []
    for i, entry in enumerate(entries):
        key = f"models[{i}]"
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise _fail(source, f"{key}: expected a mapping with a 'model' key")
        for k in entry:
            if k not in ("model", "parameters"):
                raise _fail(source, f"{key}.{k}: unknown key (supported: model, parameters)")
        path = _path(entry["model"], f"{key}.model", source)
        if any(_same(path, m) for m in models):
            raise _fail(source, f"{key}.model: {path} is listed twice")
        p = _parameters(entry.get("parameters"), f"{key}.parameters", MODEL_PARAMETERS[method],
                        method, source, ignored_models if lenient else None)
        if method == "model_stock" and base is not None and _same(path, base):
            continue  # mergekit reads the base model once, as the base
        models.append(path)
        weights.append(_scalar(p["weight"], f"{key}.parameters.weight", source, float)
                       if "weight" in p else None)
    dtype = _dtype(data.get("dtype"), "dtype", source)
    out_dtype = _dtype(data.get("out_dtype"), "out_dtype", source)
    common = {
        **_vocabulary(data, base, source),
        # mergekit writes its compute dtype when out_dtype is absent; we compute in float32
        # (float64 if asked or if an input is float64), never lower.
        "dtype": out_dtype or dtype,
        "compute_dtype": torch.float64 if dtype == torch.float64 else None,
    }
    if method == "model_stock":
        if base is None:
            raise _fail(source, "base_model: model_stock needs the pretrained base model")
        if len(models) < 2:  # mergekit: "requires at least 3 inputs", the base included
            raise _fail(source, f"models: model_stock needs at least 2 models besides "
                                f"base_model, got {len(models)}")
        row = _scalar(params.get("filter_wise", False), "parameters.filter_wise", source, bool)
        opts = MergeOptions(method="model-stock", granularity="row" if row else "tensor",
                            **common)
        warnings = tuple(_ignored_warning(method, where, ignored)
                         for where, ignored in (("models", ignored_models),
                                                ("parameters", ignored_top)) if ignored)
        return MergeConfig(base, models, opts, method, warnings)
    if method == "linear":
        default = params.get("weight")
        default = None if default is None else _scalar(default, "parameters.weight", source,
                                                       float)
        if base is not None and not any(_same(base, m) for m in models):
            # mergekit merges an unlisted base model in as one more input
            models.append(base)
            weights.append(None)
        for i, w in enumerate(weights):
            if w is None and default is None:
                what = "base_model" if i >= len(entries) else f"models[{i}].parameters"
                raise _fail(source, f"{what}: linear needs a weight for {models[i]} (give "
                                    "parameters.weight there or at the top level)")
        normalize = _scalar(params.get("normalize", True), "parameters.normalize", source, bool)
        opts = MergeOptions(method="linear", weights=tuple(default if w is None else w
                                                           for w in weights),
                            normalize=normalize, **common)
    else:
        opts = MergeOptions(method="linear", weights=(1.0,) * len(models), **common)
    return MergeConfig(base if base is not None else models[0], models, opts, method)


def load_config(path: str | os.PathLike) -> MergeConfig:
    """Read a mergekit YAML file (needs PyYAML: ``pip install 'modelstock[yaml]'``)."""
    try:
        import yaml
    except ImportError:
        raise ModelStockError("--config needs PyYAML: pip install 'modelstock[yaml]'") from None
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _fail(source, f"malformed YAML ({first})") from None
    return parse_config(data, source)


def to_mergekit_yaml(anchor: str, models: Sequence[str], options: MergeOptions) -> str:
    """The mergekit YAML for a merge, where mergekit can express it: ``model-stock`` with tensor
    or row granularity and ``clamp=False``, or ``linear``; anything else raises, in one line.
    For ``linear`` the anchor is written as ``base_model`` only if it is one of the models.

    mergekit's ``model_stock`` has no clamp: where the task vectors disagree (cos < 0) it
    extrapolates away from the fine-tunes (``t < 0``), so a clamped merge (our default) has no
    mergekit equivalent. With ``clamp=False`` mergekit computes the same merge up to rounding,
    except where the task vectors are tiny: mergekit divides by ``max(|d_i||d_j|, 1e-6)``, so a
    pair whose norm product is below 1e-6 gets a smaller ``|cos|`` (and ``t``) there than here.
    Without an output dtype (``options.dtype``) mergekit computes in the inputs' dtype (we in
    float32); with one, ``dtype: float32`` is written so that it computes as we do.
    ``load_config`` reads the YAML back with our default ``clamp=True``. Our default tokenizer
    source, ``union``, is written as no key (see `parse_config`: mergekit then takes the base's
    tokenizer, the same vocabulary wherever it runs)."""
    import yaml

    if options.method not in ("model-stock", "linear"):
        raise ModelStockError(f"mergekit YAML cannot express method {options.method}")
    default = MergeOptions(method=options.method, weights=options.weights)
    skip = {"method", "weights", "normalize", "dtype", "compute_dtype", "clamp",
            "tokenizer_source", "pad_to_multiple_of", "chat_template", *EXECUTION_FIELDS}
    names = [f.name for f in dataclasses.fields(MergeOptions)]
    unexpressed = [n for n in names if n not in skip
                   and getattr(options, n) != getattr(default, n)]
    if options.granularity == "row":
        unexpressed.remove("granularity")  # filter_wise
    if options.compute_dtype is not None and options.dtype is None:
        unexpressed.append("compute_dtype without dtype")
    clamped = options.method == "model-stock" and options.clamp
    if clamped:
        unexpressed.append("clamp")
    if unexpressed:
        why = (": mergekit's model_stock has no clamp (where cos < 0 it extrapolates, t < 0); "
               "the merge it computes is clamp=False (--no-clamp)" if clamped else "")
        raise ModelStockError(f"mergekit YAML cannot express {', '.join(unexpressed)} "
                              f"(method {options.method}){why}")
    doc: dict = {"merge_method": options.method.replace("-", "_")}
    if options.method == "linear":
        if any(_same(anchor, m) for m in models):  # else mergekit would merge it in too
            doc["base_model"] = anchor
        doc["models"] = [{"model": m, "parameters": {"weight": w}}
                         for m, w in zip(models, options.weights, strict=True)]
        doc["parameters"] = {"normalize": options.normalize}
    else:
        doc["base_model"] = anchor
        doc["models"] = [{"model": m} for m in models]
        doc["parameters"] = {"filter_wise": options.granularity == "row"}
    if options.compute_dtype is not None:
        doc["dtype"] = str(options.compute_dtype).removeprefix("torch.")
    elif options.dtype is not None:
        # mergekit computes in `dtype` (without it, in the inputs' dtype: bfloat16 arithmetic
        # for bfloat16 models); we compute in float32. Without out_dtype, `dtype` would also
        # be its output dtype, so this is written only beside out_dtype.
        doc["dtype"] = "float32"
    if options.dtype is not None:
        doc["out_dtype"] = str(options.dtype).removeprefix("torch.")
    vocab = options.tokenizer_source
    if vocab in ("base", anchor):
        vocab = "base" if doc.get("base_model") == anchor else anchor
    if options.pad_to_multiple_of is None:
        if vocab != "union":  # without the key, as read back by `parse_config`
            doc["tokenizer_source"] = vocab
    else:
        doc["tokenizer"] = {"source": vocab, "pad_to_multiple_of": options.pad_to_multiple_of}
    if options.chat_template is not None:
        doc["chat_template"] = options.chat_template
    return yaml.safe_dump(doc, sort_keys=False)
