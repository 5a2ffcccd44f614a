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

Nothing leaves a researcher guessing: a future's repr says what it waits for;
a service that has not answered for ``answer_timeout`` seconds fails the
futures concerned with ``ServiceUnreachableError`` saying what became of each
task (or, with ``keep_retrying``, is logged and retried without end); every
wait (``result()``, ``map``, leaving a ``with`` block) is made of short slices,
so Ctrl-C interrupts it at once. docs/user.md ("What the Executor does when things go wrong") has the details.
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
from typing import Any, BinaryIO

import msgspec
import zmq

from mep.errors import (
    AuthenticationError,
    MepError,
    PayloadTooLargeError,
    ServiceUnreachableError,
    TaskCancelledError,
    error_for_code,
)
from mep.protocol import decode, encode
from mep.protocol.framing import DEFAULT_MAX_PAYLOAD_BYTES
from mep.protocol.messages import (
    CANCELLED,
    MAX_IDS_PER_REQUEST,
    Cancel,
    CancelAck,
    Error,
    Fetch,
    LargeArgs,
    Result,
    Results,
    ResultsAck,
    Submit,
    SubmitAck,
    TaskList,
    TaskQuery,
    TaskRef,
)
from mep.protocol.receive import handling
from mep.protocol.user_config import check_config, check_config_size
from mep.sdk.connection import ServiceSettings
from mep.sdk.display import html_table
from mep.sdk.endpoint_info import OptionsCheck
from mep.sdk.large_args import UPLOAD_ABOVE, BackgroundUploads
from mep.sdk.large_results import BackgroundLoader, acknowledge, nothing
from mep.sdk.resources import task_resources
from mep.sdk.results import outcome
from mep.sdk.serialize import FunctionCache, client_runtime, serialize_args

log = logging.getLogger(__name__)

WAIT_SLICE = 0.1  # seconds: every wait is cut into these, so a signal's handler (Ctrl-C) runs between them

# what a task is waiting for, as its future's repr says
QUEUED_HERE = "queued in this process, not yet sent to the service"
SENT = "sent, waiting for the service to acknowledge it"
ACCEPTED = "accepted by the service, waiting for its result"
UPLOADING = "uploading its arguments to the service"
EMPTY_CONFIG = b"\x80"  # {} in the wire's msgpack
SILENCE_GRACE = 2.0  # seconds of silence beyond a poll interval before a future's repr mentions it

_functions = FunctionCache()  # shared by every Executor of the process: a function is pickled once


@dataclass
class _Link:
    """What the futures of one Executor may know about its connection (written by its I/O thread)."""

    address: str
    silent_since: float | None = None  # set when the service is overdue with an answer: since when it is silent


class TaskFuture(concurrent.futures.Future):
    """A ``Future`` that knows its task id, says what it waits for, and tells mep when it is cancelled."""

    def __init__(self, task_id: str, on_cancel: Callable[[str], None], link: _Link) -> None:
        super().__init__()
        self.task_id = task_id
        self._on_cancel = on_cancel
        self._link = link
        self._waiting_for = QUEUED_HERE
        self._service_reason = ""  # why the service says it waits (Client.get_task's waiting_reason)

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            self._on_cancel(self.task_id)
        return cancelled

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        return super().result(timeout=0)  # raises TimeoutError if still not done

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return super().exception(timeout=0)

    def _wait(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while not self.done():
                remaining = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - time.monotonic())
                if remaining <= 0:
                    return
                self._condition.wait(remaining)

    @property
    def waiting_for(self) -> str:
        """Why the task is not done yet, as far as this process knows ("" once it is done)."""
        if self.done():
            return ""
        silent_since = self._link.silent_since
        if silent_since is not None:
            return (f"{self._waiting_for}; no answer from the service at {self._link.address} for "
                    f"{time.monotonic() - silent_since:.0f} s, retrying")
        if self._waiting_for == ACCEPTED and self._service_reason:
            return f"{ACCEPTED}: {self._service_reason}"
        return self._waiting_for

    def __repr__(self) -> str:
        return f"<TaskFuture {self.task_id} {self._state_text()}>"

    def _repr_html_(self) -> str:
        return html_table("mep task", ("task id", "state"), [(self.task_id, self._state_text())])

    def _state_text(self) -> str:
        if self.cancelled():
            return "cancelled"
        if not self.done():
            return f"pending: {self.waiting_for}"
        error = super().exception(timeout=0)
        if error is None:
            return f"succeeded, returned {type(super().result(timeout=0)).__name__}"
        return f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


@dataclass
class _Pending:
    task_id: str
    future: TaskFuture
    fn_hash: str = ""
    fn_body: bytes = b""
    args: bytes = b""
    walltime: float = 0.0
    resources: dict[str, int] = field(default_factory=dict)  # resource_specification as taken at submit()
    config: bytes = EMPTY_CONFIG  # user_endpoint_config as taken at submit(), in the wire's msgpack
    large_args: LargeArgs | None = None  # the arguments, uploaded ahead (``args`` is then empty)


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
    to_acknowledge: list[str] = field(default_factory=list)  # results received in this pass, acknowledged at its end
    functions_stored: set[str] = field(default_factory=set)


class Executor(concurrent.futures.Executor):
    """Run functions on a mep endpoint as your own account there.

    ``service`` is the service's address (``tcp://host:port``), ``service_key``
    its pinned CURVE public key and ``token`` your mep token; each falls back to
    ``MEP_SERVICE``, ``MEP_SERVICE_KEY`` and ``MEP_TOKEN``.
    ``user_endpoint_config`` is checked against the admin's schema at
    ``submit`` (fetched once, as ``Client.endpoint_info`` shows it; raising the
    endpoint's own ``ConfigInvalidError``) and again on the endpoint. It,
    ``walltime`` (seconds, ``None`` for no limit) and
    ``resource_specification`` (Parsl's names: ``{"num_nodes": 1,
    "ranks_per_node": 2}``; a function's own, an ``MPIFunction``'s, overlays
    it) are read when a task is submitted: change the attributes between submissions to
    give tasks different configs or limits; a task keeps the ones it was
    submitted with, however long it waits to be sent. Leaving a ``with``
    block waits until the service has durably accepted every submission;
    futures still resolve afterwards. Leaving it by Ctrl-C does not wait:
    tasks not yet acknowledged are still sent while this process lives.

    ``answer_timeout``: when the service has not answered for that many
    seconds while tasks are outstanding, their futures fail with
    ``ServiceUnreachableError`` (whose message says whether the service had
    accepted the task: an accepted task still runs, and ``Client`` fetches
    its result later). With ``keep_retrying`` they don't fail: the silence is
    logged and shown in each future's repr, and the Executor retries until
    the service answers.

    ``read_results_locally``: a result above the endpoint's large-result
    threshold is read from its file when this process can read it (same host,
    shared file system); with False it is always fetched in chunks through the
    service (docs/user.md, "Large results").

    ``upload_args_above``: serialised arguments larger than this many bytes
    are uploaded to the service in chunks before their task is submitted
    (resumed if the service restarts meanwhile), and the endpoint fetches them
    before the task runs; ``max_payload_bytes`` then does not apply to them
    (docs/user.md, "Large arguments").
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
        resource_specification: dict[str, int] | None = None,
        batch_size: int = 1000,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        resend_after: float = 10.0,
        poll_interval: float = 5.0,
        answer_timeout: float = 60.0,
        keep_retrying: bool = False,
        read_results_locally: bool = True,
        upload_args_above: int = UPLOAD_ABOVE,
    ) -> None:
        self.endpoint_id = endpoint_id
        self._settings = ServiceSettings.resolve(service, service_key, token)
        self.user_endpoint_config = dict(user_endpoint_config or {})
        self._last_checked_config: bytes | None = None  # the frozen config the last full check passed
        self.walltime = walltime
        self.resource_specification = dict(resource_specification or {})
        self._batch_size = min(batch_size, MAX_IDS_PER_REQUEST)  # the most tasks one SUBMIT may carry
        self._max_payload_bytes = max_payload_bytes
        self._resend_after = resend_after
        self._poll_interval = poll_interval
        if not answer_timeout > poll_interval + SILENCE_GRACE:
            raise ValueError(f"answer_timeout ({answer_timeout} s) must exceed poll_interval ({poll_interval} s) "
                             f"by more than {SILENCE_GRACE} s: the service answers a poll, not silence")
        self._answer_timeout = answer_timeout
        self._keep_retrying = keep_retrying
        self._link = _Link(self._settings.address)
        self._large_results = BackgroundLoader(self._settings, read_results_locally, answer_timeout,
                                               lambda: self.submit(nothing).result())
        self._upload_args_above = upload_args_above
        self._uploads = BackgroundUploads(self._settings, resend_after, answer_timeout)
        self._runtime = client_runtime()
        self._options = OptionsCheck(self._settings, endpoint_id)  # the endpoint's schema, fetched once
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        # True while the I/O thread sleeps with no submission in flight: only then must a submit wake it (an
        # acknowledgement wakes it otherwise); one pipe write per batch, not one GIL hand-off per submit
        self._wake_for_submit = False
        self._wake_read, self._wake_write = os.pipe()
        # not at interpreter exit: the (daemon) thread may still be polling these
        weakref.finalize(self, _close_all, self._wake_read, self._wake_write).atexit = False
        self._closing = threading.Event()
        self._all_acknowledged = threading.Condition()
        self._unacknowledged = 0
        self._uploading = 0  # uploads in progress (their tasks are then queued: the I/O thread waits for them)
        self._failure: MepError | None = None
        self._state = _State()  # the I/O thread's; other threads only read its sizes (for repr)
        self._thread = threading.Thread(target=self._run, name=f"mep-executor-{endpoint_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def service(self) -> str:
        return self._settings.address

    def _counts(self) -> list[tuple[str, int]]:
        state = self._state
        return [("queued here", len(state.queued) + self._commands.qsize()),
                ("sent, not yet acknowledged", sum(len(flight.tasks) for flight in list(state.in_flight.values()))),
                ("accepted, waiting for results", len(state.awaiting_result))]

    def _status(self) -> str:
        if self._failure is not None:
            return f"failed: {self._failure}"
        if self._closing.is_set():
            return "shut down"
        return "open"

    def __repr__(self) -> str:
        counts = ", ".join(f"{count} {what}" for what, count in self._counts())
        return (f"<mep.Executor endpoint {self.endpoint_id} via {self.service}, {self._status()}: {counts}; "
                f"config {self.user_endpoint_config}>")

    def _repr_html_(self) -> str:
        rows = [("endpoint", self.endpoint_id), ("service", self.service), ("status", self._status()),
                ("user_endpoint_config", self.user_endpoint_config), ("walltime", self.walltime),
                ("resource_specification", self.resource_specification),
                *self._counts()]
        return html_table("mep.Executor", ("", ""), rows)

    # --- public API ---------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Queue ``fn(*args, **kwargs)``; raises ``SerializationError`` at once if either can't be pickled."""
        if self._closing.is_set():
            raise RuntimeError("cannot submit to an Executor that has been shut down")
        config = self._checked_config()
        self._options.check(config, self.user_endpoint_config)  # a typo fails here, in the endpoint's words
        body, fn_hash = _functions.serialized(fn)
        task_id = str(uuid.uuid4())
        pending = _Pending(task_id=task_id, future=self._future(task_id), fn_hash=fn_hash, fn_body=body,
                           args=serialize_args(args, kwargs), walltime=self._checked_walltime(),
                           resources=task_resources(self.resource_specification, fn), config=config)
        upload = len(pending.args) > self._upload_args_above
        for what, size in (("function", len(body)), ("arguments", 0 if upload else len(pending.args))):
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
        if upload:
            self._upload(pending)
        else:
            self._command("submit", pending)
        return pending.future

    def _upload(self, pending: _Pending) -> None:
        """Upload the arguments off this thread; the task is queued to be submitted once they are stored."""
        pending.future._waiting_for = UPLOADING
        with self._all_acknowledged:
            self._uploading += 1

        def uploaded(large: LargeArgs) -> None:
            pending.args, pending.large_args = b"", large
            if pending.future.cancelled():
                self._count_acknowledged(1)
            else:
                pending.future._waiting_for = QUEUED_HERE
                self._command("submit", pending)  # queued before the count drops: the I/O thread sees one or other
            with self._all_acknowledged:
                self._uploading -= 1

        def failed(error: BaseException) -> None:
            _set_exception(pending.future, error)
            with self._all_acknowledged:
                self._uploading -= 1
            self._count_acknowledged(1)

        self._uploads.start(pending.args, uploaded, failed)

    def attach(self, task_ids: Iterable[str]) -> list[TaskFuture]:
        """Futures for tasks submitted earlier, perhaps by another process: they resolve as results arrive."""
        futures = []
        for task_id in task_ids:
            pending = _Pending(task_id=task_id, future=self._future(task_id))
            pending.future._waiting_for = ACCEPTED
            futures.append(pending.future)
            self._command("attach", pending)
        return futures

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; with ``wait``, return once the service has acknowledged everything.

        The wait ends at the latest ``answer_timeout`` after the service last answered (unless
        ``keep_retrying``), and Ctrl-C ends it at once.
        """
        self._closing.set()
        os.write(self._wake_write, b"c")
        if wait:
            with self._all_acknowledged:
                while not (self._unacknowledged == 0 or self._failure is not None):
                    self._all_acknowledged.wait(WAIT_SLICE)

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        # Ctrl-C means "stop now": don't hold the researcher until the service has acknowledged everything
        self.shutdown(wait=exc_type is not KeyboardInterrupt)
        return False

    def _future(self, task_id: str) -> TaskFuture:
        return TaskFuture(task_id, lambda task_id: self._command("cancel", task_id), self._link)

    def _checked_config(self) -> bytes:
        """The config checked and frozen, here, not in the I/O thread: the caller sees what is wrong.

        An empty dict, the usual case, is fit and frozen already; a config whose frozen bytes are those of
        the last one checked is that config again (the bytes are what the endpoint gets): neither is walked
        again on each submit.
        """
        value = self.user_endpoint_config
        if type(value) is dict:
            if not value:
                return EMPTY_CONFIG
            try:
                if (frozen := msgspec.msgpack.encode(value, order="sorted")) == self._last_checked_config:
                    return frozen
            except (TypeError, OverflowError, msgspec.EncodeError):
                pass  # refused below, in the checks' own words
        check_config(value)
        check_config_size(value)  # before the schema: too big is the first thing to fix
        self._last_checked_config = self._config_now()
        return self._last_checked_config

    def _config_now(self) -> bytes:
        """The config as it is now, frozen: changing the dict later must not change a task already submitted.

        Frozen in the wire's own encoding, so a config the wire can't carry is refused here, not when sent.
        """
        try:
            return msgspec.msgpack.encode(self.user_endpoint_config, order="sorted")
        except (TypeError, OverflowError, msgspec.EncodeError) as exc:
            raise TypeError(f"user_endpoint_config must hold JSON values (integers within 64 bits): {exc}") from None

    def _checked_walltime(self) -> float:
        if self.walltime is None:
            return 0.0
        if not 0 < self.walltime < float("inf"):
            raise ValueError(f"walltime must be a positive number of seconds or None, not {self.walltime!r}")
        return float(self.walltime)

    def _command(self, kind: str, value: Any) -> None:
        self._commands.put((kind, value))
        if kind != "submit" or self._wake_for_submit:
            self._wake_for_submit = False
            os.write(self._wake_write, b"w")

    # --- background thread ------------------------------------------------------------

    def _run(self) -> None:
        context = zmq.Context()
        socket, watch = self._settings.connect(context)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(watch.monitor, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        state = self._state
        request_ids = itertools.count(1)
        last_heard = last_polled = last_reasons = time.monotonic()
        try:
            while not (self._closing.is_set() and self._commands.empty() and not state.queued
                       and not state.in_flight and not state.awaiting_result and not self._uploading):
                self._wake_for_submit = not state.in_flight
                # set before this check: a submit queued after it sees the flag and wakes us
                ready = dict(poller.poll(200 if self._commands.empty() else 0))
                if self._wake_read in ready:
                    os.read(self._wake_read, 65536)
                if watch.monitor in ready:
                    watch.check()
                self._take_commands(state)
                while socket in ready or socket.poll(0):
                    ready.pop(socket, None)
                    self._receive(socket, socket.recv_multipart(), state)
                    last_heard = time.monotonic()
                for task_ids in _chunks(state.to_acknowledge):  # one acknowledgement for all a pass received
                    socket.send_multipart(encode(ResultsAck(token=self._settings.token, task_ids=task_ids)))
                state.to_acknowledge = []
                now = time.monotonic()
                if not (state.in_flight or state.awaiting_result):
                    last_heard = now  # silence counts only while we wait for the service
                overdue = now - last_heard > self._poll_interval + SILENCE_GRACE
                self._link.silent_since = last_heard if overdue else None
                if now - last_heard > self._answer_timeout:
                    self._no_answer(state)
                    last_heard = now
                for task_ids in _chunks(state.to_cancel):
                    socket.send_multipart(encode(Cancel(token=self._settings.token, request_id=next(request_ids),
                                                        task_ids=task_ids)))
                state.to_cancel = []
                if not state.in_flight and state.queued:
                    batch = self._next_batch(state)
                    request_id = next(request_ids)
                    state.in_flight[request_id] = _InFlightSubmit(tasks=batch, sent_at=now)
                    self._send_submit(socket, request_id, batch, state)
                for request_id, flight in state.in_flight.items():
                    if now - flight.sent_at > self._resend_after:
                        log.info("service has not acknowledged submission %d; sending it again", request_id)
                        flight.sent_at = now
                        self._send_submit(socket, request_id, flight.tasks, state, include_all_functions=True)
                if state.awaiting_result and now - max(last_heard, last_polled) > self._poll_interval:
                    for task_ids in _chunks(list(state.awaiting_result)):
                        socket.send_multipart(encode(Fetch(token=self._settings.token, request_id=next(request_ids),
                                                           task_ids=task_ids)))
                    last_polled = now
                reasons_due = now - last_reasons > self._poll_interval
                if state.awaiting_result and self._options.service_describes and reasons_due:
                    # why they wait, for the futures' reprs (only a service that answered ENDPOINT_INFO reads it)
                    socket.send_multipart(encode(TaskQuery(token=self._settings.token, request_id=next(request_ids),
                                                           task_ids=list(itertools.islice(state.awaiting_result, 1000)),
                                                           limit=1000, reasons=True)))
                    last_reasons = now
        except AuthenticationError as exc:  # a wrong pinned key: nothing we send can succeed
            self._fail_everything(state, exc)
        except Exception as exc:  # the thread must never die silently: fail every future with the reason
            log.exception("mep executor thread failed")
            self._fail_everything(state, MepError(f"the mep client stopped: {exc}"))
        finally:
            watch.close(socket)
            socket.close(linger=0)
            context.term()

    def _next_batch(self, state: _State) -> list[_Pending]:
        """The oldest queued task and those queued after it under the same config, up to a batch."""
        config = state.queued[0].config
        batch: list[_Pending] = []
        rest: list[_Pending] = []
        for index, pending in enumerate(state.queued):
            if len(batch) == self._batch_size:
                rest.extend(state.queued[index:])
                break
            (batch if pending.config == config else rest).append(pending)
        state.queued = rest
        for pending in batch:
            pending.future._waiting_for = SENT
        return batch

    def _no_answer(self, state: _State) -> None:
        """The service has been silent for ``answer_timeout``: say so, and fail the futures unless asked not to."""
        summary = self._settings.no_answer_message(self._answer_timeout)
        if self._keep_retrying:
            log.warning("%s; still retrying", summary)
            return
        log.warning("%s; failing the futures waiting for it", summary)
        for pending in state.queued:
            _set_exception(pending.future, ServiceUnreachableError(
                f"{summary}. Task {pending.task_id} was never sent: nothing runs; submit it again"))
        sent = [pending for flight in state.in_flight.values() for pending in flight.tasks]
        for pending in sent:
            _set_exception(pending.future, ServiceUnreachableError(
                f"{summary}. Task {pending.task_id} was not acknowledged: the service may not have received it "
                f"(if it did, it runs, and mep.Client().get_task({pending.task_id!r}) shows it)"))
        for pending in state.awaiting_result.values():
            _set_exception(pending.future, ServiceUnreachableError(
                f"{summary}. Task {pending.task_id} had been accepted by the service: it still runs, and "
                f"mep.Client().get_result({pending.task_id!r}) fetches its result once the service answers"))
        self._count_acknowledged(len(state.queued) + len(sent))
        state.queued.clear()
        state.in_flight.clear()
        state.awaiting_result.clear()

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
                          walltime=pending.walltime, resources=pending.resources, large_args=pending.large_args)
            payloads.append(pending.args)
            if pending.fn_hash not in included and (include_all_functions or pending.fn_hash not in state.functions_stored):
                ref.fn_frame = len(payloads)
                payloads.append(pending.fn_body)
                included.add(pending.fn_hash)
            tasks.append(ref)
        header = Submit(token=self._settings.token, request_id=request_id, endpoint_id=self.endpoint_id,
                        user_endpoint_config=msgspec.msgpack.decode(batch[0].config), runtime=self._runtime,
                        tasks=tasks)
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
                # large ones: once loaded
                state.to_acknowledge.extend(r.task_id for r in header.results if r.large is None)
            case TaskList():
                for info in header.tasks:
                    pending = state.awaiting_result.get(info.task_id)
                    if pending is not None:
                        pending.future._service_reason = info.waiting_reason
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
            pending.future._waiting_for = ACCEPTED
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
        if result.large is not None:  # in a file on the endpoint's host: read or fetched off this thread
            self._large_results.load(result, lambda *loaded: self._settle_large(pending.future, *loaded))
            return
        self._settle(pending.future, result, payloads[result.payload_frame] if result.payload_frame != -1 else None)

    @staticmethod
    def _settle(future: concurrent.futures.Future, result: Result, payload: bytes | BinaryIO | None) -> None:
        value, error = outcome(result, payload)
        if error is None:
            future.set_result(value)
        else:
            _set_exception(future, error)

    def _settle_large(self, future: concurrent.futures.Future, result: Result, payload: bytes | BinaryIO | None,
                      error: BaseException | None) -> None:
        """A large result loaded (or not): the service forgets it only once it is in hand."""
        if error is not None:
            _set_exception(future, error)  # not acknowledged: Client.get_result can try again
            return
        self._settle(future, result, payload)
        acknowledge(self._settings, [result.task_id], self._answer_timeout)

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
