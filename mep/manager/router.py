"""The unprivileged half of the manager: service link, task routing, results back.

The router holds every network socket and every task, and no privilege. It
groups dispatched tasks by (submitter, user endpoint config); for a group
without a live endpoint it asks the root spawner for one over the private
socketpair, queueing the group's tasks until the endpoint connects. It asks
the service for work only as it has room (``CREDIT``, see ``mep.manager.flow``)
and sends each endpoint only as many tasks as that endpoint's window. User
endpoints connect to one ipc ROUTER socket with the CURVE key the spawner gave
each of them; the ZAP handler turns that key into the endpoint id, and a
result is accepted only from the endpoint its task was sent to.

Payload frames pass through as ``zmq.Frame`` objects, never copied or parsed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket as socketlib
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from mep import __version__
from mep.config.manager import ManagerConfig
from mep.errors import ErrorCode, MepError, ProtocolError
from mep.protocol import decode, encode
from mep.protocol.curve import ZapHandler, make_curve_client, make_curve_server, public_from_secret
from mep.protocol.framing import MAX_HEADER_BYTES
from mep.protocol.guard import forbid_unpickling, process_status
from mep.protocol.liveness import PauseDetector
from mep.protocol.messages import (
    CANCELLED,
    Cancel,
    Chunk,
    ChunkRead,
    ChunkRequest,
    Credit,
    Describe,
    EndpointOptions,
    LostTask,
    Started,
    TasksLost,
    Unregister,
    FAILED,
    MAX_IDS_PER_REQUEST,
    Dispatch,
    DispatchAck,
    EndpointExited,
    Error,
    Heartbeat,
    IdleExit,
    ProcessStatus,
    Ready,
    Register,
    Registered,
    Result,
    Results,
    ResultsAck,
    Shutdown,
    RemapGroups,
    RetireEndpoint,
    RouterStopping,
    Runtime,
    Spawned,
    SpawnerStatus,
    SpawnerStatusRequest,
    SpawnRefused,
    SpawnRequest,
    TaskGroup,
    TaskRef,
    Tasks,
)
from mep.manager.describe import StartingReport, endpoint_options
from mep.manager.flow import HeldWork, QueuedTask
from mep.manager.large_args import ArgumentRelay
from mep.manager.large_results import ChunkRelay
from mep.protocol.receive import handling, loop_turn
from mep.manager.spawner_link import SpawnerLink
from mep.manager.status_file import STATUS_FILE_NAME, StatusFile
from mep.manager.task_audit import TaskAuditTrail
from mep.metrics import router_metrics
from mep.service.store import dumps_canonical

log = logging.getLogger("mep.router")

ZAP_DOMAIN = "mep-endpoints"
STOP_GRACE = 30.0  # seconds endpoints get to finish running tasks when the manager stops
# Seconds (at least; 3 heartbeats if longer) a started or adopted endpoint gets to say its first word.
# Startup includes the engine (Parsl's takes seconds) and retries after an early key refusal.
HELLO_TIMEOUT = 30.0
# Heartbeat intervals after registering within which the service sends again every task still open here;
# an adopted endpoint's result for a task not sent by then is for one the service has finished.
UNCLAIMED_GRACE = 10
GroupKey = tuple[str, str]  # (submitter identity id, canonical user endpoint config)


@dataclass
class EndpointLink:
    endpoint_id: str
    pid: int
    account: str
    keys: set[GroupKey] = field(default_factory=set)
    routing_id: bytes | None = None
    queued: list[QueuedTask] = field(default_factory=list)
    in_flight: set[str] = field(default_factory=set)
    started: set[str] = field(default_factory=set)
    retired: bool = False
    last_heard: float = field(default_factory=time.monotonic)  # until it connects: when it was started
    functions_sent: set[str] = field(default_factory=set)
    window: int = 1  # tasks it may hold at once, as its CREDIT says (1 until it has said)
    stopped_because: str = ""  # why the router had it killed, for its tasks' reasons
    adopted: bool = False  # from the manager's previous life: it may hold results this router never sent
    unclaimed: dict[str, float] = field(default_factory=dict)  # task id -> first resent while registered
    done: int = 0  # results forwarded to the service, for the status file


@dataclass
class SpawnWait:
    """Tasks of one group waiting for the spawner's answer (request_id 0: waiting for a spawn slot)."""

    group: TaskGroup
    request_id: int = 0
    tasks: list[QueuedTask] = field(default_factory=list)


class Router:
    def __init__(self, config: ManagerConfig, manager_secret_key: str, endpoint_address: str,
                 endpoint_secret_key: str, spawner: socketlib.socket, options: EndpointOptions | None = None) -> None:
        self.config = config
        self.endpoint_address = endpoint_address
        self.endpoint_public_key = public_from_secret(endpoint_secret_key)
        self.context = zmq.Context()
        self.endpoint_keys: dict[str, str] = {}  # endpoint public key -> endpoint id (read by the ZAP thread)
        self.zap = ZapHandler(self.context, {ZAP_DOMAIN: self.endpoint_keys.get})
        self.service = self.context.socket(zmq.DEALER)
        self.service.linger = 0
        self.service.sndhwm = self.service.rcvhwm = 100_000
        self.service.reconnect_ivl_max = 5000  # back off to 5 s while the service is down
        make_curve_client(self.service, config.service_public_key, manager_secret_key)
        self.endpoints_socket = self.context.socket(zmq.ROUTER)
        self.endpoints_socket.router_mandatory = True
        self.endpoints_socket.linger = 0
        # libzmq drops (and disconnects) a peer whose frame exceeds this before buffering it: a header, or a
        # result payload of the endpoint's own limit, with room to spare; the same on the service link.
        self.endpoints_socket.maxmsgsize = self.service.maxmsgsize = 4 * MAX_HEADER_BYTES
        make_curve_server(self.endpoints_socket, endpoint_secret_key, ZAP_DOMAIN)
        self.spawner = SpawnerLink(spawner)
        self.audit = TaskAuditTrail(config.task_log_path(), config.endpoint_id)  # the router's own task log
        self.endpoints: dict[str, EndpointLink] = {}
        self.by_group: dict[GroupKey, str] = {}
        self.spawn_waits: dict[GroupKey, SpawnWait] = {}
        self.spawn_requests: dict[int, GroupKey] = {}  # sent to the spawner, not yet answered
        self.spawn_queue: deque[GroupKey] = deque()  # waiting for one of max_concurrent_spawns
        self.held = HeldWork(config.max_queued_tasks, config.max_queued_bytes, config.submitter_share)
        self.task_endpoint: dict[str, str] = {}
        self.results_out: list[tuple[Result, Any]] = []
        self.chunks = ChunkRelay(self._send_endpoint,
                                 lambda chunk, payloads: self.service.send_multipart(encode(chunk, payloads), copy=False))
        self.argument_chunks = ArgumentRelay(self._send_endpoint, lambda request: self.service.send_multipart(
            encode(request)))
        self.started_out: list[str] = []
        self.lost_out: list[LostTask] = []
        self.acks_out: dict[str, list[str]] = defaultdict(list)  # endpoint id -> results the service now has
        self.spawner_status: ProcessStatus | None = None
        self.registering_since = 0.0
        self.last_endpoint_check = 0.0
        self.endpoint_heartbeat = config.heartbeat_interval
        self.last_heard = 0.0
        self.last_heartbeat = 0.0
        self.pause = PauseDetector(longest_turn=config.heartbeat_interval)
        self._stopping = False
        self._next_request = 0
        self.options = options or endpoint_options(config)  # for the service's ENDPOINT_INFO
        self.starting_report = StartingReport()

    # --- lifecycle ----------------------------------------------------------------

    def run(self) -> int:
        """The router process's entry: refuse unpickling for good, then serve until told to stop."""
        forbid_unpickling()
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        return self.serve()

    def serve(self) -> int:
        self.endpoints_socket.bind(self.endpoint_address)
        socket_path = self.endpoint_address.removeprefix("ipc://")
        os.chmod(socket_path, 0o666)  # CURVE, not file modes, guards it: every user's endpoint must connect
        with open(socket_path + ".pub", "w") as public:  # for diagnostics; a public key is no secret
            public.write(self.endpoint_public_key + "\n")
        self.status = StatusFile(Path(socket_path).with_name(STATUS_FILE_NAME))  # read by 'mep endpoint status'
        self.service.connect(self.config.service_address)
        self._register()
        self.metrics = router_metrics(self.config.metrics_listen, lambda: len(self.endpoints))  # served if set
        poller = zmq.Poller()
        poller.register(self.service, zmq.POLLIN)
        poller.register(self.endpoints_socket, zmq.POLLIN)
        poller.register(self.spawner.fileno(), zmq.POLLIN)
        poller.register(self.audit.wake_fd, zmq.POLLIN)
        stop_deadline = 0.0
        spawner_gone = False
        while not spawner_gone:
            with loop_turn(log, "router"):  # a fault in one turn must not take the manager down for every user
                spawner_gone, stop_deadline = self._turn(poller, stop_deadline)
        self._flush_to_service()
        self.audit.close()
        if self._stopping:  # a graceful stop hands back what it holds; a crash leaves it to the lease
            self.service.send_multipart(encode(Unregister()))
        self.service.close(linger=1000)
        self.endpoints_socket.close(linger=0)
        self.context.term()
        return 0

    def _turn(self, poller: zmq.Poller, stop_deadline: float) -> tuple[bool, float]:
        """One loop turn; (whether to stop now, the graceful stop's deadline)."""
        poller.modify(self.spawner.fileno(), zmq.POLLIN | (zmq.POLLOUT if self.spawner.wants_write else 0))
        ready = dict(poller.poll(200))
        if ready.get(self.spawner.fileno(), 0) & zmq.POLLOUT:
            self.spawner.flush()
        if ready.get(self.spawner.fileno(), 0) & zmq.POLLIN and not self._from_spawner():
            log.error("the root spawner has gone; the router stops")
            return True, stop_deadline
        if self.audit.wake_fd in ready:
            self.audit.run_posted()  # task records now on disk: their tasks may go
        self._drain(self.endpoints_socket, self._from_endpoint)
        self._drain(self.service, self._from_service)
        self._flush_acks()
        self._retry_queued()
        self._report_starting()
        self._send_credit()
        self._flush_to_service()
        self.audit.flush()
        self._keep_alive()
        self.status.update(self.endpoints.values(), sum(len(wait.tasks) for wait in self.spawn_waits.values()))
        if self._stopping and not stop_deadline:
            # Graceful stop: endpoints finish what runs (their results still flow), then exit.
            stop_deadline = time.monotonic() + STOP_GRACE
            self.spawner.send(RouterStopping())
            self._shutdown_endpoints("the manager is stopping")
        return bool(stop_deadline and (not self.endpoints or time.monotonic() > stop_deadline)), stop_deadline

    def stop(self) -> None:
        self._stopping = True

    def _drain(self, sock: zmq.Socket, handler: Any) -> None:
        for _ in range(1000):
            try:
                handler(sock.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                return

    def _register(self) -> None:
        self.registering_since = time.monotonic()
        self.service.send_multipart(encode(Register(endpoint_id=self.config.endpoint_id, mep_version=__version__)))
        self.last_heartbeat = self.last_heard = time.monotonic()

    def _keep_alive(self) -> None:
        now = time.monotonic()
        if paused := self.pause.paused(now):
            self._forgive_own_pause(now, paused)
        if now - self.last_endpoint_check > self.endpoint_heartbeat:  # the endpoints' own cadence
            self._check_endpoints(now)
            self.last_endpoint_check = now
        interval = self.config.heartbeat_interval  # the service's cadence, as it told us
        if now - self.last_heard > 3 * interval:
            log.warning("no word from the service for %.0f s; registering again", now - self.last_heard)
            self._register()
        elif now - self.last_heartbeat > interval:
            self.spawner.send(SpawnerStatusRequest())
            self.audit.check()
            processes = [process_status("router")] + ([self.spawner_status] if self.spawner_status else [])
            self.service.send_multipart(encode(Heartbeat(processes=processes)))
            self._send_credit(again=True)
            self.last_heartbeat = now

    def _forgive_own_pause(self, now: float, paused: float) -> None:
        """This process did not run (stopped, starved): the silence was ours, so every peer starts afresh."""
        log.warning("this router did not run for %.1f s (stopped or starved); its endpoints and the service get "
                    "a fresh %.0f s before any of them is taken for silent", paused, 3 * self.endpoint_heartbeat)
        self.last_heard = max(self.last_heard, now)
        for link in self.endpoints.values():
            link.last_heard = max(link.last_heard, now)

    # --- service ------------------------------------------------------------------

    def _from_service(self, frames: list[Any]) -> None:
        with handling(log, "the service", "a message"):  # nobody to answer: the service resends what matters
            self._handle_service_message(*decode(frames))

    def _handle_service_message(self, header: Any, payloads: list[Any]) -> None:
        self.last_heard = time.monotonic()
        match header:
            case Registered():
                self.registering_since = 0.0
                self.held.registered()
                self.config = self.config.model_copy(update={"heartbeat_interval": header.heartbeat_interval})
                log.info("registered with the service at %s", self.config.service_address)
                self.service.send_multipart(encode(Describe(options=self.options)))
                self.starting_report.reset()
                self.spawner.send(SpawnerStatusRequest())
            case Dispatch():
                self._dispatch(header, payloads)
            case ResultsAck():
                self._results_acknowledged(header.task_ids)
            case Heartbeat():
                pass
            case Cancel():
                self._cancel(header.task_ids)
            case ChunkRead():
                self.chunks.forward(header, self.endpoints)
            case Chunk():
                self.argument_chunks.answered(header, payloads, self.endpoints)
            case Error(code=ErrorCode.NOT_REGISTERED):
                # Every message sent before the service restarted draws this answer: register once per interval.
                if time.monotonic() - self.registering_since > self.config.heartbeat_interval:
                    log.info("the service does not know this connection (%s); registering again", header.message)
                    self._register()
            case _:
                log.warning("the service sent %s: %s", type(header).__name__, getattr(header, "message", ""))

    def _report_starting(self) -> None:
        """Tell the service which groups wait for their user endpoint to start (a task's "endpoint starting")."""
        if self.registering_since:
            return
        starting = set(self.spawn_waits)
        starting.update(key for link in self.endpoints.values() if link.routing_id is None for key in link.keys)
        report = self.starting_report.changed(starting)
        if report is not None:
            self.service.send_multipart(encode(report))

    def _dispatch(self, dispatch: Dispatch, payloads: list[Any]) -> None:
        if self._stopping:
            return  # not acknowledged: our UNREGISTER hands these back to the service
        self.held.received(len(dispatch.tasks), sum(len(frame) for frame in payloads))
        for ref in dispatch.tasks:
            if ref.fn_frame != -1:
                self.held.offer_function(ref.fn_hash, payloads[ref.fn_frame])
        # A body the service believes we hold may have been dropped meanwhile (CREDIT.forget crossed this
        # DISPATCH): such tasks go back, to come again with their body.
        refs = {ref.task_id: ref for ref in dispatch.tasks if ref.fn_hash in self.held.functions}
        returned = [ref.task_id for ref in dispatch.tasks if ref.task_id not in refs]
        # One this router has already (the service sends it again after re-registering us) stays where it is: on
        # its endpoint, which answers it or is reported lost with it, or in the queue it waits in. Taken again,
        # it would run twice.
        have = self._held_task_ids() if dispatch.tasks else set()
        for group in dispatch.groups:
            key: GroupKey = (group.submitter_id, dumps_canonical(group.user_endpoint_config))
            tasks = [QueuedTask(refs[task_id], payloads[refs[task_id].args_frame], group.runtime, group.submitter_id,
                                group.identity_assertion)
                     for task_id in group.task_ids if task_id in refs and task_id not in have]
            if not tasks:
                continue
            self.held.hold(tasks)
            if self.audit.refusal:  # nothing is taken that could not be recorded
                self._drop(tasks, ErrorCode.INTERNAL, self.audit.refusal)
                continue
            self.audit.accepted(group, refs)
            endpoint_id = self.by_group.get(key)
            if endpoint_id is not None:
                self._queue_on_endpoint(self.endpoints[endpoint_id], tasks)
            elif key in self.spawn_waits:
                self.spawn_waits[key].tasks.extend(tasks)
            else:
                self.spawn_waits[key] = SpawnWait(group=group, tasks=tasks)
                self.spawn_queue.append(key)
                self._start_spawns()
        self.held.prune()
        self.service.send_multipart(encode(DispatchAck(accepted=list(refs), returned=returned)))

    def _send_credit(self, again: bool = False) -> None:
        """Ask the service for as much work as there is room for (never while registering: see protocol.md)."""
        if self.registering_since or self._stopping:
            return
        credit = self.held.credit(again=again)
        if credit is not None:
            self.service.send_multipart(encode(credit))

    def _held_task_ids(self) -> set[str]:
        """Every task this router has: sent to an endpoint, queued for one, or waiting for a spawn."""
        held = set(self.task_endpoint)
        for link in self.endpoints.values():
            held.update(task.ref.task_id for task in link.queued)
        for wait in self.spawn_waits.values():
            held.update(task.ref.task_id for task in wait.tasks)
        return held

    def _start_spawns(self) -> None:
        """Send queued spawn requests while fewer than max_concurrent_spawns await an answer."""
        while self.spawn_queue and len(self.spawn_requests) < self.config.max_concurrent_spawns:
            key = self.spawn_queue.popleft()
            wait = self.spawn_waits[key]
            group = wait.group
            self._next_request += 1
            request = SpawnRequest(
                request_id=self._next_request, submitter_id=group.submitter_id, identities=group.identities,
                user_endpoint_config=group.user_endpoint_config, runtime=group.runtime,
                identity_assertion=group.identity_assertion)
            try:
                self.spawner.send(request)
            except ProtocolError as exc:  # e.g. an enormous config: refuse these tasks, never crash on them
                del self.spawn_waits[key]
                self._drop(wait.tasks, ErrorCode.CONFIG_INVALID, f"the user endpoint config can't be handled: {exc}")
                continue
            wait.request_id = self._next_request
            self.spawn_requests[self._next_request] = key
        if self.spawn_queue:
            log.info("%d group(s) wait for a spawn slot (max_concurrent_spawns is %d)", len(self.spawn_queue),
                     self.config.max_concurrent_spawns)

    def _cancel(self, task_ids: list[str]) -> None:
        """Tasks not yet on an endpoint end here; the endpoint stops the ones it has."""
        wanted = set(task_ids)
        queues = [link.queued for link in self.endpoints.values()] + [w.tasks for w in self.spawn_waits.values()]
        for tasks in queues:
            dropped = [task for task in tasks if task.ref.task_id in wanted]
            tasks[:] = [task for task in tasks if task.ref.task_id not in wanted]
            self._drop(dropped, ErrorCode.CANCELLED, "cancelled by the submitter before it started", CANCELLED)
        by_endpoint: dict[str, list[str]] = defaultdict(list)
        for task_id in wanted:
            endpoint_id = self.task_endpoint.get(task_id)
            if endpoint_id in self.endpoints:
                by_endpoint[endpoint_id].append(task_id)
        for endpoint_id, ids in by_endpoint.items():
            self._send_endpoint(self.endpoints[endpoint_id], Cancel(task_ids=ids))

    def _drop(self, tasks: list[QueuedTask], code: str, message: str, status: str = FAILED) -> None:
        """Held tasks that end here (refused, cancelled): their outcome goes to the service, their room is free."""
        self.held.release(tasks)
        self._fail([task.ref.task_id for task in tasks], code, message, status)

    def _fail(self, task_ids: list[str], code: str, message: str, status: str = FAILED) -> None:
        self.audit.finished(task_ids, status, code=code)
        for task_id in task_ids:
            self.task_endpoint.pop(task_id, None)
            self.results_out.append((Result(task_id=task_id, status=status, code=code, message=message), None))

    def _flush_to_service(self) -> None:
        """What this loop turn produced for the service goes in one message of each kind."""
        if self.started_out:
            self.service.send_multipart(encode(Started(task_ids=self.started_out)))
            self.started_out = []
        if self.lost_out:
            self.service.send_multipart(encode(TasksLost(lost=self.lost_out)))
            self.lost_out = []
        if not self.results_out:
            return
        results: list[Result] = []
        payloads: list[Any] = []
        for result, payload in self.results_out:
            result.payload_frame = -1
            if payload is not None:
                result.payload_frame = len(payloads)
                payloads.append(payload)
            results.append(result)
        self.results_out.clear()
        self.service.send_multipart(encode(Results(results=results), payloads), copy=False)

    def _results_acknowledged(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            endpoint_id = self.task_endpoint.pop(task_id, None)
            if endpoint_id in self.endpoints:
                self.acks_out[endpoint_id].append(task_id)

    def _flush_acks(self) -> None:
        """The service's acknowledgements of this loop turn go to each endpoint as one message."""
        for endpoint_id, ids in self.acks_out.items():
            for start in range(0, len(ids), MAX_IDS_PER_REQUEST) if endpoint_id in self.endpoints else ():
                self._send_endpoint(self.endpoints[endpoint_id],
                                    ResultsAck(task_ids=ids[start:start + MAX_IDS_PER_REQUEST]))
        self.acks_out.clear()

    # --- spawner ------------------------------------------------------------------

    def _from_spawner(self) -> bool:
        try:
            message = self.spawner.receive()
        except BlockingIOError:
            return True
        except MepError as exc:
            log.error("ignoring a bad message from the spawner: %s", exc)
            return True
        if message is None:
            return False
        match message:
            case Spawned():
                self.metrics.on_spawned(message.reused)
                self._spawned(message)
            case SpawnRefused():
                self.metrics.on_refused(message.code, message.step)
                key = self.spawn_requests.pop(message.request_id, None)
                wait = self.spawn_waits.pop(key, None) if key else None
                if wait is not None:
                    log.info("spawn refused (%s): %s", message.code, message.message,
                             extra={"identity_id": wait.group.submitter_id})
                    self._drop(wait.tasks, message.code, message.message)
                self._start_spawns()
            case EndpointExited():
                self._endpoint_exited(message)
            case SpawnerStatus():
                self.spawner_status = message.process
            case RemapGroups():
                log.info("mapping each submitter afresh: %s", message.reason)
                self.by_group.clear()
        return True

    def _spawned(self, message: Spawned) -> None:
        key = self.spawn_requests.pop(message.request_id, None)
        wait = self.spawn_waits.pop(key, None) if key else None
        link = self.endpoints.get(message.endpoint_id)
        if link is None:
            link = self.endpoints[message.endpoint_id] = EndpointLink(
                endpoint_id=message.endpoint_id, pid=message.pid, account=message.account,
                adopted=message.reused and not message.request_id)
            self.endpoint_keys[message.public_key] = message.endpoint_id
            log.info("endpoint %s (pid %d) started for %s", message.endpoint_id, message.pid, message.account,
                     extra={"endpoint_id": message.endpoint_id, "account": message.account})
        if key is not None:
            link.keys.add(key)
            self.by_group[key] = link.endpoint_id
        if wait is not None:
            self._queue_on_endpoint(link, wait.tasks)
        self._start_spawns()

    def _endpoint_exited(self, message: EndpointExited) -> None:
        link = self.endpoints.pop(message.endpoint_id, None)
        if link is None:
            return
        for key in link.keys:
            if self.by_group.get(key) == link.endpoint_id:
                del self.by_group[key]
        for public_key in [k for k, v in self.endpoint_keys.items() if v == link.endpoint_id]:
            del self.endpoint_keys[public_key]
        self.held.release(link.queued)
        lost = list(link.in_flight) + [task.ref.task_id for task in link.queued]
        # Results it sent that the service has not acknowledged: if the service never got them (it was
        # unreachable), it must hear these tasks are lost, or they stay dispatched for good. It ignores the
        # report for those it has. Not charged an attempt: they ran to the end.
        unconfirmed = [task_id for task_id, endpoint_id in self.task_endpoint.items()
                       if endpoint_id == link.endpoint_id and task_id not in link.in_flight]
        for task_id in unconfirmed:
            del self.task_endpoint[task_id]
            self.lost_out.append(LostTask(task_id=task_id, attempted=False, reason=(
                f"the user endpoint {link.stopped_because or message.how} before the service had this task's "
                "result")))
        log.info("endpoint %s of %s %s; %d task(s) lost with it", link.endpoint_id, link.account, message.how,
                 len(lost) + len(unconfirmed), extra={"endpoint_id": link.endpoint_id, "account": link.account})
        if not lost:
            return
        if link.routing_id is None and not message.signalled:  # it failed by itself: starting it again won't help
            detail = f"the user endpoint {message.how} while starting"
            if message.log_tail:
                detail += f"; the last lines of its log:\n{message.log_tail}"
            self._fail(lost, ErrorCode.SPAWN_FAILED, detail)
            return
        self.audit.finished(lost, "lost", endpoint_id=link.endpoint_id, account=link.account)
        for task_id in lost:  # the service retries them, or fails them once they used up their attempts
            self.task_endpoint.pop(task_id, None)
            # Anything the endpoint had counts as an attempt, started or not: a task that kills its endpoint
            # at once may never have been reported started, and must not be retried forever.
            attempted = task_id in link.in_flight or link.routing_id is None
            doing = "running" if task_id in link.started else "holding"
            reason = f"the user endpoint {link.stopped_because or message.how} while {doing} this task"
            self.lost_out.append(LostTask(task_id=task_id, attempted=attempted, reason=reason))

    # --- user endpoints -------------------------------------------------------------

    def _from_endpoint(self, frames: list[Any]) -> None:
        routing_id = frames[0].bytes
        endpoint_id = frames[1].get("User-Id") if len(frames) > 1 else ""
        link = self.endpoints.get(endpoint_id)
        if link is None:
            log.warning("message from endpoint %s, which this router does not know; ignored", endpoint_id)
            return
        # Logged, not answered: an endpoint that sends what it should not is broken or hostile either way.
        with handling(log, f"endpoint {endpoint_id} of {link.account}", "a message"):
            self._handle_endpoint_message(link, routing_id, *decode(frames[1:]))

    def _handle_endpoint_message(self, link: EndpointLink, routing_id: bytes, header: Any,
                                 payloads: list[Any]) -> None:
        endpoint_id = link.endpoint_id
        link.last_heard = time.monotonic()
        if link.routing_id not in (None, routing_id) or (link.routing_id is None and not isinstance(header, Ready)):
            # An adopted endpoint reconnecting after a manager restart: its first message tells us where it is.
            link.routing_id = routing_id
            self._send_endpoint(link, Heartbeat())
            self._send_queued(link)
        match header:
            case Ready():
                link.routing_id = routing_id
                link.functions_sent.clear()
                self._send_queued(link)
            case Started():
                self._endpoint_started(link, header.task_ids)
            case Heartbeat():
                pass
            case Credit():
                link.window = max(1, header.tasks)
                self._send_queued(link)
            case Results():
                self._endpoint_started(link, header.started)  # relayed before the results, as if sent alone
                self._endpoint_results(link, header, payloads)
            case Chunk():
                if not self.chunks.answered(endpoint_id, header, payloads):
                    log.warning("endpoint %s sent a chunk of a read it was not asked for; dropped", endpoint_id)
            case ChunkRequest():
                self.argument_chunks.forward(link, header, self.task_endpoint)
            case IdleExit():
                if not link.in_flight and not link.queued:
                    self._retire(link, "idle")
            case _:
                log.warning("endpoint %s sent an unexpected %s", endpoint_id, type(header).__name__)

    def _endpoint_started(self, link: EndpointLink, task_ids: list[str]) -> None:
        ids = [task_id for task_id in task_ids if self.task_endpoint.get(task_id) == link.endpoint_id]
        link.started.update(ids)
        self.started_out += ids

    def _endpoint_results(self, link: EndpointLink, header: Results, payloads: list[Any]) -> None:
        outcomes: dict[tuple[str, str], list[str]] = defaultdict(list)  # one task log record per outcome
        for result in header.results:
            # task_endpoint holds a task from when it is sent to an endpoint until the service has the
            # result, so an endpoint's resend (say, after a service restart) is forwarded again.
            if self.task_endpoint.get(result.task_id) != link.endpoint_id:
                self._refuse_result(link, result.task_id)
                continue
            link.in_flight.discard(result.task_id)
            link.started.discard(result.task_id)
            link.unclaimed.pop(result.task_id, None)
            outcomes[result.status, result.code].append(result.task_id)
            payload = payloads[result.payload_frame] if result.payload_frame != -1 else None
            self.results_out.append((result, payload))
            link.done += 1
            log.debug("result of task %s (%s) from endpoint %s", result.task_id, result.status, link.endpoint_id,
                      extra={"task_id": result.task_id, "endpoint_id": link.endpoint_id, "account": link.account})
        for (status, code), task_ids in outcomes.items():
            self.audit.finished(task_ids, status, code=code, endpoint_id=link.endpoint_id, account=link.account)

    def _refuse_result(self, link: EndpointLink, task_id: str) -> None:
        """A result for a task this router did not send to ``link``.

        An adopted endpoint resends the results it holds unacknowledged, which
        this new router never sent it: those still in flight at the service
        come back in its next dispatch (the endpoint then sends the result
        again, and it is accepted), the others the service has already. So
        they are dropped quietly, with one line per endpoint; one still unsent
        ``UNCLAIMED_GRACE`` intervals after registering is acknowledged to the
        endpoint, so that it stops resending it. From any other endpoint it is
        worth a warning: a result is accepted only from the endpoint its task
        was sent to.
        """
        if not link.adopted:
            log.warning("endpoint %s (%s) sent a result for task %s, which was not sent to it; refused",
                        link.endpoint_id, link.account, task_id,
                        extra={"task_id": task_id, "endpoint_id": link.endpoint_id, "account": link.account})
            return
        now = time.monotonic()
        if not link.unclaimed:
            log.info("adopted endpoint %s (%s) resends results of tasks this router has not been given (yet); "
                     "they are dropped: the service sends the open ones again, and their results then count",
                     link.endpoint_id, link.account)
        if self.registering_since or task_id not in link.unclaimed:
            link.unclaimed[task_id] = now  # the wait starts once the service could have sent it again
            log.debug("adopted endpoint %s resent a result for task %s, unknown here; dropped", link.endpoint_id,
                      task_id)
        elif now - link.unclaimed[task_id] > UNCLAIMED_GRACE * self.config.heartbeat_interval:
            # Long registered and never sent it: the service has its outcome. Let the endpoint forget it,
            # or it resends it for ever and never idles out. (If the service sends it after all, it runs again.)
            del link.unclaimed[task_id]
            self._send_endpoint(link, ResultsAck(task_ids=[task_id]))

    def _check_endpoints(self, now: float) -> None:
        """Heartbeat every connected endpoint; one silent for three intervals is hung: stop it for good.

        One that never says its first word is stopped the same way, after ``HELLO_TIMEOUT``: its tasks
        must not wait behind it forever.
        """
        for link in list(self.endpoints.values()):
            if link.retired:
                continue
            silent = now - link.last_heard
            if link.routing_id is None:
                if silent > max(3 * self.endpoint_heartbeat, HELLO_TIMEOUT):
                    log.warning("endpoint %s of %s has not connected %.0f s after it was started; stopping it",
                                link.endpoint_id, link.account, silent)
                    link.stopped_because = f"did not connect to the manager within {silent:.0f} s and was stopped"
                    self._retire(link, "never connected", kill=True)
            elif silent > 3 * self.endpoint_heartbeat:
                log.warning("endpoint %s of %s has been silent for %.0f s; stopping it", link.endpoint_id,
                            link.account, silent)
                link.stopped_because = f"was silent for {silent:.0f} s and was stopped"
                self._retire(link, "silent", kill=True)  # its exit report then settles its tasks
            else:
                self._send_endpoint(link, Heartbeat())

    def _retry_queued(self) -> None:
        """Tasks an endpoint could not take earlier (its window was full, their records not yet on disk) go now."""
        for link in self.endpoints.values():
            if link.queued and self.audit.refusal:  # their records may never have been written: none goes
                self._drop(link.queued, ErrorCode.INTERNAL, self.audit.refusal)
                link.queued.clear()
            elif link.queued and link.routing_id is not None and not link.retired:
                self._send_queued(link)

    def _queue_on_endpoint(self, link: EndpointLink, tasks: list[QueuedTask]) -> None:
        if self.audit.refusal:  # nothing runs unrecorded
            self._drop(tasks, ErrorCode.INTERNAL, self.audit.refusal)
            return
        link.queued.extend(tasks)
        if link.routing_id is not None:
            self._send_queued(link)

    def _send_queued(self, link: EndpointLink) -> None:
        """Send the endpoint as many queued tasks as its window has room for, oldest first, once recorded."""
        # Tasks queued since the last look (or while it was not yet connected) are a tail of the queue: their
        # "routed" record goes to the task log now, as one batch, so it is on disk by the time the window has
        # room (one record per arrival, not per freed slot).
        new = 0
        while new < len(link.queued) and not link.queued[-1 - new].recorded:
            new += 1
        if new:
            self.audit.routed(link.endpoint_id, link.account, link.queued[-new:])
        room = max(0, link.window - len(link.in_flight))
        if room < max(1, link.window // 2):
            # Refilled once half the window is free, not at each freed slot, so tasks go in batches (fewer
            # messages per task); the half still there keeps the endpoint's workers busy meanwhile (the reference
            # endpoint's window is its slots plus a prefetch at least as large: mep.endpoint.main.task_window).
            return
        # Records are written in queue order, so the recorded tasks are a head of the queue: only the part that
        # fits the window is looked at (a freed slot must not cost a pass over a queue of thousands).
        batch = []
        for task in link.queued[:room]:
            if not self.audit.is_recorded(task):
                break
            batch.append(task)
        if not batch:
            return  # sent once a result frees a slot, or once their "routed" records are on disk
        refs: list[TaskRef] = []
        payloads: list[Any] = []
        runtimes: dict[tuple, int] = {}
        assertions: dict[str, int] = {}
        for task in batch:
            runtime = runtimes.setdefault(msgspec.structs.astuple(task.runtime), len(runtimes))
            ref = TaskRef(task_id=task.ref.task_id, fn_hash=task.ref.fn_hash, args_frame=len(payloads),
                          runtime=runtime, walltime=task.ref.walltime, resources=task.ref.resources,
                          large_args=task.ref.large_args,
                          assertion=assertions.setdefault(task.assertion, len(assertions)))
            payloads.append(task.args)
            if ref.fn_hash not in link.functions_sent:
                ref.fn_frame = len(payloads)
                payloads.append(self.held.functions[ref.fn_hash])
                link.functions_sent.add(ref.fn_hash)
            refs.append(ref)
        tasks = Tasks(tasks=refs, runtimes=[Runtime(*key) for key in runtimes], assertions=list(assertions))
        if self._send_endpoint(link, tasks, payloads):
            for ref in refs:
                link.in_flight.add(ref.task_id)
                self.task_endpoint[ref.task_id] = link.endpoint_id
            for ref in refs:
                log.debug("task %s sent to endpoint %s", ref.task_id, link.endpoint_id,
                          extra={"task_id": ref.task_id, "endpoint_id": link.endpoint_id, "account": link.account})
            del link.queued[:len(batch)]
            self.held.release(batch)
        else:
            link.functions_sent.difference_update(ref.fn_hash for ref in refs)

    def _send_endpoint(self, link: EndpointLink, header: msgspec.Struct, payloads: list[Any] | None = None) -> bool:
        try:
            self.endpoints_socket.send_multipart([link.routing_id, *encode(header, payloads or [])],
                                                 zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as exc:
            log.debug("endpoint %s is not reachable right now (%s); will retry", link.endpoint_id, exc.strerror)
            return False

    def _retire(self, link: EndpointLink, reason: str, kill: bool = False) -> None:
        """New work for this endpoint's groups goes to a fresh endpoint from now on."""
        link.retired = True
        for key in link.keys:
            if self.by_group.get(key) == link.endpoint_id:
                del self.by_group[key]
        self.spawner.send(RetireEndpoint(endpoint_id=link.endpoint_id, kill=kill))
        if not kill:
            self._send_endpoint(link, Shutdown(reason=reason))

    def _shutdown_endpoints(self, reason: str) -> None:
        for link in self.endpoints.values():
            if link.routing_id is not None:
                self._send_endpoint(link, Shutdown(reason=reason))
