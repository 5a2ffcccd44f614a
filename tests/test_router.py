"""The router with real ZeroMQ sockets and real CURVE keys, its peers played by the test.

A forged result needs an endpoint that holds valid keys but lies, which no
real endpoint does; so the test plays the service, the spawner and two
endpoints around a real Router.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from mep.config.manager import ManagerConfig
from mep.manager.router import Router
from mep.manager.spawner_link import SpawnerLink, channel_pair
from mep.protocol import decode, encode
from mep.protocol.curve import ZapHandler, generate_keypair, make_curve_client, make_curve_server
from mep.protocol.messages import (
    Credit,
    Dispatch,
    DispatchAck,
    IdentityResource,
    Ready,
    Register,
    Registered,
    Result,
    Results,
    Runtime,
    Spawned,
    SpawnRequest,
    Started,
    TaskGroup,
    TaskRef,
    Tasks,
)

ENDPOINT = str(uuid.uuid4())
RUNTIME = Runtime(python="3.11.2", dill="0.4.1", mep="0.1.0", platform="linux")


class Peers:
    """The service, spawner and endpoints around one real router."""

    def __init__(self, directory: Path) -> None:
        self.context = zmq.Context()
        service_public, service_secret = generate_keypair()
        manager_public, manager_secret = generate_keypair()
        self.zap = ZapHandler(self.context, {"svc": lambda key: "manager" if key == manager_public else None})
        self.service = self.context.socket(zmq.ROUTER)
        self.service.linger = 0
        make_curve_server(self.service, service_secret, "svc")
        port = self.service.bind_to_random_port("tcp://127.0.0.1")
        config = ManagerConfig(endpoint_id=ENDPOINT, service_address=f"tcp://127.0.0.1:{port}",
                               service_public_key=service_public, manager_secret_key_file=directory / "unused",
                               identity_mapping=directory / "unused", task_log=directory / "tasks.jsonl")
        self.task_log = config.task_log
        router_end, spawner_end = channel_pair()
        self.spawner = SpawnerLink(spawner_end)
        self.router_public, router_secret = generate_keypair()
        self.router = Router(config, manager_secret, f"ipc://{directory}/endpoints.sock", router_secret, router_end)
        self.address = f"ipc://{directory}/endpoints.sock"
        self.thread = threading.Thread(target=self.router.serve, daemon=True)
        self.thread.start()
        self.service_peer = b""
        self.sockets: list[zmq.Socket] = [self.service]

    def from_service(self, kind: type, timeout: float = 10.0) -> tuple[Any, list[bytes]]:
        deadline = time.monotonic() + timeout
        while self.service.poll(max(0.0, deadline - time.monotonic()) * 1000):
            frames = self.service.recv_multipart()
            self.service_peer = frames[0]
            header, payloads = decode(frames[1:])
            if isinstance(header, kind):
                return header, payloads
        raise AssertionError(f"the router sent the service no {kind.__name__}")

    def to_service(self, header: Any, payloads: list[bytes] = ()) -> None:
        self.service.send_multipart([self.service_peer, *encode(header, list(payloads))])

    def spawn_request(self) -> SpawnRequest:
        self.spawner.sock.settimeout(10)
        while True:
            message = self.spawner.receive()
            if isinstance(message, SpawnRequest):
                return message

    def task_records(self) -> list[dict[str, Any]]:
        """The router's task log (complete lines)."""
        text = self.task_log.read_text() if self.task_log.exists() else ""
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def routed(self, count: int) -> list[str]:
        """The ids of the first ``count`` tasks the router's task log records as routed, once it does."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            routed = [task_id for record in self.task_records() if record.get("outcome") == "routed"
                      for task_id in record["task_ids"]]
            if len(routed) >= count:
                return routed
            time.sleep(0.02)
        raise AssertionError(f"the router's task log records fewer than {count} routed task(s)")

    def spawned(self, request: SpawnRequest, name: str) -> zmq.Socket:
        """Answer ``request`` with an endpoint ``name`` (of account ``name``) that connects and says READY.

        It connects once the router knows its key, as a real endpoint does: a handshake the router's ZAP
        check refuses (the key not yet known) may take the READY queued behind it along.
        """
        public, secret = generate_keypair()
        self.spawner.send(Spawned(request_id=request.request_id, endpoint_id=name, pid=1, account=name,
                                  public_key=public))
        deadline = time.monotonic() + 10
        while public not in self.router.endpoint_keys:
            assert time.monotonic() < deadline, "the router never took the SPAWNED"
            time.sleep(0.01)
        socket = self.context.socket(zmq.DEALER)
        socket.linger = 0
        make_curve_client(socket, self.router_public, secret)
        socket.connect(self.address)
        self.sockets.append(socket)
        socket.send_multipart(encode(Ready(endpoint_id=name, pid=1)))
        return socket

    def close(self) -> None:
        self.router.stop()
        self.thread.join(timeout=10)
        for socket in self.sockets:
            socket.close(linger=0)
        self.context.term()  # the ZAP thread closes its own socket when the context terminates


@pytest.fixture
def peers() -> Iterator[Peers]:
    directory = Path(tempfile.mkdtemp(prefix="mep-router-", dir="/var/tmp"))
    running = Peers(directory)
    yield running
    running.close()
    shutil.rmtree(directory, ignore_errors=True)


def _group(submitter: str, task_id: str) -> TaskGroup:
    return TaskGroup(submitter_id=submitter, identities=[IdentityResource(id=submitter, username=f"{submitter}@x")],
                     user_endpoint_config={}, runtime=RUNTIME, task_ids=[task_id])


def test_result_accepted_only_from_the_endpoint_the_task_went_to(peers: Peers, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="mep.router")
    peers.from_service(Register)
    peers.to_service(Registered(heartbeat_interval=5.0))
    task_a, task_b = str(uuid.uuid4()), str(uuid.uuid4())
    peers.to_service(Dispatch(tasks=[TaskRef(task_id=task_a, fn_hash="f", args_frame=0, fn_frame=1),
                                     TaskRef(task_id=task_b, fn_hash="f", args_frame=2)],
                              groups=[_group("alice", task_a), _group("bob", task_b)]),
                     [b"args-a", b"function", b"args-b"])
    endpoints = {}
    for _ in range(2):
        request = peers.spawn_request()
        endpoints[request.submitter_id] = peers.spawned(request, request.submitter_id)
    assert sorted(peers.routed(2)) == sorted([task_a, task_b])
    for name, expected in (("alice", task_a), ("bob", task_b)):
        assert endpoints[name].poll(10_000), f"{name}'s endpoint got no tasks"
        header, _ = decode(endpoints[name].recv_multipart())
        assert isinstance(header, Tasks) and [t.task_id for t in header.tasks] == [expected]

    forged = Results(results=[Result(task_id=task_a, status="success", payload_frame=0)])
    endpoints["bob"].send_multipart(encode(forged, [b"forged"]))
    deadline = time.monotonic() + 10
    while "was not sent to it; refused" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"sent a result for task {task_a}, which was not sent to it; refused" in caplog.text
    endpoints["alice"].send_multipart(encode(forged, [b"genuine"]))

    header, payloads = peers.from_service(Results)
    assert [r.task_id for r in header.results] == [task_a]
    assert payloads == [b"genuine"]


def test_credit_bounds_what_the_service_may_send_and_dropped_bodies_come_again(peers: Peers) -> None:
    """CREDIT counts afresh from REGISTERED; a body no held task needs is forgotten, and a task that names it
    without carrying it is handed back (DISPATCH_ACK returned) rather than held without its function."""
    peers.from_service(Register)
    peers.to_service(Registered(heartbeat_interval=30.0))
    credit, _ = peers.from_service(Credit)
    config = peers.router.config
    assert credit.tasks == int(config.submitter_share * config.max_queued_tasks)
    assert credit.payload_bytes == int(config.submitter_share * config.max_queued_bytes) and not credit.forget
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    peers.to_service(Dispatch(tasks=[TaskRef(task_id=first, fn_hash="f", args_frame=0, fn_frame=1)],
                              groups=[_group("alice", first)]), [b"args", b"function"])
    request = peers.spawn_request()
    endpoint = peers.spawned(request, "alice")
    endpoint.send_multipart(encode(Credit(tasks=4)))
    assert endpoint.poll(10_000)
    assert [t.task_id for t in decode(endpoint.recv_multipart())[0].tasks] == [first]
    credit, _ = peers.from_service(Credit)  # the task went on: its body is dropped, its room given back
    while not credit.forget:
        credit, _ = peers.from_service(Credit)
    assert credit.forget == ["f"]
    peers.to_service(Dispatch(tasks=[TaskRef(task_id=second, fn_hash="f", args_frame=0)],
                              groups=[_group("alice", second)]), [b"args"])
    ack, _ = peers.from_service(DispatchAck)
    while first in ack.accepted:
        ack, _ = peers.from_service(DispatchAck)
    assert ack.returned == [second] and ack.accepted == []


def test_window_refilled_in_batches_and_starts_carried_with_results_are_relayed(peers: Peers) -> None:
    """The router refills an endpoint's window once half of it is free (not per freed slot), and the tasks an
    endpoint reports started inside its RESULTS reach the service as STARTED, ahead of their results."""
    peers.from_service(Register)
    peers.to_service(Registered(heartbeat_interval=30.0))
    task_ids = [str(uuid.uuid4()) for _ in range(8)]
    peers.to_service(Dispatch(tasks=[TaskRef(task_id=task_id, fn_hash="f", args_frame=n, fn_frame=8 if n == 0 else -1)
                                     for n, task_id in enumerate(task_ids)],
                              groups=[TaskGroup(submitter_id="alice", user_endpoint_config={}, runtime=RUNTIME,
                                                task_ids=task_ids,
                                                identities=[IdentityResource(id="alice", username="alice@x")])]),
                     [b"args"] * 8 + [b"function"])
    endpoint = peers.spawned(peers.spawn_request(), "alice")
    endpoint.send_multipart(encode(Credit(tasks=4)))
    sent: list[str] = []
    while len(sent) < 4:
        assert endpoint.poll(10_000), "the endpoint's window was not filled"
        header, _ = decode(endpoint.recv_multipart())
        if isinstance(header, Tasks):
            sent += [task.task_id for task in header.tasks]
    assert sent == task_ids[:4]

    def finish(task_id: str) -> None:
        endpoint.send_multipart(encode(Results(results=[Result(task_id=task_id, status="success")],
                                               started=[task_id])))
        started, _ = peers.from_service(Started)
        assert started.task_ids == [task_id]
        results, _ = peers.from_service(Results)
        assert [result.task_id for result in results.results] == [task_id]

    finish(sent[0])  # one slot of four free: not yet worth a message
    finish(sent[1])  # half the window free: both slots filled in one message
    assert endpoint.poll(10_000), "the window was not refilled"
    header, _ = decode(endpoint.recv_multipart())
    assert isinstance(header, Tasks) and [task.task_id for task in header.tasks] == task_ids[4:6]
