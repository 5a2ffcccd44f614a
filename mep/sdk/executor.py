"""``Executor``: submit Python functions to a mep endpoint and get ``concurrent.futures`` back.

One background thread per Executor owns the ZeroMQ socket (sockets are not
thread-safe; ``submit`` may be called from any thread). ``submit`` only
serialises and queues; the thread batches queued tasks adaptively (at most
one SUBMIT in flight: when it is acknowledged, everything queued meanwhile
goes in the next one), resends a batch the service has not acknowledged in
time (task ids make that idempotent), and turns pushed or fetched results
into future outcomes.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from mep.errors import AuthenticationError, ConfigurationError, MepError, PayloadTooLargeError, RemoteError, error_for_code
from mep.protocol import decode, encode
from mep.protocol.framing import DEFAULT_MAX_PAYLOAD_BYTES
from mep.protocol.curve import check_public_key, generate_keypair, make_curve_client
from mep.protocol.messages import FAILED, SUCCESS, Error, Fetch, Result, Results, ResultsAck, Submit, SubmitAck, TaskRef
from mep.sdk.serialize import client_runtime, deserialize, function_hash, serialize_args, serialize_function

log = logging.getLogger(__name__)

HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@dataclass
class _Pending:
    task_id: str
    future: concurrent.futures.Future
    fn_hash: str
    fn_body: bytes
    args: bytes


@dataclass
class _InFlightSubmit:
    tasks: list[_Pending]
    sent_at: float
    attempts: int = 1


@dataclass
class _State:
    queued: list[_Pending] = field(default_factory=list)
    in_flight: dict[int, _InFlightSubmit] = field(default_factory=dict)
    awaiting_result: dict[str, _Pending] = field(default_factory=dict)
    functions_stored: set[str] = field(default_factory=set)


class Executor(concurrent.futures.Executor):
    """Run functions on a mep endpoint as your own account there.

    ``service`` is the service's address (``tcp://host:port``), ``service_key``
    its pinned CURVE public key and ``token`` your mep token; each falls back to
    ``MEP_SERVICE``, ``MEP_SERVICE_KEY`` and ``MEP_TOKEN``.
    ``user_endpoint_config`` is checked against the admin's schema on the
    endpoint. Leaving a ``with`` block waits until the service has durably
    accepted every submission; futures still resolve afterwards.
    """

    def __init__(
        self,
        endpoint_id: str,
        *,
        service: str | None = None,
        token: str | None = None,
        service_key: str | None = None,
        user_endpoint_config: dict[str, Any] | None = None,
        batch_size: int = 1000,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        resend_after: float = 10.0,
        poll_interval: float = 5.0,
    ) -> None:
        self.endpoint_id = endpoint_id
        self.service = service or os.environ.get("MEP_SERVICE") or _missing("service", "MEP_SERVICE")
        self._token = token or os.environ.get("MEP_TOKEN") or _missing("token", "MEP_TOKEN")
        key = service_key or os.environ.get("MEP_SERVICE_KEY") or _missing("service_key", "MEP_SERVICE_KEY")
        self.service_key = check_public_key(key, "service_key")
        self.user_endpoint_config = dict(user_endpoint_config or {})
        self._batch_size = batch_size
        self._max_payload_bytes = max_payload_bytes
        self._resend_after = resend_after
        self._poll_interval = poll_interval
        self._runtime = client_runtime()
        self._submissions: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        weakref.finalize(self, _close_all, self._wake_read, self._wake_write)
        self._closing = threading.Event()
        self._all_acknowledged = threading.Condition()
        self._unacknowledged = 0
        self._failure: MepError | None = None
        self._thread = threading.Thread(target=self._run, name=f"mep-executor-{endpoint_id[:8]}", daemon=True)
        self._thread.start()

    # --- public API ---------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        if self._closing.is_set():
            raise RuntimeError("cannot submit to an Executor that has been shut down")
        body = serialize_function(fn)
        future: concurrent.futures.Future = concurrent.futures.Future()
        pending = _Pending(task_id=str(uuid.uuid4()), future=future, fn_hash=function_hash(body),
                           fn_body=body, args=serialize_args(args, kwargs))
        future.task_id = pending.task_id  # type: ignore[attr-defined]
        for what, size in (("function", len(body)), ("arguments", len(pending.args))):
            if size > self._max_payload_bytes:
                future.set_exception(PayloadTooLargeError(
                    f"the serialised {what} are {size} bytes; the limit is {self._max_payload_bytes}. Pass large "
                    "data by reference (a path on the cluster) instead"))
                return future
        with self._all_acknowledged:
            if self._failure is not None:
                future.set_exception(self._failure)
                return future
            self._unacknowledged += 1
        self._submissions.put(pending)
        os.write(self._wake_write, b"s")
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; with ``wait``, return once the service has acknowledged everything."""
        self._closing.set()
        os.write(self._wake_write, b"c")
        if wait:
            with self._all_acknowledged:
                self._all_acknowledged.wait_for(lambda: self._unacknowledged == 0 or self._failure is not None)

    # --- background thread ------------------------------------------------------------

    def _run(self) -> None:
        context = zmq.Context()
        socket = context.socket(zmq.DEALER)
        socket.linger = 0
        _, secret = generate_keypair()
        make_curve_client(socket, self.service_key, secret)
        monitor = socket.get_monitor_socket(HANDSHAKE_FAILED)
        socket.connect(self.service)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        state = _State()
        request_ids = itertools.count(1)
        last_heard = time.monotonic()
        try:
            while not (self._closing.is_set() and not state.queued and not state.in_flight
                       and not state.awaiting_result and self._submissions.empty()):
                ready = dict(poller.poll(200))
                if self._wake_read in ready:
                    os.read(self._wake_read, 65536)
                if monitor in ready:
                    monitor.recv_multipart()
                    self._fail_everything(state, AuthenticationError(
                        f"could not open an encrypted session with the service at {self.service}: the "
                        "service key pinned here does not match the service's (check service_key / "
                        "MEP_SERVICE_KEY against 'mep service key')"))
                    return
                while True:
                    try:
                        state.queued.append(self._submissions.get_nowait())
                    except queue.Empty:
                        break
                while socket in ready or socket.poll(0):
                    ready.pop(socket, None)
                    self._receive(socket, socket.recv_multipart(), state)
                    last_heard = time.monotonic()
                now = time.monotonic()
                if not state.in_flight and state.queued:
                    batch, state.queued = state.queued[:self._batch_size], state.queued[self._batch_size:]
                    request_id = next(request_ids)
                    state.in_flight[request_id] = _InFlightSubmit(tasks=batch, sent_at=now)
                    self._send_submit(socket, request_id, batch, state)
                for request_id, flight in state.in_flight.items():
                    if now - flight.sent_at > self._resend_after:
                        log.info("service has not acknowledged submission %d; sending it again", request_id)
                        flight.sent_at, flight.attempts = now, flight.attempts + 1
                        self._send_submit(socket, request_id, flight.tasks, state, include_all_functions=True)
                if state.awaiting_result and now - last_heard > self._poll_interval:
                    socket.send_multipart(encode(Fetch(token=self._token, request_id=next(request_ids),
                                                       task_ids=list(state.awaiting_result))))
                    last_heard = now
        except Exception as exc:  # the thread must never die silently: fail every future with the reason
            log.exception("mep executor thread failed")
            self._fail_everything(state, MepError(f"the mep client stopped: {exc}"))
        finally:
            socket.disable_monitor()
            monitor.close(linger=0)
            socket.close(linger=0)
            context.term()

    def _send_submit(self, socket: zmq.Socket, request_id: int, batch: list[_Pending], state: _State,
                     include_all_functions: bool = False) -> None:
        tasks: list[TaskRef] = []
        payloads: list[bytes] = []
        included: set[str] = set()
        for pending in batch:
            ref = TaskRef(task_id=pending.task_id, fn_hash=pending.fn_hash, args_frame=len(payloads))
            payloads.append(pending.args)
            if pending.fn_hash not in included and (include_all_functions or pending.fn_hash not in state.functions_stored):
                ref.fn_frame = len(payloads)
                payloads.append(pending.fn_body)
                included.add(pending.fn_hash)
            tasks.append(ref)
        header = Submit(token=self._token, request_id=request_id, endpoint_id=self.endpoint_id,
                        user_endpoint_config=self.user_endpoint_config, runtime=self._runtime, tasks=tasks)
        socket.send_multipart(encode(header, payloads), copy=False)

    def _receive(self, socket: zmq.Socket, frames: list[bytes], state: _State) -> None:
        try:
            header, payloads = decode(frames)
        except MepError as exc:
            log.warning("ignoring a malformed message from the service: %s", exc)
            return
        match header:
            case SubmitAck():
                self._acknowledged(header, state)
            case Results():
                done = [result.task_id for result in header.results if self._resolve(result, payloads, state)]
                for task_id in header.unknown:
                    pending = state.awaiting_result.pop(task_id, None)
                    if pending:
                        pending.future.set_exception(MepError(f"the service does not know task {task_id}"))
                if done:
                    socket.send_multipart(encode(ResultsAck(token=self._token, task_ids=done)))
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
            if not pending.future.done():
                state.awaiting_result[task_id] = pending
        for rejection in ack.rejected:
            pending = by_id.pop(rejection.task_id)
            _set_exception(pending.future, error_for_code(rejection.code, rejection.message))
        self._count_acknowledged(len(flight.tasks))

    def _resolve(self, result: Result, payloads: list[bytes], state: _State) -> bool:
        pending = state.awaiting_result.pop(result.task_id, None)
        if pending is None:
            return True  # already resolved (a pushed result and a fetched one crossed): just acknowledge
        future = pending.future
        payload = payloads[result.payload_frame] if result.payload_frame != -1 else None
        if result.status == SUCCESS:
            try:
                future.set_result(deserialize(payload))
            except Exception as exc:
                _set_exception(future, RemoteError(type(exc).__name__,
                                                   f"the result could not be loaded here: {exc}", ""))
        elif result.status == FAILED:
            _set_exception(future, error_for_code(result.code, result.message))
        else:
            _set_exception(future, _remote_exception(result, payload))
        return True

    def _count_acknowledged(self, count: int) -> None:
        with self._all_acknowledged:
            self._unacknowledged -= count
            self._all_acknowledged.notify_all()

    def _fail_everything(self, state: _State, error: MepError) -> None:
        with self._all_acknowledged:
            self._failure = error  # submit() fails new futures at once from now on
        while not self._submissions.empty():
            state.queued.append(self._submissions.get_nowait())
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


def _remote_exception(result: Result, payload: bytes | None) -> BaseException:
    """The function's own exception when this side can rebuild it, else a RemoteError."""
    try:
        exc = deserialize(payload)
        if not isinstance(exc, BaseException):
            raise TypeError("not an exception")
    except Exception:
        return RemoteError(result.error_type, result.message, result.traceback)
    exc.add_note(f"Remote traceback:\n{result.traceback}")
    return exc


def _set_exception(future: concurrent.futures.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _missing(argument: str, variable: str) -> str:
    raise ConfigurationError(f"Executor needs {argument}=... or the {variable} environment variable")
