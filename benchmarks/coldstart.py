"""Cold start: the first task of an identity whose account has no endpoint running, submit to result.

Each trial uses a new identity (so the manager makes a fresh mapping decision) mapped to a real account
whose previous endpoint was stopped (SIGTERM, then the spawner's ``endpoint_exited`` record), so every
trial forks, drops privileges, execs and imports a new endpoint and starts its workers.

The breakdown joins four clocks of this machine: the client's, the service's task timestamps, the
manager's audit log (``decision``, ``endpoint_started``; millisecond resolution) and the endpoint's own
log (``ready``; millisecond resolution). What happens inside the endpoint between its exec and ``ready``
is not logged, so it is split with two probes run as the same account in fresh interpreters: how long
the interpreter takes to start, and how long ``import mep.endpoint.main`` takes; the rest is the engine
and its workers (and reading the boot document, validating the config).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from mep import Client, Executor

from benchmarks.deploy import Lab, MepTarget, audit_records, audit_size, iso_seconds, stop_endpoints
from benchmarks.tasks import noop

PHASES = (  # (name, from, to)
    ("client -> service accepted", "submitted", "received_at"),
    ("accepted -> mapping decision", "received_at", "decision"),
    ("decision -> endpoint forked, dropped, exec'd", "decision", "endpoint_started"),
    ("exec -> endpoint ready (imports, engine, workers)", "endpoint_started", "ready"),
    ("ready -> first result at service", "ready", "completed_at"),
    ("result at service -> client has it", "completed_at", "resolved"),
)
FIRST_RESULT_TIMEOUT = 300.0  # a Slurm block may queue
IMPORT_PROBE = "import time; t = time.perf_counter(); import mep.endpoint.main; print(time.perf_counter() - t)"


def _endpoint_ready_time(account_home: str, endpoint_id: str) -> float:
    """The endpoint log's ``ready`` line (``%(asctime)s``: local time, milliseconds after a comma)."""
    log = Path(account_home) / ".mep" / "endpoints" / endpoint_id / "endpoint.log"
    for line in log.read_text(errors="replace").splitlines():
        if " ready as " in line:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return 0.0


def one_trial(target: MepTarget, *, stop: bool = True) -> dict[str, float]:
    """One cold first task with a new identity; ``stop``: stop the endpoint afterwards (the next trial is cold)."""
    identity = target.deploy.identity(f"{target.account.pw_name}@example.org")
    seen = audit_size(target.manager)
    with Executor(target.manager.endpoint_id, service=target.deploy.address, token=identity.token,
                  service_key=target.deploy.service_key, user_endpoint_config=target.config) as executor:
        submitted, start = time.time(), time.perf_counter()
        future = executor.submit(noop)
        future.result(timeout=FIRST_RESULT_TIMEOUT)
        times: dict[str, float] = {"total": time.perf_counter() - start, "submitted": submitted,
                                   "resolved": time.time()}
    info = Client(service=target.deploy.address, service_key=target.deploy.service_key,
                  token=identity.token).get_task(future.task_id)
    times.update(received_at=info.received_at, started_at=info.started_at, completed_at=info.completed_at)
    for record in audit_records(target.manager, seen):
        if record.get("event") == "decision" and record.get("outcome") == "allowed":
            times["decision"] = iso_seconds(record["time"])
            if record.get("reused"):
                raise RuntimeError("the trial reused a running endpoint: it was not cold")
        elif record.get("event") == "endpoint_started":
            times["endpoint_started"] = iso_seconds(record["time"])
            times["ready"] = _endpoint_ready_time(target.account.pw_dir, record["endpoint_id"])
    if stop:
        stop_endpoints(target)
    return times


def phase_medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median milliseconds of each phase over the trials that recorded both its ends."""
    phases = {}
    for name, first, second in PHASES:
        spans = [(r[second] - r[first]) * 1e3 for r in runs if r.get(first) and r.get(second)]
        if spans:
            phases[name] = statistics.median(spans)
    return phases


def _as_account(target: MepTarget, *argv: str) -> list[str]:
    home = target.account.pw_dir
    return ["runuser", "-u", target.account.pw_name, "--", "env", "-i", f"HOME={home}",
            f"PATH={Path(sys.executable).parent}:/usr/bin:/bin", *argv]


def probes(target: MepTarget, repeats: int) -> dict[str, float]:
    """Median ms, as the account, fresh interpreters: interpreter start (``-c pass``, wall clock seen from
    outside, including runuser) and ``import mep.endpoint.main`` (timed inside)."""
    starts, imports = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(_as_account(target, sys.executable, "-c", "pass"), check=True, cwd="/")
        starts.append((time.perf_counter() - start) * 1e3)
        output = subprocess.run(_as_account(target, sys.executable, "-c", IMPORT_PROBE), check=True, cwd="/",
                                capture_output=True, text=True).stdout
        imports.append(float(output) * 1e3)
    return {"interpreter start incl. runuser (probe)": statistics.median(starts),
            "import mep.endpoint.main (probe)": statistics.median(imports)}


def run(lab: Lab, trials: int) -> dict[str, Any]:
    target = lab.mep("cold", 2)  # an account and manager of its own: stopping its endpoint disturbs no other
    runs = [one_trial(target) for _ in range(trials)]
    totals = [run["total"] * 1e3 for run in runs]
    phases = phase_medians(runs)
    return {"trials": trials, "total_ms": {"median": statistics.median(totals), "min": min(totals),
                                           "max": max(totals), "runs": totals},
            "phases_median_ms": phases, "probes_median_ms": probes(target, min(trials, 5))}


def table(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    total = result["total_ms"]
    lines = [("cold start, first task -> result", f"{total['median']:.0f} ms",
              f"median of {result['trials']}; min {total['min']:.0f}, max {total['max']:.0f}")]
    lines += [(f"    {name}", f"{value:.1f} ms", "") for name, value in result["phases_median_ms"].items()]
    lines += [(f"    {name}", f"{value:.1f} ms", "") for name, value in result["probes_median_ms"].items()]
    return lines
