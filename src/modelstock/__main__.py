"""``python -m modelstock`` is the ``modelstock`` command."""

from .cli import main

main()
