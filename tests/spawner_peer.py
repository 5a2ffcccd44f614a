"""A real root spawner in a child process, driven over its socketpair as a compromised router would.

``spawner_peer`` forks a process that builds a ``Spawner`` from a real
manager config (mapping file, shipped template, audit log, the account policy
``mep manager start`` would use) and runs its loop; the test holds the
router's end of the socketpair and may send it anything. The service's
signing key is the test's (``SpawnerPeer.signer``), so a test can sign
genuine assertions as well as forge bad ones. An optional ``EndpointRouter``
plays the router's endpoint socket (a CURVE ROUTER), so endpoints the spawner
starts connect to the test.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq

from mep.config.manager import ManagerConfig
from mep.errors import SpawnError
from mep.root.router_process import RouterLaunch, RouterProcess
from mep.manager.spawner_link import RouterBoot, SpawnerLink, channel_pair
from mep.protocol import decode, encode
from mep.protocol.assertions import AssertionSigner, Claims, config_digest, generate_signing_key
from mep.protocol.curve import ZapHandler, generate_keypair, make_curve_server
from mep.protocol.messages import (
    IdentityResource,
    Ready,
    Result,
    Results,
    Runtime,
    RouterStopping,
    Spawned,
    SpawnRefused,
    SpawnRequest,
)
from tests.harness import children_of

RUNTIME = Runtime(python="3.11.2", dill="0.4.1", mep="0.1.0", platform="linux")


def identity_of(username: str) -> IdentityResource:
    return IdentityResource(id=str(uuid.uuid5(uuid.NAMESPACE_URL, username)), username=username)


class EndpointRouter:
    """The router's endpoint-facing ROUTER socket, held by the test: any endpoint key is let in."""

    def __init__(self, directory: Path, secret: str) -> None:
        self.context = zmq.Context()
        self.zap = ZapHandler(self.context, {"mep-endpoints": lambda key: key})
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.router_mandatory = True
        make_curve_server(self.socket, secret, "mep-endpoints")
        path = directory / "endpoints.sock"
        self.socket.bind(f"ipc://{path}")
        os.chmod(path, 0o666)
        self.routes: dict[str, bytes] = {}  # endpoint id -> routing id

    def wait_ready(self, endpoint_id: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while endpoint_id not in self.routes:
            assert self.socket.poll(max(0.0, deadline - time.monotonic()) * 1000), f"{endpoint_id} never connected"
            frames = self.socket.recv_multipart()
            header, _ = decode(frames[1:])
            if isinstance(header, Ready):
                self.routes[header.endpoint_id] = frames[0]

    def send(self, endpoint_id: str, header: msgspec.Struct, payloads: list[bytes] = ()) -> None:
        self.socket.send_multipart([self.routes[endpoint_id], *encode(header, list(payloads))])

    def results(self, count: int, timeout: float = 60.0) -> dict[str, tuple[Result, bytes | None]]:
        """The next ``count`` distinct results, by task id (heartbeats and start reports skipped)."""
        found: dict[str, tuple[Result, bytes | None]] = {}
        deadline = time.monotonic() + timeout
        while len(found) < count:
            assert self.socket.poll(max(0.0, deadline - time.monotonic()) * 1000), f"only {found} arrived"
            header, payloads = decode(self.socket.recv_multipart()[1:])
            if isinstance(header, Results):
                for result in header.results:
                    found[result.task_id] = (result, payloads[result.payload_frame]
                                             if result.payload_frame != -1 else None)
        return found

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


@dataclass
class SpawnerPeer:
    pid: int
    link: SpawnerLink
    config: ManagerConfig
    signer: AssertionSigner
    directory: Path
    router: EndpointRouter | None
    _next_request: int = 0

    @property
    def audit_path(self) -> Path:
        return self.directory / "audit.jsonl"

    def claims(self, identity: IdentityResource, *, config: dict[str, Any] | None = None,
               task_ids: list[str] | None = None, endpoint_id: str | None = None, lifetime: float = 600.0,
               **fields: Any) -> Claims:
        """What the genuine service would sign for a group of ``identity``'s tasks (fields override)."""
        now = time.time()
        values: dict[str, Any] = dict(
            submitter_id=identity.id, identities=[identity], endpoint_id=endpoint_id or self.config.endpoint_id,
            config_digest=config_digest(config or {}), task_ids=task_ids or [str(uuid.uuid4())], issued_at=now,
            expires_at=now + lifetime, nonce=uuid.uuid4().hex)
        values.update(fields)
        return Claims(**values)

    def request(self, identity: IdentityResource, assertion: str, config: dict[str, Any] | None = None,
                timeout: float = 90.0) -> Spawned | SpawnRefused:
        """Send a spawn request naming ``identity`` and wait for the spawner's answer to it."""
        self._next_request += 1
        self.link.send(SpawnRequest(request_id=self._next_request, submitter_id=identity.id, identities=[identity],
                                    user_endpoint_config=config or {}, runtime=RUNTIME,
                                    identity_assertion=assertion))
        self.link.sock.settimeout(timeout)
        while True:
            message = self.link.receive()
            assert message is not None, f"the spawner hung up:\n{self.log()}"
            if isinstance(message, (Spawned, SpawnRefused)) and message.request_id == self._next_request:
                return message

    def endpoints(self) -> list[int]:
        """The spawner's children but the stand-in router: the endpoints (or session holders) it started."""
        stand_ins = {int(pid) for pid in re.findall(r"router started \(pid (\d+)\)", self.log())}
        return [pid for pid in children_of(self.pid) if pid not in stand_ins]

    def audit_records(self, event: str = "decision") -> list[dict[str, Any]]:
        lines = self.audit_path.read_text().splitlines() if self.audit_path.exists() else []
        return [record for record in map(json.loads, lines) if record.get("event") == event]

    def log(self) -> str:
        path = self.directory / "spawner.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _router_is_the_test(channel: socket.socket, test_alive: int) -> None:
    """The spawner's router is the test: its first (and only) router start hands over the test's channel.

    A stand-in child plays the router process the spawner watches; like a real router it exits when the
    test hangs up (``test_alive``: the read end of a pipe whose write end only the test holds).
    """
    import mep.root.spawner as spawner_module
    started: list[int] = []

    def start_router(_launch: RouterLaunch) -> RouterProcess:
        if started:
            raise SpawnError("the test played the only router; none is started again")
        stand_in = os.fork()
        if stand_in == 0:
            os.read(test_alive, 1)  # end of file: the test has hung up
            os._exit(0)
        started.append(stand_in)
        return RouterProcess(pid=stand_in, pidfd=os.pidfd_open(stand_in), channel=SpawnerLink(channel),
                             started_at=time.monotonic())

    spawner_module.start_router = start_router


@contextmanager
def spawner_peer(mapping: list[dict[str, Any]], *, router_user: str, with_router: bool = False,
                 settings: dict[str, Any] | None = None) -> Iterator[SpawnerPeer]:
    """A running spawner for ``mapping``; stopped (with its endpoints) and removed afterwards."""
    from mep.root.spawner import Spawner, SpawnerSettings
    from mep.root.accounts import unprivileged_account
    from mep.root.start import account_rules, pam_settings

    directory = Path(tempfile.mkdtemp(prefix="mep-spawner-", dir="/var/tmp"))
    os.chmod(directory, 0o755)  # endpoints connect to the socket in it as their accounts
    router_public, router_secret = generate_keypair()
    router: EndpointRouter | None = None
    try:
        mapping_path = directory / "identity_mapping.json"
        mapping_path.write_text(json.dumps(mapping))
        signer = AssertionSigner(generate_signing_key())
        config = ManagerConfig.model_validate({
            "endpoint_id": str(uuid.uuid4()), "service_address": "tcp://127.0.0.1:1",
            "service_public_key": generate_keypair()[0], "manager_secret_key_file": str(directory / "unused"),
            "identity_mapping": str(mapping_path), "audit_log": str(directory / "audit.jsonl"),
            "router_user": router_user, "service_signing_keys": [signer.public_key], "heartbeat_interval": 1.0,
            **(settings or {})})
        policy, trusted = account_rules(config, unprivileged_account(router_user, "router_user"))
        pam = pam_settings(config, mapping_path, trusted_owner_uids=trusted)
        router_end, spawner_end = channel_pair()
        test_alive, test_alive_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the spawner: never returns into the test
            code = 1
            try:
                router_end.close()
                logging.basicConfig(filename=directory / "spawner.log", level=logging.INFO, force=True)
                os.close(test_alive_write)
                _router_is_the_test(spawner_end, test_alive)
                launch = RouterLaunch(account=unprivileged_account(router_user, "router_user"), drop_privileges=True,
                                      lock_fd=-1,
                                      boot=RouterBoot(config={}, manager_secret_key="", endpoint_address="",
                                                      endpoint_secret_key="", log_level=logging.INFO))
                spawner = Spawner(SpawnerSettings(
                    config=config, router_address=f"ipc://{directory}/endpoints.sock",
                    router_public_key=router_public, policy=policy,
                    trusted_owner_uids=trusted, drop_privileges=True, audit_log=config.audit_log_path(),
                    registry_path=directory / "endpoints.json", router=launch, pam=pam))
                code = spawner.run()
            except BaseException:
                logging.exception("the spawner failed")
            finally:
                logging.shutdown()
                os._exit(code)
        spawner_end.close()
        os.close(test_alive)
        if with_router:  # after the fork: the spawner must not inherit a ZeroMQ context
            router = EndpointRouter(directory, router_secret)
        peer = SpawnerPeer(pid=pid, link=SpawnerLink(router_end), config=config, signer=signer,
                           directory=directory, router=router)
        try:
            yield peer
        finally:
            peer.link.send(RouterStopping())  # on purpose: the spawner stops its endpoints when we hang up
            router_end.close()
            os.close(test_alive_write)
            _, status = os.waitpid(pid, 0)
            assert status == 0, f"the spawner exited with wait status {status}:\n{peer.log()}"
    finally:
        if router is not None:
            router.close()
        shutil.rmtree(directory, ignore_errors=True)
