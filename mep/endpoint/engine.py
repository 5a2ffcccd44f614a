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
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import MappingProxyType
from dataclasses import dataclass, field
from typing import Any, Protocol

from mep.endpoint.bootstrap import RUN, SKIP
from mep.endpoint.forker import Forker
from mep.endpoint.large_args import ArgumentFile, remove_argument_file
from mep.endpoint.worker import Outcome
from mep.errors import ErrorCode
from mep.protocol.messages import CANCELLED, FAILED, SUCCESS

log = logging.getLogger(__name__)

Started = Callable[[str], None]
Completion = Callable[[str, Outcome], None]
EMPTY: Mapping[str, int] = MappingProxyType({})  # no resource_specification
ResultFileFor = Callable[[str], tuple[str, int]]  # task id -> (its result file's path, the large-result threshold)


class Connection(Protocol):
    """A worker's end: ``multiprocessing.connection.Connection`` or ``mep.endpoint.channel.Channel``."""

    def fileno(self) -> int: ...
    def send(self, value: object) -> None: ...
    def recv(self) -> Any: ...
    def poll(self, timeout: float = 0.0) -> bool: ...
    def close(self) -> None: ...


WorkerStarter = Callable[[], tuple[Any, Connection]]
"""Starts one worker: (a process with ``pid``, ``sentinel``, ``is_alive``, ``join``, ``exitcode``; its connection)."""

WORKER_RETRY_SECONDS = 1.0  # after a worker could not be started
TASKS_PER_WORKER = 2  # sent to a worker at once: the one it runs and the next, so it never waits for us between them
# A task queued behind one that has run this long while another worker is idle is taken back and run there.
TAKE_BACK_AFTER = 0.005
# What a worker is killed "for" when the task it had just started was cancelled (and reported) already.
CANCELLED_BEFORE = Outcome(CANCELLED, code=ErrorCode.CANCELLED, message="cancelled before it started")


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
    # Sent to the worker, in its order; the first one is running (the bootstrap's serve says why we know).
    tasks: deque[_Task] = field(default_factory=deque)
    head_since: float = 0.0  # monotonic: when the first one started
    killing: tuple[str, Outcome] | None = None  # the worker is being killed to stop this task, ending so
    moving: set[str] = field(default_factory=set)  # queued tasks asked back (SKIP) to run on an idle worker
    # Queued tasks cancelled (and reported so) before they started: asked back, whatever the worker answers.
    cancelled: set[str] = field(default_factory=set)
    connected: bool = True  # False once its connection hung up (its sentinel follows)


class ProcessEngine:
    """Worker processes on this host, each sent up to ``TASKS_PER_WORKER`` tasks at once.

    Workers are forked by ``mep.endpoint.forker``'s clean process, so they
    never inherit a ZeroMQ context or the endpoint's keys; they are started on
    the engine's thread, so the endpoint is ready before they are. A running
    task is cancelled (or stopped at its walltime) by killing its worker,
    which is replaced at once; a queued one is asked back. A worker that dies
    by itself fails its running task with the cause and is replaced too; what
    was queued behind that task runs on another worker.
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
        self._lock = threading.Lock()  # guards what the endpoint's thread hands over: submitted, cancels, stopping
        self._submitted: list[_Task] = []
        self._cancels: dict[str, Outcome] = {}
        self._pending: deque[_Task] = deque()  # the engine thread's own from here on, as everything below
        self._stopping = False
        self._woken = False  # a wake-up is on its way: submits until the engine takes them need no other
        self._wake_read, self._wake_write = os.pipe()
        self._workers: list[_Worker] = []
        self._poller = select.poll()
        self._poller.register(self._wake_read, select.POLLIN)
        self._by_fd: dict[int, _Worker] = {}  # connection and sentinel descriptors -> their worker
        self._thread = threading.Thread(target=self._loop, name="process-engine", daemon=True)
        self._thread.start()

    # --- called from the endpoint's thread ----------------------------------------

    def submit(self, task_id: str, fn_hash: str, fn_body: bytes, args: bytes | ArgumentFile,
               resources: Mapping[str, int] = EMPTY) -> None:
        """``resources`` is always empty here: the config admits no task_resources for this engine."""
        with self._lock:
            self._submitted.append(_Task(task_id, fn_hash, fn_body, args))
            self._wake_locked()

    def cancel(self, task_id: str, outcome: Outcome) -> None:
        """Stop a task wherever it is; it completes with ``outcome`` (unless it finished first)."""
        with self._lock:
            self._cancels[task_id] = outcome
            self._wake_locked()

    def shutdown(self) -> None:
        """Stop at once: workers are killed; tasks not yet reported are simply not reported."""
        with self._lock:
            self._stopping = True
            self._wake_locked()
        self._thread.join()
        for worker in self._workers:
            _kill_tree(worker.process)
            worker.process.join()
            worker.connection.close()
            for task in worker.tasks:
                task.release()
        for task in [*self._pending, *self._submitted]:
            task.release()
        if self._forker is not None:
            self._forker.shutdown()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _wake_locked(self) -> None:
        if not self._woken:
            self._woken = True
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
            worker = _Worker(process=process, connection=connection)
            self._workers.append(worker)
            for fd in (connection.fileno(), process.sentinel):
                self._by_fd[fd] = worker
                self._poller.register(fd, select.POLLIN)
        return True

    def _loop(self) -> None:
        while True:
            complete = self._start_workers()
            with self._lock:
                if self._stopping:
                    return
                self._woken = False
                self._pending.extend(self._submitted)
                self._submitted.clear()
                cancels, self._cancels = self._cancels, {}
            self._apply_cancels(cancels)
            self._assign()
            timeout = self._take_back_if_due(time.monotonic())
            if not complete:
                timeout = WORKER_RETRY_SECONDS if timeout is None else min(timeout, WORKER_RETRY_SECONDS)
            ready = self._poller.poll(None if timeout is None else timeout * 1000 + 1)
            for fd, _ in ready:
                if fd == self._wake_read:
                    os.read(self._wake_read, 65536)
                    continue
                worker = self._by_fd.get(fd)
                if worker is None:
                    continue  # replaced earlier in this turn
                if fd == worker.process.sentinel:
                    self._replace(worker)
                elif worker.connected:
                    self._collect(worker)

    def _apply_cancels(self, cancels: dict[str, Outcome]) -> None:
        for task_id, outcome in cancels.items():
            queued = next((task for task in self._pending if task.task_id == task_id), None)
            if queued is not None:
                self._pending.remove(queued)
                queued.release()
                self._on_done(task_id, outcome)
                continue
            for worker in self._workers:
                if worker.tasks and worker.tasks[0].task_id == task_id:
                    self._kill_for(worker, outcome)
                elif any(task.task_id == task_id for task in worker.tasks) and task_id not in worker.cancelled:
                    worker.cancelled.add(task_id)
                    self._on_done(task_id, outcome)  # it never starts: if it has, it is stopped (_head_started)
                    self._ask_back(worker, task_id)

    def _kill_for(self, worker: _Worker, outcome: Outcome) -> None:
        """Stop the worker's running task: its sentinel reports the kill, the task ends with ``outcome``."""
        if worker.killing is None:
            worker.killing = (worker.tasks[0].task_id, outcome)
            _kill_tree(worker.process)

    def _ask_back(self, worker: _Worker, task_id: str) -> None:
        """SKIP: the worker gives a queued task back (a reply with no fields) unless it has started it already."""
        try:
            worker.connection.send([(SKIP, task_id)])
        except OSError:
            pass  # the worker just died; its sentinel will say so

    def _assign(self) -> None:
        """Give pending tasks to the workers with the fewest, each up to TASKS_PER_WORKER, one message each."""
        batches: dict[int, list[_Task]] = {}
        for load in range(TASKS_PER_WORKER):
            for index, worker in enumerate(self._workers):
                if not self._pending:
                    break
                if len(worker.tasks) + len(batches.get(index, ())) == load and worker.connected \
                        and worker.killing is None:
                    batches.setdefault(index, []).append(self._pending.popleft())
        for index, batch in batches.items():
            self._send(self._workers[index], batch)

    def _send(self, worker: _Worker, batch: list[_Task]) -> None:
        items = []
        for task in batch:
            body = None if task.fn_hash in worker.functions else task.fn_body
            result_file = self._result_file(task.task_id) if self._result_file else None
            items.append((RUN, task.task_id, task.fn_hash, body, task.args, result_file))
        try:
            worker.connection.send(items)
        except OSError:  # the worker just died; its sentinel will say so
            self._pending.extendleft(reversed(batch))
            return
        idle = not worker.tasks
        worker.tasks.extend(batch)
        if idle:
            self._head_started(worker)

    def _head_started(self, worker: _Worker) -> None:
        """The worker's first task is running now (or is about to: nothing of ours is ahead of it)."""
        task = worker.tasks[0]
        worker.head_since = time.monotonic()
        if task.task_id in worker.cancelled:
            # Asked back too late: had the SKIP reached the worker first, its reply would have come with the one
            # that said the task before this one was done.
            self._kill_for(worker, CANCELLED_BEFORE)
            return
        self._on_started(task.task_id)

    def _take_back_if_due(self, now: float) -> float | None:
        """Move a task queued behind a long one to an idle worker; seconds until that is next due, or None."""
        if self._pending or not any(not worker.tasks and worker.connected for worker in self._workers):
            return None
        due: float | None = None
        for worker in self._workers:
            waiting = [task.task_id for task in list(worker.tasks)[1:]
                       if task.task_id not in worker.moving and task.task_id not in worker.cancelled]
            if not waiting or worker.killing is not None:
                continue
            wait = worker.head_since + TAKE_BACK_AFTER - now
            if wait <= 0:
                worker.moving.add(waiting[-1])
                self._ask_back(worker, waiting[-1])
            else:
                due = wait if due is None else min(due, wait)
        return due

    def _collect(self, worker: _Worker) -> None:
        """Every reply the worker has sent: results, and tasks it gave back."""
        try:
            while True:
                self._replies(worker, worker.connection.recv())
                if not worker.connection.poll(0):
                    break
        except (EOFError, OSError):  # died, perhaps mid-reply: its sentinel is ready too
            self._disconnected(worker)
        self._assign()

    def _disconnected(self, worker: _Worker) -> None:
        worker.connected = False
        self._poller.unregister(worker.connection.fileno())

    def _replies(self, worker: _Worker, replies: list[tuple[str, tuple | None]], alive: bool = True) -> None:
        head = worker.tasks[0] if worker.tasks else None
        for task_id, fields in replies:
            task = next(task for task in worker.tasks if task.task_id == task_id)
            worker.tasks.remove(task)
            worker.moving.discard(task_id)
            if fields is None and task_id not in worker.cancelled:
                self._pending.appendleft(task)  # given back, never ran: another worker runs it
                continue
            task.release()
            if task_id in worker.cancelled:
                worker.cancelled.discard(task_id)  # reported when it was cancelled
            elif worker.killing is not None and worker.killing[0] == task_id:
                self._on_done(task_id, worker.killing[1])  # finished as the kill landed: the cancel wins
            else:
                self._on_done(task_id, Outcome(*fields))
            if fields is not None and fields[0] == SUCCESS:
                # Loaded there now (not before: a task given back, or one whose function failed to load, did not).
                worker.functions.add(task.fn_hash)
        if alive and worker.killing is None and worker.tasks and worker.tasks[0] is not head:
            self._head_started(worker)

    def _replace(self, worker: _Worker) -> None:
        """The worker exited: what it finished stands, its running task fails with why, the rest runs elsewhere."""
        descriptors = (worker.connection.fileno(), worker.process.sentinel)  # join closes the sentinel
        if worker.connected:
            try:  # what it sent before it exited is all there to read now
                while worker.connection.poll(0):
                    self._replies(worker, worker.connection.recv(), alive=False)
            except (EOFError, OSError):
                pass
            self._disconnected(worker)
        worker.process.join()
        if worker.tasks:
            running = worker.tasks.popleft()
            running.release()
            if running.task_id not in worker.cancelled:
                self._on_done(running.task_id, self._lost(worker, running))
        for task in reversed(worker.tasks):  # never started
            if task.task_id in worker.cancelled:
                task.release()
            else:
                self._pending.appendleft(task)
        for fd in descriptors:
            del self._by_fd[fd]
        self._poller.unregister(descriptors[1])
        worker.connection.close()
        self._workers.remove(worker)  # replaced at the top of the loop
        self._assign()

    def _lost(self, worker: _Worker, running: _Task) -> Outcome:
        """The outcome of the task a worker was running when it exited."""
        if worker.killing is None:
            return Outcome(
                FAILED, code=ErrorCode.WORKER_LOST,
                message=f"the worker process running this task {_describe(worker.process.exitcode)}")
        stopped_for, outcome = worker.killing
        if stopped_for == running.task_id:
            return outcome
        # The task the worker was killed to stop finished just before the kill, and this one had begun after it.
        return Outcome(FAILED, code=ErrorCode.WORKER_LOST,
                       message=f"the worker process running this task was killed to stop task {stopped_for} "
                               "(cancelled, or past its walltime), which finished just before the kill landed, "
                               "after this task had started; submit this task again")


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
