"""The process engine's local workers, forked by mep.endpoint.forker: real processes, real signals."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import dill
import pytest

from mep.endpoint import forker as forker_module
from mep.endpoint.engine import ProcessEngine
from mep.endpoint.worker import Outcome
from mep.errors import ErrorCode
from mep.protocol.messages import FAILED, SUCCESS
from tests.harness import children_of, wait_for


def parentage() -> tuple[int, int]:
    import os

    return os.getpid(), os.getppid()


def die_by_sigkill() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


class Results:
    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}
        self._changed = threading.Condition()

    def done(self, task_id: str, outcome: Outcome) -> None:
        with self._changed:
            self.outcomes[task_id] = outcome
            self._changed.notify_all()

    def wait(self, task_id: str, timeout: float = 60.0) -> Outcome:
        with self._changed:
            assert self._changed.wait_for(lambda: task_id in self.outcomes, timeout), f"no outcome for {task_id}"
            return self.outcomes[task_id]


@pytest.fixture
def engine() -> Iterator[tuple[ProcessEngine, Results]]:
    results = Results()
    engine = ProcessEngine(2, lambda task_id: None, results.done)
    yield engine, results
    engine.shutdown()


def submit(engine: ProcessEngine, task_id: str, fn: Callable) -> None:
    fn.__module__ = "__main__"  # by value: the worker need not import this test module
    engine.submit(task_id, fn.__name__, dill.dumps(fn, recurse=True), dill.dumps(((), {})))


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode()


def test_workers_are_children_of_one_forker_and_nothing_of_multiprocessing_runs(engine) -> None:
    engine, results = engine
    submit(engine, "a", parentage)
    outcome = results.wait("a")
    assert outcome.status == SUCCESS
    worker, forker = dill.loads(outcome.payload)
    # the engine starts one process itself, the forker (an earlier test's leftovers may be our children too)
    assert forker in children_of(os.getpid()) and "mep.endpoint.forker" in cmdline(forker)
    wait_for(lambda: len(children_of(forker)) == 2, what="both workers")
    assert worker in children_of(forker)
    assert not any("multiprocessing" in cmdline(pid) for pid in [forker, *children_of(forker)])


def test_a_worker_killed_by_a_signal_fails_its_task_with_the_signal_and_is_replaced(engine) -> None:
    engine, results = engine
    submit(engine, "dies", die_by_sigkill)
    outcome = results.wait("dies")
    assert (outcome.status, outcome.code) == (FAILED, ErrorCode.WORKER_LOST)
    assert "was killed by signal 9 (SIGKILL)" in outcome.message
    submit(engine, "after", parentage)
    assert results.wait("after").status == SUCCESS


def test_workers_die_with_their_forker_and_a_new_forker_serves_the_next_task(engine) -> None:
    engine, results = engine
    submit(engine, "first", parentage)
    _, forker = dill.loads(results.wait("first").payload)
    wait_for(lambda: len(children_of(forker)) == 2, what="both workers")
    workers = children_of(forker)
    os.kill(forker, signal.SIGKILL)
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in workers),
             what="the workers to die with their forker")
    time.sleep(0.1)
    submit(engine, "second", parentage)
    outcome = results.wait("second")
    assert outcome.status == SUCCESS
    assert dill.loads(outcome.payload)[1] != forker


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def new_children(before: set[int]) -> set[int]:
    """This process's children not in ``before`` (an earlier test's leftovers may be our children too)."""
    return set(children_of(os.getpid())) - before


def test_the_forker_started_before_the_endpoints_imports_is_the_one_its_engine_uses() -> None:
    before = set(children_of(os.getpid()))
    forker_module.start_early()  # as python -m mep.endpoint does
    (early,) = new_children(before)
    results = Results()
    engine = ProcessEngine(1, lambda task_id: None, results.done)
    try:
        assert new_children(before) == {early}  # taken, not a second one
        submit(engine, "a", parentage)
        assert dill.loads(results.wait("a").payload)[1] == early
    finally:
        engine.shutdown()
    assert forker_module._early is None


def test_a_forker_started_early_that_no_engine_takes_is_ended() -> None:
    before = set(children_of(os.getpid()))
    forker_module.start_early()
    (early,) = new_children(before)
    forker_module.discard_early()
    assert not os.path.exists(f"/proc/{early}")  # exited and reaped
    forker_module.discard_early()  # nothing left to end: a no-op
