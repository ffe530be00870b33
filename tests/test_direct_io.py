"""The output file: O_DIRECT or not, the bytes on disk are exactly the bytes written."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelstock import direct_io
from modelstock.direct_io import ALIGN, OutputFile


def write_pieces(path: Path, pieces: list[bytes], direct: bool, stage: int) -> OutputFile:
    f = OutputFile(path, direct=direct, stage_bytes=stage)
    for p in pieces:
        f.write(p)
    f.close()
    return f


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 3 * ALIGN + 7), max_size=12),
       stage=st.sampled_from([ALIGN, 2 * ALIGN, 5 * ALIGN]), direct=st.booleans())
def test_bytes_on_disk_are_the_bytes_written(tmp_path_factory, sizes: list[int], stage: int,
                                             direct: bool) -> None:
    path = tmp_path_factory.mktemp("out") / "f"
    pieces = [os.urandom(n) for n in sizes]
    write_pieces(path, pieces, direct, stage)
    assert path.read_bytes() == b"".join(pieces)


def test_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        OutputFile(tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == b"keep"


def test_file_system_without_o_direct_falls_back_at_open(tmp_path: Path, monkeypatch) -> None:
    real_open = os.open

    def refuse_direct(path, flags, mode=0o777):
        if flags & direct_io.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(direct_io.os, "open", refuse_direct)
    data = os.urandom(3 * ALIGN + 5)
    f = write_pieces(tmp_path / "f", [data], True, ALIGN)
    assert not f.direct
    assert (tmp_path / "f").read_bytes() == data


def test_o_direct_refused_at_write_falls_back(tmp_path: Path, monkeypatch) -> None:
    f = OutputFile(tmp_path / "f", direct=True, stage_bytes=ALIGN)
    if not f.direct:
        f.abort()
        pytest.skip("this file system does not take O_DIRECT")
    real_write = os.write

    def refuse_while_direct(fd, data):
        if f.direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_io.os, "write", refuse_while_direct)
    data = os.urandom(5 * ALIGN + 3)
    f.write(data)
    f.close()
    assert not f.direct
    assert (tmp_path / "f").read_bytes() == data


def test_other_write_errors_are_raised(tmp_path: Path, monkeypatch) -> None:
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    f = OutputFile(tmp_path / "f", stage_bytes=ALIGN)
    monkeypatch.setattr(direct_io.os, "write", full)
    with pytest.raises(OSError, match="No space"):
        f.write(bytes(2 * ALIGN))
        f.close()
    f.abort()
    assert f.closed


@pytest.mark.parametrize("direct", [False, True])
def test_short_writes_are_completed(tmp_path: Path, monkeypatch, direct: bool) -> None:
    real_write = os.write
    monkeypatch.setattr(direct_io.os, "write",
                        lambda fd, data: real_write(fd, data[: min(len(data), ALIGN)]))
    data = os.urandom(4 * ALIGN + 9)
    write_pieces(tmp_path / "f", [data], direct, 3 * ALIGN)
    assert (tmp_path / "f").read_bytes() == data
