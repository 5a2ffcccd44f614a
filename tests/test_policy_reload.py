"""Every policy change reaches running endpoints: a changed mapping, an account PAM now refuses.

The spawner has one reload path (``Spawner._apply_policy``), taken on SIGHUP,
when a spawn request or a heartbeat notices the file changed, and at every
heartbeat for the account checks: the router forgets which endpoint serves
whom, and endpoints that may no longer run are stopped (running tasks finish).
The revoked identity with a busy endpoint is in tests/test_attacks.py.
"""

from __future__ import annotations

import json
import os

import pytest

import mep
from mep.errors import ErrorCode
from mep.protocol.messages import Spawned, SpawnRefused
from tests.harness import DOMAIN_STRIP, expression_mapping, processes_of_uid, wait_for
from tests.pam_services import PamService, pam_service_fixture  # noqa: F401 - the pam_service fixture
from tests.spawner_peer import identity_of, spawner_peer
from tests.test_attacks import audit, routed, run_while, whoami

pytestmark = pytest.mark.root


def stopped_endpoints(manager) -> list[dict]:  # noqa: ANN001 - a harness Manager
    return [record for record in audit(manager) if record["event"] == "endpoint_stopped"]


def test_a_reused_endpoint_is_refused_once_pam_refuses_the_account(router_account: str, pam_service: PamService,
                                                                    account_factory) -> None:
    account = account_factory("mepreusepam")
    submitter = identity_of(f"{account.pw_name}@example.org")
    pam = {"pam": {"enable": True, "service": pam_service.name}, "heartbeat_interval": 3600}  # no revalidation
    with spawner_peer(expression_mapping(DOMAIN_STRIP), router_user=router_account, settings=pam) as peer:
        first = peer.request(submitter, peer.signer.sign(peer.claims(submitter)))
        assert isinstance(first, Spawned), first
        pam_service.deny(account.pw_name)
        again = peer.request(submitter, peer.signer.sign(peer.claims(submitter)))  # would reuse the endpoint
        assert isinstance(again, SpawnRefused) and again.code == ErrorCode.ACCOUNT_REFUSED, again
        assert "account checks (PAM)" in again.message
        reason = wait_for(lambda: [r for r in peer.audit_records() if r["request_id"] == again.request_id],
                          what="the refusal's audit record")[0]["reason"]
        assert "pam_acct_mgmt" in reason


def test_pam_refusal_at_revalidation_stops_a_busy_endpoint(deploy, pam_service: PamService,
                                                           account_factory) -> None:
    account = account_factory("meprevalpam")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP),
                                   settings={"pam": {"enable": True, "service": pam_service.name}})
    identity = deploy.identity(f"{account.pw_name}@example.org")
    gate = deploy.root / "busy"
    gate.touch()
    os.chmod(deploy.root, 0o755)  # the task, as the account, watches the gate
    with deploy.executor(identity, manager) as executor:
        busy = executor.submit(run_while, str(gate))
        wait_for(lambda: routed(manager, busy.task_id), what="the task to reach its endpoint")
        pam_service.deny(account.pw_name)  # the account policy still allows it: only PAM says no
        stopped = wait_for(lambda: stopped_endpoints(manager), what="the heartbeat to stop the endpoint")
        assert "pam_acct_mgmt" in stopped[0]["reason"] and stopped[0]["account"] == account.pw_name
        with pytest.raises(mep.AccountRefusedError, match=r"account checks \(PAM\)"):
            executor.submit(whoami).result(timeout=60)
        assert not busy.done(), "the busy task was still running when PAM refused its account"
        gate.unlink()
        assert busy.result(timeout=60) == "done", "the running task finishes"


def test_an_identity_remapped_to_another_account_gets_a_fresh_endpoint_and_the_old_one_stops(
        deploy, account_factory) -> None:
    first, second = account_factory("mepremapa"), account_factory("mepremapb")
    username = f"{first.pw_name}@example.org"
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(username)
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(whoami).result(timeout=60) == first.pw_uid
        mapping = manager.config_path.parent / "identity_mapping.json"
        replacement = mapping.with_suffix(".new")
        moved = {"source": "{username}", "match": f"{first.pw_name}@example\\.org", "output": second.pw_name}
        replacement.write_text(json.dumps(expression_mapping(moved)))
        replacement.rename(mapping)  # no SIGHUP: the next heartbeat or spawn request notices
        wait_for(lambda: "reloaded (the file changed)" in manager.log(), what="the change to be noticed")
        assert executor.submit(whoami).result(timeout=60) == second.pw_uid
    (stopped,) = wait_for(lambda: stopped_endpoints(manager), what="the old endpoint to stop")
    assert stopped["account"] == first.pw_name and f"now maps to {second.pw_name!r}" in stopped["reason"]
    wait_for(lambda: not processes_of_uid(first.pw_uid), what="the old endpoint to exit")
