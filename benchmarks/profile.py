"""Where the time goes: py-spy samples every Python process of a system while it runs a throughput batch.

For mep (process engine), mep's htex engine, bare HTEX (plain and encrypted) and the engine driven alone,
each with 2 workers, and for mep and HTEX with 100 KiB arguments: py-spy (``pip install
py-spy``; it reads a process by pid, ``--nonblocking`` so it does not stop it) records each process
while the batch runs; this section keeps each process's CPU seconds per task (from /proc) and its top
functions by own time ("self": the sampled leaf frame) and by time spent inside them ("inclusive").
The raw collapsed stacks stay in a directory under /var/tmp for flame graphs. Not in the default run:
sampling slows the processes it samples.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import procstat
from benchmarks.deploy import Lab, Target
from benchmarks.measure import run_batch
from benchmarks.tasks import noop, swallow

TOP = 10
PAYLOAD_BYTES = 100 * 1024  # the argument size of the payload profile (the 100 KiB target)
# Leaf frames where a thread waits rather than computes: py-spy --nonblocking does not always tell an idle
# thread from a busy one, so samples ending here are counted as waiting, not as anyone's cost.
WAITING = ("Poller.poll", "Condition.wait", "Event.wait", "_PollLikeSelector.select", "select", "Socket.poll",
           "Connection._recv", "_recv", "wait", "sleep", "Queue.get", "accept")
SAMPLE_RATE = 200
ATTACH_SECONDS = 1.0  # py-spy finds the interpreter's state before the batch starts


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise RuntimeError(f"py-spy is not installed: {sys.executable} -m pip install py-spy")
    return found


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            words = handle.read().split(b"\0")
    except OSError:
        return "gone"
    text = " ".join(word.decode(errors="replace") for word in words if word)
    if "benchmarks.suite" in text:
        return "benchmark process (SDK or HTEX client)"
    for marker in ("mep-manager spawner", "mep-manager router", "mep-endpoint", "mep service", "interchange",
                   "process_worker_pool", "forkserver", "resource_tracker", "multiprocessing"):
        if marker in text:
            return marker
    return text[:60]


def _is_python(pid: int) -> bool:
    try:
        return "python" in Path(f"/proc/{pid}/exe").resolve().name
    except OSError:
        return False


def _aggregate(raw: Path) -> dict[str, Any]:
    own: collections.Counter[str] = collections.Counter()
    inside: collections.Counter[str] = collections.Counter()
    total = waiting = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame.rsplit(":", 1)[0] + ")" if ":" in frame else frame for frame in stack.split(";")]
        if frames[-1].split(" (")[0] in WAITING:
            waiting += count
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inside[frame] += count
    share = (lambda counter: [[name, round(value / total, 3)] for name, value in counter.most_common(TOP)]) if total \
        else (lambda counter: [])
    return {"samples": total, "waiting_samples": waiting, "top_self": share(own), "top_inclusive": share(inside)}


def profile_target(target: Target, tasks: int, raw_dir: Path, name: str, fn: Callable[..., Any] = noop,
                   args: tuple = ()) -> dict[str, Any]:
    run_batch(target, min(tasks, 1000), fn, args)  # warm-up: every process of the system exists
    py_spy = _py_spy()
    recorders = []
    for role, pids in target.roles().items():
        for pid in pids:
            if _is_python(pid):
                raw = raw_dir / f"{name}-{role.replace(' ', '_')}-{pid}.txt"
                recorder = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--format", "raw", "--output",
                                             str(raw), "--rate", str(SAMPLE_RATE), "--nonblocking"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                recorders.append((role, pid, raw, recorder))
    time.sleep(ATTACH_SECONDS)
    before = {pid: procstat.cpu_seconds([pid]) for _, pid, _, _ in recorders}
    seconds = run_batch(target, tasks, fn, args)
    after = {pid: procstat.cpu_seconds([pid]) for _, pid, _, _ in recorders}
    processes = []
    for role, pid, raw, recorder in recorders:
        recorder.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
        try:
            recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()
        entry = {"role": role, "pid": pid, "process": _process_name(pid),
                 "cpu_us_per_task": (after[pid] - before[pid]) / tasks * 1e6}
        entry.update(_aggregate(raw) if raw.exists() else {"samples": 0, "waiting_samples": 0, "top_self": [],
                                                            "top_inclusive": []})
        processes.append(entry)
    processes.sort(key=lambda entry: -entry["cpu_us_per_task"])
    return {"label": target.label, "tasks": tasks, "tasks_per_s_while_sampled": tasks / seconds,
            "processes": processes}


def run(lab: Lab, tasks: int) -> dict[str, Any]:
    raw_dir = Path(tempfile.mkdtemp(prefix="mep-bench-profile-", dir="/var/tmp"))
    raw_dir.chmod(0o755)
    targets = {"mep": lab.mep("multi-user", 2), "mep_htex_engine": lab.mep("htex", 2), "htex": lab.htex(2),
               "htex_encrypted": lab.htex(2, encrypted=True), "mep_htex_engine_alone": lab.engine_alone(2)}
    systems = {name: profile_target(target, tasks, raw_dir, name) for name, target in targets.items()}
    for name, target in (("mep_100KiB_args", lab.mep("multi-user", 2)), ("htex_100KiB_args", lab.htex(2))):
        systems[name] = profile_target(target, max(1, tasks // 20), raw_dir, name, swallow, (bytes(PAYLOAD_BYTES),))
        systems[name]["label"] += " (100 KiB arguments)"
    return {"raw_stacks_dir": str(raw_dir), "systems": systems}


def table(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    lines = []
    for system in result["systems"].values():
        lines.append((f"profile {system['label']}", f"{system['tasks_per_s_while_sampled']:,.0f} tasks/s",
                      "while sampled"))
        for process in system["processes"]:
            if process["cpu_us_per_task"] < 1:
                continue
            top = ", ".join(f"{name.split(' (')[0]} {share:.0%}" for name, share in process["top_self"][:3])
            lines.append((f"    {process['role']}: {process['process']} ({process['pid']})",
                          f"{process['cpu_us_per_task']:.0f} us/task", top))
    return lines


def main() -> int:
    for raw in sorted(Path(sys.argv[1]).glob("*.txt")):
        summary = _aggregate(raw)
        print(f"{raw.stem}: {summary['samples']} busy samples, {summary['waiting_samples']} waiting")
        for kind in ("top_self", "top_inclusive"):
            print(f"  {kind}: " + "; ".join(f"{name} {share:.0%}" for name, share in summary[kind]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
