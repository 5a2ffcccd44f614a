"""Bad input and a full disk stop no process: each case from issues 8 and 10, against real processes.

Each test sends the bad thing (a deeply nested SUBMIT, a config the JSON
codec can't hold, oversized query lists, a poison row in the database, a key
stolen from an endpoint's memory, a full disk under the service), checks the
specific error that comes back, that the process is still the same live
process, and that an ordinary task still completes.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

import mep
from mep.protocol import encode
from mep.protocol.assertions import AssertionSigner, Claims, config_digest
from mep.protocol.curve import read_private_text
from mep.protocol.messages import (
    SIGNATURE,
    Error,
    Heartbeat,
    IdentityResource,
    RouterStopping,
    Runtime,
    Spawned,
    SpawnerStatus,
    SpawnerStatusRequest,
    SpawnRefused,
    SpawnRequest,
    TaskList,
    TaskQuery,
)
from mep.sdk.serialize import client_runtime
from mep.service.store import dumps_canonical
from tests.harness import (
    DOMAIN_STRIP,
    Deployment,
    Manager,
    expression_mapping,
    fill,
    service_on_small_tmpfs,
    wait_for,
)
from tests.peers import RawPeer, deep, endpoint_records, endpoint_secret_key, raw_map, start_spawner, uint64

pytestmark = pytest.mark.root

RUNTIME = msgspec.to_builtins(Runtime(python="3.11.2", dill="0.4.1", mep="0.1.0", platform="linux"))


def add(a: int, b: int) -> int:
    return a + b


def slow_add(a: int, b: int) -> int:
    import time

    time.sleep(3)
    return a + b


@pytest.fixture
def researcher(deploy, account_factory):  # noqa: ANN001, ANN201
    """(manager, identity) for one real account, with its endpoint already running."""
    account = account_factory("meprobust")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(add, 1, 1).result(timeout=60) == 2
    return manager, identity


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def submit_header(token: str, endpoint_id: str, config: object, request_id: int = 7) -> bytes:
    return raw_map({"type": "SUBMIT", "token": token, "request_id": request_id, "endpoint_id": endpoint_id,
                    "runtime": RUNTIME, "user_endpoint_config": config, "tasks": []})


def assert_still_serving(deploy: Deployment, manager: Manager, identity, service_pid: int) -> None:  # noqa: ANN001
    assert deploy.service.popen.poll() is None and deploy.service.popen.pid == service_pid, deploy.logs()
    assert manager.process.popen.poll() is None, manager.log()
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(add, 2, 3).result(timeout=60) == 5


@pytest.mark.parametrize(("config", "code", "words"), [
    ({"a": deep(3000)}, "bad_request", "RecursionError"),
    ({"a": deep(40)}, "config_invalid", "user_endpoint_config.a[0][0]"),
    ({"idle_timeout": float("inf")}, "config_invalid", "user_endpoint_config.idle_timeout is inf"),
    ({"idle_timeout": float("nan")}, "config_invalid", "user_endpoint_config.idle_timeout is nan"),
    ({"engine": {"type": b"process"}}, "config_invalid", "user_endpoint_config.engine.type is a bytes"),
    ({"x": [msgspec.msgpack.Ext(5, b"boo")]}, "config_invalid", "user_endpoint_config.x[0] is a Ext"),
    ({"workers": uint64(2**64 - 1)}, "config_invalid", "outside the 64-bit integer range"),
    (deep(5000), "config_invalid", "Expected `object`, got `array`"),
])
def test_a_submit_config_the_json_codec_cant_hold_is_refused_naming_where(
        deploy, researcher, context, config: object, code: str, words: str) -> None:
    manager, identity = researcher
    service_pid = deploy.service.popen.pid
    for token in (identity.token, ""):  # with a valid token, and with none at all
        peer = RawPeer(context, deploy.address, deploy.service_key)
        peer.send([SIGNATURE, submit_header(token, manager.endpoint_id, config)])
        refusal = peer.reply(Error)
        peer.close()
        assert refusal.code == code and words in refusal.message, refusal
    assert_still_serving(deploy, manager, identity, service_pid)


def test_the_sdk_refuses_an_unencodable_config_at_submit_and_its_thread_lives_on(deploy, researcher) -> None:
    manager, identity = researcher
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 2**64}) as executor:
        with pytest.raises(mep.ConfigInvalidError, match=r"user_endpoint_config\.workers is 18446744073709551616"):
            executor.submit(add, 1, 2)
        executor.user_endpoint_config = {"idle_timeout": float("inf")}
        with pytest.raises(mep.ConfigInvalidError, match=r"idle_timeout is inf"):
            executor.submit(add, 1, 2)
        executor.user_endpoint_config = {}
        assert executor.submit(add, 1, 2).result(timeout=60) == 3  # the same executor, its I/O thread unharmed


def test_query_lists_are_bounded_and_long_legitimate_ones_answered(deploy, researcher, context) -> None:
    manager, identity = researcher
    service_pid = deploy.service.popen.pid
    peer = RawPeer(context, deploy.address, deploy.service_key)
    for field, count in (("states", 300_000), ("task_ids", 300_000)):
        values = ["waiting"] * count if field == "states" else [str(uuid.uuid4()) for _ in range(count)]
        peer.send([SIGNATURE, raw_map({"type": "TASK_QUERY", "token": identity.token, "request_id": 3,
                                       field: values})])
        refusal = peer.reply(Error)
        assert refusal.code == "bad_request" and "length <=" in refusal.message, refusal
    for kind in ("FETCH", "CANCEL"):
        peer.send([SIGNATURE, raw_map({"type": kind, "token": identity.token, "request_id": 4,
                                       "task_ids": ["x"] * 100_001})])
        assert "length <= 100000" in peer.reply(Error).message
    # As many ids as a query may carry (more than one SQL statement may bind) are answered.
    ids = [str(uuid.uuid4()) for _ in range(99_999)]
    peer.send(encode(TaskQuery(token=identity.token, request_id=5, task_ids=ids, states=["succeeded"] * 16)))
    assert peer.reply(TaskList, timeout=60).tasks == []
    peer.close()
    assert_still_serving(deploy, manager, identity, service_pid)


def test_a_poison_row_already_in_the_database_fails_its_task_and_dispatch_goes_on(deploy, researcher) -> None:
    manager, identity = researcher
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(add, 4, 4).result(timeout=60) == 8
    service_pid = deploy.service.popen.pid
    poison_id = str(uuid.uuid4())
    with sqlite3.connect(deploy.state_dir / "mep.db", isolation_level=None) as db:  # what an older mep wrote
        fn_hash, args = db.execute("SELECT hash, body FROM functions LIMIT 1").fetchone()
        db.execute("INSERT INTO tasks (id, endpoint_id, submitter_id, fn_hash, args_bytes, config, runtime, state,"
                   " created_at) VALUES (?,?,?,?,?,?,?,'waiting',?)",
                   (poison_id, manager.endpoint_id, identity.id, fn_hash, len(args), '{"idle_timeout":Infinity}',
                    dumps_canonical(RUNTIME), time.time()))
        db.execute("INSERT INTO task_args (task_id, args) VALUES (?,?)", (poison_id, args))
    deploy.restart_service()  # the row is there when the service starts (nothing but the service adds rows)
    with deploy.executor(identity, manager) as executor:
        (poisoned,) = executor.attach([poison_id])
        with pytest.raises(mep.ConfigInvalidError, match="can't be read back"):
            poisoned.result(timeout=60)
    deploy.restart_service()  # and it stays harmless across a restart
    assert_still_serving(deploy, manager, identity, deploy.service.popen.pid)
    assert service_pid != deploy.service.popen.pid


def test_a_stolen_endpoint_key_cant_stop_the_router(deploy, researcher, context) -> None:
    """A task can read its own endpoint's CURVE secret (same account); with it, it sends the router poison."""
    manager, identity = researcher
    service_pid, router_pid, spawner_pid = deploy.service.popen.pid, manager.router_pid, manager.spawner_pid
    (record,) = endpoint_records(manager.run_dir)
    secret = endpoint_secret_key(record["endpoint_pid"], record["public_key"])
    socket_path = manager.run_dir / "router" / "endpoints.sock"
    router_key = Path(f"{socket_path}.pub").read_text().strip()
    peer = RawPeer(context, f"ipc://{socket_path}", router_key, secret_key=secret)
    poison = [
        [SIGNATURE, raw_map({"type": "RESULTS", "results": deep(4000)})],
        [SIGNATURE, raw_map({"type": "SPAWN", "user_endpoint_config": {"a": deep(4000)}})],
        [SIGNATURE, raw_map({"type": "RESULTS", "results": [{"task_id": "t", "status": "success",
                                                             "payload_frame": uint64(2**64 - 1)}]})],
        [SIGNATURE, raw_map({"type": "RESULTS", "results": [{"task_id": "t", "status": "success",
                                                             "payload_frame": 7}]})],
        [SIGNATURE], [b"garbage", b"\xc1"], [SIGNATURE, b"\xdd\xff\xff\xff\xff"],
    ]
    for frames in poison:
        assert peer.send(frames)
    wait_for(lambda: manager.log().count("refused a message from endpoint") >= len(poison),
             what="the router to refuse every poisoned message")
    peer.send(encode(Heartbeat()))  # a well-formed message from the stolen key is still just a message
    peer.close()
    time.sleep(1)
    assert (manager.router_pid, manager.spawner_pid) == (router_pid, spawner_pid)
    assert_still_serving(deploy, manager, identity, service_pid)


def test_an_oserror_while_spawning_refuses_that_request_and_the_spawner_goes_on(deploy, account_factory) -> None:
    account = account_factory("meposerr")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    state = deploy.root / "spawner"
    state.mkdir()
    spawner, channel = start_spawner(manager.config_path, state)
    channel.sock.setblocking(True)
    channel.sock.settimeout(60)

    def answer(kind: type) -> object:
        while not isinstance(message := channel.receive(), kind):
            assert message is not None, f"the spawner exited:\n{(state / 'spawner.log').read_text()}"
        return message

    channel.send(SpawnerStatusRequest())
    answer(SpawnerStatus)
    (state / "registry").rename(state / "registry-gone")  # the registry can't be written: an OSError
    identity = IdentityResource(id=str(uuid.uuid4()), username=f"{account.pw_name}@example.org")
    # signed as the service signs it: the spawner checks who submitted before it maps or spawns anything
    signer = AssertionSigner(read_private_text(deploy.state_dir / "signing.key"))
    now = time.time()
    assertion = signer.sign(Claims(submitter_id=identity.id, identities=[identity], endpoint_id=manager.endpoint_id,
                                   config_digest=config_digest({}), task_ids=[str(uuid.uuid4())], issued_at=now,
                                   expires_at=now + 600, nonce=uuid.uuid4().hex))
    channel.send(SpawnRequest(request_id=1, submitter_id=identity.id, identities=[identity], runtime=client_runtime(),
                              identity_assertion=assertion))
    refused = answer((SpawnRefused, Spawned))
    assert isinstance(refused, SpawnRefused) and refused.request_id == 1, refused
    assert refused.code == "spawn_failed" and "could not record the new endpoint" in refused.message, refused
    channel.send(SpawnerStatusRequest())  # the spawner is still there, answering
    assert answer(SpawnerStatus).process.role == "spawner"
    assert spawner.poll() is None
    (state / "registry-gone").rename(state / "registry")
    channel.send(RouterStopping())  # so it stops the endpoint it started before the registry failed
    channel.sock.close()
    assert spawner.wait(timeout=90) == 0, (state / "spawner.log").read_text()


# --- a full disk under the service (issue 10, item 4) ----------------------------------------------------


def test_a_full_disk_refuses_submissions_with_a_specific_error_and_recovers(router_account, account_factory) -> None:
    account = account_factory("mepdisk")
    with service_on_small_tmpfs("16m") as deploy:
        manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
        identity = deploy.identity(f"{account.pw_name}@example.org")
        service_pid = deploy.service.popen.pid
        with deploy.executor(identity, manager) as executor:
            assert executor.submit(add, 1, 1).result(timeout=60) == 2
            accepted = executor.submit(slow_add, 20, 22)  # acknowledged before the disk fills
        filler = fill(deploy.state_dir)
        # no ``with``: leaving it would wait for acknowledgements; the 1 MiB arguments inline, in the SUBMIT
        # (uploaded ones are refused the same way: tests/test_large_args.py)
        executor = deploy.executor(identity, manager, upload_args_above=2 << 20)
        refused = [executor.submit(add, n, b"x" * (1 << 20)) for n in range(3)]
        for future in refused:
            with pytest.raises(mep.ServiceUnavailableError, match="the service's disk is full"):
                future.result(timeout=60)
        executor.shutdown(wait=False)
        deploy.restart_service()  # it starts, and keeps running, on the full disk
        time.sleep(3)
        assert deploy.service.popen.poll() is None, deploy.service.log()
        service_pid = deploy.service.popen.pid
        assert "disk is full" in deploy.service.log() or "can't be written" in deploy.service.log()
        filler.unlink()
        assert accepted.result(timeout=90) == 42, "an acknowledged task survives the full disk"
        assert deploy.service.popen.pid == service_pid and deploy.service.popen.poll() is None
        with deploy.executor(identity, manager) as executor:
            assert executor.submit(add, 2, 3).result(timeout=60) == 5
        assert "Traceback" not in deploy.service.log()
