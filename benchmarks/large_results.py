"""Large results end to end: 1 KiB, 1 MiB, 100 MiB and 1 GiB (full run only), read in place and fetched
through the service, with the peak memory (VmHWM) of service, router and user endpoint; with
``--arguments``, large arguments the other way (uploaded to the service, fetched by the endpoint).

    cd <repository> && /opt/mep/venv/bin/python -m benchmarks.large_results [--quick] [--arguments] [--output FILE]

Run as root with the venv mep is installed in (as ``benchmarks.suite``). Each size gets a fresh service and
manager, so each peak is that size's own. The shipped local template's large-result threshold (1 MiB)
applies: 1 KiB travels inline, the rest is kept in a file in the account's ~/.mep/results. For each size,
one task is read in place (``read_results_locally=True``, the default) and one fetched in 1 MiB chunks
through service and router (``read_results_locally=False``). The endpoint's peak includes receiving the
result from its worker (the worker hands it over whole); its VmRSS is also sampled during each task, so
the two modes' growth, side by side, shows what serving the chunks adds. ``--quick`` leaves out 1 GiB (it needs about 4 GiB of memory for
worker, endpoint and client, and 2 GiB of disk). Nothing is asserted. The service runs with the default
heartbeat interval (10 s) on both service and manager.

With ``--arguments`` each size is one task taking an argument of that size (``swallow``): the Executor's
default upload threshold (1 MiB) applies, so 1 KiB travels inline and the rest is uploaded in 1 MiB chunks,
fsynced on the service, then fetched by the endpoint into a file of the account before the task runs. The
endpoint and its worker each hold the argument whole once (the engine hands it over as bytes); the peaks of
service and router show what relaying it costs them.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mep.sdk.executor import Executor
from tests.accounts import unix_account
from tests.harness import DOMAIN_STRIP, _pid_with_title, deployment, expression_mapping

from benchmarks.deploy import ensure_router_account
from benchmarks.tasks import produce, swallow

KIB, MIB, GIB = 1024, 1024**2, 1024**3
SIZES = [("1 KiB", KIB), ("1 MiB", MIB), ("100 MiB", 100 * MIB), ("1 GiB", GIB)]


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class RssSampler:
    """The highest VmRSS of one process while the block runs (sampled every 10 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = status_kib(pid, "VmRSS")
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))
            time.sleep(0.01)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def one_size(size: int) -> dict[str, Any]:
    # The default heartbeat (10 s, a 30 s lease), not the tests' 1 s: on a loaded machine a worker handing a
    # GiB to its endpoint can keep the endpoint's loop from running for more than 3 s.
    with unix_account("mepbig") as account, deployment(None, "--heartbeat-interval", "10") as deploy:
        manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), settings={"heartbeat_interval": 10.0})
        identity = deploy.identity(f"{account.pw_name}@example.org")
        row: dict[str, Any] = {}
        for mode, local in (("in_place", True), ("through_service", False)):
            with Executor(manager.endpoint_id, service=deploy.address, token=identity.token,
                          service_key=deploy.service_key, read_results_locally=local) as executor:
                executor.submit(produce, 1).result(timeout=300)  # the endpoint is up: its start is not measured
                endpoint = _pid_with_title(f"mep-endpoint {account.pw_name} ")
                with RssSampler(endpoint) as sampler:
                    started = time.perf_counter()
                    value = executor.submit(produce, size).result(timeout=3600)
                    seconds = time.perf_counter() - started
                assert len(value) == size
                del value
            row[mode] = {"seconds": round(seconds, 3), "mb_per_s": round(size / seconds / 1e6, 1),
                         "endpoint_rss_growth_mib": round((sampler.peak - sampler.baseline) / 1024, 1)}
        row["peak_mib"] = {name: round(status_kib(pid, "VmHWM") / 1024, 1) for name, pid in
                           (("service", deploy.service.popen.pid), ("router", manager.router_pid),
                            ("endpoint", endpoint))}
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
            with RssSampler(endpoint) as sampler:
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
                "endpoint_rss_growth_mib": round((sampler.peak - sampler.baseline) / 1024, 1),
                "uploaded": bool(uploaded)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="leave out 1 GiB")
    parser.add_argument("--arguments", action="store_true", help="large arguments instead of large results")
    parser.add_argument("--output", type=Path, help="write the JSON here too")
    args = parser.parse_args(argv)
    ensure_router_account()
    report = {}
    for label, size in SIZES[:-1] if args.quick else SIZES:
        if args.arguments:
            report[label] = row = one_argument_size(size)
            print(f"{label:>8}: {row['seconds']:.2f} s ({row['mb_per_s']} MB/s); peak MiB {row['peak_mib']}, grew "
                  f"{row['peak_growth_mib']}; uploaded: {row['uploaded']}", flush=True)
            continue
        report[label] = one_size(size)
        row = report[label]
        print(f"{label:>8}: in place {row['in_place']['seconds']:.2f} s, through the service "
              f"{row['through_service']['seconds']:.2f} s ({row['through_service']['mb_per_s']} MB/s); peak MiB "
              f"{row['peak_mib']}; endpoint RSS grew {row['in_place']['endpoint_rss_growth_mib']} / "
              f"{row['through_service']['endpoint_rss_growth_mib']} MiB; file: {row['kept_in_file']}", flush=True)
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
