"""The attack suite: each test is an attack on a real deployment or a real root spawner, and fails if it succeeds.

Real accounts, real processes, real uids. Attacks that other modules already
stage are called from here (their module, not a copy), so this one file runs
every attack docs/security.md names. At the end pytest prints a table of
attacks and outcomes (``tests/conftest.py``, ``pytest_terminal_summary``).
Each test records what refused it with ``record_property("observed", ...)``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import mep
from mep.errors import ErrorCode
from mep.mapping import external
from mep.mapping.engine import MappingRules
from mep.root.identity import IdentityMapper, MappingContext
from mep.protocol.messages import EndpointExited, Spawned, SpawnRefused
from mep.sdk.client import Client
from tests import test_assertions as assertion_attacks
from tests import test_render as render_tests
from tests import test_spine as spine_attacks
from tests.harness import DOMAIN_STRIP, audit_log_of, expression_mapping, task_log_of, wait_for
from tests.spawner_peer import SpawnerPeer, identity_of, spawner_peer

pytestmark = pytest.mark.root

PYTHON3 = "/usr/bin/python3"


def run_while(gate: str) -> str:
    """Busy until the test removes ``gate`` (a fixed nap could end before the test has revoked anything)."""
    import os
    import time

    while os.path.exists(gate):
        time.sleep(0.05)
    return "done"


def whoami() -> int:
    import os

    return os.getuid()


def audit(manager) -> list[dict]:  # noqa: ANN001 - a harness Manager
    return [json.loads(line) for line in audit_log_of(manager.config_path).read_text().splitlines()]


def routed(manager, task_id: str) -> list[dict]:  # noqa: ANN001 - a harness Manager
    """The router's task-log records of ``task_id`` being sent to an endpoint."""
    lines = task_log_of(manager.config_path).read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == "task"
            and record.get("outcome") == "routed" and task_id in record.get("task_ids", [])]


@pytest.fixture
def peer(router_account: str) -> Iterator[SpawnerPeer]:
    with spawner_peer(expression_mapping(DOMAIN_STRIP), router_user=router_account) as running:
        yield running


# --- a compromised router (or a stolen manager key) against the root spawner and the endpoints ---------------


@pytest.mark.attack("forged spawn request (router asks for an identity that never submitted)",
                    "signed identity assertion checked by the spawner before mapping")
def test_forged_spawn_request(peer: SpawnerPeer, account_factory, record_property) -> None:
    assertion_attacks.test_forged_spawn_request_for_an_identity_that_never_submitted_is_refused_and_audited(
        peer, account_factory)
    record_property("observed", f"{ErrorCode.ASSERTION_MISSING}, {ErrorCode.ASSERTION_INVALID}; nothing started")


@pytest.mark.attack("replayed assertion (a genuine spawn request sent again)", "nonce cache in the spawner")
def test_replayed_assertion(peer: SpawnerPeer, account_factory, record_property) -> None:
    account = account_factory("mepatkreplay")
    submitter = identity_of(f"{account.pw_name}@example.org")
    genuine = peer.signer.sign(peer.claims(submitter))
    first = peer.request(submitter, genuine)
    assert not isinstance(first, SpawnRefused), first
    replayed = peer.request(submitter, genuine)
    assert isinstance(replayed, SpawnRefused) and replayed.code == ErrorCode.ASSERTION_REPLAYED, replayed
    assert len(peer.endpoints()) == 1, "the replay started nothing"
    record_property("observed", replayed.code)


@pytest.mark.attack("expired assertion", "expiry checked by the spawner")
def test_expired_assertion(peer: SpawnerPeer, account_factory, record_property) -> None:
    account = account_factory("mepatkexpired")
    submitter = identity_of(f"{account.pw_name}@example.org")
    answer = peer.request(submitter, peer.signer.sign(peer.claims(submitter, lifetime=-1.0)))
    assertion_attacks._refused(peer, answer, ErrorCode.ASSERTION_EXPIRED)
    record_property("observed", f"{answer.code}; nothing started")


@pytest.mark.attack("task routed to another identity's endpoint", "the endpoint checks each task's assertion")
def test_task_routed_to_another_identitys_endpoint(router_account: str, account_factory, record_property) -> None:
    assertion_attacks.test_the_endpoint_refuses_a_task_of_another_identity(router_account, account_factory)
    record_property("observed", f"{ErrorCode.ASSERTION_MISMATCH} / {ErrorCode.ASSERTION_MISSING}; own task ran")


# --- policy changes --------------------------------------------------------------------------------------------


@pytest.mark.attack("revoked identity keeps using its busy endpoint",
                    "one policy reload: RemapGroups to the router, the endpoint stopped (SIGHUP)")
def test_revoked_identity_with_a_busy_endpoint(deploy, account_factory, record_property) -> None:
    account = account_factory("mepatkrevoke")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    gate = deploy.root / "busy"
    gate.touch()
    os.chmod(deploy.root, 0o755)  # the task, as the account, watches the gate
    with deploy.executor(identity, manager) as executor:
        busy = executor.submit(run_while, str(gate))
        (old_endpoint,) = {r["endpoint_id"] for r in wait_for(lambda: routed(manager, busy.task_id),
                                                               what="the long task to reach its endpoint")}
        # The admin revokes: this identity's domain no longer maps to anyone; then SIGHUP.
        other = {"source": "{username}", "match": r"(.*)@other\.example\.net", "output": "{0}"}
        mapping = manager.config_path.parent / "identity_mapping.json"
        replacement = mapping.with_suffix(".new")
        replacement.write_text(json.dumps(expression_mapping(other)))
        replacement.rename(mapping)
        os.kill(manager.spawner_pid, signal.SIGHUP)
        wait_for(lambda: "reloaded (SIGHUP)" in manager.log(), what="the reload")

        refused = executor.submit(whoami)
        with pytest.raises(mep.UnmappedIdentityError) as raised:
            refused.result(timeout=60)
        assert not busy.done(), "the busy task was still running when its identity was revoked"
        gate.unlink()
        assert busy.result(timeout=60) == "done", "the task already running finishes (nothing is lost)"
    assert routed(manager, refused.task_id) == [], "no new task was sent to the old endpoint"
    stopped = wait_for(lambda: [r for r in audit(manager) if r["event"] == "endpoint_stopped"], what="the stop")
    assert [r["endpoint_id"] for r in stopped] == [old_endpoint] and "no document maps" in stopped[0]["reason"]
    wait_for(lambda: any(r["event"] == "endpoint_exited" and r["endpoint_id"] == old_endpoint
                         for r in audit(manager)), what="the old endpoint to exit")
    record_property("observed", f"next task: {type(raised.value).__name__}; endpoint stopped after its task")


# --- the identity-mapping program --------------------------------------------------------------------------------


@pytest.fixture
def program_dirs(account_factory) -> Iterator[tuple[Path, Path, pwd.struct_passwd]]:
    """A root-only directory for the real program, and one an attacker account owns, holding the admin's link."""
    attacker = account_factory("mepatklink")
    trusted = Path(tempfile.mkdtemp(prefix="mep-attack-prog-", dir="/var/tmp"))
    untrusted = Path(tempfile.mkdtemp(prefix="mep-attack-link-", dir="/var/tmp"))
    os.chmod(trusted, 0o755)
    os.chown(untrusted, attacker.pw_uid, attacker.pw_gid)
    try:
        yield trusted, untrusted, attacker
    finally:
        shutil.rmtree(trusted, ignore_errors=True)
        shutil.rmtree(untrusted, ignore_errors=True)


def _mapper_program(path: Path, account: str, *, owner: pwd.struct_passwd | None = None,
                    marker: Path | None = None) -> None:
    """A mapping program answering ``account`` for every identity (and leaving ``marker`` if it ran)."""
    path.write_text(f"#!{PYTHON3}\n" + textwrap.dedent(f"""\
        import json, sys
        {f"open({str(marker)!r}, 'w').write('ran')" if marker else ""}
        request = json.load(sys.stdin)
        print(json.dumps({{"result": [{{"id": i["id"], "output": {account!r}}} for i in request["identities"]]}}))
        """))
    path.chmod(0o755)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


@pytest.mark.attack("mapping-program link swapped between check and exec",
                    "the program is opened, its descriptor checked, the descriptor executed")
def test_mapping_program_link_swap(program_dirs, monkeypatch: pytest.MonkeyPatch, record_property) -> None:
    trusted, untrusted, attacker = program_dirs
    _mapper_program(trusted / "mapper", "alice")
    marker = untrusted / "evil-ran"
    _mapper_program(untrusted / "evil", "root", owner=attacker, marker=marker)  # the attacker's own program
    link = untrusted / "mapper"  # the admin's command names a link in a directory the attacker can write
    link.symlink_to(trusted / "mapper")
    mapper = MappingRules.from_documents(  # in this process: the interleaving needs the monkeypatch
        [{"DATA_TYPE": "external_identity_mapping#1.0.0", "command": [str(link)]}],
        context=MappingContext(endpoint_id=str(uuid.uuid4())))
    real_run = external._run_bounded

    def swap_then_run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the interleaving the race needs
        link.unlink()
        link.symlink_to(untrusted / "evil")  # checked already: the target now is the attacker's program
        return real_run(*args, **kwargs)

    monkeypatch.setattr(external, "_run_bounded", swap_then_run)
    decision = mapper.map([{"id": str(uuid.uuid4()), "username": "alice@example.org", "status": "used"}])
    assert decision.account == "alice", "the program that was checked answered"
    assert not marker.exists(), "the attacker's program never ran"
    record_property("observed", "the checked program ran; the swapped-in one did not")


@pytest.mark.attack("mapping program acts as root", "identity_mapping_user: it runs unprivileged, no groups")
def test_mapping_program_runs_as_the_identity_mapping_user(program_dirs, record_property) -> None:
    trusted, _, _ = program_dirs
    program = trusted / "whoami"
    program.write_text(f"#!{PYTHON3}\n" + textwrap.dedent("""\
        import json, os, sys
        request = json.load(sys.stdin)
        who = f"{os.getuid()}-{os.geteuid()}-{os.getgid()}-{sorted(os.getgroups())}"
        print(json.dumps({"result": [{"id": i["id"], "output": who} for i in request["identities"]]}))
        """))
    program.chmod(0o755)
    document = {"DATA_TYPE": "external_identity_mapping#1.0.0", "command": [str(program)]}
    mapper = IdentityMapper(json.dumps([document]).encode(), "<memory>",
                            MappingContext(endpoint_id=str(uuid.uuid4()), run_as="nobody"))
    nobody = pwd.getpwnam("nobody")
    seen = mapper.map([{"id": str(uuid.uuid4()), "username": "x@example.org", "status": "used"}]).account
    assert seen == f"{nobody.pw_uid}-{nobody.pw_uid}-{nobody.pw_gid}-[]", seen
    record_property("observed", f"ran as uid {nobody.pw_uid} (nobody), no supplementary groups")


# --- researchers against each other and against the brokers ---------------------------------------------------


@pytest.mark.attack("another identity's task ids (get_result, cancel, attach)", "results are kept per submitter")
def test_another_identitys_task_ids(deploy, account_factory, record_property) -> None:
    alice, mallory = account_factory("mepatkowner"), account_factory("mepatkthief")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    owner, thief = deploy.identity(f"{alice.pw_name}@example.org"), deploy.identity(f"{mallory.pw_name}@example.org")
    with deploy.executor(owner, manager) as executor:
        victim = executor.submit(whoami)
        assert victim.result(timeout=60) == alice.pw_uid
    client = Client(service=deploy.address, service_key=deploy.service_key, token=thief.token)
    with pytest.raises(mep.MepError, match="knows no task"):
        client.get_result(victim.task_id)
    assert client.cancel([victim.task_id]).unknown == [victim.task_id]
    with deploy.executor(thief, manager) as executor:
        (attached,) = executor.attach([victim.task_id])
        with pytest.raises(mep.MepError, match="knows no task"):
            attached.result(timeout=60)
    record_property("observed", "unknown task (get_result, cancel, attach)")


@pytest.mark.attack("keyless local connection to the router's endpoint socket", "CURVE with a ZAP key list")
def test_keyless_local_connection(deploy, account_factory, record_property) -> None:
    spine_attacks.test_local_process_without_endpoint_keys_is_refused(deploy, account_factory)
    record_property("observed", "handshake refused (unknown CURVE key)")


@pytest.mark.attack("symlink under the researcher's ~/.mep (endpoint log path)",
                    "the log is opened by the account after the drop: a link reaches only what it may write")
def test_symlink_under_the_users_mep_directory(deploy, account_factory, record_property) -> None:
    account = account_factory("mepatksymlink")
    os.symlink("/root", os.path.join(account.pw_dir, ".mep"))  # planted by the researcher before submitting
    os.lchown(os.path.join(account.pw_dir, ".mep"), account.pw_uid, account.pw_gid)
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:
        with pytest.raises(mep.SpawnError) as refused:
            executor.submit(whoami).result(timeout=60)
    assert "open_log" in str(refused.value)
    assert not os.path.exists("/root/endpoints"), "nothing was created through the link"
    record_property("observed", f"{type(refused.value).__name__} at the step open_log; /root untouched")


def _killed_endpoints_log_tail(peer: SpawnerPeer, account: pwd.struct_passwd, swap_log_for: str = "") -> str:
    """Start an endpoint for ``account``, let it log, kill it and return the log tail the spawner reports.

    With ``swap_log_for``, the account first replaces its log by a link to that path, as a researcher can.
    """
    submitter = identity_of(f"{account.pw_name}@example.org")
    spawned = peer.request(submitter, peer.signer.sign(peer.claims(submitter)))
    assert isinstance(spawned, Spawned), spawned
    log = Path(account.pw_dir, ".mep", "endpoints", spawned.endpoint_id, "endpoint.log")
    wait_for(lambda: log.exists() and log.stat().st_size > 0, what="the endpoint's first log line")
    if swap_log_for:
        log.unlink()
        log.symlink_to(swap_log_for)
        os.lchown(log, account.pw_uid, account.pw_gid)
    os.kill(spawned.pid, signal.SIGKILL)  # not a clean exit: the spawner reads the tail of its log
    while True:
        message = peer.link.receive()
        assert message is not None, peer.log()
        if isinstance(message, EndpointExited) and message.endpoint_id == spawned.endpoint_id:
            return message.log_tail


@pytest.mark.attack("the endpoint's log swapped for a link to a root-only file before the endpoint dies",
                    "the spawner reads log tails in a child dropped to the account")
def test_log_swapped_for_a_link_to_a_root_file(peer: SpawnerPeer, account_factory, record_property) -> None:
    fd, secret = tempfile.mkstemp(prefix="mep-attack-secret-", dir="/root")
    try:
        os.write(fd, b"TOPSECRET root's own line\n")
        os.close(fd)
        tail = _killed_endpoints_log_tail(peer, account_factory("mepatktail"), swap_log_for=secret)
    finally:
        os.unlink(secret)
    assert "TOPSECRET" not in tail
    assert tail == ""
    # The same path without the swap: the tail is there, read as the account.
    honest = account_factory("mepatktailok")
    tail = _killed_endpoints_log_tail(peer, honest)
    logs = list(Path(honest.pw_dir, ".mep", "endpoints").glob("*/endpoint.log"))
    assert tail and tail.splitlines()[-1] == logs[0].read_text().splitlines()[-1]
    record_property("observed", "no byte of the root-only file in the reported tail; an honest log's tail arrives")


@pytest.mark.attack("YAML injection through a user_endpoint_config value", "values render as quoted scalars")
def test_yaml_injection(tmp_path: Path, record_property) -> None:
    renderer = render_tests.make_renderer(tmp_path, render_tests.LABEL_TEMPLATE, render_tests.LABEL_SCHEMA)
    for label in render_tests.INJECTIONS:
        document = render_tests.label_document(renderer, label)
        assert document == {"label": label, "nested": {"inner": label, "after": 1}, "items": [label, 2],
                            "idle_timeout": 300}, label
    record_property("observed", f"{len(render_tests.INJECTIONS)} injections stayed one string value")


@pytest.mark.attack("pickle aimed at the service or the manager",
                    "brokers never unpickle (audit hook), never load dill")
def test_pickle_aimed_at_the_brokers(deploy, account_factory, record_property) -> None:
    spine_attacks.test_audit_hook_refuses_unpickling_in_a_brokering_process()
    spine_attacks.test_brokers_never_load_dill_and_refuse_unpickling(deploy, account_factory)
    record_property("observed", "unpickling refused in service, router and spawner; dill not loaded")
