"""Results above the endpoint's threshold: kept in a file as the user, read in place or fetched in chunks.

Real service, real root manager, real accounts. Functions travel by value (this module is not installed
where the endpoints run).
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

import mep
from mep.errors import LargeResultNoReaderError, LargeResultUnavailableError, MepError
from mep.protocol.messages import Fetch, Results
from mep.sdk.connection import ServiceSettings, request
from mep.sdk.large_results import CHUNK_BYTES, fetch
from tests.harness import (
    DOMAIN_STRIP,
    PYTHON,
    Deployment,
    _pid_with_title,
    expression_mapping,
    processes_of_uid,
    wait_for,
)

pytestmark = pytest.mark.root

THRESHOLD = 256 * 1024

PROCESS_ENGINE = "engine:\n  type: process\n  workers: 1\n"
HTEX_ENGINE = "engine:\n  type: htex\n  provider:\n    type: LocalProvider\n  workers_per_node: 1\n  max_blocks: 1\n"


def large_data_template(idle_timeout: float = 600, threshold: int | None = THRESHOLD,
                        engine: str = PROCESS_ENGINE) -> str:
    """One worker and large results in ``~/mep-results``; ``threshold`` None keeps the default."""
    threshold_line = "" if threshold is None else f"  threshold_bytes: {threshold}\n"
    return (engine +
            f"idle_timeout: {idle_timeout}\n"
            "large_results:\n"
            f"{threshold_line}"
            '  directory: {{ mep.mapped_user.home ~ "/mep-results" }}\n')


def payload_of_size(size: int) -> bytes:
    return b"\x5a" * size


def start(deploy: Deployment, account_factory, idle_timeout: float = 600) -> tuple:  # noqa: ANN001
    alice, bob = account_factory("mepalice"), account_factory("mepbob")
    template = deploy.root / "large.yaml.j2"
    template.write_text(large_data_template(idle_timeout))
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), template=template)
    return (alice, bob, manager, deploy.identity(f"{alice.pw_name}@example.org"),
            deploy.identity(f"{bob.pw_name}@example.org"))


def results_dir(account) -> Path:  # noqa: ANN001
    return Path(account.pw_dir) / "mep-results"


def client(deploy: Deployment, identity, **kwargs) -> mep.Client:  # noqa: ANN001
    return mep.Client(service=deploy.address, service_key=deploy.service_key, token=identity.token, **kwargs)


def submit_detached(deploy: Deployment, identity, manager, size: int) -> str:  # noqa: ANN001
    """Submit from a process that exits once the task is accepted, so nobody collects the result yet."""
    script = f"""
import os, mep
def produce(size):
    return b"\\x5a" * size
with mep.Executor({manager.endpoint_id!r}, service={deploy.address!r}, service_key={deploy.service_key!r},
                  token={identity.token!r}) as executor:
    future = executor.submit(produce, {size})
print(future.task_id, flush=True)
os._exit(0)
"""
    done = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.split()[-1]
    wait_for(lambda: client(deploy, identity).get_task(task_id).state == "succeeded", timeout=120,
             what="the detached task to finish")
    return task_id


def reference_of(deploy: Deployment, identity, task_id: str):  # noqa: ANN001, ANN201
    settings = ServiceSettings(deploy.address, deploy.service_key, identity.token)
    reply, _ = request(settings, Fetch(token=identity.token, request_id=1, task_ids=[task_id]), 30)
    assert isinstance(reply, Results) and reply.results[0].large is not None
    return reply.results[0].large


def memory_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_small_results_inline_large_ones_in_a_file_read_in_place(deploy, account_factory) -> None:
    alice, _, manager, identity, _ = start(deploy, account_factory)
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(payload_of_size, 1024).result(timeout=120) == payload_of_size(1024)
        assert not results_dir(alice).exists(), "a 1 KiB result travels inline"
        big = 3 * 1024 * 1024
        assert executor.submit(payload_of_size, big).result(timeout=120) == payload_of_size(big)
    (kept,) = results_dir(alice).iterdir()
    info = kept.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (alice.pw_uid, 0o600)
    assert stat.S_IMODE(results_dir(alice).stat().st_mode) == 0o700
    assert info.st_size > big
    # The service holds only the reference: the result's row carries no payload.
    assert kept.name.endswith(".result")


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS, so the next peak is this test's own


def test_the_worker_writes_a_large_result_itself_and_nobody_holds_it_twice(deploy, account_factory) -> None:
    """The endpoint only passes the reference on; worker and SDK each hold the value once, not its bytes too."""
    alice, _, manager, identity, _ = start(deploy, account_factory)
    size = 64 * 1024 * 1024
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(payload_of_size, 1).result(timeout=120) == payload_of_size(1)  # endpoint up
        endpoint = _pid_with_title(f"mep-endpoint {alice.pw_name} ")
        others = [pid for pid in processes_of_uid(alice.pw_uid) if pid != endpoint]
        for pid in [endpoint, os.getpid(), *others]:
            reset_peak(pid)
        before = {pid: memory_kib(pid, "VmHWM") for pid in [endpoint, os.getpid(), *others]}
        value = executor.submit(payload_of_size, size).result(timeout=300)
        assert len(value) == size
        grew = {pid: memory_kib(pid, "VmHWM") - before[pid] for pid in before}
    size_kib = size // 1024
    assert grew[endpoint] < 8 * 1024, f"the endpoint's peak grew by {grew[endpoint]} KiB for a {size_kib} KiB result"
    worker = max(grew[pid] for pid in others)
    # more than half: the process measured is the one that made the value
    assert size_kib / 2 < worker < 1.25 * size_kib, f"the worker's peak grew by {worker} KiB (the value: {size_kib})"
    assert grew[os.getpid()] < 1.25 * size_kib, (
        f"reading the {size_kib} KiB result in place grew this process's peak by {grew[os.getpid()]} KiB")
    (kept,) = results_dir(alice).glob("*.result")
    assert kept.stat().st_uid == alice.pw_uid and not list(results_dir(alice).glob("*.partial"))


def test_on_htex_the_endpoint_writes_the_file(deploy, account_factory) -> None:
    """A Parsl worker may be on a node without the results directory: its result arrives whole, as before."""
    account = account_factory("mephtexbig")
    template = deploy.root / "large-htex.yaml.j2"
    template.write_text(large_data_template(60, engine=HTEX_ENGINE))
    manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP), template=template)
    identity = deploy.identity(f"{account.pw_name}@example.org")
    with deploy.executor(identity, manager) as executor:
        assert executor.submit(payload_of_size, 2 * THRESHOLD).result(timeout=180) == payload_of_size(2 * THRESHOLD)
    (kept,) = results_dir(account).glob("*.result")
    assert (kept.stat().st_uid, stat.S_IMODE(kept.stat().st_mode)) == (account.pw_uid, 0o600)


def test_a_result_file_that_cannot_be_written_or_a_result_that_fails_half_way(tmp_path: Path) -> None:
    """The worker's own writing: a stated reason, and no file left behind either way."""
    import dill

    from mep.endpoint.bootstrap import run_task

    def produce(breaks_late: bool) -> list:
        class BreaksLate:  # pickled after a large part of the result is already in the file
            def __reduce__(self):  # noqa: ANN204
                raise ValueError("this object refuses to be pickled")

        return [b"x" * (4 * 256 * 1024), BreaksLate() if breaks_late else None]

    function = dill.dumps(produce)
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the results directory should be")
    status, payload, _, message, _, code, large = run_task(
        "h1", function, dill.dumps(((False,), {})), (str(blocked / "t.result"), THRESHOLD))
    assert (status, payload, code, large) == ("failed", b"", "large_result_unavailable", None)
    assert f"could not be written to {blocked}: File exists" in message
    directory = tmp_path / "results"
    status, _, error_type, message, _, code, large = run_task(
        "h1", None, dill.dumps(((True,), {})), (str(directory / "t.result"), THRESHOLD))
    assert (status, error_type, code, large) == ("error", "TypeError", "task_error", None)
    assert "could not be serialised" in message and "refuses to be pickled" in message
    assert list(directory.iterdir()) == [], "the half-written file is removed"


def test_fetched_through_the_service_in_bounded_memory(deploy, account_factory) -> None:
    alice, _, manager, identity, _ = start(deploy, account_factory)
    size = 48 * CHUNK_BYTES
    task_id = submit_detached(deploy, identity, manager, size)
    service, router = deploy.service.popen.pid, manager.router_pid
    endpoint = _pid_with_title(f"mep-endpoint {alice.pw_name} ")
    before = {pid: memory_kib(pid, "VmHWM") for pid in (service, router)}
    endpoint_before = memory_kib(endpoint, "VmRSS")
    endpoint_peak = [endpoint_before]
    fetching = threading.Event()

    def sample() -> None:
        while not fetching.is_set():
            endpoint_peak.append(memory_kib(endpoint, "VmRSS"))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    reset_peak(os.getpid())
    sdk_before = memory_kib(os.getpid(), "VmHWM")
    sampler.start()
    try:
        value = client(deploy, identity, read_results_locally=False).get_result(task_id)
    finally:
        fetching.set()
        sampler.join()
    sdk_grew = memory_kib(os.getpid(), "VmHWM") - sdk_before
    # the value once: the chunks went to a temporary file, unpickled as it is read
    assert sdk_grew < 1.25 * size // 1024, f"fetching a {size // 1024} KiB result grew this process by {sdk_grew} KiB"
    assert value == payload_of_size(size)
    bound_kib = 16 * 1024  # a few chunks in flight, far below the 48 MiB result
    for pid, name in ((service, "service"), (router, "router")):
        grew = memory_kib(pid, "VmHWM") - before[pid]
        assert grew < bound_kib, f"the {name}'s peak memory grew by {grew} KiB while fetching {size} bytes"
    assert max(endpoint_peak) - endpoint_before < bound_kib, "the endpoint read more than a few chunks at once"
    assert len(endpoint_peak) > 1


def test_missing_file_and_another_identity(deploy, account_factory) -> None:
    alice, bob, manager, identity, other = start(deploy, account_factory)
    task_id = submit_detached(deploy, identity, manager, 2 * THRESHOLD)
    large = reference_of(deploy, identity, task_id)
    assert Path(large.path).parent == results_dir(alice)
    # Another identity: the service does not know the task for it, and won't serve its chunks.
    with pytest.raises(MepError, match="knows no task"):
        client(deploy, other).get_result(task_id)
    with pytest.raises(LargeResultUnavailableError, match="no large result of yours"):
        fetch(ServiceSettings(deploy.address, deploy.service_key, other.token), task_id, large, 30)
    # The endpoint's disk lost the file: a stated reason, in place and through the service, never a hang.
    os.unlink(large.path)
    for read_locally in (True, False):
        with pytest.raises(LargeResultUnavailableError, match="can't be read"):
            client(deploy, identity, read_results_locally=read_locally).get_result(task_id)


def test_an_endpoint_that_idled_out_is_started_again_to_read_the_file(deploy, account_factory) -> None:
    alice, _, manager, identity, _ = start(deploy, account_factory, idle_timeout=2)
    task_id = submit_detached(deploy, identity, manager, 3 * CHUNK_BYTES)
    wait_for(lambda: not processes_of_uid(alice.pw_uid), timeout=60, what="the idle endpoint to exit")
    with pytest.raises(LargeResultNoReaderError, match="no endpoint of account"):
        client(deploy, identity, read_results_locally=False).get_result(task_id)
    with deploy.executor(identity, manager, read_results_locally=False) as executor:
        (future,) = executor.attach([task_id])
        assert future.result(timeout=120) == payload_of_size(3 * CHUNK_BYTES)


def test_the_endpoint_serves_only_its_own_result_files_and_sweeps_old_ones(tmp_path: Path) -> None:
    from mep.config.endpoint import LargeResults
    from mep.endpoint.large_results import LargeResultFiles
    from mep.endpoint.worker import Outcome
    from mep.protocol.messages import SUCCESS, ChunkRead

    files = LargeResultFiles(LargeResults(threshold_bytes=10, directory=str(tmp_path / "results"), retention=60),
                             "endpoint-id", "account")
    assert files.keep("small", Outcome(SUCCESS, payload=b"tiny")).payload == b"tiny"
    assert files.reference("small") is None
    assert files.keep("big", Outcome(SUCCESS, payload=b"y" * 100)).payload == b""
    large = files.reference("big")
    answer, frames = files.read(ChunkRead(fetch_id=7, large=large, offset=90, length=50))
    assert (answer.fetch_id, answer.code, frames) == (7, "", [b"y" * 10])
    secret = tmp_path / "secret.result"  # the account's other files are not the router's to ask for
    secret.write_bytes(b"not yours")
    for path in (str(secret), str(tmp_path / "results" / ".." / "secret.result")):
        forged = ChunkRead(fetch_id=8, large=large.__class__(path=path, size=9, sha256="0" * 64,
                                                              endpoint_id="endpoint-id", account="account"))
        answer, frames = files.read(forged)
        assert answer.code == "large_result_unavailable" and frames == []
    old = time.time() - 120
    os.utime(large.path, (old, old))
    files.sweep_if_due(time.monotonic())
    assert not Path(large.path).exists(), "a file past its retention is removed"
    answer, frames = files.read(ChunkRead(fetch_id=9, large=large, offset=0, length=10))
    assert "can't be read" in answer.message and frames == []
