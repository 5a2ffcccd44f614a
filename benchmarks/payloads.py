"""Payloads: tasks whose argument (towards the worker) or result (back) is 1 KiB, 100 KiB, 5 MiB, or the
largest mep accepts (its 10 MiB limit on a serialised argument or result, less the serialisation's own
bytes); tasks/s and MB/s each way, mep (2 workers, a mapped account) against bare HTEX, alternating."""

from __future__ import annotations

from typing import Any

import dill

from mep.protocol.framing import DEFAULT_MAX_PAYLOAD_BYTES
from mep.sdk.serialize import serialize_args

from benchmarks.deploy import Lab
from benchmarks.measure import alternate, run_batch, summary
from benchmarks.tasks import produce, swallow

KIB = 1024
MIB = 1024 * KIB


def largest_accepted() -> int:
    """The biggest bytes object whose serialised argument and serialised result both fit mep's limit."""
    probe = MIB
    argument_overhead = len(serialize_args((bytes(probe),), {})) - probe
    result_overhead = len(dill.dumps(bytes(probe))) - probe
    return DEFAULT_MAX_PAYLOAD_BYTES - max(argument_overhead, result_overhead)


def sizes(quick: bool) -> list[tuple[str, int, int]]:
    """(label, bytes, tasks per trial)."""
    top = largest_accepted()
    if quick:
        return [("1 KiB", KIB, 20), ("100 KiB", 100 * KIB, 10), ("5 MiB", 5 * MIB, 2), ("largest", top, 1)]
    return [("1 KiB", KIB, 2000), ("100 KiB", 100 * KIB, 500), ("5 MiB", 5 * MIB, 20), ("largest", top, 10)]


def run(lab: Lab, trials: int, quick: bool) -> dict[str, Any]:
    named = [("mep", lab.mep("multi-user", 2)), ("htex", lab.htex(2))]
    result: dict[str, Any] = {"trials": trials, "limit_bytes": DEFAULT_MAX_PAYLOAD_BYTES, "sizes": {}}
    for label, size, count in sizes(quick):
        blob = bytes(size)
        entry: dict[str, Any] = {"bytes": size, "tasks": count}
        for direction, fn, args in (("to_worker", swallow, (blob,)), ("from_worker", produce, (size,))):
            for _, target in named:
                run_batch(target, 1, fn, args)  # warm-up: the function is loaded, buffers are sized
            runs = alternate([t for _, t in named], trials, lambda target: run_batch(target, count, fn, args))
            rows = {}
            for (name, _), seconds in zip(named, runs, strict=True):
                rates = [count / s for s in seconds]
                rows[name] = {"tasks_per_s": summary(rates),
                              "mb_per_s": summary([rate * size / 1e6 for rate in rates])}
            rows["ratio_mep/htex"] = rows["mep"]["tasks_per_s"]["median"] / rows["htex"]["tasks_per_s"]["median"]
            entry[direction] = rows
        result["sizes"][label] = entry
    return result


def table(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    lines = []
    for label, entry in result["sizes"].items():
        for direction in ("to_worker", "from_worker"):
            rows = entry[direction]
            arrow = "args ->" if direction == "to_worker" else "<- result"
            lines.append((f"payload {label} ({entry['bytes']:,} B) {arrow}",
                          f"{rows['mep']['tasks_per_s']['median']:,.1f} tasks/s",
                          f"{rows['mep']['mb_per_s']['median']:,.1f} MB/s; HTEX {rows['htex']['tasks_per_s']['median']:,.1f}"
                          f" tasks/s {rows['htex']['mb_per_s']['median']:,.1f} MB/s; {rows['ratio_mep/htex']:.2f}x HTEX"))
    return lines
