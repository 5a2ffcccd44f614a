"""The user endpoint's process: read the boot document, connect to the router, run tasks, idle out.

It connects to the manager's router over its ipc socket with the CURVE key
pair it was given on stdin, which is how the router knows which endpoint
every message comes from. Results are kept until the router acknowledges
them, and sent again if the acknowledgement does not come.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import queue
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq
from setproctitle import setproctitle

from mep.cli.logs import use_format
from mep.config.task_resources import ResourceLimitError
from mep.endpoint.config_cache import ConfigCache, cache_key, default_directory
from mep.endpoint.engines import UnusableEngine, make_engine
from mep.endpoint.forker import discard_early
from mep.endpoint.large_args import ArgumentFetches
from mep.endpoint.large_results import LargeResultFiles
from mep.endpoint.settings import EndpointConfig, ProcessEndpointSettings, read_settings
from mep.endpoint.versions import refuse_mismatch
from mep.endpoint.worker import Outcome
from mep.errors import (
    AssertionRefusedError,
    ConfigInvalidError,
    ConfigurationError,
    ErrorCode,
    MepError,
    TemplateError,
)
from mep.protocol import decode, encode
from mep.protocol.assertions import CachingVerifier, Verified, check_task_claims
from mep.protocol.curve import make_curve_client
from mep.protocol.framing import DEFAULT_MAX_PAYLOAD_BYTES, MAX_HEADER_BYTES
from mep.protocol.liveness import PauseDetector
from mep.protocol.messages import (
    CANCELLED,
    FAILED,
    SUCCESS,
    Cancel,
    Chunk,
    ChunkRead,
    Credit,
    EndpointBoot,
    Heartbeat,
    IdleExit,
    Ready,
    Result,
    Results,
    ResultsAck,
    Shutdown,
    Started,
    TaskRef,
    Tasks,
)
from mep.protocol.receive import handling, loop_turn

log = logging.getLogger("mep.endpoint")

RESEND_AFTER = 10.0
RESEND_CHECK_EVERY = 1.0  # seconds between looks for results to resend (a look passes over every one held)
SHUTDOWN_GRACE = 30.0  # seconds running tasks get to finish when the manager stops this endpoint
ORPHAN_AFTER = 60.0  # seconds without the manager after which the endpoint stops waiting to be adopted
# After the router refuses this endpoint's key (libzmq then gives up on the connection for good, and drops
# what was queued on it): connect again after this long, doubling up to the maximum.
REFUSED_RETRY_FIRST = 0.2
REFUSED_RETRY_MAX = 5.0


@dataclass
class ActiveTask:
    walltime: float  # 0: none
    started_at: float = 0.0  # monotonic; 0 until a worker has it


class UserEndpoint:
    """One user's endpoint: tasks in from the router, through the engine, results back.

    Everything runs on this thread; the engine reports through a queue and a
    wake-up pipe. The router is told when each task starts (for the task's
    state and its retry accounting) and gets each result until it acknowledges
    it. A task past its walltime, or cancelled by its submitter, is stopped in
    the engine.
    """

    def __init__(self, boot: EndpointBoot, config: EndpointConfig, refusal: MepError | None = None) -> None:
        self.boot = boot
        self.config = config
        self.assertions = CachingVerifier(boot.assertion_keys, boot.manager_endpoint_id)
        self.heartbeat_interval = boot.heartbeat_interval
        self._events: queue.SimpleQueue[tuple[str, str, Outcome | None]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        self._wake_pending = False  # a wake-up byte is in the pipe that the loop has not taken yet
        self._sleeping = False  # the loop is in (or about to enter) its poll: an event must wake it
        self._next_resend_check = 0.0
        self.large_results = LargeResultFiles(config.large_results, boot.endpoint_id, boot.account)
        self.large_args = ArgumentFetches(self.large_results.directory,
                                          lambda request: self._send(encode(request)), self._task_done)
        # The engine first: the processes it starts must not inherit the ZeroMQ context's descriptors.
        # A config that did not render: every task fails with why (the researcher's typed error), none runs.
        self.engine = make_engine(config, self._task_started, self._task_done,
                                  result_file=self.large_results.destination) if refusal is None \
            else UnusableEngine(str(refusal), self._task_done, code=refusal.code)
        self.functions: dict[str, bytes] = {}
        self.active: dict[str, ActiveTask] = {}
        self.unacknowledged: dict[str, tuple[Result, bytes, float]] = {}
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.linger = 1000
        self.socket.reconnect_ivl_max = 5000
        self.socket.maxmsgsize = 4 * MAX_HEADER_BYTES  # as the router's own endpoint socket
        make_curve_client(self.socket, boot.router_public_key, boot.secret_key)
        # The router may not know our key yet when we first connect (it learns it from the spawner, which
        # may report the spawn after we are up): a refusal is watched for and answered by connecting again.
        self.refusals = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self._reconnect_at = 0.0
        self._reconnect_delay = REFUSED_RETRY_FIRST
        self.socket.connect(boot.router_address)
        self._draining_since = 0.0
        self._drain_reason = ""

    # engine callbacks: any thread
    def _task_started(self, task_id: str) -> None:
        self._events.put(("started", task_id, None))
        self._wake()

    def _wake(self) -> None:
        """Wake the loop for the events queued, only if it sleeps, with one byte per batch of them.

        A busy loop takes them before it sleeps again: it says it sleeps, then looks at the queue (and
        does not wait if anything is there), while an event is queued before these flags are looked at;
        and the loop clears ``_wake_pending`` before it takes the events. So an event is always either
        seen by the loop's look or woken for.
        """
        if self._sleeping and not self._wake_pending:
            self._wake_pending = True
            os.write(self._wake_write, b"w")

    def _task_done(self, task_id: str, outcome: Outcome) -> None:
        # A large result the engine's worker did not write itself (seconds for a GiB) is written here, off the
        # loop that heartbeats.
        outcome = self.large_results.keep(task_id, outcome)
        self._events.put(("done", task_id, outcome))
        self._wake()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._drain("SIGTERM"))
        self._say_ready()
        credit = encode(Credit(tasks=task_window(self.config)))
        self._send(credit)
        log.info("endpoint %s ready as %s with the %s engine", self.boot.endpoint_id, self.boot.account,
                 self.config.engine.type)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        poller.register(self.refusals, zmq.POLLIN)
        pause = PauseDetector(longest_turn=2 * self.heartbeat_interval)
        now = time.monotonic()
        last_activity = last_heard = last_heartbeat = now
        asked_to_exit = False
        while True:
            with loop_turn(log, "endpoint"):  # a fault in one turn must not lose the tasks this endpoint runs
                self._sleeping = True
                ready = dict(poller.poll(0 if not self._events.empty() else self._poll_timeout()))
                self._sleeping = False
                if self._wake_read in ready:
                    os.read(self._wake_read, 65536)
                    self._wake_pending = False
                if self.refusals in ready:
                    self._refused()
                self._reconnect_if_due()
                while (frames := self._receive_ready()) is not None:
                    self._receive(frames)
                    last_heard = time.monotonic()
                self._handle_engine_events()
                now = time.monotonic()
                if pause.paused(now):
                    last_heard = now  # this endpoint did not run (stopped): the manager's silence was ours
                self._enforce_walltimes(now)
                self.large_args.ask_again_if_late(now)
                self.large_results.sweep_if_due(now)
                if self.active or self.unacknowledged or self.large_results.keeps_alive(now):
                    last_activity = now
                    asked_to_exit = False
                self._resend_unacknowledged(now)
                if now - last_heartbeat > self.heartbeat_interval:
                    self._send(encode(Heartbeat()))
                    self._send(credit)  # again: a new router (after a restart) learns it here
                    last_heartbeat = now
                if now - last_heard > max(3 * self.heartbeat_interval, ORPHAN_AFTER):
                    # Orphaned (its manager died and did not come back to adopt it): finish what runs, then go.
                    self._drain(f"the manager has been silent for {now - last_heard:.0f} s")
                idle = now - last_activity > self.config.idle_timeout
                if idle and not asked_to_exit:
                    log.info("idle for %.0f s; asking the manager to let this endpoint exit", now - last_activity)
                    asked_to_exit = self._send(encode(IdleExit()))  # not sent: asked again next turn
            now = time.monotonic()
            # Draining ends once every task is done and its result acknowledged (a result not yet with the
            # service would be lost with this process), or when the grace period is over.
            finished = not self.active and not self.unacknowledged
            if self._draining_since and (finished or now - self._draining_since > SHUTDOWN_GRACE):
                break
        log.info("endpoint stopping (%s); %d task(s) unfinished", self._drain_reason, len(self.active))
        self.engine.shutdown()
        self.socket.disable_monitor()
        self.refusals.close()
        self.socket.close()
        self.context.term()
        return 0

    def _send(self, frames: list, *, copy: bool = True) -> bool:
        """Send to the router without ever blocking; False if it was dropped.

        A DEALER blocks a send while it has no connection to queue on (a router
        that refused our key, or is gone) or its queue is full (a stalled
        router). Blocked, this loop would neither drain on SIGTERM nor notice it
        is orphaned, so a message that can't go now is dropped: each one is sent
        again anyway (results until acknowledged, READY on reconnecting,
        heartbeat and credit every interval, chunk requests when late, IDLE_EXIT
        next turn).
        """
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            log.debug("the router can't take a message now; it is sent again later")
            return False
        return True

    def _receive_ready(self) -> list[Any] | None:
        """The next message already here, or None (no poll of its own: the loop's poll said there may be some)."""
        try:
            return self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None

    def _say_ready(self) -> None:
        if not self._send(encode(Ready(endpoint_id=self.boot.endpoint_id, pid=os.getpid()))):
            self._reconnect_at = time.monotonic() + self._reconnect_delay  # READY is what a router needs first

    def _poll_timeout(self) -> int:
        """Wake for the next heartbeat, or for the next walltime to run out."""
        timeout = self.heartbeat_interval
        now = time.monotonic()
        for task in self.active.values():
            if task.walltime and task.started_at:
                timeout = min(timeout, max(0.0, task.started_at + task.walltime - now))
        if self._reconnect_at:
            timeout = min(timeout, max(0.0, self._reconnect_at - now))
        return int(timeout * 1000) + 1

    def _refused(self) -> None:
        """The router refused our key: libzmq will not try again by itself, so we do, after a pause."""
        while self.refusals.poll(0):
            self.refusals.recv_multipart()
        if not self._reconnect_at:
            log.warning("the manager's router refused this endpoint's key (it may not have been told it yet); "
                        "connecting again in %.1f s", self._reconnect_delay)
            self._reconnect_at = time.monotonic() + self._reconnect_delay
            self._reconnect_delay = min(2 * self._reconnect_delay, REFUSED_RETRY_MAX)

    def _reconnect_if_due(self) -> None:
        if self._reconnect_at and time.monotonic() >= self._reconnect_at:
            self._reconnect_at = 0.0
            self.socket.disconnect(self.boot.router_address)
            self.socket.connect(self.boot.router_address)
            # What was queued went with the refused connection: say hello again (results are resent anyway).
            self._say_ready()

    def _drain(self, reason: str) -> None:
        """Take no more work; exit once running tasks finish (or the grace period ends)."""
        if not self._draining_since:
            self._draining_since = time.monotonic()
            self._drain_reason = reason
            os.write(self._wake_write, b"x")

    def _receive(self, frames: list[Any]) -> None:
        with handling(log, "the router", "a message"):  # logged: the router resends what matters
            self._handle(*decode(frames))

    def _handle(self, header: Any, payloads: list[Any]) -> None:
        match header:
            case Tasks():
                checked = [self._verify_assertion(text) for text in header.assertions]  # once per message
                for task in header.tasks:
                    if task.fn_frame != -1:
                        self.functions[task.fn_hash] = payloads[task.fn_frame].bytes
                    if task.task_id in self.active:
                        continue  # sent again after a manager restart: the run in progress stands
                    if task.task_id in self.unacknowledged:
                        self._send_results([self.unacknowledged[task.task_id][:2]])  # done already: say so again
                        continue
                    self.active[task.task_id] = ActiveTask(walltime=task.walltime)
                    if task.fn_hash not in self.functions:  # the router's bug, never a reason to hold the task
                        self._task_done(task.task_id, Outcome(FAILED, code=ErrorCode.UNKNOWN_FUNCTION,
                                                              message=f"the endpoint was never sent function "
                                                                      f"{task.fn_hash}"))
                        continue
                    if self._refuse_unasserted(checked, task) or refuse_mismatch(
                            header.runtimes, task, self.config, self._task_done):
                        continue
                    try:
                        resources = self.config.check_resources(task.resources)
                    except ResourceLimitError as exc:
                        self._task_done(task.task_id, Outcome(FAILED, code=ErrorCode.CONFIG_INVALID, message=str(exc)))
                        continue
                    run = functools.partial(self.engine.submit, task.task_id, task.fn_hash,
                                            self.functions[task.fn_hash], resources=resources)
                    if task.large_args is None:
                        run(payloads[task.args_frame].bytes)
                    else:  # uploaded to the service: fetched first, then run
                        self.large_args.fetch(task.task_id, task.large_args, run,
                                              as_file=self.engine.reads_argument_files)
            case Cancel():
                for task_id in header.task_ids:
                    if task_id in self.active:
                        cancelled = Outcome(CANCELLED, code=ErrorCode.CANCELLED, message="cancelled by the submitter")
                        if self.large_args.cancel(task_id):  # still fetching its arguments: never ran
                            self._task_done(task_id, cancelled)
                        else:
                            self.engine.cancel(task_id, cancelled)
            case ResultsAck():
                for task_id in header.task_ids:
                    self.unacknowledged.pop(task_id, None)
            case ChunkRead():
                self._send(encode(*self.large_results.read(header)), copy=False)
            case Chunk():
                self.large_args.received(header, payloads)
            case Heartbeat():
                pass
            case Shutdown():
                self._drain(header.reason or "the manager asked this endpoint to stop")
            case _:
                log.warning("ignoring an unexpected %s message", type(header).__name__)

    def _verify_assertion(self, assertion: str) -> Verified | AssertionRefusedError:
        """A group's assertion, checked (its signature once per endpoint: cached), or why it was refused."""
        try:
            return self.assertions.verify(assertion)
        except AssertionRefusedError as exc:
            return exc

    def _refuse_unasserted(self, checked: list[Verified | AssertionRefusedError], task: TaskRef) -> bool:
        """Fail a task the service did not sign for the identity this endpoint serves; True if it did.

        The router is not trusted for who submitted a task: only the service's
        signed assertion is. ``checked``: the message's assertions, verified.
        """
        verified = checked[task.assertion] if 0 <= task.assertion < len(checked) else self._verify_assertion("")
        try:
            if isinstance(verified, AssertionRefusedError):
                raise verified
            serves = None if self.boot.serves_any_identity else self.boot.identity_id
            check_task_claims(verified, task.task_id, serves)
        except AssertionRefusedError as exc:
            log.warning("refused task %s (%s): %s", task.task_id, exc.code, exc.admin_detail,
                        extra=self._ids(task.task_id))
            self._task_done(task.task_id, Outcome(FAILED, code=exc.code, message=str(exc)))
            return True
        return False

    def _ids(self, task_id: str) -> dict[str, str]:
        """A task's log fields (``extra=``): the JSON-lines format joins them with the service's and router's."""
        return {"task_id": task_id, "endpoint_id": self.boot.endpoint_id, "account": self.boot.account}

    def _handle_engine_events(self) -> None:
        started: list[str] = []
        finished: list[tuple[Result, bytes]] = []
        now = time.monotonic()
        while True:
            try:
                kind, task_id, outcome = self._events.get_nowait()
            except queue.Empty:
                break
            if kind == "started":
                if task_id in self.active:
                    self.active[task_id].started_at = now
                    started.append(task_id)
                    log.info("task %s started", task_id, extra=self._ids(task_id))
                continue
            if self.active.pop(task_id, None) is None:
                continue  # a cancel and a completion crossed: the first one stands
            large = self.large_results.reference(task_id)
            if len(outcome.payload) > DEFAULT_MAX_PAYLOAD_BYTES:
                outcome = Outcome(FAILED, code=ErrorCode.PAYLOAD_TOO_LARGE,
                                  message=f"the serialised {'result' if outcome.status == SUCCESS else 'exception'} "
                                          f"is {len(outcome.payload)} bytes; the limit is "
                                          f"{DEFAULT_MAX_PAYLOAD_BYTES}: write large output to a file instead")
            result = Result(task_id=task_id, status=outcome.status, code=outcome.code, message=outcome.message,
                            error_type=outcome.error_type, traceback=outcome.traceback, large=large)
            finished.append((result, outcome.payload))
            log.info("task %s finished: %s%s", task_id, outcome.status, f" ({outcome.code})" if outcome.code else "",
                     extra=self._ids(task_id))
        if finished:
            self._send_results(finished, started=started)  # one message for both
        elif started:
            self._send(encode(Started(task_ids=started)))

    def _enforce_walltimes(self, now: float) -> None:
        for task_id, task in self.active.items():
            if task.walltime and task.started_at and now - task.started_at > task.walltime:
                message = f"the task ran longer than its walltime of {task.walltime:g} s and was stopped"
                task.walltime = 0.0  # stop it once
                self.engine.cancel(task_id, Outcome(FAILED, code=ErrorCode.WALLTIME_EXCEEDED, message=message))

    def _resend_unacknowledged(self, now: float) -> None:
        if now < self._next_resend_check:  # not every turn: under load a turn comes every few results
            return
        self._next_resend_check = now + RESEND_CHECK_EVERY
        self._send_results([(result, payload) for result, payload, sent in self.unacknowledged.values()
                            if now - sent > RESEND_AFTER])

    def _send_results(self, items: list[tuple[Result, bytes]], started: list[str] | None = None) -> None:
        """Send results (again), remembering them until the router acknowledges them; ``started``: tasks to
        report started in the same message."""
        if not items:
            return
        now = time.monotonic()
        payloads: list[bytes] = []
        for result, payload in items:
            result.payload_frame = -1
            if payload:
                result.payload_frame = len(payloads)
                payloads.append(payload)
            self.unacknowledged[result.task_id] = (result, payload, now)
        self._send(encode(Results(results=[result for result, _ in items], started=started or []), payloads),
                   copy=False)


def task_window(config: EndpointConfig) -> int:
    """How many tasks to let the router send at once: what the engine can run, plus a prefetch, so a
    worker that finishes finds its next task here rather than a round trip away, and so that the router,
    which refills the window once half of it is free, sends tasks in batches (docs/protocol.md, CREDIT)."""
    engine = config.engine
    if engine.type == "htex":
        nodes = engine.provider.arguments.get("nodes_per_block", 1)
        slots = engine.workers_per_node * engine.max_blocks * (nodes if isinstance(nodes, int) and nodes > 0 else 1)
    else:
        slots = engine.workers
    return slots + max(PREFETCH, slots)


PREFETCH = 8  # tasks beyond the worker slots, at least: enough for the router's refills to come in batches


def _release_boot_pipe() -> None:
    """Put /dev/null on stdin: the spawner's pipe has done its job and workers must not inherit it."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


_PR_SET_DUMPABLE = 4


def _make_undumpable() -> None:
    """Keep this process's memory from every process of the account, its own tasks included.

    Without it a task (same uid) could read the endpoint's CURVE secret from
    /proc/<pid>/mem. Non-dumpable, the kernel makes /proc/<pid>/ root's and
    refuses ptrace and /proc/<pid>/{mem,environ,fd} to anyone without
    CAP_SYS_PTRACE, and writes no core dump. Workers exec'd from here (the
    worker forker, worker_python interpreters) are dumpable again but start from
    a fresh image that never held the secret; a plain fork inherits the flag.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(code)}")


ENDPOINT_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format=ENDPOINT_TEXT_FORMAT)
    try:
        _make_undumpable()  # before the secret is read into this process
    except OSError as exc:
        log.error("refusing to read this endpoint's keys: %s", exc)
        return 2
    try:
        boot = msgspec.json.decode(sys.stdin.buffer.read(), type=EndpointBoot)
    except msgspec.MsgspecError as exc:
        log.error("unusable boot document on stdin: %s", exc)
        return 2
    _release_boot_pipe()
    use_format(boot.log_format, ENDPOINT_TEXT_FORMAT)
    setproctitle(f"mep-endpoint {boot.account} {boot.endpoint_id}")
    config, refusal = rendered_config(boot)
    endpoint = UserEndpoint(boot, config, refusal)
    discard_early()  # the forker started by __main__, when this config's engine did not take it
    return endpoint.run()


REFUSING_IDLE_TIMEOUT = 60.0  # seconds an endpoint whose config did not render keeps answering tasks with why


def rendered_config(boot: EndpointBoot) -> tuple[EndpointConfig, MepError | None]:
    """The admin's template rendered with the researcher's options, here, as the user (never as root).

    A plain ``process`` config is checked with msgspec structs and kept in the account's cache, so the
    next start with the same inputs reads it from there instead of rendering; anything else is the
    model's. A refused config or template gives a stand-in config and the error every task is then
    failed with.
    """
    started = time.perf_counter()
    cache, key = ConfigCache(default_directory()), cache_key(boot)
    config: EndpointConfig | None = cache.load(key)
    if config is not None:
        # The cold start's own cost, logged for the admin and benchmarks/coldstart.py (which splits it by this line)
        log.info("config read from the cache in %.1f ms", (time.perf_counter() - started) * 1e3)
        return config, None
    from mep.config.render import TemplateRenderer  # jinja2 and jsonschema: only where a config is rendered

    try:
        renderer = TemplateRenderer(Path(boot.template_path), Path(boot.schema_path), template_text=boot.template,
                                    schema_text=boot.schema)
        text, document = renderer.render_document(boot.user_config, mapped_user=boot.mapped_user,
                                                  user_runtime=boot.user_runtime,
                                                  endpoint={"id": boot.manager_endpoint_id})
        config = read_settings(document)
        if config is None:  # not the plain shape, or refused: the model decides, with its message
            config = renderer.validate(text, document)
        else:
            cache.store(key, config)
    except (ConfigInvalidError, TemplateError, ConfigurationError) as exc:
        log.error("refusing every task: the user endpoint config did not render: %s", exc)
        refusal = exc if isinstance(exc, (ConfigInvalidError, TemplateError)) else TemplateError(str(exc))
        return ProcessEndpointSettings(idle_timeout=REFUSING_IDLE_TIMEOUT), refusal
    log.info("config rendered in %.1f ms", (time.perf_counter() - started) * 1e3)
    return config, None
