"""What the endpoint makes of a worker's reply: ``Outcome``, the bootstrap's reply fields.

The task logic itself lives in ``mep.endpoint.bootstrap`` (standard library and
dill only), so local workers (forked by ``mep.endpoint.forker``) and
``worker_python`` workers run the very same code.
"""

from __future__ import annotations

from typing import NamedTuple


class Outcome(NamedTuple):
    """What became of one task, ready to become a wire ``Result`` (the bootstrap's reply fields)."""

    status: str
    payload: bytes = b""
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    code: str = ""
    large: tuple[str, int, str] | None = None  # (path, size, sha256): the worker wrote the result to this file
