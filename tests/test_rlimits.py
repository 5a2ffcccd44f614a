"""The admin's resource limits and no_new_privs, read from /proc of real user endpoints a real spawner started."""

from __future__ import annotations

import re
import resource

import pytest

from mep.protocol.messages import Spawned
from tests.harness import DOMAIN_STRIP, expression_mapping
from tests.pam_services import PamService, pam_service_fixture  # noqa: F401 - the pam_service fixture
from tests.spawner_peer import identity_of, spawner_peer

pytestmark = pytest.mark.root

_LIMIT_NAMES = {"nproc": "Max processes", "address_space": "Max address space", "cpu": "Max cpu time",
                "nofile": "Max open files", "core": "Max core file size"}


def _limits(pid: int) -> dict[str, tuple[str, str]]:
    """``/proc/<pid>/limits``: name -> (soft, hard)."""
    with open(f"/proc/{pid}/limits") as handle:
        rows = [re.split(r"\s{2,}", line.strip()) for line in handle.readlines()[1:]]
    return {row[0]: (row[1], row[2]) for row in rows}


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as handle:
        return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)


def _endpoint(router_account: str, account_name: str, settings: dict) -> tuple[int, dict, dict]:
    """Start an endpoint for ``account_name`` under ``settings``; its (pid, limits, status) while it runs."""
    with spawner_peer(expression_mapping(DOMAIN_STRIP), router_user=router_account, settings=settings) as peer:
        identity = identity_of(f"{account_name}@example.org")
        spawned = peer.request(identity, peer.signer.sign(peer.claims(identity)))
        assert isinstance(spawned, Spawned), f"{spawned}\n{peer.log()}"
        return spawned.pid, _limits(spawned.pid), _status(spawned.pid)


def _expected_limits() -> tuple[dict, dict[str, str]]:
    nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = {"nproc": 512, "address_space": 16 << 30, "cpu": 3600, "nofile": nofile_hard + 1000, "core": 0}
    # Raising a hard limit needs CAP_SYS_RESOURCE: one above the current hard limit stays at it.
    expected = {**{_LIMIT_NAMES[k]: str(v) for k, v in limits.items()}, "Max open files": str(nofile_hard)}
    return limits, expected


@pytest.mark.parametrize("pam", [False, True], ids=["without PAM", "with PAM"])
def test_admin_limits_and_no_new_privs_apply_to_every_endpoint(router_account: str, account_factory,
                                                               pam_service: PamService, pam: bool) -> None:
    account = account_factory("meplimits")
    limits, expected = _expected_limits()
    settings = {"endpoint_limits": limits, "pam": {"enable": pam, "service": pam_service.name}}
    _, found, status = _endpoint(router_account, account.pw_name, settings)
    assert status["Uid"].split() == [str(account.pw_uid)] * 4
    for name, value in expected.items():
        assert found[name] == (value, value), (name, found[name])
    assert status["NoNewPrivs"] == "1"
    assert int(status["CapBnd"], 16) == 0


def test_setuid_helpers_need_the_admins_opt_in(router_account: str, account_factory) -> None:
    account = account_factory("mepsetuid")
    _, _, status = _endpoint(router_account, account.pw_name, {"allow_setuid_helpers": True})
    assert status["NoNewPrivs"] == "0"  # a setuid scheduler client (PBS's pbs_iff) can work
    assert int(status["CapBnd"], 16) != 0
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0  # the endpoint itself holds none
