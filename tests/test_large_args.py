"""Arguments above the Executor's threshold: uploaded to the service in chunks, fetched by the task's endpoint.

Real service, real root manager, real accounts, as tests/test_large_results.py. Functions travel by value
(this module is not installed where the endpoints run).
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

import mep
from mep.errors import QuotaExceededError, ServiceUnavailableError
from mep.protocol import decode, encode
from mep.protocol.framing import DEFAULT_MAX_PAYLOAD_BYTES
from mep.protocol.messages import (
    MAX_CHUNK_BYTES,
    ChunkRequest,
    Error,
    LargeArgs,
    Submit,
    SubmitAck,
    TaskRef,
    Upload,
)
from mep.sdk.connection import ServiceSettings
from mep.sdk.large_args import upload
from mep.sdk.large_results import CHUNK_BYTES
from mep.sdk.serialize import client_runtime, serialize_args, serialize_function
from mep.service.store import Store
from mep.service.uploads import Uploads
from tests.harness import (
    DOMAIN_STRIP,
    Deployment,
    _pid_with_title,
    expression_mapping,
    fill,
    service_on_small_tmpfs,
    wait_for,
)
from tests.test_large_results import large_data_template, memory_kib, reset_peak
from tests.test_reliability import state_of

pytestmark = pytest.mark.root

THRESHOLD = 64 * 1024


def digest(*args: Any, **kwargs: Any) -> tuple[int, str, dict]:
    """What the task saw: the length and SHA-256 of its one bytes argument, and its keyword arguments."""
    import hashlib

    return len(args[0]), hashlib.sha256(args[0]).hexdigest(), kwargs


def nap_holding(data: bytes, seconds: float) -> int:
    import time

    time.sleep(seconds)
    return len(data)


def data_of_size(size: int) -> bytes:
    return (hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1))[:size]


def start(deploy: Deployment, account_factory) -> tuple:  # noqa: ANN001
    alice, bob = account_factory("mepalice"), account_factory("mepbob")
    template = deploy.root / "args.yaml.j2"
    template.write_text(large_data_template(threshold=None))
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), template=template)
    return (alice, manager, deploy.identity(f"{alice.pw_name}@example.org"),
            deploy.identity(f"{bob.pw_name}@example.org"))


def settings_of(deploy: Deployment, identity) -> ServiceSettings:  # noqa: ANN001
    return ServiceSettings(deploy.address, deploy.service_key, identity.token)


def uploads_of(deploy: Deployment, identity) -> Path:  # noqa: ANN001
    return deploy.state_dir / "uploads" / identity.id


def exchange(settings: ServiceSettings, header: msgspec.Struct, payloads: list[Any]) -> Any:
    """One request with payload frames, and the service's answer (header only)."""
    socket, watch = settings.connect(zmq.Context.instance())
    try:
        socket.send_multipart(encode(header, payloads))
        assert socket.poll(30_000), "the service did not answer"
        return decode(socket.recv_multipart())[0]
    finally:
        watch.close(socket)
        socket.close(linger=0)


def test_arguments_above_the_threshold_are_uploaded_and_fetched_in_bounded_memory(deploy, account_factory) -> None:
    alice, manager, identity, _ = start(deploy, account_factory)
    service, router = deploy.service.popen.pid, manager.router_pid
    with deploy.executor(identity, manager, upload_args_above=THRESHOLD) as executor:
        small = data_of_size(1024)
        assert executor.submit(digest, small).result(timeout=120) == (1024, hashlib.sha256(small).hexdigest(), {})
        assert not uploads_of(deploy, identity).exists(), "1 KiB travels inline"
        before = {pid: memory_kib(pid, "VmHWM") for pid in (service, router)}
        # 48 MiB: far above the threshold and above the old limit on arguments (the service's inline maximum)
        for size in (3 * THRESHOLD, 48 * CHUNK_BYTES):
            data = data_of_size(size)
            seen = executor.submit(digest, data, key="value").result(timeout=300)
            assert seen == (size, hashlib.sha256(data).hexdigest(), {"key": "value"})
    assert 48 * CHUNK_BYTES > DEFAULT_MAX_PAYLOAD_BYTES
    for pid, name in ((service, "service"), (router, "router")):
        grew = memory_kib(pid, "VmHWM") - before[pid]
        assert grew < 16 * 1024, f"the {name}'s peak memory grew by {grew} KiB relaying 48 MiB of arguments"
    kept = {path.name: path.stat() for path in uploads_of(deploy, identity).iterdir()}
    named = hashlib.sha256(serialize_args((data_of_size(48 * CHUNK_BYTES),), {"key": "value"})).hexdigest()
    assert named in kept and stat.S_IMODE(kept[named].st_mode) == 0o600, kept
    assert stat.S_IMODE(uploads_of(deploy, identity).stat().st_mode) == 0o700
    # The endpoint's copy (a file of the account while it was fetched) is gone once the task has it.
    assert not list((Path(alice.pw_dir) / "mep-results").glob("*.args"))


def test_the_worker_loads_a_large_argument_from_its_file_and_the_endpoint_never_holds_it(
        deploy, account_factory) -> None:
    """The forked worker unpickles the fetched file itself: the endpoint's peak stays a few chunks, and no file is
    left after a task that ran or one cancelled while it ran."""
    alice, manager, identity, _ = start(deploy, account_factory)
    size = 64 * 1024 * 1024
    data = data_of_size(size)  # written, non-zero: every page of it is real
    with deploy.executor(identity, manager, upload_args_above=THRESHOLD) as executor:
        assert executor.submit(digest, b"up").result(timeout=120)[0] == 2  # the endpoint is up
        endpoint = _pid_with_title(f"mep-endpoint {alice.pw_name} ")
        reset_peak(endpoint)
        before = memory_kib(endpoint, "VmHWM")
        assert executor.submit(digest, data).result(timeout=300) == (size, hashlib.sha256(data).hexdigest(), {})
        grew = memory_kib(endpoint, "VmHWM") - before
        assert not list((Path(alice.pw_dir) / "mep-results").glob("*.args"))
        running = executor.submit(nap_holding, data_of_size(3 * THRESHOLD), 600)
        client = mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token)
        wait_for(lambda: state_of(client, running.task_id) == "running", what="the task to start")
        assert list((Path(alice.pw_dir) / "mep-results").glob("*.args")), "the running task's file is there"
        assert running.cancel()
        wait_for(lambda: state_of(client, running.task_id) == "cancelled", what="the cancel to land")
    assert grew < 16 * 1024, f"the endpoint's peak grew by {grew} KiB for a {size // 1024} KiB argument"
    wait_for(lambda: not list((Path(alice.pw_dir) / "mep-results").glob("*.args")),
             what="the cancelled task's arguments file to be removed")


def test_an_upload_is_its_submitters_alone(deploy, account_factory) -> None:
    _, manager, alice, bob = start(deploy, account_factory)
    data = serialize_args((data_of_size(3 * THRESHOLD),), {})
    large, sent = upload(settings_of(deploy, alice), data, 3.0, 60.0)
    assert sent == len(data)
    body = serialize_function(digest)
    task = TaskRef(task_id="0f6e5a5e-0000-4000-8000-000000000001", fn_hash=hashlib.sha256(body).hexdigest(),
                   args_frame=0, fn_frame=1, large_args=large)
    submit = Submit(token=bob.token, request_id=1, endpoint_id=manager.endpoint_id, runtime=client_runtime(),
                    tasks=[task])
    ack = exchange(settings_of(deploy, bob), submit, [b"", body])
    assert isinstance(ack, SubmitAck) and not ack.accepted
    assert ack.rejected[0].code == "large_args_unavailable" and "not a complete upload of yours" in \
        ack.rejected[0].message
    submit.token = alice.token
    ack = exchange(settings_of(deploy, alice), submit, [b"", body])
    assert ack.accepted == [task.task_id]


def test_an_upload_and_its_task_survive_service_restarts(deploy, account_factory) -> None:
    _, manager, identity, _ = start(deploy, account_factory)
    settings = settings_of(deploy, identity)
    data = serialize_args((data_of_size(12 * CHUNK_BYTES),), {})
    named = hashlib.sha256(data).hexdigest()
    for offset in range(0, 5 * CHUNK_BYTES, CHUNK_BYTES):  # part of it, then the service crashes
        ack = exchange(settings, Upload(token=identity.token, request_id=1, sha256=named, size=len(data),
                                        offset=offset), [data[offset:offset + CHUNK_BYTES]])
        assert ack.received == offset + CHUNK_BYTES
    deploy.restart_service()
    large, sent = upload(settings, data, 3.0, 60.0)
    assert large.sha256 == named
    assert sent == len(data) - 4 * CHUNK_BYTES, f"sent {sent} of {len(data)} bytes: the upload did not resume"
    # Accepted while its manager is away, then the service crashes again: the task and its upload are on disk.
    manager.process.stop()
    with deploy.executor(identity, manager, upload_args_above=THRESHOLD) as executor:
        future = executor.submit(digest, data_of_size(12 * CHUNK_BYTES))
        executor.shutdown()  # accepted (the future resolves later: the executor polls the restarted service)
        deploy.restart_service()
        manager.start()
        assert future.result(timeout=300)[:2] == (12 * CHUNK_BYTES, hashlib.sha256(
            data_of_size(12 * CHUNK_BYTES)).hexdigest())


def test_malformed_upload_chunks_are_refused_each_with_its_reason(deploy, account_factory) -> None:
    _, _, identity, _ = start(deploy, account_factory)
    settings = settings_of(deploy, identity)
    data = data_of_size(2 * CHUNK_BYTES)
    right = hashlib.sha256(data).hexdigest()

    def refusal(payloads: list[bytes], **fields: Any) -> str:
        header = Upload(**{"token": identity.token, "request_id": 7, "sha256": right, "size": len(data), **fields})
        answer = exchange(settings, header, payloads)
        assert isinstance(answer, Error) and answer.request_id == 7, answer
        return answer.message

    assert "exactly one payload frame" in refusal([])
    assert "exactly one payload frame" in refusal([b"a", b"b"])
    assert f"1 to {MAX_CHUNK_BYTES} bytes" in refusal([b"x" * (MAX_CHUNK_BYTES + 1)], size=8 * CHUNK_BYTES)
    assert "past the upload's declared size" in refusal([data[:CHUNK_BYTES]], offset=CHUNK_BYTES + 1)
    wrong = "0" * 64
    exchange(settings, Upload(token=identity.token, request_id=1, sha256=wrong, size=len(data)), [data[:CHUNK_BYTES]])
    assert "do not match the SHA-256" in refusal([data[CHUNK_BYTES:]], sha256=wrong, offset=CHUNK_BYTES)
    assert not (uploads_of(deploy, identity) / wrong).exists(), "bytes not matching their name are not kept"
    # An undecodable header (a name that is not a SHA-256) is refused by the decoder, saying where.
    raw = msgspec.msgpack.encode({"type": "UPLOAD", "v": 1, "token": identity.token, "request_id": 8,
                                  "sha256": "../etc", "size": 1})
    socket, watch = settings.connect(zmq.Context.instance())
    try:
        socket.send_multipart([b"MEP1", raw, b"x"])
        assert socket.poll(30_000)
        answer = decode(socket.recv_multipart())[0]
    finally:
        watch.close(socket)
        socket.close(linger=0)
    assert isinstance(answer, Error) and "sha256" in answer.message, answer
    # The service still serves: a whole upload goes through afterwards.
    assert upload(settings, data, 3.0, 60.0)[0].sha256 == right


def test_an_upload_to_a_full_disk_is_refused_with_why_and_keeps_nothing(router_account, account_factory) -> None:
    account = account_factory("mepdiskup")
    with service_on_small_tmpfs("16m") as deploy:
        identity = deploy.identity(f"{account.pw_name}@example.org")
        settings = settings_of(deploy, identity)
        filler = fill(deploy.state_dir)
        data = data_of_size(3 * CHUNK_BYTES)
        with pytest.raises(ServiceUnavailableError, match="the service's disk is full"):
            upload(settings, data, 3.0, 60.0)
        partial = uploads_of(deploy, identity) / (hashlib.sha256(data).hexdigest() + ".partial")
        assert not partial.exists() or partial.stat().st_size == 0, "nothing of a refused chunk is kept"
        filler.unlink()
        assert upload(settings, data, 3.0, 60.0)[1] == len(data), "once there is room, the upload goes through"


def test_only_the_tasks_endpoint_reads_its_upload_while_it_is_unfinished(tmp_path: Path) -> None:
    store = Store(tmp_path / "mep.db")
    uploads = Uploads(store, tmp_path / "uploads", max_bytes_per_identity=10 * CHUNK_BYTES, retention=60)
    owner = "7c4e8e52-0000-4000-8000-000000000001"
    data = b"q" * 1000
    large = LargeArgs(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    with store.transaction():
        ack = uploads.put(owner, Upload(sha256=large.sha256, size=large.size), [data])
        assert ack.received == len(data)
        task_id = "0f6e5a5e-0000-4000-8000-000000000002"
        store.add_task(task_id, "endpoint-a", owner, "f" * 64, b"", "{}", "{}", 0.0, "{}")
        uploads.record(task_id, owner, large)
    answer, frames = uploads.read("endpoint-a", ChunkRequest(request_id=3, task_id=task_id, offset=990, length=50))
    assert (answer.request_id, answer.code, frames) == (3, "", [b"q" * 10])
    answer, frames = uploads.read("endpoint-b", ChunkRequest(request_id=4, task_id=task_id, length=50))
    assert answer.code == "large_args_unavailable" and frames == [], "another endpoint may not read it"
    claim = TaskRef(task_id="x", fn_hash="f", args_frame=0, large_args=large)
    assert uploads.problem(owner, claim) is None
    code, message = uploads.problem("7c4e8e52-0000-4000-8000-000000000009", claim)
    assert code == "large_args_unavailable" and "not a complete upload of yours" in message
    with pytest.raises(QuotaExceededError, match="limit of"):
        uploads.put(owner, Upload(sha256="1" * 64, size=20 * CHUNK_BYTES), [b"z"])
    # Needed by an unfinished task: kept however old; once the task is finished and the upload old, removed.
    path = tmp_path / "uploads" / owner / large.sha256
    old = time.time() - 120
    os.utime(path, (old, old))
    assert uploads.sweep() == 0 and path.exists()
    with store.transaction():
        store.fail_task("endpoint-a", task_id, "cancelled", "test")
    answer, _ = uploads.read("endpoint-a", ChunkRequest(request_id=5, task_id=task_id, length=50))
    assert answer.code == "large_args_unavailable", "a finished task's arguments are not read again"
    assert uploads.sweep() == 1 and not path.exists()
