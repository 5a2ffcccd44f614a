"""Fuzzing every listener with generated and mutated frames: afterwards every process is alive and serving.

Hypothesis generates messages (random frames; valid envelopes with fields
replaced by deep nesting, 64-bit overflows, ``bytes``/``ext``, NaN, lying
length prefixes; dropped, added and retagged fields; bad frame indexes;
wrong frame counts) and throws them, for a bounded time each, at:

- the service: raw TCP garbage; a CURVE client pinning the wrong server key;
  a client with the right key but no valid token; a client with a valid token;
- the router, from an endpoint key stolen out of a real endpoint's memory;
- a root spawner, from the router's side of its socketpair;
- a real user endpoint, from a test ROUTER socket playing its router.

Then the service, router and spawners are the same live processes, the
spawner and the endpoint still answer, and an ordinary submission by another
identity completes. The counts are printed. ``derandomize`` makes every run
throw the same messages, so a failure in CI reproduces.

Left out on purpose: a ``SHUTDOWN`` to the endpoint and an empty datagram
to the spawner, which are how their peers legitimately tell them to stop.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st

from mep.errors import AuthenticationThrottledError
from mep.protocol import decode, encode
from mep.protocol.assertions import AssertionSigner, Claims, config_digest, generate_signing_key
from mep.protocol.curve import generate_keypair
from mep.protocol.messages import (
    SIGNATURE,
    Error,
    EndpointBoot,
    IdentityResource,
    Ready,
    Results,
    Runtime,
    RouterStopping,
    SpawnRefused,
    Spawned,
    SpawnRequest,
    TaskRef,
    Tasks,
)
from mep.sdk.serialize import client_runtime, deserialize, function_hash, serialize_args, serialize_function
from tests.harness import DOMAIN_STRIP, PYTHON, expression_mapping, local_template_boot, wait_for
from tests.peers import RawPeer, deep, endpoint_records, endpoint_secret_key, raw_map, start_spawner, uint64

pytestmark = pytest.mark.root

SECONDS_PER_LISTENER = 4.0
MAX_EXAMPLES = 100_000  # per listener; the time bound ends it first
RUNTIME = Runtime(python="3.11.2", dill="0.4.1", mep="0.1.0", platform="linux")


def add(a: int, b: int) -> int:
    return a + b


# --- what gets thrown ------------------------------------------------------------------------------------

WIRE_INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry at all
NASTY = st.one_of(
    st.integers(1, 3000).map(deep),
    st.sampled_from([uint64(2**64 - 1), uint64(2**63), msgspec.Raw(b"\xdd\xff\xff\xff\xff"),  # lying lengths
                     msgspec.Raw(b"\xdb\xff\xff\xff\xff"), msgspec.Raw(b"\xc1"), float("nan"), float("inf")]),
    st.binary(max_size=64),
    st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=16)),
    WIRE_INTS,
    st.text(max_size=300),
    st.none(),
    st.booleans(),
    st.lists(st.one_of(WIRE_INTS, st.text(max_size=40)), max_size=20),
    st.dictionaries(st.text(max_size=12), st.one_of(WIRE_INTS, st.binary(max_size=8)), max_size=5),
)
FRAME_INDEX_FIELDS = ("args_frame", "fn_frame", "payload_frame", "runtime")


def templates(token: str) -> list[dict[str, Any]]:
    """A valid envelope of each kind a peer might send, as plain data to mutate."""
    task_id, fn_hash = str(uuid.uuid4()), "0" * 64
    identity = IdentityResource(id=str(uuid.uuid4()), username="nobody-fuzzed@example.org")
    ref = {"task_id": task_id, "fn_hash": fn_hash, "args_frame": 0, "fn_frame": 1, "walltime": 1.0}
    result = {"task_id": task_id, "status": "success", "payload_frame": 0}
    headers = [
        {"type": "SUBMIT", "token": token, "request_id": 1, "endpoint_id": str(uuid.uuid4()),
         "user_endpoint_config": {"workers": 1}, "runtime": msgspec.to_builtins(RUNTIME), "tasks": [ref]},
        {"type": "FETCH", "token": token, "request_id": 2, "task_ids": [task_id]},
        {"type": "CANCEL", "token": token, "request_id": 3, "task_ids": [task_id]},
        {"type": "RESULTS_ACK", "token": token, "task_ids": [task_id]},
        {"type": "TASK_QUERY", "token": token, "request_id": 4, "states": ["waiting"], "limit": 10},
        {"type": "STATUS", "token": token, "request_id": 5},
        {"type": "REGISTER", "endpoint_id": str(uuid.uuid4())},
        {"type": "HEARTBEAT", "processes": []},
        {"type": "RESULTS", "results": [result]},
        {"type": "STARTED", "task_ids": [task_id]},
        {"type": "TASKS_LOST", "lost": [{"task_id": task_id, "attempted": True, "reason": "x"}]},
        {"type": "DISPATCH_ACK", "accepted": [task_id], "rejected": []},
        {"type": "DISPATCH", "tasks": [ref], "groups": [{"submitter_id": identity.id,
                                                         "identities": [msgspec.to_builtins(identity)],
                                                         "user_endpoint_config": {}, "task_ids": [task_id],
                                                         "runtime": msgspec.to_builtins(RUNTIME)}]},
        {"type": "READY", "endpoint_id": str(uuid.uuid4()), "pid": 1},
        {"type": "IDLE_EXIT"},
        {"type": "TASKS", "tasks": [ref], "runtimes": [msgspec.to_builtins(RUNTIME)]},
        {"type": "SPAWN", "request_id": 6, "submitter_id": identity.id, "identities": [msgspec.to_builtins(identity)],
         "user_endpoint_config": {}, "runtime": msgspec.to_builtins(RUNTIME)},
        {"type": "RETIRE", "endpoint_id": str(uuid.uuid4())},
        {"type": "SPAWNER_STATUS"},
    ]
    return headers


TAGS = [header["type"] for header in templates("")] + ["", "SHUTDOWN-NOT", "X" * 300]


@st.composite
def mutated(draw: Callable, headers: list[dict[str, Any]]) -> dict[str, Any]:
    header = json.loads(json.dumps(draw(st.sampled_from(headers))))  # a deep copy to mutate
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["replace", "drop", "add", "retag", "frame index"]))
        keys = sorted(header)
        if action == "replace" and keys:
            header[draw(st.sampled_from(keys))] = draw(NASTY)
        elif action == "drop" and keys:
            del header[draw(st.sampled_from(keys))]
        elif action == "add":
            header[draw(st.text(max_size=12))] = draw(NASTY)
        elif action == "retag":
            header["type"] = draw(st.sampled_from(TAGS))
        else:
            for field in ("tasks", "results"):
                if isinstance(header.get(field), list) and header[field] and isinstance(header[field][0], dict):
                    header[field][0][draw(st.sampled_from(FRAME_INDEX_FIELDS))] = draw(WIRE_INTS)
    return header


def messages(headers: list[dict[str, Any]]) -> st.SearchStrategy[list[bytes]]:
    """Whole multipart messages: random frames, or a mutated envelope with random payloads and framing."""
    random_frames = st.lists(st.binary(max_size=200), min_size=1, max_size=5)

    @st.composite
    def envelope(draw: Callable) -> list[bytes]:
        frames = [SIGNATURE, raw_map(draw(mutated(headers))), *draw(st.lists(st.binary(max_size=64), max_size=4))]
        framing = draw(st.sampled_from(["keep", "keep", "no signature", "bad signature", "header only",
                                        "many frames"]))
        if framing == "no signature":
            frames = frames[1:]
        elif framing == "bad signature":
            frames[0] = draw(st.binary(max_size=8))
        elif framing == "header only":
            frames = frames[:2]
        elif framing == "many frames":
            frames += [b""] * draw(st.integers(0, 300))
        return frames

    return st.one_of(random_frames, envelope())


def datagrams(headers: list[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    """Spawner-channel datagrams: one envelope each, no frames; never empty (that is how a peer hangs up)."""
    return st.one_of(st.binary(min_size=1, max_size=300), mutated(headers).map(raw_map))


class _TimeUp(Exception):
    """Ends a listener's turn: hypothesis stops generating at the first exception (no shrinking phase)."""


def throw(strategy: st.SearchStrategy, send: Callable[[Any], None]) -> int:
    """Send generated messages for ``SECONDS_PER_LISTENER`` seconds (or ``MAX_EXAMPLES``); how many were sent."""
    sent = 0
    deadline = time.monotonic() + SECONDS_PER_LISTENER

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
    @given(strategy)
    def one(message: Any) -> None:
        nonlocal sent
        if time.monotonic() > deadline:
            raise _TimeUp
        send(message)
        sent += 1

    try:
        one()
    except _TimeUp:
        pass
    return sent


# --- a standalone spawner and endpoint, with the test as their router -------------------------------------

class PlayedRouter:
    """A ROUTER socket a real endpoint connects to, the test playing the manager's router."""

    def __init__(self, context: zmq.Context, directory: Path) -> None:
        self.public_key, secret = generate_keypair()
        self.socket = context.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.router_mandatory = True
        self.socket.curve_server = True
        self.socket.curve_secretkey = secret.encode()
        self.address = f"ipc://{directory}/endpoint.sock"
        self.socket.bind(self.address)
        os.chmod(directory / "endpoint.sock", 0o666)
        self.endpoint = b""

    def wait_ready(self) -> None:
        while True:
            assert self.socket.poll(60_000), "the endpoint never said READY"
            routing_id, *frames = self.socket.recv_multipart()
            if isinstance(decode(frames)[0], Ready):
                self.endpoint = routing_id
                return

    def send(self, frames: list[bytes]) -> None:
        try:
            self.socket.send_multipart([self.endpoint, *frames], zmq.NOBLOCK)
        except zmq.Again:
            pass  # the endpoint is not keeping up: this one is dropped, as a real router would retry later

    def received(self) -> list[Any]:
        headers = []
        while self.socket.poll(0):
            _, *frames = self.socket.recv_multipart()
            headers.append(decode(frames))
        return headers


SERVICE_SIGNER = AssertionSigner(generate_signing_key())  # the service whose assertions the played endpoint trusts
SERVED = IdentityResource(id=str(uuid.uuid4()), username="fuzzed-endpoint-owner@example.org")
MANAGER_ENDPOINT_ID = str(uuid.uuid4())


def start_endpoint(account: pwd.struct_passwd, router: PlayedRouter, log_path: Path) -> subprocess.Popen:
    boot = EndpointBoot(endpoint_id=str(uuid.uuid4()), account=account.pw_name, router_address=router.address,
                        router_public_key=router.public_key, secret_key=generate_keypair()[1],
                        heartbeat_interval=1.0, **local_template_boot(),
                        manager_endpoint_id=MANAGER_ENDPOINT_ID, identity_id=SERVED.id, identities=[SERVED],
                        assertion_keys=[SERVICE_SIGNER.public_key])
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            ["runuser", "-u", account.pw_name, "--", "env", "-i", f"HOME={account.pw_dir}",
             f"PATH={Path(PYTHON).parent}:/usr/bin:/bin", PYTHON, "-m", "mep.endpoint"],
            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
    popen.stdin.write(msgspec.json.encode(boot))
    popen.stdin.close()
    return popen


@pytest.fixture
def scratch() -> Iterator[Path]:
    directory = Path("/run") / f"mep-fuzz-{secrets.token_hex(4)}"
    directory.mkdir(mode=0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def stop(popen: subprocess.Popen) -> None:
    if popen.poll() is None:
        os.killpg(popen.pid, 9) if popen.args[0] == "runuser" else popen.kill()
        popen.wait(timeout=30)


# --- the test --------------------------------------------------------------------------------------------


def test_no_generated_message_stops_any_listener(deploy, account_factory, scratch, capsys) -> None:
    alice, bob, carol = (account_factory(prefix) for prefix in ("mepfuzza", "mepfuzzb", "mepfuzzc"))
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    attacker, bystander = (deploy.identity(f"{a.pw_name}@example.org") for a in (alice, bob))
    with deploy.executor(attacker, manager) as executor:  # the attacker's own endpoint, whose key it steals
        assert executor.submit(add, 1, 1).result(timeout=60) == 2
    pids = (deploy.service.popen.pid, manager.router_pid, manager.spawner_pid)
    context = zmq.Context()
    counts: dict[str, tuple[int, int]] = {}

    def against_service(name: str, peer: RawPeer, token: str) -> None:
        refusals = 0

        def send(frames: list[bytes]) -> None:
            nonlocal refusals
            peer.send(frames)
            refusals += sum(isinstance(reply, Error) for reply in peer.replies())

        sent = throw(messages(templates(token)), send)
        refusals += sum(isinstance(reply, Error) for reply in peer.replies(timeout=2.0))
        peer.close()
        counts[name] = (sent, refusals)

    try:
        host, port = deploy.address.removeprefix("tcp://").rsplit(":", 1)

        def raw_tcp(data: list[bytes]) -> None:
            with socket.create_connection((host, int(port)), timeout=2) as connection:
                connection.sendall(b"".join(data))

        counts["service, raw TCP"] = (throw(st.lists(st.binary(min_size=1, max_size=400), min_size=1, max_size=3),
                                            raw_tcp), 0)
        against_service("service, wrong server key", RawPeer(context, deploy.address, generate_keypair()[0]), "")
        against_service("service, key but no token", RawPeer(context, deploy.address, deploy.service_key),
                        "mep_not-a-token")
        against_service("service, valid token", RawPeer(context, deploy.address, deploy.service_key),
                        attacker.token)

        (record,) = endpoint_records(manager.run_dir)
        stolen = endpoint_secret_key(record["endpoint_pid"], record["public_key"])
        socket_path = manager.run_dir / "router" / "endpoints.sock"
        peer = RawPeer(context, f"ipc://{socket_path}", Path(f"{socket_path}.pub").read_text().strip(),
                       secret_key=stolen)
        refused_before = manager.log().count(f"a message from endpoint {record['endpoint_id']}")
        sent = throw(messages(templates("")), peer.send)
        time.sleep(2)
        peer.close()
        counts["router, stolen endpoint key"] = (
            sent, manager.log().count(f"a message from endpoint {record['endpoint_id']}") - refused_before)

        spawner, channel = start_spawner(manager.config_path, scratch)

        def to_spawner(data: bytes) -> None:
            try:
                channel.sock.send(data)  # raw bytes, as a compromised router would write them
            except BlockingIOError:
                pass  # the spawner is busy: dropped
            while True:
                try:
                    reply = channel.receive()
                except BlockingIOError:
                    return
                assert reply is not None, "the spawner hung up"

        sent = throw(datagrams(templates("")), to_spawner)
        assert spawner.poll() is None, (scratch / "spawner.log").read_text()
        channel.sock.setblocking(True)
        channel.sock.settimeout(30)
        channel.send(SpawnRequest(request_id=10**6, submitter_id="x", runtime=RUNTIME,
                                  identities=[IdentityResource(id=str(uuid.uuid4()),
                                                               username="no-such-fuzz-account@example.org")]))
        while not isinstance(answer := channel.receive(), (SpawnRefused, Spawned)) or answer.request_id != 10**6:
            assert answer is not None, "the spawner hung up"
        counts["spawner channel"] = (sent, (scratch / "spawner.log").read_text().count("refused"))  # all read now
        channel.send(RouterStopping())  # a router stopping on purpose: when it hangs up, the spawner stops too
        channel.sock.close()
        assert spawner.wait(timeout=60) == 0, (scratch / "spawner.log").read_text()

        router = PlayedRouter(context, scratch)
        endpoint = start_endpoint(carol, router, scratch / "endpoint.log")
        router.wait_ready()
        endpoint_headers = [header for header in templates("") if header["type"] != "SHUTDOWN"]
        answered = 0

        def to_endpoint(frames: list[bytes]) -> None:
            nonlocal answered
            router.send(frames)
            answered += len(router.received())

        sent = throw(messages(endpoint_headers), to_endpoint)
        body = serialize_function(add)
        task_id = str(uuid.uuid4())
        now = time.time()
        assertion = SERVICE_SIGNER.sign(Claims(
            submitter_id=SERVED.id, identities=[SERVED], endpoint_id=MANAGER_ENDPOINT_ID,
            config_digest=config_digest({}), task_ids=[task_id], issued_at=now, expires_at=now + 600,
            nonce=uuid.uuid4().hex))
        router.send(encode(Tasks(tasks=[TaskRef(task_id=task_id, fn_hash=function_hash(body), args_frame=0,
                                                fn_frame=1)], runtimes=[client_runtime()], assertions=[assertion]),
                           [serialize_args((2, 3), {}), body]))

        def result() -> Any:
            for header, payloads in router.received():
                for item in getattr(header, "results", []) if isinstance(header, Results) else []:
                    if item.task_id == task_id:
                        return item, payloads
            return None

        item, payloads = wait_for(result, timeout=120, what="the fuzzed endpoint to run an ordinary task")
        assert deserialize(payloads[item.payload_frame]) == 5, item
        assert endpoint.poll() is None, (scratch / "endpoint.log").read_text()
        counts["endpoint, from its router"] = (sent, (scratch / "endpoint.log").read_text().count("refused a message"))
        stop(endpoint)
    finally:
        context.destroy(linger=0)
        with capsys.disabled():
            for name, (sent, refusals) in counts.items():
                print(f"\nfuzz {name}: {sent} messages sent, {refusals} refusals seen", end="")
            print()

    assert (deploy.service.popen.pid, manager.router_pid, manager.spawner_pid) == pids
    assert deploy.service.popen.poll() is None and manager.process.popen.poll() is None
    try:
        assert bystander_sum(deploy, bystander, manager) == 42
    except AuthenticationThrottledError:
        # The fuzzer's failed authentications came from 127.0.0.1 as well, and the throttle holds that address for
        # the failure window (60 s): a quick fuzz run ends inside it. Once it lapses the bystander is served.
        time.sleep(61)
        assert bystander_sum(deploy, bystander, manager) == 42
    assert all(sent > 0 for sent, _ in counts.values()), counts


def bystander_sum(deploy, bystander, manager) -> int:
    with deploy.executor(bystander, manager) as executor:
        return executor.submit(add, 20, 22).result(timeout=60)
