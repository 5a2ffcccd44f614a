"""Timing primitives shared by the sections: batches of tasks, CPU per task by part, summaries."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks import procstat
from benchmarks.deploy import Target
from benchmarks.tasks import noop

RESULT_TIMEOUT = 600.0


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (p99 of 1,000 values is the 990th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def run_batch(target: Target, count: int, fn: Callable[..., Any] = noop, args: tuple = ()) -> float:
    """Submit ``count`` tasks at once, wait for every result; seconds. A failed task stops the run."""
    start = time.perf_counter()
    futures = [target.submit(fn, *args) for _ in range(count)]
    for future in futures:
        future.result(timeout=RESULT_TIMEOUT)
    return time.perf_counter() - start


@dataclass
class Trial:
    seconds: float
    cpu: dict[str, float]  # CPU seconds each part used during the trial


def timed_batch(target: Target, count: int, fn: Callable[..., Any] = noop, args: tuple = ()) -> Trial:
    roles = target.roles()
    before = {role: procstat.cpu_seconds(pids) for role, pids in roles.items()}
    seconds = run_batch(target, count, fn, args)
    after = {role: procstat.cpu_seconds(pids) for role, pids in roles.items()}
    return Trial(seconds, {role: after[role] - before[role] for role in roles})


def alternate(targets: Sequence[Any], trials: int, run: Callable[[Any], Any]) -> list[list[Any]]:
    """Run every target once per trial, rotating the order each trial so drift and warm-up hit all alike;
    results[target index][trial]."""
    results: list[list[Any]] = [[] for _ in targets]
    for trial in range(trials):
        for offset in range(len(targets)):
            index = (trial + offset) % len(targets)
            results[index].append(run(targets[index]))
    return results


def cpu_per_task_us(trials: Sequence[Trial], count: int) -> dict[str, float]:
    """Median over trials of each part's CPU microseconds per task."""
    roles = trials[0].cpu.keys()
    return {role: statistics.median(trial.cpu[role] for trial in trials) / count * 1e6 for role in roles}
