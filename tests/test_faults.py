"""Faults beyond crashes, for real: key refusals before the router knows an endpoint, endpoints that never
connect, stalled processes, a killed PAM session holder, and what a task leaves behind.

Tasks record each run in a file in their account's home, so "ran once" is counted, not assumed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

import mep
from mep.protocol import decode, encode
from mep.protocol.curve import ZapHandler, generate_keypair, make_curve_server
from mep.protocol.messages import EndpointBoot, Ready, Shutdown
from tests.harness import (DOMAIN_STRIP, PYTHON, children_of, deployment, expression_mapping, local_template_boot,
                           wait_for)
from tests.pam_services import PamService, pam_service_fixture  # noqa: F401 - the pam_service fixture

pytestmark = pytest.mark.root


def counted_nap(seconds: float, value: int) -> tuple[int, int]:
    """Sleeps, and appends its value to ~/runs: how often each task ran."""
    import os
    import time

    with open(os.path.expanduser("~/runs"), "a") as runs:
        runs.write(f"{value}\n")
    time.sleep(seconds)
    return value, os.getuid()


def runs_of(account: pwd.struct_passwd) -> list[int]:
    path = Path(account.pw_dir) / "runs"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def pam_settings(service: PamService) -> dict:
    return {"pam": {"enable": True, "service": service.name}}


def holder_and_endpoint(manager) -> tuple[int, int]:  # noqa: ANN001
    (holder,) = [pid for pid in children_of(manager.spawner_pid) if pid != manager.router_pid]
    (endpoint,) = children_of(holder)
    return holder, endpoint


# --- 1. an endpoint the router does not know yet, and one that never connects ----------------------------


@contextlib.contextmanager
def endpoint_behind_a_key_table(account: pwd.struct_passwd, known: dict[str, str], endpoint_id: str,
                                heartbeat_interval: float) -> Iterator[tuple[zmq.Socket, subprocess.Popen, str, Path]]:
    """A real endpoint as ``account`` connecting to a stand-in router whose ZAP handler knows only ``known``.

    Yields (router socket, endpoint process, the endpoint's public key, its log); the endpoint's process
    group is killed and the router closed on the way out.
    """
    context = zmq.Context()
    directory = tempfile.mkdtemp(prefix="mep-faults-", dir="/run")
    os.chmod(directory, 0o755)
    address = f"ipc://{directory}/endpoints"
    ZapHandler(context, {"mep-endpoints": known.get})
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router_public, router_secret = generate_keypair()
    make_curve_server(router, router_secret, "mep-endpoints")
    router.bind(address)
    os.chmod(address.removeprefix("ipc://"), 0o666)
    endpoint_public, endpoint_secret = generate_keypair()
    boot = EndpointBoot(endpoint_id=endpoint_id, account=account.pw_name, router_address=address,
                        router_public_key=router_public, secret_key=endpoint_secret,
                        heartbeat_interval=heartbeat_interval, **local_template_boot())
    log_path = Path(account.pw_dir) / "endpoint.log"
    with open(log_path, "wb") as log:
        endpoint = subprocess.Popen([PYTHON, "-m", "mep.endpoint"], stdin=subprocess.PIPE, stdout=log,
                                    stderr=subprocess.STDOUT, user=account.pw_uid, group=account.pw_gid,
                                    extra_groups=[], cwd=account.pw_dir, start_new_session=True)
    try:
        endpoint.stdin.write(msgspec.json.encode(boot))
        endpoint.stdin.close()
        yield router, endpoint, endpoint_public, log_path
    finally:
        if endpoint.poll() is None:
            os.killpg(endpoint.pid, signal.SIGKILL)
            endpoint.wait()
        router.close()
        context.term()
        shutil.rmtree(directory, ignore_errors=True)


def test_an_endpoint_refused_before_the_router_knows_its_key_connects_again(account_factory) -> None:
    """libzmq gives up on a connection whose key the ZAP handler refused, and drops what was queued on it:
    the endpoint must notice and connect again, or it sits "ready" while its tasks wait forever."""
    account = account_factory("mepfaultkey")
    known: dict[str, str] = {}  # the router's key table: empty until the spawner "reports" the endpoint
    with endpoint_behind_a_key_table(account, known, "e-1", 1.0) as (router, endpoint, endpoint_public, log_path):
        wait_for(lambda: "refused this endpoint's key" in log_path.read_text(), what="the first refusal")
        known[endpoint_public] = "e-1"  # the router learns the key only now
        assert router.poll(30_000), f"the endpoint never said hello after the refusal:\n{log_path.read_text()}"
        frames = router.recv_multipart(copy=False)
        header, _ = decode(frames[1:])
        assert isinstance(header, Ready) and header.endpoint_id == "e-1"
        router.send_multipart([frames[0].bytes, *encode(Shutdown(reason="test over"))])
        assert endpoint.wait(timeout=30) == 0


def test_an_endpoint_its_router_keeps_refusing_still_stops_on_sigterm(account_factory) -> None:
    """A DEALER with no connection blocks a send; an endpoint blocked there would never see SIGTERM or notice
    it is orphaned (found: one left running for 20 minutes after its manager was gone). Its sends never block."""
    account = account_factory("mepfaultdeaf")
    # The key table never learns the endpoint's key.
    with endpoint_behind_a_key_table(account, {}, "e-deaf", 0.2) as (_, endpoint, _, log_path):
        wait_for(lambda: log_path.read_text().count("refused this endpoint's key") >= 4, timeout=60,
                 what="four refusals")
        time.sleep(3)  # heartbeats every 0.2 s meanwhile, each with nowhere to go
        endpoint.send_signal(signal.SIGTERM)
        assert endpoint.wait(timeout=30) == 0, log_path.read_text()
        assert "endpoint stopping (SIGTERM)" in log_path.read_text()


def test_an_endpoint_that_never_connects_is_stopped_and_its_task_fails_with_the_reason(
        account_factory, router_account, pam_service: PamService) -> None:
    """Its worker interpreter hangs at start (before the endpoint connects): the task must not wait forever."""
    account = account_factory("mepfaulthello")
    hanging = Path(account.pw_dir) / "hang" / "bin" / "python"
    hanging.parent.mkdir(parents=True)
    hanging.write_text("#!/bin/sh\nexec sleep 600\n")
    hanging.chmod(0o755)
    for path in (hanging, hanging.parent, hanging.parent.parent):
        os.chown(path, account.pw_uid, account.pw_gid)
    with deployment(None, "--max-attempts", "1") as deploy:
        manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings=pam_settings(pam_service))
        identity = deploy.identity(f"{account.pw_name}@example.org")
        with deploy.executor(identity, manager, user_endpoint_config={"python_env": "hang"}) as executor:
            future = executor.submit(counted_nap, 0, 1)
            error = future.exception(timeout=120)
        assert error is not None and "did not connect to the manager within" in str(error), error
        assert "has not connected" in manager.log()
        wait_for(lambda: pam_service.events(account.pw_name) == ["open_session", "close_session"],
                 what="the stopped endpoint's session to close")


# --- 2. a stalled process does not condemn its peers for its own silence ---------------------------------


def test_a_stalled_router_resumes_without_killing_its_endpoints(account_factory, deploy,
                                                               pam_service: PamService) -> None:
    account = account_factory("mepfaultstall")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings=pam_settings(pam_service))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 2}) as executor:
        futures = [executor.submit(counted_nap, 1.0, n) for n in range(12)]
        wait_for(lambda: len(runs_of(account)) >= 2, what="tasks to run")
        _, endpoint = holder_and_endpoint(manager)
        router = manager.router_pid
        os.kill(router, signal.SIGSTOP)  # 5 heartbeat intervals of silence, all of it the router's own
        time.sleep(5)
        os.kill(router, signal.SIGCONT)
        assert sorted(future.result(timeout=120)[0] for future in futures) == list(range(12))
    assert sorted(runs_of(account)) == list(range(12)), "every task ran exactly once"
    assert "did not run for" in manager.log() and "has been silent" not in manager.log()
    assert os.path.exists(f"/proc/{endpoint}"), "the endpoint was not killed"


def test_a_stalled_service_keeps_its_managers_leases(account_factory, deploy) -> None:
    account = account_factory("mepfaultsvc")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:
        future = executor.submit(counted_nap, 6.0, 1)
        wait_for(lambda: runs_of(account), what="the task to run")
        os.kill(deploy.service.popen.pid, signal.SIGSTOP)
        time.sleep(5)
        os.kill(deploy.service.popen.pid, signal.SIGCONT)
        assert future.result(timeout=60) == (1, account.pw_uid)
    assert "went silent" not in deploy.service.log(), "the stall was the service's, not the manager's"
    assert "did not run for" in deploy.service.log()
    assert runs_of(account) == [1]


# --- 5. a killed PAM session holder loses nothing and leaves no orphan ----------------------------------


def test_a_killed_session_holder_leaves_its_endpoint_to_finish_its_tasks_once(account_factory, deploy,
                                                                             pam_service: PamService) -> None:
    account = account_factory("mepfaultholder")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings=pam_settings(pam_service))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 2}) as executor:
        futures = [executor.submit(counted_nap, 1.5, n) for n in range(6)]
        wait_for(lambda: len(runs_of(account)) >= 2, what="tasks to run")
        holder, endpoint = holder_and_endpoint(manager)
        os.kill(holder, signal.SIGKILL)
        assert sorted(future.result(timeout=120)[0] for future in futures) == list(range(6))
        wait_for(lambda: not os.path.exists(f"/proc/{endpoint}"), timeout=60,
                 what="the endpoint to finish its tasks and exit")
        assert executor.submit(counted_nap, 0, 6).result(timeout=60)[0] == 6, "a fresh endpoint takes new work"
    assert sorted(runs_of(account)) == list(range(7)), "every task ran exactly once"
    log = manager.log()
    assert f"the PAM session holder (pid {holder})" in log and "the endpoint finishes its tasks" in log
    assert "which this router does not know" not in log
    lost = [line for line in log.splitlines() if "lost with it" in line and "; 0 task(s)" not in line]
    assert not lost, lost
    events = pam_service.events(account.pw_name, holder)
    assert events == ["open_session"], "the holder died with the session open; nothing can close it now"


# --- 6. what a task leaves behind: its output, its processes; an adopted endpoint's old results -----------


def chatty(megabytes: int) -> str:
    """A MiB of output per unit, from Python and from a child process (fd-level, not just sys.stdout)."""
    import subprocess
    import sys

    for _ in range(megabytes * 1024):
        sys.stdout.write("x" * 1023 + "\n")
    subprocess.run(["sh", "-c", "echo from the child >&2"], check=True)
    return "said a lot"


def start_grandchild(then_sleep: float) -> int:
    """Leaves a `setsid` grandchild behind (its parent exits at once, so it is nobody's child but ours)."""
    import os
    import subprocess
    import time

    path = os.path.expanduser("~/grandchild")
    subprocess.run(["sh", "-c", f"setsid sh -c 'echo $$ > {path}.tmp; mv {path}.tmp {path}; exec sleep 300' &"],
                   check=True)
    while not os.path.exists(path):
        time.sleep(0.05)
    time.sleep(then_sleep)
    return int(open(path).read())


def endpoint_log(account: pwd.struct_passwd) -> str:
    return "".join(path.read_text(errors="replace")
                   for path in Path(account.pw_dir).glob(".mep/endpoints/*/endpoint.log"))


def test_a_tasks_output_is_capped_in_the_endpoint_log(account_factory, deploy) -> None:
    account = account_factory("mepfaultout")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:
        future = executor.submit(chatty, 4)
        assert future.result(timeout=60) == "said a lot"
        assert executor.submit(chatty, 0).result(timeout=60) == "said a lot"
    log = endpoint_log(account)
    assert len(log) < 256 * 1024, "4 MiB of output left at most 64 KiB per task in the log"
    total = 4 * 1024 * 1024 + len("from the child\n")
    assert (f"--- output of task {future.task_id}: {total} bytes; only the first 65536 are kept here, "
            f"{total - 65536} dropped") in log
    assert "from the child" in log, "a child process's output is captured too (the small task's)"


def test_a_tasks_setsid_grandchild_is_ended_with_the_task_and_with_its_cancellation(account_factory,
                                                                                    deploy) -> None:
    account = account_factory("mepfaultorphan")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    marker = Path(account.pw_dir) / "grandchild"
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 1}) as executor:
        grandchild = executor.submit(start_grandchild, 0).result(timeout=60)
        wait_for(lambda: not os.path.exists(f"/proc/{grandchild}"), what="the finished task's grandchild to end")
        assert "left 1 process(es) running; they were killed" in endpoint_log(account)
        marker.unlink()
        cancelled = executor.submit(start_grandchild, 300)
        wait_for(marker.exists, what="the second grandchild to start")
        grandchild = int(marker.read_text())
        assert cancelled.cancel()
        wait_for(lambda: not os.path.exists(f"/proc/{grandchild}"), what="the cancelled task's grandchild to end")
        assert executor.submit(counted_nap, 0, 1).result(timeout=60) == (1, account.pw_uid)


def test_an_adopted_endpoints_old_results_are_not_refused_noisily_and_it_still_idles_out(account_factory,
                                                                                          deploy) -> None:
    """Results the endpoint sent while the service was stopped, then the manager crashed: the new router never
    sent those tasks. The endpoint's resends must neither flood the log nor keep it alive for ever."""
    account = account_factory("mepfaultadopt")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    executor = deploy.executor(identity, manager, user_endpoint_config={"workers": 4, "idle_timeout": 10})
    try:
        futures = [executor.submit(counted_nap, 0.5, n) for n in range(8)]
        wait_for(lambda: len(runs_of(account)) >= 4, what="tasks to run")
        os.kill(deploy.service.popen.pid, signal.SIGSTOP)  # no acknowledgement reaches the endpoint now
        wait_for(lambda: len(runs_of(account)) == 8, what="every task to run")
        time.sleep(1.5)  # ... and finish, its result unacknowledged
        (endpoint,) = [pid for pid in children_of(manager.spawner_pid) if pid != manager.router_pid]
        os.killpg(manager.process.popen.pid, signal.SIGKILL)  # the whole manager crashes
        manager.process.popen.wait()
        os.kill(deploy.service.popen.pid, signal.SIGCONT)
        offset = len(manager.log())
        manager.start()
        assert sorted(future.result(timeout=60)[0] for future in futures) == list(range(8))
        wait_for(lambda: not os.path.exists(f"/proc/{endpoint}"), timeout=90,
                 what="the adopted endpoint to be rid of its old results and idle out")
        new_life = manager.log()[offset:]
        assert "resends results of tasks this router has not been given" in new_life, "the case under test"
        assert "which was not sent to it" not in new_life
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    assert sorted(runs_of(account)) == list(range(8)), "nothing ran again"
