"""The root spawner's loop: answer spawn requests, watch endpoint processes, report deaths.

For each ``SpawnRequest`` from the router: map the identity set to one
account, check the account against policy, validate the user's config against
the admin's schema and render the admin's template, then either hand back the
endpoint already running for the same (account, template digest, config) or
fork, drop privileges and exec a new one. Each endpoint gets a fresh CURVE key
pair; the secret goes only to the endpoint's stdin, the public half to the
router. Children are watched through pidfds, so a recycled pid can never be
mistaken for one of ours.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import uuid
from dataclasses import dataclass

import msgspec

from mep.config.manager import ManagerConfig
from mep.config.render import TemplateRenderer
from mep.errors import MepError, TaskRefusedError
from mep.manager.spawner.accounts import Account, AccountPolicy, AccountRefused, resolve_account
from mep.manager.spawner.identity import IdentityMapper
from mep.manager.spawner.policy_files import read_policy_file
from mep.manager.spawner.privdrop import SpawnPlan, read_log_tail, spawn
from mep.manager.spawner_link import SpawnerLink
from mep.protocol.curve import generate_keypair
from mep.protocol.guard import forbid_unpickling, process_status
from mep.protocol.messages import (
    EndpointBoot,
    EndpointExited,
    RetireEndpoint,
    Spawned,
    SpawnerStatus,
    SpawnerStatusRequest,
    SpawnRefused,
    SpawnRequest,
)

log = logging.getLogger("mep.spawner")

EndpointKey = tuple[int, str, str]  # (uid, template digest, canonical rendered config)


@dataclass
class EndpointProcess:
    endpoint_id: str
    pid: int
    pidfd: int
    account: Account
    key: EndpointKey
    public_key: str
    log_path: str
    retired: bool = False


@dataclass(frozen=True)
class SpawnerSettings:
    """What the spawner knows before the manager splits (all root-checked)."""

    config: ManagerConfig
    router_address: str
    router_public_key: str
    policy: AccountPolicy
    trusted_owner_uids: frozenset[int]
    drop_privileges: bool


class Spawner:
    def __init__(self, settings: SpawnerSettings, channel: SpawnerLink) -> None:
        self.settings = settings
        self.channel = channel
        config = settings.config
        self.mapper = IdentityMapper.from_file(config.identity_mapping, trusted_owner_uids=settings.trusted_owner_uids)
        self.renderer = TemplateRenderer(
            config.template, config.schema_file,
            template_text=read_policy_file(config.template, trusted_owner_uids=settings.trusted_owner_uids).decode(),
            schema_text=read_policy_file(config.schema_file, trusted_owner_uids=settings.trusted_owner_uids).decode(),
        )
        self.children: dict[int, EndpointProcess] = {}  # pidfd -> process
        self.running: dict[EndpointKey, EndpointProcess] = {}
        self.router_pid = 0

    def run(self) -> int:
        forbid_unpickling()
        # The router stops first (telling endpoints to finish); we follow when it hangs up the channel.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.router_pid and os.kill(self.router_pid, signal.SIGTERM))
        while True:
            readable, _, _ = select.select([self.channel.fileno(), *self.children], [], [])
            for fd in readable:
                if fd in self.children:
                    self._reap(self.children.pop(fd))
                elif not self._serve_router():
                    self._stop_children()
                    return 0

    def _serve_router(self) -> bool:
        try:
            message = self.channel.receive()
        except MepError as exc:
            log.error("%s", exc)
            return True
        match message:
            case None:
                log.info("the router closed the channel; stopping")
                return False
            case SpawnRequest():
                self.channel.send(self._spawn_or_refuse(message))
            case RetireEndpoint():
                for process in self.children.values():
                    if process.endpoint_id == message.endpoint_id:
                        process.retired = True
                        self.running.pop(process.key, None)
            case SpawnerStatusRequest():
                self.channel.send(SpawnerStatus(process=process_status("spawner")))
            case _:
                log.warning("ignoring an unexpected %s from the router", type(message).__name__)
        return True

    def _spawn_or_refuse(self, request: SpawnRequest) -> Spawned | SpawnRefused:
        who = request.identities[0].username if request.identities else request.submitter_id
        try:
            return self._spawn(request)
        except TaskRefusedError as exc:
            message = exc.for_identity(who) if isinstance(exc, AccountRefused) else str(exc)
            log.warning("refused %s (%s): %s [%s]", who, request.submitter_id, exc.code, exc.admin_detail or message)
            return SpawnRefused(request_id=request.request_id, code=exc.code, message=message)

    def _spawn(self, request: SpawnRequest) -> Spawned:
        identities = [msgspec.structs.asdict(identity) for identity in request.identities]
        decision = self.mapper.map(identities)
        account = resolve_account(decision.account, self.settings.policy)
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
            return Spawned(request_id=request.request_id, endpoint_id=existing.endpoint_id, pid=existing.pid,
                           account=account.name, public_key=existing.public_key, reused=True)
        public_key, secret_key = generate_keypair()
        boot = EndpointBoot(endpoint_id=endpoint_id, account=account.name,
                            router_address=self.settings.router_address,
                            router_public_key=self.settings.router_public_key, secret_key=secret_key,
                            config=rendered)
        # realpath: the log path is opened without following any symlink, and /home may be one
        log_path = os.path.join(os.path.realpath(account.home), ".mep", "endpoints", endpoint_id, "endpoint.log")
        child = spawn(SpawnPlan(account=account, argv=[sys.executable, "-m", "mep.endpoint"],
                                stdin_data=msgspec.json.encode(boot), log_path=log_path,
                                drop_privileges=self.settings.drop_privileges))
        process = EndpointProcess(endpoint_id=endpoint_id, pid=child.pid, pidfd=child.pidfd, account=account,
                                  key=key, public_key=public_key, log_path=log_path)
        self.children[child.pidfd] = process
        self.running[key] = process
        log.info("spawned endpoint %s (pid %d) as %s (uid %d) for %s via mapping document %d rule %d",
                 endpoint_id, child.pid, account.name, account.uid, decision.identity_id,
                 decision.document_index, decision.mapping_index)
        return Spawned(request_id=request.request_id, endpoint_id=endpoint_id, pid=child.pid,
                       account=account.name, public_key=public_key)

    def _reap(self, process: EndpointProcess) -> None:
        _, status = os.waitpid(process.pid, 0)
        os.close(process.pidfd)
        if self.running.get(process.key) is process:
            del self.running[process.key]
        how = _describe_exit(status)
        log.info("endpoint %s (pid %d, %s) %s", process.endpoint_id, process.pid, process.account.name, how)
        tail = "" if status == 0 else read_log_tail(process.account, process.log_path)
        self.channel.send(EndpointExited(endpoint_id=process.endpoint_id, pid=process.pid, how=how, log_tail=tail))

    def _stop_children(self) -> None:
        for process in self.children.values():
            signal.pidfd_send_signal(process.pidfd, signal.SIGTERM)
        for process in self.children.values():
            os.waitpid(process.pid, 0)
            os.close(process.pidfd)
        self.children.clear()


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return f"was killed by signal {signum} ({signal.Signals(signum).name})"
    return f"exited with status {os.WEXITSTATUS(status)}"
