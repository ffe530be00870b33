"""Writing a merged model: sharded safetensors streamed to a temporary sibling, renamed into place.

Nothing half-written is ever left where a complete model is expected: the output is assembled in
``.NAME.modelstock-tmp-PID-XXXX`` next to it, and only a complete one is renamed over ``NAME``
(atomically exchanged with an old one under ``force``, where the kernel allows).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import queue
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from .plan import LayerPlan
from .errors import ModelStockError, Terminated
from .safetensors_io import DTYPE_NAMES, SafetensorsWriter

INDEX_NAME = "model.safetensors.index.json"
REPORT_NAME = "modelstock_report.json"
# Files copied from an anchor directory: configs, tokenizers, chat templates, custom code.
AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py", ".vocab")
NOT_COPIED = {INDEX_NAME, "pytorch_model.bin.index.json", REPORT_NAME, "README.md"}
TMP_TAG = ".modelstock-tmp-"


def plan_shards(layers: Sequence[LayerPlan], max_bytes: int) -> list[list[LayerPlan]]:
    """Group tensors, in order, into shards of at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[LayerPlan]] = [[]]
    size = 0
    for p in layers:
        nbytes = p.numel * p.out_dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += nbytes
    return shards


WRITER_DEPTH = 2  # chunks queued for the background writer


class BackgroundWriter:
    """Run file writes, in order, on one background thread, so that computing the next chunk
    overlaps writing the last; at most ``depth`` chunks wait (plus the one being written: the
    engine's output ring must be longer). Errors surface on the next call."""

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="modelstock-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    job[0](*job[1])
                except BaseException as e:  # re-raised in the caller's thread
                    self._error = e

    def submit(self, fn: Callable, *args) -> None:
        self._raise()
        self._queue.put((fn, args))

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for every queued write; raise the first error any of them hit."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()


class SafetensorsSink:
    """Stream merged tensors into one or more safetensors files (one open file at a time)."""

    def __init__(self, target: Path, layers: Sequence[LayerPlan], max_shard_bytes: int | None,
                 metadata: dict[str, str], single_file: bool = False,
                 direct: bool = True) -> None:
        """``target`` is a directory (sharded HF layout), or the file to write if
        ``single_file``. ``direct`` writes around the page cache where possible."""
        self.direct = direct
        self.single_file = single_file
        groups = [list(layers)] if (self.single_file or not max_shard_bytes) else \
            plan_shards(layers, max_shard_bytes)
        if self.single_file:
            names = [target.name]
            self.directory = target.parent
        elif len(groups) == 1:
            names, self.directory = ["model.safetensors"], target
        else:
            names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                     for i in range(len(groups))]
            self.directory = target
        for p in layers:  # before anything is written
            if p.out_dtype not in DTYPE_NAMES:
                raise ModelStockError(f"{p.out_dtype} cannot be stored in safetensors",
                                      target, p.name)
        self.files = [self.directory / n for n in names]
        self._groups, self._metadata = groups, metadata
        self._shard_of = {p.name: i for i, g in enumerate(groups) for p in g}
        self._current: tuple[int, SafetensorsWriter] | None = None
        self.total_bytes = sum(p.numel * p.out_dtype.itemsize for p in layers)
        self._writer = BackgroundWriter(WRITER_DEPTH)

    # Chunks handed to `write` that may still be unwritten: those queued, plus the one being
    # written. The engine reuses a chunk's buffer only once more chunks than this followed it.
    holds = WRITER_DEPTH + 1

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Queue a chunk for writing (the caller must not modify it afterwards)."""
        self._writer.submit(self._write_now, name, chunk)

    def _write_now(self, name: str, chunk: torch.Tensor) -> None:
        i = self._shard_of[name]
        if self._current is None or self._current[0] != i:
            if self._current is not None:
                self._current[1].close()
            entries = [(p.name, p.out_dtype, p.shape) for p in self._groups[i]]
            self._current = (i, SafetensorsWriter(self.files[i], entries, self._metadata,
                                                  direct=self.direct))
        self._current[1].write(name, chunk)

    def close(self) -> None:
        self._writer.close()
        if self._current is not None:
            self._current[1].close()
        for i, f in enumerate(self.files):  # shards holding only empty tensors
            if not f.exists():
                entries = [(p.name, p.out_dtype, p.shape) for p in self._groups[i]]
                SafetensorsWriter(f, entries, self._metadata).close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {p.name: self.files[self._shard_of[p.name]].name
                                    for g in self._groups for p in g}}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        with contextlib.suppress(BaseException):
            self._writer.close()
        if self._current is not None:
            self._current[1].abort()


def check_output_path(out: Path, inputs: Sequence[object], force: bool) -> None:
    """Refuse to clobber an existing output without ``force``, or ever to replace an input."""
    resolved = out.resolve()
    for src in inputs:
        if isinstance(src, str | os.PathLike):
            p = Path(src).resolve()
            if p == resolved or resolved in p.parents:
                raise ModelStockError("the output would replace an input; choose another -o",
                                      out)
    _remove_stale_temps(out)  # also puts back an old output that a kill left set aside
    if out.exists() or out.is_symlink():
        if not force:
            raise ModelStockError("already exists; pass --force to replace it", out)
        if out.is_dir() != (out.suffix != ".safetensors"):
            raise ModelStockError("exists and is not the same kind (file/directory) as the "
                                  "output; remove it first", out)


def _remove_stale_temps(out: Path) -> None:
    """Delete temporaries of earlier runs on ``out`` whose process is gone (e.g. SIGKILLed).

    The one exception: an old output set aside by `_put_in_place` (``...-old``) is renamed back
    to ``out`` if a kill left ``out`` missing, so a kill never loses a complete model.
    """
    prefix = f".{out.name}{TMP_TAG}"
    with contextlib.suppress(OSError):
        for p in sorted(out.parent.iterdir()):
            if not p.name.startswith(prefix):
                continue
            pid = p.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                if p.name.endswith("-old") and not (out.exists() or out.is_symlink()):
                    os.rename(p, out)
                else:
                    _remove(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """rename with renameat2 ``flags`` (atomic no-replace or exchange); False where the kernel,
    the C library or the file system lacks it; OSError for any other failure."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    return _renameat2(a, b, RENAME_EXCHANGE)


def _put_in_place(tmp: Path, out: Path, force: bool) -> None:
    """Move the complete ``tmp`` to ``out``. ``out`` is at every instant either absent, the old
    output or the new one; with ``force`` it is never absent where the kernel can exchange.
    Called with signals held (`atomic_output`), so that only a SIGKILL can cut it short."""
    if not (out.exists() or out.is_symlink()):
        try:
            if _renameat2(tmp, out, RENAME_NOREPLACE):
                return
        except FileExistsError:
            pass  # appeared meanwhile: handled below
        else:
            os.rename(tmp, out)
            return
    if not force:
        raise ModelStockError("appeared while merging (another run?); pass --force to replace "
                              "it", out)
    if tmp.is_file():
        os.replace(tmp, out)  # atomic for a file
    elif _exchange(tmp, out):
        _remove(tmp)  # now holds the old output
    else:
        # No atomic exchange: set the old output aside, put the new one in place. Between
        # the two renames ``out`` is absent; a SIGKILL there leaves the old one as ``...-old``,
        # which the next run puts back (`_remove_stale_temps`).
        old = out.parent / f".{out.name}{TMP_TAG}{os.getpid()}-old"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        _remove(old)


def _missing_dirs(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, deepest first."""
    missing = []
    for p in path.absolute().parents:
        if p.exists():
            break
        missing.append(p)
    return missing


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends, then deliver them (once each).

    Python-level handlers, not a signal mask: a mask is per thread, and the kernel hands a
    process-directed signal to any thread that does not block it (torch starts threads).
    An ignored signal (SIG_IGN: a background job's SIGINT) stays ignored: catching it here
    would only race with putting SIG_IGN back ("Signal 2 ignored due to race condition").
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    caught: list[int] = []
    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) not in (None, signal.SIG_IGN):
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


@contextlib.contextmanager
def atomic_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to build in; put it in place only if the block
    completes. On any exception (or signal turned into one) the temporary, and any parent
    directory made for it, is removed; an OSError (a full disk) becomes a ModelStockError."""
    is_dir = out.suffix != ".safetensors"
    tmp = out.parent / (f".{out.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
                        + ("" if is_dir else ".safetensors"))
    made = _missing_dirs(out)
    placed = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out)
        if is_dir:
            tmp.mkdir()
        yield tmp
        with _signals_deferred():  # moving into place is not cut short; a signal waits for it
            _put_in_place(tmp, out, force)
            placed = True
    except BaseException as e:
        if placed:  # a signal that arrived while the complete output was being put in place
            e.output_written = out  # what the CLI tells the user
            raise
        while True:
            try:
                with _signals_deferred():  # a second Ctrl-C must not cut the cleanup short...
                    _remove(tmp)
                    for d in made:
                        with contextlib.suppress(OSError):
                            d.rmdir()
                break
            except (KeyboardInterrupt, Terminated):  # ...nor one just before it took hold
                continue  # (or held by it: the run is being stopped already)
        if isinstance(e, OSError):
            where = "" if str(e.filename or "").startswith(str(tmp)) or not e.filename \
                else f": {e.filename}"
            raise ModelStockError(f"cannot write the output ({e.strerror or e}{where}); "
                                  "nothing was written", out) from None
        if isinstance(e, ModelStockError) and str(tmp) in str(e):  # name what the user named
            raise ModelStockError(str(e).replace(str(tmp), str(out))) from None
        raise


def copy_anchor_files(anchor_dir: Path, out_dir: Path, dtype: torch.dtype | None) -> list[str]:
    """Copy config, tokenizer and generation files; update the config's dtype under --dtype."""
    copied = []
    for f in sorted(anchor_dir.iterdir()):
        if f.is_file() and f.suffix in AUX_SUFFIXES and f.name not in NOT_COPIED \
                and not f.name.endswith(".index.json"):
            shutil.copy2(f, out_dir / f.name)
            copied.append(f.name)
    config = out_dir / "config.json"
    if dtype is not None and config.is_file():
        try:
            data = json.loads(config.read_text())
        except ValueError:
            raise ModelStockError("malformed config.json", anchor_dir / "config.json") from None
        name = str(dtype).removeprefix("torch.")
        keys = [k for k in ("torch_dtype", "dtype") if k in data] or ["torch_dtype"]
        for k in keys:
            data[k] = name
        config.write_text(json.dumps(data, indent=2) + "\n")
    return copied


METHOD_TEXT = {
    "model-stock": "**Model Stock** (Jang, Yun, Han, *Model Stock: All we need is just a few "
                   "fine-tuned models*, ECCV 2024, arXiv:2403.19522): every layer moves from the "
                   "pretrained weights towards the fine-tunes' average by a ratio derived from "
                   "the angle between their task vectors",
    "uniform": "a **uniform soup** (Wortsman et al., *Model soups*, ICML 2022): the plain mean "
               "of the fine-tunes",
    "wise-ft": "**WiSE-FT** (Wortsman et al., *Robust fine-tuning of zero-shot models*, CVPR "
               "2022): an interpolation between the pretrained weights and the fine-tunes' mean",
    "linear": "a **weighted average** of the models (mergekit's `linear`)",
    "greedy": "a **greedy soup** (Wortsman et al., *Model soups*, ICML 2022): the mean of the "
              "fine-tunes kept by greedy selection on a held-out score",
}


def model_card(anchor: str, models: Sequence[str], recipe: dict, summary: str) -> str:
    """A Hugging Face model card (README.md) recording where the weights came from and how."""
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in recipe.items()
                       if k not in ("anchor", "models") and v not in (None, []))
    fine_tunes = "\n".join(f"- `{m}`" for m in models)
    method = recipe.get("method", "model-stock")
    return f"""---
base_model: {json.dumps(anchor)}
tags:
- merge
- {method}
- modelstock
---

# Merged with modelstock

This model combines {len(models)} fine-tunes of `{anchor}` with
{METHOD_TEXT.get(method, f"`{method}`")}, tensor by tensor.

Fine-tuned models:

{fine_tunes}

| parameter | value |
|---|---|
{params}

Per-layer angles and ratios are in `{REPORT_NAME}`.

```
{summary}
```
"""
