"""Workers in another interpreter (``worker_python``), and what the workers' Python and dill versions are.

A researcher's environment needs nothing but dill: ``start_worker`` runs the
chosen interpreter with a one-line loader (``LOADER``) that reads the text of
``mep.endpoint.bootstrap`` from its connection and executes it, so neither
mep nor Parsl has to be installed there. The connection is a socketpair passed
by descriptor; stdin is /dev/null and stdout/stderr are the endpoint's log, so
nothing a task prints or reads can disturb the protocol.

``worker_runtime`` says which Python and dill the workers of a config run,
asking a ``worker_python`` interpreter once (cached) and answering for the
endpoint's own interpreter directly; ``mep.endpoint.versions`` compares it
with each client's.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mep.endpoint.worker import Outcome
from mep.errors import ErrorCode
from mep.protocol.messages import FAILED

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

LOADER = (
    "import sys, multiprocessing.connection as c; k = c.Connection(int(sys.argv[1])); "
    "exec(compile(k.recv_bytes(), 'mep-bootstrap', 'exec'), {'__name__': '__mep_bootstrap__', '__connection__': k})"
)
_PROBE = (
    "import json, sys\n"
    "try:\n    import dill; d = dill.__version__\nexcept ImportError:\n    d = None\n"
    "print(json.dumps({'python': '%d.%d.%d' % sys.version_info[:3], 'dill': d}))\n"
)
_PROBE_TIMEOUT = 60.0


class WorkerEnvironmentError(Exception):
    """The chosen worker interpreter can't run tasks at all; ``str()`` says why and what to do."""


@dataclass(frozen=True)
class WorkerRuntime:
    python: str  # major.minor.micro
    dill: str

    @property
    def python_minor(self) -> str:
        return ".".join(self.python.split(".")[:2])


def bootstrap_source() -> bytes:
    return (Path(__file__).parent / "bootstrap.py").read_bytes()


@functools.cache
def worker_runtime(python: str | None) -> WorkerRuntime:
    """The Python and dill versions of the workers that run ``python`` (None: this interpreter).

    Raises WorkerEnvironmentError when the interpreter can't be started or has no dill.
    """
    if python is None:
        import importlib.metadata  # here: only a client's first task needs it

        return WorkerRuntime(".".join(map(str, sys.version_info[:3])), importlib.metadata.version("dill"))
    try:
        probe = subprocess.run([python, "-I", "-c", _PROBE], capture_output=True, text=True, timeout=_PROBE_TIMEOUT,
                               stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WorkerEnvironmentError(f"the worker interpreter {python} can't be started: {_reason(exc)}") from None
    try:
        answer: dict[str, Any] = json.loads(probe.stdout)
    except ValueError:
        detail = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        raise WorkerEnvironmentError(f"the worker interpreter {python} is not a usable Python 3: {detail}") from None
    if answer["dill"] is None:
        raise WorkerEnvironmentError(
            f"the worker interpreter {python} has no dill; install the version your client uses "
            f"(`{python} -m pip install dill==VERSION`)")
    return WorkerRuntime(answer["python"], answer["dill"])


def _reason(exc: BaseException) -> str:
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"it did not answer within {exc.timeout:.0f} s"
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


class WorkerProcess:
    """A ``worker_python`` process, shaped like ``multiprocessing.Process`` for the process engine.

    ``sentinel`` is a pidfd: readable once the process has exited.
    """

    def __init__(self, popen: subprocess.Popen) -> None:
        self._popen = popen
        self.sentinel = os.pidfd_open(popen.pid)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def kill(self) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGKILL)

    def join(self) -> None:
        self._popen.wait()
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def start_worker(python: str) -> tuple[WorkerProcess, Connection]:
    """Start ``python`` as a bootstrap worker and send it the bootstrap; raises OSError if it can't start."""
    return start_bootstrap(lambda fd: [python, "-I", "-c", LOADER, str(fd)])


def start_bootstrap(command: Callable[[int], list[str]]) -> tuple[WorkerProcess, Connection]:
    """Start a bootstrap worker by ``command(fd)``: the argv that runs LOADER with the connection ``fd`` (here)."""
    from multiprocessing.connection import Connection  # here: the local workers' endpoint doesn't need it

    ours, theirs = socket.socketpair()
    try:
        popen = subprocess.Popen(command(theirs.fileno()), pass_fds=(theirs.fileno(),),
                                 stdin=subprocess.DEVNULL, close_fds=True)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    connection = Connection(ours.detach())
    connection.send_bytes(bootstrap_source())
    return WorkerProcess(popen), connection


def lost_worker(process: WorkerProcess, python: str) -> Outcome:
    """The outcome of a task whose bootstrap worker died under it."""
    process.join()
    code = process.exitcode
    how = (f"was killed by signal {-code} ({signal.Signals(-code).name})" if code is not None and code < 0
           else f"exited with status {code}")
    return Outcome(FAILED, code=ErrorCode.WORKER_LOST, message=f"the worker process ({python}) running this task {how}")
