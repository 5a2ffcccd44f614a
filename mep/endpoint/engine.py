"""Engines execute tasks for the user endpoint; ``process`` is a local pool of worker processes.

An engine takes ``(task id, function hash, function body, args)`` and later
reports ``(task id, Outcome)`` through a callback that may run on any thread.
The seam is deliberately small so Parsl's executors can sit behind it.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from mep.endpoint.worker import Outcome, run_task
from mep.errors import ErrorCode
from mep.protocol.messages import FAILED

Completion = Callable[[str, Outcome], None]


class ProcessEngine:
    """A pool of worker processes on this host.

    Workers come from a forkserver started before the endpoint opens any
    socket, so they never inherit a ZeroMQ context or the endpoint's keys.
    """

    def __init__(self, workers: int, on_done: Completion) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["mep.endpoint.worker"])
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        self._on_done = on_done
        self.running = 0

    def submit(self, task_id: str, fn_hash: str, fn_body: bytes, args: bytes) -> None:
        self.running += 1
        future = self._pool.submit(run_task, fn_hash, fn_body, args)
        future.add_done_callback(lambda done: self._on_done(task_id, _outcome(done)))

    def task_finished(self) -> None:
        self.running -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _outcome(future: Future) -> Outcome:
    try:
        return future.result()
    except BrokenProcessPool:
        return Outcome(FAILED, message="a worker process died while running this task", code=ErrorCode.ENDPOINT_LOST)
    except Exception as exc:  # e.g. the task's arguments could not be sent to the worker
        return Outcome(FAILED, message=f"the endpoint could not run this task: {exc}", code=ErrorCode.INTERNAL)
