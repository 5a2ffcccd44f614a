"""Users: many identities, each mapped to its own real account, one task each, through one manager.

Reported: time from the first submit until every result is in (every endpoint is cold, so this is
mostly spawning); then a second task each with every endpoint running; the PSS of the manager
(spawner + router) and of each idle user endpoint tree (every process of its account: endpoint,
worker forker, workers), from /proc/<pid>/smaps_rollup; and the manager's CPU per
routed task (utime + stime of spawner and router, from /proc/<pid>/stat), cold and warm.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

from mep import Executor
from tests.accounts import unix_account
from tests.harness import processes_of_uid

from benchmarks import procstat
from benchmarks.deploy import Lab, MepTarget, stop_endpoints
from benchmarks.tasks import noop

MIB = 1024 * 1024
SETTLE_SECONDS = 2.0  # let freshly started endpoints finish starting before their memory is read


def _one_task_each(executors: list[Executor]) -> float:
    start = time.perf_counter()
    futures = [executor.submit(noop) for executor in executors]
    for future in futures:
        future.result(timeout=600)
    return time.perf_counter() - start


def run(lab: Lab, users: int) -> dict[str, Any]:
    deploy = lab.deploy()
    manager = lab.new_manager()
    with contextlib.ExitStack() as accounts:
        targets = []
        for number in range(users):
            account = accounts.enter_context(unix_account(f"mepbu{number}"))
            targets.append(MepTarget("mep", deploy, manager, deploy.identity(f"{account.pw_name}@example.org"),
                                     account, {"workers": 2}))
        executors = [target.executor for target in targets]
        manager_pids = [manager.spawner_pid, manager.router_pid]
        cpu_start = procstat.cpu_seconds(manager_pids)
        cold_seconds = _one_task_each(executors)
        cpu_cold = procstat.cpu_seconds(manager_pids)
        warm_seconds = _one_task_each(executors)
        cpu_warm = procstat.cpu_seconds(manager_pids)
        time.sleep(SETTLE_SECONDS)
        trees = [procstat.pss_bytes(processes_of_uid(target.account.pw_uid)) / MIB for target in targets]
        processes = [len(processes_of_uid(target.account.pw_uid)) for target in targets]
        manager_pss = procstat.pss_bytes(manager_pids) / MIB
        for target in targets:
            target.close()
        for target in targets:
            stop_endpoints(target, timeout=60)
        manager.process.stop()  # before the accounts go
    return {
        "users": users,
        "all_results_cold_s": cold_seconds,
        "all_results_warm_s": warm_seconds,
        "manager_pss_mib": manager_pss,
        "endpoint_tree_pss_mib": {"median": statistics.median(trees), "min": min(trees), "max": max(trees),
                                  "total": sum(trees)},
        "endpoint_tree_processes_median": statistics.median(processes),
        "manager_cpu_ms_per_task_cold": (cpu_cold - cpu_start) / users * 1e3,
        "manager_cpu_ms_per_task_warm": (cpu_warm - cpu_cold) / users * 1e3,
    }


def table(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    trees = result["endpoint_tree_pss_mib"]
    return [
        (f"users: {result['users']} accounts, one task each, all results in", f"{result['all_results_cold_s']:.2f} s",
         "every endpoint cold"),
        ("    again, every endpoint running", f"{result['all_results_warm_s']:.2f} s", ""),
        ("    manager PSS (spawner + router)", f"{result['manager_pss_mib']:.1f} MiB", f"with {result['users']} endpoints"),
        ("    idle user endpoint tree PSS", f"{trees['median']:.1f} MiB",
         f"min {trees['min']:.1f}, max {trees['max']:.1f}, {result['endpoint_tree_processes_median']:.0f} processes"),
        ("    manager CPU per routed task, cold", f"{result['manager_cpu_ms_per_task_cold']:.2f} ms", "incl. the spawn"),
        ("    manager CPU per routed task, warm", f"{result['manager_cpu_ms_per_task_warm']:.2f} ms", ""),
    ]
