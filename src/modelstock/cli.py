"""The ``modelstock`` command line."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import re
import signal
import sys
import threading
from pathlib import Path

import click
import torch

from . import __version__
from .api import DEFAULT_SHARD_BYTES, merge_checkpoints
from .errors import ModelStockError, Terminated
from .recipe import BUFFER_POLICIES, DEFAULT_CHUNK_NUMEL, GRANULARITIES, METHODS, MergeOptions

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"512MiB"`` -> 536_870_912, ``"1000"`` -> 1000."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (try 5GB, 500MB, 2GiB)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _dtype(ctx, param, value):
    if value is None:
        return None
    try:
        return DTYPE_NAMES[value.lower()]
    except KeyError:
        raise click.BadParameter(f"{value!r}; choose from {', '.join(DTYPE_NAMES)}") from None


def _on_signal(signum, frame):
    raise Terminated(signum)


def _steady_heap() -> None:
    """Fix glibc's mmap threshold at 2 MiB: by default it rises with each large buffer freed,
    after which chunk-sized buffers come from the heap and the heap grows with the model."""
    try:
        ctypes.CDLL(None).mallopt(-3, 2 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


_resends: list[threading.Timer] = []  # signals to send again; cancelled once a run is over


def _redeliver_swallowed_signal(unraisable, previous_hook=sys.unraisablehook) -> None:
    """Python swallows (prints as 'Exception ignored') what a signal handler raises while a
    ``__del__`` or weakref callback runs: send such a signal again, a little later from another
    thread, so that its handler runs once this hook has returned, in ordinary code (should it
    land in a finalizer again, this hook sends it once more)."""
    exc = unraisable.exc_value
    if isinstance(exc, Terminated | KeyboardInterrupt):
        sig = exc.args[0] if isinstance(exc, Terminated) else signal.SIGINT
        later = threading.Timer(0.01, os.kill, (os.getpid(), sig))
        later.daemon = True
        _resends.append(later)
        later.start()
    else:
        previous_hook(unraisable)


def _signal_behind(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or Terminated that ``exc`` is, or that it was raised while
    handling: a signal's exception raised inside a threading primitive can leave a lock half
    released, and the error that follows ("release unlocked lock") then replaces it."""
    while exc is not None and not isinstance(exc, KeyboardInterrupt | Terminated):
        exc = exc.__context__
    return exc


def _written(*excs: BaseException) -> str:
    """What an interrupted run leaves: nothing, or (a signal held while the finished output
    was moved into place, see `output.atomic_output`) the complete output."""
    out = next((e.output_written for e in excs if hasattr(e, "output_written")), None)
    return "nothing was written" if out is None else f"the complete output is in place: {out}"


def run_guarded(fn, *args, **kwargs):
    """Run ``fn``; turn user errors into one line on stderr and an exit status, no traceback.

    SIGTERM and SIGHUP unwind like Ctrl-C (so temporaries are removed). SIGXFSZ is ignored so
    that a file size limit (ulimit -f) is a clean "File too large" error, not a core dump. The
    handlers are set inside the outer ``try`` so that a signal arriving at any point, even
    while reporting an error, still ends in a clean exit.
    """
    handlers = {"SIGTERM": _on_signal, "SIGHUP": _on_signal, "SIGXFSZ": signal.SIG_IGN}
    previous = {}
    hook, sys.unraisablehook = sys.unraisablehook, _redeliver_swallowed_signal
    try:
        _steady_heap()
        # Everything imported so far (torch alone makes hundreds of thousands of objects) leaves
        # the garbage collector's sight: each full collection walked it all (3-4% of a merge).
        gc.freeze()
        try:
            for name, handler in handlers.items():
                sig = getattr(signal, name, None)
                if sig is not None:
                    previous[sig] = signal.signal(sig, handler)
            return fn(*args, **kwargs)
        except ModelStockError as e:
            message = str(e)
        except OSError as e:
            message = (f"{e.filename}: " if e.filename else "") + str(e.strerror or e)
        click.echo(f"modelstock: error: {message}", err=True)
        sys.exit(1)
    except (KeyboardInterrupt, Terminated, RuntimeError) as e:
        sig = _signal_behind(e)
        if sig is None:
            raise
        if isinstance(sig, KeyboardInterrupt):
            click.echo(f"modelstock: interrupted; {_written(e, sig)}", err=True)
            sys.exit(130)
        click.echo(f"modelstock: terminated; {_written(e, sig)}", err=True)
        sys.exit(128 + sig.args[0])
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        sys.unraisablehook = hook
        for later in _resends:  # the run is over (done, or stopped by another signal)
            later.cancel()
        _resends.clear()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="modelstock")
def main() -> None:
    """Merge fine-tuned models with Model Stock (Jang, Yun, Han, ECCV 2024).

    Fine-tune a pretrained model two (or more) times with different seeds, then merge the
    fine-tunes with the pretrained weights: every layer moves from the pretrained weights
    towards the fine-tunes' average by a ratio t = 2cos/(1+cos), where cos is the cosine of the
    angle between the two task vectors (fine-tuned minus pretrained). Run
    `modelstock merge --help` to start.
    """


def _weights(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(float(w) for w in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers, e.g. "
                                 "0.7,0.3") from None


# Flags that say what to compute; a --config file says that instead.
RECIPE_FLAGS = ("method", "alpha", "weights", "granularity", "dtype", "score",
                "tokenizer_source", "pad_to_multiple_of", "chat_template")


@main.command()
@click.argument("anchor", required=False, type=click.Path(exists=False, dir_okay=True))
@click.argument("models", nargs=-1, required=False, type=click.Path(exists=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Output directory (Hugging Face layout), or a path ending in .safetensors "
                   "for one file.")
@click.option("--config", "config", type=click.Path(exists=False, dir_okay=False),
              default=None, metavar="FILE.yml",
              help="A mergekit YAML (merge_method model_stock, linear or average) instead of "
                   "ANCHOR, MODELs and the recipe flags; its models may be paths or Hub ids "
                   "(org/name@revision).")
@click.option("--method", type=click.Choice((*METHODS, "greedy")), default="model-stock",
              show_default=True,
              help="model-stock: the paper's rule. uniform: plain mean of the MODELs (a uniform "
                   "soup). wise-ft: ANCHOR + alpha (mean(MODELs) - ANCHOR). linear: weighted "
                   "mean of the MODELs (--weights; mergekit's linear). greedy: greedy soup, "
                   "the mean of the MODELs that --score keeps.")
@click.option("--alpha", type=float, default=None,
              help="Interpolation weight for --method wise-ft (0 = anchor, 1 = fine-tunes).")
@click.option("--weights", callback=_weights, default=None, metavar="W1,W2,...",
              help="One weight per MODEL for --method linear (normalized to sum to 1).")
@click.option("--score", default=None, metavar="MODULE:FUNCTION",
              help="For --method greedy: a function (importable module, or path/to/file.py) "
                   "called with a candidate state dict, returning the held-out score to "
                   "maximise.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="tensor",
              show_default=True,
              help="One ratio per tensor (the paper), per output row (like mergekit's "
                   "filter_wise), or one for the whole model (an ablation). For LoRA adapters "
                   "a row is a row of the stored base weight (for an embedding: a token).")
@click.option("--no-clamp", is_flag=True,
              help="Keep the raw t = N cos/(1+(N-1)cos) when cos <= 0 instead of clamping t to "
                   "[0, 1] (parity with other implementations; the pole still gives t = 0).")
@click.option("--average", "average", multiple=True, metavar="GLOB",
              help="Average (not Model-Stock) tensors whose name matches GLOB. Repeatable.")
@click.option("--keep-anchor", "keep_anchor", multiple=True, metavar="GLOB",
              help="Keep the anchor's value for tensors matching GLOB. Repeatable.")
@click.option("--buffers", type=click.Choice(BUFFER_POLICIES), default="follow",
              show_default=True,
              help="BatchNorm running statistics: follow the ratio of their own layer (its t, "
                   "or --alpha), keep the anchor's, or average the fine-tunes'.")
@click.option("--dtype", callback=_dtype, default=None,
              help="Output dtype for floating tensors (default: the anchor's; a merged LoRA "
                   "adapter's factors: float32), e.g. bfloat16.")
@click.option("--tokenizer-source", default="union", show_default=True,
              metavar="union|base|MODEL",
              help="Output vocabulary when fine-tunes added tokens: the union of all (rows of "
                   "tokens the anchor lacks are averaged over the fine-tunes that have them), "
                   "the anchor's, or one MODEL's (as written). Embedding rows are aligned by "
                   "token from each input's tokenizer files.")
@click.option("--pad-to-multiple-of", type=click.IntRange(min=1), default=None, metavar="N",
              help="Pad the embedding rows to a multiple of N [default: as the inputs were].")
@click.option("--chat-template", default=None, metavar="auto|chatml|JINJA",
              help="Chat template of the output tokenizer: the most common among the inputs "
                   "(auto), ChatML, or a Jinja template [default: the tokenizer source's].")
@click.option("--shard-size", type=SizeType(), default=str(DEFAULT_SHARD_BYTES),
              show_default="5GB", help="Largest output shard.")
@click.option("--chunk-size", type=int, default=DEFAULT_CHUNK_NUMEL, show_default=True,
              help="Elements per chunk: tensors larger than this are streamed in chunks, which "
                   "bounds memory at about (N+3) x 4 bytes x this.")
@click.option("--strip-prefix", default=None, metavar="PREFIX",
              help="Strip PREFIX (e.g. 'module.') from tensor names in every input.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow .pt/.bin files whose pickle runs code. Only for files you trust.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Merge inputs holding NaN/Inf: they are left out of the angle statistics and "
                   "pass through to the output elementwise.")
@click.option("--device", default="cpu", show_default=True,
              help="Where to run the arithmetic (e.g. cuda). Inputs stream from disk either way.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Worker threads for the arithmetic on CPU [default: cores, at most 4].")
@click.option("--rank", type=click.IntRange(min=1), default=None, metavar="R",
              help="LoRA adapters: compress the merged adapter to its best rank-R "
                   "approximation (default: exact, rank = the sum of the adapters' ranks).")
@click.option("--merge-into-base", "into_base", is_flag=True,
              help="LoRA adapters: write the full model, ANCHOR (the base) plus the merged "
                   "delta, instead of an adapter.")
@click.option("-f", "--force", is_flag=True,
              help="Replace an existing output (only once the new one is complete).")
@click.option("--buffered-writes", is_flag=True,
              help="Write the output through the page cache. By default it bypasses it "
                   "(O_DIRECT) where the file system allows, which costs far less CPU.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@click.pass_context
def merge(ctx, anchor, models, out, config, method, alpha, weights, score, granularity,
          no_clamp, average, keep_anchor, buffers, dtype, tokenizer_source, pad_to_multiple_of,
          chat_template, shard_size, chunk_size, strip_prefix, trust_pickle, allow_nonfinite,
          device, threads, rank, into_base, force, buffered_writes, quiet):
    """Merge fine-tuned MODELs with their pretrained ANCHOR into OUT.

    ANCHOR is the pretrained model the fine-tunes started from (with the head they started
    from); each MODEL is a fine-tune of it (N >= 2 for model-stock). Each may be a Hugging Face
    model directory (safetensors, sharded or not, or pytorch_model.bin), a .safetensors file,
    an index .json, a .pt/.bin/.ckpt state dict (also nested as {"state_dict": ...}), or a
    Hugging Face Hub id, org/name or org/name@revision (needs modelstock[hub]): only the
    weights, config and tokenizer files are fetched, into the Hugging Face cache (HF_HOME,
    HF_HUB_CACHE; HF_TOKEN for private models; HF_HUB_OFFLINE=1: the cache only). A local
    path of the same spelling wins.

    \b
    Examples:
      modelstock merge ./base ./ft-seed0 ./ft-seed1 -o ./merged
      modelstock merge org/base org/ft-seed0@v2 org/ft-seed1 -o ./merged
      modelstock merge base.pt ft0.pt ft1.pt ft2.pt -o merged.safetensors --strip-prefix module.
      modelstock merge ./base ./ft0 ./ft1 -o ./wise --method wise-ft --alpha 0.5
      modelstock merge ./base ./ft0 ./ft1 ./ft2 -o ./soup --method greedy --score evals:accuracy
      modelstock merge --config merge.yml -o ./merged

    \b
    LoRA adapters (PEFT directories) merge in factor space, exactly:
      modelstock merge ./base ./lora-seed0 ./lora-seed1 -o ./merged-lora
      modelstock merge ./lora-seed0 ./lora-seed1 -o ./merged-lora --rank 16   # no base needed
      modelstock merge ./base ./lora-seed0 ./lora-seed1 -o ./merged --merge-into-base
    """
    if config is not None:
        if anchor is not None:
            raise click.UsageError("--config names the models; give no ANCHOR or MODEL")
        given = [f"--{n}" for n in RECIPE_FLAGS
                 if ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{given[0]} cannot be combined with --config (the file "
                                   "gives the recipe)")
    elif anchor is None or not models:
        raise click.UsageError("give ANCHOR and at least one MODEL, or --config FILE.yml")
    if (method == "greedy") != (score is not None):
        raise click.UsageError("--score is required by, and only used by, --method greedy")
    if method == "greedy" and weights is not None:
        raise click.UsageError("--weights: a greedy soup is the plain mean of the kept models")
    lora = None if config is not None else _lora_inputs(ctx, anchor, models, method, into_base)
    if lora is None and (rank is not None or into_base):
        raise click.UsageError("--rank and --merge-into-base are for LoRA adapter directories")
    io_kw = {"shard_size": shard_size, "force": force, "trust_pickle": trust_pickle,
             "strip_prefix": strip_prefix, "progress": not quiet,
             "direct_io": not buffered_writes}
    engine = {"chunk_numel": chunk_size, "allow_nonfinite": allow_nonfinite, "device": device,
              "threads": threads}
    vocab = {"tokenizer_source": tokenizer_source, "pad_to_multiple_of": pad_to_multiple_of,
             "chat_template": chat_template}

    def job():
        nonlocal anchor, models
        if lora is not None:
            report = _merge_lora(lora, out, granularity, not no_clamp, rank, dtype, into_base,
                                 io_kw, engine)
        elif config is not None:
            from .config import MERGEKIT_DIFFERENCES, load_config

            cfg = load_config(config)
            anchor, models = cfg.anchor, cfg.models
            if cfg.merge_method == "model_stock" and not quiet:
                click.echo(f"note: {MERGEKIT_DIFFERENCES}", err=True)
            opts = dataclasses.replace(cfg.options, clamp=not no_clamp, average=average,
                                       keep_anchor=keep_anchor, buffers=buffers, **engine)
            report = merge_checkpoints(anchor, models, out, opts, annotate=cfg.annotate,
                                       **io_kw)
        elif method == "greedy":
            from .soups import greedy_soup_checkpoints, load_score

            report = greedy_soup_checkpoints(anchor, models, out, load_score(score),
                                             alpha=alpha,
                                             clamp=not no_clamp, average=average,
                                             keep_anchor=keep_anchor, buffers=buffers,
                                             dtype=dtype, **engine, **vocab,
                                             **io_kw)
        else:
            opts = MergeOptions(method=method, granularity=granularity, clamp=not no_clamp,
                                alpha=alpha, weights=weights, average=average,
                                keep_anchor=keep_anchor, buffers=buffers, dtype=dtype,
                                **engine, **vocab)
            report = merge_checkpoints(anchor, models, out, opts, **io_kw)
        if not quiet:
            click.echo(report.summary() + f"\nwritten      {out}", err=True)

    run_guarded(job)


# Flags that mean nothing for LoRA adapters (their merge is Model Stock in factor space), and
# those that only the full model of --merge-into-base uses (the engine and the writer).
NOT_FOR_LORA = ("alpha", "weights", "score", "average", "keep_anchor", "buffers",
                "strip_prefix", "allow_nonfinite", "tokenizer_source", "pad_to_multiple_of",
                "chat_template")
WRITER_FLAGS = ("device", "chunk_size", "shard_size", "buffered_writes")


def _lora_inputs(ctx, anchor, models, method, into_base):
    """``(base or None, adapters)`` when the inputs are LoRA adapters, else None."""
    from .lora.into_base import adapters_and_base

    try:
        lora = adapters_and_base(anchor, models)
    except ModelStockError as e:
        click.echo(f"modelstock: error: {e}", err=True)
        sys.exit(1)
    if lora is None:
        return None
    given = [f"--{n.replace('_', '-')}" for n in NOT_FOR_LORA
             if ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT]
    if method != "model-stock" or given:
        raise click.UsageError(f"{given[0] if given else '--method ' + method} does not apply "
                               "to LoRA adapters (merged with Model Stock in factor space)")
    if into_base and lora[0] is None:
        raise click.UsageError("--merge-into-base needs the base model as ANCHOR")
    writer = [f"--{n.replace('_', '-')}" for n in WRITER_FLAGS
              if ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT]
    if writer and not into_base:
        raise click.UsageError(f"{writer[0]} applies to a full model (--merge-into-base), not "
                               "to a merged adapter")
    return lora


def _merge_lora(lora, out, granularity, clamp, rank, dtype, into_base, io_kw, engine):
    from .lora import merge_lora
    from .lora.into_base import merge_into_base
    from .output import check_output_path

    base, adapters = lora
    check_output_path(Path(out), [*adapters, *([base] if base else [])], io_kw["force"])
    merged = merge_lora(adapters, base=base, granularity=granularity, clamp=clamp, rank=rank,
                        dtype=None if into_base else dtype, trust_pickle=io_kw["trust_pickle"],
                        threads=engine["threads"])
    if into_base:
        return merge_into_base(merged, base, out, dtype=dtype,
                               chunk_numel=engine["chunk_numel"], device=engine["device"],
                               threads=engine["threads"],
                               **{k: v for k, v in io_kw.items() if k != "strip_prefix"})
    merged.save(out, io_kw["force"])
    return merged.report


@main.command("inspect")
@click.argument("anchor", type=click.Path(exists=False, dir_okay=True))
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=False))
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write the per-layer report (modelstock_report.json's schema) here.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Same, as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw angle, t and norms per layer to this PNG (needs matplotlib).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Write one self-contained page with the table and the plots.")
@click.option("--all", "full", is_flag=True, help="Print every layer, however many.")
@click.option("--head", multiple=True, metavar="GLOB",
              help="Count tensors matching GLOB as the head (beside the usual names).")
@click.option("--strip-prefix", default=None, metavar="PREFIX",
              help="Strip PREFIX (e.g. 'module.') from tensor names in every input.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow .pt/.bin files whose pickle runs code. Only for files you trust.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def inspect_cmd(anchor, models, json_path, csv_path, plot_path, html_path, full, head,
                strip_prefix, trust_pickle, quiet):
    """Show how fine-tuned MODELs sit around their ANCHOR, layer by layer: task-vector norms,
    pairwise angles and the ratio t a merge would use, by layer kind, with warnings for what
    looks wrong. Reads like `merge` (its Gram pass) and writes only the reports asked for.
    ANCHOR and MODELs are paths or Hub ids (org/name[@revision]), as for `merge`. LoRA
    adapter directories are measured from their factors, per adapted module (ANCHOR, the base
    model, is optional then: `modelstock inspect ./lora-seed0 ./lora-seed1`).
    """
    from .geometry import inspect_checkpoints
    from .render import text, write_outputs

    def job():
        from .lora.into_base import adapters_and_base

        lora = adapters_and_base(anchor, models)
        if lora is not None:  # the same tables, findings and files, from the factors
            if strip_prefix:
                raise ModelStockError("--strip-prefix does not apply to LoRA adapters (their "
                                      "module names are PEFT's)")
            if plot_path or html_path:
                from .plots import require
                require()
            from .lora import inspect_lora_adapters

            insp = inspect_lora_adapters(lora[1], base=lora[0], head=head,
                                         trust_pickle=trust_pickle)
            click.echo(text(insp, full))
            summary = dataclasses.replace(insp.merge_report(), warnings=[]).summary()
            click.echo(f"\n{summary}")  # t and angles over all modules (warnings: above)
            write_outputs(insp, json_path=json_path, csv_path=csv_path, plot_path=plot_path,
                          html_path=html_path)
            return
        if plot_path or html_path:
            from .plots import require
            require()
        insp = inspect_checkpoints(anchor, models, head=head, trust_pickle=trust_pickle,
                                   strip_prefix=strip_prefix, progress=not quiet)
        click.echo(text(insp, full))
        write_outputs(insp, json_path=json_path, csv_path=csv_path, plot_path=plot_path,
                      html_path=html_path)

    run_guarded(job)


def entry_point(args: list[str] | None = None, prog_name: str = "modelstock") -> None:
    """The ``modelstock`` command (console script, ``python -m modelstock``): click's `main`,
    with a Ctrl-C that lands in click's own set-up, before `run_guarded`, reported in one line
    like any other instead of as a traceback."""
    try:
        main(args, prog_name=prog_name)
    except KeyboardInterrupt:
        click.echo("modelstock: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    entry_point()
