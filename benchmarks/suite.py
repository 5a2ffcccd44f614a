"""mep's benchmark suite: mep and its baselines measured in the same run, alternating trials.

    /opt/mep/venv/bin/python -m benchmarks.suite [--quick] [--only throughput,roundtrip,...] [--profile]

Run from the repository root, as root (it creates the accounts tasks run as, and removes them), with the
interpreter of the venv mep is installed in: every account execs it. Prints one table and writes JSON
(``benchmarks/results/<UTC date and time>.json`` unless ``--output``). Nothing is asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
# The endpoints run the installed mep: so must this process, so the checkout goes after site-packages
# (it is still needed for tests/harness.py and this package).
sys.path[:] = [entry for entry in sys.path
               if Path(entry or ".").resolve() not in (REPOSITORY, REPOSITORY / "benchmarks")] + [str(REPOSITORY)]

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks import coldstart, payloads, profile, report, roundtrip, slurm, throughput, users  # noqa: E402
from benchmarks.deploy import Lab  # noqa: E402

SECTIONS = ("throughput", "roundtrip", "cold_start", "users", "payloads", "slurm")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def settings(options: argparse.Namespace) -> dict[str, Any]:
    """Counts for a full run, or the tiny ones of ``--quick`` (the CI smoke run: proves the code, not speed)."""
    if options.quick:
        chosen = {"tasks": 100, "trials": 1, "workers": [2], "calls": 10, "cold_trials": 2, "users": 3,
                  "payload_trials": 1, "slurm_tasks": 50, "slurm_trials": 1, "profile_tasks": 200}
    else:
        chosen = {"tasks": 10_000, "trials": 5, "workers": [2, 4, 8], "calls": 1000, "cold_trials": 20,
                  "users": 100, "payload_trials": 3, "slurm_tasks": 2000, "slurm_trials": 3,
                  "profile_tasks": 10_000}
    for name in ("tasks", "trials", "users", "cold_trials"):
        if getattr(options, name) is not None:
            chosen[name] = getattr(options, name)
    if options.workers:
        chosen["workers"] = [int(count) for count in options.workers.split(",")]
    return chosen


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        memory_kib = int(handle.readline().split()[1])
    versions = {name: importlib.metadata.version(name) for name in ("mep", "parsl", "pyzmq", "dill", "msgspec")}
    return {"hostname": platform.node(), "cpus": os.cpu_count(), "cpu_model": model,
            "memory_gib": round(memory_kib / 1024 / 1024, 1), "kernel": platform.release(),
            "python": platform.python_version(), "versions": versions}


def run_sections(lab: Lab, chosen: list[str], counts: dict[str, Any], quick: bool,
                 save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run the chosen sections in order; ``save`` gets the results so far after each (a late failure
    loses nothing measured before it)."""
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "throughput": lambda: throughput.run(lab, counts["tasks"], counts["trials"], counts["workers"]),
        "roundtrip": lambda: roundtrip.run(lab, counts["calls"], max(1, min(counts["trials"], 5))),
        "cold_start": lambda: coldstart.run(lab, counts["cold_trials"]),
        "users": lambda: users.run(lab, counts["users"]),
        "payloads": lambda: payloads.run(lab, counts["payload_trials"], quick),
        "slurm": lambda: slurm.run(lab, counts["slurm_tasks"], counts["slurm_trials"]),
        "profile": lambda: profile.run(lab, counts["profile_tasks"]),
    }
    results: dict[str, Any] = {}
    for name in chosen:
        start = time.perf_counter()
        print(f"... {name}", file=sys.stderr, flush=True)
        results[name] = runners[name]()
        results[name]["elapsed_s"] = time.perf_counter() - start
        save(results)
    return results


TABLES = {"throughput": throughput.table, "roundtrip": roundtrip.table, "cold_start": coldstart.table,
          "users": users.table, "payloads": payloads.table, "slurm": slurm.table, "profile": profile.table}


def print_table(results: dict[str, Any]) -> None:
    rows = [("measurement", "median", "")]
    for name in results["sections"]:
        rows += TABLES[name](results["sections"][name])
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    meta = results["meta"]
    print(f"\nmep benchmark suite, {meta['started']} on {meta['machine']['hostname']} "
          f"({meta['machine']['cpus']} CPUs), load average {meta['load_average_start']} at start, "
          f"{meta['load_average_end']} at end{' (quick: counts too small to mean anything)' if meta['quick'] else ''}")
    for number, row in enumerate(rows):
        print(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]}".rstrip())
        if number == 0:
            print("-" * (sum(widths) + 30))
    print("\ntargets (same-run ratios):")
    for figure, wanted, measured, met in report.target_rows(results["sections"]):
        print(f"  {figure}: {measured} (target {wanted}) {'met' if met == 'yes' else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts, one trial: the CI smoke run")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections (default all: {','.join(SECTIONS)}; also: profile)")
    parser.add_argument("--profile", action="store_true", help="also run the py-spy profile section")
    parser.add_argument("--tasks", type=int, help="no-op tasks per throughput trial (default 10,000)")
    parser.add_argument("--trials", type=int, help="throughput trials per system (default 5)")
    parser.add_argument("--cold-trials", type=int, help="cold start trials of each kind (default 20)")
    parser.add_argument("--users", type=int, help="accounts in the users section (default 100)")
    parser.add_argument("--workers", help="comma-separated worker counts for throughput (default 2,4,8)")
    parser.add_argument("--output", type=Path, help="JSON file (default benchmarks/results/<date>.json)")
    options = parser.parse_args()
    chosen = [name.strip() for name in options.only.split(",") if name.strip()]
    if options.profile and "profile" not in chosen:
        chosen.append("profile")
    unknown = set(chosen) - set(TABLES)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(TABLES)}")
    counts = settings(options)
    started = datetime.datetime.now(datetime.UTC)
    meta: dict[str, Any] = {"started": started.isoformat(timespec="seconds"), "quick": options.quick,
                            "counts": counts, "machine": machine(), "load_average_start": os.getloadavg()}
    output = options.output or RESULTS_DIR / f"{started.strftime('%Y-%m-%dT%H%M%SZ')}{'-quick' if options.quick else ''}.json"
    output.parent.mkdir(parents=True, exist_ok=True)

    def save(sections: dict[str, Any]) -> dict[str, Any]:
        meta["load_average_end"] = os.getloadavg()
        meta["elapsed_s"] = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
        results = {"meta": meta, "sections": sections}
        output.write_text(json.dumps(results, indent=1))
        return results

    with Lab() as lab:
        sections = run_sections(lab, chosen, counts, options.quick, save)
    print_table(save(sections))
    print(f"\nwritten to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
