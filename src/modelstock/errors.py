"""The one exception type users see: a one-line message naming the file and the tensor."""

from __future__ import annotations

import os


class ModelStockError(Exception):
    """A user-facing error (bad input, bad option, I/O failure); its message is one line."""

    def __init__(self, message: str, path: str | os.PathLike | None = None,
                 tensor: str | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if tensor is not None:
            where.append(f"tensor '{tensor}'")
        text = f"{': '.join(where)}: {message}" if where else message
        super().__init__(" ".join(text.split()))
        self.path = None if path is None else str(path)
        self.tensor = tensor


class Terminated(BaseException):
    """SIGTERM or SIGHUP (``args[0]``), raised by the CLI's handler so that cleanup runs as it
    does for Ctrl-C's KeyboardInterrupt; not an Exception, so ``except Exception`` lets it by."""
