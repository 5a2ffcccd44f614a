"""The ``htex`` engine: tasks run on Parsl HighThroughputExecutor workers in blocks a scheduler provides.

The engine builds the provider and launcher named in the config, an encrypted
HighThroughputExecutor whose run directory is private to the account, and
Parsl's ``JobStatusPoller`` with the ``htex_auto_scale`` strategy, so blocks
come and go between ``min_blocks`` and ``max_blocks`` as tasks do. This
module imports Parsl; ``mep.endpoint.engines`` imports it only for an htex
config, so the ``process`` engine's cold start doesn't pay for Parsl.

Tasks travel to the workers as mep's own bytes, not Parsl's serialisation:
``submit_payload`` names ``run_on_worker`` as the task executor, which runs
the task with ``mep.endpoint.bootstrap`` in the Parsl worker itself or, with
``worker_python``, in a bootstrap worker of that interpreter that the Parsl
worker keeps for its lifetime.

What a scheduler can do wrong reaches the task as a clear failure: a block
the scheduler refuses (an unknown partition, say) fails the waiting tasks with
the scheduler's own words; a block that has not started ``start_timeout``
seconds after tasks began waiting fails them and is cancelled. After such a
failure the executor is taken down and the next task starts a fresh one.
``shutdown`` cancels every block still queued or running, so nothing of the
account's is left in the scheduler.

Limits that come from HTEX: a task can't be taken back from a worker, so
``cancel`` reports the task as cancelled at once while a task already running
runs to its end (its result is dropped); and Parsl does not say when a task
starts, so a task counts as started when the workers have taken as many tasks
as were submitted before it (the interchange dispatches in order).
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

import parsl.launchers
import parsl.providers
from parsl.executors import HighThroughputExecutor
from parsl.executors.errors import BadStateException
from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost
from parsl.jobs.job_status_poller import JobStatusPoller
from parsl.jobs.states import JobState, JobStatus
from parsl.logconfigs.file import FileLogging
from parsl.providers.base import ExecutionProvider

from mep.endpoint import bootstrap
from mep.endpoint.engine import EMPTY
from mep.endpoint.interpreters import WorkerProcess, lost_worker, start_worker
from mep.endpoint.worker import Outcome
from mep.errors import ErrorCode
from mep.protocol.messages import FAILED

if TYPE_CHECKING:
    from mep.config.endpoint import HtexEngine as HtexConfig

log = logging.getLogger(__name__)

LABEL = "mep"
# Parsl's own default logs every task several times over: the interchange builds a record for each of its
# debug lines only for its file handler to drop it, and the worker pool and each worker write three lines per
# task. That is a sizeable share of HTEX's CPU per task; warnings and errors still go to the same files.
_WARNINGS_ONLY = FileLogging(level=logging.WARNING)
_WATCH_PERIOD = 1.0
_STRATEGY_PERIOD = 2.0
_STDERR_IN_MESSAGE = re.compile(r"stderr=(.*)\Z", re.DOTALL)


@dataclass
class _Task:
    future: Future
    started: bool = False


class _EngineFailure(Exception):
    """Why the executor's blocks can't run tasks; its text is what the waiting tasks fail with."""


class _Executor(HighThroughputExecutor):
    """HTEX, except that scaling in by no blocks cancels no block.

    With Parsl 2026.10.26, ``htex_auto_scale`` calls ``scale_in(0, max_idletime)``
    whenever the blocks have more worker slots than there are tasks, and HTEX's
    idle-aware scale-in then cancels the first idle block anyway (its loop
    stops only on reaching the count). A queued block has never connected, so
    it is idle forever: a block bigger than the work (two nodes, or several
    workers, for one task) would be cancelled and resubmitted at every
    strategy period and never start.
    """

    def scale_in(self, blocks: int, max_idletime: float | None = None) -> list[str]:
        return [] if blocks <= 0 else super().scale_in(blocks, max_idletime=max_idletime)


class ParslHtexEngine:
    """The engine interface (``submit``, ``cancel``, ``shutdown``; ``on_started``/``on_done``) over HTEX."""

    reads_argument_files = False  # a worker may be on a node without the endpoint's files: arguments go as bytes

    def __init__(self, config: HtexConfig, idle_timeout: float, on_started: Callable[[str], None],
                 on_done: Callable[[str, Outcome], None]) -> None:
        self._config = config
        self._idle_timeout = idle_timeout
        self._on_started = on_started
        self._on_done = on_done
        self._lock = threading.RLock()  # futures' callbacks may run inside calls made under it
        self._tasks: dict[str, _Task] = {}  # submitted, not yet reported; in submission order
        self._executor: _Executor | None = None
        self._poller: JobStatusPoller | None = None
        self._connected_blocks: set[str] = set()
        self._waiting_since = 0.0
        self._run_dir = _private_run_dir()
        self._stop = threading.Event()
        logging.getLogger("parsl").setLevel(logging.WARNING)  # Parsl's INFO would drown the endpoint's log
        try:
            self._start_executor()
        except Exception:  # the first task says why; the next one tries again
            log.exception("could not start Parsl's executor")
        self._watcher = threading.Thread(target=self._watch, name="htex-watch", daemon=True)
        self._watcher.start()
        log.info("htex engine with %s; Parsl's files are in %s", config.provider.type, self._run_dir)

    # --- the engine interface (the endpoint's thread) -----------------------------------

    def submit(self, task_id: str, fn_hash: str, fn_body: bytes, args: bytes,
               resources: Mapping[str, int] = EMPTY) -> None:
        context: dict = {"task_executor": {"f": f"{__name__}.run_on_worker", "a": (self._config.worker_python,)}}
        if self._config.mpi is not None:
            context["resource_spec"] = mpi_placement(resources)
        elif resources:
            context["resource_spec"] = dict(resources)
        with self._lock:
            try:
                if self._executor is None:
                    self._start_executor()
                future = self._executor.submit_payload(context, pickle.dumps((fn_hash, fn_body, args)))
            except Exception as exc:
                self._on_done(task_id, _failed_outcome(exc))
                return
            self._tasks[task_id] = _Task(future)
        future.add_done_callback(lambda done: self._finish(task_id, done))

    def cancel(self, task_id: str, outcome: Outcome) -> None:
        """Report ``outcome`` now; HTEX can't stop a task, so one already running finishes unheard."""
        with self._lock:
            if self._tasks.pop(task_id, None) is None:
                return
        self._on_done(task_id, outcome)

    def shutdown(self) -> None:
        """Stop watching, cancel every block still queued or running, and stop the interchange."""
        self._stop.set()
        self._watcher.join()
        with self._lock:
            executor, poller = self._executor, self._poller
            self._executor = self._poller = None
        if executor is not None:
            _stop_executor(executor, poller)

    # --- building and taking down the executor ------------------------------------------

    def _start_executor(self) -> None:
        config = self._config
        executor = _Executor(
            label=LABEL, provider=self._make_provider(), address=config.address,
            max_workers_per_node=config.workers_per_node, encrypted=True,
            block_error_handler=self._check_blocks,
        )
        if config.mpi is not None:  # Parsl's MPI mode is these two attributes, read by start()
            executor.enable_mpi_mode = True
            executor.mpi_launcher = config.mpi.launcher
        executor.run_id = self._run_dir.name
        executor.run_dir = str(self._run_dir)
        executor.log_config = _WARNINGS_ONLY if _blocks_run_here(config) else None
        script_dir = self._run_dir / "submit_scripts"
        script_dir.mkdir(mode=0o700, exist_ok=True)
        executor.provider.script_dir = str(script_dir)
        executor.start()
        poller = JobStatusPoller(strategy="htex_auto_scale", max_idletime=self._idle_timeout,
                                 strategy_period=_STRATEGY_PERIOD)
        poller.add_executors([executor])
        self._executor, self._poller = executor, poller
        self._connected_blocks = set()
        self._waiting_since = 0.0

    def _make_provider(self) -> ExecutionProvider:
        config = self._config
        provider_class = getattr(parsl.providers, config.provider.type)
        accepted = inspect.signature(provider_class).parameters
        arguments = {
            **config.provider.arguments,
            "init_blocks": config.init_blocks, "min_blocks": config.min_blocks, "max_blocks": config.max_blocks,
            "worker_init": config.worker_init,
        }
        if "exclusive" in accepted:
            arguments.setdefault("exclusive", False)  # blocks of several endpoints share a node
        owner = {"user_id": str(os.getuid()), "group_id": str(os.getgid()), "run_as_non_root": True}
        arguments.update({name: value for name, value in owner.items() if name in accepted})
        if config.launcher is not None:
            launcher_class = getattr(parsl.launchers, config.launcher.type)
            arguments["launcher"] = launcher_class(**config.launcher.arguments)
        return provider_class(**arguments)

    def _retire(self, executor: _Executor) -> None:
        """Take down an executor in bad state; the next task starts a fresh one."""
        with self._lock:
            if self._executor is not executor:
                return
            poller = self._poller
            self._executor = self._poller = None
        _stop_executor(executor, poller)

    # --- watching blocks and tasks (the watcher thread, and Parsl's poller thread) -------

    def _watch(self) -> None:
        while not self._stop.wait(_WATCH_PERIOD):
            executor = self._executor
            if executor is None:
                continue
            if executor.bad_state_is_set:
                self._retire(executor)
                continue
            try:
                managers = [m for m in executor.connected_managers() if m["active"]]
            except Exception:  # the interchange is going away; the next round will know
                continue
            self._connected_blocks.update(str(m["block_id"]) for m in managers)
            with self._lock:
                self._mark_started(sum(m["tasks"] for m in managers))
                waiting = any(not task.started for task in self._tasks.values())
            now = time.monotonic()
            if not waiting or managers:
                self._waiting_since = 0.0
            elif not self._waiting_since:
                self._waiting_since = now
            elif now - self._waiting_since > self._config.start_timeout:
                self._fail_all(executor, self._start_timeout_message(executor))
                self._retire(executor)

    def _mark_started(self, on_workers: int) -> None:
        """Tasks are dispatched in submission order: the first ``on_workers`` unreported ones have started."""
        running = sum(task.started for task in self._tasks.values())
        for task_id, task in self._tasks.items():
            if running >= on_workers:
                return
            if not task.started:
                task.started = True
                running += 1
                self._on_started(task_id)

    def _start_timeout_message(self, executor: _Executor) -> str:
        blocks = {block: job for block, job in executor.blocks_to_job_id.items()
                  if not executor.status_facade.get(block) or not executor.status_facade[block].terminal}
        try:
            states = [status.state.name for status in executor.provider.status(list(blocks.values()))]
        except Exception:  # the scheduler's own tools failed: say what is known
            states = ["unknown"] * len(blocks)
        jobs = ", ".join(f"job {job} is {state}" for job, state in zip(blocks.values(), states, strict=True))
        return (
            f"no block of workers started within start_timeout ({self._config.start_timeout:g} s)"
            + (f": {jobs}" if jobs else "")
            + "; the request may be more than the scheduler can ever grant (nodes, partition, walltime) or its "
            "queue is busy. Ask for less, or allow a longer start_timeout"
        )

    def _check_blocks(self, executor: _Executor, status: dict[str, JobStatus]) -> None:
        """Parsl's block error handler: fail waiting tasks when the newest block failed and none is alive."""
        if not status or executor.outstanding() == 0:
            return
        if any(not block.terminal for block in status.values()):
            return
        newest = max(status, key=int)
        block = status[newest]
        if block.state == JobState.SCALED_IN:
            return  # cancelled by scaling while idle; the strategy starts another for the waiting tasks
        job = executor.blocks_to_job_id.get(newest, "")
        if newest in self._connected_blocks:
            reason = f"the block of workers (job {job}) ended ({block.state.name}) while tasks were waiting or running"
        else:
            reason = f"the scheduler did not run the block of workers: {_block_failure(block)}"
        self._fail_all(executor, reason)

    def _fail_all(self, executor: _Executor, reason: str) -> None:
        """Put the executor in bad state: its tasks, and any submitted to it from now on, fail with ``reason``."""
        with self._lock:  # Parsl walks its task table: no submit may add to it meanwhile
            executor.set_bad_state_and_fail_all(_EngineFailure(reason))

    def _finish(self, task_id: str, future: Future) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.future is not future:
                return  # cancelled meanwhile: its outcome was already reported
            del self._tasks[task_id]
        self._on_done(task_id, _outcome(future))


def _blocks_run_here(config: HtexConfig) -> bool:
    """Whether every block runs on this host, so that it reads the log config HTEX leaves in the run directory
    (elsewhere that directory may not be shared, and a worker pool that can't read the file never starts)."""
    launcher = "SingleNodeLauncher" if config.launcher is None else config.launcher.type  # LocalProvider's default
    return config.provider.type == "LocalProvider" and launcher == "SingleNodeLauncher"


def mpi_placement(resources: Mapping[str, int]) -> dict[str, int]:
    """A complete MPI-mode resource_spec: Parsl reads num_nodes, ranks_per_node and num_ranks as given.

    Parsl's MPI mode hangs on a task without ``num_nodes`` (Parsl issue #3427) and composes
    ``mpiexec -n None`` without ``num_ranks``, so what the task left out is filled in: one node, one rank
    per node, and whichever of ranks_per_node and num_ranks follows from the other.
    """
    nodes = resources.get("num_nodes", 1)
    if "num_ranks" in resources and "ranks_per_node" not in resources:
        per_node = -(-resources["num_ranks"] // nodes)
    else:
        per_node = resources.get("ranks_per_node", 1)
    return {"num_nodes": nodes, "ranks_per_node": per_node, "num_ranks": resources.get("num_ranks", nodes * per_node)}


def _private_run_dir() -> Path:
    """A fresh directory for Parsl's files, 0700: the interchange's keys and the job scripts live there."""
    base = Path.home() / ".mep" / "parsl"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=base))
    run_dir.chmod(0o700)
    return run_dir


def _stop_executor(executor: _Executor, poller: JobStatusPoller | None) -> None:
    """Stop scaling, cancel every block that may still be queued or running, stop the interchange."""
    if poller is not None:
        poller.close()  # scales in (cancels) the blocks, unless the executor is in bad state
    live = [job for block, job in executor.blocks_to_job_id.items()
            if block not in executor.status_facade or not executor.status_facade[block].terminal]
    if live:
        try:
            executor.provider.cancel(live)
        except Exception:  # the scheduler's tools failed; the blocks end at their walltime
            log.exception("could not cancel blocks %s", live)
    executor.shutdown()


def _block_failure(block: JobStatus) -> str:
    message = block.message or ""
    detail = _STDERR_IN_MESSAGE.search(message)
    text = detail.group(1).strip() if detail else (block.stderr_summary or message or block.state.name)
    return " ".join(text.split())[:500]


def _outcome(future: Future) -> Outcome:
    try:
        return Outcome(*future.result())
    except Exception as exc:
        return _failed_outcome(exc)


def _failed_outcome(exc: BaseException) -> Outcome:
    if isinstance(exc, (BadStateException, _EngineFailure)):
        reason = exc.reason if isinstance(exc, BadStateException) else exc
        return Outcome(FAILED, code=ErrorCode.SPAWN_FAILED, message=str(reason))
    if isinstance(exc, (ManagerLost, WorkerLost)):
        return Outcome(FAILED, code=ErrorCode.WORKER_LOST, message=f"the worker running this task was lost: {exc}")
    return Outcome(FAILED, code=ErrorCode.INTERNAL, message=f"the endpoint could not run this task: {exc}")


# --- the Parsl worker's side ------------------------------------------------------------

_bootstrap_workers: dict[str, tuple[WorkerProcess, Connection]] = {}


def run_on_worker(buffer: bytes, worker_python: str | None) -> Outcome:
    """Run one task inside a Parsl worker (named by ``submit_payload``'s task executor)."""
    fn_hash, fn_body, args = pickle.loads(buffer)
    if worker_python is None:
        return Outcome(*bootstrap.run_task(fn_hash, fn_body, args))
    if worker_python not in _bootstrap_workers:
        _bootstrap_workers[worker_python] = start_worker(worker_python)
    process, connection = _bootstrap_workers[worker_python]
    try:
        connection.send([(bootstrap.RUN, "", fn_hash, fn_body, args, None)])  # a large result: the endpoint writes it
        return Outcome(*connection.recv()[0][1])
    except (EOFError, OSError):
        del _bootstrap_workers[worker_python]
        connection.close()
        return lost_worker(process, worker_python)
