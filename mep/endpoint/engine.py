"""Engines execute tasks for the user endpoint; ``process`` is a pool of worker processes on this host.

An engine takes ``submit(task id, function hash, function body, args, resources)``
(``resources``: the task's checked resource_specification; ``args`` bytes, or
the ``ArgumentFile`` of fetched arguments if the engine ``reads_argument_files``) and
``cancel(task id, outcome)``, and reports through two callbacks that may run on
any thread: ``on_started(task id)`` when a worker takes the task, and
``on_done(task id, Outcome)`` exactly once per task. The seam is deliberately
small so Parsl's executors can sit behind it.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
from collections import deque
from collections.abc import Callable, Mapping
from types import MappingProxyType
from dataclasses import dataclass, field
from typing import Any, Protocol

from mep.endpoint.forker import Forker
from mep.endpoint.large_args import ArgumentFile, remove_argument_file
from mep.endpoint.worker import Outcome
from mep.errors import ErrorCode
from mep.protocol.messages import FAILED

log = logging.getLogger(__name__)

Started = Callable[[str], None]
Completion = Callable[[str, Outcome], None]
EMPTY: Mapping[str, int] = MappingProxyType({})  # no resource_specification
ResultFileFor = Callable[[str], tuple[str, int]]  # task id -> (its result file's path, the large-result threshold)


class Connection(Protocol):
    """A worker's end: ``multiprocessing.connection.Connection`` or ``mep.endpoint.forker.Channel``."""

    def fileno(self) -> int: ...
    def send(self, value: object) -> None: ...
    def recv(self) -> Any: ...
    def close(self) -> None: ...


WorkerStarter = Callable[[], tuple[Any, Connection]]
"""Starts one worker: (a process with ``pid``, ``sentinel``, ``is_alive``, ``join``, ``exitcode``; its connection)."""

WORKER_RETRY_SECONDS = 1.0  # after a worker could not be started


@dataclass
class _Task:
    task_id: str
    fn_hash: str
    fn_body: bytes
    args: bytes | ArgumentFile

    def release(self) -> None:
        """The task ended (or will never run): its arguments file, if it has one, is not needed any more."""
        if isinstance(self.args, tuple):
            remove_argument_file(self.args[0])


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process
    connection: Connection
    functions: set[str] = field(default_factory=set)
    task: _Task | None = None
    cancel_outcome: Outcome | None = None


class ProcessEngine:
    """Worker processes on this host, one task at a time each.

    Workers are forked by ``mep.endpoint.forker``'s clean process, so they
    never inherit a ZeroMQ context or the endpoint's keys; they are started on
    the engine's thread, so the endpoint is ready before they are. A task is
    cancelled (or stopped at its walltime) by killing its worker, which
    is replaced at once; a worker that dies by itself fails its task with the
    cause and is replaced too.
    """

    def __init__(self, workers: int, on_started: Started, on_done: Completion,
                 start_worker: WorkerStarter | None = None, result_file: ResultFileFor | None = None) -> None:
        """``result_file``: where a worker writes a task's large result itself (workers that share our disk)."""
        self._result_file = result_file
        # Workers that share our disk also load a task's fetched arguments from their file themselves.
        self.reads_argument_files = result_file is not None
        self._forker = None if start_worker else Forker()
        self._start = start_worker or self._forker.start_worker
        self._worker_count = workers
        self._on_started = on_started
        self._on_done = on_done
        self._lock = threading.Lock()
        self._pending: deque[_Task] = deque()
        self._cancels: dict[str, Outcome] = {}
        self._stopping = False
        self._wake_read, self._wake_write = os.pipe()
        self._workers: list[_Worker] = []
        self._thread = threading.Thread(target=self._loop, name="process-engine", daemon=True)
        self._thread.start()

    # --- called from the endpoint's thread ----------------------------------------

    def submit(self, task_id: str, fn_hash: str, fn_body: bytes, args: bytes | ArgumentFile,
               resources: Mapping[str, int] = EMPTY) -> None:
        """``resources`` is always empty here: the config admits no task_resources for this engine."""
        with self._lock:
            self._pending.append(_Task(task_id, fn_hash, fn_body, args))
        self._wake()

    def cancel(self, task_id: str, outcome: Outcome) -> None:
        """Stop a task wherever it is; it completes with ``outcome`` (unless it finished first)."""
        with self._lock:
            self._cancels[task_id] = outcome
        self._wake()

    def shutdown(self) -> None:
        """Stop at once: workers are killed; tasks not yet reported are simply not reported."""
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join()
        for worker in self._workers:
            _kill_tree(worker.process)
            worker.process.join()
            worker.connection.close()
            if worker.task is not None:
                worker.task.release()
        for task in self._pending:
            task.release()
        if self._forker is not None:
            self._forker.shutdown()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _wake(self) -> None:
        os.write(self._wake_write, b"x")

    # --- the engine's own thread ----------------------------------------------------

    def _start_workers(self) -> bool:
        """Start workers up to the configured count; False if one could not be started (retried later)."""
        while len(self._workers) < self._worker_count:
            try:
                process, connection = self._start()
            except OSError:
                log.exception("could not start a worker; trying again in %g s", WORKER_RETRY_SECONDS)
                return False
            self._workers.append(_Worker(process=process, connection=connection))
        return True

    def _loop(self) -> None:
        while True:
            complete = self._start_workers()
            with self._lock:
                if self._stopping:
                    return
                self._apply_cancels()
                self._assign()
            busy = [w.connection for w in self._workers if w.task is not None]
            ready = _ready([*busy, *(w.process.sentinel for w in self._workers), self._wake_read],
                           None if complete else WORKER_RETRY_SECONDS)
            if self._wake_read in ready:
                os.read(self._wake_read, 65536)
            for worker in list(self._workers):
                if worker.task is not None and worker.connection in ready:
                    self._collect(worker)
                if worker.process.sentinel in ready:
                    self._replace(worker)

    def _apply_cancels(self) -> None:
        for task_id, outcome in self._cancels.items():
            queued = next((task for task in self._pending if task.task_id == task_id), None)
            if queued is not None:
                self._pending.remove(queued)
                queued.release()
                self._on_done(task_id, outcome)
                continue
            for worker in self._workers:
                if worker.task is not None and worker.task.task_id == task_id and worker.cancel_outcome is None:
                    worker.cancel_outcome = outcome
                    _kill_tree(worker.process)  # the sentinel reports it; the task ends with the cancel outcome
        self._cancels.clear()

    def _assign(self) -> None:
        for worker in self._workers:
            if not self._pending:
                return
            if worker.task is None and worker.process.is_alive():
                task = self._pending.popleft()
                body = None if task.fn_hash in worker.functions else task.fn_body
                try:
                    result_file = self._result_file(task.task_id) if self._result_file else None
                    worker.connection.send((task.task_id, task.fn_hash, body, task.args, result_file))
                except OSError:  # the worker just died; its sentinel will say so
                    self._pending.appendleft(task)
                    continue
                worker.functions.add(task.fn_hash)
                worker.task = task
                self._on_started(task.task_id)

    def _collect(self, worker: _Worker) -> None:
        try:
            task_id, fields = worker.connection.recv()
        except (EOFError, OSError):
            return  # died mid-reply: its sentinel is ready too
        outcome = Outcome(*fields)
        worker.task.release()
        worker.task = None
        if worker.cancel_outcome is None:
            self._on_done(task_id, outcome)
        else:
            self._on_done(task_id, worker.cancel_outcome)  # finished as the kill landed: the cancel wins

    def _replace(self, worker: _Worker) -> None:
        worker.process.join()
        worker.connection.close()
        if worker.task is not None:
            worker.task.release()
            outcome = worker.cancel_outcome or Outcome(
                FAILED, code=ErrorCode.WORKER_LOST,
                message=f"the worker process running this task {_describe(worker.process.exitcode)}")
            self._on_done(worker.task.task_id, outcome)
        self._workers.remove(worker)  # replaced at the top of the loop


def _ready(waitables: list[Any], timeout: float | None) -> list[Any]:
    """Which of ``waitables`` (descriptors, or objects with ``fileno()``) are readable or hung up."""
    poller = select.poll()
    by_fd = {}
    for waitable in waitables:
        fd = waitable if isinstance(waitable, int) else waitable.fileno()
        by_fd[fd] = waitable
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(None if timeout is None else timeout * 1000)]


def _kill_tree(process: Any) -> None:
    """SIGKILL a worker and every process under it, so a stopped task leaves nothing running.

    A worker is a child subreaper (``mep.endpoint.bootstrap``): what its task
    started, ``setsid`` or not, is below it. Each process is stopped before its
    children are read, so none can fork behind our back; the worker is ours
    and not yet reaped (checked first), so its pid is still it.
    """
    if process.exitcode is not None:
        return  # exited and reaped: nothing of it to stop, and its pid may be another's now
    stopped: list[int] = []
    pending = [process.pid]
    while pending:
        pid = pending.pop()
        try:
            os.kill(pid, signal.SIGSTOP)
        except OSError:
            continue  # gone already
        stopped.append(pid)
        pending += _children_of(pid)
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _children_of(pid: int) -> list[int]:
    children: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/children") as handle:
                children += [int(child) for child in handle.read().split()]
        except OSError:
            continue
    return children


def _describe(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
    return f"exited with status {exitcode}"
