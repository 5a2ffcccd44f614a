"""The root spawner's loop: answer spawn requests, watch endpoint processes, report deaths, keep the audit log.

For each ``SpawnRequest`` from the router: verify the service's signed
identity assertion (the router is not trusted for who submitted), map the identity set to one
account (the mapping file is reloaded first if it changed), check the account
against policy, then either hand back the endpoint already running for the
same (identity, account, template digest, user-config digest) or fork, drop
privileges and exec a new one, directly or, with PAM on, under a session
holder (``session_holder``). Each endpoint gets a fresh CURVE key pair; the
secret goes only to the endpoint's stdin, the public half to the router. The
admin's template and schema (read here, as root, through the policy-file
checks) travel on that stdin too, with the researcher's options: the endpoint
renders and validates them as the user, after the drop, so no template code
and no user value is ever evaluated as root (nor by the router). An invalid
config makes the endpoint fail each of its tasks with the typed error.
Children are watched through pidfds, so a recycled pid can never be mistaken
for one of ours.

Nothing slow runs on the loop (syncing an audit record, a few milliseconds,
is the slowest thing it does). Mapping (an external program may take its
5 s) and starting (a PAM stack may take its 30 s) run in worker
threads whose outcomes are posted back to the loop, which alone owns the
process tables and the channel: several accounts' spawns run at once, one
account's run one at a time (a second request for it waits, then usually
reuses the endpoint the first one started). Any error in a request, an
``OSError`` included, refuses that request alone.

Every decision, endpoint start and exit and mapping reload goes to the audit
log before anything acts on it: the loop appends and syncs each record itself
(they are few next to tasks, which are the router's to record, in its own
task log). While it can't be written nothing is spawned. SIGHUP reloads the
mapping file and reopens the audit log.

The spawner supervises the router (``router_process``): if it dies, a fresh
one is started after a backoff (0.5 s, doubling to 30 s, back to 0.5 s once a
router has run for a minute) and told of every running endpoint, as after a
manager restart, so the endpoints reconnect and their work carries on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pwd
import select
import signal
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from mep.root import registry
from mep.root.accounts import Account, AccountPolicy, AccountRefused, resolve_account
from mep.root.assertions import AssertionVerifier, NonceCache, check_spawn_claims
from mep.root.audit import AuditLog, AuditUnavailableError, Inbox
from mep.root.config import RootConfig
from mep.root.errors import ConfigurationError, ErrorCode, MepError, QuotaExceededError, SpawnError, TaskRefusedError
from mep.root.guard import forbid_unpickling, process_status
from mep.root.identity import IdentityMapper, MappingContext, MappingDecision
from mep.root.keys import generate_keypair
from mep.root.logs import active_format
from mep.root.mapping_file import MappingFile, ReloadOutcome
from mep.root.messages import (EndpointBoot, EndpointExited, IdentityResource, RemapGroups, RetireEndpoint,
                               RouterStopping, Spawned, SpawnerStatus, SpawnerStatusRequest, SpawnRefused, SpawnRequest)
from mep.root.pam import require_account
from mep.root.policy_files import read_policy_file
from mep.root.privdrop import SpawnPlan, read_log_tail, resource_limits, spawn
from mep.root.receive import handling, loop_turn
from mep.root.router_process import RouterLaunch, RouterProcess, start_router
from mep.root.sdnotify import notify_ready
from mep.root.session_holder import KILL_ENDPOINT_SIGNAL, PamSettings, start_session_holder

log = logging.getLogger("mep.spawner")

STOP_GRACE = 45.0  # seconds endpoints get after SIGTERM (they give running tasks 30) before SIGKILL
SPAWN_WORKERS = 8  # spawns (mapping, PAM, start) in progress at once, across accounts
FIRST_RESTART_DELAY = 0.5  # seconds before a dead router is started again, doubling while it keeps dying
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 60.0  # seconds a router must run before its death counts as a fresh failure
# (identity id, "" when identities may share endpoints; uid; template digest; user config and runtime digest)
EndpointKey = tuple[str, int, str, str]


@dataclass
class EndpointProcess:
    endpoint_id: str
    pid: int  # the process we wait for: the endpoint, or its session holder
    pidfd: int
    account: Account
    key: EndpointKey
    public_key: str
    log_path: str
    endpoint_pid: int
    held: bool = False  # under a PAM session holder
    retired: bool = False
    adopted: bool = False  # not our child (started by an earlier life of this manager, or its holder died)
    endpoint_pidfd: int = -1  # a held endpoint's own pidfd: seen alive when its holder dies first
    # the identity set of each submitter it was handed, checked again when the mapping changes (empty: adopted)
    served: dict[str, list[IdentityResource]] = field(default_factory=dict)

    def record(self) -> registry.EndpointRecord:
        return registry.EndpointRecord(
            endpoint_id=self.endpoint_id, pid=self.pid, start_time=registry.start_time(self.pid),
            owner_uid=os.stat(f"/proc/{self.pid}").st_uid, endpoint_pid=self.endpoint_pid, account=self.account.name,
            key=self.key, public_key=self.public_key, log_path=self.log_path, held=self.held)

    def news(self, request_id: int = 0, *, reused: bool = True) -> Spawned:
        """What the router is told: it runs, and may be (re)connected to; ``request_id`` 0: a router that did not ask."""
        return Spawned(request_id=request_id, endpoint_id=self.endpoint_id, pid=self.endpoint_pid,
                       account=self.account.name, public_key=self.public_key, reused=reused)


@dataclass(frozen=True)
class SpawnerSettings:
    """What the spawner knows before the manager splits (all root-checked)."""

    config: RootConfig
    router_address: str
    router_public_key: str
    policy: AccountPolicy
    trusted_owner_uids: frozenset[int]
    drop_privileges: bool
    audit_log: Path
    registry_path: Path
    router: RouterLaunch
    pam: PamSettings | None = None  # None: PAM is off


@dataclass
class PendingSpawn:
    """One spawn request on its way through the workers; filled in as it goes, so a refusal can still say which
    rule mapped whom (``decision``) to which account."""

    request: SpawnRequest
    router_life: int  # which router asked: a later one never asked, and gets no answer to it
    mapper: IdentityMapper
    decision: MappingDecision | None = None
    account: Account | None = None  # the mapped account, once account policy allowed it
    key: EndpointKey | None = None
    endpoint_id: str = ""


class Spawner:
    def __init__(self, settings: SpawnerSettings) -> None:
        self.settings = settings
        config = settings.config
        trusted = settings.trusted_owner_uids
        self.mapping = MappingFile(
            config.identity_mapping, trusted_owner_uids=trusted,
            context=MappingContext(endpoint_id=config.endpoint_id, external_timeout=config.identity_mapping_timeout,
                                   trusted_owner_uids=trusted,
                                   run_as=config.identity_mapping_user if settings.drop_privileges else None),
        )
        self.template = read_policy_file(config.template, trusted_owner_uids=trusted).decode()
        self.schema = read_policy_file(config.schema_file, trusted_owner_uids=trusted).decode()
        self.template_digest = _digest(self.template.encode(), self.schema.encode())
        self.audit: AuditLog | None = None  # opened when it runs
        self.assertions = AssertionVerifier(config.service_signing_keys, config.endpoint_id)
        self.nonces = NonceCache()
        self.children: dict[int, EndpointProcess] = {}  # pidfd -> process
        self.running: dict[EndpointKey, EndpointProcess] = {}
        self.router: RouterProcess | None = None
        self.router_life = 0  # counts the routers started
        self._restart_at = 0.0  # when to start the next router (monotonic); 0: none due
        self._restart_delay = 0.0  # the wait before the last restart; 0: none yet
        self._router_stopping = False  # the router said it is stopping on purpose (not crashing)
        self._stop_requested = False  # SIGTERM/SIGINT: no router is started again
        self._hangup = False
        self._policy_check_running = False  # a check of the running endpoints is in a worker
        self._policy_check_due: bool | None = None  # a change came meanwhile: check again (True: remapping too)
        self._starting: dict[int, list[PendingSpawn]] = {}  # uid -> requests waiting for its start in progress
        self._workers = ThreadPoolExecutor(max_workers=SPAWN_WORKERS, thread_name_prefix="spawn")
        self._inbox = Inbox()  # outcomes of worker threads, run on the loop

    def run(self) -> int:
        forbid_unpickling()
        # The router stops first (telling endpoints to finish); we follow when it hangs up the channel.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hangup_signal)
        signal.set_wakeup_fd(self._inbox.wake_write)  # a signal wakes the select below
        # Open before the router starts: a log that can't be opened stops the manager with nothing to undo. The
        # router never holds it: it is close-on-exec, and privdrop closes every descriptor the router isn't passed.
        self.audit = AuditLog(self.settings.audit_log, trusted_owner_uids=self.settings.trusted_owner_uids,
                              endpoint_id=self.settings.config.endpoint_id)
        self._start_router()
        notify_ready()  # systemd (Type=notify): the checks passed, the router runs, the audit log is open
        self._audit({"event": "manager_started", "mapping_file": str(self.settings.config.identity_mapping),
                     "mode": "multi-user" if self.settings.drop_privileges else "single-user",
                     "pam": self.settings.pam.service if self.settings.pam else None})
        self._adopt()
        try:
            return self._serve()
        finally:
            self._workers.shutdown(wait=False, cancel_futures=True)
            self.mapping.mapper.close()
            self.audit.close()

    def _serve(self) -> int:
        while True:
            with loop_turn(log, "spawner"):  # an ordinary error in one turn must not end the manager
                if self._turn():
                    return 0

    def _turn(self) -> bool:
        """Wait for the router, a signal or an endpoint's exit, and handle it; True once the spawner is done."""
        router, watched = self.router, dict(self.children)
        readable = [self._inbox.wake_read, *watched]
        writable = []
        if router is not None:
            readable += [router.channel.fileno(), router.pidfd]
            writable = [router.channel.fileno()] if router.channel.wants_write else []
        timeout = max(0.0, self._restart_at - time.monotonic()) if self._restart_at else None
        readable, writable, _ = select.select(readable, writable, [], timeout)
        ready = set(readable)
        if writable and router is self.router:
            router.channel.flush()
        if self._inbox.wake_read in ready:
            self._drain_wakeups()  # outcomes of spawns and policy checks: may register endpoints
        if router is not None and router is self.router:
            if router.channel.fileno() in ready and not self._serve_router():
                self._router_gone()
            elif router.pidfd in ready:
                # What it sent last (its stop notice) is still worth reading.
                while select.select([router.channel.fileno()], [], [], 0)[0] and self._serve_router():
                    pass
                self._router_gone()
        for fd, process in watched.items():  # closed descriptors' numbers may have been reused meanwhile
            if fd in ready and self.children.get(fd) is process:
                self._reap(self.children.pop(fd))
        if self.router is None:
            if self._router_stopping or self._stop_requested:
                self._stop_children()
                return True
            if time.monotonic() >= self._restart_at:
                self._restart_router()
        return False

    # --- the router -------------------------------------------------------------------

    def _start_router(self) -> None:
        """Start a router; raises ``SpawnError`` if it could not be started."""
        self.router = start_router(self.settings.router)
        self.router_life += 1
        self._restart_at = 0.0
        log.info("router started (pid %d)", self.router.pid)

    def _restart_router(self) -> None:
        try:
            self._start_router()
        except (SpawnError, OSError) as exc:
            delay = self._next_restart_delay(0.0)
            log.error("could not start the router (%s); trying again in %.1f s", exc, delay)
            self._restart_at = time.monotonic() + delay
            return
        for process in self.children.values():  # what runs is adopted, as after a manager restart
            if not process.retired:
                self._send(process.news())

    def _next_restart_delay(self, ran_for: float) -> float:
        """Seconds to wait before starting again a router that died after ``ran_for`` seconds."""
        fresh = ran_for >= STABLE_AFTER or not self._restart_delay
        self._restart_delay = FIRST_RESTART_DELAY if fresh else min(2 * self._restart_delay, MAX_RESTART_DELAY)
        return self._restart_delay

    def _router_gone(self) -> None:
        """The router hung up or died: after a stop we follow it; after a crash a new one starts soon."""
        router, self.router = self.router, None
        assert router is not None
        if not self._router_stopping:
            try:
                signal.pidfd_send_signal(router.pidfd, signal.SIGKILL)  # it hung up: what it still does is moot
            except ProcessLookupError:
                pass
        _, status = os.waitpid(router.pid, 0)
        router.close()
        ran_for = time.monotonic() - router.started_at
        if self._router_stopping or self._stop_requested:
            log.info("the router has stopped; stopping")
            return
        delay = self._next_restart_delay(ran_for)
        log.error("the router (pid %d) %s after %.0f s; starting a new one in %.1f s (%d endpoint(s) keep running)",
                  router.pid, _describe_exit(status), ran_for, delay, len(self.children))
        self._restart_at = time.monotonic() + delay

    def _send(self, message: msgspec.Struct) -> None:
        """To the router, if one runs (a later one learns what it needs when it starts)."""
        if self.router is not None:
            self.router.channel.send(message)

    def _on_stop_signal(self, _signum: int, _frame: object) -> None:
        self._stop_requested = True
        if self.router is not None:
            try:
                signal.pidfd_send_signal(self.router.pidfd, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _on_hangup_signal(self, _signum: int, _frame: object) -> None:
        self._hangup = True

    def _drain_wakeups(self) -> None:
        for callback in self._inbox.take():
            try:
                callback()
            except Exception:  # a bug in one outcome's handling must not end the spawner for everyone
                log.exception("handling a spawn's or a policy check's outcome failed")
        if self._hangup:
            self._hangup = False
            log.info("SIGHUP: reloading %s and reopening the audit log", self.mapping.path)
            self._reopen_audit_log()
            self._apply_policy(self.mapping.reload("SIGHUP"), recheck_accounts=True)

    def _serve_router(self) -> bool:
        """Handle one message from the router; False when it has closed the channel."""
        assert self.router is not None
        try:
            message = self.router.channel.receive()
        except BlockingIOError:
            return True  # woken for nothing
        except MepError as exc:
            log.error("refused a message from the router (pid %d): %s", self.router.pid, exc)
            return True
        if message is None:
            log.info("the router closed the channel; stopping")
            return False
        # An OSError (say, writing the registry) while spawning refuses this request, nothing more.
        refuse = self._refuse_spawn(message) if isinstance(message, SpawnRequest) else None
        with handling(log, f"the router (pid {self.router.pid})", f"a {type(message).__name__}", refuse):
            self._handle_router_message(message)
        return True

    def _refuse_spawn(self, request: SpawnRequest) -> Callable[[MepError], None]:
        def refuse(exc: MepError) -> None:
            self._send(SpawnRefused(request_id=request.request_id, code=exc.code, message=str(exc)))
        return refuse

    def _handle_router_message(self, message: Any) -> None:
        match message:
            case SpawnRequest():
                self._spawn_request(message)
            case RouterStopping():
                self._router_stopping = True
            case RetireEndpoint():
                for process in self.children.values():
                    if process.endpoint_id == message.endpoint_id:
                        self._retire(process)
                        if message.kill:
                            _kill_endpoint(process)
            case SpawnerStatusRequest():  # the router's heartbeat: a good moment to look around
                if self.audit.failure:
                    self._reopen_audit_log()  # recovers once the admin has fixed the disk
                self._apply_policy(self.mapping.refresh(), recheck_accounts=True)
                self._send(SpawnerStatus(process=process_status("spawner")))
            case _:
                log.warning("ignoring an unexpected %s from the router", type(message).__name__)

    # --- the audit log ----------------------------------------------------------------

    def _audit(self, record: dict[str, Any]) -> bool:
        """Append ``record`` and sync it, before acting on it; False (and logged) while the log can't be written."""
        if not self.audit.failure:
            try:
                self.audit.write_records([record], sync=True)
                return True
            except OSError:
                log.error("%s; no endpoint is started until the audit log can be written (it is tried again each "
                          "heartbeat and on SIGHUP)", self.audit.failure)
        return False

    def _reopen_audit_log(self) -> None:
        was_broken = bool(self.audit.failure)
        try:
            self.audit.reopen()
        except ConfigurationError as exc:
            self.audit.failure = str(exc)
            log.error("%s; no endpoint is started until the audit log can be written", exc)
            return
        if was_broken and self._audit({"event": "audit_restored"}):
            log.info("the audit log %s can be written again; spawns resume", self.audit.path)

    # --- spawning: the loop's steps ---------------------------------------------------------

    def _spawn_request(self, request: SpawnRequest) -> None:
        """Check the assertion and map in a worker; ``_mapped`` takes it from there on the loop."""
        self._apply_policy(self.mapping.refresh(), recheck_accounts=False)
        pending = PendingSpawn(request=request, router_life=self.router_life, mapper=self.mapping.mapper)
        self._in_worker(lambda: self._authorize(pending), lambda _, error: self._mapped(pending, error))

    def _mapped(self, pending: PendingSpawn, error: Exception | None) -> None:
        if pending.router_life != self.router_life:
            return  # the router that asked is gone; the one now running never asked
        if error is not None:
            self._refuse(pending, error)
        elif pending.mapper is not self.mapping.mapper:  # reloaded meanwhile: decided by the new mapping alone
            pending.mapper, pending.decision, pending.account = self.mapping.mapper, None, None
            self._in_worker(lambda: self._map(pending), lambda _, again: self._mapped(pending, again))
        else:
            self._start_or_reuse(pending)

    def _start_or_reuse(self, pending: PendingSpawn) -> None:
        """Hand back the running endpoint for this key, or start one: one start at a time per account."""
        if pending.router_life != self.router_life:
            return
        request, account = pending.request, pending.account
        assert account is not None and pending.key is not None
        existing = self.running.get(pending.key)
        if existing is not None:
            if not self._audit(_decision_record(pending, "allowed",
                                                endpoint_id=existing.endpoint_id, reused=True)):
                self._refuse(pending, AuditUnavailableError())
                return
            existing.served[request.submitter_id] = list(request.identities)
            self._answer(pending, existing.news(request.request_id))
            return
        if account.uid in self._starting:
            self._starting[account.uid].append(pending)  # after the start in progress, which it may well reuse
            return
        pending.endpoint_id = str(uuid.uuid4())
        try:
            self._check_endpoint_limit(account)
            if not self._audit(_decision_record(pending, "allowed",
                                                endpoint_id=pending.endpoint_id)):
                raise AuditUnavailableError()
        except TaskRefusedError as exc:
            self._refuse(pending, exc)
            return
        self._starting[account.uid] = []
        self._in_worker(lambda: self._start(pending), lambda process, error: self._started(pending, process, error))

    def _started(self, pending: PendingSpawn, process: EndpointProcess | None, error: Exception | None) -> None:
        assert pending.account is not None
        waiting = self._starting.pop(pending.account.uid, [])
        if error is not None:
            self._refuse(pending, error)
        else:
            assert process is not None
            self._register(pending, process)
        for other in waiting:
            self._start_or_reuse(other)

    def _check_endpoint_limit(self, account: Account) -> None:
        limit = self.settings.config.max_endpoints_per_account
        running = sum(1 for process in self.children.values() if process.account.uid == account.uid and not process.retired)
        if running >= limit:
            raise QuotaExceededError(
                f"account {account.name} already runs {running} user endpoint(s) on this endpoint, the most it "
                f"allows (max_endpoints_per_account: {limit}); each distinct user_endpoint_config needs its own: "
                f"reuse one you already use, or wait until one idles out")

    def _register(self, pending: PendingSpawn, process: EndpointProcess) -> None:
        """A new endpoint runs: track it, record it, and tell the router (the one that asked, or its successor)."""
        self.children[process.pidfd] = process
        self.running[process.key] = process
        process.served[pending.request.submitter_id] = list(pending.request.identities)
        account = process.account
        self._audit({"event": "endpoint_started", "endpoint_id": process.endpoint_id, "pid": process.endpoint_pid,
                     "account": account.name, "uid": account.uid,
                     "pam_session_holder": process.pid if process.held else None})
        if not self._save_registry():
            self._retire(process)  # a manager restarted after a crash could not adopt it: it must not serve
            _stop_endpoint(process)
            self._refuse(pending, SpawnError(
                f"could not record the new endpoint in {self.settings.registry_path}; ask your admin"))
            return
        assert pending.decision is not None
        log.info("spawned endpoint %s (pid %d) as %s (uid %d) for %s via %s%s", process.endpoint_id,
                 process.endpoint_pid, account.name, account.uid, pending.decision.identity_id,
                 pending.decision.rule(),
                 f" in a PAM session (holder pid {process.pid})" if process.held else "",
                 extra={"endpoint_id": process.endpoint_id, "account": account.name,
                        "identity_id": pending.request.submitter_id})
        self._answer(pending, process.news(pending.request.request_id, reused=False))

    def _refuse(self, pending: PendingSpawn, exc: Exception) -> None:
        """Refuse one request, saying why: a refusal by policy, or any error on the way (never the spawner's end)."""
        request = pending.request
        who = request.identities[0].username if request.identities else request.submitter_id
        if isinstance(exc, TaskRefusedError):
            code = exc.code
            message = exc.for_identity(who) if isinstance(exc, AccountRefused) else str(exc)
            detail = exc.admin_detail or message
        elif isinstance(exc, OSError):
            code = ErrorCode.SPAWN_FAILED
            message = "the manager could not start an endpoint for this request (a system error); ask your admin"
            detail = f"{exc.strerror or exc} (errno {exc.errno}, {type(exc).__name__}, {exc.filename or 'no file'})"
        else:
            log.error("handling the spawn request of %s failed", who, exc_info=exc)
            code = ErrorCode.INTERNAL
            message = "the manager failed to handle this request (an internal error); ask your admin"
            detail = f"{type(exc).__name__}: {exc}"
        log.warning("refused %s (%s): %s [%s]", who, request.submitter_id, code, detail,
                    extra={"identity_id": request.submitter_id,
                           **({"account": pending.account.name} if pending.account else {})})
        self._audit(_decision_record(pending, "refused", code=str(code), reason=detail,
                                     message=message))
        self._answer(pending, SpawnRefused(request_id=request.request_id, code=code, message=message,
                                           step=str(getattr(exc, "step", "") or "")))  # DropStepError, PAM's

    def _answer(self, pending: PendingSpawn, answer: Spawned | SpawnRefused) -> None:
        if pending.router_life == self.router_life:
            self._send(answer)
        elif isinstance(answer, Spawned) and not answer.reused:  # started for a router since replaced
            self._send(msgspec.structs.replace(answer, request_id=0, reused=True))

    def _in_worker(self, job: Callable[[], Any], then: Callable[[Any, Exception | None], None]) -> None:
        """Run ``job`` in a worker thread, then ``then(its result, None)`` or ``then(None, its error)`` on the loop."""
        def work() -> None:
            try:
                result, error = job(), None
            except Exception as exc:  # noqa: BLE001 - handed to the loop, which refuses the request with it
                result, error = None, exc
            self._inbox.post(lambda: then(result, error))
        self._workers.submit(work)

    # --- spawning: in worker threads (they touch no table of the loop's) -----------------

    def _authorize(self, pending: PendingSpawn) -> None:
        """Before anything is mapped or started: the service must have signed this identity set and config."""
        request = pending.request
        verified = self.assertions.verify(request.identity_assertion)  # the verifier and nonce cache are thread-safe
        check_spawn_claims(verified.claims, submitter_id=request.submitter_id, identities=request.identities,
                           config=request.user_endpoint_config)
        self.nonces.use(verified.claims)
        self._map(pending)

    def _map(self, pending: PendingSpawn) -> None:
        request = pending.request
        # Mapping, then account policy: the path 'mep identity test' takes too, so its dry run answers as we do.
        pending.decision = pending.mapper.map([msgspec.structs.asdict(identity) for identity in request.identities])
        account = pending.account = resolve_account(pending.decision.account, self.settings.policy)
        self._check_pam_account(account.name)  # for a reused endpoint too: the account may have expired since
        shared = self.settings.config.share_endpoints_across_identities
        # The same options from another runtime may render differently (a template may pick worker_python by it).
        options = msgspec.json.encode([request.user_endpoint_config, request.runtime], order="sorted")
        pending.key = ("" if shared else request.submitter_id, account.uid, self.template_digest, _digest(options))

    def _start(self, pending: PendingSpawn) -> EndpointProcess:
        """Start the endpoint (PAM's account and session steps included); its decision is on disk already."""
        account, key, request = pending.account, pending.key, pending.request
        assert account is not None and key is not None
        endpoint_id = pending.endpoint_id
        serves = [] if not key[0] else request.identities  # the identity set whose tasks alone it may run
        public_key, secret_key = generate_keypair()
        config = self.settings.config
        boot = EndpointBoot(endpoint_id=endpoint_id, account=account.name,
                            router_address=self.settings.router_address,
                            router_public_key=self.settings.router_public_key, secret_key=secret_key,
                            template=self.template, schema=self.schema, template_path=str(config.template),
                            schema_path=str(config.schema_file), user_config=request.user_endpoint_config,
                            user_runtime=msgspec.to_builtins(request.runtime) if request.runtime else {},
                            mapped_user=dataclasses.asdict(account), heartbeat_interval=config.heartbeat_interval,
                            manager_endpoint_id=config.endpoint_id, identity_id=key[0], identities=serves,
                            serves_any_identity=not key[0], assertion_keys=config.service_signing_keys,
                            log_format=active_format())
        # Opened by the child after the drop, as the user; abspath: the plan wants an absolute path, whatever passwd says
        log_path = os.path.join(os.path.abspath(account.home), ".mep", "endpoints", endpoint_id, "endpoint.log")
        plan = SpawnPlan(account=account, argv=[sys.executable, "-m", "mep.endpoint"],
                         stdin_data=msgspec.json.encode(boot), log_path=log_path,
                         drop_privileges=self.settings.drop_privileges, title=f"the endpoint {endpoint_id}",
                         resource_limits=resource_limits(config.endpoint_limits),
                         no_new_privs=not config.allow_setuid_helpers)
        if self.settings.pam is None:
            child = spawn(plan)
            return EndpointProcess(endpoint_id=endpoint_id, pid=child.pid, pidfd=child.pidfd, account=account,
                                   key=key, public_key=public_key, log_path=log_path, endpoint_pid=child.pid)
        held = start_session_holder(plan, self.settings.pam)
        return EndpointProcess(endpoint_id=endpoint_id, pid=held.holder_pid, pidfd=held.pidfd, account=account,
                               key=key, public_key=public_key, log_path=log_path, endpoint_pid=held.endpoint_pid,
                               held=True, endpoint_pidfd=_held_endpoint_pidfd(held.endpoint_pid, held.holder_pid))

    # --- endpoints ----------------------------------------------------------------------

    def _apply_policy(self, outcome: ReloadOutcome | None, *, recheck_accounts: bool) -> None:
        """The one way a policy change reaches running endpoints: on SIGHUP, at a spawn request, at each heartbeat.

        ``outcome`` is the mapping file's reload, if one was attempted (it is
        audited). A mapping that loaded makes the router forget at once which
        endpoint serves whom, so each submitter's next task is mapped and
        checked afresh (and refused if it no longer may run). Then every
        running endpoint is checked again in a worker (an external program or
        a PAM module may take seconds): each identity set it was handed must
        still map to its account (after a mapping change), and the account must
        pass the account policy and PAM account management. One that fails is
        stopped (SIGTERM: running tasks finish), audited, and the router told again.
        """
        remap = outcome is not None and outcome.loaded
        if outcome is not None:
            if remap:
                log.info("identity mapping %s reloaded (%s)", outcome.path, outcome.trigger)
            else:
                log.error("identity mapping %s (%s) is broken; keeping the previous version: %s",
                          outcome.path, outcome.trigger, outcome.error)
            self._audit({"event": "mapping_reload", "file": outcome.path, "trigger": outcome.trigger,
                         "outcome": "loaded" if remap else "kept_previous", "reason": outcome.error})
        if remap:
            self._send(RemapGroups(reason="the identity mapping changed"))
        if remap or recheck_accounts:
            self._check_endpoints(remap=remap)

    def _check_endpoints(self, *, remap: bool) -> None:
        if self._policy_check_running:  # one check at a time; what changed meanwhile is checked when it ends
            self._policy_check_due = remap or bool(self._policy_check_due)
            return
        self._policy_check_running = True
        mapper = self.mapping.mapper if remap else None
        endpoints = [(process, process.account.name, [list(s) for s in process.served.values()])
                     for process in self.children.values() if not process.retired]
        self._in_worker(lambda: [(process, self._why_not_allowed(account, served, mapper))
                                 for process, account, served in endpoints],
                        self._stop_what_is_not_allowed)

    def _why_not_allowed(self, account: str, served: list[list[IdentityResource]],
                         mapper: IdentityMapper | None) -> str:
        """In a worker: why an endpoint of ``account`` serving ``served`` may no longer run ("" if it may).

        ``mapper``: the new mapping, to map each identity set again; None when the mapping did not change.
        """
        try:
            if mapper is not None and not served:
                return "the identity mapping changed and the identities it serves are unknown (adopted after a " \
                       "manager restart), so they can't be checked again"
            for identities in served if mapper is not None else []:
                mapped = mapper.map([msgspec.structs.asdict(identity) for identity in identities]).account
                if mapped != account:
                    return f"{identities[0].username or identities[0].id} now maps to {mapped!r}, not {account!r}"
            resolve_account(account, self.settings.policy)
            self._check_pam_account(account)
        except TaskRefusedError as exc:
            return exc.admin_detail or str(exc)
        except Exception as exc:  # noqa: BLE001 - a check that can't be made is no permission
            log.exception("checking the endpoint of %s again failed", account)
            return f"it could not be checked again ({type(exc).__name__}: {exc})"
        return ""

    def _check_pam_account(self, account: str) -> None:
        """In a worker: PAM account management (``pam_acct_mgmt``), when PAM is on; ``AccountRefused`` if it says no.

        Account modules only read (session modules, which change their caller, run in session holders).
        """
        if self.settings.pam is not None:
            require_account(self.settings.pam.service, account, library=self.settings.pam.library)

    def _stop_what_is_not_allowed(self, verdicts: list[tuple[EndpointProcess, str]] | None,
                                  error: Exception | None) -> None:
        self._policy_check_running = False
        if error is not None:  # the checks catch their own errors: this is a bug
            log.error("checking the running endpoints again failed", exc_info=error)
        reasons = []
        for process, reason in verdicts or []:
            if not reason or process.retired or self.children.get(process.pidfd) is not process:
                continue
            log.warning("stopping endpoint %s of %s: %s", process.endpoint_id, process.account.name, reason)
            self._audit({"event": "endpoint_stopped", "endpoint_id": process.endpoint_id,
                         "account": process.account.name, "reason": reason})
            self._retire(process)
            _stop_endpoint(process)  # running tasks get to finish
            reasons.append(f"endpoint {process.endpoint_id} of {process.account.name} is no longer allowed")
        if reasons:
            self._send(RemapGroups(reason="; ".join(reasons)))
        if self._policy_check_due is not None:
            remap, self._policy_check_due = self._policy_check_due, None
            self._check_endpoints(remap=remap)

    def _adopt(self) -> None:
        """Take back the endpoints an earlier life of this manager left running when it died."""
        for record in registry.load_live(self.settings.registry_path):
            try:
                account = Account.from_passwd(pwd.getpwnam(record.account))
                pidfd = os.pidfd_open(record.pid)
            except (KeyError, OSError) as exc:
                log.warning("cannot adopt endpoint %s of %s: %s", record.endpoint_id, record.account, exc)
                continue
            process = EndpointProcess(endpoint_id=record.endpoint_id, pid=record.pid, pidfd=pidfd, account=account,
                                      key=record.key, public_key=record.public_key, log_path=record.log_path,
                                      endpoint_pid=record.endpoint_pid, held=record.held, adopted=True,
                                      endpoint_pidfd=_held_endpoint_pidfd(record.endpoint_pid, record.pid)
                                      if record.held else -1)
            self.children[pidfd] = process
            self.running[process.key] = process
            log.info("adopted endpoint %s (pid %d) of %s from the manager's previous life", record.endpoint_id,
                     record.endpoint_pid, record.account)
            self._audit({"event": "endpoint_adopted", "endpoint_id": record.endpoint_id, "pid": record.endpoint_pid,
                         "account": record.account})
            self._send(process.news())
        self._save_registry()

    def _retire(self, process: EndpointProcess) -> None:
        """No new work for it: a request for its key starts a fresh endpoint."""
        process.retired = True
        if self.running.get(process.key) is process:
            del self.running[process.key]

    def _save_registry(self) -> bool:
        """Record what runs, for a restarted manager to adopt; False (and logged) if it can't be written."""
        records = []
        for process in self.children.values():
            try:
                records.append(process.record())
            except OSError:
                continue  # exiting right now: the reaper will report it
        try:
            registry.save(self.settings.registry_path, records)
        except OSError as exc:
            log.error("could not write the endpoint registry %s (%s): a manager restarted after a crash would not "
                      "adopt the endpoints that run now", self.settings.registry_path, exc)
            return False
        return True

    def _reap(self, process: EndpointProcess) -> None:
        status = signal.SIGKILL  # unknown (adopted, so not our child): report it as killed, so its tasks are retried
        if not process.adopted:
            try:
                _, status = os.waitpid(process.pid, 0)
            except ChildProcessError:
                pass
        os.close(process.pidfd)
        if self._outlives_its_holder(process, status):
            return
        if process.endpoint_pidfd != -1:
            os.close(process.endpoint_pidfd)
        self._retire(process)
        self._save_registry()
        how = _describe_exit(status) if not process.adopted else "ended (not our child, so its exit status is unknown)"
        log.info("endpoint %s (pid %d, %s) %s", process.endpoint_id, process.endpoint_pid, process.account.name, how)
        self._audit({"event": "endpoint_exited", "endpoint_id": process.endpoint_id, "pid": process.endpoint_pid,
                     "account": process.account.name, "how": how})
        tail = "" if status == 0 else read_log_tail(process.account, process.log_path)
        self._send(EndpointExited(endpoint_id=process.endpoint_id, pid=process.endpoint_pid, how=how,
                                  log_tail=tail, signalled=os.WIFSIGNALED(status)))

    def _outlives_its_holder(self, process: EndpointProcess, status: int) -> bool:
        """A session holder died (killed) while its endpoint runs on: the endpoint is not lost with it.

        From now on the endpoint is watched through its own pidfd, as an adopted
        one (it is init's child now). It is told to finish what it holds and
        exit (SIGTERM), so its tasks complete once and their results count; new
        work for its submitters goes to a fresh endpoint. Its exit is reported
        once, when it comes. Its PAM session can't be closed any more: the
        handle died with the holder.
        """
        if process.endpoint_pidfd == -1 or select.select([process.endpoint_pidfd], [], [], 0)[0]:
            return False  # it ended first (the holder then exits as it did), or was never seen
        log.warning("the PAM session holder (pid %d) of endpoint %s (pid %d, %s) %s while the endpoint ran; "
                    "the endpoint finishes its tasks and exits (its PAM session can't be closed any more)",
                    process.pid, process.endpoint_id, process.endpoint_pid, process.account.name,
                    _describe_exit(status) if not process.adopted else "ended")
        self._audit({"event": "session_holder_lost", "endpoint_id": process.endpoint_id, "pid": process.pid,
                     "endpoint_pid": process.endpoint_pid, "account": process.account.name})
        process.pid, process.pidfd, process.endpoint_pidfd = process.endpoint_pid, process.endpoint_pidfd, -1
        process.held, process.adopted = False, True
        self._retire(process)
        self.children[process.pidfd] = process
        self._save_registry()
        _stop_endpoint(process)  # drain: running tasks get to finish
        self._send(RemapGroups(reason=f"endpoint {process.endpoint_id} lost its PAM session holder"))
        return True

    def _stop_children(self) -> None:
        """SIGTERM every endpoint; those still there after the grace period are SIGKILLed.

        The registry is left empty: a graceful stop leaves nothing to adopt.
        """
        for process in self.children.values():
            _stop_endpoint(process)
        deadline = time.monotonic() + STOP_GRACE
        while self.children:
            exited, _, _ = select.select(list(self.children), [], [], max(0.0, deadline - time.monotonic()))
            if not exited:
                log.warning("%d endpoint(s) ignored SIGTERM for %.0f s; killing them", len(self.children),
                            STOP_GRACE)
                for process in self.children.values():
                    _kill_endpoint(process)
                deadline = float("inf")
                continue
            for fd in exited:
                self._reap(self.children.pop(fd))  # audited and recorded as any exit (no router to tell)


def _decision_record(pending: PendingSpawn, outcome: str, **fields: Any) -> dict[str, Any]:
    """One audit record of a decision: who asked, which rule mapped them to which account, and the outcome."""
    request, decision, account = pending.request, pending.decision, pending.account
    deciding = decision.identity_id if decision else (request.identities[0].id if request.identities else "")
    by_id = {identity.id: identity for identity in request.identities}
    return {
        "event": "decision",
        "request_id": request.request_id,
        "submitter_id": request.submitter_id,
        "identity": {"id": deciding, "username": by_id[deciding].username if deciding in by_id else ""},
        "identities": [{"id": i.id, "username": i.username, "status": i.status} for i in request.identities],
        "mapping": None if decision is None else {"rule": decision.rule(), "document": decision.document_index,
                                                  "mapping": decision.mapping_index,
                                                  "program": decision.program or None},
        "account": decision.account if decision else None,
        "uid": account.uid if account else None,
        "outcome": outcome,
        **fields,
    }


def _stop_endpoint(process: EndpointProcess) -> None:
    """SIGTERM: running tasks get to finish."""
    try:
        signal.pidfd_send_signal(process.pidfd, signal.SIGTERM)
    except ProcessLookupError:
        pass  # already gone: the reaper reports it


def _kill_endpoint(process: EndpointProcess) -> None:
    """SIGKILL a hung endpoint and its workers: it leads its own session, so its process group is theirs.

    The pidfd check first proves the leader is still ours and alive, so the
    group id can't belong to anyone else yet. A held endpoint is not our
    child: its session holder, whose child it is, does the same check and kill
    (and then still closes the PAM session).
    """
    try:
        if process.held:
            signal.pidfd_send_signal(process.pidfd, KILL_ENDPOINT_SIGNAL)
            return
        signal.pidfd_send_signal(process.pidfd, 0)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone: the reaper reports it


def _held_endpoint_pidfd(endpoint_pid: int, holder_pid: int) -> int:
    """A pidfd for a held endpoint, or -1 if it is gone; its parent being the holder proves the pid is it."""
    try:
        pidfd = os.pidfd_open(endpoint_pid)
    except OSError:
        return -1
    try:
        if int(registry.proc_stat(endpoint_pid)[1]) == holder_pid:  # checked once the pidfd holds the process
            return pidfd
    except (OSError, ValueError, IndexError):
        pass
    os.close(pidfd)  # exited and reaped already: the pid may be someone else's now
    return -1


def _digest(*parts: bytes) -> str:
    """sha256 hex over length-prefixed parts, so bytes moved from one part to the next change it."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return f"was killed by signal {signum} ({signal.Signals(signum).name})"
    return f"exited with status {os.WEXITSTATUS(status)}"
