"""Slurm: the shipped Slurm template on the single-node Slurm of this machine (``scripts/slurm-setup.sh``):
the first result of a cold endpoint (its block job submitted, scheduled, started and connected), with
the cold-start phases, then throughput of no-op tasks once the block runs (2 workers per node).
Skipped, with the reason, when no Slurm node is usable."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from benchmarks.coldstart import one_trial, phase_medians
from benchmarks.deploy import Lab, stop_endpoints
from benchmarks.measure import run_batch, summary


def unusable_reason() -> str:
    """Why Slurm can't be benchmarked here, or "" if a node is idle, mixed or allocated."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return "Slurm is not installed (sinfo not found); run scripts/slurm-setup.sh as root"
    states = subprocess.run([sinfo, "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout.split()
    if not states or states[0] not in ("idle", "mixed", "allocated"):
        return f"no usable Slurm node (sinfo: {' '.join(states) or 'nothing'}); run scripts/slurm-setup.sh as root"
    return ""


def run(lab: Lab, tasks: int, trials: int) -> dict[str, Any]:
    reason = unusable_reason()
    if reason:
        return {"skipped": reason}
    target = lab.mep("slurm", 2)
    first = one_trial(target, stop=False)
    run_batch(target, min(tasks, 1000))  # warm-up, with the block running
    rates = [tasks / run_batch(target, tasks) for _ in range(trials)]
    stop_endpoints(target, timeout=120)  # the endpoint cancels its block job as it goes
    return {"first_result_ms": first["total"] * 1e3, "phases_ms": phase_medians([first]), "tasks": tasks,
            "trials": trials, "warm_tasks_per_s": summary(rates)}


def table(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    if "skipped" in result:
        return [("slurm", "skipped", result["skipped"])]
    lines = [("slurm: first result, cold endpoint", f"{result['first_result_ms']:,.0f} ms", "block job included")]
    lines += [(f"    {name}", f"{value:,.1f} ms", "") for name, value in result["phases_ms"].items()]
    rates = result["warm_tasks_per_s"]
    lines.append(("slurm: throughput once warm, 2 workers", f"{rates['median']:,.0f} tasks/s",
                  "[" + ", ".join(f"{r:,.0f}" for r in rates["runs"]) + "]"))
    return lines
