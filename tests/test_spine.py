"""End to end, as root: real service, real root manager, real accounts, real privilege drops.

Every function here travels by value: this module is not installed where the
endpoints run.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

import mep
from tests.harness import DOMAIN_STRIP, PYTHON, children_of, expression_mapping, task_log_of, wait_for

pytestmark = pytest.mark.root


def probe() -> dict:
    """Runs on the endpoint: everything a privilege drop must have got right."""
    import os

    status = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            status[key] = value.split()
    mask = os.umask(0)
    os.umask(mask)
    return {"resuid": os.getresuid(), "resgid": os.getresgid(), "groups": sorted(os.getgroups()),
            "status": {k: status[k] for k in ("Uid", "Gid", "Groups", "CapEff", "NoNewPrivs")},
            "env": dict(os.environ), "cwd": os.getcwd(), "umask": mask, "pid": os.getpid(), "ppid": os.getppid()}


def add(a: int, b: int, *, scale: int = 1) -> int:
    return (a + b) * scale


def divide(a: float, b: float) -> float:
    return a / b


def raise_unrebuildable_error() -> None:
    class TwoArgumentError(Exception):
        """Unpickling calls cls(*self.args) with one argument, which fails on the client."""

        def __init__(self, message: str, detail: str) -> None:
            super().__init__(message)
            self.detail = detail

    raise TwoArgumentError("this exception cannot be rebuilt by the client", "detail")


def descriptors_of(pid: int) -> dict[int, tuple[str, int]]:
    """fd -> (target, owner uid of the target) for a live process, read as root."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(fd)] = (os.readlink(f"/proc/{pid}/fd/{fd}"), os.stat(f"/proc/{pid}/fd/{fd}").st_uid)
        except OSError:
            continue
    return found


def endpoint_pids(manager) -> list[int]:  # noqa: ANN001
    router = _router_pid(manager)
    return [pid for pid in children_of(manager.spawner_pid) if pid != router]


def _router_pid(manager) -> int:  # noqa: ANN001
    for pid in children_of(manager.spawner_pid):
        if os.stat(f"/proc/{pid}").st_uid == pwd.getpwnam("mep").pw_uid:
            return pid
    raise AssertionError("no router process under the spawner")


def test_two_researchers_each_run_as_their_own_account(deploy, account_factory) -> None:
    alice, bob = account_factory("mepalice"), account_factory("mepbob")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identities = {account.pw_name: deploy.identity(f"{account.pw_name}@example.org") for account in (alice, bob)}

    def run_as(name: str) -> list[dict]:
        with deploy.executor(identities[name], manager, user_endpoint_config={"workers": 2}) as executor:
            futures = [executor.submit(probe) for _ in range(8)]
            assert list(executor.map(add, [1, 2, 3], [10, 20, 30])) == [11, 22, 33]
            assert executor.submit(add, 1, 2, scale=3).result(timeout=60) == 9
            with pytest.raises(ZeroDivisionError):
                executor.submit(divide, 1, 0).result(timeout=60)
            with pytest.raises(mep.RemoteError) as remote:
                executor.submit(raise_unrebuildable_error).result(timeout=60)
            assert remote.value.remote_type.endswith("TwoArgumentError")
            assert "cannot be rebuilt" in str(remote.value)
            assert ", in raise_unrebuildable_error" in remote.value.remote_traceback
        return [future.result(timeout=60) for future in futures]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        reports = dict(zip(identities, pool.map(run_as, identities), strict=True))

    for account in (alice, bob):
        expected_groups = sorted(os.getgrouplist(account.pw_name, account.pw_gid))
        for report in reports[account.pw_name]:
            uid, gid = account.pw_uid, account.pw_gid
            assert tuple(report["resuid"]) == (uid, uid, uid)
            assert tuple(report["resgid"]) == (gid, gid, gid)
            assert report["groups"] == expected_groups and 0 not in report["groups"]
            assert report["status"]["Uid"] == [str(uid)] * 4
            assert report["status"]["Gid"] == [str(gid)] * 4
            assert report["status"]["CapEff"] == ["0000000000000000"]
            assert report["status"]["NoNewPrivs"] == ["1"]
            assert report["env"]["HOME"] == account.pw_dir
            assert report["env"]["USER"] == account.pw_name
            assert not any(key.startswith(("LD_", "PYTHON")) for key in report["env"])
            assert report["cwd"] == account.pw_dir
            assert report["umask"] == 0o077

    endpoints = endpoint_pids(manager)
    assert len(endpoints) == 2, "one endpoint per account"
    for pid in endpoints:
        owner = os.stat(f"/proc/{pid}").st_uid
        assert owner in (alice.pw_uid, bob.pw_uid)
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            title = handle.read().decode().replace("\0", " ").strip()
        assert title.startswith(f"mep-endpoint {pwd.getpwuid(owner).pw_name} ")
        with open(f"/proc/{pid}/status") as handle:
            assert f"Uid:\t{owner}\t{owner}\t{owner}\t{owner}" in handle.read()
        # Anonymous inodes (eventfd, epoll) always report uid 0. Anything else root-owned (the boot pipe
        # once read, the spawner's socketpair, a root file) would be a leak.
        root_owned = {fd: target for fd, (target, uid) in descriptors_of(pid).items()
                      if uid == 0 and not target.startswith(("anon_inode:", "/dev/null"))}
        assert root_owned == {}, f"endpoint {pid} holds root-owned descriptors {root_owned}"
        log_dir = Path(pwd.getpwuid(owner).pw_dir) / ".mep" / "endpoints"
        (endpoint_dir,) = [d for d in log_dir.iterdir() if title.endswith(d.name)]
        log = endpoint_dir / "endpoint.log"
        assert (log.stat().st_mode & 0o777, log.stat().st_uid) == (0o600, owner)
        assert endpoint_dir.stat().st_mode & 0o777 == 0o700


def test_same_config_reuses_an_endpoint_and_another_config_starts_one(deploy, account_factory) -> None:
    account = account_factory("mepreuse")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    for _ in range(2):
        with deploy.executor(identity, manager, user_endpoint_config={"workers": 1}) as executor:
            assert executor.submit(add, 1, 1).result(timeout=60) == 2
    assert len(endpoint_pids(manager)) == 1
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 2}) as executor:
        assert executor.submit(add, 2, 2).result(timeout=60) == 4
    assert len(endpoint_pids(manager)) == 2


REFUSING_MAPPING = [
    *expression_mapping(DOMAIN_STRIP),
    *expression_mapping({"source": "{email}", "match": r"(.*)@broken\.org", "output": "{0}"}),
]


@pytest.mark.parametrize(("username", "options", "error", "words"), [
    ("carol@elsewhere.org", ["--email", "carol@elsewhere.org"], mep.UnmappedIdentityError,
     "no local account is mapped to carol@elsewhere.org"),
    ("dave@elsewhere.org", [], mep.MappingError, ""),
    ("root@example.org", [], mep.AccountRefusedError, "root"),
    ("no-such-account-x@example.org", [], mep.AccountRefusedError, "no-such-account-x"),
])
def test_refused_identities_get_a_specific_error_and_nothing_is_spawned(
        deploy, username: str, options: list[str], error: type, words: str) -> None:
    manager = deploy.start_manager(REFUSING_MAPPING)
    identity = deploy.identity(username, *options)
    before = children_of(manager.spawner_pid)
    with deploy.executor(identity, manager) as executor:
        future = executor.submit(add, 1, 2)
    with pytest.raises(error) as refused:
        future.result(timeout=60)
    assert words in str(refused.value)
    assert "Traceback" not in str(refused.value)
    assert children_of(manager.spawner_pid) == before, "a refused identity must not spawn anything"
    assert "refused" in manager.log()


def test_schema_violation_names_the_property(deploy, account_factory) -> None:
    account = account_factory("mepschema")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    for config, words in (({"workers": 0}, "workers"), ({"colour": "blue"}, "colour")):
        with deploy.executor(identity, manager, user_endpoint_config=config) as executor:
            with pytest.raises(mep.ConfigInvalidError) as refused:  # at submit (the SDK checks the schema) or spawn
                executor.submit(add, 1, 2).result(timeout=60)
        assert words in str(refused.value)


def task_records(manager) -> list[dict]:
    return [json.loads(line) for line in task_log_of(manager.config_path).read_text().splitlines()]


def test_template_error_names_file_and_line(deploy, account_factory) -> None:
    account = account_factory("meptmpl")
    template = deploy.root / "broken.yaml.j2"
    template.write_text("engine:\n  type: process\n  workers: {{ cores }}\n")
    schema = deploy.root / "broken.schema.json"
    schema.write_text(json.dumps({"type": "object"}))
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), template=template, schema=schema)
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:
        future = executor.submit(add, 1, 2)
    with pytest.raises(mep.TemplateError) as refused:
        future.result(timeout=60)
    assert "broken.yaml.j2" in str(refused.value) and "line 3" in str(refused.value)
    # Rendered and refused by the user's own endpoint (never as root); the outcome is in the router's task log.
    wait_for(lambda: any(future.task_id in record.get("task_ids", ()) and record.get("code") == "template_error"
                         for record in task_records(manager)), what="the refusal's task record")
    assert "cores" in str(refused.value)


def test_endpoint_start_failure_names_the_step(deploy, account_factory) -> None:
    account = account_factory("mepnohome", create_home=False)
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:
        future = executor.submit(add, 1, 2)
    with pytest.raises(mep.SpawnError) as refused:
        future.result(timeout=60)
    assert "open_log" in str(refused.value)


def test_revoked_token_is_refused_at_once(deploy, account_factory) -> None:
    account = account_factory("meprevoke")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(add, 1, 2).result(timeout=60) == 3
        deploy.admin("identity", "revoke", identity.id)
        with pytest.raises(mep.AuthenticationError, match="revoked"):
            executor.submit(add, 1, 2).result(timeout=60)


def test_wrong_pinned_service_key_is_refused(deploy, account_factory) -> None:
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity("whoever@example.org")
    wrong_key = zmq.curve_keypair()[0].decode()
    executor = mep.Executor(manager.endpoint_id, service=deploy.address, token=identity.token, service_key=wrong_key)
    future = executor.submit(add, 1, 2)
    with pytest.raises(mep.AuthenticationError, match="service key"):
        future.result(timeout=60)
    executor.shutdown()


def test_unknown_endpoint_is_refused(deploy) -> None:
    identity = deploy.identity("whoever@example.org")
    executor = mep.Executor("00000000-0000-4000-8000-000000000000", service=deploy.address, token=identity.token,
                            service_key=deploy.service_key)
    with pytest.raises(mep.UnknownEndpointError, match="no endpoint"):
        executor.submit(add, 1, 2).result(timeout=60)
    executor.shutdown()


def test_local_process_without_endpoint_keys_is_refused(deploy, account_factory) -> None:
    account = account_factory("mepintruder")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    socket_path = manager.run_dir / "router" / "endpoints.sock"
    router_key = Path(str(socket_path) + ".pub").read_text().strip()
    intruder = f"""
import zmq, time
from mep.protocol import encode
from mep.protocol.messages import Ready
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.curve_serverkey = {router_key!r}.encode()
s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
s.connect("ipc://{socket_path}")
s.send_multipart(encode(Ready(endpoint_id="forged", pid=1)))
time.sleep(1)
"""
    subprocess.run(["runuser", "-u", account.pw_name, "--", PYTHON, "-c", intruder], check=True, cwd="/")
    wait_for(lambda: "unknown CURVE key" in manager.log(), what="the router to log the refused handshake")
    assert "forged" not in manager.log()


def test_brokers_never_load_dill_and_refuse_unpickling(deploy, account_factory) -> None:
    account = account_factory("mepstatus")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(add, 2, 3).result(timeout=60) == 5

    def status() -> dict:
        result = subprocess.run(
            [PYTHON, "-m", "mep", "status", "--service", deploy.address, "--service-key", deploy.service_key,
             "--token", identity.token, "--endpoint", manager.endpoint_id],
            capture_output=True, text=True, check=True)
        return json.loads(result.stdout)

    report = wait_for(lambda: (s := status()) and len(s["processes"]) == 3 and s, what="manager status")
    roles = {process["role"]: process for process in report["processes"]}
    assert set(roles) == {"service", "router", "spawner"}
    assert roles["spawner"]["uid"] == 0
    assert roles["router"]["uid"] == pwd.getpwnam("mep").pw_uid
    for process in roles.values():
        assert process["dill_loaded"] is False, process
        assert process["unpickling_refused"] is True, process


def test_audit_hook_refuses_unpickling_in_a_brokering_process() -> None:
    script = ("import pickle, os\n"
              "from mep.protocol.guard import forbid_unpickling, UnpicklingForbidden\n"
              "forbid_unpickling()\n"
              "try:\n    pickle.loads(pickle.dumps(os.path.join))\nexcept UnpicklingForbidden as e:\n"
              "    print('refused:', e)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("refused: unpickling is forbidden")


def worker_descriptors() -> dict[int, str]:
    """Runs on the endpoint: this worker's descriptors that point at something root owns."""
    import os

    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            owner = os.stat(f"/proc/self/fd/{fd}").st_uid
        except OSError:
            continue
        if owner == 0 and not target.startswith(("anon_inode:", "/dev/null", "/proc/")):
            found[int(fd)] = target
    return found


def test_worker_holds_no_root_owned_descriptor(deploy, account_factory) -> None:
    account = account_factory("mepfds")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(worker_descriptors).result(timeout=60) == {}


def test_linked_identity_maps_through_its_set(deploy, account_factory) -> None:
    account = account_factory("meplinked")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    campus = deploy.identity(f"{account.pw_name}@example.org")
    orcid = deploy.identity("0000-0002-1825-0097@orcid.org", "--link", campus.id)
    with deploy.executor(orcid, manager) as executor:
        report = executor.submit(probe).result(timeout=60)
    assert tuple(report["resuid"]) == (account.pw_uid,) * 3


def test_ambiguous_identity_set_is_refused(deploy, account_factory) -> None:
    first, second = account_factory("mepamb"), account_factory("mepamb")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    one = deploy.identity(f"{first.pw_name}@example.org")
    other = deploy.identity(f"{second.pw_name}@example.org", "--link", one.id)
    before = children_of(manager.spawner_pid)
    with deploy.executor(other, manager) as executor:
        future = executor.submit(add, 1, 1)
    with pytest.raises(mep.MappingError, match="ambiguous"):
        future.result(timeout=60)
    assert children_of(manager.spawner_pid) == before


def test_idle_endpoint_exits_and_new_work_starts_a_fresh_one(deploy, account_factory) -> None:
    account = account_factory("mepidle")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    config = {"workers": 1, "idle_timeout": 10}
    with deploy.executor(identity, manager, user_endpoint_config=config) as executor:
        assert executor.submit(add, 1, 1).result(timeout=60) == 2
    (first,) = endpoint_pids(manager)
    wait_for(lambda: first not in endpoint_pids(manager), timeout=60, what="the idle endpoint to exit")
    assert "idle" in manager.log()
    with deploy.executor(identity, manager, user_endpoint_config=config) as executor:
        assert executor.submit(add, 2, 2).result(timeout=60) == 4
    (second,) = endpoint_pids(manager)
    assert second != first
