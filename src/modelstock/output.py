"""Writing a merged model: sharded safetensors streamed to a temporary sibling, renamed into place.

Nothing half-written is ever left where a complete model is expected: the output is assembled in
``.NAME.modelstock-tmp-PID-XXXX/NAME`` next to it, and only a complete one is renamed over
``NAME`` (atomically exchanged with an old one under ``force``, where the kernel allows).

Durable before visible: every file of the output is fsynced once (a shard when it is closed,
the rest just before the rename), then the directory holding them, and only then is it renamed
into place; the directory the rename happened in is fsynced next, before an old output is
removed. After a power loss ``NAME`` is the old output (or absent) or the complete new one.

The temporary is locked (an exclusive ``flock`` on its directory, held while it exists): a later
run removes only temporaries whose lock it can take, i.e. whose writer is gone, whatever PID
their name records (PIDs are reused).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import queue
import secrets
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from .errors import ModelStockError, Terminated
from .plan import LayerPlan
from .safetensors_io import DTYPE_NAMES, SafetensorsWriter

INDEX_NAME = "model.safetensors.index.json"
REPORT_NAME = "modelstock_report.json"
# Files copied from an anchor directory: configs, tokenizers, chat templates, custom code.
AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py", ".vocab")
NOT_COPIED = {INDEX_NAME, "pytorch_model.bin.index.json", REPORT_NAME, "README.md"}
TMP_TAG = ".modelstock-tmp-"
OLD_TAG = "-old"  # the old output set aside under force without an atomic exchange


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
        self._stopped = False  # set by `stop`: run nothing more
        self._in_job = False  # a job is under way (or about to be, unless stopped)
        self._thread = threading.Thread(target=self._loop, name="modelstock-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:  # once stopped, end when idle (`stop` may not have got a None in)
                job = self._queue.get(timeout=0.5 if self._stopped else None)
            except queue.Empty:
                return
            if job is None:
                return
            self._in_job = True  # before reading _stopped, which `stop` sets before reading this
            try:
                if self._error is None and not self._stopped:
                    try:
                        job[0](*job[1])
                    except BaseException as e:  # re-raised in the caller's thread
                        self._error = e
            finally:
                self._in_job = False

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

    def stop(self) -> None:
        """Drop what is queued and wait for the write under way (a shard's fsync can take a
        while), even through a second Ctrl-C or SIGTERM, which the run is already stopping
        for: nothing may create a file in a temporary being removed.

        Without ``Thread.join``: a signal that interrupts it can leave the thread marked as
        ended while it still runs (threading's bpo-45274 handling, seen with CPython 3.11);
        and without locks, which a signal can leave half released: a flag and sleeps."""
        self._stopped = True
        with contextlib.suppress(queue.Full, KeyboardInterrupt, Terminated):
            self._queue.put_nowait(None)  # wakes an idle thread, which then ends
        while self._in_job:
            try:
                time.sleep(0.001)
            except (KeyboardInterrupt, Terminated):
                pass


class SafetensorsSink:
    """Stream merged tensors into one or more safetensors files (one open file at a time)."""

    def __init__(self, target: Path, layers: Sequence[LayerPlan], max_shard_bytes: int | None,
                 metadata: dict[str, str], single_file: bool = False,
                 direct: bool = True, sync: bool = True) -> None:
        """``target`` is a directory (sharded HF layout), or the file to write if
        ``single_file``. ``direct`` writes around the page cache where possible. ``sync``
        fsyncs each file once it is complete (a shard as soon as the next one starts: on the
        writer thread, overlapping the merge), so that `atomic_output` need not again."""
        self.direct = direct
        self.sync = sync
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
                self._finish(self._current[1])
            entries = [(p.name, p.out_dtype, p.shape) for p in self._groups[i]]
            self._current = (i, SafetensorsWriter(self.files[i], entries, self._metadata,
                                                  direct=self.direct))
        self._current[1].write(name, chunk)

    def _finish(self, writer: SafetensorsWriter) -> None:
        """Close a complete shard and flush it to stable storage (once)."""
        writer.close()
        if self.sync:
            _fsync(writer.path)

    def close(self) -> None:
        self._writer.close()
        if self._current is not None:
            self._finish(self._current[1])
        for i, f in enumerate(self.files):  # shards holding only empty tensors
            if not f.exists():
                entries = [(p.name, p.out_dtype, p.shape) for p in self._groups[i]]
                self._finish(SafetensorsWriter(f, entries, self._metadata))
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {p.name: self.files[self._shard_of[p.name]].name
                                    for g in self._groups for p in g}}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            if self.sync:
                _fsync(self.directory / INDEX_NAME)

    def abort(self) -> None:
        with contextlib.suppress(BaseException):
            self._writer.stop()
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
    """Delete temporaries of earlier runs on ``out`` whose writer is gone (e.g. SIGKILLed).

    Gone means that the exclusive lock its writer held on it (see `_Temporary`) can be taken:
    the PID in the name is only a fallback, where the file system has no ``flock``. The one
    exception: an old output set aside by `_put_in_place` (``NAME-old`` inside a temporary, or
    a sibling ``...-old`` left by an earlier version) is renamed back to ``out`` if a kill left
    ``out`` missing, so a kill never loses a complete model.
    """
    prefix = f".{out.name}{TMP_TAG}"
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:
        return
    for p in entries:
        if p.name.startswith(prefix):
            with contextlib.suppress(OSError):
                _remove_if_stale(p, out, p.name[len(prefix):].split("-", 1)[0])


def _remove_if_stale(p: Path, out: Path, pid: str) -> None:
    flags = os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        return  # removed meanwhile (by its writer, or another run's cleanup)
    except OSError:
        fd = -1  # a symlink, or not readable: not one of ours to lock
    try:
        held = _lock(fd) if fd >= 0 else None
        if held is False:
            return  # its writer (or a process it forked) is alive
        if held is None:  # no flock on this file system: only the PID can tell
            if not pid.isdigit() or _alive(int(pid)):
                return
        elif not _same_file(os.lstat(p), os.fstat(fd)):
            return  # replaced since we opened it
        if not _restore_aside(p, out):
            # a writer killed right after its rename: that is durable before what it replaced
            # (here, after an exchange) goes
            _fsync(out.absolute().parent, directory=True)
        _remove(p)
    finally:
        if fd >= 0:
            os.close(fd)


def _restore_aside(temp: Path, out: Path) -> bool:
    """Put back an old output a kill left set aside in (or as) ``temp``, if ``out`` is missing;
    durable before what is left of ``temp`` is removed. True if it did."""
    aside = temp if temp.name.endswith(OLD_TAG) else temp / f"{out.name}{OLD_TAG}"
    if (aside.exists() or aside.is_symlink()) and not (out.exists() or out.is_symlink()):
        os.rename(aside, out)
        _fsync(out.absolute().parent, directory=True)
        return True
    return False


def _lock(fd: int) -> bool | None:
    """Take an exclusive ``flock`` on ``fd`` without waiting: True; False if another open file
    holds one; None where the file system cannot (ENOLCK; NFS, whose emulation refuses an
    exclusive lock on a descriptor not open for writing)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


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


# -- durability ------------------------------------------------------------------------------

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CANNOT_SYNC = {errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}
# Files already fsynced, and as what (device, inode, size, mtime): `atomic_output` syncs the
# rest of its temporary before the rename, and these only if they changed since.
_synced: dict[str, tuple[int, int, int, int]] = {}
_synced_lock = threading.Lock()


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush ``path`` (a file's data and metadata; a directory's entries) to stable storage.

    Through a descriptor of its own: fsync flushes the file, whichever descriptor wrote it
    (on Linux; the writers here close theirs when done). A file system that cannot sync
    (EINVAL: some FUSE and network ones) is let be; any other error (EIO, ENOSPC) is raised.
    """
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | (_O_DIRECTORY if directory else 0))
    try:
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno not in _CANNOT_SYNC:
                raise
        if not directory:
            st = os.fstat(fd)
            with _synced_lock:
                _synced[os.path.abspath(path)] = _identity(st)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every file under ``root`` not fsynced already as it now is, then each directory
    after its contents (``root`` last): its entries, the files' names. ``root`` may be a file."""
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        _sync_file(root, st)
        return
    with os.scandir(root) as it:
        entries = list(it)
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            _sync_tree(Path(e.path))
        elif e.is_file(follow_symlinks=False):
            _sync_file(e.path, e.stat(follow_symlinks=False))
    _fsync(root, directory=True)


def _sync_file(path: str | os.PathLike, st: os.stat_result) -> None:
    with _synced_lock:
        done = _synced.get(os.path.abspath(path)) == _identity(st)
    if not done:
        _fsync(path)


def _forget(root: Path) -> None:
    """Drop what `_synced` knows about files under ``root`` (removed, or renamed away)."""
    top = os.path.abspath(root)
    with _synced_lock:
        for k in [k for k in _synced if k == top or k.startswith(top + os.sep)]:
            del _synced[k]


def _sync_parents(out: Path, made: Sequence[Path]) -> None:
    """fsync the directory ``out`` was renamed into, and each directory made for it (their
    names are entries of their parents)."""
    for d in dict.fromkeys([out.absolute().parent, *(m.parent for m in made)]):
        _fsync(d, directory=True)


class _Temporary:
    """``.NAME.modelstock-tmp-PID-XXXX``: the directory an output is built in (at ``NAME``
    inside it; an old output replaced under ``force`` ends up in it too), with an exclusive
    ``flock`` held on it, through `fd`, for as long as it exists. The kernel drops the lock
    when the process dies, however it dies: another run's `_remove_stale_temps` removes a
    temporary only once it can take its lock."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.root: Path | None = None  # set before mkdir: a signal right after it still cleans
        self.fd = -1

    def create(self) -> Path:
        for _ in range(100):
            root = self.out.parent / f".{self.out.name}{TMP_TAG}{os.getpid()}-" \
                                     f"{secrets.token_hex(4)}"
            self.root = root
            try:
                root.mkdir()
            except FileExistsError:  # not ours
                self.root = None
                continue
            try:
                self.fd = os.open(root, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC | _O_NOFOLLOW)
                # Another run's cleanup may have taken it between mkdir and flock (it was not
                # locked yet): then the lock is theirs, or the directory is gone.
                if _lock(self.fd) is not False and _same_file(os.lstat(root),
                                                               os.fstat(self.fd)):
                    return root
            except FileNotFoundError:
                pass
            self.release()
            self.root = None  # theirs to remove now
        raise ModelStockError("cannot make a temporary directory next to the output", self.out)

    def release(self) -> None:
        """Let go of the lock (once the temporary is gone, or left for the next run)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


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
    """Move the complete ``tmp`` (inside its `_Temporary`) to ``out``. ``out`` is at every
    instant either absent, the old output or the new one; with ``force`` it is never absent
    where the kernel can exchange. An old output ends up inside the temporary (at ``tmp``
    after an exchange, or set aside as ``NAME-old``), for the caller to remove once the rename
    is durable. Called with signals held (`atomic_output`), so that only a SIGKILL can cut it
    short."""
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
    elif not _exchange(tmp, out):
        # No atomic exchange: set the old output aside, put the new one in place. Between
        # the two renames ``out`` is absent; a SIGKILL there leaves the old one as ``NAME-old``
        # in the temporary, which the next run puts back (`_remove_stale_temps`).
        old = tmp.parent / f"{out.name}{OLD_TAG}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise


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
    """Yield a temporary path for ``out`` to build in; put it in place only if the block
    completes. On any exception (or signal turned into one) the temporary, and any parent
    directory made for it, is removed; an OSError (a full disk) becomes a ModelStockError.

    Before the rename every file in the temporary and its directory are fsynced (once: files
    `SafetensorsSink` synced already are not again); after it, the directory it happened in
    (and those made for it), and only then is an old output removed. The temporary is locked
    as long as it exists (`_Temporary`)."""
    is_dir = out.suffix != ".safetensors"
    temp = _Temporary(out)
    tmp: Path | None = None
    made = _missing_dirs(out)
    placed = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out)
        tmp = temp.create() / out.name
        if is_dir:
            tmp.mkdir()
        yield tmp
        _sync_tree(tmp)  # durable before it is visible
        with _signals_deferred():  # moving into place is not cut short; a signal waits for it
            _put_in_place(tmp, out, force)
            placed = True
            _sync_parents(out, made)  # the rename is durable before the old output goes
            _remove(temp.root)  # empty, or holding the old output
            temp.release()
    except BaseException as e:
        if placed:  # a signal that arrived while the complete output was being put in place
            if isinstance(e, OSError):  # fsync failed: the rename may not survive a power loss
                err = ModelStockError(f"is in place, but the file system could not make it "
                                      f"durable ({e.strerror or e})", out)
                err.output_written = out
                raise err from None
            e.output_written = out  # what the CLI tells the user
            raise
        while True:
            try:
                with _signals_deferred():  # a second Ctrl-C must not cut the cleanup short...
                    if temp.root is not None:
                        try:  # (a failed second rename of _put_in_place left it there)
                            _restore_aside(temp.root, out)
                        except OSError:  # the old output is in it: left for the next run
                            pass
                        else:
                            _remove(temp.root)
                    temp.release()
                    for d in made:
                        with contextlib.suppress(OSError):
                            d.rmdir()
                break
            except (KeyboardInterrupt, Terminated):  # ...nor one just before it took hold
                continue  # (or held by it: the run is being stopped already)
        if isinstance(e, OSError):
            inside = str(temp.root) if temp.root is not None else str(out)
            where = "" if str(e.filename or "").startswith(inside) or not e.filename \
                else f": {e.filename}"
            raise ModelStockError(f"cannot write the output ({e.strerror or e}{where}); "
                                  "nothing was written", out) from None
        if isinstance(e, ModelStockError) and tmp is not None and str(tmp) in str(e):
            raise ModelStockError(str(e).replace(str(tmp), str(out))) from None  # the user's name
        raise
    finally:
        temp.release()  # left for the next run, where the cleanup above could not finish
        if temp.root is not None:
            _forget(temp.root)


def copy_anchor_files(anchor_dir: Path, out_dir: Path, dtype: torch.dtype | None) -> list[str]:
    """Copy config, tokenizer and generation files; update the config's dtype under --dtype.

    Not fsynced here: in the temporary of `atomic_output`, which fsyncs each file in it once,
    in its final state, before the output becomes visible."""
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
