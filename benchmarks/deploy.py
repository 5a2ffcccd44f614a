"""The systems under test, each behind one interface: ``submit(fn, *args) -> Future`` plus the pids of
its parts (for CPU and memory from /proc).

- ``MepTarget``: a real mep deployment from ``tests/harness.py``; as root the manager is multi-user and
  tasks run as a real account made with ``tests/accounts.py`` (one account per target, so each target's
  user-side processes are exactly that account's processes); single-user targets run the service and
  manager as that account.
- ``HtexTarget``: Parsl's HighThroughputExecutor driven with ``submit()`` below the DataFlowKernel
  (LocalProvider, address 127.0.0.1), the way ``mep/endpoint/parsl_engine.py`` drives it.
- ``PoolTarget``: ``concurrent.futures.ProcessPoolExecutor``.

``Lab`` builds them on demand and tears everything down (accounts last) when the run ends.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mep import Executor
from mep.config.manager import shipped_templates_dir
from tests.accounts import unix_account
from tests.harness import (
    DOMAIN_STRIP,
    ROUTER_USER,
    Deployment,
    Identity,
    Manager,
    audit_log_of,
    deployment,
    expression_mapping,
    processes_of_uid,
    wait_for,
)
from tests.slurm import endpoints_of

from benchmarks import procstat

REPOSITORY = Path(__file__).resolve().parents[1]
BENCH_TEMPLATES = Path(__file__).resolve().parent / "templates"
SHIPPED_TEMPLATES = shipped_templates_dir()
HTEX_START_TIMEOUT = 120.0


def ensure_router_account() -> None:
    """The root manager's router runs as this system account, as the packages create it."""
    try:
        pwd.getpwnam(ROUTER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", ROUTER_USER],
                       check=True, capture_output=True)


class Target:
    """A system under test. ``roles()``: its processes by part, for CPU time and PSS."""

    label: str

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        raise NotImplementedError

    def roles(self) -> dict[str, list[int]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


@dataclass
class MepTarget(Target):
    label: str
    deploy: Deployment
    manager: Manager
    identity: Identity
    account: pwd.struct_passwd
    config: dict[str, Any]
    _executor: Executor | None = None

    @property
    def executor(self) -> Executor:
        if self._executor is None:  # the SDK's own defaults: what a researcher gets
            self._executor = Executor(self.manager.endpoint_id, service=self.deploy.address,
                                      token=self.identity.token, service_key=self.deploy.service_key,
                                      user_endpoint_config=self.config)
        return self._executor

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        return self.executor.submit(fn, *args)

    def roles(self) -> dict[str, list[int]]:
        children = procstat.parent_map()
        service = procstat.tree(self.deploy.service.popen.pid, children)
        manager = [self.manager.spawner_pid, self.manager.router_pid]
        user = [pid for pid in processes_of_uid(self.account.pw_uid) if pid not in service and pid not in manager]
        return {"client": [os.getpid()], "service": service, "manager": manager, "user endpoint": user}

    def endpoint_pids(self) -> list[int]:
        """This account's user endpoints under this manager (not their workers)."""
        return endpoints_of(self.manager, self.account.pw_uid)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


@dataclass
class HtexTarget(Target):
    label: str
    executor: Any  # parsl HighThroughputExecutor
    run_dir: Path

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        return self.executor.submit(fn, {}, *args)

    def roles(self) -> dict[str, list[int]]:
        return _htex_roles(self.executor)

    def close(self) -> None:
        jobs = list(self.executor.blocks_to_job_id.values())
        if jobs:
            self.executor.provider.cancel(jobs)
        self.executor.shutdown()
        shutil.rmtree(self.run_dir, ignore_errors=True)


@dataclass
class PoolTarget(Target):
    label: str
    pool: concurrent.futures.ProcessPoolExecutor

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        return self.pool.submit(fn, *args)

    def roles(self) -> dict[str, list[int]]:
        return {"client": [os.getpid()], "workers": list(self.pool._processes)}  # noqa: SLF001 - no public view

    def close(self) -> None:
        self.pool.shutdown()


class _EngineResult:
    """A task's outcome from the engine, awaited on one condition shared by all tasks: a Future per task
    would add its own lock and condition, which the endpoint (it uses callbacks) does not pay."""

    __slots__ = ("finished", "outcome")

    def __init__(self, finished: threading.Condition) -> None:
        self.finished = finished
        self.outcome: Any = None

    def result(self, timeout: float | None = None) -> bytes:
        with self.finished:
            if not self.finished.wait_for(lambda: self.outcome is not None, timeout):
                raise TimeoutError("the engine did not report the task")
        if self.outcome.status != "success":
            raise RuntimeError(f"{self.outcome.code}: {self.outcome.message}")
        return self.outcome.payload


@dataclass
class EngineTarget(Target):
    """mep's htex engine (``ParslHtexEngine``) driven directly in this process, with no SDK, service,
    router or endpoint loop around it: what the engine costs on its own, beside bare HTEX."""

    label: str
    engine: Any  # mep.endpoint.parsl_engine.ParslHtexEngine
    home: Path  # the engine keeps Parsl's files under $HOME/.mep/parsl: a throwaway one, not root's
    futures: dict[str, _EngineResult] = field(default_factory=dict)
    bodies: dict[Callable[..., Any], tuple[str, bytes]] = field(default_factory=dict)
    arguments: dict[tuple, bytes] = field(default_factory=dict)
    finished: threading.Condition = field(default_factory=threading.Condition)

    def submit(self, fn: Callable[..., Any], *args: Any) -> _EngineResult:  # type: ignore[override]
        from mep.sdk.serialize import function_hash, serialize_args, serialize_function

        if fn not in self.bodies:  # the endpoint, too, gets a function's body once and keeps it
            body = serialize_function(fn)
            self.bodies[fn] = (function_hash(body), body)
        fn_hash, body = self.bodies[fn]
        if args not in self.arguments:  # the endpoint gets arguments as bytes: no serialising on its side
            self.arguments[args] = serialize_args(args, {})
        task_id = str(uuid.uuid4())
        result = self.futures[task_id] = _EngineResult(self.finished)
        self.engine.submit(task_id, fn_hash, body, self.arguments[args])
        return result

    def _done(self, task_id: str, outcome: Any) -> None:
        result = self.futures.pop(task_id)
        with self.finished:
            result.outcome = outcome
            self.finished.notify_all()

    def roles(self) -> dict[str, list[int]]:
        return _htex_roles(self.engine._executor)  # noqa: SLF001 - the engine has no public view of its processes

    def close(self) -> None:
        self.engine.shutdown()
        shutil.rmtree(self.home, ignore_errors=True)


def start_engine_alone(workers: int) -> EngineTarget:
    from mep.config.endpoint import HtexEngine
    from mep.endpoint.parsl_engine import ParslHtexEngine

    config = HtexEngine.model_validate({"type": "htex", "provider": {"type": "LocalProvider"},
                                        "address": "127.0.0.1", "workers_per_node": workers, "max_blocks": 1})
    target = EngineTarget("mep htex engine alone", engine=None,
                          home=Path(tempfile.mkdtemp(prefix="mep-bench-engine-", dir="/var/tmp")))
    home = os.environ.get("HOME")
    os.environ["HOME"] = str(target.home)
    try:
        target.engine = ParslHtexEngine(config, 300.0, on_started=lambda task_id: None, on_done=target._done)
    finally:
        os.environ["HOME"] = home or "/root"
    return target


def _htex_roles(executor: Any) -> dict[str, list[int]]:
    """This process, the interchange, and the block's processes: the worker pool (found by the run
    directory on its command line) and everything under it (the workers' command lines don't name it)."""
    interchange = executor.interchange_proc.pid
    children = procstat.parent_map()
    workers = sorted({pid for top in _pids_with_cmdline(executor.run_dir) if top != interchange
                      for pid in procstat.tree(top, children)})
    return {"client": [os.getpid()], "interchange": [interchange], "workers": workers}


def _pids_with_cmdline(fragment: str) -> list[int]:
    wanted = fragment.encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if wanted in handle.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def start_bare_htex(workers: int, *, encrypted: bool = False) -> HtexTarget:
    """HTEX below the DataFlowKernel: start(), one block from LocalProvider, ``submit(fn, {}, *args)``.

    The workers import ``benchmarks.tasks`` (Parsl sends the function by reference) and find Parsl's
    ``process_worker_pool.py`` on this interpreter's PATH."""
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    run_dir = Path(tempfile.mkdtemp(prefix="mep-bench-htex-", dir="/var/tmp"))
    worker_init = f"export PYTHONPATH={REPOSITORY}; export PATH={Path(sys.executable).parent}:$PATH"
    provider = LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1, worker_init=worker_init)
    # HTEX caps workers at cores / cores_per_worker: more workers than cores needs a fraction of a core each
    cores_per_worker = min(1.0, (os.cpu_count() or 1) / workers)
    executor = HighThroughputExecutor(label=f"htex{workers}{'e' if encrypted else ''}", address="127.0.0.1",
                                      max_workers_per_node=workers, cores_per_worker=cores_per_worker,
                                      provider=provider, encrypted=encrypted)
    executor.run_id = run_dir.name
    executor.run_dir = str(run_dir)
    provider.script_dir = str(run_dir)
    executor.start()
    executor.scale_out_facade(1)  # init_blocks is the strategy's job, and there is no strategy here
    return HtexTarget(f"HTEX{' encrypted' if encrypted else ''}", executor, run_dir)


def wait_for_workers(target: HtexTarget, workers: int) -> None:
    executor = target.executor
    wait_for(lambda: sum(m["worker_count"] for m in executor.connected_managers()) >= workers,
             timeout=HTEX_START_TIMEOUT, what=f"{workers} HTEX workers to connect")


@dataclass
class Lab:
    """Everything a run needs, built when first asked for, torn down in reverse order at the end."""

    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    root_deploy: Deployment | None = None
    managers: dict[str, Manager] = field(default_factory=dict)
    targets: dict[tuple, Target] = field(default_factory=dict)

    def __enter__(self) -> Lab:
        if os.geteuid() != 0:
            raise SystemExit("the benchmark suite runs as root: it creates the accounts tasks run as")
        ensure_router_account()
        os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        return self

    def __exit__(self, *exc: object) -> None:
        for target in reversed(list(self.targets.values())):
            with contextlib.suppress(Exception):  # one stuck part must not keep accounts behind
                target.close()
        self.stack.close()

    # --- parts ---------------------------------------------------------------------------

    def account(self, tag: str) -> pwd.struct_passwd:
        return self.stack.enter_context(unix_account(f"mepb{tag}"))

    def deploy(self) -> Deployment:
        if self.root_deploy is None:
            self.root_deploy = self.stack.enter_context(deployment())
        return self.root_deploy

    def manager(self, kind: str) -> Manager:
        """``process`` (the shipped local template), ``cold`` (the same, a manager of its own for the cold start
        trials: a short audit log), ``htex`` (benchmarks/templates), ``slurm`` (shipped)."""
        if kind not in self.managers:
            templates = {"process": (None, None), "cold": (None, None),
                         "htex": (BENCH_TEMPLATES / "local-htex.yaml.j2", BENCH_TEMPLATES / "local-htex.schema.json"),
                         "slurm": (SHIPPED_TEMPLATES / "slurm.yaml.j2", SHIPPED_TEMPLATES / "slurm.schema.json")}
            template, schema = templates[kind]
            self.managers[kind] = self.deploy().start_manager(expression_mapping(DOMAIN_STRIP), template=template,
                                                              schema=schema)
        return self.managers[kind]

    def new_manager(self) -> Manager:
        """A manager of its own, shipped local template (the users benchmark measures one manager's memory and CPU)."""
        return self.deploy().start_manager(expression_mapping(DOMAIN_STRIP))

    # --- targets -------------------------------------------------------------------------

    # kind -> (the manager it runs under, its label)
    MEP_KINDS: ClassVar[dict[str, tuple[str, str]]] = {
        "multi-user": ("process", "mep"), "cold": ("cold", "mep"), "single-user": ("own", "mep single-user"),
        "htex": ("htex", "mep htex engine"), "slurm": ("slurm", "mep Slurm")}

    def mep(self, kind: str, workers: int) -> MepTarget:
        """``kind``: one of ``MEP_KINDS``; each (kind, workers) has an account of its own."""
        key = ("mep", kind, workers)
        if key not in self.targets:
            manager_kind, label = self.MEP_KINDS[kind]
            account = self.account(f"{kind[:2]}{workers}")
            if manager_kind == "own":  # single-user: service and manager run as the account itself
                deploy = self.stack.enter_context(deployment(account.pw_name))
                manager = deploy.start_manager(expression_mapping(DOMAIN_STRIP))
            else:
                deploy, manager = self.deploy(), self.manager(manager_kind)
            config: dict[str, Any] = {"workers": workers}
            if kind == "slurm":
                config = {"workers_per_node": workers, "walltime": "01:00:00"}
            self.targets[key] = MepTarget(label, deploy, manager, deploy.identity(f"{account.pw_name}@example.org"),
                                          account, config)
        return self.targets[key]  # type: ignore[return-value]

    def htex(self, workers: int, *, encrypted: bool = False) -> HtexTarget:
        key = ("htex", workers, encrypted)
        if key not in self.targets:
            self.targets[key] = start_bare_htex(workers, encrypted=encrypted)  # registered first: closed on failure
            wait_for_workers(self.targets[key], workers)  # type: ignore[arg-type]
        return self.targets[key]

    def engine_alone(self, workers: int) -> EngineTarget:
        key = ("engine", workers)
        if key not in self.targets:
            self.targets[key] = start_engine_alone(workers)
        return self.targets[key]  # type: ignore[return-value]

    def pool(self, workers: int) -> PoolTarget:
        key = ("pool", workers)
        if key not in self.targets:
            self.targets[key] = PoolTarget("ProcessPoolExecutor", concurrent.futures.ProcessPoolExecutor(workers))
        return self.targets[key]


# --- the audit log and the endpoint log, for breakdowns --------------------------------------


def audit_size(manager: Manager) -> int:
    """The audit log's length now: read from here on to see only what happens next (it grows with every
    decision and endpoint start, so reading it whole gets slow)."""
    return audit_log_of(manager.config_path).stat().st_size


def audit_records(manager: Manager, offset: int = 0) -> list[dict[str, Any]]:
    """The audit records written since ``offset`` (complete lines only)."""
    with open(audit_log_of(manager.config_path), "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    return [json.loads(line) for line in data[:data.rfind(b"\n") + 1].splitlines() if line.strip()]


def iso_seconds(stamp: str) -> float:
    """The audit log's ``2026-12-01T09:00:00.123Z`` as Unix seconds."""
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def stop_endpoints(target: MepTarget, timeout: float = 30.0) -> None:
    """SIGTERM the target's idle endpoints and wait until the spawner has recorded their exit."""
    pids = target.endpoint_pids()
    offset = audit_size(target.manager)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def exited() -> bool:
        recorded = {r.get("pid") for r in audit_records(target.manager, offset) if r.get("event") == "endpoint_exited"}
        return set(pids) <= recorded and not target.endpoint_pids()

    wait_for(exited, timeout=timeout, what=f"endpoints {pids} to exit")
    time.sleep(0.05)
