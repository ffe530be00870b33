"""Durability across a power loss, and stale temporaries recognised by a lock, not by a PID.

A merged output becomes visible (is renamed into place) only once every file in it and the
directory holding them have been fsynced; the directory the rename happened in is fsynced next,
before an old output (``--force``) is removed. Recorded here as a log of fsync, rename and
unlink events, in the order they happened.

A temporary is stale when no process holds the exclusive ``flock`` its writer takes on it; its
name's PID is only a hint (PIDs are reused): a temporary named after a live PID but unlocked is
removed, one named after a dead PID but locked by a live process is kept.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modelstock import merge_checkpoints
from modelstock import output as mo
from tests.hostile_files import cli_env, valid_models

TMP_TAG = ".modelstock-tmp-"
OLD_ONLY = "only_in_the_old_output.txt"  # a file only the old output has: its unlink is the
# moment the old output's data starts to go


class EventLog:
    """fsync, rename and unlink events, with absolute paths, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple] = []
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace
        real_unlink, real_renameat2 = os.unlink, mo._renameat2

        def fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        def rename(a, b, *args, **kwargs):
            real_rename(a, b, *args, **kwargs)
            self.events.append(("rename", self._abs(a), self._abs(b)))

        def replace(a, b, *args, **kwargs):
            real_replace(a, b, *args, **kwargs)
            self.events.append(("rename", self._abs(a), self._abs(b)))

        def renameat2(a, b, flags):
            done = real_renameat2(a, b, flags)
            if done:
                self.events.append(("rename", self._abs(a), self._abs(b)))
            return done

        def unlink(path, *args, **kwargs):
            self.events.append(("unlink", os.path.basename(os.fsdecode(path))))
            return real_unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "unlink", unlink)
        monkeypatch.setattr(mo, "_renameat2", renameat2)

    @staticmethod
    def _abs(p) -> str:
        return os.path.abspath(os.fsdecode(p))

    def placing(self, out: Path) -> tuple[int, str]:
        """Index of the rename that put the new output at ``out``, and where it came from."""
        for i, e in enumerate(self.events):
            if e[0] == "rename" and e[2] == str(out):
                return i, e[1]
        raise AssertionError(f"no rename into {out}: {self.events}")

    def fsyncs(self, path: str | Path) -> list[int]:
        return [i for i, e in enumerate(self.events) if e == ("fsync", str(path))]

    def old_removed(self) -> int | None:
        return next((i for i, e in enumerate(self.events) if e == ("unlink", OLD_ONLY)), None)


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path, Path]:
    anchor, ft1, ft2 = valid_models(tmp_path / "in")
    (anchor / "tokenizer.json").write_text('{"version": "1.0"}\n')  # one more file copied
    return anchor, ft1, ft2


def old_output(out: Path) -> None:
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"an earlier, complete model")
    (out / OLD_ONLY).write_text("old")


def files_under(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def check_durable_before_visible(log: EventLog, out: Path, force: bool) -> None:
    """Every file of ``out`` and its directory fsynced (once) before the rename that made it
    visible; then the directory holding ``out``; only then may the old output go."""
    at, tmp = log.placing(out.absolute())
    names = files_under(out) if out.is_dir() else [Path()]
    assert len(names) >= (7 if out.is_dir() else 1), names
    for name in names:
        where = os.path.normpath(os.path.join(tmp, name))
        synced = log.fsyncs(where)
        assert len(synced) == 1, f"{where} fsynced {len(synced)} times: {log.events}"
        assert synced[0] < at, f"{where} fsynced after the rename: {log.events}"
    if out.is_dir():
        synced = log.fsyncs(tmp)
        assert len(synced) == 1 and synced[0] < at, f"temporary directory: {log.events}"
    parent = log.fsyncs(out.parent.absolute())
    assert [i for i in parent if i > at], f"no fsync of the parent after the rename: {log.events}"
    if force and out.is_dir():
        gone = log.old_removed()
        assert gone is not None and gone > at, log.events
        assert any(at < i < gone for i in parent), \
            f"the old output was removed before the rename was durable: {log.events}"


def test_fresh_output_is_durable_before_it_is_visible(models, tmp_path: Path,
                                                       monkeypatch) -> None:
    out = tmp_path / "new" / "deeper" / "merged"  # two parent directories made for it
    log = EventLog(monkeypatch)
    merge_checkpoints(*models[:1], list(models[1:]), out, shard_size=200,
                      dtype=torch.bfloat16)  # a rewritten config.json, several shards
    assert (out / "model.safetensors.index.json").is_file()
    check_durable_before_visible(log, out, force=False)
    at, _ = log.placing(out.absolute())
    for made in (tmp_path / "new", tmp_path):  # the entries of the directories made for it
        assert [i for i in log.fsyncs(made) if i > at], f"{made} not fsynced: {log.events}"


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_forced_replacement_is_durable_before_the_old_output_goes(models, tmp_path: Path,
                                                                  monkeypatch,
                                                                  exchange: bool) -> None:
    out = tmp_path / "merged"
    old_output(out)
    if not exchange:  # a kernel or file system without renameat2
        monkeypatch.setattr(mo, "_renameat2", lambda a, b, flags: False)
    log = EventLog(monkeypatch)
    merge_checkpoints(*models[:1], list(models[1:]), out, shard_size=200, force=True)
    assert not (out / OLD_ONLY).exists()
    check_durable_before_visible(log, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "merged"]


def test_single_file_output_is_durable_before_it_is_visible(models, tmp_path: Path,
                                                             monkeypatch) -> None:
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"an earlier, complete model")
    log = EventLog(monkeypatch)
    merge_checkpoints(*models[:1], list(models[1:]), out, force=True)
    check_durable_before_visible(log, out, force=True)


# -- stale temporaries -----------------------------------------------------------------------

def temps(out: Path) -> list[str]:
    prefix = f".{out.name}{TMP_TAG}"
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(prefix))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()
""")


def test_an_unlocked_temporary_is_stale_even_if_its_pid_is_alive(models, tmp_path: Path) -> None:
    """A SIGKILLed run's temporary whose PID now belongs to another process (here: this one)."""
    out = tmp_path / "merged"
    half = tmp_path / f".merged{TMP_TAG}{os.getpid()}-abcd1234"
    half.mkdir()
    (half / "model-00001-of-00002.safetensors").write_bytes(b"half written")
    merge_checkpoints(*models[:1], list(models[1:]), out)
    assert temps(out) == []
    assert (out / "model.safetensors").is_file()


def test_a_locked_temporary_is_kept_even_if_its_pid_is_dead(tmp_path: Path) -> None:
    """The lock decides: a live process holds the temporary's lock (its writer, or a child it
    forked), whatever PID the name records."""
    out = tmp_path / "merged"
    busy = tmp_path / f".merged{TMP_TAG}{dead_pid()}-abcd1234"
    busy.mkdir()
    (busy / "model.safetensors").write_bytes(b"being written")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(busy)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        mo.check_output_path(out, [], force=False)  # what every run does first
        assert temps(out) == [busy.name]
        assert (busy / "model.safetensors").read_bytes() == b"being written"
    finally:
        holder.stdin.close()  # the holder exits: the lock is free
        holder.wait(timeout=60)
    mo.check_output_path(out, [], force=False)
    assert temps(out) == []


def test_an_unlocked_old_output_set_aside_is_put_back_even_if_its_pid_is_alive(
        tmp_path: Path) -> None:
    out = tmp_path / "merged"
    aside = tmp_path / f".merged{TMP_TAG}{os.getpid()}-old"
    old_output(aside)
    mo.check_output_path(out, [], force=True)
    assert (out / OLD_ONLY).read_text() == "old"
    assert temps(out) == []


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from modelstock.output import atomic_output
    out = Path(sys.argv[1])
    with atomic_output(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"complete")
        print(tmp, flush=True)
        sys.stdin.readline()
    print("done", flush=True)
""")


def test_a_running_writer_keeps_its_temporary_and_a_killed_one_loses_it(tmp_path: Path) -> None:
    """Another run's cleanup leaves a live writer's temporary alone (this process's own too);
    once the writer is SIGKILLed, its temporary is removed by the next run."""
    out = tmp_path / "merged"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(out)], env=cli_env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    try:
        held = [Path(w.stdout.readline().strip()) for w in writers]
        assert all(p.exists() for p in held), held
        with mo.atomic_output(out) as mine:
            (mine / "weights").write_text("mine")
            mo._remove_stale_temps(out)
            assert all(p.exists() for p in held) and mine.exists()
            assert len(temps(out)) == 3
        shutil.rmtree(out)
        writers[0].send_signal(signal.SIGKILL)
        writers[0].wait(timeout=60)
        mo._remove_stale_temps(out)
        alive = [p for p in held if p.exists()]
        assert len(alive) == 1 and alive[0] == held[1], (held, temps(out))
        writers[1].stdin.write("\n")
        writers[1].stdin.flush()
        assert writers[1].stdout.readline() == "done\n"
        assert (out / "model.safetensors").read_bytes() == b"complete"
        assert temps(out) == []
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
            w.wait(timeout=60)


def test_own_lock_is_not_taken_by_own_cleanup(tmp_path: Path) -> None:
    """flock is per open file: the writing process's own cleanup (a second merge on the same
    output, in another thread) cannot take the lock it holds either."""
    out = tmp_path / "merged"
    with mo.atomic_output(out) as tmp:
        (tmp / "weights").write_text("partial")
        mo._remove_stale_temps(out)
        assert (tmp / "weights").read_text() == "partial"
        root = tmp_path / temps(out)[0]
        fd = os.open(root, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert (out / "weights").read_text() == "partial"
    assert temps(out) == []
