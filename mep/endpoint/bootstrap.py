"""The worker bootstrap: run tasks with nothing but the standard library and dill.

This module is what travels to a ``worker_python`` interpreter (a
researcher's conda or virtual environment that has neither mep nor Parsl):
``mep.endpoint.interpreters`` starts that interpreter with a one-line loader
that receives this file's text over the worker's connection and runs it,
which calls ``serve``. So it must stay self-contained: standard library and
dill only, no mep import, and source that the oldest Python a researcher may
pick can compile (a version mismatch is caught before a task gets here, but
the bootstrap still has to start to say so).

The wire between the endpoint and this worker is a connection of plain
tuples (``multiprocessing.connection.Connection``, or the forker's ``Channel``
for local workers): the endpoint sends lists of tasks, ``(RUN, task id,
function hash, function body or None, args, result file)``, several at a time,
and gets back lists of ``(task id, (status, payload, error type, message,
traceback, code, large))``, the fields of ``mep.endpoint.worker.Outcome``
(``serve`` says when). ``result file`` is ``(path,
threshold)`` or None: a result whose serialisation exceeds ``threshold`` bytes
is pickled straight into the file at ``path`` (``ResultFile``) and only
``large = (path, size, sha256)`` travels back, so neither this worker nor the
endpoint ever holds its serialised bytes whole (docs/user.md, "Large
results"); the worker's floor is the returned object itself. ``args`` is
the arguments' serialisation, or ``(path, size, sha256)`` of a file the
endpoint fetched and checked (large arguments, workers on its disk): the
worker unpickles straight from the file, so the endpoint never holds them,
and the endpoint removes the file when the task ends.

A task's own output (its stdout and stderr, its child processes' too) is
captured through a pipe while it runs (one pipe and one reader thread for the
worker's life, ``_CapturedOutput``): the first ``KEPT_OUTPUT`` bytes go to
the endpoint's log (the worker's own stdout) when the task ends, framed with
the task id, and the rest is counted and dropped, so one chatty task can't
fill the user's disk. The worker is a child subreaper
(``PR_SET_CHILD_SUBREAPER``), so every process a task starts stays its
descendant, even one that called ``setsid`` and whose parent exited; when the
task ends, whatever it left running is killed and reaped before the worker
takes the next task.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import sys
import threading
import traceback
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

# The wire values of mep.protocol.messages.SUCCESS/TASK_ERROR/FAILED and of mep.errors.ErrorCode,
# repeated because this module may not import mep (tests/test_parsl_engine.py keeps them equal).
SUCCESS = "success"
TASK_ERROR = "error"
FAILED = "failed"
TASK_ERROR_CODE = "task_error"
CONFIG_INVALID_CODE = "config_invalid"
LARGE_RESULT_UNAVAILABLE_CODE = "large_result_unavailable"

KEPT_OUTPUT = 65536  # bytes of each task's output kept in the endpoint's log
PR_SET_CHILD_SUBREAPER = 36

_functions: dict = {}


def run_task(fn_hash: str, fn_body: bytes | None, args: bytes | tuple, result_file: tuple | None = None) -> tuple:
    """Run one task; ``fn_body`` is None when this worker already loaded ``fn_hash``.

    ``result_file``: ``(path, threshold)`` where a result above ``threshold`` bytes goes (see the module's doc).
    """
    try:
        import dill
    except ImportError:
        message = (f"the worker interpreter {sys.executable} has no dill: install it there "
                   f"(`{sys.executable} -m pip install dill`), with the version your client uses")
        return (FAILED, b"", "", message, "", CONFIG_INVALID_CODE, None)
    try:
        fn = _functions.get(fn_hash)
        if fn is None:
            fn = _functions[fn_hash] = _load("the function", fn_body, dill)
        call_args, call_kwargs = _load_arguments(args, dill)
        value = fn(*call_args, **call_kwargs)
    except BaseException as exc:  # the task's failure is data to send back, whatever it is
        return _failure(exc, dill)
    if result_file is None:
        destination = ResultFile("", -1)  # never spills: the whole serialisation is the reply's payload
    else:
        destination = ResultFile(*result_file)
    try:
        dill.dump(value, destination)
        kept = destination.finish()
    except ResultFileError as exc:
        destination.abandon()
        return (FAILED, b"", "", str(exc), "", LARGE_RESULT_UNAVAILABLE_CODE, None)
    except Exception as exc:  # dill's frames say nothing to the researcher: name the stage instead
        destination.abandon()
        name = getattr(fn, "__qualname__", type(fn).__name__)
        stage = TypeError(f"the return value of {name} could not be serialised: {type(exc).__name__}: {exc} "
                          "(return plain data, or save the object to a file and return its path)")
        return _failure(stage, dill, "".join(traceback.format_exception_only(type(stage), stage)))
    if isinstance(kept, bytes):
        return (SUCCESS, kept, "", "", "", "", None)
    return (SUCCESS, b"", "", "", "", "", kept)


class ResultFileError(OSError):
    """The result file could not be written; the message says where and why."""


class ResultFile:
    """A binary file object for ``dill.dump``: in memory up to ``threshold`` bytes, then written to ``path``.

    Past the threshold, what was kept goes to ``<path minus suffix>.partial``
    (mode 0600, its directory created 0700) and every later write goes
    straight there, hashed on the way, so the serialisation is never whole
    in memory: the pickler hands large ``bytes`` over as they are, without
    copying them into a frame. ``finish`` fsyncs the file before renaming
    it into place (the reference the service stores must not outlive a
    crash's page cache). ``threshold`` -1: never spill.
    """

    def __init__(self, path: str, threshold: int) -> None:
        self.path = path
        self.threshold = threshold
        self.size = 0
        self._hash = hashlib.sha256()
        self._kept = bytearray()
        self._file = None
        self._partial = os.path.splitext(path)[0] + ".partial"

    def write(self, data) -> int:  # bytes or a buffer (memoryview, PickleBuffer), as the pickler gives them
        length = memoryview(data).nbytes
        self.size += length
        if self._file is None:
            if self.threshold < 0 or self.size <= self.threshold:
                self._kept += data
                return length
            self._open()
        self._hash.update(data)
        try:
            self._file.write(data)
        except OSError as exc:
            raise self._error(exc) from exc
        return length

    def _open(self) -> None:
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(self._partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            self._file = os.fdopen(fd, "wb")
            self._file.write(self._kept)
        except OSError as exc:
            raise self._error(exc) from exc
        self._hash.update(self._kept)
        self._kept = bytearray()

    def _error(self, exc: OSError) -> ResultFileError:
        return ResultFileError(
            f"the result is above the endpoint's large-result threshold of {self.threshold} bytes and could not "
            f"be written to {os.path.dirname(self.path)}: {exc.strerror or exc}")

    def finish(self):
        """The serialisation as bytes if it stayed under the threshold, else ``(path, size, sha256)``."""
        if self._file is None:
            return bytes(self._kept)
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._partial, self.path)
        except OSError as exc:
            raise self._error(exc) from exc
        return (self.path, self.size, self._hash.hexdigest())

    def abandon(self) -> None:
        """No file left behind by a result that failed half way."""
        if self._file is None:
            return
        self._file.close()
        try:
            os.unlink(self._partial)
        except OSError:
            pass


def _load_arguments(args: bytes | tuple, dill: types.ModuleType) -> object:
    """The arguments from their bytes, or from their file (see the module's doc) without reading it whole first."""
    if isinstance(args, bytes):
        return _load("the arguments", args, dill)
    path, size, sha256 = args
    with open(path, "rb") as handle:
        found = os.fstat(handle.fileno()).st_size
        if found != size:
            raise OSError(f"the task's arguments file {path} is {found} bytes, not the {size} the endpoint "
                          f"checked (SHA-256 {sha256}); submit the task again")
        return _load("the arguments", handle, dill)


def _load(what: str, payload, dill: types.ModuleType) -> object:  # bytes, or a binary file
    """``dill.loads`` (``dill.load`` from a file), with a missing module explained: the usual reason a task
    can't even start."""
    try:
        return dill.loads(payload) if isinstance(payload, bytes) else dill.load(payload)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"{what} could not be loaded on the endpoint: {exc}, in the workers' Python ({sys.executable}). Install "
            "the module there or pick an environment that has it (python_env in user_endpoint_config, where the "
            "admin's template offers it); or, if it is your own code, define the function in your script or "
            "notebook so that it travels by value", name=exc.name) from None


def _failure(exc: BaseException, dill: types.ModuleType, text: str = "") -> tuple:
    kind = type(exc)
    type_name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = text or "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        payload = dill.dumps(exc)
    except Exception:  # unpicklable exception: the SDK raises RemoteError from the text
        payload = b""
    # MemoryError() and friends have no message; a stored failure must still state a reason
    return (TASK_ERROR, payload, type_name, str(exc) or f"{type_name} (no message)", text, TASK_ERROR_CODE, None)


class _CapturedOutput:
    """Tasks' fds 1 and 2 into one pipe, kept for the worker's life; one reader thread, started once.

    While a task runs, its output (and its child processes') goes into the
    pipe; the reader thread keeps the first ``KEPT_OUTPUT`` bytes and counts
    the rest, so a task writing more than a pipe holds never blocks. Between
    tasks fds 1 and 2 are the worker's own (the endpoint's log). When a task
    ends (its leftover processes ended too), ``take`` reads what is still in
    the pipe itself, under the lock the reader reads under, so no byte of one
    task is counted as the next one's; a task that printed nothing costs a
    lock and one empty non-blocking read.
    """

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._lock = threading.Lock()
        self.kept = bytearray()
        self.total = 0
        threading.Thread(target=self._reader, name="task-output", daemon=True).start()

    def _reader(self) -> None:
        poller = select.poll()
        poller.register(self._read_fd, select.POLLIN)
        while True:
            poller.poll()
            with self._lock:
                self._read_once()

    def _read_once(self) -> bool:
        """One read of what the pipe holds; False if it was empty."""
        try:
            chunk = os.read(self._read_fd, 65536)
        except BlockingIOError:
            return False
        self.total += len(chunk)
        self.kept += chunk[:max(0, KEPT_OUTPUT - len(self.kept))]
        return True

    def begin(self) -> tuple:
        """fds 1 and 2 into the pipe; returns the worker's own, for ``end``."""
        _flush_streams()
        saved = (os.dup(1), os.dup(2))
        os.dup2(self._write_fd, 1)
        os.dup2(self._write_fd, 2)
        return saved

    def end(self, saved: tuple) -> None:
        """The worker's own stdout and stderr back (the log)."""
        _flush_streams()
        for fd, own in zip((1, 2), saved):
            os.dup2(own, fd)
            os.close(own)

    def take(self) -> tuple:
        """(kept bytes, total bytes) of the task that just ended, once what it wrote is read.

        Called once the task's processes are gone: what they wrote is in the
        pipe now. The reads are bounded: a writer we could not kill is not
        waited for (what it writes later is counted with the next task).
        """
        with self._lock:
            for _ in range(64):
                if not self._read_once():
                    break
            kept, total = self.kept, self.total
            self.kept, self.total = bytearray(), 0
        return kept, total


def _log_output(task_id: str, kept: bytes, total: int) -> None:
    """A task's captured output into the endpoint's log (the worker's stdout), framed with its id."""
    dropped = total - len(kept)
    header = f"--- output of task {task_id}: {total} bytes"
    if dropped:
        header += f"; only the first {len(kept)} are kept here, {dropped} dropped"
    text = header.encode() + b"\n" + bytes(kept)
    if not text.endswith(b"\n"):
        text += b"\n"
    _write_all(1, text + f"--- end of the output of task {task_id}\n".encode())


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:  # a task may have closed or replaced them
            pass


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _become_subreaper() -> None:
    """Orphans of a task's processes come to this worker rather than to init, so they can be ended."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: left-over processes are not tracked
        pass


def _children() -> list:
    pids = []
    for thread in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{thread}/children") as handle:
                pids += [int(pid) for pid in handle.read().split()]
        except OSError:
            continue
    return pids


def end_leftover_processes() -> int:
    """SIGKILL and reap every process the task left behind; returns how many there were.

    They are all this worker's children by now (it is a subreaper): killing
    one hands its own children to us, hence the rounds. No child at all, the
    usual case, is one system call.
    """
    ended = set()
    try:
        reaped, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return 0
    if reaped:
        ended.add(reaped)  # one had exited already
    for _ in range(1000):
        children = _children()
        if not children:
            break
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            ended.add(pid)
    return len(ended)


def _run_contained(output: _CapturedOutput, task_id: str, fn_hash: str, fn_body: bytes | None,
                   args: bytes | tuple, result_file: tuple | None) -> tuple:
    """``run_task``, its output captured and capped, and whatever it left running ended."""
    saved = output.begin()
    try:
        return run_task(fn_hash, fn_body, args, result_file)
    finally:
        output.end(saved)
        leftovers = end_leftover_processes()
        kept, total = output.take()
        if total:
            _log_output(task_id, kept, total)
        if leftovers:
            _write_all(1, f"task {task_id} left {leftovers} process(es) running; they were killed\n".encode())


RUN, SKIP = "run", "skip"  # the kinds of the endpoint's items (see serve)


def serve(connection: Connection) -> None:
    """A worker's life: run tasks from the endpoint until it hangs up (or kills us).

    Each message from the endpoint is a list of items: ``(RUN, task id,
    function hash, function body or None, args, result file)`` queues a task,
    ``(SKIP, task id)`` takes a queued task back before it starts (answered
    at once, even while another task runs). Tasks run in the order they came.
    Each reply is a list of ``(task id, reply fields)``, fields None for a task
    given back. A result is sent and the next task taken under one lock, and a
    SKIP is answered under it too, so the endpoint knows that the first task it
    has not heard back about is the one running.
    """
    _become_subreaper()
    output = _CapturedOutput()
    inbox = _Inbox(connection)
    threading.Thread(target=inbox.receive, name="tasks-in", daemon=True).start()
    task = inbox.next_task(None)
    while task is not None:
        task = inbox.next_task((task[1], _run_contained(output, *task[1:])))


class _Inbox:
    """The endpoint's messages, read on a thread of their own: tasks queue here, SKIPs are answered here."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._queued: list = []
        self._closed = False
        self._changed = threading.Condition()

    def receive(self) -> None:
        while True:
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                with self._changed:
                    self._closed = True
                    self._changed.notify()
                return
            with self._changed:
                for item in message:
                    if item[0] == RUN:
                        self._queued.append(item)
                    else:
                        self._give_back(item[1])
                self._changed.notify()

    def _give_back(self, task_id: str) -> None:
        for index, task in enumerate(self._queued):  # one not queued here any more has run or runs now
            if task[1] == task_id:
                del self._queued[index]
                self._connection.send([(task_id, None)])
                return

    def next_task(self, reply: tuple | None):
        """Send ``reply`` (the last task's), then the next task to run, once there is one; None once hung up."""
        with self._changed:
            if reply is not None:
                self._connection.send([reply])
            while not self._queued and not self._closed:
                self._changed.wait()
            return self._queued.pop(0) if self._queued else None


if __name__ == "__mep_bootstrap__":  # run by interpreters.LOADER, which defines __connection__
    serve(__connection__)  # noqa: F821
