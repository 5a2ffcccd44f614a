"""Hostile peers for robustness tests: raw sockets that send whatever bytes a test gives them.

``RawPeer`` speaks to a CURVE listener (the service, the router's endpoint
socket) with any key and any frames; ``raw_map`` builds msgpack headers a
well-behaved encoder would never write (deep nesting, 64-bit overflows,
``bytes``/``ext`` where JSON is expected); ``endpoint_secret_key`` reads a
running endpoint's CURVE secret out of its memory, as code running as the
same account could; ``start_spawner`` runs a root spawner whose router is the
test.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from mep.errors import MepError
from mep.manager.spawner_link import SpawnerLink, channel_pair
from mep.protocol import decode
from mep.protocol.curve import generate_keypair, make_curve_client, public_from_secret
from tests.harness import PYTHON

_encoder = msgspec.msgpack.Encoder()


def deep(depth: int) -> msgspec.Raw:
    """``depth`` arrays, each holding the next: a few bytes per level."""
    return msgspec.Raw(b"\x91" * depth + b"\xc0")


def uint64(value: int) -> msgspec.Raw:
    """A msgpack uint64 (0xcf), which no signed 64-bit field can hold above 2**63 - 1."""
    return msgspec.Raw(b"\xcf" + value.to_bytes(8, "big"))


def raw_map(fields: dict[str, Any]) -> bytes:
    """A header as msgpack; values may be ``msgspec.Raw`` pieces, written as they are."""
    return _encoder.encode(fields)


class RawPeer:
    """A DEALER with its own CURVE key pair (or a given secret) that sends any frames and reads replies."""

    def __init__(self, context: zmq.Context, address: str, server_key: str, secret_key: str | None = None) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.sndhwm = 100_000
        make_curve_client(self.socket, server_key, secret_key or generate_keypair()[1])
        self.socket.connect(address)

    def send(self, frames: list[bytes]) -> bool:
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:  # nobody to deliver to (handshake refused) or the peer is slow: dropped
            return False

    def replies(self, timeout: float = 0.0) -> list[Any]:
        """Every header received within ``timeout`` seconds (an undecodable reply fails the test)."""
        found = []
        deadline = time.monotonic() + timeout
        while self.socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            header, _ = decode(self.socket.recv_multipart())
            found.append(header)
        return found

    def reply(self, kind: type, timeout: float = 30.0) -> Any:
        """The first reply of type ``kind`` within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            header, _ = decode(self.socket.recv_multipart())
            if isinstance(header, kind):
                return header
        raise AssertionError(f"no {kind.__name__} within {timeout:.0f} s")

    def close(self) -> None:
        self.socket.close(linger=0)


def endpoint_records(run_dir: Path) -> list[dict[str, Any]]:
    """The spawner's registry of running endpoints (root-readable)."""
    return json.loads((run_dir / "endpoints.json").read_text())


_Z85_RUN = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40,48}")  # a key, maybe with a neighbour or two


def endpoint_secret_key(pid: int, public_key: str) -> str:
    """The secret half of ``public_key``, found in the memory of process ``pid``."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        for line in maps:
            span, perms, *_ = line.split()
            if not perms.startswith("rw"):
                continue
            start, end = (int(part, 16) for part in span.split("-"))
            try:
                memory.seek(start)
                data = memory.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            for match in _Z85_RUN.finditer(data):
                run = match.group().decode()
                for offset in range(len(run) - 39):
                    candidate = run[offset:offset + 40]
                    try:
                        if public_from_secret(candidate) == public_key:
                            return candidate
                    except (ValueError, MepError, zmq.ZMQError):
                        continue
    raise AssertionError(f"no secret for {public_key} in the memory of process {pid}")


SPAWNER_DRIVER = """
import logging, os, select, socket, sys, time
from pathlib import Path
from mep.config.manager import ManagerConfig
from mep.errors import SpawnError
import mep.root.spawner as spawner_module
from mep.root.router_process import RouterLaunch, RouterProcess
from mep.root.spawner import Spawner, SpawnerSettings
from mep.manager.spawner_link import RouterBoot, SpawnerLink
from mep.root.accounts import unprivileged_account
from mep.root.start import account_rules
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
config_path, fd, state = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
config = ManagerConfig.load(Path(config_path))
policy, trusted = account_rules(config, unprivileged_account(config.router_user, "router_user"))
channel, started = socket.socket(fileno=fd), []

def start_router(_launch):  # the test is the router: a stand-in process, gone once the test hangs up
    if started:
        raise SpawnError("the test played the only router; none is started again")
    pid = os.fork()
    if pid == 0:
        hangup = select.poll()
        hangup.register(channel.fileno(), 0)  # no events asked: wakes only on POLLHUP/POLLERR
        hangup.poll()
        os._exit(0)
    started.append(pid)
    return RouterProcess(pid=pid, pidfd=os.pidfd_open(pid), channel=SpawnerLink(channel),
                         started_at=time.monotonic())

spawner_module.start_router = start_router
launch = RouterLaunch(account=unprivileged_account(config.router_user, "router_user"), drop_privileges=True,
                      lock_fd=-1,
                      boot=RouterBoot(config={}, manager_secret_key="", endpoint_address="", endpoint_secret_key="",
                                      log_level=logging.INFO))
settings = SpawnerSettings(config=config, router_address="ipc://" + str(state / "none.sock"),
                           router_public_key=sys.argv[4], policy=policy, trusted_owner_uids=trusted,
                           drop_privileges=True, audit_log=state / "audit.jsonl",
                           registry_path=state / "registry" / "endpoints.json", router=launch)
sys.exit(Spawner(settings).run())
"""


def start_spawner(config_path: Path, state: Path) -> tuple[subprocess.Popen, SpawnerLink]:
    """A root spawner for the manager config at ``config_path``, the test holding the router's end.

    Its audit log, log and registry (``registry/endpoints.json``) are in ``state``.
    """
    (state / "registry").mkdir(exist_ok=True)
    router_end, spawner_end = channel_pair()
    log = open(state / "spawner.log", "ab")  # noqa: SIM115 - the child keeps it
    popen = subprocess.Popen([PYTHON, "-c", SPAWNER_DRIVER, str(config_path), str(spawner_end.fileno()), str(state),
                              generate_keypair()[0]], pass_fds=[spawner_end.fileno()], stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd="/")
    spawner_end.close()
    log.close()
    return popen, SpawnerLink(router_end)
