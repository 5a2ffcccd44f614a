"""The audit logs: root's (each decision) and the router's task log (each task), and that nothing runs unrecorded."""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import mep
from mep.errors import ConfigurationError
from mep.manager.task_audit import REFUSAL
from mep.root.audit import AuditLog
from mep.protocol import decode, encode
from mep.protocol.messages import Credit, Dispatch, Register, Registered, Results, TaskRef, Tasks
from tests.harness import (
    DOMAIN_STRIP,
    ROUTER_USER,
    audit_log_of,
    children_of,
    expression_mapping,
    task_log_of,
    wait_for,
)
from tests.test_router import Peers, _group

pytestmark = pytest.mark.root

ROOT_ONLY = frozenset({0})


@pytest.fixture
def log_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="mep-audit-", dir="/var/tmp"))
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the file ---------------------------------------------------------------------------------


def test_records_are_json_lines_with_every_control_character_escaped(log_dir: Path) -> None:
    path = log_dir / "logs" / "audit.jsonl"
    audit = AuditLog(path, trusted_owner_uids=ROOT_ONLY, endpoint_id="ep-1")
    evil = "alice\n{\"event\": \"forged\"}\r\x00\x1b[2J\u2028\u0085jürgen"
    audit.write_records([{"event": "decision", "identity": {"username": evil}, "outcome": "refused"}])
    audit.write_records([{"event": "task", "task_id": "t1"}, {"event": "task", "task_id": "t2"}], sync=True)
    raw = path.read_bytes()
    assert raw.count(b"\n") == 3 and all(32 <= byte < 127 for byte in raw.replace(b"\n", b""))
    first, second, third = records(path)
    assert first["identity"]["username"] == evil, "escaped, not lost"
    assert first["manager"] == {"endpoint_id": "ep-1", "pid": os.getpid(), "uid": 0}
    assert first["time"].endswith("Z") and (second["task_id"], third["task_id"]) == ("t1", "t2")
    status = path.stat()
    assert (stat.S_IMODE(status.st_mode), status.st_uid) == (0o600, 0)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750


@pytest.mark.parametrize("plant", ["symlink", "other owner", "group writable", "fifo"])
def test_a_planted_or_unsafe_file_is_refused(log_dir: Path, plant: str) -> None:
    path = log_dir / "audit.jsonl"
    if plant == "symlink":
        path.symlink_to(log_dir / "elsewhere")
    elif plant == "fifo":
        os.mkfifo(path, 0o600)
    else:
        path.write_text("")
        os.chmod(path, 0o620 if plant == "group writable" else 0o600)
        if plant == "other owner":
            os.chown(path, 65534, 65534)
    with pytest.raises(ConfigurationError, match="audit log"):
        AuditLog(path, trusted_owner_uids=ROOT_ONLY, endpoint_id="ep")


def test_a_directory_others_can_write_is_refused(log_dir: Path) -> None:
    shared = log_dir / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    with pytest.raises(ConfigurationError, match="writable by group or others"):
        AuditLog(shared / "audit.jsonl", trusted_owner_uids=ROOT_ONLY, endpoint_id="ep")


@pytest.fixture
def small_filesystem(log_dir: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs that a test can fill up."""
    mount_point = log_dir / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def exhaust(filesystem: Path, log: Path) -> Path:
    """Leave ``log`` no byte to grow into: pad it to a page boundary (tmpfs allocates pages), then fill the rest."""
    page = os.statvfs(filesystem).f_bsize
    remaining = -log.stat().st_size % page
    if remaining:
        prefix, suffix = b'{"event":"test_padding","x":"', b'"}\n'
        remaining += page if remaining < len(prefix + suffix) else 0
        with open(log, "ab") as handle:
            handle.write(prefix + b"x" * (remaining - len(prefix + suffix)) + suffix)
    return fill(filesystem)


def fill(filesystem: Path) -> Path:
    filler = filesystem / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 512)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_failed_write_breaks_the_log_until_a_reopen_succeeds(small_filesystem: Path) -> None:
    log = small_filesystem / "audit.jsonl"
    audit = AuditLog(log, trusted_owner_uids=ROOT_ONLY, endpoint_id="ep")
    audit.write_records([{"event": "manager_started"}])
    filler = exhaust(small_filesystem, log)
    with pytest.raises(OSError):
        audit.write_records([{"event": "decision", "outcome": "allowed"}])
    assert "No space left on device" in audit.failure
    with pytest.raises(OSError):
        audit.write_records([{"event": "decision", "outcome": "allowed"}])  # still broken: nothing is written meanwhile
    filler.unlink()
    audit.reopen()
    assert audit.failure == ""
    audit.write_records([{"event": "audit_restored"}])
    assert [r["event"] for r in records(log)] == ["manager_started", "test_padding", "audit_restored"]


# --- the router writes its records before it sends ------------------------------------------


def test_no_task_reaches_its_endpoint_before_its_record_is_on_disk(small_filesystem: Path) -> None:
    peers = Peers(small_filesystem)  # the router's task log on a filesystem this test fills
    try:
        peers.from_service(Register)
        peers.to_service(Registered(heartbeat_interval=1.0))
        first, second, third = (str(uuid.uuid4()) for _ in range(3))

        def dispatch(task_id: str) -> None:  # with its function body each time: the router drops unneeded ones
            peers.to_service(Dispatch(tasks=[TaskRef(task_id=task_id, fn_hash="f", args_frame=0, fn_frame=1)],
                                      groups=[_group("alice", task_id)]), [b"args", b"function"])

        dispatch(first)
        endpoint = peers.spawned(peers.spawn_request(), "alice")
        endpoint.send_multipart(encode(Credit(tasks=4)))  # room for every task: only the record holds one back
        assert endpoint.poll(10_000)
        assert [t.task_id for t in decode(endpoint.recv_multipart())[0].tasks] == [first]
        routed = [r for r in peers.task_records() if r.get("outcome") == "routed"]  # read once it arrived
        assert [(r["task_ids"], r["endpoint_id"], r["account"], r["submitter_id"]) for r in routed] == [
            ([first], "alice", "alice", "alice")]
        assert routed[0]["manager"]["uid"] == os.geteuid(), "the router's own word, as its own account"

        filler = exhaust(small_filesystem, peers.task_log)
        dispatch(second)
        header, _ = peers.from_service(Results)
        assert [(r.task_id, r.status, r.message) for r in header.results] == [(second, "failed", REFUSAL)]
        while endpoint.poll(500):
            assert not isinstance(decode(endpoint.recv_multipart())[0], Tasks), "an unrecorded task never goes"

        filler.unlink()  # room again: the next heartbeat reopens the log, and routing resumes
        wait_for(lambda: not peers.router.audit.refusal, what="routing to resume")
        dispatch(third)
        assert endpoint.poll(10_000)
        assert [t.task_id for t in decode(endpoint.recv_multipart())[0].tasks] == [third]
        events = [r["event"] for r in peers.task_records()]
        assert "task_log_restored" in events
        assert all(second not in r.get("task_ids", ()) for r in peers.task_records() if r.get("outcome") == "routed")
    finally:
        peers.close()


# --- through submissions ----------------------------------------------------------------------


def add(a: int, b: int) -> int:
    return a + b


REFUSING = [*expression_mapping(DOMAIN_STRIP),
            *expression_mapping({"source": "{email}", "match": r"(.*)@broken\.org", "output": "{0}"})]


def test_every_decision_and_task_is_audited(deploy, account_factory) -> None:
    account = account_factory("mepaudit")
    manager = deploy.start_manager(REFUSING)
    allowed = deploy.identity(f"{account.pw_name}@example.org")
    unmapped = deploy.identity("carol@elsewhere.org", "--email", "carol@elsewhere.org")
    broken = deploy.identity("dave@elsewhere.org")
    root = deploy.identity("root@example.org")
    with deploy.executor(allowed, manager) as executor:
        futures = [executor.submit(add, 1, n) for n in range(3)]
        assert [future.result(timeout=60) for future in futures] == [1, 2, 3]
    refused = {}
    for identity in (unmapped, broken, root):
        with deploy.executor(identity, manager) as executor:
            future = executor.submit(add, 1, 1)
            with pytest.raises(mep.MepError):
                future.result(timeout=60)
            refused[identity.username] = future.task_id
    manager.process.stop()
    log = audit_log_of(manager.config_path)
    lines = records(log)
    text = log.read_text()
    for identity in (allowed, unmapped, broken, root):
        assert identity.token not in text, "never a token"
    assert "secret" not in text.lower()
    assert all(r["manager"]["uid"] == 0 and r["manager"]["endpoint_id"] == manager.endpoint_id for r in lines)

    decisions = {r["identity"]["username"]: r for r in lines if r["event"] == "decision"}
    granted = decisions[allowed.username]
    assert granted["outcome"] == "allowed" and granted["account"] == account.pw_name
    assert granted["uid"] == account.pw_uid and granted["identity"]["id"] == allowed.id
    assert granted["mapping"]["rule"] == "document 0, mapping 0"
    (started,) = [r for r in lines if r["event"] == "endpoint_started"]
    assert started["endpoint_id"] == granted["endpoint_id"] and started["account"] == account.pw_name
    for username, code in (("carol@elsewhere.org", "unmapped"), ("dave@elsewhere.org", "mapping_error"),
                           ("root@example.org", "account_refused")):
        decision = decisions[username]
        assert (decision["outcome"], decision["code"]) == ("refused", code), decision
        assert decision["reason"] and decision["message"]
    assert decisions["dave@elsewhere.org"]["reason"].endswith(
        "document 1, mapping 0: identity " + repr(broken.id) + ": identity property 'email' is missing or not"
        " text (got None)")
    assert decisions["root@example.org"]["account"] == "root" and decisions["root@example.org"]["uid"] is None
    assert decisions["carol@elsewhere.org"]["mapping"] is None

    assert not any(r["event"] == "task" for r in lines), "tasks are the router's to record"

    task_log = task_log_of(manager.config_path)
    task_lines = records(task_log)
    for identity in (allowed, unmapped, broken, root):
        assert identity.token not in task_log.read_text(), "never a token"
    router_uid = pwd.getpwnam(ROUTER_USER).pw_uid
    assert all(r["manager"]["uid"] == router_uid for r in task_lines), "written as the router's account"
    assert (task_log.stat().st_uid, stat.S_IMODE(task_log.stat().st_mode)) == (router_uid, 0o600)
    tasks: dict[str, list[dict]] = {}
    for record in task_lines:
        if record["event"] == "task":  # each record lists the batch of tasks it is about
            for task_id in record["task_ids"]:
                tasks.setdefault(task_id, []).append(record)
    for future in futures:
        accepted, routed, done = tasks[future.task_id]
        assert (accepted["outcome"], accepted["submitter_id"]) == ("accepted", allowed.id) and accepted["fn_hash"]
        assert (routed["outcome"], routed["endpoint_id"], routed["account"], routed["submitter_id"]) == (
            "routed", started["endpoint_id"], account.pw_name, allowed.id)
        assert (done["outcome"], done["account"]) == ("success", account.pw_name)
    for username, task_id in refused.items():
        outcomes = [r["outcome"] for r in tasks[task_id]]
        assert outcomes == ["accepted", "failed"], (username, outcomes)


def test_nothing_is_routed_while_the_task_log_cannot_be_written(deploy, account_factory, small_filesystem) -> None:
    alice, bob = account_factory("mepaudfull"), account_factory("mepaudfull")
    log = small_filesystem / "router" / "tasks.jsonl"  # its directory made by root for the router's account
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings={"task_log": str(log)})
    alice_identity = deploy.identity(f"{alice.pw_name}@example.org")
    bob_identity = deploy.identity(f"{bob.pw_name}@example.org")
    with deploy.executor(alice_identity, manager) as executor:
        first = executor.submit(add, 1, 1)
        assert first.result(timeout=60) == 2
        wait_for(lambda: any(first.task_id in r.get("task_ids", ()) and r["outcome"] == "success"
                             for r in records(log)), what="the first task's records")
        filler = exhaust(small_filesystem, log)
        with pytest.raises(mep.MepError, match="its task log can't be written"):
            executor.submit(add, 2, 2).result(timeout=60)
        before = children_of(manager.spawner_pid)
        with deploy.executor(bob_identity, manager) as other:
            with pytest.raises(mep.MepError, match="its task log can't be written"):
                other.submit(add, 3, 3).result(timeout=60)
        assert children_of(manager.spawner_pid) == before, "no endpoint starts for a task that can't be recorded"
        assert "the task log can't be written" in manager.log()
        filler.unlink()  # the admin makes room; the router's next heartbeat reopens the log
        wait_for(lambda: "routing resumes" in manager.log(), what="routing to resume")
        assert executor.submit(add, 4, 4).result(timeout=60) == 8
    wait_for(lambda: records(log)[-1]["event"] != "task_log_restored", what="the records of the work after it")
    assert "task_log_restored" in [r["event"] for r in records(log)]


def test_no_endpoint_starts_while_the_audit_log_cannot_be_written(deploy, account_factory, small_filesystem) -> None:
    alice, bob = account_factory("mepaudfull"), account_factory("mepaudfull")
    log = small_filesystem / "audit.jsonl"
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings={"audit_log": str(log)})
    alice_identity = deploy.identity(f"{alice.pw_name}@example.org")
    bob_identity = deploy.identity(f"{bob.pw_name}@example.org")
    with deploy.executor(alice_identity, manager) as executor:
        assert executor.submit(add, 1, 1).result(timeout=60) == 2
        wait_for(lambda: any(r["event"] == "endpoint_started" for r in records(log)), what="alice's endpoint")
        filler = exhaust(small_filesystem, log)
        before = children_of(manager.spawner_pid)
        with deploy.executor(bob_identity, manager) as other:
            with pytest.raises(mep.MepError, match="its audit log can't be written"):
                other.submit(add, 3, 3).result(timeout=60)
            assert children_of(manager.spawner_pid) == before, "no endpoint starts undecided"
            # alice's endpoint was allowed, and its start recorded: her tasks go on (in the router's task log)
            assert executor.submit(add, 2, 2).result(timeout=60) == 4
            filler.unlink()  # the admin makes room; the next status round reopens the log
            wait_for(lambda: "spawns resume" in manager.log(), what="spawns to resume")
            assert other.submit(add, 4, 4).result(timeout=60) == 8
    events = [r["event"] for r in records(log)]
    assert "audit_restored" in events and events[-1] != "audit_restored", "the decision after the restore is there"


def test_sighup_reopens_the_log_after_rotation(deploy, account_factory) -> None:
    account = account_factory("mepaudrot")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    log, task_log = audit_log_of(manager.config_path), task_log_of(manager.config_path)
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(add, 1, 1).result(timeout=60) == 2
        rotated, rotated_tasks = log.with_suffix(".jsonl.1"), task_log.with_suffix(".jsonl.1")
        log.rename(rotated)
        task_log.rename(rotated_tasks)  # the router notices by itself, at its next heartbeat
        os.kill(manager.spawner_pid, signal.SIGHUP)
        wait_for(log.exists, what="a new audit log after SIGHUP")
        wait_for(task_log.exists, what="a new task log after its rotation")
        future = executor.submit(add, 2, 2)
        assert future.result(timeout=60) == 4
    wait_for(lambda: any(future.task_id in r.get("task_ids", ()) and r["outcome"] == "success"
                         for r in records(task_log)), what="the new task's records in the new file")
    assert not any(future.task_id in r.get("task_ids", ()) for r in records(rotated_tasks))
    # the reload's outcome comes from the mapping helper, so its record may follow the task's
    wait_for(lambda: any(r["event"] == "mapping_reload" and r["trigger"] == "SIGHUP" for r in records(log)),
             what="the SIGHUP's reload record in the new audit log")
