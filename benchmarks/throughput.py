"""How fast is mep's whole path, compared with a plain ProcessPoolExecutor on the same machine?

Run from the repository root with a world-readable interpreter (the user
endpoint execs it as another account when run as root):

    /opt/mep/venv/bin/python benchmarks/throughput.py [--tasks N] [--workers W]

It stands up a real deployment with ``tests/harness.py`` (as root: a
multi-user manager and a temporary account the tasks run as; as anyone else:
a single-user manager running as you) and prints one table:

- throughput of no-op tasks through SDK -> service -> router -> user
  endpoint -> workers and back, beside ``concurrent.futures.ProcessPoolExecutor``
  with the same number of workers, measured alternately in the same run;
- cold start: first submit to first result on a freshly started manager
  (includes spawning the user endpoint and its workers);
- the cost of encoding and decoding one task envelope (a ``Submit`` with 100
  ``TaskRef``) with ``mep.protocol`` (msgspec) versus a pydantic model of the
  same shape, and the import time of each library in a fresh interpreter.

Every figure is the median of three runs, after a warm-up. Nothing is
asserted: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import os
import platform
import pwd
import statistics
import subprocess
import sys
import time
import timeit
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, TypeAdapter

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))  # tests/ is not installed

from mep import Executor  # noqa: E402
from mep.protocol import PROTOCOL_VERSION, SIGNATURE, decode, encode  # noqa: E402
from mep.errors import MepError  # noqa: E402
from mep.protocol.messages import Submit, TaskRef  # noqa: E402
from mep.sdk.serialize import client_runtime  # noqa: E402
from tests.accounts import unix_account  # noqa: E402
from tests.harness import (  # noqa: E402
    DOMAIN_STRIP,
    PYTHON,
    ROUTER_USER,
    Deployment,
    Identity,
    Manager,
    deployment,
    expression_mapping,
)

REPEATS = 3
ENVELOPE_TASKS = 100
CODEC_ROUNDS = 2000
RESULT_TIMEOUT = 120.0


def noop() -> None:
    """The task: nothing, so what is measured is the path, not the work. Travels by value."""


# --- measurements ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    label: str
    runs: list[float]
    unit: str

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def run_tasks(executor: concurrent.futures.Executor, count: int) -> float:
    """Submit ``count`` no-op tasks, wait for every result; tasks per second."""
    start = time.perf_counter()
    futures = [executor.submit(noop) for _ in range(count)]
    for future in concurrent.futures.as_completed(futures, timeout=RESULT_TIMEOUT):
        future.result()  # a failed task must stop the benchmark, not inflate the rate
    return count / (time.perf_counter() - start)


# pydantic models of the same shape as mep.protocol.messages.Submit, tagged and closed like it.
class _PydanticModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PydanticRuntime(_PydanticModel):
    python: str
    dill: str
    mep: str
    platform: str


class PydanticTaskRef(_PydanticModel):
    task_id: str
    fn_hash: str
    args_frame: int
    fn_frame: int = -1


class PydanticSubmit(_PydanticModel):
    type: Literal["SUBMIT"] = "SUBMIT"
    v: int = PROTOCOL_VERSION
    token: str = ""
    request_id: int = 0
    endpoint_id: str = ""
    user_endpoint_config: dict[str, Any] = {}
    runtime: PydanticRuntime | None = None
    tasks: list[PydanticTaskRef] = []


_pydantic_submit = TypeAdapter(PydanticSubmit)


def pydantic_encode(header: PydanticSubmit, payloads: list[bytes]) -> list[bytes]:
    """The pydantic counterpart of ``mep.protocol.encode``: JSON, pydantic's fastest wire format."""
    return [SIGNATURE, _pydantic_submit.dump_json(header), *payloads]


def pydantic_decode(frames: list[bytes]) -> tuple[PydanticSubmit, list[bytes]]:
    """The counterpart of ``mep.protocol.decode``, minus its payload-index checks (favouring pydantic)."""
    if frames[0] != SIGNATURE:
        raise ValueError("bad signature")
    header = PydanticSubmit.model_validate_json(frames[1])
    if header.v != PROTOCOL_VERSION:
        raise ValueError("unsupported version")
    return header, frames[2:]


def sample_submit() -> tuple[Submit, list[bytes]]:
    """A realistic batch: 100 tasks of one function, the function body sent once."""
    body = b"f" * 400
    fn_hash = hashlib.sha256(body).hexdigest()
    payloads: list[bytes] = []
    tasks = []
    for number in range(ENVELOPE_TASKS):
        task = TaskRef(task_id=str(uuid.uuid4()), fn_hash=fn_hash, args_frame=len(payloads))
        payloads.append(b"a" * 40)
        if number == 0:
            task.fn_frame = len(payloads)
            payloads.append(body)
        tasks.append(task)
    header = Submit(token="t" * 43, request_id=7, endpoint_id=str(uuid.uuid4()),
                    user_endpoint_config={"workers": 2}, runtime=client_runtime(), tasks=tasks)
    return header, payloads


def time_round_trip(encoder: Callable[..., list[bytes]], decoder: Callable[[list[bytes]], Any],
                    header: Any, payloads: list[bytes]) -> float:
    """Microseconds to encode then decode one envelope, averaged over CODEC_ROUNDS (timeit: gc off)."""
    return timeit.timeit(lambda: decoder(encoder(header, payloads)), number=CODEC_ROUNDS) / CODEC_ROUNDS * 1e6


def measure_codec() -> tuple[Measurement, Measurement, int, int]:
    """Envelope round trips for msgspec (mep.protocol) and pydantic, and each header's size in bytes."""
    header, payloads = sample_submit()
    as_pydantic = PydanticSubmit.model_validate(msgspec.to_builtins(header))
    if (pydantic_decode(pydantic_encode(as_pydantic, payloads))[0] != as_pydantic
            or decode(encode(header, payloads))[0] != header):
        raise RuntimeError("an envelope did not survive its encode/decode round trip; the comparison would be void")
    sides = {"msgspec": (encode, decode, header), "pydantic": (pydantic_encode, pydantic_decode, as_pydantic)}
    runs: dict[str, list[float]] = {name: [] for name in sides}
    for encoder, decoder, value in sides.values():  # warm-up
        time_round_trip(encoder, decoder, value, payloads)
    for _ in range(REPEATS):
        for name, (encoder, decoder, value) in sides.items():
            runs[name].append(time_round_trip(encoder, decoder, value, payloads))
    return (Measurement(f"mep.protocol (msgspec msgpack), {ENVELOPE_TASKS} TaskRefs", runs["msgspec"], "us"),
            Measurement(f"pydantic v2 model, JSON, {ENVELOPE_TASKS} TaskRefs", runs["pydantic"], "us"),
            len(encode(header, payloads)[1]), len(pydantic_encode(as_pydantic, payloads)[1]))


IMPORT_PROBE = "import time; start = time.perf_counter(); {statement}; print(time.perf_counter() - start)"


def import_milliseconds(statement: str) -> float:
    """Time ``statement`` in a fresh interpreter (cwd / so nothing from the checkout shadows it)."""
    result = subprocess.run([PYTHON, "-c", IMPORT_PROBE.format(statement=statement)], capture_output=True,
                            text=True, cwd="/", check=True)
    return float(result.stdout) * 1e3


def measure_imports() -> list[Measurement]:
    # pydantic imports lazily: BaseModel is what defining an envelope needs.
    statements = ["import msgspec", "from pydantic import BaseModel"]
    runs: dict[str, list[float]] = {statement: [] for statement in statements}
    for statement in statements:  # warm-up: page cache and bytecode caches
        import_milliseconds(statement)
    for _ in range(REPEATS):
        for statement in statements:
            runs[statement].append(import_milliseconds(statement))
    return [Measurement(statement, runs[statement], "ms") for statement in statements]


# --- a real deployment ------------------------------------------------------------------------


@dataclass
class Session:
    deploy: Deployment
    identity: Identity
    account: str
    workers: int

    def start_manager(self) -> Manager:
        """A manager with the shipped local template, multi-user as root and single-user otherwise."""
        return self.deploy.start_manager(expression_mapping(DOMAIN_STRIP))

    def executor(self, manager: Manager) -> Executor:
        return self.deploy.executor(self.identity, manager, user_endpoint_config={"workers": self.workers})


def ensure_router_account() -> None:
    """The root manager's router runs as this system account, as the packages create it."""
    try:
        pwd.getpwnam(ROUTER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", ROUTER_USER],
                       check=True, capture_output=True)
        print(f"created system account {ROUTER_USER!r} for the manager's router (left in place)")


@contextlib.contextmanager
def task_account() -> Iterator[str]:
    """As root: a temporary account the tasks run as. Otherwise: the caller's own account."""
    if os.geteuid() != 0:
        yield pwd.getpwuid(os.geteuid()).pw_name
        return
    ensure_router_account()
    with unix_account("mepbench") as account:
        yield account.pw_name


@contextlib.contextmanager
def mep_session(workers: int) -> Iterator[Session]:
    with task_account() as account, deployment() as deploy:
        # DOMAIN_STRIP maps <account>@example.org to <account>.
        yield Session(deploy, deploy.identity(f"{account}@example.org"), account, workers)


def cold_start_seconds(session: Session) -> tuple[float, Manager]:
    """First submit to first result on a manager started just for this."""
    for earlier in session.deploy.managers:
        earlier.process.stop()  # and its endpoint with it: one live endpoint at a time
    manager = session.start_manager()
    with session.executor(manager) as executor:
        start = time.perf_counter()
        executor.submit(noop).result(timeout=RESULT_TIMEOUT)
        elapsed = time.perf_counter() - start
    return elapsed, manager


# --- output ---------------------------------------------------------------------------------


def format_value(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.2f} {unit}"


def print_table(rows: list[tuple[str, str, str]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for number, row in enumerate(rows):
        print(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]}".rstrip())
        if number == 0:
            print("-" * (sum(widths) + 4))


def measurement_row(measurement: Measurement) -> tuple[str, str, str]:
    runs = ", ".join(format_value(run, "").strip() for run in measurement.runs)
    return measurement.label, format_value(measurement.median, measurement.unit), f"[{runs}]"


def main() -> int:
    try:
        return benchmark()
    except (MepError, RuntimeError, AssertionError, concurrent.futures.TimeoutError) as exc:
        # AssertionError: the harness's wait_for timing out; the deployment's logs are printed above.
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1


def benchmark() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000, help="no-op tasks per throughput run (default 5000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes on each side (default 2)")
    options = parser.parse_args()
    if options.tasks < 1 or options.workers < 1:
        parser.error("--tasks and --workers must be at least 1")
    warm_up_tasks = min(options.tasks, 1000)

    msgspec_codec, pydantic_codec, msgspec_bytes, pydantic_bytes = measure_codec()
    imports = measure_imports()

    mode = "root: multi-user manager" if os.geteuid() == 0 else "ordinary user: single-user manager"
    with concurrent.futures.ProcessPoolExecutor(options.workers) as pool, mep_session(options.workers) as session:
        run_tasks(pool, warm_up_tasks)  # workers forked before any ZeroMQ thread exists in this process
        cold_runs = []
        for _ in range(REPEATS):
            seconds, manager = cold_start_seconds(session)
            cold_runs.append(seconds)
        mep_runs, pool_runs = [], []
        with session.executor(manager) as executor:  # the last fresh manager, its endpoint now running
            run_tasks(executor, warm_up_tasks)
            for _ in range(REPEATS):  # alternate, so drift on the machine hits both sides alike
                mep_runs.append(run_tasks(executor, options.tasks))
                pool_runs.append(run_tasks(pool, options.tasks))
        account = session.account

    mep_rate = Measurement("mep: SDK > service > router > endpoint > workers", mep_runs, "tasks/s")
    pool_rate = Measurement("concurrent.futures.ProcessPoolExecutor", pool_runs, "tasks/s")
    cold = Measurement("cold start: first submit > first result (fresh manager)", cold_runs, "s")
    print(f"\nmep throughput benchmark: {options.tasks} no-op tasks per run, {options.workers} worker(s) each side, "
          f"{os.cpu_count()} CPU(s), Python {platform.python_version()}")
    print(f"run as {pwd.getpwuid(os.geteuid()).pw_name} ({mode}); tasks ran as {account}; "
          f"median of {REPEATS} runs [each run]\n")
    print_table([
        ("measurement", "median", "runs"),
        measurement_row(pool_rate),
        measurement_row(mep_rate),
        ("ratio mep / ProcessPoolExecutor", f"{mep_rate.median / pool_rate.median:.3f}", ""),
        measurement_row(cold),
        measurement_row(msgspec_codec),
        measurement_row(pydantic_codec),
        ("ratio pydantic / msgspec (envelope encode+decode)", f"{pydantic_codec.median / msgspec_codec.median:.1f}x",
         ""),
        ("envelope header size msgspec / pydantic", f"{msgspec_bytes:,} B / {pydantic_bytes:,} B", ""),
        *(measurement_row(measurement) for measurement in imports),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
