"""Fire-and-forget that holds: cancellation, walltimes, retries, restarts and offline peers, for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

import mep
from tests.harness import DOMAIN_STRIP, PYTHON, Manager, children_of, deployment, expression_mapping, wait_for

pytestmark = pytest.mark.root


def nap(seconds: float, value: object = None) -> object:
    import time

    time.sleep(seconds)
    return value


def die_by_signal() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def kill_my_endpoint() -> None:
    """Kills the user endpoint running this task (the worker's grandparent: forkserver, then endpoint)."""
    import os
    import signal

    os.killpg(os.getpgid(0), signal.SIGKILL)


def echo(value: object) -> object:
    return value


@pytest.fixture
def setup(deploy, account_factory):
    account = account_factory("mepreliable")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    return deploy, manager, identity


def _client(deploy, identity) -> mep.Client:
    return mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token)


def state_of(client: mep.Client, task_id: str) -> str:
    """The task's state, or "" while the service has not yet acknowledged its submission."""
    try:
        return client.get_task(task_id).state
    except mep.MepError:
        return ""


def _endpoints(manager) -> list[int]:
    router = manager.router_pid
    return [pid for pid in children_of(manager.spawner_pid) if pid != router]


def test_cancel_a_queued_and_a_running_task(setup) -> None:
    deploy, manager, identity = setup
    client = _client(deploy, identity)
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 1}) as executor:
        running = executor.submit(nap, 60)
        queued = executor.submit(echo, "never")
    wait_for(lambda: state_of(client, running.task_id) == "running", what="the long task to start")
    assert queued.cancel()
    assert running.cancel()
    for future in (running, queued):
        wait_for(lambda f=future: state_of(client, f.task_id) == "cancelled", what="the cancel to land")
        assert future.cancelled()
    assert "cancelled by the submitter" in client.get_task(running.task_id).message
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 1}) as executor:
        assert executor.submit(echo, "the worker was replaced").result(timeout=60) == "the worker was replaced"


def test_client_cancel_from_another_process_view(setup) -> None:
    deploy, manager, identity = setup
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 1}) as executor:
        future = executor.submit(nap, 60)
    client = _client(deploy, identity)
    wait_for(lambda: state_of(client, future.task_id) == "running", what="the task to start")
    ack = client.cancel([future.task_id, "00000000-0000-4000-8000-000000000000"])
    assert ack.requested == [future.task_id] and ack.unknown == ["00000000-0000-4000-8000-000000000000"]
    wait_for(future.cancelled, what="the executor's future to see the cancellation")
    info = client.get_task(future.task_id)
    assert info.state == "cancelled" and info.started_at and info.completed_at >= info.started_at


def test_walltime_stops_an_overrunning_task(setup) -> None:
    deploy, manager, identity = setup
    with deploy.executor(identity, manager, walltime=2) as executor:
        slow = executor.submit(nap, 60)
        executor.walltime = None
        fine = executor.submit(nap, 3, "done")
    with pytest.raises(mep.WalltimeExceededError, match="walltime of 2 s"):
        slow.result(timeout=60)
    assert fine.result(timeout=60) == "done"


def test_worker_death_fails_the_task_with_its_cause_and_the_worker_is_replaced(setup) -> None:
    deploy, manager, identity = setup
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 1}) as executor:
        with pytest.raises(mep.WorkerLostError, match="killed by signal 9"):
            executor.submit(die_by_signal).result(timeout=60)
        assert executor.submit(echo, 7).result(timeout=60) == 7


def test_task_whose_endpoint_is_killed_is_retried_elsewhere(setup) -> None:
    deploy, manager, identity = setup
    client = _client(deploy, identity)
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 2}) as executor:
        futures = [executor.submit(nap, 4, n) for n in range(2)]
        wait_for(lambda: all(state_of(client, f.task_id) == "running" for f in futures), what="tasks to run")
        (endpoint,) = _endpoints(manager)
        os.killpg(endpoint, signal.SIGKILL)
        assert [f.result(timeout=90) for f in futures] == [0, 1]
    for future in futures:
        info = client.get_task(future.task_id)
        assert info.state == "succeeded" and info.attempts == 1
    assert endpoint not in _endpoints(manager)


def test_a_task_that_keeps_killing_its_endpoint_fails_with_the_cause(account_factory, router_account) -> None:
    account = account_factory("mepdoomed")
    with deployment(None, "--max-attempts", "2") as deploy:
        manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
        identity = deploy.identity(f"{account.pw_name}@example.org")
        with deploy.executor(identity, manager) as executor:
            future = executor.submit(kill_my_endpoint)
        with pytest.raises(mep.EndpointLostError, match=r"killed by signal 9 \(SIGKILL\) while (running|holding) this task \(attempt 2 of 2"):
            future.result(timeout=120)
        assert _client(deploy, identity).get_task(future.task_id).attempts == 2


def test_a_stopped_endpoint_is_declared_dead_and_its_tasks_run_elsewhere(setup) -> None:
    deploy, manager, identity = setup
    client = _client(deploy, identity)
    with deploy.executor(identity, manager) as executor:
        future = executor.submit(nap, 2, "survived")
        wait_for(lambda: state_of(client, future.task_id) == "running", what="the task to run")
        (endpoint,) = _endpoints(manager)
        os.kill(endpoint, signal.SIGSTOP)
        assert future.result(timeout=90) == "survived"
    wait_for(lambda: "has been silent" in manager.log(), what="the router to notice")
    assert endpoint not in _endpoints(manager)


def test_service_crash_loses_nothing(setup) -> None:
    deploy, manager, identity = setup
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 2}) as executor:
        futures = [executor.submit(nap, 0.05, n) for n in range(200)]
        time.sleep(0.5)
        deploy.restart_service(signal.SIGKILL)
        more = [executor.submit(echo, n) for n in range(200, 300)]
        assert [f.result(timeout=120) for f in futures + more] == list(range(300))


def test_endpoint_offline_at_submit_then_client_gone_then_new_process_collects(deploy, account_factory) -> None:
    account = account_factory("mepoffline")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), wait=False)
    manager.process.stop()  # registered, then down: tasks must wait on the service's disk
    identity = deploy.identity(f"{account.pw_name}@example.org")
    submit = f"""
import json
from mep import Executor
def square(x):
    return x * x
with Executor({manager.endpoint_id!r}, service={deploy.address!r}, service_key={deploy.service_key!r},
              token={identity.token!r}) as ex:
    print(json.dumps([ex.submit(square, n).task_id for n in range(5)]))
"""
    result = subprocess.run([PYTHON, "-c", submit], capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    task_ids = json.loads(result.stdout)
    client = _client(deploy, identity)
    assert {client.get_task(t).state for t in task_ids} == {"waiting"}
    with pytest.raises(mep.TaskPendingError, match="waiting"):
        client.get_result(task_ids[0])
    manager.start()
    collect = f"""
import json, mep
client = mep.Client(service={deploy.address!r}, service_key={deploy.service_key!r}, token={identity.token!r})
ids = [t.task_id for t in client.list_tasks(endpoint_id={manager.endpoint_id!r})]
# futures re-attached in a new process resolve as the results arrive (and acknowledge them) ...
with mep.Executor({manager.endpoint_id!r}, service={deploy.address!r}, service_key={deploy.service_key!r},
                  token={identity.token!r}, poll_interval=1) as ex:
    print(json.dumps(sorted(f.result(timeout=60) for f in ex.attach(ids))))
# ... after which the service has let go of the bytes and says so
outcomes = client.get_batch_results(ids)
print(json.dumps(sorted({{type(outcomes[i].exception).__name__ for i in ids}})))
"""
    result = subprocess.run([PYTHON, "-c", collect], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[0, 1, 4, 9, 16]", '["TaskExpiredError"]']


def test_uncollected_results_expire(account_factory, router_account) -> None:
    account = account_factory("mepexpire")
    with deployment(None, "--result-retention", "2") as deploy:
        manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
        identity = deploy.identity(f"{account.pw_name}@example.org")
        client = _client(deploy, identity)
        script = f"""
from mep import Executor
with Executor({manager.endpoint_id!r}, service={deploy.address!r}, service_key={deploy.service_key!r},
              token={identity.token!r}) as ex:
    print(ex.submit(abs, -1).task_id)
"""
        task_id = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, check=True,
                                 cwd="/").stdout.strip()
        wait_for(lambda: state_of(client, task_id) == "expired", timeout=60, what="the result to expire")
        with pytest.raises(mep.TaskExpiredError, match="retention"):
            client.get_result(task_id)


def test_second_manager_for_the_same_endpoint_is_fenced_out(setup) -> None:
    """On the same host the instance lock refuses it; from another host (another run_dir) the lease does."""
    deploy, manager, identity = setup
    same_host = subprocess.run([PYTHON, "-m", "mep", "manager", "start", "--config", str(manager.config_path)],
                               capture_output=True, text=True, timeout=60, cwd="/")
    assert same_host.returncode == 2 and "already running on this host" in same_host.stderr
    other_config = manager.config_path.with_name("other-host.yaml")
    settings = yaml.safe_load(manager.config_path.read_text())
    settings["run_dir"] = f"{settings['run_dir']}-other-host"
    other_config.write_text(yaml.safe_dump(settings))
    other_host = Manager(other_config, manager.endpoint_id, Path(settings["run_dir"]))
    deploy.managers.append(other_host)
    other_host.start(wait=False)
    wait_for(lambda: "another manager is serving endpoint" in other_host.log(), what="the lease to refuse it")
    other_host.process.stop()
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(echo, "still served").result(timeout=60) == "still served"




def test_work_arriving_as_an_endpoint_idles_out_goes_to_a_fresh_endpoint(account_factory, router_account) -> None:
    """Forced order: the endpoint's request to exit reaches the router before the new work does."""
    account = account_factory("mepidlerace")
    with deployment(None, "--heartbeat-interval", "10") as deploy:  # long leases: the router is paused below
        manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings={"heartbeat_interval": 10.0})
        identity = deploy.identity(f"{account.pw_name}@example.org")
        client = _client(deploy, identity)
        config = {"workers": 1, "idle_timeout": 10}
        with deploy.executor(identity, manager, user_endpoint_config=config) as executor:
            assert executor.submit(echo, "first").result(timeout=60) == "first"
        (first,) = _endpoints(manager)
        endpoint_log = next(Path(f"/proc/{first}/cwd").resolve().glob(".mep/endpoints/*/endpoint.log"))
        router = manager.router_pid
        os.kill(router, signal.SIGSTOP)
        try:
            wait_for(lambda: "asking the manager to let this endpoint exit" in endpoint_log.read_text(),
                     timeout=60, what="the endpoint to ask to exit")
            with deploy.executor(identity, manager, user_endpoint_config=config) as executor:
                futures = [executor.submit(echo, n) for n in range(5)]
            wait_for(lambda: {state_of(client, f.task_id) for f in futures} == {"dispatched"},
                     what="the new work to be on its way to the paused router")
        finally:
            os.kill(router, signal.SIGCONT)
        assert [f.result(timeout=60) for f in futures] == list(range(5))
        wait_for(lambda: first not in _endpoints(manager), what="the idle endpoint to exit")
        assert len(_endpoints(manager)) == 1, "the work went to one fresh endpoint"


def test_manager_sigterm_lets_running_tasks_finish(setup) -> None:
    deploy, manager, identity = setup
    client = _client(deploy, identity)
    with deploy.executor(identity, manager) as executor:
        future = executor.submit(nap, 3, "finished")
    wait_for(lambda: state_of(client, future.task_id) == "running", what="the task to run")
    endpoints = _endpoints(manager)
    manager.process.stop()
    assert future.result(timeout=60) == "finished"
    assert client.get_task(future.task_id).attempts == 0
    for pid in endpoints:
        assert not Path(f"/proc/{pid}").exists(), "a stopped manager leaves no endpoint behind"
    assert "the manager is stopping" in manager.log() or "stopping" in manager.log()


def test_a_crashed_manager_leaves_endpoints_running_and_its_restart_adopts_them(setup) -> None:
    deploy, manager, identity = setup
    client = _client(deploy, identity)
    with deploy.executor(identity, manager) as executor:
        future = executor.submit(nap, 6, "kept")
    wait_for(lambda: state_of(client, future.task_id) == "running", what="the task to run")
    (endpoint,) = _endpoints(manager)
    os.killpg(manager.spawner_pid, signal.SIGKILL)  # spawner and router at once: the whole manager crashes
    manager.process.popen.wait()
    assert Path(f"/proc/{endpoint}").exists(), "a crash must not take the user's endpoint with it"
    manager.start()
    assert future.result(timeout=60) == "kept"
    log_after_restart = manager.log().rsplit("starting (multi-user mode)", 1)[1]
    assert "adopted endpoint" in log_after_restart and str(endpoint) in log_after_restart
    assert client.get_task(future.task_id).attempts == 0, "the run in progress carried on; nothing was retried"
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(echo, "same endpoint").result(timeout=60) == "same endpoint"
    assert "spawned endpoint" not in manager.log().rsplit("starting (multi-user mode)", 1)[1]
    assert Path(f"/proc/{endpoint}").exists()


def big_result(size: int) -> bytes:
    return b"x" * size


def test_oversize_config_and_result_get_clear_errors(setup) -> None:
    deploy, manager, identity = setup
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 1, "note": "x" * 100_000}) as executor:
        with pytest.raises(mep.ConfigInvalidError, match="user_endpoint_config is .* bytes as JSON; the limit is"):
            executor.submit(echo, 1)  # refused at submit, before the schema check (the service refuses it too)
    with deploy.executor(identity, manager) as executor:
        # Above the inline limit, but above the large-result threshold too: kept in a file and read from there.
        assert executor.submit(big_result, 11 * 1024 * 1024).result(timeout=120) == b"x" * 11 * 1024 * 1024
        assert executor.submit(echo, "next").result(timeout=60) == "next"


def whoami() -> int:
    import os

    return os.getuid()


def test_disabled_account_loses_its_endpoint_and_a_changed_mapping_applies_at_once(deploy, account_factory) -> None:
    first, second = account_factory("mepremap"), account_factory("mepremap")
    mapping = [{"DATA_TYPE": "expression_identity_mapping#1.0.0",
                "mappings": [{"source": "{username}", "match": "researcher@example\\.org", "output": first.pw_name}]}]
    manager = deploy.start_manager(mapping)
    identity = deploy.identity("researcher@example.org")
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(whoami).result(timeout=60) == first.pw_uid
        mapping[0]["mappings"][0]["output"] = second.pw_name
        mapping_file = manager.config_path.parent / "identity_mapping.json"
        replacement = mapping_file.with_name("identity_mapping.new")
        replacement.write_text(json.dumps(mapping))
        os.replace(replacement, mapping_file)
        wait_for(lambda: "mapping each submitter afresh" in manager.log(), what="the router to forget its shortcut")
        assert executor.submit(whoami).result(timeout=60) == second.pw_uid
        (endpoint,) = [pid for pid in _endpoints(manager) if os.stat(f"/proc/{pid}").st_uid == second.pw_uid]
        subprocess.run(["usermod", "--shell", "/usr/sbin/nologin", second.pw_name], check=True)
        wait_for(lambda: not Path(f"/proc/{endpoint}").exists(), what="the disabled account's endpoint to stop")
        with pytest.raises(mep.AccountRefusedError, match="shell"):
            executor.submit(whoami).result(timeout=60)


def test_one_identity_can_never_see_or_touch_anothers_tasks(setup) -> None:
    deploy, manager, identity = setup
    other = deploy.identity("someone-else@example.org")
    with deploy.executor(identity, manager) as executor:
        future = executor.submit(echo, "mine")
    assert future.result(timeout=60) == "mine"
    intruder = _client(deploy, other)
    with pytest.raises(mep.MepError, match="knows no task"):
        intruder.get_task(future.task_id)
    with pytest.raises(mep.MepError, match="knows no task"):
        intruder.get_result(future.task_id)
    assert intruder.cancel([future.task_id]).unknown == [future.task_id]
    assert intruder.list_tasks() == []
    assert _client(deploy, identity).get_task(future.task_id).state == "succeeded"
