"""Choose the engine a user endpoint runs its tasks on, from its config.

``process`` without ``worker_python``: the process engine's pool of workers
forked from a clean process of this interpreter (``mep.endpoint.forker``). ``process`` with ``container``: bootstrap workers in the container
(``mep.endpoint.containers``). ``process`` with ``worker_python``: the same engine whose
workers are bootstrap workers of that interpreter. ``htex``: Parsl's
HighThroughputExecutor (``mep.endpoint.parsl_engine``, which alone imports
Parsl). A ``worker_python`` that can't run tasks at all gives an engine that
fails each task with the reason, rather than an endpoint that can't start.
"""

from __future__ import annotations

import functools
import os
import pwd
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from mep.endpoint.engine import EMPTY, Completion, ProcessEngine, ResultFileFor, Started
from mep.endpoint.interpreters import WorkerEnvironmentError, start_worker, worker_runtime
from mep.endpoint.large_args import ArgumentFile
from mep.endpoint.worker import Outcome
from mep.errors import ErrorCode
from mep.protocol.messages import FAILED

if TYPE_CHECKING:
    from mep.endpoint.settings import EndpointConfig


class Engine(Protocol):
    reads_argument_files: bool  # submit may be given an ArgumentFile (its workers share this disk)

    # resources: the task's resource_specification, already checked against the config's task_resources
    def submit(self, task_id: str, fn_hash: str, fn_body: bytes, args: bytes | ArgumentFile,
               resources: Mapping[str, int] = EMPTY) -> None: ...
    def cancel(self, task_id: str, outcome: Outcome) -> None: ...
    def shutdown(self) -> None: ...


def make_engine(config: EndpointConfig, on_started: Started, on_done: Completion,
                result_file: ResultFileFor | None = None) -> Engine:
    """``result_file``: given to the workers on this host outside a container, which write large results themselves
    (an htex worker may be on another node, a container may not see the results directory: the endpoint writes
    theirs)."""
    engine = config.engine
    if engine.worker_python is not None:
        try:
            worker_runtime(engine.worker_python)
        except WorkerEnvironmentError as exc:
            return UnusableEngine(str(exc), on_done)
    if engine.type == "htex":
        from mep.endpoint.parsl_engine import ParslHtexEngine

        return ParslHtexEngine(engine, config.idle_timeout, on_started, on_done)
    if engine.worker_python is not None:
        return ProcessEngine(engine.workers, on_started, on_done,
                             start_worker=functools.partial(start_worker, engine.worker_python),
                             result_file=result_file)
    if engine.container is not None:
        from mep.endpoint.containers import container_problem, start_container_worker

        problem = container_problem(engine.container)
        if problem:
            return UnusableEngine(problem, on_done)
        home = pwd.getpwuid(os.getuid()).pw_dir
        return ProcessEngine(engine.workers, on_started, on_done,
                             start_worker=functools.partial(start_container_worker, engine.container, home))
    return ProcessEngine(engine.workers, on_started, on_done, result_file=result_file)


class UnusableEngine:
    """Fails every task at once with why the configured workers can't run."""

    reads_argument_files = False

    def __init__(self, reason: str, on_done: Completion, code: str = ErrorCode.CONFIG_INVALID) -> None:
        self._reason = reason
        self._on_done = on_done
        self._code = code

    def submit(self, task_id: str, fn_hash: str, fn_body: bytes, args: bytes,
               resources: Mapping[str, int] = EMPTY) -> None:
        self._on_done(task_id, Outcome(FAILED, code=self._code, message=self._reason))

    def cancel(self, task_id: str, outcome: Outcome) -> None:
        """Nothing to stop: every task was answered when it arrived."""

    def shutdown(self) -> None:
        """Nothing runs."""
