"""The functions the benchmarks run. mep sends them by value (this package is not installed where
endpoints run); Parsl and ProcessPoolExecutor send them by reference (their workers import this module),
each side's usual best case. They import nothing at module level."""

from __future__ import annotations


def noop() -> None:
    """Nothing, so what is measured is the path, not the work."""


def swallow(data: bytes) -> int:
    """Takes a large argument, returns a small result: bytes travel towards the worker."""
    return len(data)


def produce(size: int) -> bytes:
    """Takes a small argument, returns a large result: bytes travel back from the worker."""
    return bytes(size)
