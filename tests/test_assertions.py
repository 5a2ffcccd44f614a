"""Signed identity assertions: a compromised router can't start or feed endpoints for identities that never submitted.

The spawner and the user endpoint here are real processes (a root spawner
forked from the test, real accounts, real endpoints); the test holds the
router's ends of their channels and sends what a compromised router would.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import uuid

import msgspec
import pytest

from mep.errors import AssertionRefusedError, ErrorCode, error_for_code
from mep.protocol.assertions import AssertionSigner, CachingVerifier, Claims, SignedAssertion, generate_signing_key
from mep.protocol.messages import FAILED, SUCCESS, Spawned, SpawnRefused, TaskRef, Tasks
from mep.sdk.serialize import client_runtime, deserialize, function_hash, serialize_args, serialize_function
from tests.harness import DOMAIN_STRIP, expression_mapping, wait_for
from tests.spawner_peer import SpawnerPeer, identity_of, spawner_peer

pytestmark = pytest.mark.root


def whoami() -> int:
    import os

    return os.getuid()


@pytest.fixture
def peer(router_account: str):  # noqa: ANN201
    with spawner_peer(expression_mapping(DOMAIN_STRIP), router_user=router_account) as running:
        yield running


def _refused(peer: SpawnerPeer, answer: Spawned | SpawnRefused, code: ErrorCode) -> None:
    """Refused with ``code``, audited as refused with the admin's reason, and nothing was started."""
    assert isinstance(answer, SpawnRefused), f"expected a refusal, got {answer}"
    assert answer.code == code, answer
    assert "ask your admin" in answer.message
    # the refusal is queued for the audit writer before it is sent: it is on disk soon after
    record = wait_for(lambda: [r for r in peer.audit_records() if r["request_id"] == answer.request_id],
                      what="the refusal's audit record")
    assert len(record) == 1 and record[0]["outcome"] == "refused" and record[0]["code"] == code, record
    assert record[0]["reason"] and record[0]["reason"] != answer.message  # the admin's detail, not the user's line
    assert record[0]["account"] is None, "refused before the identity was even mapped"
    assert peer.endpoints() == [], "no endpoint was started"


def test_forged_spawn_request_for_an_identity_that_never_submitted_is_refused_and_audited(
        peer: SpawnerPeer, account_factory) -> None:
    victim = account_factory("mepvictim")
    never_submitted = identity_of(f"{victim.pw_name}@example.org")  # maps to a real account
    _refused(peer, peer.request(never_submitted, ""), ErrorCode.ASSERTION_MISSING)
    attacker = AssertionSigner(generate_signing_key())  # the attacker's own key, not the pinned one
    _refused(peer, peer.request(never_submitted, attacker.sign(peer.claims(never_submitted))),
             ErrorCode.ASSERTION_INVALID)
    assert "not among the pinned service_signing_keys" in peer.audit_records()[-1]["reason"]


def test_an_altered_assertion_is_refused(peer: SpawnerPeer, account_factory) -> None:
    account = account_factory("mepalter")
    submitter, victim = identity_of(f"{account.pw_name}@example.org"), identity_of("root@example.org")
    genuine = msgspec.msgpack.decode(base64.urlsafe_b64decode(peer.signer.sign(peer.claims(submitter))),
                                     type=SignedAssertion)
    altered_claims = genuine.claims.replace(submitter.id.encode(), victim.id.encode())
    altered = base64.urlsafe_b64encode(msgspec.msgpack.encode(msgspec.structs.replace(
        genuine, claims=altered_claims))).decode()
    _refused(peer, peer.request(victim, altered), ErrorCode.ASSERTION_INVALID)
    assert "bad signature" in peer.audit_records()[-1]["reason"]


def test_a_request_that_differs_from_what_was_signed_is_refused(peer: SpawnerPeer, account_factory) -> None:
    alice, bob = account_factory("mepsigned"), account_factory("mepnamed")
    signed, named = identity_of(f"{alice.pw_name}@example.org"), identity_of(f"{bob.pw_name}@example.org")
    cases = [
        (named, peer.signer.sign(peer.claims(signed)), {}),  # another identity than the service signed
        (signed, peer.signer.sign(peer.claims(signed, config={"workers": 1})), {"workers": 64}),  # another config
        (signed, peer.signer.sign(peer.claims(signed, endpoint_id=str(uuid.uuid4()))), {}),  # another endpoint
    ]
    for identity, assertion, config in cases:
        _refused(peer, peer.request(identity, assertion, config), ErrorCode.ASSERTION_MISMATCH)


def test_expired_and_replayed_assertions_are_refused(peer: SpawnerPeer, account_factory) -> None:
    account = account_factory("mepreplay")
    submitter = identity_of(f"{account.pw_name}@example.org")
    _refused(peer, peer.request(submitter, peer.signer.sign(peer.claims(submitter, lifetime=-1.0))),
             ErrorCode.ASSERTION_EXPIRED)
    genuine = peer.signer.sign(peer.claims(submitter))
    first = peer.request(submitter, genuine)
    assert isinstance(first, Spawned) and first.account == account.pw_name, first  # the genuine one runs
    assert os.stat(f"/proc/{first.pid}").st_uid == account.pw_uid
    replayed = peer.request(submitter, genuine)
    assert isinstance(replayed, SpawnRefused) and replayed.code == ErrorCode.ASSERTION_REPLAYED, replayed
    wait_for(lambda: any(r["request_id"] == replayed.request_id for r in peer.audit_records()),
             what="the replay's audit record")
    outcomes = [(r["request_id"], r["outcome"], r.get("code")) for r in peer.audit_records()]
    assert outcomes[-2:] == [(first.request_id, "allowed", None),
                             (replayed.request_id, "refused", ErrorCode.ASSERTION_REPLAYED)]


def test_the_endpoint_refuses_a_task_of_another_identity(router_account: str, account_factory) -> None:
    account = account_factory("mepshared")
    both = {"source": "{username}", "match": r"(yvonne|xavier)@example\.org", "output": account.pw_name}
    serves, other = identity_of("yvonne@example.org"), identity_of("xavier@example.org")
    with spawner_peer(expression_mapping(both), router_user=router_account, with_router=True) as peer:
        spawned = peer.request(serves, peer.signer.sign(peer.claims(serves)))
        assert isinstance(spawned, Spawned), spawned
        peer.router.wait_ready(spawned.endpoint_id)

        ids = {name: str(uuid.uuid4()) for name in ("other", "unsigned", "uncovered", "own")}
        assertions = [
            peer.signer.sign(peer.claims(other, task_ids=[ids["other"]])),  # genuine, but X's
            "",
            peer.signer.sign(peer.claims(serves, task_ids=[ids["own"]])),  # Y's, covering "own" only
        ]
        function = serialize_function(whoami)
        tasks = [TaskRef(task_id=ids["other"], fn_hash=function_hash(function), args_frame=1, fn_frame=0),
                 TaskRef(task_id=ids["unsigned"], fn_hash=function_hash(function), args_frame=1, assertion=1),
                 TaskRef(task_id=ids["uncovered"], fn_hash=function_hash(function), args_frame=1, assertion=2),
                 TaskRef(task_id=ids["own"], fn_hash=function_hash(function), args_frame=1, assertion=2)]
        peer.router.send(spawned.endpoint_id, Tasks(tasks=tasks, runtimes=[client_runtime()], assertions=assertions),
                         [function, serialize_args((), {})])
        results = peer.router.results(len(tasks))

    expected = {"other": ErrorCode.ASSERTION_MISMATCH, "unsigned": ErrorCode.ASSERTION_MISSING,
                "uncovered": ErrorCode.ASSERTION_MISMATCH}
    for name, code in expected.items():
        result, _ = results[ids[name]]
        assert (result.status, result.code) == (FAILED, code), (name, result)
        assert isinstance(error_for_code(result.code, result.message), AssertionRefusedError)
    own, payload = results[ids["own"]]
    assert own.status == SUCCESS, own
    assert deserialize(payload) == account.pw_uid  # the genuine task ran, as the account


def test_verification_is_done_once_per_assertion() -> None:
    signer = AssertionSigner(generate_signing_key())
    verifier = CachingVerifier([signer.public_key], "endpoint")
    identity = identity_of("alice@example.org")
    assertion = signer.sign(Claims(submitter_id=identity.id, identities=[identity], endpoint_id="endpoint",
                                   config_digest="", task_ids=["t"], issued_at=0.0, expires_at=4e9, nonce="n"))
    first = verifier.verify(assertion)
    assert verifier.verify(assertion) is first  # cached by signature: the signature is checked once
    verifier.keys.clear()  # were it checked again, the unknown key would refuse it
    assert verifier.verify(assertion) is first


def test_a_deployment_signs_and_runs_tasks_end_to_end(deploy, account_factory) -> None:
    account = account_factory("mepsigns")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(whoami).result(timeout=60) == account.pw_uid
    pinned = [line for line in manager.config_path.read_text().splitlines() if "ed25519:" in line]
    assert pinned and deploy.admin("signing-key", "show")["signing_key"] in pinned[0]


def _pin(manager, *args: str) -> None:  # noqa: ANN001 - a harness Manager
    result = subprocess.run([sys.executable, "-m", "mep", "manager", "pin-signing-key", "--config",
                             str(manager.config_path), *args], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr


def test_a_key_rollover_keeps_tasks_running(deploy, account_factory) -> None:
    account = account_factory("meprotate")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    old = deploy.admin("signing-key", "show")["signing_key"]
    new = deploy.admin("signing-key", "rotate")["next_signing_key"]
    _pin(manager, new)  # 2. both keys valid on the manager
    manager.process.stop()
    manager.start()
    deploy.admin("signing-key", "rotate", "--finish")  # 3. the service signs with the new key
    deploy.restart_service(signal.SIGTERM)
    assert deploy.admin("signing-key", "show") == {"signing_key": new}
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(whoami).result(timeout=60) == account.pw_uid
    _pin(manager, "--remove", old)  # 4. the old key is gone; only the new one is trusted
    assert old not in manager.config_path.read_text() and new in manager.config_path.read_text()
