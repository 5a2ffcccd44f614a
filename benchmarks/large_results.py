"""Large results end to end: 1 KiB, 1 MiB, 100 MiB and 1 GiB (full run only), read in place and fetched
through the service, with the peak memory of service, router, user endpoint, worker and SDK.

    cd <repository> && /opt/mep/venv/bin/python -m benchmarks.large_results [--quick | --smoke] [--arguments] [--output FILE]

Run as root with the venv mep is installed in (as ``benchmarks.suite``). Each size gets a fresh service and
manager. The shipped local template's large-result threshold (1 MiB) applies: 1 KiB travels inline, the rest
is kept in a file in the account's ~/.mep/results. For each size, one task is read in place
(``read_results_locally=True``, the default) and one fetched in 1 MiB chunks through service and router
(``read_results_locally=False``). Before each of those tasks every process's RSS high-water mark is reset
(``/proc/PID/clear_refs`` = 5), so each peak (VmHWM, MiB) is that task's own; PSS is sampled every 20 ms as
well, except this process's (the worker shares pages with the process it was forked from, which RSS counts
in full). "worker" is the
largest of the account's processes other than the endpoint (its workers and their forker); "sdk" is this
process. The task returns ``bytes(size)``, so a process that holds the result once shows about ``size``.
``--quick`` leaves out 1 GiB (which needs about 3 GiB of memory and 1 GiB of disk); ``--smoke`` runs 1 KiB
and 2 MiB only (the CI smoke run: it proves the code runs). Nothing is asserted. The default heartbeat
interval (10 s) on both service and manager.

With ``--arguments`` each size is one task taking an argument of that size (``swallow``): the Executor's
default upload threshold (1 MiB) applies, so 1 KiB travels inline and the rest is uploaded in 1 MiB chunks,
fsynced on the service, then fetched by the endpoint into a file of the account before the task runs. The
endpoint and its worker each hold the argument whole once (the engine hands it over as bytes); the peaks of
service and router show what relaying it costs them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mep.sdk.executor import Executor
from tests.accounts import unix_account
from tests.harness import DOMAIN_STRIP, _pid_with_title, deployment, expression_mapping, processes_of_uid

from benchmarks.deploy import ensure_router_account
from benchmarks.tasks import produce, swallow

KIB, MIB, GIB = 1024, 1024**2, 1024**3
SIZES = [("1 KiB", KIB), ("1 MiB", MIB), ("100 MiB", 100 * MIB), ("1 GiB", GIB)]
SMOKE_SIZES = [("1 KiB", KIB), ("2 MiB", 2 * MIB)]


def status_kib(pid: int, field: str, where: str = "status") -> int:
    try:
        with open(f"/proc/{pid}/{where}") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:  # the process ended
        pass
    return 0


def reset_peak(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")  # VmHWM := VmRSS
    except OSError:
        pass


Pids = dict[str, Callable[[], list[int]]]  # a process's name -> its pids now (the workers change)


class PssSampler:
    """The highest PSS of each process while the block runs (sampled every 20 ms)."""

    def __init__(self, pids: Pids) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pids in self.pids.items():
                self.peak[name] = max(self.peak[name], *(status_kib(pid, "Pss", "smaps_rollup") for pid in pids()))
            time.sleep(0.02)

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


def one_task(executor: Executor, size: int, pids: Pids) -> dict[str, Any]:
    for each in pids.values():
        for pid in each():
            reset_peak(pid)
    # Not this process's own PSS: a thread sampling it can't run while the loading thread holds the GIL.
    with PssSampler({name: each for name, each in pids.items() if name != "sdk"}) as sampler:
        started = time.perf_counter()
        value = executor.submit(produce, size).result(timeout=3600)
        seconds = time.perf_counter() - started
    assert len(value) == size
    del value
    # A worker started during the task has its own peak since it began (no reset needed).
    return {"seconds": round(seconds, 3), "mb_per_s": round(size / seconds / 1e6, 1),
            "peak_rss_mib": {name: mib(max(status_kib(pid, "VmHWM") for pid in each())) for name, each in pids.items()},
            "peak_pss_mib": {name: mib(kib) for name, kib in sampler.peak.items()}}


def one_size(size: int) -> dict[str, Any]:
    # The default heartbeat (10 s, a 30 s lease), not the tests' 1 s: on a loaded machine writing a GiB can
    # keep a process from running for more than 3 s.
    with unix_account("mepbig") as account, deployment(None, "--heartbeat-interval", "10") as deploy:
        manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings={"heartbeat_interval": 10.0})
        identity = deploy.identity(f"{account.pw_name}@example.org")
        row: dict[str, Any] = {}
        for mode, local in (("in_place", True), ("through_service", False)):
            with Executor(manager.endpoint_id, service=deploy.address, token=identity.token,
                          service_key=deploy.service_key, read_results_locally=local) as executor:
                executor.submit(produce, 1).result(timeout=300)  # the endpoint is up: its start is not measured
                endpoint = _pid_with_title(f"mep-endpoint {account.pw_name} ")
                pids: Pids = {
                    "service": lambda: [deploy.service.popen.pid], "router": lambda: [manager.router_pid],
                    "endpoint": lambda: [endpoint],
                    "worker": lambda: [pid for pid in processes_of_uid(account.pw_uid) if pid != endpoint] or [0],
                    "sdk": lambda: [os.getpid()]}
                row[mode] = one_task(executor, size, pids)
        row["kept_in_file"] = any((Path(account.pw_dir) / ".mep" / "results").glob("*.result"))
        return row


def one_argument_size(size: int) -> dict[str, Any]:
    with unix_account("mepbig") as account, deployment(None, "--heartbeat-interval", "10") as deploy:
        manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings={"heartbeat_interval": 10.0})
        identity = deploy.identity(f"{account.pw_name}@example.org")
        with Executor(manager.endpoint_id, service=deploy.address, token=identity.token,
                      service_key=deploy.service_key) as executor:
            executor.submit(produce, 1).result(timeout=300)  # the endpoint is up: its start is not measured
            endpoint = _pid_with_title(f"mep-endpoint {account.pw_name} ")
            data = bytes(size)
            baseline = {name: status_kib(pid, "VmHWM") for name, pid in
                        (("service", deploy.service.popen.pid), ("router", manager.router_pid), ("endpoint", endpoint))}
            started = time.perf_counter()
            assert executor.submit(swallow, data).result(timeout=3600) == size
            seconds = time.perf_counter() - started
            del data
        uploaded = list((deploy.state_dir / "uploads").glob("*/*"))
        return {"seconds": round(seconds, 3), "mb_per_s": round(size / seconds / 1e6, 1),
                "peak_mib": {name: round(status_kib(pid, "VmHWM") / 1024, 1) for name, pid in
                             (("service", deploy.service.popen.pid), ("router", manager.router_pid),
                              ("endpoint", endpoint))},
                "peak_growth_mib": {name: round((status_kib(pid, "VmHWM") - baseline[name]) / 1024, 1)
                                    for name, pid in (("service", deploy.service.popen.pid),
                                                      ("router", manager.router_pid), ("endpoint", endpoint))},
                "uploaded": bool(uploaded)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="leave out 1 GiB")
    sizes.add_argument("--smoke", action="store_true", help="1 KiB and 2 MiB only: proves the code runs")
    parser.add_argument("--arguments", action="store_true", help="large arguments instead of large results")
    parser.add_argument("--output", type=Path, help="write the JSON here too")
    args = parser.parse_args(argv)
    ensure_router_account()
    chosen = SMOKE_SIZES if args.smoke else SIZES[:-1] if args.quick else SIZES
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "load_average": [round(load, 2) for load in os.getloadavg()], "sizes": {}}
    for label, size in chosen:
        if args.arguments:
            row = report["sizes"][label] = one_argument_size(size)
            print(f"{label:>8}: {row['seconds']:.2f} s ({row['mb_per_s']} MB/s); peak MiB {row['peak_mib']}, grew "
                  f"{row['peak_growth_mib']}; uploaded: {row['uploaded']}", flush=True)
            continue
        row = report["sizes"][label] = one_size(size)
        for mode in ("in_place", "through_service"):
            print(f"{label:>8} {mode:>15}: {row[mode]['seconds']:.2f} s ({row[mode]['mb_per_s']} MB/s); peak RSS "
                  f"MiB {row[mode]['peak_rss_mib']}; peak PSS MiB {row[mode]['peak_pss_mib']}", flush=True)
        print(f"{label:>8} kept in a file: {row['kept_in_file']}", flush=True)
    print(f"load average after: {os.getloadavg()}", flush=True)
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
