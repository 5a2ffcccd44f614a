"""Chaos: four researchers submit 2,000 tasks while a seeded schedule SIGKILLs every kind of process.

The schedule is driven by progress (a kill after every so many completions),
not by the clock, and the only deadline is "some task completed recently", so
a slow machine makes the test slower, not flaky. At the end every task has
exactly one terminal state at the service, every future has resolved, and
every success carries the right value computed as the right account.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
from concurrent.futures import Future

import pytest

import mep
from tests.harness import DOMAIN_STRIP, expression_mapping, wait_for

pytestmark = pytest.mark.root

TASKS_PER_RESEARCHER = 500
RESEARCHERS = 4
KILLS = 8
STALL_LIMIT = 180.0  # seconds without a single completion before the test gives up


def work(x: int) -> tuple[int, int]:
    import os
    import random
    import time

    time.sleep(random.random() * 0.01)
    return x * x, os.getuid()


class Supervisor(threading.Thread):
    """Restarts the manager whenever it has died, as systemd's Restart=always would."""

    def __init__(self, manager) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.manager = manager
        self.stopping = threading.Event()
        self.restarts = 0

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            if self.manager.process.popen.poll() is not None:
                self.manager.start(wait=False)  # refused while the old spawner is still winding down
                self.restarts += 1


def _kill(victim: str, deploy, manager, accounts: list[str], rng: random.Random) -> str:  # noqa: ANN001
    """SIGKILL one process of the given kind, waiting first for the supervisor to have it running."""
    if victim == "service":
        deploy.restart_service(signal.SIGKILL)
        return "killed service"
    if victim in ("router", "spawner"):
        pid = wait_for(lambda: _alive_pid(lambda: getattr(manager, f"{victim}_pid")), timeout=120,
                       what=f"a {victim} to kill")
    else:
        pid = rng.choice(wait_for(lambda: _alive_pid(lambda: _endpoint_pids(accounts)), timeout=120,
                                  what="an endpoint to kill"))
    try:
        os.killpg(pid, signal.SIGKILL) if victim == "endpoint" else os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return f"{victim} exited by itself before the kill"
    return f"killed {victim}"


def _endpoint_pids(accounts: list[str]) -> list[int]:
    """These accounts' user endpoints, adopted ones (not the spawner's children) included."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                title = handle.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.split(" ")[:2] in [["mep-endpoint", account] for account in accounts]:
            found.append(int(entry))
    return found


def _alive_pid(find):  # noqa: ANN001, ANN202
    try:
        return find()
    except AssertionError:  # not running right now (restarting)
        return None


def test_nothing_is_lost_while_processes_are_killed(deploy, account_factory) -> None:
    rng = random.Random(20261126)
    accounts = [account_factory(f"mepchaos{n}") for n in range(RESEARCHERS)]
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identities = [deploy.identity(f"{account.pw_name}@example.org") for account in accounts]
    supervisor = Supervisor(manager)
    supervisor.start()
    futures: dict[str, tuple[Future, int, int]] = {}
    executors = [deploy.executor(identity, manager, user_endpoint_config={"workers": 2}) for identity in identities]
    try:
        for account, executor in zip(accounts, executors, strict=True):
            for x in range(TASKS_PER_RESEARCHER):
                future = executor.submit(work, x)
                futures[future.task_id] = (future, x, account.pw_uid)
        total = len(futures)
        kill_at = sorted(rng.sample(range(total // 20, total * 9 // 10), KILLS))
        events = []
        last_done, last_progress = 0, time.monotonic()
        while True:
            done = sum(future.done() for future, _, _ in futures.values())
            if done > last_done:
                last_done, last_progress = done, time.monotonic()
            if done == total:
                break
            assert time.monotonic() - last_progress < STALL_LIMIT, (
                f"no task completed for {STALL_LIMIT:.0f} s ({done}/{total} done); events: {events}")
            while kill_at and done >= kill_at[0]:
                kill_at.pop(0)
                events.append(_kill(rng.choice(["service", "router", "spawner", "endpoint"]), deploy, manager,
                                    [account.pw_name for account in accounts], rng))
            time.sleep(0.2)
    finally:
        supervisor.stopping.set()
        supervisor.join()
        for executor in executors:
            executor.shutdown(wait=False)

    outcomes: collections.Counter[str] = collections.Counter()
    for future, x, uid in futures.values():
        error = future.exception()
        if error is None:
            assert future.result() == (x * x, uid), "a success must carry the right value, computed as its owner"
            outcomes["succeeded"] += 1
        else:
            outcomes[f"failed: {type(error).__name__}: {str(error)[:80]}"] += 1

    states: collections.Counter[str] = collections.Counter()
    retried = 0
    for identity in identities:
        client = mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token)
        tasks = client.list_tasks(limit=10_000)
        assert len(tasks) == TASKS_PER_RESEARCHER
        for task in tasks:
            states[task.state] += 1
            retried += task.attempts > 0
    assert set(states) <= {"succeeded", "failed"}, f"non-terminal or unexpected states: {states}"
    assert states["succeeded"] == outcomes["succeeded"]
    print(f"\nchaos: submitted {total}, succeeded {outcomes['succeeded']}, retried {retried}, "
          f"failed {total - outcomes['succeeded']} {dict((k, v) for k, v in outcomes.items() if k != 'succeeded')}, "
          f"lost 0; events {events}; manager restarts {supervisor.restarts}")
    assert outcomes["succeeded"] >= total * 0.95, f"too many failures: {outcomes}"
