"""Reproductions of the paper's claims at small scale (see experiments/README.md)."""
