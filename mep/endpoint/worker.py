"""Inside a local worker process: the bootstrap's task loop, tied to the endpoint's life.

The task logic itself lives in ``mep.endpoint.bootstrap`` (standard library and
dill only), so local workers and ``worker_python`` workers run the very same
code; ``Outcome`` is the endpoint's view of what the bootstrap reports.
"""

from __future__ import annotations

import ctypes
import os
import signal
from multiprocessing.connection import Connection
from typing import NamedTuple

from mep.endpoint import bootstrap

PR_SET_PDEATHSIG = 1


class Outcome(NamedTuple):
    """What became of one task, ready to become a wire ``Result`` (the bootstrap's reply fields)."""

    status: str
    payload: bytes = b""
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    code: str = ""


def _die_with_parent() -> None:
    """If the endpoint's forkserver goes (the endpoint died), this worker goes too: no orphaned user code."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1:  # the parent died before the prctl took effect
        os._exit(1)


def serve(connection: Connection) -> None:
    """A local worker's life: the bootstrap's loop, dying with the endpoint."""
    _die_with_parent()
    bootstrap.serve(connection)
