"""The process engine's local workers: forked from a small clean process, talking over plain sockets.

The endpoint holds its CURVE secret and a ZeroMQ context, so it must not fork
workers itself. It starts one *forker* instead (``python -c`` of this module:
a fresh image that never held a secret, with dill imported once so every
worker shares those pages), and asks it for each worker, passing the worker's
end of a socketpair with ``SCM_RIGHTS``. The forker forks, and reports each
worker's pid and, once it has reaped it, its exit status. This replaces
multiprocessing's forkserver, its resource tracker process and its imports
(about 3.5 MiB per process for ``multiprocessing.connection`` alone).

A worker dies with the forker (``PR_SET_PDEATHSIG``), and the forker exits
when the endpoint hangs up, so no user code outlives the endpoint. Workers stay
in the endpoint's process group and are child subreapers (the bootstrap).

The endpoint-worker wire is ``mep.endpoint.channel.Channel``. This module
imports only what starting the forker needs (``start_early`` runs before
anything else of the endpoint), the rest where it is used.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mep.endpoint.channel import Channel

_RECORD = struct.Struct("!Bqq")  # kind, pid, exit code (the forker's reports)
_FORKED, _EXITED = 1, 2
_PR_SET_PDEATHSIG = 1


class ForkedWorker:
    """A worker the forker made, shaped like ``multiprocessing.Process`` for the process engine.

    ``sentinel`` is a pidfd (readable once the worker has exited); the exit
    status comes from the forker, which is the worker's parent.
    """

    def __init__(self, pid: int, forker: _ForkerProcess) -> None:
        self.pid = pid
        self._forker = forker
        self.sentinel = os.pidfd_open(pid)

    @property
    def exitcode(self) -> int | None:
        return self._forker.exit_codes.get(self.pid)

    def is_alive(self) -> bool:
        return self.pid not in self._forker.exit_codes and not select.select([self.sentinel], [], [], 0)[0]

    def join(self) -> None:
        """Wait for the forker's report of this worker's exit (call once its sentinel is readable)."""
        self._forker.wait_for_exit(self.pid)
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


class _ForkerProcess:
    """One forker process and its control socket; once it is gone, what it last reported stays readable."""

    def __init__(self) -> None:
        self.exit_codes: dict[int, int] = {}
        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from mep.endpoint.forker import serve; serve()", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._control: socket.socket | None = ours

    def fork(self) -> tuple[ForkedWorker, Channel]:
        from mep.endpoint.channel import Channel

        ours, theirs = socket.socketpair()
        try:
            socket.send_fds(self._require_control(), [b"w"], [theirs.fileno()])
            while True:
                kind, pid, code = self._read_record()
                if kind == _FORKED:
                    return ForkedWorker(pid, self), Channel(ours)
                self.exit_codes[pid] = code
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

    def wait_for_exit(self, pid: int) -> None:
        while pid not in self.exit_codes:
            try:
                kind, other, code = self._read_record()
            except OSError:
                return  # the forker is gone: the status is unknown
            if kind == _EXITED:
                self.exit_codes[other] = code

    def _require_control(self) -> socket.socket:
        if self._control is None:
            raise OSError("the worker forker exited")
        return self._control

    def _read_record(self) -> tuple[int, int, int]:
        control = self._require_control()
        data = b""
        while len(data) < _RECORD.size:
            chunk = control.recv(_RECORD.size - len(data))
            if not chunk:
                self.hang_up()
                raise OSError("the worker forker exited")
            data += chunk
        return _RECORD.unpack(data)

    def hang_up(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None


_early: _ForkerProcess | None = None


def start_early() -> None:
    """Start the forker now, at the top of ``python -m mep.endpoint``: its interpreter and dill import then
    overlap the endpoint's own imports and config step instead of following them (the first task waits
    for a worker). It is a fresh image, so starting it before the boot document is read holds no secret.
    The next ``Forker`` takes it; ``discard_early`` ends it if the config needs no forker."""
    global _early
    _early = _ForkerProcess()


def discard_early() -> None:
    """End an early forker no engine took (another engine, or a refused config)."""
    global _early
    if _early is not None:
        Forker(_early).shutdown()
        _early = None


class Forker:
    """The endpoint's side: starts the forker process (again, if it died) and asks it for workers."""

    def __init__(self, current: _ForkerProcess | None = None) -> None:
        global _early
        self._current = current or _early or _ForkerProcess()
        _early = None

    def start_worker(self) -> tuple[ForkedWorker, Channel]:
        """A new worker and its channel; raises OSError if the forker can't make one."""
        if self._current.process.poll() is not None:
            self._current = _ForkerProcess()  # the old one's workers died with it; their joins return at once
        return self._current.fork()

    def shutdown(self) -> None:
        """Hang up: the forker exits (and any worker still alive dies with it)."""
        self._current.hang_up()
        try:
            self._current.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._current.process.kill()
            self._current.process.wait()


# --- the forker process ------------------------------------------------------------------


def serve() -> None:
    """The forker's life: fork a worker for each request, report pids and exits, exit when the endpoint does."""
    # What the workers need, imported before they are forked so they share it (_become_worker imports it by name).
    import ctypes  # noqa: F401
    import traceback  # noqa: F401

    from mep.endpoint import bootstrap, channel  # noqa: F401

    control = socket.socket(fileno=int(sys.argv[1]))
    try:
        import dill  # noqa: F401  imported once here, shared by every worker forked from now on
    except ImportError:
        pass  # each task fails with what to install (the bootstrap says so)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd hears of each exit
    poller = select.poll()
    poller.register(control, select.POLLIN)
    poller.register(wake_read, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if wake_read in ready:
            os.read(wake_read, 4096)
            _report_exits(control)
        if control.fileno() in ready:
            message, fds, _, _ = socket.recv_fds(control, 16, 1)
            if not message:
                return  # the endpoint hung up; our workers die with us
            forker_pid = os.getpid()
            pid = os.fork()
            if pid == 0:
                _become_worker(forker_pid, control, (wake_read, wake_write), fds[0], bootstrap)
            for fd in fds:
                os.close(fd)
            control.sendall(_RECORD.pack(_FORKED, pid, 0))


def _report_exits(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        control.sendall(_RECORD.pack(_EXITED, pid, os.waitstatus_to_exitcode(status)))


def _become_worker(forker_pid: int, control: socket.socket, wake: tuple[int, int], channel_fd: int,
                   bootstrap: types.ModuleType) -> None:
    """In the forked child: drop the forker's descriptors and signal setup, then run tasks until hung up."""
    import ctypes
    import traceback

    from mep.endpoint.channel import Channel

    status = 0
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        control.close()
        for fd in wake:
            os.close(fd)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != forker_pid:
            os._exit(1)  # could not tie our life to the forker's, or it is gone already
        bootstrap.serve(Channel(socket.socket(fileno=channel_fd)))
    except BaseException:  # the worker itself failed (not a task: those are caught in the bootstrap)
        traceback.print_exc()
        status = 1
    finally:
        os._exit(status)
