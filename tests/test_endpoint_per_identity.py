"""One user endpoint per identity: identities mapped to one account share an endpoint only if the admin says so."""

from __future__ import annotations

import uuid

import pytest

from mep.protocol.messages import SUCCESS, Spawned, TaskRef, Tasks
from mep.sdk.serialize import client_runtime, deserialize, function_hash, serialize_args, serialize_function
from tests.harness import expression_mapping
from tests.spawner_peer import SpawnerPeer, identity_of, spawner_peer

pytestmark = pytest.mark.root


def whoami() -> int:
    import os

    return os.getuid()


def _spawn(peer: SpawnerPeer, username: str) -> Spawned:
    identity = identity_of(username)
    answer = peer.request(identity, peer.signer.sign(peer.claims(identity)))
    assert isinstance(answer, Spawned), f"{answer}\n{peer.log()}"
    return answer


def _project_mapping(account: str) -> list[dict]:
    return expression_mapping({"source": "{username}", "match": r"(alice|bob)@example\.org", "output": account})


def test_two_identities_of_one_account_get_their_own_endpoints(router_account: str, account_factory) -> None:
    project = account_factory("mepproj")
    with spawner_peer(_project_mapping(project.pw_name), router_user=router_account) as peer:
        alice, bob, alice_again = (_spawn(peer, name) for name in
                                   ("alice@example.org", "bob@example.org", "alice@example.org"))
    assert alice.account == bob.account == project.pw_name
    assert not alice.reused and not bob.reused and alice.endpoint_id != bob.endpoint_id
    assert alice_again.reused and alice_again.endpoint_id == alice.endpoint_id  # one identity keeps its endpoint


def test_sharing_across_identities_is_the_admins_opt_in(router_account: str, account_factory) -> None:
    project = account_factory("mepshare")
    with spawner_peer(_project_mapping(project.pw_name), router_user=router_account, with_router=True,
                      settings={"share_endpoints_across_identities": True}) as peer:
        alice, bob = _spawn(peer, "alice@example.org"), _spawn(peer, "bob@example.org")
        assert bob.reused and bob.endpoint_id == alice.endpoint_id
        # The shared endpoint, started for alice, runs bob's signed tasks too.
        peer.router.wait_ready(alice.endpoint_id)
        task_id, function = str(uuid.uuid4()), serialize_function(whoami)
        assertion = peer.signer.sign(peer.claims(identity_of("bob@example.org"), task_ids=[task_id]))
        peer.router.send(alice.endpoint_id, Tasks(
            tasks=[TaskRef(task_id=task_id, fn_hash=function_hash(function), args_frame=1, fn_frame=0)],
            runtimes=[client_runtime()], assertions=[assertion]), [function, serialize_args((), {})])
        result, payload = peer.router.results(1)[task_id]
    assert result.status == SUCCESS, result
    assert deserialize(payload) == project.pw_uid
