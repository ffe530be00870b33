"""Hugging Face Hub ids (``org/name``, ``org/name@revision``) wherever a path is accepted.

`resolve` turns an id into a local snapshot directory of the standard Hugging Face cache,
through ``huggingface_hub`` (the optional extra ``modelstock[hub]``), which honours
``HF_HUB_CACHE``/``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and ``HF_ENDPOINT`` as it does
everywhere. Only the files a merge uses are fetched: the weights `checkpoint.find_weights` would
open (safetensors and their index; ``.bin`` only where there are no safetensors) and the files
`output.copy_anchor_files` copies (config, generation, tokenizer and chat-template files).
With ``HF_HUB_OFFLINE`` set nothing is asked of the network: the id is looked up in the cache
(``refs/<revision>`` -> ``snapshots/<commit>``) or it is an error.

A local path always wins: a string is an id only when nothing exists at that path and it is
shaped like one (``namespace/name``, optionally ``@revision``). ``os.PathLike`` values are
always paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath

from .checkpoint import PICKLE_INDEX, PICKLE_SUFFIXES, SAFETENSORS_INDEX
from .errors import ModelStockError
from .output import AUX_SUFFIXES, NOT_COPIED

INSTALL_HINT = ("no such file or directory, and huggingface_hub is not installed to fetch it as "
                "a Hub id: pip install 'modelstock[hub]'")
DEFAULT_REVISION = "main"
# huggingface_hub's repo id rules: word characters, '-' and '.', not at either end of a part,
# no '--' or '..', at most 96 characters per part. Only namespaced ids ("org/name"): a bare
# "name" is far more often a local file that is missing than a legacy Hub model.
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"({_PART})/({_PART})")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "ON", "YES", "TRUE"}
# Hub ids resolved online in this process: a greedy soup opens its inputs many times, and
# each resolution online costs requests to the Hub.
_resolved: dict[tuple[str, str, str], Path] = {}


def parse_id(text: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; ``None`` if ``text`` is not shaped like
    a Hub model id. The revision (a branch, tag, ``refs/pr/N`` or commit) may contain '/'."""
    repo_id, at, revision = text.partition("@")
    m = _REPO_ID.fullmatch(repo_id)
    if m is None or "--" in repo_id or ".." in repo_id:
        return None
    if at:
        parts = PurePosixPath(revision).parts
        if (not revision or revision.startswith("/") or "\0" in revision or ".." in parts
                or revision != revision.strip()):
            return None
        return repo_id, revision
    return repo_id, None


def is_hub_id(source: object) -> bool:
    """True for a string that names nothing on disk and is shaped like ``org/name[@rev]``."""
    return (isinstance(source, str) and not os.path.lexists(source)
            and parse_id(source) is not None)


def weight_files(files: Iterable[str], source: str = "") -> list[str]:
    """The weights file (or index) `checkpoint.find_weights` would open among a repository's
    file names (top level only; subfolders such as ``original/`` are other formats): the
    safetensors index, ``model.safetensors``, the ``.bin`` index, ``pytorch_model.bin``, else
    the only ``*.safetensors``, else the only ``.bin/.pt/.pth/.ckpt``. Empty if none."""
    top = sorted({f for f in files if "/" not in f})
    for name in (SAFETENSORS_INDEX, "model.safetensors", PICKLE_INDEX, "pytorch_model.bin"):
        if name in top:
            return [name]
    for suffixes in ((".safetensors",), PICKLE_SUFFIXES):
        found = [f for f in top if PurePosixPath(f).suffix in suffixes]
        if len(found) == 1:
            return found
        if len(found) > 1:
            raise ModelStockError(f"several weight files ({', '.join(found[:4])}"
                                  f"{', ...' if len(found) > 4 else ''}) and no index; "
                                  "cannot tell which to merge", source or None)
    return []


def aux_files(files: Iterable[str]) -> list[str]:
    """The files `output.copy_anchor_files` copies into a merged model: config, generation,
    tokenizer and chat-template files (top level, no weight index, no README)."""
    return sorted(f for f in set(files) if "/" not in f and PurePosixPath(f).suffix in AUX_SUFFIXES
                  and f not in NOT_COPIED and not f.endswith(".index.json"))


def needed_files(files: Iterable[str], source: str = "") -> list[str]:
    """What a merge fetches from a repository holding ``files``: `weight_files` (an index
    stands for itself here; its shards are read from it once fetched, see `shard_files`) and
    `aux_files`."""
    files = list(files)
    return [*weight_files(files, source), *aux_files(files)]


def shard_files(index: Path, files: Iterable[str]) -> list[str]:
    """The shard files an index's ``weight_map`` names, among the repository's ``files``.
    A malformed index gives none: the reader reports it, naming the file."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = {v for v in weight_map.values() if isinstance(v, str)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return sorted(names & set(files))


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as huggingface_hub reads it, at import
    or now: set either way, nothing is asked of the network."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.upper() in _TRUE


def cache_dir() -> Path:
    """The Hugging Face Hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot directory of ``repo_id`` at ``revision`` (a commit, or a branch or
    tag recorded under ``refs/``), as huggingface_hub lays it out; ``None`` if absent."""
    storage = cache_dir() / f"models--{repo_id.replace('/', '--')}"
    revision = revision or DEFAULT_REVISION
    commit = revision
    if not _COMMIT.fullmatch(revision):
        try:
            commit = (storage / "refs" / revision).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeError):
            return None
        if not _COMMIT.fullmatch(commit):
            return None
    snapshot = storage / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _listing(directory: Path) -> list[str]:
    """Top-level file names of a snapshot directory (symlinks into ``blobs/`` followed; a
    dangling one, an interrupted download, is not a file)."""
    try:
        return sorted(p.name for p in directory.iterdir() if p.is_file())
    except OSError:
        return []


def _from_cache(source: str, snapshot: Path, why: str) -> Path:
    """``snapshot`` if it holds the weights a merge needs; else a one-line error (``why``:
    why the cache is all there is)."""
    files = _listing(snapshot)
    weights = weight_files(files, source)
    if not weights:
        raise ModelStockError(f"no weights in the local Hugging Face cache ({snapshot}) and "
                              f"{why}", source)
    if weights[0].endswith(".index.json"):
        try:
            weight_map = json.loads((snapshot / weights[0]).read_text(encoding="utf-8"))
            shards = {v for v in weight_map["weight_map"].values() if isinstance(v, str)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return snapshot  # the reader names what is wrong with the index
        missing = sorted(s for s in shards if not (snapshot / s).is_file())
        if missing:
            raise ModelStockError(f"only partly in the local Hugging Face cache (missing "
                                  f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
                                  f") and {why}", source)
    return snapshot


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _pattern(name: str) -> str:
    """An fnmatch pattern that matches ``name`` only (snapshot_download takes patterns)."""
    return re.sub(r"([*?[])", r"[\1]", name)


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """huggingface_hub's download bars on (its own default and settings) or off."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    if show or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _hub_error(source: str, revision: str | None, e: Exception) -> ModelStockError | None:
    """A one-line error for what the Hub answered, or ``None`` where the Hub could not be
    asked (no connection, server error): then the cache may still have it."""
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return ModelStockError("a gated model: accept its conditions on the Hub and set HF_TOKEN "
                               "(or run `hf auth login`)", source)
    if isinstance(e, RevisionNotFoundError):
        return ModelStockError(f"no revision {revision!r} on the Hugging Face Hub", source)
    if isinstance(e, RepositoryNotFoundError):
        return ModelStockError("no such file or directory, nor a model on the Hugging Face Hub "
                               "(a private one needs HF_TOKEN)", source)
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status in (401, 403):
        return ModelStockError(f"the Hugging Face Hub refused access ({status}); set HF_TOKEN",
                               source)
    return None


def _download(repo_id: str, revision: str | None, names: Sequence[str], source: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(),
                                      allow_patterns=[_pattern(n) for n in names]))
    except Exception as e:
        err = _hub_error(source, revision, e)
        raise (err or ModelStockError(f"could not fetch from the Hugging Face Hub "
                                      f"({_first_line(e)})", source)) from None


def resolve(source: str | os.PathLike, *, progress: bool = True) -> Path:
    """The local directory (or file) that ``source`` names.

    A path that exists, an ``os.PathLike``, or a string not shaped like a Hub id comes back as
    it is (opening it reports what is wrong). An id (``org/name`` or ``org/name@revision``) is
    looked up in the Hugging Face cache and, unless ``HF_HUB_OFFLINE`` is set, fetched from the
    Hub first: the repository's files are listed (``HfApi.model_info``) and only those a merge
    needs are downloaded
    (`needed_files`, then the shards an index names), with huggingface_hub's progress bars
    when ``progress``. Without the Hub (unreachable) a cached snapshot is used if there is one.
    Every failure is a one-line `ModelStockError` naming the id as written.
    """
    if not is_hub_id(source):
        return Path(source)
    assert isinstance(source, str)
    repo_id, revision = parse_id(source)  # type: ignore[misc]
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ModelStockError(INSTALL_HINT, source) from None
    if offline():
        snapshot = cached_snapshot(repo_id, revision)
        if snapshot is None:
            raise ModelStockError("not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                                  "set", source)
        return _from_cache(source, snapshot, "HF_HUB_OFFLINE is set")
    key = (repo_id, revision or DEFAULT_REVISION, str(cache_dir()))
    done = _resolved.get(key)
    if done is not None and done.is_dir():
        return done
    try:
        # model_info, not list_repo_files: one request, and not retried for minutes when the
        # network is down (the cache is then looked at instead)
        info = HfApi().model_info(repo_id, revision=revision)
        files = [s.rfilename for s in info.siblings or ()]
    except Exception as e:
        err = _hub_error(source, revision, e)
        if err is not None:
            raise err from None
        snapshot = cached_snapshot(repo_id, revision)
        if snapshot is None:
            raise ModelStockError(f"cannot reach the Hugging Face Hub ({_first_line(e)}) and "
                                  "not in the local cache", source) from None
        return _from_cache(source, snapshot, "the Hugging Face Hub cannot be reached")
    weights = weight_files(files, source)
    if not weights:
        raise ModelStockError("no weights in this Hugging Face Hub repository (no *.safetensors,"
                              " *.bin, *.pt or index at its top level)", source)
    with _progress_bars(progress):
        snapshot = _download(repo_id, revision, [*weights, *aux_files(files)], source)
        if weights[0].endswith(".index.json"):
            shards = shard_files(snapshot / weights[0], files)
            if shards:
                snapshot = _download(repo_id, revision, shards, source)
    _resolved[key] = snapshot
    return snapshot


__all__ = ["aux_files", "cached_snapshot", "is_hub_id", "needed_files", "parse_id", "resolve",
           "shard_files", "weight_files"]
