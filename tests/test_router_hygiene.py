"""The router is a fresh, unprivileged process holding nothing of root's; the endpoint hides its memory from tasks.

Read from /proc of the real processes: ids, session, descriptors and
environment of the router; the owner of the endpoint's /proc entries, a
task's attempt to read its endpoint's memory, and whether the endpoint's
secret key is anywhere in the memory of the worker running the task.
"""

from __future__ import annotations

import json
import os
import pwd
import re
from pathlib import Path

import pytest
import zmq

from mep.protocol.curve import read_secret_key
from tests.harness import DOMAIN_STRIP, ROUTER_USER, audit_log_of, children_of, expression_mapping, task_log_of

pytestmark = pytest.mark.root

# What ZeroMQ opens for itself once the router runs: its sockets, event fds and epoll sets.
ZMQ_DESCRIPTOR = re.compile(r"socket:\[\d+\]|anon_inode:\[?(eventfd|eventpoll)\]?")


def stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: [0] state, [1] ppid, [2] pgrp, [3] session."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def status_field(pid: int, name: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.split()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def descriptors(pid: int) -> dict[int, str]:
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def test_the_router_is_a_fresh_unprivileged_process_holding_only_its_own_descriptors(deploy, account_factory):
    account = account_factory("mephygiene")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:  # a routed task: the router is in full swing
        assert executor.submit(abs, -3).result(timeout=60) == 3
    router, spawner = manager.router_pid, manager.spawner_pid
    assert int(stat_fields(router)[1]) == spawner
    router_uid = pwd.getpwnam(ROUTER_USER).pw_uid
    assert status_field(router, "Uid") == [str(router_uid)] * 4
    assert status_field(router, "Gid") == [str(pwd.getpwnam(ROUTER_USER).pw_gid)] * 4
    assert status_field(router, "NoNewPrivs") == ["1"] and int(status_field(router, "CapBnd")[0], 16) == 0
    session = int(stat_fields(router)[3])
    assert session == router != int(stat_fields(spawner)[3]), "a session of its own, so no controlling terminal"
    assert stat_fields(router)[4] == "0", "no controlling terminal (tty_nr)"

    held = descriptors(router)
    assert [held[fd] for fd in (0, 1, 2)] == ["/dev/null"] * 3
    assert held[3].startswith("socket:"), "its channel to the spawner"
    assert held[4] == str(manager.run_dir / "manager.lock")
    assert held[5].startswith("pipe:"), "its log, relayed by the spawner"
    others = {fd: target for fd, target in held.items() if fd > 5}
    task_log = str(task_log_of(manager.config_path))
    assert list(others.values()).count(task_log) == 1, "its own task log, which it writes itself"
    wake = [target for target in others.values() if target.startswith("pipe:")]
    assert len(wake) == 2 and len(set(wake)) == 1 and wake[0] != held[5], "its log writer's wake-up pipe, both ends"
    others = {fd: target for fd, target in others.items() if target != task_log and not target.startswith("pipe:")}
    assert others and all(ZMQ_DESCRIPTOR.fullmatch(target) for target in others.values()), others
    audit_log = str(audit_log_of(manager.config_path))
    assert audit_log not in held.values() and audit_log in descriptors(spawner).values(), "root alone holds it"

    # exec'd, not forked: a fork shares its parent's auxiliary vector, an exec gets its own (new stack addresses)
    assert Path("/proc/sys/kernel/randomize_va_space").read_text().strip() != "0", "the check needs ASLR"
    assert Path(f"/proc/{router}/auxv").read_bytes() != Path(f"/proc/{spawner}/auxv").read_bytes()
    secret = read_secret_key(manager.config_path.parent / "manager.key")
    cmdline = Path(f"/proc/{router}/cmdline").read_bytes().decode(errors="replace")
    assert secret not in cmdline, "secrets go on stdin only"
    assert "registered with the service" in manager.log(), "the router's log reaches the manager's"


def endpoint_memory_probe(endpoint_pid: int) -> dict:
    """Runs as a task: try to read the endpoint's memory, as a hostile task would."""
    import os

    try:
        with open(f"/proc/{endpoint_pid}/mem", "rb"):
            outcome = "opened"
    except PermissionError:
        outcome = "PermissionError"
    return {"mem": outcome, "worker": os.getpid(), "uid": os.getuid()}


def memory_of(pid: int) -> bytes:
    """Every readable mapping of ``pid`` (read as root, as an admin debugging it can)."""
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        for line in maps:
            fields = line.split()
            if not fields[1].startswith("r") or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                memory.seek(start)
                chunks.append(memory.read(end - start))
            except OSError:
                continue
    return b"".join(chunks)


# A CPython str of 40 Z85 characters (a CURVE key) is stored contiguously and NUL-terminated.
_Z85_KEY = re.compile(rb"(?<![0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#])([0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40})\x00")


def secret_key_in(memory: bytes, public_key: str) -> bytes:
    """The Z85 secret key in ``memory`` whose public half is ``public_key``, or b""."""
    for candidate in set(_Z85_KEY.findall(memory)):
        try:
            if zmq.curve_public(candidate) == public_key.encode():
                return candidate
        except (ValueError, zmq.ZMQError):
            continue
    return b""


def test_a_task_cannot_read_its_endpoints_memory_and_its_worker_never_held_the_key(deploy, account_factory):
    account = account_factory("mepdumpable")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 1}) as executor:
        assert executor.submit(abs, -1).result(timeout=60) == 1
        (endpoint,) = [pid for pid in children_of(manager.spawner_pid) if pid != manager.router_pid]
        assert status_field(endpoint, "Uid")[0] == str(account.pw_uid)
        assert os.stat(f"/proc/{endpoint}/mem").st_uid == 0, "non-dumpable: the kernel hands its /proc files to root"
        report = executor.submit(endpoint_memory_probe, endpoint).result(timeout=60)
        assert report["uid"] == account.pw_uid and report["mem"] == "PermissionError"
        (record,) = json.loads((manager.run_dir / "endpoints.json").read_text())
        secret = secret_key_in(memory_of(endpoint), record["public_key"])
        assert secret, "root still can read the endpoint (and so find its key): debugging stays possible for root"
        worker = report["worker"]
        assert worker != endpoint and os.stat(f"/proc/{worker}/mem").st_uid == account.pw_uid, "workers are dumpable"
        assert secret not in memory_of(worker), "the worker's image never held the endpoint's key"
