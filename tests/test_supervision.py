"""A supervised router: killed mid-run, the spawner starts a new one and the work carries on, nothing lost."""

from __future__ import annotations

import os
import signal

import pytest

import mep
from tests.harness import DOMAIN_STRIP, children_of, expression_mapping, wait_for

pytestmark = pytest.mark.root


def nap(seconds: float, value: object = None) -> object:
    import time

    time.sleep(seconds)
    return value


def router_of(manager) -> int:
    """The spawner's child that runs the router, found from /proc (there is one once a router runs)."""
    title = f"mep-manager router {manager.endpoint_id}".encode()
    routers = [pid for pid in children_of(manager.spawner_pid) if _cmdline(pid).startswith(title)]
    return routers[0] if len(routers) == 1 else 0


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read()
    except OSError:  # it exited since it was listed
        return b""


def test_a_killed_router_is_restarted_and_tasks_continue_and_complete(deploy, account_factory) -> None:
    account = account_factory("mepsupervise")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    client = mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token)
    spawner = manager.spawner_pid
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 2}) as executor:
        running = executor.submit(nap, 6, "kept")
        quick = [executor.submit(nap, 0.05, n) for n in range(40)]
        wait_for(lambda: client.get_task(running.task_id).state == "running", what="the long task to run")
        (endpoint,) = [pid for pid in children_of(spawner) if pid != router_of(manager)]
        for _ in range(2):  # twice: the second restart comes after a longer backoff
            router = router_of(manager)
            os.kill(router, signal.SIGKILL)
            wait_for(lambda r=router: router_of(manager) not in (0, r), what="a new router")
        later = [executor.submit(nap, 0.05, n) for n in range(40, 60)]
        assert running.result(timeout=120) == "kept"
        assert [future.result(timeout=120) for future in quick + later] == list(range(60))
    assert os.path.exists(f"/proc/{spawner}") and manager.spawner_pid == spawner, "the spawner lived on"
    assert [pid for pid in children_of(spawner) if pid != router_of(manager)] == [endpoint], \
        "the running endpoint was adopted by each new router; no other was started"
    assert client.get_task(running.task_id).attempts == 0, "the run in progress carried on; nothing was retried"
    log = manager.log()
    assert log.count("was killed by signal 9 (SIGKILL)") >= 2 and "starting a new one in 0.5 s" in log
    assert "starting a new one in 1.0 s" in log
    assert log.count("spawned endpoint") == 1


def test_a_stopped_manager_does_not_restart_its_router(deploy, account_factory) -> None:
    account = account_factory("mepsupstop")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(nap, 0, "ran").result(timeout=60) == "ran"
    endpoints = [pid for pid in children_of(manager.spawner_pid) if pid != router_of(manager)]
    manager.process.stop()
    assert manager.process.popen.returncode == 0
    assert "starting a new one" not in manager.log()
    assert not any(os.path.exists(f"/proc/{pid}") for pid in endpoints), "a stop takes the endpoints with it"
