"""Cold start: the first task of an identity whose account has no endpoint running, submit to result.

Each trial uses a new identity (so the manager makes a fresh mapping decision) mapped to a real account
whose previous endpoint was stopped (SIGTERM, then the spawner's ``endpoint_exited`` record), so every
trial forks, drops privileges, execs and imports a new endpoint and starts its workers.

Trials alternate between two configs: the same ``user_endpoint_config`` every time (a researcher
coming back: the endpoint may find its rendered config in the account's cache) and options never used
before (the template is rendered and validated from scratch). ``total_ms`` is the first kind.

The breakdown joins four clocks of this machine: the client's, the service's task timestamps, the
manager's audit log (``decision``, ``endpoint_started``; millisecond resolution) and the endpoint's own
log (millisecond resolution): its ``config ... in X ms`` line (where the config step began and ended),
``ready`` and the first ``task ... started``. Two probes run as the same account in fresh interpreters
split "exec -> config begins" further: how long the interpreter takes to start, and how long
``import mep.endpoint.main`` takes.
``benchmarks.suite --only cold_start --cold-trials N`` runs this section alone.
"""

from __future__ import annotations

import re
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
    ("exec -> endpoint ready (imports, config, engine)", "endpoint_started", "ready"),
    ("  exec -> config begins (interpreter, imports, boot document)", "endpoint_started", "config_begins"),
    ("  config (rendered, or read from the cache)", "config_begins", "config_ends"),
    ("  config -> ready (engine, forker started, channel)", "config_ends", "ready"),
    ("ready -> first task started (workers, routing)", "ready", "task_started"),
    ("task started -> result at service", "task_started", "completed_at"),
    ("result at service -> client has it", "completed_at", "resolved"),
)
FIRST_RESULT_TIMEOUT = 300.0  # a Slurm block may queue
IMPORT_PROBE = "import time; t = time.perf_counter(); import mep.endpoint.main; print(time.perf_counter() - t)"


_CONFIG_LINE = re.compile(r" config (rendered|read from the cache) in ([0-9.]+) ms")


def _log_time(line: str) -> float:
    """A text log line's ``%(asctime)s`` (local time, milliseconds after a comma) as Unix seconds."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _endpoint_times(account_home: str, endpoint_id: str) -> dict[str, float]:
    """From the endpoint's log: where its config step began and ended, ``ready``, its first task's start."""
    log = Path(account_home) / ".mep" / "endpoints" / endpoint_id / "endpoint.log"
    times: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        config = _CONFIG_LINE.search(line)
        if config and "config_ends" not in times:
            times["config_ends"] = _log_time(line)
            times["config_begins"] = times["config_ends"] - float(config.group(2)) / 1e3
            times["config_cached"] = float(config.group(1) != "rendered")
        elif " ready as " in line and "ready" not in times:
            times["ready"] = _log_time(line)
        elif " started" in line and " task " in line and "task_started" not in times:
            times["task_started"] = _log_time(line)
    return times


def one_trial(target: MepTarget, *, stop: bool = True, config: dict[str, Any] | None = None) -> dict[str, float]:
    """One cold first task with a new identity; ``stop``: stop the endpoint afterwards (the next trial is cold);
    ``config``: the ``user_endpoint_config`` (default: the target's)."""
    identity = target.deploy.identity(f"{target.account.pw_name}@example.org")
    seen = audit_size(target.manager)
    with Executor(target.manager.endpoint_id, service=target.deploy.address, token=identity.token,
                  service_key=target.deploy.service_key,
                  user_endpoint_config=target.config if config is None else config) as executor:
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
            times.update(_endpoint_times(target.account.pw_dir, record["endpoint_id"]))
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


def _summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    totals = [run["total"] * 1e3 for run in runs]
    return {"median": statistics.median(totals), "min": min(totals), "max": max(totals), "runs": totals,
            "config_cached": sum(int(run.get("config_cached", 0)) for run in runs)}


def run(lab: Lab, trials: int) -> dict[str, Any]:
    target = lab.mep("cold", 2)  # an account and manager of its own: stopping its endpoint disturbs no other
    repeated, new = [], []
    for trial in range(trials):  # alternating, so drift on the machine hits both kinds alike
        repeated.append(one_trial(target))
        # options no trial used before (within the template's idle_timeout range): nothing cached can serve
        new.append(one_trial(target, config={**target.config, "idle_timeout": 1000 + trial}))
    return {"trials": trials, "total_ms": _summary(repeated), "phases_median_ms": phase_medians(repeated),
            "new_config_total_ms": _summary(new), "new_config_phases_median_ms": phase_medians(new),
            "probes_median_ms": probes(target, min(trials, 5))}


def table(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    lines = []
    for kind, total_key, phases_key in (("same config as before", "total_ms", "phases_median_ms"),
                                        ("options never used before", "new_config_total_ms",
                                         "new_config_phases_median_ms")):
        total = result.get(total_key)
        if total is None:  # a run from before the two kinds
            continue
        lines.append((f"cold start, first task -> result ({kind})", f"{total['median']:.0f} ms",
                      f"median of {len(total['runs'])}; min {total['min']:.0f}, max {total['max']:.0f}; "
                      f"config from the cache in {total.get('config_cached', 0)}"))
        lines += [(f"    {name}", f"{value:.1f} ms", "") for name, value in result[phases_key].items()]
    lines += [(f"    {name}", f"{value:.1f} ms", "") for name, value in result["probes_median_ms"].items()]
    return lines
