"""Round trip: one no-op call at a time, submit to result, median and p99; mep's per-hop breakdown
comes from the service's own timestamps (``Client.list_tasks``: received, dispatched, started,
completed) beside the client's clock (same machine, same clock).

The calls are made in rounds that alternate between the systems (2 workers each)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from mep import Client

from benchmarks.deploy import Lab, MepTarget, Target
from benchmarks.measure import alternate, percentile
from benchmarks.tasks import noop

ROUNDS = 5
HOPS = (  # (name, from, to): what the service's timestamps can tell apart
    ("client -> service accepted", "submitted", "received_at"),
    ("service -> worker start reported", "received_at", "started_at"),
    ("  of which accepted -> dispatched to router", "received_at", "dispatched_at"),
    ("  of which dispatched -> start reported", "dispatched_at", "started_at"),
    ("start reported -> result at service", "started_at", "completed_at"),
    ("result at service -> client has it", "completed_at", "resolved"),
)


def sequential_calls(target: Target, count: int) -> list[dict[str, Any]]:
    calls = []
    for _ in range(count):
        submitted, start = time.time(), time.perf_counter()
        future = target.submit(noop)
        future.result(timeout=60)
        calls.append({"seconds": time.perf_counter() - start, "submitted": submitted, "resolved": time.time(),
                      "task_id": getattr(future, "task_id", "")})
    return calls


def hop_breakdown(target: MepTarget, calls: list[dict[str, Any]]) -> dict[str, float]:
    """Median milliseconds of each hop, from the service's records of these tasks."""
    client = Client(service=target.deploy.address, service_key=target.deploy.service_key,
                    token=target.identity.token)
    infos = {}
    ids = [call["task_id"] for call in calls]
    for start in range(0, len(ids), 500):
        for info in client.list_tasks(task_ids=ids[start:start + 500], limit=500):
            infos[info.task_id] = info
    hops: dict[str, float] = {}
    for name, first, second in HOPS:
        spans = []
        for call in calls:
            info = infos.get(call["task_id"])
            times = {**call, **({} if info is None else {f: getattr(info, f) for f in
                                                          ("received_at", "dispatched_at", "started_at",
                                                           "completed_at")})}
            if times.get(first) and times.get(second):
                spans.append((times[second] - times[first]) * 1e3)
        if spans:
            hops[name] = statistics.median(spans)
    return hops


def run(lab: Lab, calls: int, trials: int = ROUNDS) -> dict[str, Any]:
    named = [("mep", lab.mep("multi-user", 2)), ("htex", lab.htex(2)), ("pool", lab.pool(2)),
             ("mep_single_user", lab.mep("single-user", 2)), ("mep_htex_engine", lab.mep("htex", 2))]
    for _, target in named:
        sequential_calls(target, 20)  # warm-up
    per_round = max(1, calls // trials)
    rounds = alternate([target for _, target in named], trials, lambda target: sequential_calls(target, per_round))
    rows: dict[str, Any] = {}
    for (name, target), results in zip(named, rounds, strict=True):
        merged = [call for round_calls in results for call in round_calls]
        milliseconds = [call["seconds"] * 1e3 for call in merged]
        rows[name] = {"label": target.label, "calls": len(merged), "median_ms": statistics.median(milliseconds),
                      "p99_ms": percentile(milliseconds, 0.99),
                      "round_medians_ms": [statistics.median(c["seconds"] * 1e3 for c in r) for r in results]}
        if isinstance(target, MepTarget):
            rows[name]["hops_median_ms"] = hop_breakdown(target, merged)
    ratios = {f"{name}/htex": rows[name]["median_ms"] / rows["htex"]["median_ms"] for name in rows if name != "htex"}
    return {"calls": calls, "rounds": trials, "rows": rows, "ratios": ratios}


def table(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    lines = []
    for name, row in result["rows"].items():
        ratio = result["ratios"].get(f"{name}/htex")
        lines.append((f"round trip  {row['label']}", f"{row['median_ms']:.2f} ms",
                      f"p99 {row['p99_ms']:.2f} ms" + (f"  {ratio:.2f}x HTEX" if ratio else "")))
        for hop, value in row.get("hops_median_ms", {}).items():
            lines.append((f"    {hop}", f"{value:.2f} ms", ""))
    return lines
