"""``Executor``: submit Python functions to a mep endpoint and get ``concurrent.futures`` back.

One background thread per Executor owns the ZeroMQ socket (sockets are not
thread-safe; ``submit`` may be called from any thread). ``submit`` only
serialises and queues; the thread batches queued tasks adaptively (at most
one SUBMIT in flight: when it is acknowledged, everything queued meanwhile
goes in the next one), resends a batch the service has not acknowledged in
time (task ids make that idempotent), polls for results when the service has
been quiet (a restarted service no longer knows where to push them), and
turns results into future outcomes. ``Future.cancel()`` reaches the service,
the manager and the endpoint.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq

from mep.errors import MepError, PayloadTooLargeError, TaskCancelledError, error_for_code
from mep.protocol import decode, encode
from mep.protocol.framing import DEFAULT_MAX_PAYLOAD_BYTES
from mep.protocol.messages import (
    CANCELLED,
    MAX_IDS_PER_REQUEST,
    Cancel,
    CancelAck,
    Error,
    Fetch,
    Result,
    Results,
    ResultsAck,
    Submit,
    SubmitAck,
    TaskRef,
)
from mep.protocol.receive import handling
from mep.protocol.user_config import check_config
from mep.sdk.connection import ServiceSettings
from mep.sdk.results import outcome
from mep.sdk.serialize import client_runtime, function_hash, serialize_args, serialize_function

log = logging.getLogger(__name__)


class TaskFuture(concurrent.futures.Future):
    """A ``Future`` that knows its task id and tells mep when it is cancelled."""

    def __init__(self, task_id: str, on_cancel: Callable[[str], None]) -> None:
        super().__init__()
        self.task_id = task_id
        self._on_cancel = on_cancel

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            self._on_cancel(self.task_id)
        return cancelled


@dataclass
class _Pending:
    task_id: str
    future: TaskFuture
    fn_hash: str = ""
    fn_body: bytes = b""
    args: bytes = b""
    walltime: float = 0.0


@dataclass
class _InFlightSubmit:
    tasks: list[_Pending]
    sent_at: float


@dataclass
class _State:
    """Owned by the background thread alone."""

    queued: list[_Pending] = field(default_factory=list)
    in_flight: dict[int, _InFlightSubmit] = field(default_factory=dict)
    awaiting_result: dict[str, _Pending] = field(default_factory=dict)
    to_cancel: list[str] = field(default_factory=list)
    functions_stored: set[str] = field(default_factory=set)


class Executor(concurrent.futures.Executor):
    """Run functions on a mep endpoint as your own account there.

    ``service`` is the service's address (``tcp://host:port``), ``service_key``
    its pinned CURVE public key and ``token`` your mep token; each falls back to
    ``MEP_SERVICE``, ``MEP_SERVICE_KEY`` and ``MEP_TOKEN``.
    ``user_endpoint_config`` is checked against the admin's schema on the
    endpoint. ``walltime`` (seconds, ``None`` for no limit) applies to tasks
    submitted while it is set; change the attribute between submissions to
    give tasks different limits. Leaving a ``with`` block waits until the
    service has durably accepted every submission; futures still resolve
    afterwards.
    """

    def __init__(
        self,
        endpoint_id: str,
        *,
        service: str | None = None,
        token: str | None = None,
        service_key: str | None = None,
        user_endpoint_config: dict[str, Any] | None = None,
        walltime: float | None = None,
        batch_size: int = 1000,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        resend_after: float = 10.0,
        poll_interval: float = 5.0,
    ) -> None:
        self.endpoint_id = endpoint_id
        self._settings = ServiceSettings.resolve(service, service_key, token)
        self.user_endpoint_config = dict(user_endpoint_config or {})
        self.walltime = walltime
        self._batch_size = min(batch_size, MAX_IDS_PER_REQUEST)  # the most tasks one SUBMIT may carry
        self._max_payload_bytes = max_payload_bytes
        self._resend_after = resend_after
        self._poll_interval = poll_interval
        self._runtime = client_runtime()
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        # not at interpreter exit: the (daemon) thread may still be polling these
        weakref.finalize(self, _close_all, self._wake_read, self._wake_write).atexit = False
        self._closing = threading.Event()
        self._all_acknowledged = threading.Condition()
        self._unacknowledged = 0
        self._failure: MepError | None = None
        self._thread = threading.Thread(target=self._run, name=f"mep-executor-{endpoint_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def service(self) -> str:
        return self._settings.address

    # --- public API ---------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        if self._closing.is_set():
            raise RuntimeError("cannot submit to an Executor that has been shut down")
        check_config(self.user_endpoint_config)  # here, not in the I/O thread: the caller sees what is wrong
        body = serialize_function(fn)
        pending = _Pending(task_id=str(uuid.uuid4()), future=self._future(), fn_hash=function_hash(body),
                           fn_body=body, args=serialize_args(args, kwargs), walltime=self._checked_walltime())
        pending.future.task_id = pending.task_id
        for what, size in (("function", len(body)), ("arguments", len(pending.args))):
            if size > self._max_payload_bytes:
                pending.future.set_exception(PayloadTooLargeError(
                    f"the serialised {what} are {size} bytes; the limit is {self._max_payload_bytes}. Pass large "
                    "data by reference (a path on the cluster) instead"))
                return pending.future
        with self._all_acknowledged:
            if self._failure is not None:
                pending.future.set_exception(self._failure)
                return pending.future
            self._unacknowledged += 1
        self._command("submit", pending)
        return pending.future

    def attach(self, task_ids: Iterable[str]) -> list[TaskFuture]:
        """Futures for tasks submitted earlier, perhaps by another process: they resolve as results arrive."""
        futures = []
        for task_id in task_ids:
            pending = _Pending(task_id=task_id, future=self._future())
            pending.future.task_id = task_id
            futures.append(pending.future)
            self._command("attach", pending)
        return futures

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; with ``wait``, return once the service has acknowledged everything."""
        self._closing.set()
        os.write(self._wake_write, b"c")
        if wait:
            with self._all_acknowledged:
                self._all_acknowledged.wait_for(lambda: self._unacknowledged == 0 or self._failure is not None)

    def _future(self) -> TaskFuture:
        return TaskFuture("", lambda task_id: self._command("cancel", task_id))

    def _checked_walltime(self) -> float:
        if self.walltime is None:
            return 0.0
        if not 0 < self.walltime < float("inf"):
            raise ValueError(f"walltime must be a positive number of seconds or None, not {self.walltime!r}")
        return float(self.walltime)

    def _command(self, kind: str, value: Any) -> None:
        self._commands.put((kind, value))
        os.write(self._wake_write, b"w")

    # --- background thread ------------------------------------------------------------

    def _run(self) -> None:
        context = zmq.Context()
        socket, monitor = self._settings.connect(context)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        state = _State()
        request_ids = itertools.count(1)
        last_heard = time.monotonic()
        try:
            while not (self._closing.is_set() and self._commands.empty() and not state.queued
                       and not state.in_flight and not state.awaiting_result):
                ready = dict(poller.poll(200))
                if self._wake_read in ready:
                    os.read(self._wake_read, 65536)
                if monitor in ready:
                    self._fail_everything(state, self._settings.handshake_error())
                    return
                self._take_commands(state)
                while socket in ready or socket.poll(0):
                    ready.pop(socket, None)
                    self._receive(socket, socket.recv_multipart(), state)
                    last_heard = time.monotonic()
                now = time.monotonic()
                for task_ids in _chunks(state.to_cancel):
                    socket.send_multipart(encode(Cancel(token=self._settings.token, request_id=next(request_ids),
                                                        task_ids=task_ids)))
                state.to_cancel = []
                if not state.in_flight and state.queued:
                    batch, state.queued = state.queued[:self._batch_size], state.queued[self._batch_size:]
                    request_id = next(request_ids)
                    state.in_flight[request_id] = _InFlightSubmit(tasks=batch, sent_at=now)
                    self._send_submit(socket, request_id, batch, state)
                for request_id, flight in state.in_flight.items():
                    if now - flight.sent_at > self._resend_after:
                        log.info("service has not acknowledged submission %d; sending it again", request_id)
                        flight.sent_at = now
                        self._send_submit(socket, request_id, flight.tasks, state, include_all_functions=True)
                if state.awaiting_result and now - last_heard > self._poll_interval:
                    for task_ids in _chunks(list(state.awaiting_result)):
                        socket.send_multipart(encode(Fetch(token=self._settings.token, request_id=next(request_ids),
                                                           task_ids=task_ids)))
                    last_heard = now
        except Exception as exc:  # the thread must never die silently: fail every future with the reason
            log.exception("mep executor thread failed")
            self._fail_everything(state, MepError(f"the mep client stopped: {exc}"))
        finally:
            socket.disable_monitor()
            monitor.close(linger=0)
            socket.close(linger=0)
            context.term()

    def _take_commands(self, state: _State) -> None:
        while True:
            try:
                kind, value = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                state.queued.append(value)
            elif kind == "attach":
                state.awaiting_result[value.task_id] = value
            else:  # cancel: a queued task never leaves; anything else is cancelled at the service
                queued = [p for p in state.queued if p.task_id == value]
                if queued:
                    state.queued.remove(queued[0])
                    self._count_acknowledged(1)
                else:
                    state.to_cancel.append(value)

    def _send_submit(self, socket: zmq.Socket, request_id: int, batch: list[_Pending], state: _State,
                     include_all_functions: bool = False) -> None:
        tasks: list[TaskRef] = []
        payloads: list[bytes] = []
        included: set[str] = set()
        for pending in batch:
            ref = TaskRef(task_id=pending.task_id, fn_hash=pending.fn_hash, args_frame=len(payloads),
                          walltime=pending.walltime)
            payloads.append(pending.args)
            if pending.fn_hash not in included and (include_all_functions or pending.fn_hash not in state.functions_stored):
                ref.fn_frame = len(payloads)
                payloads.append(pending.fn_body)
                included.add(pending.fn_hash)
            tasks.append(ref)
        header = Submit(token=self._settings.token, request_id=request_id, endpoint_id=self.endpoint_id,
                        user_endpoint_config=self.user_endpoint_config, runtime=self._runtime, tasks=tasks)
        socket.send_multipart(encode(header, payloads), copy=False)

    def _receive(self, socket: zmq.Socket, frames: list[bytes], state: _State) -> None:
        with handling(log, "the service", "a message"):  # logged: a bad message must not stop this thread
            self._handle(socket, *decode(frames), state)

    def _handle(self, socket: zmq.Socket, header: Any, payloads: list[bytes], state: _State) -> None:
        match header:
            case SubmitAck():
                self._acknowledged(header, state)
            case Results():
                for result in header.results:
                    self._resolve(result, payloads, state)
                for task_id in header.unknown:
                    pending = state.awaiting_result.pop(task_id, None)
                    if pending:
                        _set_exception(pending.future, MepError(f"the service knows no task {task_id} of yours"))
                if header.results:
                    socket.send_multipart(encode(ResultsAck(token=self._settings.token,
                                                            task_ids=[r.task_id for r in header.results])))
            case CancelAck():
                for task_id in header.cancelled:
                    pending = state.awaiting_result.pop(task_id, None)
                    if pending:
                        pending.future.cancel()
            case Error():
                error = error_for_code(header.code, header.message)
                flight = state.in_flight.pop(header.request_id, None)
                if flight is not None:
                    for pending in flight.tasks:
                        _set_exception(pending.future, error)
                    self._count_acknowledged(len(flight.tasks))
                elif header.code == "unauthenticated" or header.request_id == 0:
                    # refused before the service could read which request it was: nothing we send will do
                    self._fail_everything(state, error)
                else:
                    log.warning("service error: %s", header.message)
            case _:
                log.warning("ignoring an unexpected %s message from the service", type(header).__name__)

    def _acknowledged(self, ack: SubmitAck, state: _State) -> None:
        flight = state.in_flight.pop(ack.request_id, None)
        if flight is None:
            return  # a duplicate ack for a batch we already resent and saw acknowledged
        by_id = {pending.task_id: pending for pending in flight.tasks}
        for task_id in ack.accepted:
            pending = by_id.pop(task_id)
            state.functions_stored.add(pending.fn_hash)
            pending.fn_body = pending.args = b""
            state.awaiting_result[task_id] = pending
            if pending.future.cancelled():  # cancelled while the submission was in flight
                state.to_cancel.append(task_id)
        for rejection in ack.rejected:
            pending = by_id.pop(rejection.task_id)
            _set_exception(pending.future, error_for_code(rejection.code, rejection.message))
        self._count_acknowledged(len(flight.tasks))

    def _resolve(self, result: Result, payloads: list[bytes], state: _State) -> None:
        pending = state.awaiting_result.pop(result.task_id, None)
        if pending is None or pending.future.done():
            return  # already resolved (a pushed and a fetched copy crossed), or cancelled here
        if result.status == CANCELLED:
            if not pending.future.cancel():
                _set_exception(pending.future, TaskCancelledError(result.message))
            return
        value, error = outcome(result, payloads[result.payload_frame] if result.payload_frame != -1 else None)
        if error is None:
            pending.future.set_result(value)
        else:
            _set_exception(pending.future, error)

    def _count_acknowledged(self, count: int) -> None:
        with self._all_acknowledged:
            self._unacknowledged -= count
            self._all_acknowledged.notify_all()

    def _fail_everything(self, state: _State, error: MepError) -> None:
        with self._all_acknowledged:
            self._failure = error  # submit() fails new futures at once from now on
        self._take_commands(state)
        for flight in state.in_flight.values():
            state.queued.extend(flight.tasks)
        for pending in [*state.queued, *state.awaiting_result.values()]:
            _set_exception(pending.future, error)
        state.queued.clear()
        state.in_flight.clear()
        state.awaiting_result.clear()
        with self._all_acknowledged:
            self._unacknowledged = 0
            self._all_acknowledged.notify_all()


def _chunks(task_ids: list[str]) -> Iterable[list[str]]:
    """Ids in pieces the service takes in one request."""
    for start in range(0, len(task_ids), MAX_IDS_PER_REQUEST):
        yield task_ids[start:start + MAX_IDS_PER_REQUEST]


def _set_exception(future: concurrent.futures.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)
