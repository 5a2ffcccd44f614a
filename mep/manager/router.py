"""The unprivileged half of the manager: service link, task routing, results back.

The router holds every network socket and every task, and no privilege. It
groups dispatched tasks by (submitter, user endpoint config); for a group
without a live endpoint it asks the root spawner for one over the private
socketpair, queueing the group's tasks until the endpoint connects. User
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
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from mep import __version__
from mep.config.manager import ManagerConfig
from mep.errors import ErrorCode, MepError, ProtocolError
from mep.protocol import decode, encode
from mep.protocol.curve import ZapHandler, make_curve_client, make_curve_server, public_from_secret
from mep.protocol.guard import forbid_unpickling, process_status
from mep.protocol.messages import (
    AuditStatus,
    CANCELLED,
    Cancel,
    LostTask,
    Started,
    TasksLost,
    Unregister,
    FAILED,
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
from mep.manager.spawner_link import SpawnerLink
from mep.manager.task_audit import TaskAuditTrail
from mep.metrics import router_metrics
from mep.service.store import dumps_canonical

log = logging.getLogger("mep.router")

ZAP_DOMAIN = "mep-endpoints"
STOP_GRACE = 30.0  # seconds endpoints get to finish running tasks when the manager stops
GroupKey = tuple[str, str]  # (submitter identity id, canonical user endpoint config)


@dataclass
class QueuedTask:
    ref: TaskRef
    args: Any  # zmq.Frame
    runtime: Runtime


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
    last_heard: float = field(default_factory=time.monotonic)
    functions_sent: set[str] = field(default_factory=set)


@dataclass
class SpawnWait:
    """Tasks of one group waiting for the spawner's answer."""

    request_id: int
    tasks: list[QueuedTask] = field(default_factory=list)


class Router:
    def __init__(self, config: ManagerConfig, manager_secret_key: str, endpoint_address: str,
                 endpoint_secret_key: str, spawner: socketlib.socket) -> None:
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
        make_curve_server(self.endpoints_socket, endpoint_secret_key, ZAP_DOMAIN)
        self.spawner = SpawnerLink(spawner)
        self.audit = TaskAuditTrail(self.spawner)  # every task's records go to the spawner's audit log
        self.endpoints: dict[str, EndpointLink] = {}
        self.by_group: dict[GroupKey, str] = {}
        self.spawn_waits: dict[GroupKey, SpawnWait] = {}
        self.spawn_requests: dict[int, GroupKey] = {}
        self.functions: dict[str, Any] = {}  # fn hash -> frame, to forward to endpoints that lack it
        self.task_endpoint: dict[str, str] = {}
        self.results_out: list[tuple[Result, Any]] = []
        self.started_out: list[str] = []
        self.lost_out: list[LostTask] = []
        self.spawner_status: ProcessStatus | None = None
        self.registering_since = 0.0
        self.last_endpoint_check = 0.0
        self.endpoint_heartbeat = config.heartbeat_interval
        self.last_heard = 0.0
        self.last_heartbeat = 0.0
        self._stopping = False
        self._next_request = 0

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
        self.service.connect(self.config.service_address)
        self._register()
        self.metrics = router_metrics(self.config.metrics_listen, lambda: len(self.endpoints))  # served if set
        poller = zmq.Poller()
        poller.register(self.service, zmq.POLLIN)
        poller.register(self.endpoints_socket, zmq.POLLIN)
        poller.register(self.spawner.fileno(), zmq.POLLIN)
        stop_deadline = 0.0
        while True:
            poller.modify(self.spawner.fileno(), zmq.POLLIN | (zmq.POLLOUT if self.spawner.wants_write else 0))
            ready = dict(poller.poll(200))
            if ready.get(self.spawner.fileno(), 0) & zmq.POLLOUT:
                self.spawner.flush()
            if ready.get(self.spawner.fileno(), 0) & zmq.POLLIN and not self._from_spawner():
                log.error("the root spawner has gone; the router stops")
                break
            self._drain(self.endpoints_socket, self._from_endpoint)
            self._drain(self.service, self._from_service)
            self._retry_queued()
            self._flush_to_service()
            self.audit.flush()
            self._keep_alive()
            if self._stopping and not stop_deadline:
                # Graceful stop: endpoints finish what runs (their results still flow), then exit.
                stop_deadline = time.monotonic() + STOP_GRACE
                self.spawner.send(RouterStopping())
                self._shutdown_endpoints("the manager is stopping")
            if stop_deadline and (not self.endpoints or time.monotonic() > stop_deadline):
                break
        self._flush_to_service()
        self.audit.flush()
        if self._stopping:  # a graceful stop hands back what it holds; a crash leaves it to the lease
            self.service.send_multipart(encode(Unregister()))
        self.service.close(linger=1000)
        self.endpoints_socket.close(linger=0)
        self.context.term()
        return 0

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
        if now - self.last_endpoint_check > self.endpoint_heartbeat:  # the endpoints' own cadence
            self._check_endpoints(now)
            self.last_endpoint_check = now
        interval = self.config.heartbeat_interval  # the service's cadence, as it told us
        if now - self.last_heard > 3 * interval:
            log.warning("no word from the service for %.0f s; registering again", now - self.last_heard)
            self._register()
        elif now - self.last_heartbeat > interval:
            self.spawner.send(SpawnerStatusRequest())
            processes = [process_status("router")] + ([self.spawner_status] if self.spawner_status else [])
            self.service.send_multipart(encode(Heartbeat(processes=processes)))
            self.last_heartbeat = now

    # --- service ------------------------------------------------------------------

    def _from_service(self, frames: list[Any]) -> None:
        try:
            header, payloads = decode(frames)
        except MepError as exc:
            log.warning("ignoring a malformed message from the service: %s", exc)
            return
        self.last_heard = time.monotonic()
        match header:
            case Registered():
                self.registering_since = 0.0
                self.config = self.config.model_copy(update={"heartbeat_interval": header.heartbeat_interval})
                log.info("registered with the service at %s", self.config.service_address)
                self.spawner.send(SpawnerStatusRequest())
            case Dispatch():
                self._dispatch(header, payloads)
            case ResultsAck():
                self._results_acknowledged(header.task_ids)
            case Heartbeat():
                pass
            case Cancel():
                self._cancel(header.task_ids)
            case Error(code=ErrorCode.NOT_REGISTERED):
                # Every message sent before the service restarted draws this answer: register once per interval.
                if time.monotonic() - self.registering_since > self.config.heartbeat_interval:
                    log.info("the service does not know this connection (%s); registering again", header.message)
                    self._register()
            case _:
                log.warning("the service sent %s: %s", type(header).__name__, getattr(header, "message", ""))

    def _dispatch(self, dispatch: Dispatch, payloads: list[Any]) -> None:
        if self._stopping:
            return  # not acknowledged: our UNREGISTER hands these back to the service
        refs = {ref.task_id: ref for ref in dispatch.tasks}
        for ref in dispatch.tasks:
            if ref.fn_frame != -1:
                self.functions[ref.fn_hash] = payloads[ref.fn_frame]
        for group in dispatch.groups:
            key: GroupKey = (group.submitter_id, dumps_canonical(group.user_endpoint_config))
            tasks = [QueuedTask(refs[task_id], payloads[refs[task_id].args_frame], group.runtime)
                     for task_id in group.task_ids if task_id in refs]
            self.audit.accepted(group, refs)
            endpoint_id = self.by_group.get(key)
            if endpoint_id is not None:
                self._queue_on_endpoint(self.endpoints[endpoint_id], tasks)
            elif key in self.spawn_waits:
                self.spawn_waits[key].tasks.extend(tasks)
            else:
                self._request_spawn(key, group, tasks)
        self.service.send_multipart(encode(DispatchAck(accepted=list(refs))))

    def _request_spawn(self, key: GroupKey, group: TaskGroup, tasks: list[QueuedTask]) -> None:
        self._next_request += 1
        request = SpawnRequest(
            request_id=self._next_request, submitter_id=group.submitter_id, identities=group.identities,
            user_endpoint_config=group.user_endpoint_config, runtime=group.runtime,
            identity_assertion=group.identity_assertion)
        try:
            self.spawner.send(request)
        except ProtocolError as exc:  # e.g. an enormous config: refuse these tasks, never crash on them
            self._fail([task.ref.task_id for task in tasks], ErrorCode.CONFIG_INVALID,
                       f"the user endpoint config can't be handled: {exc}")
            return
        self.spawn_waits[key] = SpawnWait(request_id=self._next_request, tasks=tasks)
        self.spawn_requests[self._next_request] = key

    def _cancel(self, task_ids: list[str]) -> None:
        """Tasks not yet on an endpoint end here; the endpoint stops the ones it has."""
        wanted = set(task_ids)
        queues = [link.queued for link in self.endpoints.values()] + [w.tasks for w in self.spawn_waits.values()]
        for tasks in queues:
            dropped = [task.ref.task_id for task in tasks if task.ref.task_id in wanted]
            tasks[:] = [task for task in tasks if task.ref.task_id not in wanted]
            self._fail(dropped, ErrorCode.CANCELLED, "cancelled by the submitter before it started", CANCELLED)
        by_endpoint: dict[str, list[str]] = defaultdict(list)
        for task_id in wanted:
            endpoint_id = self.task_endpoint.get(task_id)
            if endpoint_id in self.endpoints:
                by_endpoint[endpoint_id].append(task_id)
        for endpoint_id, ids in by_endpoint.items():
            self._send_endpoint(self.endpoints[endpoint_id], Cancel(task_ids=ids))

    def _fail(self, task_ids: list[str], code: str, message: str, status: str = FAILED) -> None:
        for task_id in task_ids:
            self.task_endpoint.pop(task_id, None)
            self.audit.finished(task_id, status, code=code)
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
        by_endpoint: dict[str, list[str]] = defaultdict(list)
        for task_id in task_ids:
            endpoint_id = self.task_endpoint.pop(task_id, None)
            if endpoint_id in self.endpoints:
                by_endpoint[endpoint_id].append(task_id)
        for endpoint_id, ids in by_endpoint.items():
            self._send_endpoint(self.endpoints[endpoint_id], ResultsAck(task_ids=ids))

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
                self.metrics.on_refused(message.code)
                key = self.spawn_requests.pop(message.request_id, None)
                wait = self.spawn_waits.pop(key, None) if key else None
                if wait is not None:
                    log.info("spawn refused (%s): %s", message.code, message.message)
                    self._fail([task.ref.task_id for task in wait.tasks], message.code, message.message)
            case EndpointExited():
                self._endpoint_exited(message)
            case SpawnerStatus():
                self.spawner_status = message.process
            case RemapGroups():
                log.info("mapping each submitter afresh: %s", message.reason)
                self.by_group.clear()
            case AuditStatus():
                self.audit.on_status(message)
        return True

    def _spawned(self, message: Spawned) -> None:
        key = self.spawn_requests.pop(message.request_id, None)
        wait = self.spawn_waits.pop(key, None) if key else None
        link = self.endpoints.get(message.endpoint_id)
        if link is None:
            link = self.endpoints[message.endpoint_id] = EndpointLink(
                endpoint_id=message.endpoint_id, pid=message.pid, account=message.account)
            self.endpoint_keys[message.public_key] = message.endpoint_id
            log.info("endpoint %s (pid %d) started for %s", message.endpoint_id, message.pid, message.account)
        if key is not None:
            link.keys.add(key)
            self.by_group[key] = link.endpoint_id
        if wait is not None:
            self._queue_on_endpoint(link, wait.tasks)

    def _endpoint_exited(self, message: EndpointExited) -> None:
        link = self.endpoints.pop(message.endpoint_id, None)
        if link is None:
            return
        for key in link.keys:
            if self.by_group.get(key) == link.endpoint_id:
                del self.by_group[key]
        for public_key in [k for k, v in self.endpoint_keys.items() if v == link.endpoint_id]:
            del self.endpoint_keys[public_key]
        lost = list(link.in_flight) + [task.ref.task_id for task in link.queued]
        log.info("endpoint %s of %s %s; %d task(s) lost with it", link.endpoint_id, link.account, message.how,
                 len(lost))
        if not lost:
            return
        if link.routing_id is None and not message.signalled:  # it failed by itself: starting it again won't help
            detail = f"the user endpoint {message.how} while starting"
            if message.log_tail:
                detail += f"; the last lines of its log:\n{message.log_tail}"
            self._fail(lost, ErrorCode.SPAWN_FAILED, detail)
            return
        for task_id in lost:  # the service retries them, or fails them once they used up their attempts
            self.task_endpoint.pop(task_id, None)
            # Anything the endpoint had counts as an attempt, started or not: a task that kills its endpoint
            # at once may never have been reported started, and must not be retried forever.
            attempted = task_id in link.in_flight or link.routing_id is None
            doing = "running" if task_id in link.started else "holding"
            reason = f"the user endpoint {message.how} while {doing} this task"
            self.lost_out.append(LostTask(task_id=task_id, attempted=attempted, reason=reason))
            self.audit.finished(task_id, "lost", endpoint_id=link.endpoint_id, account=link.account)

    # --- user endpoints -------------------------------------------------------------

    def _from_endpoint(self, frames: list[Any]) -> None:
        routing_id = frames[0].bytes
        endpoint_id = frames[1].get("User-Id") if len(frames) > 1 else ""
        link = self.endpoints.get(endpoint_id)
        if link is None:
            log.warning("message from endpoint %s, which this router does not know; ignored", endpoint_id)
            return
        try:
            header, payloads = decode(frames[1:])
        except MepError as exc:
            log.warning("ignoring a malformed message from endpoint %s: %s", endpoint_id, exc)
            return
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
                ids = [task_id for task_id in header.task_ids if self.task_endpoint.get(task_id) == endpoint_id]
                link.started.update(ids)
                self.started_out += ids
            case Heartbeat():
                pass
            case Results():
                self._endpoint_results(link, header, payloads)
            case IdleExit():
                if not link.in_flight and not link.queued:
                    self._retire(link, "idle")
            case _:
                log.warning("endpoint %s sent an unexpected %s", endpoint_id, type(header).__name__)

    def _endpoint_results(self, link: EndpointLink, header: Results, payloads: list[Any]) -> None:
        for result in header.results:
            # task_endpoint holds a task from when it is sent to an endpoint until the service has the
            # result, so an endpoint's resend (say, after a service restart) is forwarded again.
            if self.task_endpoint.get(result.task_id) != link.endpoint_id:
                log.warning("endpoint %s (%s) sent a result for task %s, which was not sent to it; refused",
                            link.endpoint_id, link.account, result.task_id)
                continue
            link.in_flight.discard(result.task_id)
            link.started.discard(result.task_id)
            self.audit.finished(result.task_id, result.status, code=result.code, endpoint_id=link.endpoint_id,
                                account=link.account)
            payload = payloads[result.payload_frame] if result.payload_frame != -1 else None
            self.results_out.append((result, payload))

    def _check_endpoints(self, now: float) -> None:
        """Heartbeat every connected endpoint; one silent for three intervals is hung: stop it for good."""
        for link in list(self.endpoints.values()):
            if link.routing_id is None or link.retired:
                continue
            if now - link.last_heard > 3 * self.endpoint_heartbeat:
                log.warning("endpoint %s of %s has been silent for %.0f s; stopping it", link.endpoint_id,
                            link.account, now - link.last_heard)
                self._retire(link, "silent", kill=True)  # its exit report then settles its tasks
            else:
                self._send_endpoint(link, Heartbeat())

    def _retry_queued(self) -> None:
        """Tasks an endpoint could not take earlier (its high-water mark was reached) go now."""
        for link in self.endpoints.values():
            if link.queued and link.routing_id is not None and not link.retired:
                self._send_queued(link)

    def _queue_on_endpoint(self, link: EndpointLink, tasks: list[QueuedTask]) -> None:
        link.queued.extend(tasks)
        if link.routing_id is not None:
            self._send_queued(link)

    def _send_queued(self, link: EndpointLink) -> None:
        if not link.queued:
            return
        if self.audit.refusal:  # nothing runs unaudited
            self._fail([task.ref.task_id for task in link.queued], ErrorCode.INTERNAL, self.audit.refusal)
            link.queued.clear()
            return
        if not self.audit.cleared(link.endpoint_id, link.account, [task.ref for task in link.queued]):
            return  # sent once the spawner has written their "routed" records
        refs: list[TaskRef] = []
        payloads: list[Any] = []
        runtimes: dict[tuple, int] = {}
        for task in link.queued:
            runtime = runtimes.setdefault(msgspec.structs.astuple(task.runtime), len(runtimes))
            ref = TaskRef(task_id=task.ref.task_id, fn_hash=task.ref.fn_hash, args_frame=len(payloads),
                          runtime=runtime, walltime=task.ref.walltime)
            payloads.append(task.args)
            if ref.fn_hash not in link.functions_sent:
                ref.fn_frame = len(payloads)
                payloads.append(self.functions[ref.fn_hash])
                link.functions_sent.add(ref.fn_hash)
            refs.append(ref)
        if self._send_endpoint(link, Tasks(tasks=refs, runtimes=[Runtime(*key) for key in runtimes]), payloads):
            for ref in refs:
                link.in_flight.add(ref.task_id)
                self.task_endpoint[ref.task_id] = link.endpoint_id
            self.audit.sent(refs)
            link.queued.clear()
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
