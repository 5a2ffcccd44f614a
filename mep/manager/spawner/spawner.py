"""The root spawner's loop: answer spawn requests, watch endpoint processes, report deaths, keep the audit log.

For each ``SpawnRequest`` from the router: map the identity set to one
account (the mapping file is reloaded first if it changed), check the account
against policy, validate the user's config against the admin's schema and
render the admin's template, then either hand back the endpoint already
running for the same (account, template digest, config) or fork, drop
privileges and exec a new one, directly or, with PAM on, under a session
holder (``session_holder``). Each endpoint gets a fresh CURVE key pair; the
secret goes only to the endpoint's stdin, the public half to the router.
Children are watched through pidfds, so a recycled pid can never be mistaken
for one of ours.

Every decision, endpoint start and exit, mapping reload and the router's task
records go to the audit log before anything acts on them; while it can't be
written nothing is spawned and the router is told to stop routing
(``AuditStatus``). SIGHUP reloads the mapping file and reopens the audit log.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import select
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from mep.config.manager import ManagerConfig
from mep.config.render import TemplateRenderer
from mep.errors import ConfigurationError, MepError, TaskRefusedError
from mep.manager.spawner import registry
from mep.manager.spawner.accounts import Account, AccountPolicy, AccountRefused, resolve_account
from mep.manager.spawner.audit import AuditLog, AuditUnavailableError
from mep.manager.spawner.authorize import Authorization, authorize
from mep.manager.spawner.identity import MappingContext
from mep.manager.spawner.mapping_file import MappingFile, ReloadOutcome
from mep.manager.spawner.policy_files import read_policy_file
from mep.manager.spawner.privdrop import SpawnPlan, read_log_tail, spawn
from mep.manager.spawner.session_holder import KILL_ENDPOINT_SIGNAL, PamSettings, start_session_holder
from mep.manager.spawner_link import SpawnerLink
from mep.protocol.curve import generate_keypair
from mep.protocol.guard import forbid_unpickling, process_status
from mep.protocol.messages import (
    AuditStatus,
    AuditTasks,
    EndpointBoot,
    EndpointExited,
    RemapGroups,
    RetireEndpoint,
    RouterStopping,
    Spawned,
    SpawnerStatus,
    SpawnerStatusRequest,
    SpawnRefused,
    SpawnRequest,
)
from mep.protocol.receive import handling, loop_turn

log = logging.getLogger("mep.spawner")

STOP_GRACE = 45.0  # seconds endpoints get after SIGTERM (they give running tasks 30) before SIGKILL
EndpointKey = tuple[int, str, str]  # (uid, template digest, canonical rendered config)


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
    adopted: bool = False  # started by an earlier life of this manager: not our child

    def record(self) -> registry.EndpointRecord:
        return registry.EndpointRecord(
            endpoint_id=self.endpoint_id, pid=self.pid, start_time=registry.start_time(self.pid),
            owner_uid=os.stat(f"/proc/{self.pid}").st_uid, endpoint_pid=self.endpoint_pid, account=self.account.name,
            key=self.key, public_key=self.public_key, log_path=self.log_path, held=self.held)


@dataclass(frozen=True)
class SpawnerSettings:
    """What the spawner knows before the manager splits (all root-checked)."""

    config: ManagerConfig
    router_address: str
    router_public_key: str
    policy: AccountPolicy
    trusted_owner_uids: frozenset[int]
    drop_privileges: bool
    audit_log: Path
    registry_path: Path
    pam: PamSettings | None = None  # None: PAM is off


class Spawner:
    def __init__(self, settings: SpawnerSettings, channel: SpawnerLink) -> None:
        self.settings = settings
        self.channel = channel
        config = settings.config
        trusted = settings.trusted_owner_uids
        self.mapping = MappingFile(
            config.identity_mapping, trusted_owner_uids=trusted,
            context=MappingContext(endpoint_id=config.endpoint_id, external_timeout=config.identity_mapping_timeout,
                                   trusted_owner_uids=trusted),
        )
        self.renderer = TemplateRenderer(
            config.template, config.schema_file,
            template_text=read_policy_file(config.template, trusted_owner_uids=trusted).decode(),
            schema_text=read_policy_file(config.schema_file, trusted_owner_uids=trusted).decode(),
        )
        self.audit = AuditLog(settings.audit_log, trusted_owner_uids=trusted, endpoint_id=config.endpoint_id)
        self.children: dict[int, EndpointProcess] = {}  # pidfd -> process
        self.running: dict[EndpointKey, EndpointProcess] = {}
        self.router_pid = 0
        self._router_stopping = False  # the router said it is stopping on purpose (not crashing)
        self._hangup = False
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run(self) -> int:
        forbid_unpickling()
        # The router stops first (telling endpoints to finish); we follow when it hangs up the channel.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.router_pid and os.kill(self.router_pid, signal.SIGTERM))
        signal.signal(signal.SIGHUP, self._on_hangup_signal)
        signal.set_wakeup_fd(self._wake_write)  # a signal wakes the select below
        config = self.settings.config
        self._audit([{"event": "manager_started", "mapping_file": str(config.identity_mapping),
                      "mode": "multi-user" if self.settings.drop_privileges else "single-user",
                      "pam": self.settings.pam.service if self.settings.pam else None}], sync=True)
        self._adopt()
        router_gone = False
        while not router_gone:
            with loop_turn(log, "spawner"):  # an ordinary error in one turn must not end the manager
                router_gone = self._turn()
        if self._router_stopping:
            self._stop_children()
        else:  # a crash: what runs is left for the next manager to adopt
            log.warning("the router died; %d endpoint(s) keep running for the manager's next start to adopt",
                        len(self.children))
        return 0

    def _turn(self) -> bool:
        """Wait for the router, a signal or an endpoint's exit, and handle it; True once the router has gone."""
        writable = [self.channel.fileno()] if self.channel.wants_write else []
        readable, writable, _ = select.select([self.channel.fileno(), self._wake_read, *self.children],
                                              writable, [])
        if writable:
            self.channel.flush()
        for fd in readable:
            if fd == self._wake_read:
                self._drain_wakeups()
            elif fd in self.children:
                self._reap(self.children.pop(fd))
            elif not self._serve_router():
                return True
        return False

    def _on_hangup_signal(self, _signum: int, _frame: object) -> None:
        self._hangup = True

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_read, 512):
                pass
        except BlockingIOError:
            pass
        if self._hangup:
            self._hangup = False
            log.info("SIGHUP: reloading %s and reopening the audit log", self.mapping.path)
            self._reopen_audit_log()
            self._record_reload(self.mapping.reload("SIGHUP"))

    def _serve_router(self) -> bool:
        try:
            message = self.channel.receive()
        except BlockingIOError:
            return True  # woken for nothing
        except MepError as exc:
            log.error("refused a message from the router (pid %d): %s", self.router_pid, exc)
            return True
        if message is None:
            log.info("the router closed the channel; stopping")
            return False
        # An OSError (say, writing the registry) while spawning refuses this request, nothing more.
        refuse = self._refuse_spawn(message) if isinstance(message, SpawnRequest) else None
        with handling(log, f"the router (pid {self.router_pid})", f"a {type(message).__name__}", refuse):
            self._handle_router_message(message)
        return True

    def _refuse_spawn(self, request: SpawnRequest) -> Callable[[MepError], None]:
        def refuse(exc: MepError) -> None:
            self.channel.send(SpawnRefused(request_id=request.request_id, code=exc.code, message=str(exc)))
        return refuse

    def _handle_router_message(self, message: Any) -> None:
        match message:
            case SpawnRequest():
                self.channel.send(self._spawn_or_refuse(message))
            case AuditTasks():
                self._record_tasks(message)
            case RouterStopping():
                self._router_stopping = True
            case RetireEndpoint():
                for process in self.children.values():
                    if process.endpoint_id == message.endpoint_id:
                        process.retired = True
                        self.running.pop(process.key, None)
                        if message.kill:
                            _kill_endpoint(process)
            case SpawnerStatusRequest():  # the router's heartbeat: a good moment to look around
                if self.audit.failure:
                    self._reopen_audit_log()  # recovers once the admin has fixed the disk
                self._revalidate()
                self.channel.send(SpawnerStatus(process=process_status("spawner")))
            case _:
                log.warning("ignoring an unexpected %s from the router", type(message).__name__)

    # --- the audit log ----------------------------------------------------------------

    def _audit(self, records: list[dict[str, Any]], *, sync: bool = False) -> bool:
        """Write records; on failure stop: refuse spawns and tell the router. False if not written."""
        if self.audit.failure:
            return False
        try:
            self.audit.write_records(records, sync=sync)
        except OSError:
            log.error("the audit log can't be written (%s); no task runs until it can (fix it, then SIGHUP)",
                      self.audit.failure)
            self.channel.send(AuditStatus(ok=False, message=str(AuditUnavailableError())))
            return False
        return True

    def _record_tasks(self, message: AuditTasks) -> None:
        """The router's task records; "routed" ones are confirmed, since their tasks wait for it."""
        if not self._audit([{"event": "task", **msgspec.to_builtins(record)} for record in message.records]):
            return  # the router was told when the log broke, and fails the tasks waiting for this
        routed = [record.task_id for record in message.records if record.outcome == "routed"]
        if routed:
            self.channel.send(AuditStatus(ok=True, confirmed=routed))

    def _reopen_audit_log(self) -> None:
        was_broken = bool(self.audit.failure)
        try:
            self.audit.reopen()
        except ConfigurationError as exc:
            self.audit.mark_broken(str(exc))
            log.error("%s; no task runs until the audit log can be written", exc)
            if not was_broken:
                self.channel.send(AuditStatus(ok=False, message=str(AuditUnavailableError())))
            return
        if was_broken and self._audit([{"event": "audit_restored"}], sync=True):
            log.info("the audit log %s can be written again; routing resumes", self.audit.path)
            self.channel.send(AuditStatus(ok=True))

    def _record_reload(self, outcome: ReloadOutcome | None) -> None:
        if outcome is None:
            return
        if outcome.loaded:
            log.info("identity mapping %s reloaded (%s)", outcome.path, outcome.trigger)
        else:
            log.error("identity mapping %s (%s) is broken; keeping the previous version: %s",
                      outcome.path, outcome.trigger, outcome.error)
        self._audit([{"event": "mapping_reload", "file": outcome.path, "trigger": outcome.trigger,
                      "outcome": "loaded" if outcome.loaded else "kept_previous", "reason": outcome.error}],
                    sync=True)

    # --- spawning -----------------------------------------------------------------------

    def _spawn_or_refuse(self, request: SpawnRequest) -> Spawned | SpawnRefused:
        who = request.identities[0].username if request.identities else request.submitter_id
        self._record_reload(self.mapping.refresh())
        progress = Authorization()
        try:
            if self.audit.failure:
                raise AuditUnavailableError()
            return self._spawn(request, progress)
        except TaskRefusedError as exc:
            message = exc.for_identity(who) if isinstance(exc, AccountRefused) else str(exc)
            detail = exc.admin_detail or message
            log.warning("refused %s (%s): %s [%s]", who, request.submitter_id, exc.code, detail)
            self._audit([_decision_record(request, progress, "refused", code=str(exc.code), reason=detail,
                                          message=message)], sync=True)
            return SpawnRefused(request_id=request.request_id, code=exc.code, message=message)

    def _spawn(self, request: SpawnRequest, progress: Authorization) -> Spawned:
        identities = [msgspec.structs.asdict(identity) for identity in request.identities]
        account = authorize(self.mapping.mapper, identities, self.settings.policy, progress)
        endpoint_id = str(uuid.uuid4())
        config = self.renderer.render(
            request.user_endpoint_config,
            mapped_user={"name": account.name, "uid": account.uid, "gid": account.gid, "home": account.home,
                         "groups": list(account.groups), "shell": account.shell},
            user_runtime=msgspec.to_builtins(request.runtime) if request.runtime else {},
            endpoint={"id": self.settings.config.endpoint_id},
        )
        rendered = config.model_dump(mode="json")
        key: EndpointKey = (account.uid, self.renderer.digest, json.dumps(rendered, sort_keys=True))
        existing = self.running.get(key)
        if existing is not None:
            if not self._audit([_decision_record(request, progress, "allowed", endpoint_id=existing.endpoint_id,
                                                 reused=True)], sync=True):
                raise AuditUnavailableError()
            return Spawned(request_id=request.request_id, endpoint_id=existing.endpoint_id,
                           pid=existing.endpoint_pid, account=account.name, public_key=existing.public_key,
                           reused=True)
        if not self._audit([_decision_record(request, progress, "allowed", endpoint_id=endpoint_id)], sync=True):
            raise AuditUnavailableError()
        process = self._start_endpoint(endpoint_id, account, key, rendered)
        self._audit([{"event": "endpoint_started", "endpoint_id": endpoint_id, "pid": process.endpoint_pid,
                      "account": account.name, "uid": account.uid, "pam_session_holder":
                      process.pid if process.held else None}])
        assert progress.decision is not None
        log.info("spawned endpoint %s (pid %d) as %s (uid %d) for %s via %s%s", endpoint_id, process.endpoint_pid,
                 account.name, account.uid, progress.decision.identity_id, progress.decision.rule(),
                 f" in a PAM session (holder pid {process.pid})" if process.held else "")
        return Spawned(request_id=request.request_id, endpoint_id=endpoint_id, pid=process.endpoint_pid,
                       account=account.name, public_key=process.public_key)

    def _start_endpoint(self, endpoint_id: str, account: Account, key: EndpointKey,
                        rendered: dict[str, Any]) -> EndpointProcess:
        public_key, secret_key = generate_keypair()
        boot = EndpointBoot(endpoint_id=endpoint_id, account=account.name,
                            router_address=self.settings.router_address,
                            router_public_key=self.settings.router_public_key, secret_key=secret_key,
                            config=rendered, heartbeat_interval=self.settings.config.heartbeat_interval)
        # realpath: the log path is opened without following any symlink, and /home may be one
        log_path = os.path.join(os.path.realpath(account.home), ".mep", "endpoints", endpoint_id, "endpoint.log")
        plan = SpawnPlan(account=account, argv=[sys.executable, "-m", "mep.endpoint"],
                         stdin_data=msgspec.json.encode(boot), log_path=log_path,
                         drop_privileges=self.settings.drop_privileges, title=f"the endpoint {endpoint_id}")
        if self.settings.pam is not None:
            held = start_session_holder(plan, self.settings.pam)
            process = EndpointProcess(endpoint_id=endpoint_id, pid=held.holder_pid, pidfd=held.pidfd,
                                      account=account, key=key, public_key=public_key, log_path=log_path,
                                      endpoint_pid=held.endpoint_pid, held=True)
        else:
            child = spawn(plan)
            process = EndpointProcess(endpoint_id=endpoint_id, pid=child.pid, pidfd=child.pidfd, account=account,
                                      key=key, public_key=public_key, log_path=log_path, endpoint_pid=child.pid)
        self.children[process.pidfd] = process
        self.running[key] = process
        self._save_registry()
        return process

    def _revalidate(self) -> None:
        """Pick up a changed mapping file, and stop endpoints whose accounts policy now refuses.

        Either way the router forgets its submitter-to-endpoint shortcuts, so the
        next task of each submitter is mapped and checked afresh.
        """
        outcome = self.mapping.refresh()
        self._record_reload(outcome)
        reasons = ["the identity mapping changed"] if outcome is not None and outcome.loaded else []
        for process in list(self.children.values()):
            if process.retired:
                continue
            try:
                resolve_account(process.account.name, self.settings.policy)
            except AccountRefused as exc:
                log.warning("stopping endpoint %s: %s [%s]", process.endpoint_id, exc, exc.admin_detail)
                self._audit([{"event": "endpoint_stopped", "endpoint_id": process.endpoint_id,
                              "account": process.account.name, "reason": exc.admin_detail or str(exc)}])
                process.retired = True
                self.running.pop(process.key, None)
                signal.pidfd_send_signal(process.pidfd, signal.SIGTERM)  # running tasks get to finish
                reasons.append(f"account {process.account.name} is no longer allowed")
        if reasons:
            self.channel.send(RemapGroups(reason="; ".join(reasons)))

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
                                      endpoint_pid=record.endpoint_pid, held=record.held, adopted=True)
            self.children[pidfd] = process
            self.running[process.key] = process
            log.info("adopted endpoint %s (pid %d) of %s from the manager's previous life", record.endpoint_id,
                     record.endpoint_pid, record.account)
            self._audit([{"event": "endpoint_adopted", "endpoint_id": record.endpoint_id,
                          "pid": record.endpoint_pid, "account": record.account}])
            self.channel.send(Spawned(endpoint_id=record.endpoint_id, pid=record.endpoint_pid,
                                      account=record.account, public_key=record.public_key, reused=True))
        self._save_registry()

    def _save_registry(self) -> None:
        records = []
        for process in self.children.values():
            try:
                records.append(process.record())
            except OSError:
                continue  # exiting right now: the reaper will report it
        registry.save(self.settings.registry_path, records)

    def _reap(self, process: EndpointProcess) -> None:
        if process.adopted:  # not our child: its exit status went to init
            status = signal.SIGKILL  # unknown; report it as killed, so its tasks are retried
        else:
            _, status = os.waitpid(process.pid, 0)
        os.close(process.pidfd)
        if self.running.get(process.key) is process:
            del self.running[process.key]
        self._save_registry()
        how = _describe_exit(status) if not process.adopted else "ended (adopted, so its exit status is unknown)"
        log.info("endpoint %s (pid %d, %s) %s", process.endpoint_id, process.endpoint_pid, process.account.name, how)
        self._audit([{"event": "endpoint_exited", "endpoint_id": process.endpoint_id, "pid": process.endpoint_pid,
                      "account": process.account.name, "how": how}])
        tail = "" if status == 0 else read_log_tail(process.account, process.log_path)
        self.channel.send(EndpointExited(endpoint_id=process.endpoint_id, pid=process.endpoint_pid, how=how,
                                         log_tail=tail, signalled=os.WIFSIGNALED(status)))

    def _stop_children(self) -> None:
        """SIGTERM every endpoint; those still there after the grace period are SIGKILLed."""
        for process in self.children.values():
            signal.pidfd_send_signal(process.pidfd, signal.SIGTERM)
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
                process = self.children.pop(fd)
                if not process.adopted:  # an adopted one is not our child: its pidfd said it ended
                    os.waitpid(process.pid, 0)
                os.close(process.pidfd)
        self._save_registry()


def _decision_record(request: SpawnRequest, progress: Authorization, outcome: str, **fields: Any) -> dict[str, Any]:
    """One audit record of a decision: who asked, which rule mapped them to which account, and the outcome."""
    decision, account = progress.decision, progress.account
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


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return f"was killed by signal {signum} ({signal.Signals(signum).name})"
    return f"exited with status {os.WEXITSTATUS(status)}"
