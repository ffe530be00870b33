"""``python -m modelstock`` is the ``modelstock`` command."""

from .cli import entry_point

entry_point()
