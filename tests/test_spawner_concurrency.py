"""One slow account can't stall the others, and an ordinary error refuses one request, never the spawner.

The slow PAM stack is a real service file: ``pam_exec`` runs a script that
sleeps for one account (and leaves a mark once it is done), so while that
account's spawn waits in PAM another account's tasks must go through PAM,
start an endpoint and return.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import mep
from tests.harness import DOMAIN_STRIP, children_of, expression_mapping, wait_for
from tests.pam_services import PamService, pam_service_fixture  # noqa: F401 - the pam_service fixture

pytestmark = pytest.mark.root

SLOW_STACK = """\
    account  required  pam_exec.so quiet {dir}/slow.sh
    @include common-account
    session  required  pam_unix.so
"""

SLOW_SCRIPT = """\
#!/bin/sh
if [ "$PAM_USER" = "{user}" ]; then
    echo sleeping > {dir}/slow.state
    sleep 20
    echo done > {dir}/slow.state
fi
exit 0
"""


def whoami() -> int:
    import os

    return os.getuid()


def test_a_pam_stack_that_sleeps_for_one_account_does_not_hold_up_another(deploy, pam_service: PamService,
                                                                        account_factory) -> None:
    slow, fast = account_factory("mepslowpam"), account_factory("mepfastpam")
    script = pam_service.directory / "slow.sh"
    script.write_text(SLOW_SCRIPT.format(user=slow.pw_name, dir=pam_service.directory))
    script.chmod(0o755)
    pam_service.write(SLOW_STACK)
    state = pam_service.directory / "slow.state"
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP),
                                   settings={"pam": {"enable": True, "service": pam_service.name}})
    slow_identity = deploy.identity(f"{slow.pw_name}@example.org")
    fast_identity = deploy.identity(f"{fast.pw_name}@example.org")
    with deploy.executor(slow_identity, manager) as slow_executor, \
            deploy.executor(fast_identity, manager) as fast_executor:
        held_up = slow_executor.submit(whoami)
        wait_for(lambda: state.exists() and state.read_text().strip() == "sleeping", what="PAM to start sleeping")
        results = [fast_executor.submit(whoami) for _ in range(5)]
        assert [future.result(timeout=60) for future in results] == [fast.pw_uid] * 5
        assert state.read_text().strip() == "sleeping", "the other account's tasks ran while PAM still slept"
        assert not held_up.done()
        assert held_up.result(timeout=60) == slow.pw_uid, "and the slow account gets its endpoint in the end"
    assert state.read_text().strip() == "done"


def test_an_unwritable_registry_refuses_the_request_and_the_spawner_carries_on(deploy, account_factory) -> None:
    account = account_factory("mepregistry")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    spawner = manager.spawner_pid
    blocker = Path(manager.run_dir) / "endpoints.json.new"  # where the registry is written before it is renamed
    blocker.mkdir()
    try:
        with deploy.executor(identity, manager) as executor:
            with pytest.raises(mep.SpawnError, match="could not record the new endpoint"):
                executor.submit(whoami).result(timeout=60)
        assert "could not write the endpoint registry" in manager.log()
        wait_for(lambda: children_of(spawner) == [manager.router_pid], what="the unrecorded endpoint to stop")
    finally:
        shutil.rmtree(blocker)
    assert os.path.exists(f"/proc/{spawner}")
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(whoami).result(timeout=60) == account.pw_uid
