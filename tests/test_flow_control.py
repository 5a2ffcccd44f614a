"""Flow control, fairness and admin limits, with real processes (docs/reliability.md, "Limits and back-pressure").

A backlog far beyond the router's limits stays at the service while the
router's memory stays bounded; one researcher's backlog does not hold up
another's first task; and every limit an admin sets reaches the researcher's
future as its own error.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

import mep
from mep.endpoint.main import task_window
from mep.endpoint.settings import ProcessEndpointSettings, ProcessSettings
from mep.service.store import Store
from tests.harness import DOMAIN_STRIP, PYTHON, deployment, expression_mapping, task_log_of, wait_for

pytestmark = pytest.mark.root

MIB = 1024 * 1024


def gated(gate: str, payload: bytes) -> int:
    """Waits until the test creates ``gate``, so tasks pile up behind the ones running."""
    import os
    import time

    while not os.path.exists(gate):
        time.sleep(0.05)
    return len(payload)


def echo(value: object) -> object:
    return value


def _client(deploy, identity) -> mep.Client:
    return mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token)


def _count(client: mep.Client, *states: str) -> int:
    return len(client.list_tasks(states=states, limit=10_000))


class RssSampler:
    """Samples a process's resident set size (VmRSS in /proc/<pid>/status) until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kib


# Backlog for the memory test: 300 tasks of 1 MiB (300 MiB at the service, over 35 times the router's 8 MiB
# limit); the router's resident size must stay under 150 MiB (it is about 45 MiB before any task arrives; a
# router that buffered the backlog would pass 300 MiB). 50,000 x 1 MB would need 50 GB of disk and far longer
# than a test may take on a shared 2-core machine; the bound depends on the router's limits, not the backlog.
BACKLOG_TASKS = 300
ROUTER_BYTES = 8 * MIB
RSS_BOUND_MIB = 150
WORKERS = 2


def test_router_memory_stays_bounded_whatever_the_backlog(deploy, account_factory, gate) -> None:
    account = account_factory("mepflowbig")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP),
                                   settings={"max_queued_bytes": ROUTER_BYTES, "max_queued_tasks": 1000})
    identity = deploy.identity(f"{account.pw_name}@example.org")
    client = _client(deploy, identity)
    sampler = RssSampler(manager.router_pid)
    payload = b"x" * MIB
    try:
        # Small SUBMITs, resent late: on a loaded machine a 50 MiB SUBMIT resent every 3 s would bury the service.
        # Inline arguments (an uploaded one would not pass through the router: docs/protocol.md, §12b).
        with deploy.executor(identity, manager, user_endpoint_config={"workers": WORKERS}, batch_size=10,
                             resend_after=60.0, upload_args_above=2 * MIB) as executor:
            futures = [executor.submit(gated, str(gate), payload) for _ in range(BACKLOG_TASKS)]
        # Everything is accepted; with the gate shut, only what the credit allows has left the service.
        wait_for(lambda: _count(client, "running") == WORKERS, timeout=300, what="the first tasks to start")
        held = _count(client, "dispatched", "running")
        window = task_window(ProcessEndpointSettings(engine=ProcessSettings(workers=WORKERS)))  # its CREDIT
        most_held = ROUTER_BYTES // MIB + 1 + window  # the router's limit, one task of overshoot, the endpoint's
        print(f"gate shut: {held} tasks with the manager, {_count(client, 'waiting')} waiting at the service; "
              f"router RSS peak so far {sampler.peak_kib // 1024} MiB")
        assert held <= most_held
        assert _count(client, "waiting") >= BACKLOG_TASKS - most_held
        gate.touch()
        for future in futures:
            assert future.result(timeout=600) == MIB
    finally:
        peak = sampler.stop()
    print(f"router RSS peak over the whole run: {peak // 1024} MiB for a {BACKLOG_TASKS} MiB backlog")
    assert peak < RSS_BOUND_MIB * 1024


def test_one_researchers_backlog_does_not_hold_up_anothers_first_task(deploy, account_factory, gate) -> None:
    busy_account, other_account = account_factory("mepflowbusy"), account_factory("mepflowother")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP),
                                   settings={"max_queued_tasks": 40, "submitter_share": 0.25})
    busy = deploy.identity(f"{busy_account.pw_name}@example.org")
    other = deploy.identity(f"{other_account.pw_name}@example.org")
    busy_client = _client(deploy, busy)
    with deploy.executor(busy, manager, user_endpoint_config={"workers": 1}) as executor:
        backlog = [executor.submit(gated, str(gate), b"") for _ in range(300)]
    wait_for(lambda: _count(busy_client, "running") == 1, timeout=120, what="the busy researcher's first task")
    with deploy.executor(other, manager) as executor:
        first = executor.submit(echo, "mine")
    # The hang guard only: without fairness the task would wait behind all 300, which never finish while gated.
    assert first.result(timeout=120) == "mine"
    completed_before = 300 - _count(busy_client, "waiting", "dispatched", "running")
    print(f"the busy researcher's tasks completed before the other's first result: {completed_before} of 300")
    assert completed_before == 0  # the bound: its first task waited for none of the backlog
    gate.touch()
    assert [future.result(timeout=300) for future in backlog] == [0] * 300


def test_fair_dispatch_seeks_an_index_at_fifty_thousand_tasks() -> None:
    """Store.waiting_tasks deals across submitters without scanning the table, at the issue's backlog size."""
    directory = Path(tempfile.mkdtemp(prefix="mep-store-", dir="/var/tmp"))
    store = Store(directory / "mep.db")
    endpoint = str(uuid.uuid4())
    try:
        with store.transaction():
            for number in range(50_000):
                store.add_task(str(uuid.uuid4()), endpoint, "busy", "f", b"a", "{}", "{}", 0.0)
            late = str(uuid.uuid4())
            store.add_task(late, endpoint, "late", "f", b"a", "{}", "{}", 0.0)
        batch = store.waiting_tasks(endpoint, 10)
        assert [task.submitter_id for task in batch[:2]] == ["busy", "late"] and batch[1].task_id == late
        assert [task.submitter_id for task in store.waiting_tasks(endpoint, 1, after="busy")] == ["late"]
        assert [task.submitter_id for task in store.waiting_tasks(endpoint, 3, exclude=frozenset({"busy"}))] == ["late"]
        for sql, values in (
                ("SELECT submitter_id FROM tasks WHERE endpoint_id=? AND state='waiting' AND submitter_id>?"
                 " ORDER BY submitter_id LIMIT 1", (endpoint, "")),
                ("SELECT id FROM tasks WHERE endpoint_id=? AND state='waiting' AND submitter_id=?"
                 " ORDER BY created_at LIMIT 5", (endpoint, "busy")),
                ("SELECT count(*) FROM tasks WHERE submitter_id=? AND state IN ('waiting','dispatched','running')",
                 ("busy",)),
                ("SELECT coalesce(sum(length(result_payload)), 0) FROM tasks WHERE submitter_id=?"
                 " AND result_payload IS NOT NULL", ("busy",))):
            plan = " ".join(row[-1] for row in store.db.execute("EXPLAIN QUERY PLAN " + sql, values))
            assert plan.startswith("SEARCH tasks USING INDEX tasks_") and "TEMP B-TREE" not in plan, plan
    finally:
        store.close()
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


def test_queued_task_and_result_byte_limits_per_identity(router_account, account_factory, gate) -> None:
    account = account_factory("mepflowquota")
    with deployment(None, "--max-queued-tasks", "3", "--max-result-bytes", "10000") as deploy:
        manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
        identity = deploy.identity(f"{account.pw_name}@example.org")
        client = _client(deploy, identity)
        with deploy.executor(identity, manager) as executor:
            futures = [executor.submit(gated, str(gate), b"") for _ in range(5)]
        for future in futures[3:]:
            with pytest.raises(mep.QuotaExceededError, match=r"3 unfinished tasks.*\(3\)"):
                future.result(timeout=60)
        gate.touch()
        assert [future.result(timeout=120) for future in futures[:3]] == [0, 0, 0]

        # Two results of 8,000 bytes left uncollected (their submitter is gone) exceed the 10,000-byte limit.
        script = (
            "import os, mep\n"
            "def slow_result():\n"
            "    import time\n"
            "    time.sleep(2)\n"
            "    return b'r' * 8000\n"
            f"with mep.Executor({manager.endpoint_id!r}, service={deploy.address!r}, token={identity.token!r},"
            f" service_key={deploy.service_key!r}) as executor:\n"
            "    futures = [executor.submit(slow_result) for _ in range(2)]\n"
            "print(' '.join(future.task_id for future in futures), flush=True)\n"
            "os._exit(0)  # gone before the results arrive: they stay stored, uncollected\n")
        run = subprocess.run([PYTHON, "-P", "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
        assert run.returncode == 0, run.stderr
        task_ids = run.stdout.split()
        wait_for(lambda: all(client.get_task(task_id).state == "succeeded" for task_id in task_ids), timeout=120,
                 what="the uncollected results")
        with deploy.executor(identity, manager) as executor:
            refused = executor.submit(echo, 1)
        with pytest.raises(mep.QuotaExceededError, match="uncollected results hold 1[0-9]{4} bytes"):
            refused.result(timeout=60)
        client.acknowledge(task_ids)
        with deploy.executor(identity, manager) as executor:
            assert executor.submit(echo, 2).result(timeout=60) == 2


def test_endpoints_per_account_limit_refuses_the_spawn(deploy, account_factory) -> None:
    account = account_factory("mepflowendpoints")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings={"max_endpoints_per_account": 1})
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 1}) as executor:
        assert executor.submit(echo, "first").result(timeout=60) == "first"
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 2}) as executor:
        with pytest.raises(mep.QuotaExceededError, match=r"already runs 1 user endpoint.*max_endpoints_per_account"):
            executor.submit(echo, "second").result(timeout=60)
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 1}) as executor:
        assert executor.submit(echo, "reused").result(timeout=60) == "reused"


def test_spawns_beyond_the_limit_wait_their_turn(deploy, account_factory) -> None:
    accounts = [account_factory(f"mepflowspawn{n}") for n in range(3)]
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings={"max_concurrent_spawns": 1})
    manager.process.stop()  # so that the three tasks reach the next manager in one dispatch: three spawns at once
    executors = [deploy.executor(deploy.identity(f"{account.pw_name}@example.org"), manager) for account in accounts]
    futures = [executor.submit(echo, account.pw_name) for executor, account in zip(executors, accounts)]
    for executor in executors:
        executor.shutdown()  # waits for the service to have accepted the task
    manager.start()
    assert [future.result(timeout=120) for future in futures] == [account.pw_name for account in accounts]
    assert "2 group(s) wait for a spawn slot (max_concurrent_spawns is 1)" in manager.log()


def test_failed_authentications_are_throttled_per_address(router_account, account_factory) -> None:
    account = account_factory("mepflowauth")
    with deployment(None, "--max-auth-failures", "3", "--auth-failure-window", "30") as deploy:
        manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
        identity = deploy.identity(f"{account.pw_name}@example.org")
        guesser = mep.Client(service=deploy.address, service_key=deploy.service_key, token="mep_guess")
        for _ in range(3):
            with pytest.raises(mep.AuthenticationError, match="unknown or has been revoked"):
                guesser.list_tasks()
        # From the same address even a good token is refused for a while, with its own error.
        with pytest.raises(mep.AuthenticationThrottledError, match=r"too many failed authentications.*refused for"):
            _client(deploy, identity).list_tasks()
        with deploy.executor(identity, manager) as executor:
            refused = executor.submit(echo, 1)
        with pytest.raises(mep.AuthenticationThrottledError):
            refused.result(timeout=60)
        assert "refusing token-bearing requests from 127.0.0.1 for 30 s" in deploy.service.log()


def test_every_task_of_a_fast_batch_is_reported_started_and_runs_once(deploy, account_factory) -> None:
    """Batched windows, and starts carried inside RESULTS: each of many quick tasks still reaches the service as
    started (its ``started_at``), completes once, and the router's task log has it routed before its outcome."""
    account = account_factory("mepflowfast")
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager, user_endpoint_config={"workers": 2}) as executor:
        futures = [executor.submit(echo, n) for n in range(200)]
        assert [future.result(timeout=300) for future in futures] == list(range(200))
    infos = {info.task_id: info for info in _client(deploy, identity).list_tasks(limit=1000)}
    for future in futures:
        info = infos[future.task_id]
        assert info.state == "succeeded" and info.started_at and info.completed_at >= info.started_at
    # The router's task log: each task routed once, and before its one outcome.
    routed: dict[str, int] = {}
    outcomes: dict[str, list[int]] = {}
    for line_number, line in enumerate(task_log_of(manager.config_path).read_text().splitlines()):
        record = json.loads(line)
        for task_id in record.get("task_ids", []):
            if record["outcome"] == "routed":
                assert task_id not in routed
                routed[task_id] = line_number
            elif record["outcome"] != "accepted":
                outcomes.setdefault(task_id, []).append(line_number)
    for future in futures:
        assert len(outcomes[future.task_id]) == 1 and routed[future.task_id] < outcomes[future.task_id][0]
