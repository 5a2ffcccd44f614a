"""The process engine sends each worker more than one task: what is queued behind a running task is never lost,
never run twice, never started when cancelled, and moves to an idle worker. Real forked workers, real signals."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import dill
import pytest

from mep.endpoint.engine import ProcessEngine
from mep.endpoint.worker import Outcome
from mep.errors import ErrorCode
from mep.protocol.messages import CANCELLED, FAILED, SUCCESS
from tests.harness import wait_for
from tests.test_endpoint_forker import Results


class Events(Results):
    """What the engine reported: every start as well, and any task reported twice."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[str] = []
        self.done_twice: list[str] = []

    def on_started(self, task_id: str) -> None:
        self.started.append(task_id)

    def on_done(self, task_id: str, outcome: Outcome) -> None:
        if task_id in self.outcomes:
            self.done_twice.append(task_id)
        self.done(task_id, outcome)


def start_engine(workers: int) -> tuple[ProcessEngine, Events]:
    events = Events()
    return ProcessEngine(workers, events.on_started, events.on_done), events


@pytest.fixture
def one_worker() -> Iterator[tuple[ProcessEngine, Events]]:
    yield from running_engine(1)


@pytest.fixture
def two_workers() -> Iterator[tuple[ProcessEngine, Events]]:
    yield from running_engine(2)


def running_engine(workers: int) -> Iterator[tuple[ProcessEngine, Events]]:
    engine, events = start_engine(workers)
    yield engine, events
    engine.shutdown()
    assert not events.done_twice


def submit(engine: ProcessEngine, task_id: str, fn: Callable, *args: object) -> None:
    fn.__module__ = "__main__"  # by value: the worker need not import this test module
    engine.submit(task_id, fn.__name__, dill.dumps(fn, recurse=True), dill.dumps((args, {})))


def mark_then_sleep(path: str, seconds: float) -> int:
    import os
    import time

    with open(path, "w") as handle:
        handle.write("ran")
    time.sleep(seconds)
    return os.getpid()


def mark(path: str) -> int:
    import os

    with open(path, "a") as handle:
        handle.write("ran\n")
    return os.getpid()


def die_by_sigkill() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def say(text: str) -> None:
    print(text)


def cancelled() -> Outcome:
    return Outcome(CANCELLED, code=ErrorCode.CANCELLED, message="cancelled by the submitter")


def long_then_queued(engine: ProcessEngine, directory: Path) -> Path:
    """A long task "long" running on the one worker and "queued" behind it; the file "queued" marks when it ran."""
    long_mark, queued_mark = directory / "long", directory / "queued"
    submit(engine, "long", mark_then_sleep, str(long_mark), 60.0)
    submit(engine, "queued", mark, str(queued_mark))
    wait_for(long_mark.exists, what="the long task to start")
    return queued_mark


def test_a_queued_task_that_is_cancelled_never_starts_and_the_running_one_goes_on(one_worker, tmp_path) -> None:
    engine, events = one_worker
    queued_mark = long_then_queued(engine, tmp_path)
    engine.cancel("queued", cancelled())
    assert events.wait("queued").status == CANCELLED
    assert "long" not in events.outcomes  # still running: a queued task's cancel does not stop the worker
    assert "queued" not in events.started and not queued_mark.exists()
    engine.cancel("long", cancelled())
    assert events.wait("long").status == CANCELLED


def test_cancelling_the_running_task_runs_the_one_queued_behind_it_on_the_next_worker(one_worker, tmp_path) -> None:
    engine, events = one_worker
    queued_mark = long_then_queued(engine, tmp_path)
    engine.cancel("long", cancelled())
    assert events.wait("long").status == CANCELLED
    outcome = events.wait("queued")
    assert outcome.status == SUCCESS
    assert queued_mark.read_text() == "ran\n"  # once
    assert events.started.count("queued") == 1


def test_a_worker_crash_fails_only_its_running_task_and_the_queued_one_runs_elsewhere(one_worker, tmp_path) -> None:
    engine, events = one_worker
    queued_mark = tmp_path / "queued"
    submit(engine, "dies", die_by_sigkill)
    submit(engine, "queued", mark, str(queued_mark))
    outcome = events.wait("dies")
    assert (outcome.status, outcome.code) == (FAILED, ErrorCode.WORKER_LOST)
    assert "was killed by signal 9 (SIGKILL)" in outcome.message
    assert events.wait("queued").status == SUCCESS
    assert queued_mark.read_text() == "ran\n"


def test_a_task_queued_behind_a_long_one_moves_to_an_idle_worker(two_workers, tmp_path) -> None:
    engine, events = two_workers
    first_mark, second_mark = tmp_path / "first", tmp_path / "second"
    # Two at once, so both workers get one: the long one's worker then holds the next two as well.
    submit(engine, "long", mark_then_sleep, str(first_mark), 60.0)
    submit(engine, "short", mark, str(tmp_path / "short"))
    submit(engine, "behind-1", mark, str(second_mark))
    submit(engine, "behind-2", mark, str(second_mark))
    for task_id in ("short", "behind-1", "behind-2"):
        assert events.wait(task_id).status == SUCCESS  # none waits for the long task
    assert second_mark.read_text() == "ran\nran\n"
    assert "long" not in events.outcomes
    engine.cancel("long", cancelled())
    assert events.wait("long").status == CANCELLED


def test_a_worker_is_sent_a_function_again_until_it_has_run_it(two_workers, tmp_path) -> None:
    """The task that carried a function to a worker may be given back before it ran there."""
    engine, events = two_workers
    submit(engine, "long", mark_then_sleep, str(tmp_path / "long"), 3.0)
    submit(engine, "short", mark_pid)
    submit(engine, "carrier", mark, str(tmp_path / "carrier"))  # behind "long": moved to the idle worker
    assert events.wait("carrier").status == SUCCESS
    submit(engine, "blocker", mark_then_sleep, str(tmp_path / "blocker"), 30.0)  # to the idle worker
    submit(engine, "after", mark, str(tmp_path / "after"))  # behind "long", on the worker that never ran mark
    outcome = events.wait("after")
    assert outcome.status == SUCCESS, outcome.message
    assert "long" in events.outcomes  # it ran where "long" had run


def test_many_tasks_each_complete_once_and_each_tasks_output_is_logged_with_it_alone(capfd) -> None:
    engine, events = start_engine(2)  # started here: its workers write to the stdout capfd reads
    try:
        for number in range(300):
            if number % 50 == 0:
                submit(engine, f"t{number}", say, f"line {number}")
            else:
                submit(engine, f"t{number}", mark_pid)
        submit(engine, "chatty", say, "x" * 100_000)
        for task_id in [*(f"t{number}" for number in range(300)), "chatty"]:
            assert events.wait(task_id).status == SUCCESS
    finally:
        engine.shutdown()
    assert sorted(events.started) == sorted([*(f"t{number}" for number in range(300)), "chatty"])
    assert not events.done_twice
    log = capfd.readouterr().out
    for number in range(0, 300, 50):
        assert (f"--- output of task t{number}: {len(f'line {number}') + 1} bytes\nline {number}\n"
                f"--- end of the output of task t{number}\n") in log
    assert "--- output of task t1:" not in log  # printed nothing: nothing logged
    assert ("--- output of task chatty: 100001 bytes; only the first 65536 are kept here, 34465 dropped\n"
            + "x" * 65536 + "\n--- end of the output of task chatty\n") in log


def mark_pid() -> int:
    import os

    return os.getpid()
