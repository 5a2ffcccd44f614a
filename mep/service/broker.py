"""The broker loop: authenticate, store durably, acknowledge, dispatch, relay results.

Modelled on the ZeroMQ guide's Majordomo broker with Titanic's durable queue.
One ROUTER socket serves both kinds of peer; the CURVE handshake (through the
ZAP handler) says which kind: a registered manager key becomes
``manager:<endpoint id>``, any other key is a client, who must then present a
token in each request. Each loop turn drains whatever has arrived, handles it
in one SQLite transaction and commits it; then it dispatches waiting tasks to
connected managers, as many as each has asked for (``CREDIT``), round-robin
across submitters. The turn's acknowledgements go out only once an fsync that
began after its commit has returned, which runs beside the loop
(``mep.service.group_commit``). Busy turns therefore coalesce many messages
into one fsync and one dispatch batch; an idle broker answers a lone message
after one fsync.

Payloads are never decoded here: function bodies are checked against their
SHA-256 name and stored; argument and result bytes go in and out of SQLite
untouched.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import re
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from mep.errors import (
    AuthenticationError,
    EndpointBusyError,
    ErrorCode,
    MepError,
    NotRegisteredError,
    ProtocolError,
    ServiceUnavailableError,
    UnknownEndpointError,
)
from mep.protocol import decode, encode
from mep.protocol.curve import ZapHandler, make_curve_server
from mep.protocol.framing import DEFAULT_MAX_PAYLOAD_BYTES, MAX_HEADER_BYTES
from mep.protocol.guard import forbid_unpickling, process_status
from mep.protocol.liveness import PauseDetector
from mep.protocol.messages import (
    MAX_IDS_PER_REQUEST,
    Cancel,
    CancelAck,
    Chunk,
    ChunkRequest,
    Credit,
    Describe,
    Dispatch,
    DispatchAck,
    EndpointInfoRequest,
    Error,
    Fetch,
    Heartbeat,
    ProcessStatus,
    Register,
    Registered,
    Rejection,
    Result,
    Results,
    ResultsAck,
    Runtime,
    Started,
    Starting,
    StatusReply,
    StatusRequest,
    Submit,
    SubmitAck,
    TaskGroup,
    TaskList,
    TaskQuery,
    TaskRef,
    TasksLost,
    Unregister,
    Upload,
)
from mep.protocol.receive import handling, loop_turn
from mep.protocol.user_config import MAX_CONFIG_BYTES
from mep.service.blobs import ChunkFetches
from mep.service.endpoint_info import EndpointDirectory
from mep.service.group_commit import GroupCommit
from mep.service.state import ServiceState
from mep.service.store import QueuedTask, Store, StoredResult, dumps_canonical, loads_canonical
from mep.service.throttle import FailedAuthentications
from mep.service.uploads import DIRECTORY_NAME as UPLOADS_DIRECTORY
from mep.service.uploads import Uploads

log = logging.getLogger(__name__)

ZAP_DOMAIN = "mep-service"
CLIENT = "client"
MANAGER_PREFIX = "manager:"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
DRAIN_LIMIT = 1000


@dataclass
class BrokerSettings:
    listen: str = "tcp://127.0.0.1:5790"
    heartbeat_interval: float = 10.0
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    dispatch_batch: int = 500
    max_attempts: int = 3  # runs of a task whose endpoint keeps dying under it
    result_retention: float = 7 * 24 * 3600.0  # seconds an uncollected result is kept
    max_queued_tasks: int = 100_000  # unfinished tasks per identity; SUBMIT beyond is refused per task
    max_result_bytes: int = 10 * 1024**3  # stored, uncollected result bytes per identity before SUBMIT is refused
    max_auth_failures: int = 100  # failed token checks per source address within auth_failure_window (0: no limit)
    auth_failure_window: float = 60.0  # seconds; also how long a source over the limit is refused
    max_upload_bytes: int = 100 * 1024**3  # uploaded arguments one identity may hold on the service's disk
    upload_retention: float = 24 * 3600.0  # seconds an upload no unfinished task needs is kept after its last use


@dataclass
class ManagerLink:
    """A connected manager: where to send, what it already holds, when it last spoke, what it has room for.

    Credit counts are cumulative since the last REGISTERED: the manager may
    have been sent ``credit_tasks`` tasks and ``credit_bytes`` payload bytes in
    all (a task is sent while some byte credit is left, so the last one may
    overshoot by its own size).
    """

    routing_id: bytes
    last_seen: float
    functions_sent: set[str] = field(default_factory=set)
    processes: list[ProcessStatus] = field(default_factory=list)
    credit_tasks: int = 0
    credit_bytes: int = 0
    sent_tasks: int = 0
    sent_bytes: int = 0
    full: frozenset[str] = frozenset()  # submitters the manager holds its share of: skip them for now
    last_submitter: str = ""  # where the round-robin across submitters resumes
    # (Store.waiting_added, full) when a dispatch last took every waiting task it could see: until either
    # changes there are none to look for
    nothing_waiting: tuple[int, frozenset[str]] | None = None

    def reset_credit(self) -> None:
        self.credit_tasks = self.credit_bytes = self.sent_tasks = self.sent_bytes = 0
        self.full = frozenset()
        self.nothing_waiting = None


@dataclass
class Outbox:
    """Replies produced while handling a batch; sent only once the batch's commit is durable."""

    messages: list[tuple[bytes, list[Any]]] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)

    def reply(self, routing_id: bytes, header: msgspec.Struct, payloads: list[Any] | None = None) -> None:
        self.messages.append((routing_id, encode(header, payloads or [])))


class Broker:
    def __init__(self, state: ServiceState, settings: BrokerSettings) -> None:
        self.state = state
        self.store: Store = state.store
        self.settings = settings
        self.context = zmq.Context()
        self._zap_store: Store | None = None
        self.zap = ZapHandler(self.context, {ZAP_DOMAIN: self._peer_for_key})
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.router_mandatory = True
        self.socket.linger = 0
        self.socket.sndhwm = self.socket.rcvhwm = 100_000
        # A hard cap per frame, checked by libzmq before a whole message is buffered (protects against a
        # peer that never shows a token); payloads between the limit and the cap get a per-task refusal.
        self.socket.maxmsgsize = max(4 * settings.max_payload_bytes, MAX_HEADER_BYTES)
        make_curve_server(self.socket, state.secret_key, ZAP_DOMAIN)
        self.socket.bind(settings.listen)
        self.address = self.socket.last_endpoint.decode()
        self.managers: dict[str, ManagerLink] = {}
        self.directory = EndpointDirectory(self.store)  # what endpoints accept, and why tasks wait
        self.client_routes: dict[str, tuple[bytes, str]] = {}  # task id -> (submitter's connection, identity)
        self.chunk_fetches = ChunkFetches(self.store)
        self.group_commit: GroupCommit[Outbox] = GroupCommit(self.store)  # replies wait for their fsync, not the loop
        self.uploads = Uploads(self.store, self.store.path.parent / UPLOADS_DIRECTORY, settings.max_upload_bytes,
                               settings.upload_retention)
        self._last_expiry = float("-inf")
        self._stop = threading.Event()
        self.failed_authentications = FailedAuthentications(settings.max_auth_failures, settings.auth_failure_window)
        self._source = ""  # network address of the peer whose message is being handled
        self._pause = PauseDetector(longest_turn=settings.heartbeat_interval)
        self._dispatched_unrecorded: list[str] = []  # sent to a manager while the disk was full

    # --- authentication ---------------------------------------------------------

    def _peer_for_key(self, public_key: str) -> str:
        """ZAP thread: a registered manager key names its endpoint; anything else is a client."""
        if self._zap_store is None:
            self._zap_store = Store(self.store.path)
        endpoint_id = self._zap_store.endpoint_for_manager_key(public_key)
        return MANAGER_PREFIX + endpoint_id if endpoint_id else CLIENT

    def _authenticate(self, token: str) -> str:
        self.failed_authentications.check(self._source)
        identity_id = self.store.identity_for_token(token)
        if identity_id is None:
            self.failed_authentications.failed(self._source)
            raise AuthenticationError("the token is unknown or has been revoked; ask your mep admin for a new one")
        return identity_id

    # --- main loop ----------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        forbid_unpickling()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())
        log.info("service listening on %s (public key %s)", self.address, self.state.public_key)
        _collect_less()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.group_commit.wake_fd, zmq.POLLIN)
        waiting_for_a_sync = zmq.Poller()  # new messages meanwhile join the next turn (see GroupCommit.saturated)
        waiting_for_a_sync.register(self.group_commit.wake_fd, zmq.POLLIN)
        more_to_dispatch = False
        try:
            while not self._stop.is_set() and self.store.sync_failure is None:
                more_to_dispatch, was_more = False, more_to_dispatch
                with loop_turn(log, "service"):  # a fault in one turn (a full disk, a bug) must not end the service
                    ready = dict((waiting_for_a_sync if self.group_commit.saturated else poller).poll(
                        0 if was_more else 200))
                    outbox = self._handle(self._drain()) if self.socket in ready else Outbox()
                    try:  # tasks committed this turn go to their managers while the fsync that makes them durable runs
                        more_to_dispatch = self._dispatch_once_recorded()
                    finally:  # and the replies once it has returned, even if dispatching failed
                        if outbox.messages or outbox.completed:
                            self.group_commit.hold(outbox)
                        self._acknowledge(self.group_commit.released())
                    self._expire_silent_managers()
                    self._expire_old_results()
                    self.uploads.sweep_if_due(time.monotonic())
        finally:
            self.group_commit.close()
            self.socket.close(linger=0)
            self.context.term()
            self.store.close()
        if self.store.sync_failure is not None:
            # Nothing written since may be promised (see Store.sync): stop, so that a restart (systemd's
            # Restart=) reads back what the disk really holds; senders resend what was not acknowledged.
            log.critical("the service stops: the disk failed to make its database durable (%s); check the disk",
                         self.store.sync_failure.admin_detail)
            raise self.store.sync_failure

    def _drain(self) -> list[list[zmq.Frame]]:
        messages = []
        while len(messages) < DRAIN_LIMIT:
            try:
                messages.append(self.socket.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        return messages

    def _handle(self, messages: list[list[zmq.Frame]]) -> Outbox:
        """Handle a batch in one transaction, committed but not yet fsynced; the replies, for ``_acknowledge``."""
        outbox = Outbox()
        managers = dict(self.managers)
        try:
            with self.store.transaction(sync=False):
                for frames in messages:
                    self._handle_guarded(frames, outbox)
        except ServiceUnavailableError as exc:  # nothing of the batch was stored: nothing of it is acknowledged
            log.error("the database can't be written (%s): %d message(s) refused, nothing of them stored",
                      exc.admin_detail, len(messages))
            self.managers = managers  # a registration whose requeue was not stored did not happen
            return self._refuse_unstored(messages, exc)
        return outbox

    def _acknowledge(self, outboxes: list[Outbox]) -> None:
        """Send the replies and push the results of turns whose commits are durable (``GroupCommit``)."""
        for outbox in outboxes:
            for routing_id, frames in outbox.messages:
                self._send(routing_id, frames)
        self._push_results([task_id for outbox in outboxes for task_id in outbox.completed])

    def _handle_guarded(self, frames: list[zmq.Frame], outbox: Outbox) -> None:
        """One message, in its own savepoint: whatever it raises undoes its work and answers the sender alone."""
        routing_id = frames[0].bytes
        peer = _describe_peer(frames)
        request_id = 0
        replies, completed = len(outbox.messages), len(outbox.completed)

        def refuse(exc: MepError) -> None:
            del outbox.messages[replies:], outbox.completed[completed:]
            outbox.reply(routing_id, Error(request_id=request_id, code=exc.code, message=str(exc)))

        with handling(log, peer, "a message", refuse, propagate=(ServiceUnavailableError,)), self.store.savepoint():
            if len(frames) < 2:
                raise ProtocolError("empty message")
            self._source = _peer_address(frames[1])
            header, payloads = decode(frames[1:])
            request_id = getattr(header, "request_id", 0)
            self._handle_one(frames[1].get("User-Id"), routing_id, header, payloads, outbox)

    @staticmethod
    def _refuse_unstored(messages: list[list[zmq.Frame]], error: ServiceUnavailableError) -> Outbox:
        """Tell each requester its request was not stored; managers and acknowledgements are simply sent again."""
        outbox = Outbox()
        for frames in messages:
            try:
                header, _ = decode(frames[1:])
            except MepError:
                continue  # refused for its own reasons once the disk works again
            if getattr(header, "request_id", 0):
                outbox.reply(frames[0].bytes, Error(request_id=header.request_id, code=error.code,
                                                    message=str(error)))
        return outbox

    def _handle_one(self, peer: str, routing_id: bytes, header: Any, payloads: list[zmq.Frame],
                    outbox: Outbox) -> None:
        if peer.startswith(MANAGER_PREFIX):
            self._handle_manager(peer.removeprefix(MANAGER_PREFIX), routing_id, header, payloads, outbox)
            return
        match header:
            case Submit():
                self._submit(routing_id, header, payloads, outbox)
            case Fetch():
                identity_id = self._authenticate(header.token)
                self._send_stored(routing_id, identity_id, header.task_ids, header.request_id, outbox)
            case ResultsAck():
                identity_id = self._authenticate(header.token)
                self.store.acknowledge_results(identity_id, header.task_ids)
            case Cancel():
                self._cancel(routing_id, header, outbox)
            case Upload():
                outbox.reply(routing_id, self.uploads.put(self._authenticate(header.token), header, payloads))
            case ChunkRequest():
                self.chunk_fetches.request(self._authenticate(header.token), routing_id, header, self.managers,
                                           outbox)
            case TaskQuery():
                identity_id = self._authenticate(header.token)
                tasks = self.store.task_infos(identity_id, header)
                if header.reasons:
                    tasks = self.directory.with_reasons(identity_id, tasks, self.managers)
                outbox.reply(routing_id, TaskList(request_id=header.request_id, tasks=tasks))
            case EndpointInfoRequest():
                self._authenticate(header.token)
                if not self.store.endpoint_exists(header.endpoint_id):
                    raise UnknownEndpointError(f"no endpoint with id {header.endpoint_id!r} is registered with "
                                               "this service")
                outbox.reply(routing_id, self.directory.info(header, self.managers))
            case StatusRequest():
                self._authenticate(header.token)
                link = self.managers.get(header.endpoint_id)
                processes = [process_status("service")] + (link.processes if link else [])
                outbox.reply(routing_id, StatusReply(request_id=header.request_id, processes=processes,
                                                     endpoint_online=link is not None))
            case _:
                raise ProtocolError(f"a client may not send {type(header).__name__} messages")

    # --- clients ------------------------------------------------------------------

    def _submit(self, routing_id: bytes, submit: Submit, payloads: list[zmq.Frame], outbox: Outbox) -> None:
        identity_id = self._authenticate(submit.token)
        if not self.store.endpoint_exists(submit.endpoint_id):
            raise UnknownEndpointError(f"no endpoint with id {submit.endpoint_id!r} is registered with this service")
        if submit.runtime is None:
            raise ProtocolError("SUBMIT must carry the client's runtime")
        config = dumps_canonical(submit.user_endpoint_config)
        if len(config) > MAX_CONFIG_BYTES:
            raise ProtocolError(f"user_endpoint_config is {len(config)} bytes as JSON; the limit is "
                                f"{MAX_CONFIG_BYTES}: pass options, not data")
        runtime = dumps_canonical(msgspec.to_builtins(submit.runtime))
        limit = self.settings.max_payload_bytes
        offered = self._store_offered_functions(submit.tasks, payloads, limit)
        known = self.store.known_functions(task.fn_hash for task in submit.tasks)
        accepted: list[str] = []
        rejected: list[Rejection] = []
        quota = _Quota(self.settings, self.store, identity_id)
        for task in submit.tasks:
            reason = (self._task_problem(task, payloads, offered, known, limit) or quota.problem(task.task_id)
                      or self.uploads.problem(identity_id, task))
            if reason is None:
                if self.store.add_task(task.task_id, submit.endpoint_id, identity_id, task.fn_hash,
                                       payloads[task.args_frame].buffer, config, runtime, task.walltime,
                                       dumps_canonical(task.resources)):
                    quota.unfinished += 1
                    self.uploads.record(task.task_id, identity_id, task.large_args)
                elif self.store.task_owner(task.task_id) != identity_id:
                    reason = (ErrorCode.BAD_REQUEST, f"task id {task.task_id} is already in use")
            if reason is None:
                accepted.append(task.task_id)
                self.client_routes[task.task_id] = (routing_id, identity_id)
                log.debug("accepted task %s from identity %s for endpoint %s", task.task_id, identity_id,
                          submit.endpoint_id, extra={"task_id": task.task_id, "endpoint_id": submit.endpoint_id,
                                                     "identity_id": identity_id})
            else:
                rejected.append(Rejection(task_id=task.task_id, code=reason[0], message=reason[1]))
        outbox.reply(routing_id, SubmitAck(request_id=submit.request_id, accepted=accepted, rejected=rejected))

    def _store_offered_functions(self, tasks: list[TaskRef], payloads: list[zmq.Frame], limit: int) -> dict[str, str]:
        """Store function bodies whose content matches their hash; returns hash -> problem for the rest."""
        problems: dict[str, str] = {}
        for task in tasks:
            if task.fn_frame == -1 or task.fn_hash in problems:
                continue
            body = payloads[task.fn_frame]
            if len(body) > limit:
                problems[task.fn_hash] = f"the serialised function is {len(body)} bytes; the limit is {limit}"
            elif hashlib.sha256(body.buffer).hexdigest() != task.fn_hash:
                problems[task.fn_hash] = "the function body does not match its SHA-256 hash"
            else:
                self.store.add_function(task.fn_hash, body.buffer)
        return problems

    @staticmethod
    def _task_problem(task: TaskRef, payloads: list[zmq.Frame], offered: dict[str, str], known: set[str],
                      limit: int) -> tuple[ErrorCode, str] | None:
        if not UUID_RE.match(task.task_id):
            return ErrorCode.BAD_REQUEST, f"task id {task.task_id!r} is not a lowercase UUID"
        if not 0 <= task.walltime < float("inf"):
            return ErrorCode.BAD_REQUEST, f"walltime {task.walltime} is not a number of seconds >= 0"
        if task.fn_hash in offered:
            code = ErrorCode.PAYLOAD_TOO_LARGE if "limit" in offered[task.fn_hash] else ErrorCode.BAD_REQUEST
            return code, offered[task.fn_hash]
        if task.fn_frame == -1 and task.fn_hash not in known:
            return ErrorCode.UNKNOWN_FUNCTION, f"function {task.fn_hash} was never sent to this service"
        size = len(payloads[task.args_frame])
        if size > limit:
            return ErrorCode.PAYLOAD_TOO_LARGE, f"the task's serialised arguments are {size} bytes; the limit is {limit}"
        return None

    def _cancel(self, routing_id: bytes, request: Cancel, outbox: Outbox) -> None:
        identity_id = self._authenticate(request.token)
        outcome = self.store.request_cancel(identity_id, request.task_ids)
        outbox.completed.extend(outcome.cancelled)
        requested = []
        for endpoint_id, task_ids in outcome.forwarded.items():
            requested += task_ids
            link = self.managers.get(endpoint_id)
            if link is not None:  # otherwise the manager's next registration settles them
                outbox.reply(link.routing_id, Cancel(task_ids=task_ids))
        outbox.reply(routing_id, CancelAck(request_id=request.request_id, cancelled=outcome.cancelled,
                                           requested=requested, finished=outcome.finished,
                                           unknown=outcome.unknown))

    def _send_stored(self, routing_id: bytes, identity_id: str, task_ids: list[str], request_id: int,
                     outbox: Outbox) -> None:
        ready, pending, unknown = self.store.results_for(identity_id, task_ids)
        for task_id in pending:
            self.client_routes[task_id] = (routing_id, identity_id)
        header, payloads = _results_message(ready)
        header.request_id = request_id
        header.unknown = unknown
        outbox.reply(routing_id, header, payloads)

    def _push_results(self, task_ids: list[str]) -> None:
        """Results just recorded go straight to a connected submitter; otherwise they wait for a Fetch."""
        by_client: dict[tuple[bytes, str], list[str]] = defaultdict(list)
        for task_id in task_ids:
            route = self.client_routes.pop(task_id, None)
            if route is not None:
                by_client[route].append(task_id)
        for (route, submitter), ids in by_client.items():
            ready, _, _ = self.store.results_for(submitter, ids)
            header, payloads = _results_message(ready)
            self._send(route, encode(header, payloads))

    # --- managers -----------------------------------------------------------------

    def _handle_manager(self, endpoint_id: str, routing_id: bytes, header: Any, payloads: list[zmq.Frame],
                        outbox: Outbox) -> None:
        link = self.managers.get(endpoint_id)
        if isinstance(header, Register):
            self._register(endpoint_id, routing_id, header, link, outbox)
            return
        if link is None or link.routing_id != routing_id:
            raise NotRegisteredError("this manager connection has not registered (the service restarted, or "
                                     "the connection was re-established); send REGISTER")
        link.last_seen = time.monotonic()
        match header:
            case Heartbeat():
                link.processes = header.processes
                outbox.reply(routing_id, Heartbeat())
            case Started():
                self.store.mark_started(endpoint_id, header.task_ids)
            case Chunk():
                self.chunk_fetches.answered(endpoint_id, header, payloads, outbox)
            case ChunkRequest():  # the endpoint a task went to reads its uploaded arguments
                outbox.reply(routing_id, *self.uploads.read(endpoint_id, header))
            case Describe():
                self.directory.describe(endpoint_id, header.options)
            case Starting():
                self.directory.set_starting(endpoint_id, header.groups)
            case Unregister():
                del self.managers[endpoint_id]
                self.directory.offline(endpoint_id)
                requeued, cancelled = self.store.requeue_in_flight(endpoint_id)
                outbox.completed.extend(cancelled)
                log.info("manager for endpoint %s stopped; %d task(s) it held wait for its return", endpoint_id,
                         requeued)
            case TasksLost():
                failed = self.store.tasks_lost(endpoint_id, header.lost, self.settings.max_attempts)
                outbox.completed.extend(failed)
                log.info("endpoint %s lost %d task(s): %d queued again, %d failed for good", endpoint_id,
                         len(header.lost), len(header.lost) - len(failed), len(failed))
            case Credit():
                link.credit_tasks = max(link.credit_tasks, header.tasks)
                link.credit_bytes = max(link.credit_bytes, header.payload_bytes)
                link.full = frozenset(header.full)
                link.functions_sent.difference_update(header.forget)
            case DispatchAck():
                for rejection in header.rejected:
                    if self.store.fail_task(endpoint_id, rejection.task_id, rejection.code, rejection.message):
                        outbox.completed.append(rejection.task_id)
                if header.returned:  # it lacked their function bodies: send them again, bodies included
                    self.store.return_to_waiting(endpoint_id, header.returned)
                    link.functions_sent.clear()
            case Results():
                for result in header.results:
                    payload = payloads[result.payload_frame].buffer if result.payload_frame != -1 else None
                    if self.store.record_result(endpoint_id, result, payload):
                        outbox.completed.append(result.task_id)
                        log.debug("result of task %s: %s", result.task_id, result.status,
                                  extra={"task_id": result.task_id, "endpoint_id": endpoint_id})
                ids = [r.task_id for r in header.results]
                for start in range(0, len(ids), MAX_IDS_PER_REQUEST):  # what the router's decoder takes at once
                    outbox.reply(routing_id, ResultsAck(task_ids=ids[start:start + MAX_IDS_PER_REQUEST]))
            case _:
                raise ProtocolError(f"a manager may not send {type(header).__name__} messages")

    def _register(self, endpoint_id: str, routing_id: bytes, header: Register, link: ManagerLink | None,
                  outbox: Outbox) -> None:
        """Grant the endpoint's lease to this connection, unless another live manager holds it."""
        if header.endpoint_id != endpoint_id:
            raise ProtocolError(f"this manager's key is registered for endpoint {endpoint_id}, "
                                f"not {header.endpoint_id}")
        now = time.monotonic()
        if link is not None and link.routing_id == routing_id:  # a repeated REGISTER on a live connection
            link.last_seen = now
            link.reset_credit()  # the manager counts its credit afresh from REGISTERED too
            outbox.reply(routing_id, Registered(heartbeat_interval=self.settings.heartbeat_interval))
            return
        if link is not None and now - link.last_seen < self._lease:
            raise EndpointBusyError(
                f"another manager is serving endpoint {endpoint_id} (heard {now - link.last_seen:.0f} s ago); "
                f"this one may take over once that one has been silent for {self._lease:.0f} s")
        requeued, cancelled = self.store.requeue_in_flight(endpoint_id)
        outbox.completed.extend(cancelled)
        self.managers[endpoint_id] = ManagerLink(routing_id=routing_id, last_seen=now)
        self.directory.online(endpoint_id)
        log.info("manager for endpoint %s (mep %s) registered; %d in-flight task(s) queued again",
                 endpoint_id, header.mep_version or "unknown", requeued)
        outbox.reply(routing_id, Registered(heartbeat_interval=self.settings.heartbeat_interval))

    @property
    def _lease(self) -> float:
        return 3 * self.settings.heartbeat_interval

    def _dispatch_once_recorded(self) -> bool:
        """Dispatch, unless tasks already sent could not be recorded as dispatched (the disk is full).

        They would be sent again every turn otherwise; once the record is written, dispatch resumes.
        """
        if self._dispatched_unrecorded and not self._record_dispatched([]):
            return False
        return self._dispatch()

    def _record_dispatched(self, task_ids: list[str]) -> bool:
        self._dispatched_unrecorded += task_ids
        try:
            # Not fsynced: a "dispatched" lost to a machine crash is harmless, the manager's next registration
            # sends every dispatched task again anyway.
            with self.store.transaction(sync=False):
                self.store.mark_dispatched(self._dispatched_unrecorded)
        except ServiceUnavailableError as exc:
            log.error("%d dispatched task(s) can't be recorded (%s); dispatch waits until they can",
                      len(self._dispatched_unrecorded), exc.admin_detail)
            return False
        self._dispatched_unrecorded = []
        return True

    def _readable(self, endpoint_id: str, queued: list[QueuedTask]) -> list[QueuedTask]:
        """Fail, with the reason, a task whose stored config or runtime can't be read back (a row an older
        mep wrote, such as ``Infinity``), instead of letting it stop every dispatch after every restart."""
        problems: dict[tuple[str, str], str] = {}
        for config, runtime in {(task.config, task.runtime) for task in queued}:
            try:
                loads_canonical(config)
                msgspec.json.decode(runtime, type=Runtime)
            except (MepError, msgspec.MsgspecError) as exc:
                problems[config, runtime] = (f"{exc}; submit the task again with a user_endpoint_config of "
                                             "JSON values only")
        if not problems:
            return queued
        unreadable = [task for task in queued if (task.config, task.runtime) in problems]
        with self.store.transaction():
            for task in unreadable:
                self.store.fail_task(endpoint_id, task.task_id, ErrorCode.CONFIG_INVALID,
                                     problems[task.config, task.runtime])
        log.warning("failed %d stored task(s) for endpoint %s whose config can't be read back: %s",
                    len(unreadable), endpoint_id, "; ".join(sorted(set(problems.values()))))
        self._push_results([task.task_id for task in unreadable])
        return [task for task in queued if (task.config, task.runtime) not in problems]

    def _dispatch(self) -> bool:
        """Send waiting tasks to connected managers, as far as each one's credit goes.

        True when a manager took a full batch and has credit left (more may be waiting).
        """
        more = False
        for endpoint_id, link in list(self.managers.items()):
            room = min(link.credit_tasks - link.sent_tasks, self.settings.dispatch_batch)
            looking = (self.store.waiting_added, link.full)
            if room <= 0 or link.sent_bytes >= link.credit_bytes or link.nothing_waiting == looking:
                continue
            found = self.store.waiting_tasks(endpoint_id, room, after=link.last_submitter, exclude=link.full)
            candidates = self._readable(endpoint_id, found)
            if not candidates:
                link.nothing_waiting = looking if len(found) < room else None
                continue
            groups: dict[tuple[str, str, str], TaskGroup] = {}
            identity_sets: dict[str, list] = {}
            tasks: list[TaskRef] = []
            payloads: list[Any] = []
            new_functions: set[str] = set()
            args = self.store.task_args(_within_credit(candidates, link))
            sent_bytes = link.sent_bytes
            for task in candidates:
                if sent_bytes >= link.credit_bytes:
                    break  # the rest wait for more credit; the task that crossed the line still goes
                key = (task.submitter_id, task.config, task.runtime)
                if key not in groups:
                    if task.submitter_id not in identity_sets:
                        identity_sets[task.submitter_id] = self.store.identity_set(task.submitter_id)
                    groups[key] = TaskGroup(
                        submitter_id=task.submitter_id, identities=identity_sets[task.submitter_id],
                        user_endpoint_config=loads_canonical(task.config),
                        runtime=msgspec.json.decode(task.runtime, type=Runtime), task_ids=[])
                groups[key].task_ids.append(task.task_id)
                ref = TaskRef(task_id=task.task_id, fn_hash=task.fn_hash, args_frame=len(payloads),
                              walltime=task.walltime, resources=loads_canonical(task.resources))
                payloads.append(args[task.task_id])
                if not task.args_bytes:  # inline arguments are never empty: these were uploaded
                    ref.large_args = self.uploads.reference(task.task_id)
                sent_bytes += task.args_bytes
                if task.fn_hash not in link.functions_sent and task.fn_hash not in new_functions:
                    ref.fn_frame = len(payloads)
                    payloads.append(self.store.function_body(task.fn_hash))
                    sent_bytes += len(payloads[-1])
                    new_functions.add(task.fn_hash)
                tasks.append(ref)
            if not tasks:
                continue
            self.state.signer.sign_groups(endpoint_id, groups.values())  # checked by the spawner and endpoint
            if not self._send(link.routing_id, encode(Dispatch(tasks=tasks, groups=list(groups.values())), payloads)):
                continue
            link.functions_sent |= new_functions
            link.sent_tasks += len(tasks)
            link.sent_bytes = sent_bytes
            link.last_submitter = candidates[len(tasks) - 1].submitter_id
            for ref in tasks:
                log.debug("dispatched task %s to endpoint %s", ref.task_id, endpoint_id,
                          extra={"task_id": ref.task_id, "endpoint_id": endpoint_id})
            if len(found) < room and len(tasks) == len(candidates):  # it took the last it could see
                link.nothing_waiting = looking
            if not self._record_dispatched([ref.task_id for ref in tasks]):
                return False
            more = more or (len(tasks) == self.settings.dispatch_batch and link.sent_tasks < link.credit_tasks)
        return more

    def _expire_old_results(self) -> None:
        now = time.monotonic()
        if now - self._last_expiry < min(60.0, self.settings.result_retention / 2):
            return
        self._last_expiry = now
        with self.store.transaction():
            expired = self.store.expire_results(self.settings.result_retention)
        if expired:
            log.info("%d uncollected result(s) passed the %.0f s retention and expired", expired,
                     self.settings.result_retention)

    def _expire_silent_managers(self) -> None:
        now = time.monotonic()
        if paused := self._pause.paused(now):
            # The service itself did not run (stopped, starved): the managers' silence was its own.
            log.warning("the service did not run for %.1f s (stopped or starved); every manager's lease starts "
                        "afresh", paused)
            for link in self.managers.values():
                link.last_seen = max(link.last_seen, now)
        deadline = now - self._lease
        for endpoint_id, link in list(self.managers.items()):
            if link.last_seen < deadline:
                log.warning("manager for endpoint %s went silent; its tasks wait for it to return", endpoint_id)
                del self.managers[endpoint_id]
                self.directory.offline(endpoint_id)

    def _send(self, routing_id: bytes, frames: list[Any]) -> bool:
        try:
            self.socket.send_multipart([routing_id, *frames], zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            log.info("peer is not keeping up (high-water mark); will retry")
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            log.info("peer has disconnected; its messages wait on disk")
        return False


def _collect_less() -> None:
    """The loop makes many short-lived objects and next to no cycles, yet the collector kept scanning
    everything start-up made (modules, the schema, keys), which lives as long as the process: 8% of the service's
    time at full load. Freeze that, and collect the youngest generation less often (at most ~10,000 objects of
    cyclic garbage wait for it)."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _within_credit(candidates: list[QueuedTask], link: ManagerLink) -> list[str]:
    """Ids of the candidates the byte credit may let through, counting their arguments only: a superset of
    what a dispatch sends (function bodies only add bytes), so their arguments are read in one query."""
    ids = []
    sent_bytes = link.sent_bytes
    for task in candidates:
        if sent_bytes >= link.credit_bytes:
            break
        ids.append(task.task_id)
        sent_bytes += task.args_bytes
    return ids


def _peer_address(frame: zmq.Frame) -> str:
    """The sending peer's network address as libzmq reports it ("" where the transport has none)."""
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return ""


class _Quota:
    """An identity's limits while one SUBMIT is judged: unfinished tasks, and result bytes not yet collected."""

    def __init__(self, settings: BrokerSettings, store: Store, identity_id: str) -> None:
        self.settings = settings
        self.store = store
        self.identity_id = identity_id
        self.unfinished = store.unfinished_tasks(identity_id)
        self.result_bytes = store.uncollected_result_bytes(identity_id)

    def problem(self, task_id: str) -> tuple[ErrorCode, str] | None:
        settings = self.settings
        if self.result_bytes <= settings.max_result_bytes and self.unfinished < settings.max_queued_tasks:
            return None
        if self.store.task_owner(task_id) == self.identity_id:
            return None  # a resubmission of a task already accepted (the SDK resends until acknowledged)
        if self.result_bytes > settings.max_result_bytes:
            return ErrorCode.QUOTA_EXCEEDED, (
                f"your uncollected results hold {self.result_bytes} bytes, more than this service's limit of "
                f"{settings.max_result_bytes} bytes per identity; new tasks are refused until you collect results "
                f"(an Executor collects them as they arrive; Client.acknowledge(task_ids)) or they expire")
        return ErrorCode.QUOTA_EXCEEDED, (
            f"you have {self.unfinished} unfinished tasks, the most this service allows per identity "
            f"({settings.max_queued_tasks}); submit more once some have finished")


def _describe_peer(frames: list[zmq.Frame]) -> str:
    """Who sent a message, for the log: what its CURVE key was authenticated as, and from where."""
    if len(frames) < 2:
        return f"routing id {frames[0].bytes.hex()}"
    try:
        return f"{frames[1].get('User-Id')} at {frames[1].get('Peer-Address')}"
    except zmq.ZMQError:
        return f"{frames[1].get('User-Id')} (routing id {frames[0].bytes.hex()})"


def _results_message(stored: list[StoredResult]) -> tuple[Results, list[bytes]]:
    results: list[Result] = []
    payloads: list[bytes] = []
    for item in stored:
        result = item.result
        if item.payload is not None:
            result.payload_frame = len(payloads)
            payloads.append(item.payload)
        results.append(result)
    return Results(results=results), payloads
