"""Throughput: no-op tasks submitted at once, every result awaited; mep and its baselines alternate.

With 2 workers: mep (multi-user, as a mapped account), mep single-user, mep's htex engine, bare HTEX
(unencrypted, its default, and encrypted as mep's engine runs it), mep's htex engine driven directly in
this process (no SDK, service, router or endpoint loop: what the engine itself costs) and
ProcessPoolExecutor; with 4 and 8
workers: mep, HTEX, ProcessPoolExecutor. CPU per task of each part comes from /proc (utime+stime).
"""

from __future__ import annotations

from typing import Any

from benchmarks.deploy import Lab, Target
from benchmarks.measure import alternate, cpu_per_task_us, run_batch, summary, timed_batch


def targets_for(lab: Lab, workers: int) -> list[tuple[str, Target]]:
    found = [("mep", lab.mep("multi-user", workers)), ("htex", lab.htex(workers)), ("pool", lab.pool(workers))]
    if workers == 2:
        found += [("mep_single_user", lab.mep("single-user", workers)), ("mep_htex_engine", lab.mep("htex", workers)),
                  ("htex_encrypted", lab.htex(workers, encrypted=True)),
                  ("mep_htex_engine_alone", lab.engine_alone(workers))]
    return found


def run(lab: Lab, tasks: int, trials: int, worker_counts: list[int]) -> dict[str, Any]:
    result: dict[str, Any] = {"tasks": tasks, "trials": trials, "by_workers": {}}
    for workers in worker_counts:
        named = targets_for(lab, workers)
        for _, target in named:  # warm-up: endpoints spawned, workers started, caches filled
            run_batch(target, min(tasks, 1000))
        trial_lists = alternate([target for _, target in named], trials, lambda target: timed_batch(target, tasks))
        rows = {}
        for (name, target), runs in zip(named, trial_lists, strict=True):
            rows[name] = {"label": target.label, "tasks_per_s": summary([tasks / t.seconds for t in runs]),
                          "cpu_us_per_task": cpu_per_task_us(runs, tasks)}
        ratios = {f"{name}/htex": rows[name]["tasks_per_s"]["median"] / rows["htex"]["tasks_per_s"]["median"]
                  for name in rows if name != "htex"}
        result["by_workers"][str(workers)] = {"rows": rows, "ratios": ratios}
    return result


def table(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    lines = []
    for workers, block in result["by_workers"].items():
        for name, row in block["rows"].items():
            runs = row["tasks_per_s"]["runs"]
            ratio = block["ratios"].get(f"{name}/htex")
            lines.append((f"throughput {workers}w  {row['label']}", f"{row['tasks_per_s']['median']:,.0f} tasks/s",
                          (f"{ratio:.2f}x HTEX  " if ratio else "") + "[" + ", ".join(f"{r:,.0f}" for r in runs) + "]"))
            cpu = ", ".join(f"{role} {us:,.0f}" for role, us in row["cpu_us_per_task"].items())
            lines.append(("    CPU us per task", f"{sum(row['cpu_us_per_task'].values()):,.0f} us", cpu))
    return lines
