"""Chaos around the service and its clients, with PAM on: a full disk, a crash-looping service, killed clients.

Three researchers each run two submitting processes (1,200 tasks in all, sent
in chunks of 25: each chunk's ``with Executor`` block, then its results for
up to two seconds, before the next) while a seeded, progress-driven schedule

- fills the service's state directory (its own small tmpfs) and frees it
  again, once with the service crash-looping on the full disk meanwhile:
  submissions in between are refused with ``ServiceUnavailableError`` and
  sent again a second later under new task ids, as the message says;
- kills the service and then kills each of several fresh lives of it the
  moment it listens (a crash loop) before one stays up;
- SIGKILLs a submitting process mid-run (amid a chunk's submission when it
  gets there soon) and starts a fresh collector process in its place, which
  attaches (``Executor.attach``) to every task id the dead one had submitted
  and not yet seen finish.

Every client process keeps a journal, one ``os.write`` per line so a SIGKILL
never leaves half a line: each task id with its argument as it is submitted,
each chunk's ids once its ``with Executor`` block has ended (the service has
answered for all of them), and each outcome as its future resolves; a
future's callback runs before its result is acknowledged to the service, so
an outcome acknowledged is an outcome journaled. Every task appends its
argument to a file in its account's home, so runs are counted, not assumed.

The verdict: every task id the service knows has exactly one terminal state;
every task id submitted has exactly one outcome in some client, every success
the right value computed as the right account, every failure a reason, and
no failure the service contradicts (a refusal, or "no task of yours", only
for an id the service never stored; any other failure only as the service's
own failure with the same reason; a key mismatch never); lost = 0. Ceiling on
reruns: as in test_chaos_faults.py, a task runs again only if the router
reported it lost with an endpoint; a full disk, a crash-looping service and a
dead client cost none.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import mep
from tests.harness import DOMAIN_STRIP, PYTHON, Deployment, expression_mapping, fill, service_on_small_tmpfs
from tests.pam_services import PamService, pam_service_fixture  # noqa: F401 - the pam_service fixture

pytestmark = pytest.mark.root

RESEARCHERS = 3
SUBMITTERS_PER_RESEARCHER = 2
TASKS_PER_SUBMITTER = 200
CHUNK = 25
PACE = 2.0  # seconds a submitter waits at most for a chunk's results before sending the next chunk
CRASHED_LIVES = 5  # lives of the service killed as soon as they listen, per crash loop
SCHEDULE = ["fill disk", "fill disk, crash loop"] + ["crash loop"] * 3 + ["kill client"] * 3
FULL_DISK_PATIENCE = 8.0  # seconds the disk stays full waiting for a submission to refuse (none may come)
STALL_LIMIT = 120.0  # seconds without a single new success before the test gives up
KEY_MESSAGE = "does not match the service's"

# One client process: ``submit`` (chunks of CHUNK tasks, each refused one sent again) or ``collect`` (attach to
# the ids another process's journal has without an outcome). Its functions travel by value (this is __main__).
CLIENT = r"""
import concurrent.futures, json, logging, os, sys, time
import mep

logging.basicConfig(level=logging.WARNING)
logging.getLogger("mep.sdk.connection").setLevel(logging.INFO)  # each failed handshake, for the counts

def work(x):
    import os, random, time
    with open(os.path.expanduser("~/runs"), "a") as runs:
        runs.write(f"{x}\n")
    time.sleep(0.02 + random.random() * 0.05)
    return x * x, os.getuid()

job = json.loads(sys.argv[1])
journal = os.open(job["journal"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

def note(*fields):
    os.write(journal, (json.dumps(fields) + "\n").encode())

def record(future):
    error = future.exception()
    if error is None:
        note("outcome", future.task_id, future.result(), None)
    else:
        note("outcome", future.task_id, None, [type(error).__name__, str(error)])

options = dict(service=job["service"], service_key=job["service_key"], token=job["token"], poll_interval=1.0,
               resend_after=3.0, user_endpoint_config={"workers": 2})
if job["mode"] == "submit":
    waiting = list(range(job["first"], job["first"] + job["count"]))
    chunks = []
    while waiting:
        xs, waiting = waiting[:job["chunk"]], waiting[job["chunk"]:]
        with mep.Executor(job["endpoint_id"], **options) as executor:
            futures = {}
            for x in xs:
                future = executor.submit(work, x)
                note("submitted", future.task_id, x)
                future.add_done_callback(record)
                futures[future] = x
        note("answered", [future.task_id for future in futures])
        chunks.append(futures)
        concurrent.futures.wait(futures, timeout=job["pace"])  # so submitting goes on while results can't be stored
        refused = [x for future, x in futures.items()
                   if future.done() and isinstance(future.exception(), mep.ServiceUnavailableError)]
        if refused:
            time.sleep(1)  # "send it again later"
            waiting = refused + waiting
    concurrent.futures.wait([future for futures in chunks for future in futures])
else:
    seen, finished = [], set()
    for line in open(job["of"]):
        fields = json.loads(line)
        if fields[0] == "submitted":
            seen.append(fields[1])
        elif fields[0] == "outcome":
            finished.add(fields[1])
    executor = mep.Executor(job["endpoint_id"], **options)
    futures = executor.attach([task_id for task_id in seen if task_id not in finished])
    for future in futures:
        future.add_done_callback(record)
    concurrent.futures.wait(futures)
"""


class ClientProcess:
    """One client process of one researcher, with its journal."""

    def __init__(self, deploy: Deployment, job: dict, uid: int, name: str) -> None:
        self.journal = deploy.root / f"{name}.journal"
        self.log_path = deploy.root / f"{name}.log"
        self.uid = uid
        self.name = name
        job = {**job, "journal": str(self.journal)}
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen([PYTHON, "-c", CLIENT, json.dumps(job)], stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd="/")

    def entries(self) -> list[list]:
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines()]


def _crash_loop(deploy: Deployment) -> str:
    deploy.service.popen.kill()
    deploy.service.popen.wait(timeout=30)
    for _ in range(CRASHED_LIVES):
        deploy.start_service(deploy.address)
        deploy.service.popen.kill()
        deploy.service.popen.wait(timeout=30)
    deploy.start_service(deploy.address)
    return f"crash loop of {CRASHED_LIVES} lives"


def _fill_and_free(deploy: Deployment, clients: list[ClientProcess], crash_loop: bool) -> str:
    """Fill the service's disk until a submission is refused for it (crash-looping the service meanwhile)."""
    def refusals() -> int:
        return sum(_refused(entry) for client in clients for entry in client.entries())

    refused_before = refusals()
    filler = fill(deploy.state_dir)
    try:
        deadline = time.monotonic() + FULL_DISK_PATIENCE
        while refusals() == refused_before and time.monotonic() < deadline:
            time.sleep(0.05)
        if crash_loop:
            _crash_loop(deploy)  # each life starts on the full disk
        time.sleep(2)  # more submissions refused, results waiting at the endpoints
    finally:
        filler.unlink()
    return (f"disk filled ({refusals() - refused_before} submissions refused) and freed"
            + (", the service crash-looping meanwhile" if crash_loop else ""))


def _await_mid_chunk(client: ClientProcess, patience: float = 3.0) -> bool:
    """Wait (a while) until ``client`` has journaled submissions the service has not answered yet.

    A kill then lands between the SUBMIT and its acknowledgement: the service may have stored tasks whose
    acknowledgement never reached anyone, which the collector must still find.
    """
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline and client.popen.poll() is None:
        entries = client.entries()
        if entries and entries[-1][0] == "submitted":
            return True
        time.sleep(0.005)
    return False


def _kill_a_submitter(deploy: Deployment, clients: list[ClientProcess], killed: list[ClientProcess],
                      jobs: dict[int, dict], rng: random.Random) -> str:
    """SIGKILL a running submitter (amid a chunk's submission if it gets there soon) and start its collector."""
    running = [client for client in clients if client.name.startswith("submitter") and client.popen.poll() is None]
    if not running:
        return "no submitter left to kill"
    victim = rng.choice(running)
    mid_chunk = _await_mid_chunk(victim)
    try:
        os.killpg(victim.popen.pid, signal.SIGKILL)
    except ProcessLookupError:  # reaped by the wait above
        return f"{victim.name} finished before it could be killed"
    victim.popen.wait(timeout=30)
    killed.append(victim)
    clients.append(ClientProcess(deploy, {**jobs[victim.uid], "mode": "collect", "of": str(victim.journal)},
                                 victim.uid, f"collector-for-{victim.name}"))
    return (f"killed {victim.name} after {len(victim.entries())} journal lines"
            + (", amid a chunk's submission" if mid_chunk else ""))


def _refused(entry: list) -> bool:
    return entry[0] == "outcome" and entry[3] is not None and entry[3][0] == "ServiceUnavailableError"


def test_nothing_is_lost_while_the_disk_fills_the_service_crash_loops_and_clients_die(
        router_account, account_factory, pam_service: PamService) -> None:
    rng = random.Random(20261202)
    accounts = [account_factory(f"mepsvc{n}") for n in range(RESEARCHERS)]
    with service_on_small_tmpfs("32m") as deploy:
        manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP),
                                       settings={"pam": {"enable": True, "service": pam_service.name}})
        identities = [deploy.identity(f"{account.pw_name}@example.org") for account in accounts]
        jobs = {account.pw_uid: {"service": deploy.address, "service_key": deploy.service_key,
                                 "token": identity.token, "endpoint_id": manager.endpoint_id}
                for account, identity in zip(accounts, identities, strict=True)}
        clients = [ClientProcess(deploy, {**jobs[account.pw_uid], "mode": "submit", "chunk": CHUNK, "pace": PACE,
                                          "first": n * TASKS_PER_SUBMITTER, "count": TASKS_PER_SUBMITTER},
                                 account.pw_uid, f"submitter-{account.pw_name}-{n}")
                   for account in accounts for n in range(SUBMITTERS_PER_RESEARCHER)]
        total = RESEARCHERS * SUBMITTERS_PER_RESEARCHER * TASKS_PER_SUBMITTER
        schedule = list(SCHEDULE)
        rng.shuffle(schedule)
        fault_at = sorted(rng.sample(range(total // 20, total // 3), len(schedule)))
        events, killed = [], []
        last_done, last_progress = 0, time.monotonic()
        try:
            while True:
                done = sum(entry[0] == "outcome" and entry[3] is None for client in clients  # successes: refusals
                           for entry in client.entries())  # come in bursts, and killed submitters send fewer
                if done > last_done:
                    last_done, last_progress = done, time.monotonic()
                if all(client.popen.poll() is not None for client in clients):
                    break
                assert time.monotonic() - last_progress < STALL_LIMIT, (
                    f"no success for {STALL_LIMIT:.0f} s ({done} so far); events: {events}\n"
                    + "\n".join(f"--- {c.name} log\n{c.log_path.read_text()[-3000:]}" for c in clients)
                    + f"\n--- manager log\n{manager.log()[-10000:]}\n--- service log\n{deploy.service.log()[-5000:]}")
                if fault_at and done >= fault_at[0]:
                    fault_at.pop(0)
                    kind = schedule.pop()
                    if kind.startswith("fill disk"):
                        events.append(_fill_and_free(deploy, clients, crash_loop=kind.endswith("crash loop")))
                    elif kind == "crash loop":
                        events.append(_crash_loop(deploy))
                    else:
                        events.append(_kill_a_submitter(deploy, clients, killed, jobs, rng))
                time.sleep(0.2)
        finally:
            # a burst of results (held back by a full disk) can finish the run before the last faults' turn
            events += [f"not reached: {kind}" for kind in reversed(schedule)]
            for client in clients:
                if client.popen.poll() is None:
                    os.killpg(client.popen.pid, signal.SIGKILL)
                    client.popen.wait()
        for client in clients:
            if client not in killed:
                assert client.popen.returncode == 0, f"{client.name} failed:\n{client.log_path.read_text()}"

        # what the clients saw
        argument: dict[str, tuple[int, int]] = {}  # task id -> (uid, x)
        answered: set[str] = set()
        outcomes: dict[str, list] = collections.defaultdict(list)  # task id -> [(value, error)]
        for client in clients:
            for entry in client.entries():
                if entry[0] == "submitted":
                    argument[entry[1]] = (client.uid, entry[2])
                elif entry[0] == "answered":
                    answered.update(entry[1])
                else:
                    outcomes[entry[1]].append((entry[2], entry[3]))
        # what the service has
        service_tasks = {}
        for identity in identities:
            client = mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token)
            tasks = client.list_tasks(limit=10_000)
            assert len({task.task_id for task in tasks}) == len(tasks), "every task id once"
            service_tasks.update({task.task_id: task for task in tasks})
        states = collections.Counter(task.state for task in service_tasks.values())
        assert set(states) <= {"succeeded", "failed"}, f"non-terminal or unexpected states: {states}"
        assert all(task.message for task in service_tasks.values() if task.state == "failed"), \
            "a task failed without a reason"

        assert answered <= set(argument)
        lost = [task_id for task_id in argument if len(outcomes[task_id]) != 1]
        assert not lost, f"{len(lost)} submitted task(s) without exactly one outcome, e.g. " \
                         f"{[(task_id, outcomes[task_id]) for task_id in lost[:5]]}"
        counts: collections.Counter[str] = collections.Counter()
        for task_id, [(value, error)] in outcomes.items():
            uid, x = argument[task_id]
            stored = service_tasks.get(task_id)
            if error is None:
                assert value == [x * x, uid], "a success must carry the right value, computed as its owner"
                assert stored is not None and stored.state == "succeeded", f"{task_id}: the service has {stored}"
                counts["succeeded"] += 1
                continue
            kind, message = error
            assert message, f"a failure without a reason: {kind}"
            assert KEY_MESSAGE not in message, f"{task_id} failed with a key mismatch: {message}"
            if kind == "ServiceUnavailableError" or message.startswith("the service knows no task"):
                assert stored is None, f"{task_id} was refused ({message}) but the service has it: {stored}"
                assert kind != "ServiceUnavailableError" or "the service's disk is full" in message, message
                counts["refused: disk full" if kind == "ServiceUnavailableError" else "refused: unknown"] += 1
            else:
                assert stored is not None and stored.state == "failed" and stored.message in message, (
                    f"{task_id} failed with {kind}: {message}, which the service contradicts: {stored}")
                counts[f"failed: {kind}: {message[-60:]}"] += 1
        unseen = set(service_tasks) - set(argument)  # sent by a killed submitter in the instant before its journal
        assert len(unseen) <= len(killed) * CHUNK, unseen

        runs: collections.Counter[tuple[int, int]] = collections.Counter()
        for account in accounts:
            ran = Path(account.pw_dir) / "runs"
            runs.update((account.pw_uid, int(x)) for x in ran.read_text().split())
        for task_id, [(value, error)] in outcomes.items():
            assert error is not None or runs[argument[task_id]] >= 1, "a success that never ran"
        ran_again = sum(1 for count in runs.values() if count > 1)
        extra_runs = sum(count - 1 for count in runs.values() if count > 1)
        log = manager.log()
        reported_lost = sum(int(n) for n in re.findall(r"; (\d+) task\(s\) lost with it", log))
        collected = sum(entry[0] == "outcome" for client in clients if client.name.startswith("collector")
                        for entry in client.entries())
        handshakes = sum(client.log_path.read_text().count("encrypted handshake") for client in clients)
        refusals = counts["refused: disk full"] + counts["refused: unknown"]
        failed = {k: v for k, v in counts.items() if k.startswith("failed")}
        print(f"\nchaos around the service: {len(argument)} task ids submitted ({total} tasks planned; killed "
              f"submitters sent fewer), succeeded {counts['succeeded']}, refused for the full disk "
              f"{counts['refused: disk full']}, attached but never accepted {counts['refused: unknown']}, failed "
              f"{failed}, lost 0; accepted but never journaled {len(unseen)}; outcomes collected by fresh "
              f"collectors for {len(killed)} killed submitters {collected}; handshakes failed in clients "
              f"{handshakes}, none reported as a key mismatch; ran more than once {ran_again} ({extra_runs} extra "
              f"runs; ceiling: {reported_lost} reported lost with endpoints); service states {dict(states)}; "
              f"events {events}")
        assert refusals < len(argument), "the full disk refused everything"
        assert extra_runs <= reported_lost, "a task ran again without having been lost with an endpoint"
        assert "Traceback" not in deploy.service.log()
